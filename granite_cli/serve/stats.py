"""What a case's requests add up to: latency percentiles (TTFT, ITL, TPOT, end to end), throughput,
failures by kind, requests in flight, the server's own timings and the client's own cost."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from granite_cli.serve.http import HTTPFailure, Timed

if TYPE_CHECKING:
    from granite_cli.serve.workload import Workload


@dataclass
class RequestLog:
    """The finished and failed requests of a case, as the worker threads report them."""

    done: list[Timed] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    first_error: str | None = None
    cpu_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, t: Timed | None, e: HTTPFailure | None, cpu: float) -> None:
        with self.lock:
            self.cpu_s += cpu
            if t is not None:
                self.done.append(t)
            else:
                self.errors[e.kind] = self.errors.get(e.kind, 0) + 1
                self.first_error = self.first_error or str(e)[:200]


def _pct(xs: list[float], name: str) -> dict:
    if not xs:
        return {f"{name}_p50": None, f"{name}_p90": None, f"{name}_p99": None}
    a = np.asarray(xs) * 1e3
    return {f"{name}_p50": float(np.percentile(a, 50)), f"{name}_p90": float(np.percentile(a, 90)),
            f"{name}_p99": float(np.percentile(a, 99))}


def summarize(log: RequestLog, w: "Workload", t0: float) -> dict:
    ok = [d for d in log.done if d.chunks]
    ends = [d.done for d in log.done]
    wall = (max(ends) - t0) if ends else None
    ttft = [d.chunks[0] - d.sent for d in ok]
    itl = [b - a for d in ok for a, b in zip(d.chunks, d.chunks[1:])]
    tpot = [(d.chunks[-1] - d.chunks[0]) / (n - 1) for d in ok if (n := d.completion_tokens or len(d.chunks)) > 1]
    out_tokens = sum(d.completion_tokens or len(d.chunks) for d in log.done)
    prompt_tokens = [d.prompt_tokens for d in log.done if d.prompt_tokens is not None]
    spans = sorted([(d.sent, 1) for d in log.done] + [(d.done, -1) for d in log.done], key=lambda x: (x[0], x[1]))
    live = peak = 0
    for _, step in spans:
        live += step
        peak = max(peak, live)
    n_err = sum(log.errors.values())
    row = {
        "requests": w.requests, "requests_ok": len(log.done), "errors": dict(log.errors) or None,
        "error": (f"{n_err} of {w.requests} request(s) failed: {log.first_error}" if n_err else None),
        "status": "ok" if log.done else "error", "wall_s": wall,
        "prompt_tokens_measured": (min(prompt_tokens), max(prompt_tokens)) if prompt_tokens else None,
        "prompt_tokens_exact": (all(p == w.ctx for p in prompt_tokens) if prompt_tokens else None),
        "output_tokens": out_tokens,
        "output_tokens_min": min((d.completion_tokens or len(d.chunks) for d in log.done), default=None),
        "cached_prompt_tokens": sum(d.cached_tokens or 0 for d in log.done) if log.done else None,
        **_pct(ttft, "ttft_ms"), **_pct(itl, "itl_ms"), **_pct(tpot, "tpot_ms"),
        **_pct([d.done - d.sent for d in log.done], "e2e_ms"),
        "output_tokens_per_s": out_tokens / wall if wall else None,
        "total_tokens_per_s": (out_tokens + sum(prompt_tokens or [w.ctx * len(log.done)])) / wall if wall else None,
        "requests_per_s": len(log.done) / wall if wall else None,
        "max_in_flight": peak,
        # tokens the server streamed no chunk of their own for (empty text, or a character's bytes not yet
        # complete): ITL is then over chunks, and a first token without text delays the measured TTFT
        "tokens_without_chunk": sum(max(0, (d.completion_tokens or 0) - len(d.chunks)) for d in log.done),
        **_server_timings(log.done),
        "client_cpu_ms_per_request": log.cpu_s / max(1, w.requests) * 1e3,
        "rate_rps": w.rate, "shared_prefix": w.shared_prefix or None,
    }
    row["tokens_per_s"] = row["output_tokens_per_s"]
    row["median_s"] = row["ttft_ms_p50"] / 1e3 if row["ttft_ms_p50"] is not None else None
    row["latency_ms"] = row["tpot_ms_p50"]
    return row


def _server_timings(done: list[Timed]) -> dict:
    """llama.cpp's own timings, where it reports them: its prompt processing and per-token decode time,
    the engine-side counterparts of TTFT and TPOT (the difference is the HTTP path and the client)."""
    ts = [d.server_timings for d in done if d.server_timings]  # finite, non-negative numbers (serve.http)
    return {**_pct([t["prompt_ms"] / 1e3 for t in ts if "prompt_ms" in t], "server_prompt_ms"),
            **_pct([t["predicted_per_token_ms"] / 1e3 for t in ts if "predicted_per_token_ms" in t],
                   "server_tpot_ms")}
