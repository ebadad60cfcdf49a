"""The server's own view of a case, from its Prometheus `/metrics` sampled while the case runs:
running and waiting requests, KV-cache use, and its TTFT histogram's mean over the case.

Names differ by engine: vLLM (`vllm:num_requests_running`, `vllm:kv_cache_usage_perc`, before 0.9
`vllm:gpu_cache_usage_perc`, the histogram `vllm:time_to_first_token_seconds`) and llama.cpp's server
(`llamacpp:requests_processing`, `llamacpp:requests_deferred`, `llamacpp:n_busy_slots_per_decode`),
whose KV-cache use comes from its `/slots` instead.
"""

from __future__ import annotations

import json
import re
import threading

from granite_cli.serve.http import Endpoint, HTTPFailure, get

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")

# what a row records → the gauges that say it, in each engine's names (the first one present wins)
GAUGES = {
    "running": ("vllm:num_requests_running", "llamacpp:requests_processing", "sglang:num_running_reqs"),
    "waiting": ("vllm:num_requests_waiting", "llamacpp:requests_deferred", "sglang:num_queue_reqs"),
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage"),
    "busy_slots_per_decode": ("llamacpp:n_busy_slots_per_decode",),
}
TTFT_HIST = ("vllm:time_to_first_token_seconds", "sglang:time_to_first_token_seconds")


def parse(text: str) -> dict[str, float]:
    """Prometheus text → {name: value}, label sets summed (a server with one model has one of each)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        try:
            v = float(m.group(3))
        except ValueError:
            continue
        out[m.group(1)] = out.get(m.group(1), 0.0) + v
    return out


def scrape(ep: Endpoint, timeout: float = 5.0) -> dict[str, float] | None:
    """The metrics now, or None when the server has no /metrics (or it does not answer)."""
    try:
        status, body = get(ep, "/metrics", timeout)
    except HTTPFailure:
        return None
    if status != 200:
        return None
    m = parse(body.decode("utf-8", "replace"))
    return m or None


def slots_usage(ep: Endpoint, timeout: float = 5.0) -> float | None:
    """llama.cpp's KV-cache use from `/slots` (its /metrics no longer says it): the tokens the busy slots
    hold (prompt processed, cached and decoded) over all slots' context. None where there is no /slots."""
    try:
        status, body = get(ep, "/slots", timeout)
        data = json.loads(body) if status == 200 else None
    except (HTTPFailure, ValueError):
        return None
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        return None
    total = sum(x.get("n_ctx") or 0 for x in data)
    used = 0
    for x in data:
        if x.get("is_processing"):
            nt = x.get("next_token")
            nt = (nt[0] if nt else {}) if isinstance(nt, list) else nt if isinstance(nt, dict) else {}
            used += (x.get("n_prompt_tokens_processed") or 0) + (x.get("n_prompt_tokens_cache") or 0) + \
                (nt.get("n_decoded") or 0)
    return used / total if total else None


class Sampler:
    """Samples /metrics (and llama.cpp's /slots) every `every` seconds on a thread between start() and
    stop(); summary() is what the row records (None fields where the engine exposes no such metric)."""

    def __init__(self, ep: Endpoint, every: float = 0.5) -> None:
        self.ep, self.every = ep, every
        self.samples: list[dict[str, float]] = []
        self.slots: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._has_slots = False

    def _sample(self) -> None:
        m = scrape(self.ep)
        if m is not None:
            self.samples.append(m)
        if self._has_slots and (u := slots_usage(self.ep)) is not None:
            self.slots.append(u)

    def start(self) -> "Sampler":
        self._has_slots = slots_usage(self.ep) is not None
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
        if not self.samples and not self.slots:
            return {"server_metrics": "none (the server exposes no /metrics)"}
        out: dict = {"server_metrics": f"/metrics, {len(self.samples)} samples" if self.samples else
                     f"/slots only, {len(self.slots)} samples"}
        for field, names in GAUGES.items():
            name = next((n for n in names if any(n in s for s in self.samples)), None)
            vals = [s[name] for s in self.samples if name in s] if name else []
            out[f"server_{field}_max"] = max(vals) if vals else None
        out["server_kv_cache_source"] = ("/metrics" if out["server_kv_cache_usage_max"] is not None else
                                         "/slots" if self.slots else None)
        if out["server_kv_cache_usage_max"] is None and self.slots:
            out["server_kv_cache_usage_max"] = max(self.slots)
        out["server_ttft_mean_ms"] = None
        for h in TTFT_HIST:
            a, b = (self.samples[0], self.samples[-1]) if self.samples else ({}, {})
            n = b.get(h + "_count", 0.0) - a.get(h + "_count", 0.0)
            if n > 0:
                out["server_ttft_mean_ms"] = (b[h + "_sum"] - a.get(h + "_sum", 0.0)) / n * 1e3
                break
        return out
