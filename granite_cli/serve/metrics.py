"""The server's own view of a case, from its Prometheus `/metrics` sampled while the case runs:
running and waiting requests, KV-cache use, and its TTFT histogram's mean over the case.

Names differ by engine: vLLM (`vllm:num_requests_running`, `vllm:kv_cache_usage_perc`, before 0.9
`vllm:gpu_cache_usage_perc`, the histogram `vllm:time_to_first_token_seconds`) and llama.cpp's server
(`llamacpp:requests_processing`, `llamacpp:requests_deferred`, `llamacpp:n_busy_slots_per_decode`),
whose KV-cache use comes from its `/slots` instead; and each engine's prefix-cache counters (tokens hit
and queried), whose change over a case says how much of its prompts the server reused.
"""

from __future__ import annotations

import json
import math
import re
import threading

from granite_cli.redact import printable
from granite_cli.serve.http import Endpoint, HTTPFailure, get, json_value

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")

# what a row records → the gauges that say it, in each engine's names (the first one present wins)
GAUGES = {
    "running": ("vllm:num_requests_running", "llamacpp:requests_processing", "sglang:num_running_reqs"),
    "waiting": ("vllm:num_requests_waiting", "llamacpp:requests_deferred", "sglang:num_queue_reqs"),
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage"),
    "busy_slots_per_decode": ("llamacpp:n_busy_slots_per_decode",),
}
TTFT_HIST = ("vllm:time_to_first_token_seconds", "sglang:time_to_first_token_seconds")
# Prefix-cache counters (tokens), per engine: (hits, [what the queries add up to]). vLLM counts the
# tokens it looked up; SGLang's prompt-token counter is every prompt token; llama.cpp's counts only the
# tokens it processed, so its queries are those plus the cached ones. The first engine present wins.
PREFIX_COUNTERS = (
    ("vllm:prefix_cache_hits_total", ("vllm:prefix_cache_queries_total",)),
    ("vllm:prefix_cache_hits", ("vllm:prefix_cache_queries",)),
    ("sglang:cached_tokens_total", ("sglang:prompt_tokens_total",)),
    ("llamacpp:prompt_tokens_cached_total", ("llamacpp:prompt_tokens_total", "llamacpp:prompt_tokens_cached_total")),
)


def sample_lines(text: str):
    """(name, value) of each Prometheus sample line with a finite value; other lines are left out."""
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        try:
            v = float(m.group(3))
        except ValueError:
            continue
        if math.isfinite(v):
            yield m.group(1), v


def parse(text: str) -> dict[str, float]:
    """Prometheus text → {name: value}, label sets summed (a server with one model has one of each)."""
    out: dict[str, float] = {}
    for name, v in sample_lines(text):
        out[name] = out.get(name, 0.0) + v
    return out


class Malformed(Exception):
    """A metrics source answered with something that is not what it promises; it is dropped."""


def _fetch(ep: Endpoint, path: str, timeout: float) -> bytes | None:
    """The body of a 200 answer to GET `path`; None where the server has no such page (any other status,
    or no answer); Malformed where the answer is over the size cap."""
    try:
        status, body = get(ep, path, timeout)
    except HTTPFailure as e:
        if e.kind == "too_large":
            raise Malformed(f"{path}: {e.detail}") from None
        return None
    return body if status == 200 else None


def scrape(ep: Endpoint, timeout: float = 5.0) -> dict[str, float] | None:
    """The metrics now, or None when the server has no /metrics; Malformed when it answers 200 with
    something else."""
    body = _fetch(ep, "/metrics", timeout)
    return (parse(body.decode("utf-8", "replace")) or None) if body is not None else None


def _num(v) -> float:
    """A non-negative count from /slots (absent counts 0); anything else makes the answer malformed."""
    if v is None:
        return 0.0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise Malformed(f"/slots: a count of {json.dumps(v)[:40]}")
    return float(v)


def slots_usage(ep: Endpoint, timeout: float = 5.0) -> float | None:
    """llama.cpp's KV-cache use from `/slots` (its /metrics no longer says it): the tokens the busy slots
    hold (prompt processed, cached and decoded) over all slots' context. None where there is no /slots;
    Malformed where it answers with something else."""
    body = _fetch(ep, "/slots", timeout)
    if body is None:
        return None
    data = json_value(body)
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        return None
    total = sum(_num(x.get("n_ctx")) for x in data)
    used = 0.0
    for x in data:
        if x.get("is_processing") is True:
            nt = x.get("next_token")
            nt = (nt[0] if nt else {}) if isinstance(nt, list) else nt
            nt = nt if isinstance(nt, dict) else {}
            used += _num(x.get("n_prompt_tokens_processed")) + _num(x.get("n_prompt_tokens_cache")) + \
                _num(nt.get("n_decoded"))
    return used / total if total else None


class Sampler:
    """Samples /metrics (and llama.cpp's /slots) every `every` seconds on a thread between start() and
    stop(); summary() is what the row records (None fields where the engine exposes no such metric).
    A source that answers with something malformed is dropped for the rest of the case, and the row's
    `server_metrics` says so; it never ends the case."""

    def __init__(self, ep: Endpoint, every: float = 0.5, timeout: float = 5.0) -> None:
        self.ep, self.every, self.timeout = ep, every, timeout
        self.samples: list[dict[str, float]] = []
        self.slots: list[float] = []
        self.dropped: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sources: dict = {scrape: self.samples}   # source → where its answers go, while it answers

    def _guarded(self, fn):
        try:
            return fn(self.ep, self.timeout)
        except Malformed as e:
            self.dropped.append(str(e))
        except Exception as e:  # noqa: BLE001 -- an optional source never ends a case
            self.dropped.append(f"{fn.__name__}: {type(e).__name__}: {e}")
        return False

    def _sample(self) -> None:
        for fn, into in list(self._sources.items()):
            v = self._guarded(fn)
            if v is False:      # malformed: dropped for the rest of the case
                del self._sources[fn]
            elif v is not None:
                into.append(v)

    def start(self) -> "Sampler":
        u = self._guarded(slots_usage)
        if u is not None and u is not False:  # 0.0 (idle) is an answer
            self._sources[slots_usage] = self.slots
        self._sample()
        if self.samples or self.slots:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def stop(self) -> dict:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
        return self.summary()

    def summary(self) -> dict:
        note = "; dropped " + "; ".join(printable(d, 120) for d in self.dropped[:2]) if self.dropped else ""
        if not self.samples and not self.slots:
            return {"server_metrics": ("none (the server exposes no /metrics)" if not self.dropped else
                                       "none" + note)}
        out: dict = {"server_metrics": (f"/metrics, {len(self.samples)} samples" if self.samples else
                                        f"/slots only, {len(self.slots)} samples") + note}
        for field, names in GAUGES.items():
            name = next((n for n in names if any(n in s for s in self.samples)), None)
            vals = [s[name] for s in self.samples if name in s] if name else []
            out[f"server_{field}_max"] = max(vals) if vals else None
        out["server_kv_cache_source"] = ("/metrics" if out["server_kv_cache_usage_max"] is not None else
                                         "/slots" if self.slots else None)
        if out["server_kv_cache_usage_max"] is None and self.slots:
            out["server_kv_cache_usage_max"] = max(self.slots)
        prefix = prefix_counters(self.samples)
        if bad := prefix.pop("note", None):  # an impossible count is dropped, and the row says so
            out["server_metrics"] += f"; dropped {printable(bad, 120)}"
        out.update(prefix)
        out["server_ttft_mean_ms"] = None
        for h in TTFT_HIST:
            a, b = (self.samples[0], self.samples[-1]) if self.samples else ({}, {})
            n = b.get(h + "_count", 0.0) - a.get(h + "_count", 0.0)
            if n > 0 and h + "_sum" in b:
                out["server_ttft_mean_ms"] = (b[h + "_sum"] - a.get(h + "_sum", 0.0)) / n * 1e3
                break
        return out


def prefix_counters(samples: list[dict[str, float]]) -> dict:
    """The prefix-cache tokens hit and queried over a case (its counters' change from the first sample to
    the last); None where the server exposes no such counter. A counter that fell (a restarted server)
    gives None rather than a negative count; more hits than queries gives None and a "note" saying so."""
    out = {"server_prefix_hits": None, "server_prefix_queries": None, "server_prefix_source": None}
    if len(samples) < 2:
        return out
    a, b = samples[0], samples[-1]
    for hits, queries in PREFIX_COUNTERS:
        if hits in b and all(q in b for q in queries):
            dh = b[hits] - a.get(hits, 0.0)
            dq = sum(b[q] - a.get(q, 0.0) for q in queries)
            if 0 <= dh <= dq:
                out.update(server_prefix_hits=dh, server_prefix_queries=dq, server_prefix_source=hits)
            elif dh > dq >= 0:
                out["note"] = f"{hits}: {dh:g} tokens hit of {dq:g} queried, impossible"
            return out
    return out

