"""Fits and verdicts over bench rows: per model and per layer type, the doubling cost of prefill,
decode cost vs depth, hybrid/dense ratios of speed and memory at each context, and the same for
servers (time to first token, inter-token latency, throughput, SLOs)."""

from __future__ import annotations

from collections import defaultdict

from granite_cli.bench.findings import NAN, Analysis, Fit, Pairing, Ratio, ServeRatio, make_fit
from granite_cli.bench.fit import LINEAR_DOUBLING, describe, fit_scaling
from granite_cli.bench.row import ModelRow, Row
from granite_cli.bench.serving import OK, pairs, ratio, serve_analysis, x_text

__all__ = ["Analysis", "Fit", "Pairing", "Ratio", "ServeRatio", "analyse", "check_claims", "regressions"]

# A hybrid's cost may grow this much faster per doubling than its dense twin's before --check fails it.
GROWTH_SLACK = 1.05
# RSS increases under this are the allocator's noise, not the model.
RSS_NOISE_BYTES = 16 * 2**20


def _group(rows: list[Row], phase: str) -> dict[tuple, list]:
    g = defaultdict(list)
    for r in rows:
        if r.phase == phase and r.status in OK:
            g[(r.model, r.batch)].append(r)
    return g


def analyse(rows: list[Row], slo=None) -> Analysis:
    """Fits and verdicts over the rows (one per case: where a case appears twice, as rows files joined by
    hand do, the last row counts and a verdict says so); `slo` (serve.stats.Slo) judges the servers."""
    out = Analysis()
    rows, dropped = unique(rows)
    if dropped:
        out.verdicts.append(f"note: {dropped} row(s) repeat a case already in the rows; the last row of each case "
                            "counts")
    rows, shared = uncontended(rows)
    if shared:
        out.verdicts.append(contended_note(shared))
    for (model, batch), rs in sorted(_group(rows, "prefill").items()):
        rs = sorted(rs, key=lambda r: r.ctx)
        n = [r.ctx for r in rs]
        total = fit_scaling(n, [r.median_s for r in rs])
        out.fits.append(make_fit(model, batch, "prefill", "total", total))
        out.verdicts.append(describe(f"{model} b{batch} prefill", total))
        for part, label in (("mamba", "Mamba layers"), ("attention", "attention layers")):
            ts = [(r.attribution_s or {}).get(part) for r in rs]
            if not any(ts):
                continue
            f = fit_scaling(n, ts)
            out.fits.append(make_fit(model, batch, "prefill", part, f))
            out.verdicts.append(describe(f"{model} b{batch} {label}", f))
    for (model, batch), rs in sorted(_group(rows, "decode").items()):
        rs = sorted(rs, key=lambda r: r.ctx)
        f = fit_scaling([r.ctx for r in rs], [r.median_s for r in rs])
        if f:
            out.fits.append(make_fit(model, batch, "decode", "per_token", f))
            lo, hi = rs[0], rs[-1]
            out.verdicts.append(
                f"{model} b{batch} decode: {lo.latency_ms:.2f} ms/token at depth {lo.ctx} -> "
                f"{hi.latency_ms:.2f} ms at {hi.ctx} ({hi.median_s / lo.median_s:.2f}x over "
                f"{hi.ctx / lo.ctx:.0f}x depth)")
    out.ratios = hybrid_dense_ratios(rows)
    out.verdicts += [ratio_verdict(r) for r in out.ratios]
    serve_analysis(rows, out, slo)
    return out


def uncontended(rows: list[Row]) -> tuple[list[Row], list[Row]]:
    """(the rows measured with the CPU they needed, those measured while other processes took it)."""
    shared = [r for r in rows if getattr(r, "contended", None)]
    return [r for r in rows if not getattr(r, "contended", None)], shared


def contended_note(shared: list[Row]) -> str:
    """What the fits and verdicts leave out, and why."""
    worst = max((getattr(r, "cpu_others_cores", None) or 0.0) for r in shared)
    cases = ", ".join(f"{r.model} b{r.batch} ctx {r.ctx} {r.phase}" for r in shared[:4]) + (
        ", ..." if len(shared) > 4 else "")
    return (f"note: {len(shared)} case(s) were measured while other processes took CPU they needed (up to "
            f"{worst:.1f} cores busy elsewhere; contended: {cases}); they are left out of the fits and verdicts")


def unique(rows: list[Row]) -> tuple[list[Row], int]:
    """The rows with one per case (the last of each), in their order, and how many were dropped."""
    last = {r.key: i for i, r in enumerate(rows)}
    kept = [r for i, r in enumerate(rows) if last[r.key] == i]
    return kept, len(rows) - len(kept)


_SOURCE = {"tracked": "tracked", "cuda_allocated": "allocator"}


def ratio_verdict(r: Ratio) -> str:
    """One hybrid-vs-dense line: speed, then total peak memory per phase (weights + cache + working
    set, the memory the claim is about) measured beside memory-report's prediction, then the cache.
    The RSS increase over the baseline is not in it: it leaves out the weights and the cache."""
    src = _SOURCE.get(r.memory_total_source, "measured")
    return (f"{r.hybrid} vs {r.dense} b{r.batch} ctx {r.ctx}: prefill {x_text(r.prefill_speed)}, "
            f"decode {x_text(r.decode_speed)} speed; peak memory ({src}: weights + cache + working set) prefill "
            f"{x_text(r.prefill_total_memory)}, decode {x_text(r.decode_total_memory)} (predicted "
            f"{x_text(r.prefill_total_predicted)}, {x_text(r.decode_total_predicted)}); cache (KV + state) "
            f"{x_text(r.cache_memory)}")


def hybrid_dense_ratios(rows: list[Row]) -> list[Ratio]:
    idx = {(r.model, r.batch, r.ctx, r.phase): r for r in rows if isinstance(r, ModelRow) and r.status in OK}
    out = []
    for h, d in pairs(rows, ModelRow):
        for (_, b, c, _) in sorted(k for k in idx if k[0] == h and k[3] == "prefill"):
            rd = idx.get((d, b, c, "prefill"))
            if not rd:
                continue
            rh = idx[(h, b, c, "prefill")]
            dh, dd = idx.get((h, b, c, "decode")), idx.get((d, b, c, "decode"))
            out.append(Ratio(
                h, d, b, c, prefill_speed=ratio(rh.tokens_per_s, rd.tokens_per_s),
                decode_speed=ratio(dh and dh.tokens_per_s, dd and dd.tokens_per_s),
                prefill_total_memory=ratio(rh.peak_total_bytes, rd.peak_total_bytes),
                decode_total_memory=ratio(dh and dh.peak_total_bytes, dd and dd.peak_total_bytes),
                prefill_total_predicted=ratio(rh.predicted_total_bytes, rd.predicted_total_bytes),
                decode_total_predicted=ratio(dh and dh.predicted_total_bytes, dd and dd.predicted_total_bytes),
                memory_total_source=rh.peak_total_source, cache_memory=ratio(rh.cache_bytes, rd.cache_bytes),
                prefill_increase_memory=_rss_ratio(rh.peak_delta_bytes, rd.peak_delta_bytes),
                memory_source=rh.memory_source))
    return out


def _rss_ratio(x, y) -> float:
    return x / y if x and y and min(x, y) >= RSS_NOISE_BYTES else NAN


def check_claims(rows: list[Row], analysis: Analysis) -> list[str]:
    """Claims `--check` holds the sweep to; returns the failures (empty = reproduced)."""
    fails = []
    for f in analysis.fits:
        if f.part == "mamba" and f.doubling is not None and f.doubling > LINEAR_DOUBLING:
            fails.append(f"{f.model} b{f.batch}: Mamba layers not linear (doubling {f.doubling:.2f}x)")
    for part, what, found in (("total", "prefill", analysis.ratios),
                              ("ttft", "time to first token", analysis.serve_ratios)):
        fails += _faster_growth(analysis.fits, part, what, found)
    invalid = [r for r in rows if r.status == "invalid"]
    if invalid:
        fails.append(f"{len(invalid)} case(s) failed the correctness guard")
    return sorted(set(fails))


def _faster_growth(fits: list[Fit], part: str, what: str, pairs: list) -> list[str]:
    """A hybrid whose cost grows faster with context than its dense twin's, at the same batch."""
    fails = []
    by = {(f.model, f.batch): f for f in fits if f.part == part and f.doubling}
    for r in pairs:  # one pair per context: the caller drops the repeated lines
        fh, fd = by.get((r.hybrid, r.batch)), by.get((r.dense, r.batch))
        if fh and fd and fh.doubling > fd.doubling * GROWTH_SLACK:
            fails.append(f"{r.hybrid} {what} grows faster than {r.dense} at b{r.batch} "
                         f"(doubling {fh.doubling:.2f}x vs {fd.doubling:.2f}x)")
    return fails


def regressions(rows: list[Row], baseline: list[Row], threshold: float) -> list[str]:
    base = {r.key: r for r in baseline if r.status == "ok"}
    out = []
    for r in rows:
        b = base.get(r.key)
        if not b or r.status != "ok" or not b.tokens_per_s or not r.tokens_per_s:
            continue
        if getattr(r, "contended", None) or getattr(b, "contended", None):  # not this code's speed
            continue
        change = r.tokens_per_s / b.tokens_per_s - 1
        if change < -threshold:
            out.append(f"{r.model} b{r.batch} ctx {r.ctx} {r.phase}: {r.tokens_per_s:.1f} tok/s vs "
                       f"baseline {b.tokens_per_s:.1f} ({change * 100:+.1f}%)")
    return out
