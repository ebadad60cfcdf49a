"""Verdicts on servers (ServeRow rows): how time to first token grows with the prompt, inter-token
latency against depth, throughput against concurrency, a rate sweep's knee and best goodput, SLOs at
their percentile, multi-turn sessions (re-prefill of the whole history or of the new tokens only),
prompt reuse against what the workload made reusable, hybrid/dense ratios, and failed requests."""

from __future__ import annotations

import math
from collections import defaultdict

from granite_cli.bench.findings import NAN, Analysis, ServeRatio, make_fit
from granite_cli.bench.fit import describe, fit_scaling
from granite_cli.bench.row import Row, ServeRow, is_nan

OK = ("ok",)
# Past the concurrency where output tokens/s grows by less than this, a server is saturated.
SATURATION_GAIN = 1.10
# An open-loop rate is sustained while the server completes at least this share of the offered rate.
SUSTAINED = 0.90
# Prompt reuse: at least this share of the reusable tokens is "reuses", at most NO_REUSE is "none".
REUSES, NO_REUSE = 0.5, 0.05
# TTFT growing with the history at least this power of the prompt's growth is a re-prefill of all of it.
REPREFILL_EXPONENT, NEW_ONLY_EXPONENT = 0.7, 0.3


def x_text(v) -> str:
    return "n/a" if v is None or is_nan(v) else f"{v:.2f}x"


def _ms(v) -> str:
    return "n/a" if v is None else f"{v:.0f} ms" if v >= 100 else f"{v:.1f} ms"


def ratio(x, y) -> float:
    return x / y if x is not None and y else NAN


def pairs(rows: list[Row], kind: type) -> list[tuple[str, str]]:
    """(hybrid, dense) model pairs among rows of one type, in the order the models appear."""
    kinds = {r.model: r.kind for r in rows if isinstance(r, kind)}
    return [(h, d) for h, kh in kinds.items() if kh == "hybrid" for d, kd in kinds.items() if kd == "dense"]


def _w(r: ServeRow) -> str:
    return f" [{r.workload}]" if r.workload else ""


def serve_analysis(rows: list[Row], out: Analysis, slo=None) -> None:
    """Add the verdicts on servers to `out`."""
    served = [r for r in rows if isinstance(r, ServeRow) and r.status in OK]
    g: dict[tuple, list[ServeRow]] = defaultdict(list)
    for r in served:
        g[(r.model, r.batch, r.workload or "")].append(r)
    for (model, b, wl), rs in sorted(g.items()):
        rs = sorted(rs, key=lambda r: r.ctx)
        if (rs[0].turns or 1) > 1 or rs[0].dataset:
            continue  # a conversation's or a dataset's prompt is not the case's ctx: no fit over ctx
        f = fit_scaling([r.ctx for r in rs], [r.ttft_ms_p50 and r.ttft_ms_p50 / 1e3 for r in rs])
        out.fits.append(make_fit(model, b, "serve", "ttft" if not wl else f"ttft [{wl}]", f))
        out.verdicts.append(describe(f"{model} c{b}{_w(rs[0])} time to first token", f))
        lo, hi = rs[0], rs[-1]
        if lo is not hi and lo.itl_ms_p50 and hi.itl_ms_p50:
            out.verdicts.append(f"{model} c{b}{_w(lo)} inter-token latency (chunk gap): {_ms(lo.itl_ms_p50)} after a "
                                f"{lo.ctx}-token prompt -> {_ms(hi.itl_ms_p50)} after {hi.ctx} "
                                f"({hi.itl_ms_p50 / lo.itl_ms_p50:.2f}x over {hi.ctx / lo.ctx:.0f}x depth)")
    out.verdicts += _throughput_verdicts(served, slo)
    out.verdicts += _rate_verdicts(served, slo)
    out.verdicts += [v for r in served if (v := _turn_verdict(r))]
    out.verdicts += _reuse_verdicts(served)
    out.serve_ratios = _serve_ratios(rows)
    for r in out.serve_ratios:
        line = (f"{r.hybrid} vs {r.dense} c{r.batch} prompt {r.ctx}{f' [{r.workload}]' if r.workload else ''}: "
                f"time to first token {x_text(r.ttft)}, ITL {x_text(r.itl)}, TPOT {x_text(r.tpot)}, output tokens/s "
                f"{x_text(r.output_speed)}")
        if r.turn_ttft:
            line += "; TTFT by turn " + ", ".join(x_text(v) for v in r.turn_ttft)
        out.verdicts.append(line)
    out.verdicts += _failures(rows)


def _throughput_verdicts(served: list[ServeRow], slo) -> list[str]:
    """Closed loop, per server, prompt length and workload: output tokens/s over concurrency, the
    concurrency past which it grows by less than SATURATION_GAIN, and with SLOs the largest concurrency
    whose percentiles meet them."""
    by: dict[tuple, dict[int, ServeRow]] = defaultdict(dict)
    for r in served:
        if not r.rate_rps:
            by[(r.model, r.ctx, r.workload or "")][r.batch] = r
    out = []
    for (model, ctx, _), per in sorted(by.items()):
        cs = sorted(per)
        head = f"{model} prompt {ctx}{_w(per[cs[0]])}"
        if len(cs) > 1:
            tps = [per[c].output_tokens_per_s or 0.0 for c in cs]
            sat = next((c for c, a, nxt in zip(cs, tps, tps[1:]) if nxt < a * SATURATION_GAIN), None)
            out.append(f"{head}: output tokens/s " + ", ".join(f"{t:.1f} (c{c})" for c, t in zip(cs, tps))
                       + (f"; saturates at concurrency {sat}" if sat else f"; still growing at concurrency {cs[-1]}"))
        if slo is None or not slo.given:
            continue
        judged = {c: slo.case_meets(per[c]) if not per[c].errors else False for c in cs}
        meets = [c for c, ok in judged.items() if ok]
        unknown = [c for c, ok in judged.items() if ok is None]
        text = slo.describe()
        if meets:
            line = f"{head}: {max(meets)} session(s) per server within {text}"
        else:
            line = f"{head}: no measured concurrency ({', '.join(map(str, cs))}) meets {text}"
        if unknown:
            line += (f" (concurrency {', '.join(map(str, unknown))}: too few requests for a p{slo.percentile:g}; give "
                     "--requests)")
        best = max(cs, key=lambda c: per[c].goodput_rps or 0.0)
        if per[best].goodput_rps is not None and slo.per_request:
            line += f"; best goodput {per[best].goodput_rps:.2f} req/s at concurrency {best}"
        out.append(line)
    return out


def _rate_verdicts(served: list[ServeRow], slo) -> list[str]:
    """Open loop, per server, prompt length and in-flight cap: the rate each was served at, the knee (the
    highest rate the server still sustains), and the rate with the best goodput."""
    by: dict[tuple, list[ServeRow]] = defaultdict(list)
    for r in served:
        if r.rate_rps:
            by[(r.model, r.ctx, r.batch)].append(r)
    out = []
    for (model, ctx, cap), rs in sorted(by.items()):
        rs = sorted(rs, key=lambda r: r.rate_rps)
        served_at = ", ".join(f"{r.requests_per_s or 0:.2f} of {r.rate_rps:g}" for r in rs)
        # judged against the rate the arrivals actually offered: a short case's Poisson draws stray from the mean
        held = [r for r in rs if (r.requests_per_s or 0) >= SUSTAINED * min(r.rate_rps, r.offered_rps or r.rate_rps)]
        line = f"{model} prompt {ctx} (at most {cap} in flight): requests/s served of offered {served_at}; "
        if len(held) == len(rs):
            line += f"sustained up to {rs[-1].rate_rps:g} req/s, the highest rate tried"
        elif held:
            knee = held[-1]
            nxt = rs[rs.index(knee) + 1]
            line += (f"knee at {knee.rate_rps:g} req/s (TTFT p50 {_ms(knee.ttft_ms_p50)}); at {nxt.rate_rps:g} req/s "
                     f"it completes {nxt.requests_per_s or 0:.2f} and TTFT p50 is {_ms(nxt.ttft_ms_p50)}")
        else:
            line += f"not sustained even at {rs[0].rate_rps:g} req/s"
        if slo is not None and slo.per_request:
            best = max(rs, key=lambda r: r.goodput_rps or 0.0)
            line += (f"; best goodput {best.goodput_rps or 0:.2f} req/s within {slo.describe()} at {best.rate_rps:g} "
                     "req/s offered")
        out.append(line)
    return out


def _turn_verdict(r: ServeRow) -> str | None:
    """A multi-turn case: how TTFT grows turn by turn against the prompt, and what the server reused."""
    t, p = r.turn_ttft_ms_p50 or [], r.turn_prompt_tokens or []
    if (r.turns or 1) < 2 or len(t) < 2 or None in (t[0], t[-1], p[0], p[-1]) or not (p[-1] > p[0] > 0 and t[0] > 0):
        return None
    growth, prompt_growth = t[-1] / t[0], p[-1] / p[0]
    exponent = math.log(growth) / math.log(prompt_growth) if growth > 0 else 0.0
    head = (f"{r.model} c{r.batch} {r.turns} turns of {r.ctx}-token messages: TTFT {_ms(t[0])} at turn 1 "
            f"({p[0]:.0f} prompt tokens) -> {_ms(t[-1])} at turn {len(t)} ({p[-1]:.0f}): {growth:.2f}x while the "
            f"prompt grew {prompt_growth:.1f}x")
    if r.prefix_reuse is not None:
        reused = f"; the server reused {r.prefix_reuse:.0%} of the history it could ({r.cached_prompt_tokens} of " \
                 f"{r.reusable_prompt_tokens} reusable prompt tokens reported cached)"
        if r.prefix_reuse >= REUSES:
            return head + reused + ": it prefills only the new tokens of each turn"
        if r.prefix_reuse <= NO_REUSE:
            return head + reused + ": it re-processes the whole history every turn"
        return head + reused + ": it re-processes part of the history every turn"
    if exponent >= REPREFILL_EXPONENT:
        return head + " (the server reports no cached tokens): TTFT grows with the whole history, a re-prefill"
    if exponent <= NEW_ONLY_EXPONENT:
        return head + " (the server reports no cached tokens): TTFT barely grows, so the history is reused"
    return head + " (the server reports no cached tokens)"


def _reuse_verdicts(served: list[ServeRow]) -> list[str]:
    """Reuse the workload did not ask for (an earlier run's prompts still cached), and a server that reports
    a prefix cache yet reused none of what the workload made reusable."""
    out = []
    for r in served:
        where = f"{r.model} c{r.batch} prompt {r.ctx}{_w(r)}"
        if r.unexpected_reuse_tokens:
            out.append(f"warning: {where}: the server reused {r.unexpected_reuse_tokens} prompt tokens the workload "
                       "did not share: an earlier run's prompts were still in its cache, so this row measured the "
                       "cache (leave out --seed for fresh prompts, or restart the server)")
        advertises = r.cached_prompt_tokens is not None or r.server_prefix_source is not None
        if advertises and r.reusable_prompt_tokens and (r.prefix_reuse or 0) <= NO_REUSE and (r.turns or 1) == 1:
            out.append(f"{where}: the server reports prompt caching but reused {r.cached_prompt_tokens or 0} of "
                       f"{r.reusable_prompt_tokens} shared-prefix tokens")
        if r.server_prefix_queries and (r.reusable_prompt_tokens or r.unexpected_reuse_tokens):
            out.append(f"{where}: prefix-cache counters ({r.server_prefix_source}): {r.server_prefix_hits:.0f} of "
                       f"{r.server_prefix_queries:.0f} prompt tokens hit "
                       f"({r.server_prefix_hits / r.server_prefix_queries:.0%})")
    return out


def _serve_ratios(rows: list[Row]) -> list[ServeRatio]:
    idx = {(r.model, r.batch, r.ctx, r.workload or ""): r for r in rows if isinstance(r, ServeRow) and r.status in OK}
    out = []
    for h, d in pairs(rows, ServeRow):
        for (m, b, c, wl), rh in sorted(idx.items()):
            rd = idx.get((d, b, c, wl))
            if m != h or rd is None:
                continue
            turns = [ratio(a, z) for a, z in zip(rh.turn_ttft_ms_p50 or [], rd.turn_ttft_ms_p50 or [])]
            out.append(ServeRatio(h, d, b, c, ttft=ratio(rh.ttft_ms_p50, rd.ttft_ms_p50),
                                  itl=ratio(rh.itl_ms_p50, rd.itl_ms_p50),
                                  output_speed=ratio(rh.output_tokens_per_s, rd.output_tokens_per_s),
                                  tpot=ratio(rh.tpot_ms_p50, rd.tpot_ms_p50), workload=wl, turn_ttft=turns))
    return out


def _failures(rows: list[Row]) -> list[str]:
    failed: dict[str, dict[str, int]] = {}
    for r in rows:
        if isinstance(r, ServeRow) and r.errors:
            for k, n in r.errors.items():
                failed.setdefault(r.model, {}).setdefault(k, 0)
                failed[r.model][k] += n
    return [f"{m}: {sum(kinds.values())} request(s) failed (" + ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items()))
            + ")" for m, kinds in failed.items()]
