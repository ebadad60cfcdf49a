"""What a case's requests add up to: latency distributions (TTFT, ITL, TPOT, end to end) with the
percentiles their sample counts support, throughput, failures by kind, requests in flight, prompt
reuse against what the workload made reusable, SLO attainment and goodput, per-turn figures of a
multi-turn session, confidence intervals over repeated runs, and the client's own cost.

Names follow vLLM's `bench serve`: ITL is the gap between streamed chunks (pooled over requests);
TPOT is per request, (end to end − TTFT) / (output tokens − 1), which AIPerf and GuideLLM call ITL.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np

from granite_cli.errors import InputError
from granite_cli.serve.http import HTTPFailure, Timed

# A percentile is reported only where the samples support it: p90 needs at least 10 values, p99 100.
PERCENTILES = (50, 90, 95, 99)
# Reused prompt tokens beyond what the workload made reusable, up to this many per request (or this
# share of the prompt) are chance matches of a server's cache, not an earlier run's prompts.
REUSE_SLACK_TOKENS, REUSE_SLACK_SHARE = 4, 0.02
# Two-sided 95% Student t quantiles for 1-30 degrees of freedom; above that the normal 1.96.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def min_samples(p: float) -> int:
    """The fewest values a p-th percentile is reported from: one beyond it at least (p90: 10, p99: 100)."""
    return 1 if p <= 50 else math.ceil(100 / (100 - p) - 1e-9)


@dataclass
class Request:
    """One request of a case: where it sits in the workload, and how it went."""

    index: int
    session: int = 0
    conversation: int = 0
    turn: int = 1
    run: int = 0
    reusable: int | None = 0        # prompt tokens an earlier request of this case sent identically
    timed: Timed | None = None
    error: HTTPFailure | None = None
    cpu_s: float = 0.0


@dataclass
class RequestLog:
    """The finished and failed requests of a case, as the worker threads report them."""

    records: list[Request] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)   # open loop: when each request arrived
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, r: Request) -> None:
        with self.lock:
            self.records.append(r)

    @property
    def done(self) -> list[Timed]:
        return [r.timed for r in self.records if r.timed is not None]


@dataclass(frozen=True)
class Slo:
    """Service-level objectives in ms, judged at `percentile` per case; TTFT, TPOT and end to end also
    per request (goodput counts the requests that meet all three). ITL, a pooled chunk gap, has no
    per-request value: it is judged per case only."""

    ttft_ms: float | None = None
    itl_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    percentile: float = 90.0

    def validate(self) -> "Slo":
        for flag, v in (("--slo-ttft", self.ttft_ms), ("--slo-itl", self.itl_ms), ("--slo-tpot", self.tpot_ms),
                        ("--slo-e2e", self.e2e_ms)):
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise InputError(f"{flag} must be a positive number of milliseconds")
        if not (50 <= self.percentile < 100):
            raise InputError(f"--slo-percentile must be at least 50 and below 100, got {self.percentile:g}")
        return self

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.itl_ms, self.tpot_ms, self.e2e_ms))

    @property
    def per_request(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2e_ms))

    def met_by(self, t: Timed | None) -> bool:
        """Whether one request met every per-request SLO (a failed request meets none)."""
        if t is None or not t.chunks:
            return False
        checks = ((self.ttft_ms, t.ttft), (self.tpot_ms, t.tpot), (self.e2e_ms, t.e2e))
        return all(v is None or (x is not None and x * 1e3 <= v) for v, x in checks)

    def describe(self) -> str:
        p = f"p{self.percentile:g}"
        parts = [f"{name} {p} <= {v:g} ms" for name, v in (("TTFT", self.ttft_ms), ("ITL", self.itl_ms),
                                                           ("TPOT", self.tpot_ms), ("e2e", self.e2e_ms)) if v]
        return " and ".join(parts)

    def case_meets(self, row) -> bool | None:
        """Whether a case's percentiles meet every SLO; None where a percentile could not be reported."""
        key = f"p{self.percentile:g}".replace(".", "_")
        vals = []
        for name, v in (("ttft", self.ttft_ms), ("itl", self.itl_ms), ("tpot", self.tpot_ms), ("e2e", self.e2e_ms)):
            if v is not None:
                got = (row.slo_percentiles or {}).get(f"{name}_ms_{key}")
                if got is None:
                    return None
                vals.append(got <= v)
        return all(vals) if vals else None


def dist(xs: list[float], name: str) -> dict:
    """Mean, standard deviation and percentiles in ms of values in seconds; None where too few."""
    out: dict = {f"{name}_mean": None, f"{name}_std": None}
    a = np.asarray(xs, dtype=float) * 1e3
    if len(a):
        out[f"{name}_mean"] = float(a.mean())
    if len(a) > 1:
        out[f"{name}_std"] = float(a.std(ddof=1))
    for p in PERCENTILES:
        out[f"{name}_p{p}"] = float(np.percentile(a, p)) if len(a) >= min_samples(p) else None
    return out


def percentile(xs: list[float], p: float) -> float | None:
    return float(np.percentile(np.asarray(xs) * 1e3, p)) if len(xs) >= min_samples(p) and xs else None


def ci95(values: list[float]) -> list[float] | None:
    """A 95% confidence interval [low, high] of the mean of per-run values (Student t), None for one run."""
    v = [x for x in values if x is not None]
    if len(v) < 2:
        return None
    m, s = float(np.mean(v)), float(np.std(v, ddof=1))
    half = (_T95[len(v) - 2] if len(v) - 1 <= len(_T95) else 1.96) * s / math.sqrt(len(v))
    return [m - half, m + half]


def _peak_in_flight(done: list[Timed]) -> int:
    spans = sorted([(d.sent, 1) for d in done] + [(d.done, -1) for d in done], key=lambda x: (x[0], x[1]))
    live = peak = 0
    for _, step in spans:
        live += step
        peak = max(peak, live)
    return peak


def summarize(log: RequestLog, w, walls: list[float], slo: Slo | None = None) -> dict:
    """The row fields of a case's requests, pooled over its runs (`walls`: each run's seconds from its
    first send to its last answer)."""
    recs = log.records
    done = [r.timed for r in recs if r.timed is not None]
    ok = [d for d in done if d.chunks]
    wall = sum(walls) if walls else None
    n_err = sum(r.error is not None for r in recs)
    errors: dict[str, int] = {}
    for r in recs:
        if r.error is not None:
            errors[r.error.kind] = errors.get(r.error.kind, 0) + 1
    first_error = next((str(r.error)[:200] for r in recs if r.error is not None), None)
    out_tokens = sum(d.output_tokens for d in done)
    prompt_tokens = [d.prompt_tokens for d in done if d.prompt_tokens is not None]
    row = {
        "requests": len(recs), "requests_ok": len(done), "errors": errors or None,
        "error": (f"{n_err} of {len(recs)} request(s) failed: {first_error}" if n_err else None),
        "status": "ok" if done else "error", "wall_s": wall,
        "prompt_tokens_measured": (min(prompt_tokens), max(prompt_tokens)) if prompt_tokens else None,
        "prompt_tokens_exact": (all(p == w.ctx for p in prompt_tokens)
                                if prompt_tokens and w.turns == 1 and w.lengths == "exact" and not w.dataset
                                and w.api == "completions" else None),
        "output_tokens": out_tokens,
        "output_tokens_min": min((d.output_tokens for d in done), default=None),
        **dist([d.ttft for d in ok], "ttft_ms"), **dist([g for d in ok for g in d.gaps], "itl_ms"),
        **dist([t for d in ok if (t := d.tpot) is not None], "tpot_ms"), **dist([d.e2e for d in done], "e2e_ms"),
        "output_tokens_per_s": out_tokens / wall if wall else None,
        "total_tokens_per_s": (out_tokens + sum(prompt_tokens)) / wall if wall and prompt_tokens else None,
        "requests_per_s": len(done) / wall if wall else None,
        # open loop: the rate the Poisson draws actually offered (a few requests stray far from the mean)
        "offered_rps": ((len(log.arrivals) - 1) / (max(log.arrivals) - min(log.arrivals))
                        if len(log.arrivals) > 2 and max(log.arrivals) > min(log.arrivals) else None),
        "max_in_flight": max((_peak_in_flight([r.timed for r in recs if r.timed is not None and r.run == k])
                              for k in {r.run for r in recs}), default=0),
        # tokens the server streamed no chunk of their own for (empty text, or a character's bytes not yet
        # complete): ITL is then over chunks, and a first token without text delays the measured TTFT
        "tokens_without_chunk": sum(max(0, (d.completion_tokens or 0) - len(d.chunks)) for d in done),
        **_server_timings(done), **_reuse(recs),
        "client_cpu_ms_per_request": sum(r.cpu_s for r in recs) / max(1, len(recs)) * 1e3,
        "shared_prefix": w.shared_prefix or None,
    }
    if slo is not None and slo.given:
        row.update(_goodput(recs, ok, slo, wall))
    if w.turns > 1:
        row.update(per_turn(recs, w.turns))
    row["tokens_per_s"] = row["output_tokens_per_s"]
    row["median_s"] = row["ttft_ms_p50"] / 1e3 if row["ttft_ms_p50"] is not None else None
    row["latency_ms"] = row["tpot_ms_p50"]
    return row


def _reuse(recs: list[Request]) -> dict:
    """Prompt tokens the server reports reusing, against the tokens the workload made reusable (a shared
    prefix, a conversation's history); reuse beyond that is an earlier run's prompts in the cache."""
    rep = [r for r in recs if r.timed is not None and r.timed.cached_tokens is not None]
    if not rep:
        return {"cached_prompt_tokens": None, "reusable_prompt_tokens": None, "prefix_reuse": None,
                "unexpected_reuse_tokens": None}
    cached = sum(r.timed.cached_tokens for r in rep)
    known = [r for r in rep if r.reusable is not None]
    reusable = sum(r.reusable for r in known)
    unexpected = sum(max(0, r.timed.cached_tokens - r.reusable - max(REUSE_SLACK_TOKENS, REUSE_SLACK_SHARE *
                                                                     (r.timed.prompt_tokens or 0)))
                     for r in known)
    return {"cached_prompt_tokens": cached, "reusable_prompt_tokens": reusable,
            "prefix_reuse": min(1.0, sum(min(r.timed.cached_tokens, r.reusable) for r in known) / reusable)
            if reusable else None,
            "unexpected_reuse_tokens": int(unexpected)}


def _goodput(recs: list[Request], ok: list[Timed], slo: Slo, wall: float | None) -> dict:
    """Per-request attainment of the SLOs and goodput (requests per second meeting all of them), and the
    case's percentiles at the SLO's percentile."""
    met = sum(slo.met_by(r.timed) for r in recs) if slo.per_request else None
    key = f"p{slo.percentile:g}".replace(".", "_")
    pct = {f"ttft_ms_{key}": percentile([d.ttft for d in ok], slo.percentile),
           f"itl_ms_{key}": percentile([g for d in ok for g in d.gaps], slo.percentile),
           f"tpot_ms_{key}": percentile([t for d in ok if (t := d.tpot) is not None], slo.percentile),
           f"e2e_ms_{key}": percentile([d.e2e for d in ok], slo.percentile)}
    return {"slo": slo.describe(), "slo_percentiles": pct,
            "slo_attained": met / len(recs) if met is not None and recs else None,
            "goodput_rps": met / wall if met is not None and wall else None}


def per_turn(recs: list[Request], turns: int) -> dict:
    """Per turn of a conversation (index 0 = turn 1): median TTFT, TPOT and ITL in ms, and the mean prompt
    tokens sent, cached and reusable."""
    out: dict[str, list] = {k: [] for k in ("turn_ttft_ms_p50", "turn_tpot_ms_p50", "turn_itl_ms_p50",
                                            "turn_prompt_tokens", "turn_cached_tokens", "turn_reusable_tokens")}
    for t in range(1, turns + 1):
        rs = [r for r in recs if r.turn == t and r.timed is not None and r.timed.chunks]
        d = [r.timed for r in rs]
        med = (lambda xs: float(np.median(xs)) * 1e3 if xs else None)  # noqa: E731
        out["turn_ttft_ms_p50"].append(med([x.ttft for x in d]))
        out["turn_tpot_ms_p50"].append(med([x.tpot for x in d if x.tpot is not None]))
        out["turn_itl_ms_p50"].append(med([g for x in d for g in x.gaps]))
        for key, vals in (("turn_prompt_tokens", [x.prompt_tokens for x in d]),
                          ("turn_cached_tokens", [x.cached_tokens for x in d]),
                          ("turn_reusable_tokens", [r.reusable for r in rs])):
            vals = [v for v in vals if v is not None]
            out[key].append(float(np.mean(vals)) if vals else None)
    return out


def _server_timings(done: list[Timed]) -> dict:
    """llama.cpp's own timings, where it reports them: its prompt processing and per-token decode time,
    the engine-side counterparts of TTFT and TPOT (the difference is the HTTP path and the client)."""
    ts = [d.server_timings for d in done if d.server_timings]  # finite, non-negative numbers (serve.http)
    p = dist([t["prompt_ms"] / 1e3 for t in ts if "prompt_ms" in t], "server_prompt_ms")
    q = dist([t["predicted_per_token_ms"] / 1e3 for t in ts if "predicted_per_token_ms" in t], "server_tpot_ms")
    return {k: v for k, v in {**p, **q}.items() if not k.endswith(("_mean", "_std", "_p95"))}


def run_intervals(per_run: list[dict]) -> dict:
    """95% confidence intervals over repeated runs of a case (each run's own p50s and throughput)."""
    if len(per_run) < 2:
        return {}
    return {f"{k}_ci95": ci95([r.get(k) for r in per_run])
            for k in ("ttft_ms_p50", "tpot_ms_p50", "itl_ms_p50", "output_tokens_per_s")}


def request_record(r: Request, t0: float) -> dict:
    """One request as `--requests-out` writes it: times in ms from the case's start."""
    t = r.timed
    return {"request": r.index, "run": r.run, "session": r.session, "conversation": r.conversation,
            "turn": r.turn, "sent_ms": (t.sent - t0) * 1e3 if t else None,
            "ttft_ms": t.ttft * 1e3 if t and t.ttft is not None else None, "e2e_ms": t.e2e * 1e3 if t else None,
            "tpot_ms": t.tpot * 1e3 if t and t.tpot is not None else None,
            "itl_ms": [g * 1e3 for g in t.gaps] if t else None, "prompt_tokens": t.prompt_tokens if t else None,
            "output_tokens": t.output_tokens if t else None, "cached_tokens": t.cached_tokens if t else None,
            "reusable_tokens": r.reusable, "finish_reason": t.finish_reason if t else None,
            "error": r.error.kind if r.error else None, "error_detail": str(r.error)[:200] if r.error else None}
