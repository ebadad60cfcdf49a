"""Fits and verdicts over bench rows: per model and per layer type, the doubling cost of prefill,
decode cost vs depth, hybrid/dense ratios of speed and memory at each context, and the same for
servers (time to first token, inter-token latency, throughput, SLOs)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

from granite_cli.bench.fit import LINEAR_DOUBLING, describe, fit_scaling
from granite_cli.bench.row import ModelRow, Row, ServeRow, is_nan

OK = ("ok",)
# A hybrid's cost may grow this much faster per doubling than its dense twin's before --check fails it.
GROWTH_SLACK = 1.05
# Past the concurrency where output tokens/s grows by less than this, a server is saturated.
SATURATION_GAIN = 1.10
# RSS increases under this are the allocator's noise, not the model.
RSS_NOISE_BYTES = 16 * 2**20
NAN = float("nan")


@dataclass
class Fit:
    """A fitted cost curve (bench.fit) of one model, batch and part; the curve's fields are None when
    there were too few points."""

    model: str
    batch: int
    phase: str
    part: str                   # total, mamba, attention, per_token, ttft
    a: float | None = None
    b: float | None = None
    c: float | None = None
    slopes: list | None = None
    doubling: float | None = None
    r2: float | None = None


@dataclass
class Pairing:
    """Which hybrid is compared with which dense model, at one batch (concurrency) and context."""

    hybrid: str
    dense: str
    batch: int
    ctx: int


@dataclass
class Ratio(Pairing):
    """Hybrid over dense at one batch and context: speed and memory of each phase."""

    prefill_speed: float = NAN
    decode_speed: float = NAN
    prefill_total_memory: float = NAN
    decode_total_memory: float = NAN
    prefill_total_predicted: float = NAN
    decode_total_predicted: float = NAN
    memory_total_source: str | None = None
    cache_memory: float = NAN
    prefill_increase_memory: float = NAN     # secondary: the peak's increase over the baseline (RSS on a CPU)
    memory_source: str | None = None


@dataclass
class ServeRatio(Pairing):
    """Hybrid server over dense server at one concurrency and prompt length."""

    ttft: float = NAN
    itl: float = NAN
    output_speed: float = NAN


@dataclass
class Analysis:
    fits: list[Fit] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    serve_ratios: list[ServeRatio] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"fits": [_fit_dict(f) for f in self.fits], "verdicts": list(self.verdicts),
                "ratios": [asdict(r) for r in self.ratios], "serve_ratios": [asdict(r) for r in self.serve_ratios]}


def _fit_dict(f: Fit) -> dict:
    """A fit as the JSON has it: the curve's fields only where a curve was fitted."""
    d = asdict(f)
    return d if f.a is not None else {k: d[k] for k in ("model", "batch", "phase", "part")}


def _fit(model: str, batch: int, phase: str, part: str, curve) -> Fit:
    return Fit(model, batch, phase, part, **(curve.as_dict() if curve else {}))


def _group(rows: list[Row], phase: str) -> dict[tuple, list]:
    g = defaultdict(list)
    for r in rows:
        if r.phase == phase and r.status in OK:
            g[(r.model, r.batch)].append(r)
    return g


def analyse(rows: list[Row], slo_ttft_ms: float | None = None, slo_itl_ms: float | None = None) -> Analysis:
    out = Analysis()
    for (model, batch), rs in sorted(_group(rows, "prefill").items()):
        rs = sorted(rs, key=lambda r: r.ctx)
        n = [r.ctx for r in rs]
        total = fit_scaling(n, [r.median_s for r in rs])
        out.fits.append(_fit(model, batch, "prefill", "total", total))
        out.verdicts.append(describe(f"{model} b{batch} prefill", total))
        for part, label in (("mamba", "Mamba layers"), ("attention", "attention layers")):
            ts = [(r.attribution_s or {}).get(part) for r in rs]
            if not any(ts):
                continue
            f = fit_scaling(n, ts)
            out.fits.append(_fit(model, batch, "prefill", part, f))
            out.verdicts.append(describe(f"{model} b{batch} {label}", f))
    for (model, batch), rs in sorted(_group(rows, "decode").items()):
        rs = sorted(rs, key=lambda r: r.ctx)
        f = fit_scaling([r.ctx for r in rs], [r.median_s for r in rs])
        if f:
            out.fits.append(_fit(model, batch, "decode", "per_token", f))
            lo, hi = rs[0], rs[-1]
            out.verdicts.append(
                f"{model} b{batch} decode: {lo.latency_ms:.2f} ms/token at depth {lo.ctx} -> "
                f"{hi.latency_ms:.2f} ms at {hi.ctx} ({hi.median_s / lo.median_s:.2f}x over "
                f"{hi.ctx / lo.ctx:.0f}x depth)")
    out.ratios = hybrid_dense_ratios(rows)
    out.verdicts += [ratio_verdict(r) for r in out.ratios]
    serve_analysis(rows, out, slo_ttft_ms, slo_itl_ms)
    return out


def _x(v) -> str:
    return "n/a" if v is None or is_nan(v) else f"{v:.2f}x"


def _ms(v) -> str:
    return "n/a" if v is None else f"{v:.0f} ms" if v >= 100 else f"{v:.1f} ms"


def serve_analysis(rows: list[Row], out: Analysis, slo_ttft_ms: float | None = None,
                   slo_itl_ms: float | None = None) -> None:
    """Verdicts on servers (ServeRow rows), added to `out`: how time to first token grows with the prompt
    (fitted as prefill is), inter-token latency against depth, throughput against concurrency and where
    it stops growing, the sessions per server within an SLO, hybrid/dense ratios, and failed requests."""
    g = _group(rows, "serve")
    for (model, b), rs in sorted(g.items()):
        rs = sorted(rs, key=lambda r: r.ctx)
        f = fit_scaling([r.ctx for r in rs], [r.ttft_ms_p50 and r.ttft_ms_p50 / 1e3 for r in rs])
        out.fits.append(_fit(model, b, "serve", "ttft", f))
        out.verdicts.append(describe(f"{model} c{b} time to first token", f))
        lo, hi = rs[0], rs[-1]
        if lo is not hi and lo.itl_ms_p50 and hi.itl_ms_p50:
            out.verdicts.append(f"{model} c{b} inter-token latency: {_ms(lo.itl_ms_p50)} after a {lo.ctx}-token "
                                f"prompt -> {_ms(hi.itl_ms_p50)} after {hi.ctx} "
                                f"({hi.itl_ms_p50 / lo.itl_ms_p50:.2f}x over {hi.ctx / lo.ctx:.0f}x depth)")
    out.verdicts += _throughput_verdicts(g, slo_ttft_ms, slo_itl_ms)
    out.serve_ratios = _serve_ratios(rows)
    out.verdicts += [f"{r.hybrid} vs {r.dense} c{r.batch} prompt {r.ctx}: time to first token "
                     f"{_x(r.ttft)}, inter-token latency {_x(r.itl)}, output tokens/s {_x(r.output_speed)}"
                     for r in out.serve_ratios]
    failed: dict[str, dict[str, int]] = {}
    for r in rows:
        if isinstance(r, ServeRow) and r.errors:
            for k, n in r.errors.items():
                failed.setdefault(r.model, {}).setdefault(k, 0)
                failed[r.model][k] += n
    for m, kinds in failed.items():
        out.verdicts.append(f"{m}: {sum(kinds.values())} request(s) failed ("
                            + ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items())) + ")")


def _throughput_verdicts(g: dict, slo_ttft_ms: float | None, slo_itl_ms: float | None) -> list[str]:
    """Per server and prompt length: output tokens/s over concurrency, the concurrency past which it grows
    by less than SATURATION_GAIN, and with an SLO the largest concurrency whose p90s meet it."""
    by: dict[tuple, dict[int, ServeRow]] = defaultdict(dict)
    for (model, b), rs in g.items():
        for r in rs:
            by[(model, r.ctx)][b] = r
    out = []
    for (model, ctx), per in sorted(by.items()):
        cs = sorted(per)
        if len(cs) > 1:
            tps = [per[c].output_tokens_per_s or 0.0 for c in cs]
            sat = next((c for c, a, nxt in zip(cs, tps, tps[1:]) if nxt < a * SATURATION_GAIN), None)
            out.append(f"{model} prompt {ctx}: output tokens/s " + ", ".join(f"{t:.1f} (c{c})" for c, t in
                                                                               zip(cs, tps))
                       + (f"; saturates at concurrency {sat}" if sat else f"; still growing at concurrency {cs[-1]}"))
        if slo_ttft_ms is None and slo_itl_ms is None:
            continue
        meets = [c for c in cs if not per[c].errors
                 and (slo_ttft_ms is None or (per[c].ttft_ms_p90 or 1e30) <= slo_ttft_ms)
                 and (slo_itl_ms is None or (per[c].itl_ms_p90 or 1e30) <= slo_itl_ms)]
        slo = " and ".join(x for x in (f"TTFT p90 <= {slo_ttft_ms:g} ms" if slo_ttft_ms else "",
                                       f"ITL p90 <= {slo_itl_ms:g} ms" if slo_itl_ms else "") if x)
        out.append(f"{model} prompt {ctx}: " + (f"{max(meets)} session(s) per server within {slo}" if meets else
                                                  f"no measured concurrency ({', '.join(map(str, cs))}) meets {slo}"))
    return out


def _pairs(rows: list[Row], kind: type) -> list[tuple[str, str]]:
    """(hybrid, dense) model pairs among rows of one type, in the order the models appear."""
    kinds = {r.model: r.kind for r in rows if isinstance(r, kind)}
    return [(h, d) for h, kh in kinds.items() if kh == "hybrid" for d, kd in kinds.items() if kd == "dense"]


def _ratio(x, y) -> float:
    return x / y if x is not None and y else NAN


def _serve_ratios(rows: list[Row]) -> list[ServeRatio]:
    idx = {(r.model, r.batch, r.ctx): r for r in rows if isinstance(r, ServeRow) and r.status in OK}
    out = []
    for h, d in _pairs(rows, ServeRow):
        for (m, b, c), rh in sorted(idx.items()):
            rd = idx.get((d, b, c))
            if m != h or rd is None:
                continue
            out.append(ServeRatio(h, d, b, c, _ratio(rh.ttft_ms_p50, rd.ttft_ms_p50),
                                  _ratio(rh.itl_ms_p50, rd.itl_ms_p50),
                                  _ratio(rh.output_tokens_per_s, rd.output_tokens_per_s)))
    return out


_SOURCE = {"tracked": "tracked", "cuda_allocated": "allocator"}


def ratio_verdict(r: Ratio) -> str:
    """One hybrid-vs-dense line: speed, then total peak memory per phase (weights + cache + working
    set, the memory the claim is about) measured beside memory-report's prediction, then the cache.
    The RSS increase over the baseline is not in it: it leaves out the weights and the cache."""
    src = _SOURCE.get(r.memory_total_source, "measured")
    return (f"{r.hybrid} vs {r.dense} b{r.batch} ctx {r.ctx}: prefill {_x(r.prefill_speed)}, "
            f"decode {_x(r.decode_speed)} speed; peak memory ({src}: weights + cache + working set) prefill "
            f"{_x(r.prefill_total_memory)}, decode {_x(r.decode_total_memory)} (predicted "
            f"{_x(r.prefill_total_predicted)}, {_x(r.decode_total_predicted)}); cache (KV + state) "
            f"{_x(r.cache_memory)}")


def hybrid_dense_ratios(rows: list[Row]) -> list[Ratio]:
    idx = {(r.model, r.batch, r.ctx, r.phase): r for r in rows if isinstance(r, ModelRow) and r.status in OK}
    out = []
    for h, d in _pairs(rows, ModelRow):
        for (_, b, c, _) in sorted(k for k in idx if k[0] == h and k[3] == "prefill"):
            rd = idx.get((d, b, c, "prefill"))
            if not rd:
                continue
            rh = idx[(h, b, c, "prefill")]
            dh, dd = idx.get((h, b, c, "decode")), idx.get((d, b, c, "decode"))
            out.append(Ratio(
                h, d, b, c, prefill_speed=_ratio(rh.tokens_per_s, rd.tokens_per_s),
                decode_speed=_ratio(dh and dh.tokens_per_s, dd and dd.tokens_per_s),
                prefill_total_memory=_ratio(rh.peak_total_bytes, rd.peak_total_bytes),
                decode_total_memory=_ratio(dh and dh.peak_total_bytes, dd and dd.peak_total_bytes),
                prefill_total_predicted=_ratio(rh.predicted_total_bytes, rd.predicted_total_bytes),
                decode_total_predicted=_ratio(dh and dh.predicted_total_bytes, dd and dd.predicted_total_bytes),
                memory_total_source=rh.peak_total_source, cache_memory=_ratio(rh.cache_bytes, rd.cache_bytes),
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
    for part, what, pairs in (("total", "prefill", analysis.ratios),
                              ("ttft", "time to first token", analysis.serve_ratios)):
        fails += _faster_growth(analysis.fits, part, what, pairs)
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
        change = r.tokens_per_s / b.tokens_per_s - 1
        if change < -threshold:
            out.append(f"{r.model} b{r.batch} ctx {r.ctx} {r.phase}: {r.tokens_per_s:.1f} tok/s vs "
                       f"baseline {b.tokens_per_s:.1f} ({change * 100:+.1f}%)")
    return out
