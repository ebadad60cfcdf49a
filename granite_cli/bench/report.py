"""A bench report folder: report.md, rows.jsonl, and PNG plots. Written to a temporary folder and
renamed into place, so a half-written report never appears."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Callable

from granite_cli.bench.findings import Analysis, Ratio
from granite_cli.bench.row import ModelRow, Row, ServeRow, columns, formats, is_nan
from granite_cli.fsutil import report_dir
from granite_cli.html import markdown_to_html
from granite_cli.ibm import MEMORY_RATIO, MEMORY_REDUCTION
from granite_cli.redact import redact, scrub
from granite_cli.render import human_bytes, json_safe, md_code, md_text, number_text, percent_text, to_markdown

ATTRIBUTION_PARTS = ("mamba", "attention", "moe_mlp", "rest")
PLOTS = {
    "prefill_time": "Prefill time vs context (log-log, fitted a + b·n + c·n²)",
    "decode_tps": "Decode tokens/s vs depth",
    "memory": "Total peak memory vs context (weights + cache + working set; dashed: predicted)",
    "batch": "Prefill throughput vs batch",
    "attribution": "Prefill time by layer type",
    "roofline": "Roofline: achieved FLOP/s against FLOP per byte (measured ceilings)",
    "serve_ttft": "Servers: time to first token vs prompt length (median, log-log; dotted: fitted)",
    "serve_itl": "Servers: inter-token latency (chunk gap) vs prompt length (median)",
    "serve_throughput": "Servers: output tokens/s vs concurrent sessions",
    "serve_turns": "Servers: time to first token by turn of a conversation (median)",
}


# What a report folder may hold of granite's (fsutil checks an existing --out against it up front).
REPORT_FILES = ("report.md", "report.html", "rows.jsonl", "analysis.json", "*.png")

def _plots(rows: list[Row], analysis: Analysis, out: Path) -> list[str]:
    """Each plot the rows allow, as name.png in `out`; returns the names made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.status == "ok"]
    series = _series(ok)
    made = []
    for name, fig in (("prefill_time", _prefill_plot(plt, series, analysis)), ("decode_tps", _decode_plot(plt, series)),
                      ("memory", _memory_plot(plt, series, analysis)), ("batch", _batch_plot(plt, ok)),
                      ("attribution", _attribution_plot(plt, ok)), ("roofline", _roofline_plot(plt, ok)),
                      ("serve_ttft", _serve_ttft_plot(plt, series,
                                                                                                   analysis)),
                      ("serve_itl", _serve_line_plot(plt, series, "itl_ms_p50", "inter-token latency (ms)",
                                                     "serve_itl")),
                      ("serve_throughput", _serve_throughput_plot(plt, ok)), ("serve_turns", _turns_plot(plt, ok))):
        if fig is None:
            continue
        if not any(ax.has_data() for ax in fig.axes):  # nothing of this kind in the sweep
            plt.close(fig)
            continue
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        made.append(name)
    return made


def _series(rows: list[Row]) -> dict[tuple, list[Row]]:
    """The ok rows by (model [workload], batch, phase), each in context order."""
    series = defaultdict(list)
    for r in rows:
        if r.status == "ok" and (getattr(r, "turns", None) or 1) == 1:  # a conversation's turns: their own plot
            series[(r.model + (f" [{r.workload}]" if r.workload else ""), r.batch, r.phase)].append(r)
    for rs in series.values():
        rs.sort(key=lambda r: r.ctx)
    return series


def _finish(ax, **kw) -> None:
    ax.set(**kw)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)


def _prefill_plot(plt, series: dict, analysis: Analysis):
    fits = {(f.model, f.batch): f for f in analysis.fits if f.part == "total" and f.a is not None}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (m, b, p), rs in sorted(series.items()):
        if p != "prefill":
            continue
        x, y = [r.ctx for r in rs], [r.median_s for r in rs]
        line = ax.plot(x, y, "o-", label=f"{m} b{b}")[0]
        f = fits.get((m, b))
        if f and f.doubling:
            xs = [x[0] * (x[-1] / x[0]) ** (i / 40) for i in range(41)]
            ax.plot(xs, [f.a + f.b * n + f.c * n * n for n in xs], ":", color=line.get_color())
            line.set_label(f"{m} b{b} (doubling {f.doubling:.2f}x)")
    _finish(ax, xscale="log", yscale="log", xlabel="context (tokens)", ylabel="prefill time (s)",
            title=PLOTS["prefill_time"])
    return fig


def _decode_plot(plt, series: dict):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (m, b, p), rs in sorted(series.items()):
        if p == "decode":
            ax.plot([r.ctx for r in rs], [r.tokens_per_s for r in rs], "o-", label=f"{m} b{b}")
    _finish(ax, xscale="log", xlabel="depth (tokens in cache)", ylabel="decode tokens/s", title=PLOTS["decode_tps"])
    return fig


def _batch_plot(plt, ok: list[Row]):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    byb = defaultdict(list)
    for r in ok:
        if r.phase == "prefill":
            byb[(r.model, r.ctx)].append(r)
    for (m, c), rs in sorted(byb.items()):
        if len(rs) > 1:
            rs.sort(key=lambda r: r.batch)
            ax.plot([r.batch for r in rs], [r.tokens_per_s for r in rs], "o-", label=f"{m} ctx {c}")
    _finish(ax, xscale="log", xlabel="batch", ylabel="prefill tokens/s", title=PLOTS["batch"])
    return fig


def _attribution_plot(plt, ok: list[Row]):
    """Top: each prefill's time by layer type as shares of its total (linear, so no segment falls
    below an axis floor), the total in seconds above the bar. Bottom: the same seconds side by side
    on a log axis, so a part a hundred times smaller than the rest is still drawn."""
    att = [r for r in ok if r.phase == "prefill" and r.attribution_s]
    if not att:
        return None
    b0 = min(r.batch for r in att)
    att = sorted([r for r in att if r.batch == b0], key=lambda r: (r.model, r.ctx))
    parts = [p for p in ATTRIBUTION_PARTS if any(r.attribution_s.get(p) for r in att)]
    fig, (top, low) = plt.subplots(2, 1, figsize=(max(7.0, 0.55 * len(att)), 8), sharex=True)
    xs = range(len(att))
    totals = [sum(r.attribution_s.get(p, 0.0) for p in parts) or 1.0 for r in att]
    bottom = [0.0] * len(att)
    for i, part in enumerate(parts):
        shares = [r.attribution_s.get(part, 0.0) / t * 100 for r, t in zip(att, totals)]
        top.bar(xs, shares, bottom=bottom, label=part, color=f"C{i}")
        for x, (b, v) in enumerate(zip(bottom, shares)):
            if v >= 6:
                top.text(x, b + v / 2, f"{v:.0f}%", ha="center", va="center", fontsize=6)
        bottom = [a + v for a, v in zip(bottom, shares)]
    for x, t in enumerate(totals):
        top.text(x, 101, number_text(t) + " s", ha="center", va="bottom", fontsize=6)
    top.set(ylabel="share of prefill time (%)", ylim=(0, 110), title=PLOTS["attribution"] + f" (batch {b0})")
    top.legend(fontsize=7, loc="lower right")
    width = 0.8 / len(parts)
    for i, part in enumerate(parts):
        vals = [r.attribution_s.get(part, 0.0) for r in att]
        low.bar([x + (i - (len(parts) - 1) / 2) * width for x in xs], [v if v > 0 else float("nan") for v in vals],
                width, color=f"C{i}", label=part)
    low.set(ylabel="seconds (log)", yscale="log")
    low.grid(True, which="both", axis="y", alpha=0.3)
    low.set_xticks(list(xs), [f"{r.model}\n{r.ctx}" for r in att], fontsize=6, rotation=60)
    return fig


def _roofline_plot(plt, ok: list[Row]):
    """Achieved FLOP/s against arithmetic intensity, one point per in-process case, under the device's
    two measured ceilings (matmul rate, copy bandwidth)."""
    rs = [r for r in ok if isinstance(r, ModelRow) and r.achieved_tflops and r.intensity_flop_per_byte]
    ceil = next((r for r in rs if r.ceiling_gflops and r.ceiling_gbps), None)
    if not rs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by = defaultdict(list)
    for r in rs:
        by[(r.model, r.batch, r.phase)].append(r)
    for i, ((m, b, p), pts) in enumerate(sorted(by.items())):
        pts.sort(key=lambda r: r.ctx)
        ax.plot([r.intensity_flop_per_byte for r in pts], [r.achieved_tflops * 1e3 for r in pts],
                "o" if p == "prefill" else "s", color=f"C{i}", label=f"{m} b{b} {p}")
        for r in (pts[0], pts[-1]):
            ax.annotate(_ctx_label(r.ctx), (r.intensity_flop_per_byte, r.achieved_tflops * 1e3), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    if ceil is not None:
        lo = min(r.intensity_flop_per_byte for r in rs) / 3
        hi = max(r.intensity_flop_per_byte for r in rs) * 3
        ridge = ceil.ceiling_gflops / ceil.ceiling_gbps
        xs = sorted({lo, hi, min(max(ridge, lo), hi)})
        ax.plot(xs, [min(ceil.ceiling_gflops, ceil.ceiling_gbps * x) for x in xs], "k-", lw=1,
                label=f"ceilings: {number_text(ceil.ceiling_gflops)} GFLOP/s matmul, "
                      f"{number_text(ceil.ceiling_gbps)} GB/s copy")
    _finish(ax, xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP per byte moved)",
            ylabel="achieved GFLOP/s", title=PLOTS["roofline"])
    return fig


def _ctx_label(c: int) -> str:
    return f"{c // 1024}k" if c % 1024 == 0 else str(c)


def _turns_plot(plt, ok: list[Row]):
    rs = [r for r in ok if isinstance(r, ServeRow) and (r.turns or 1) > 1 and r.turn_ttft_ms_p50]
    if not rs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in sorted(rs, key=lambda r: (r.model, r.batch, r.ctx)):
        pts = [(i + 1, v) for i, v in enumerate(r.turn_ttft_ms_p50) if v is not None]
        ax.plot(*zip(*pts), "o-", label=f"{r.model} c{r.batch} {r.ctx}-token turns")
    turns = max(len(r.turn_ttft_ms_p50) for r in rs)
    _finish(ax, xlabel="turn", ylabel="time to first token (ms)", title=PLOTS["serve_turns"])
    ax.set_xticks(range(1, turns + 1))
    return fig


def _serve_ttft_plot(plt, series: dict, analysis: Analysis):
    # a workload's fit is part "ttft [workload]", its series' model label "model [workload]"
    fits = {(f.model + f.part[4:], f.batch): f for f in analysis.fits if f.part.startswith("ttft") and f.a is not None}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (m, b, p), rs in sorted(series.items()):
        rs = [r for r in rs if p == "serve" and r.ttft_ms_p50]
        if not rs:
            continue
        x = [r.ctx for r in rs]
        line = ax.plot(x, [r.ttft_ms_p50 for r in rs], "o-", label=f"{m} c{b}")[0]
        f = fits.get((m, b))
        if f and f.doubling and len(x) > 1:
            xs = [x[0] * (x[-1] / x[0]) ** (i / 40) for i in range(41)]
            ax.plot(xs, [(f.a + f.b * n + f.c * n * n) * 1e3 for n in xs], ":", color=line.get_color())
            line.set_label(f"{m} c{b} (doubling {f.doubling:.2f}x)")
    _finish(ax, xscale="log", yscale="log", xlabel="prompt (tokens)", ylabel="time to first token (ms)",
            title=PLOTS["serve_ttft"])
    return fig


def _serve_line_plot(plt, series: dict, key: str, ylabel: str, name: str):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (m, b, p), rs in sorted(series.items()):
        rs = [r for r in rs if p == "serve" and getattr(r, key)]
        if rs:
            ax.plot([r.ctx for r in rs], [getattr(r, key) for r in rs], "o-", label=f"{m} c{b}")
    _finish(ax, xscale="log", xlabel="prompt (tokens)", ylabel=ylabel, title=PLOTS[name])
    return fig


def _serve_throughput_plot(plt, ok: list[Row]):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    byc = defaultdict(list)
    for r in ok:
        if r.phase == "serve" and r.output_tokens_per_s:
            byc[(r.model, r.ctx)].append(r)
    for (m, c), rs in sorted(byc.items()):
        if len(rs) > 1:
            rs.sort(key=lambda r: r.batch)
            ax.plot([r.batch for r in rs], [r.output_tokens_per_s for r in rs], "o-", label=f"{m} prompt {c}")
    _finish(ax, xscale="log", yscale="log", xlabel="concurrent sessions", ylabel="output tokens/s",
            title=PLOTS["serve_throughput"])
    cs = sorted({r.batch for rs in byc.values() for r in rs})
    ax.set_xticks(cs, [str(c) for c in cs])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    return fig


def _memory_plot(plt, series: dict, analysis: Analysis):
    """Left: each model's total peak memory per phase vs context (measured, solid; predicted, dashed).
    Right: the hybrid/dense ratio of the measured totals, with the line of IBM's 70% claim.
    None when no row has a measured total."""
    lines = [(k, rs) for k, rs in sorted(series.items()) if k[2] != "serve" and any(r.peak_total_bytes for r in rs)]
    if not lines:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for (m, b, p), rs in lines:
        rs = [r for r in rs if r.peak_total_bytes]
        x = [r.ctx for r in rs]
        ln = ax.plot(x, [r.peak_total_bytes / 2**30 for r in rs], "o-" if p == "prefill" else "s-",
                     label=f"{m} b{b} {p}")[0]
        pred = [(r.ctx, r.predicted_total_bytes / 2**30) for r in rs if r.predicted_total_bytes]
        if pred:  # a marker on each prediction: one context still draws it
            ax.plot(*zip(*pred), "x--", color=ln.get_color(), alpha=0.7, ms=7)
    src = lines[0][1][0].peak_total_source or "measured"
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel=f"total peak ({src}), GiB",
           title="Total peak memory (x, dashed: predicted)")
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.yaxis.set_minor_formatter(plt.FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.legend(fontsize=6)
    ax.grid(True, which="both", alpha=0.3)
    pairs = defaultdict(list)
    for r in analysis.ratios:
        pairs[(r.hybrid, r.dense, r.batch)].append(r)
    for (h, d, b), rs in sorted(pairs.items()):
        rs.sort(key=lambda r: r.ctx)
        for key, mark in (("prefill_total_memory", "o-"), ("decode_total_memory", "s-")):
            pts = [(r.ctx, getattr(r, key)) for r in rs if not is_nan(getattr(r, key))]
            if pts:
                ax2.plot(*zip(*pts), mark, label=f"{h}/{d} b{b} {key.split('_')[0]}")
    ax2.axhline(MEMORY_RATIO, color="grey", ls=":", label=f"{MEMORY_RATIO:.1f} ({MEMORY_REDUCTION:.0%} less)")
    ax2.set(xscale="log", xlabel="context (tokens)", ylabel="hybrid / dense total peak", ylim=(0, None),
            title="Hybrid / dense")
    ctxs = sorted({r.ctx for _, rs in lines for r in rs})
    for a in (ax, ax2):  # one tick per context of the sweep
        a.set_xticks(ctxs, [_ctx_label(c) for c in ctxs], fontsize=7)
        a.xaxis.set_minor_locator(plt.NullLocator())
    ax2.legend(fontsize=6)
    ax2.grid(True, which="both", alpha=0.3)
    return fig


def memory_claims(ratios: list[Ratio]) -> list[str]:
    """Where the measured total-peak ratio meets IBM's '70-80% less memory' (ratio under 0.3), and where not."""
    out = []
    for phase in ("prefill", "decode"):
        key = f"{phase}_total_memory"
        pts = [(r, getattr(r, key)) for r in ratios if not is_nan(getattr(r, key))]
        if not pts:
            continue
        met = [(r, v) for r, v in pts if v < MEMORY_RATIO]
        best, low = min(pts, key=lambda rv: rv[1])
        where = ", ".join(f"b{r.batch} ctx {r.ctx} ({v:.2f}x)" for r, v in met)
        out.append(f"{phase}: the measured hybrid/dense total peak is under {MEMORY_RATIO:.1f} (more than "
                   f"{MEMORY_REDUCTION:.0%} less) at {len(met)} of {len(pts)} case(s)" + (f": {where}" if met else
                   f"; the lowest is {low:.2f}x at b{best.batch} ctx {best.ctx}"))
    return out


def _serve_section(rows: list[Row]) -> list[str]:
    """The servers' rows: who served what, then latency percentiles (ms) and throughput per case."""
    served = [r for r in rows if r.phase == "serve"]
    if not served:
        return []
    who = {r.model: r for r in served}
    out = ["", "## Servers", "", "Prompt = `ctx` tokens, `batch` = concurrent sessions (closed loop; with a rate, the "
           "most requests in flight), latencies in ms on the client's clock over every request of the case (a "
           "percentile only where the requests support it: p90 from 10, p99 from 100). ITL is the gap between "
           "streamed chunks (vLLM's ITL); TPOT is per request, (e2e - TTFT) / (tokens - 1), what AIPerf and "
           "GuideLLM call ITL. `reuse`: the prompt tokens the server reported cached, of those the workload made "
           "reusable; `server_running_max` from the server's /metrics.", ""]
    # every value here is the server's or a rows file's text: escaped, never markup
    out += [f"- {md_text(m)}: {md_text(r.engine or 'unknown engine')} {md_text(r.server_version or '')}, serving "
            f"{md_code(r.served_model)} at {md_text(r.endpoint)}, {md_text(r.server_slots or '?')} slot(s); client "
            f"CPU {md_code(r.cpu)}" for m, r in who.items()]
    cols = columns(ServeRow, "report")
    nums = [k for k in cols if formats().get(k) == "num"]
    table = [{**r.to_dict(), **{k: number_text(getattr(r, k)) for k in nums},
              "errors": ", ".join(f"{k}: {n}" for k, n in sorted((r.errors or {}).items())) or None}
             for r in served]
    out += ["", to_markdown(table, cols)]
    turns = [{"model": r.model, "sessions": r.batch, "turn": i + 1, "prompt tokens": _round(r.turn_prompt_tokens, i),
              "reusable": _round(r.turn_reusable_tokens, i), "cached": _round(r.turn_cached_tokens, i),
              "TTFT ms": _round(r.turn_ttft_ms_p50, i, 1), "TPOT ms": _round(r.turn_tpot_ms_p50, i, 1)}
             for r in served if isinstance(r, ServeRow) and (r.turns or 1) > 1 and r.turn_ttft_ms_p50
             for i in range(len(r.turn_ttft_ms_p50))]
    if turns:
        out += ["", "### Multi-turn sessions", "",
                "Each turn sends the whole history and a new message; `reusable` is the previous turn's prompt, "
                "`cached` what the server reported reusing (means over the sessions).", "",
                to_markdown(turns, list(turns[0]))]
    return out


_CELL = {"num": number_text, "pct": percent_text, "bytes": lambda v: None if v is None else human_bytes(v)}


def _model_cells(r: ModelRow, cols: list[str]) -> dict:
    """A row's report cells: numbers without scientific notation, fractions as percentages, sizes in
    binary units, and no spread for a single repetition (one sample has none)."""
    fmt = formats()
    out = {**r.to_dict(), **{k: _CELL[fmt[k]](getattr(r, k)) for k in cols if fmt.get(k) in _CELL}}
    if len(r.samples_s or []) < 2:
        out["stdev_s"] = None
    return out


def _round(xs: list | None, i: int, digits: int = 0):
    v = xs[i] if xs and i < len(xs) else None
    return None if v is None else round(v, digits) if digits else round(v)


def write_report(out_dir: Path, rows: list[Row], analysis: Analysis, spec_dict: dict, wall_s: float | None = None,
                 say: Callable[[str], None] | None = None) -> Path:
    """report.md, report.html (the same, self-contained), rows.jsonl, analysis.json and the plots, into
    out_dir (fsutil.report_dir); every string redacted (granite_cli.redact)."""
    out_dir = Path(out_dir)
    spec_dict = scrub(spec_dict)
    with report_dir(out_dir, REPORT_FILES, say) as tmp:
        plots = _plots(rows, analysis, tmp)
        cols = columns(ModelRow, "report")
        table = [_model_cells(r, cols) for r in rows if isinstance(r, ModelRow)]
        env_keys = ("device", "cpu", "gpu", "threads", "torch", "kernel_impl", "commit", "dirty")
        env = {k: getattr(rows[0], k, None) for k in env_keys} if rows else {}
        lines = ["# granite bench report", ""]
        lines += [f"- {k}: {md_code(v)}" for k, v in env.items() if v is not None]
        lines += [f"- sweep: {md_code(json.dumps(spec_dict))}"]
        if ceil := next((r for r in rows if isinstance(r, ModelRow) and r.ceiling_gflops), None):
            lines.append(f"- this machine's ceilings ({md_text(ceil.ceiling_source)}): "
                         f"{number_text(ceil.ceiling_gflops)} GFLOP/s matmul, {number_text(ceil.ceiling_gbps)} GB/s "
                         "copy (read + write); each row's "
                         "`of matmul` and `of copy` are its achieved rates over these")
        if wall_s is not None:
            lines.append(f"- wall time: {wall_s:.0f} s")
        lines += ["", "## Verdicts", ""] + [f"- {md_text(v)}" for v in analysis.verdicts]
        if claims := memory_claims(analysis.ratios):
            lines += ["", "## IBM's memory claim (70-80% less than a comparable Transformer)", "",
                      "Measured total peaks (weights + cache + working set; on a CPU the live-tensor tracker's, "
                      "on a GPU the allocator's), hybrid against its dense twin:", ""]
            lines += [f"- {md_text(c)}" for c in claims]
        if table:
            lines += ["", "## Results", "",
                      "peak_total: the phase's total peak memory of record (`peak_total_source`); predicted_total: "
                      "memory-report's model of it; peak_delta: the peak's increase over the phase's baseline "
                      "(RSS on a CPU), which leaves out the weights and the cache. TFLOP/s and GB/s: the case's "
                      "FLOPs and the bytes it must move at least (weights, KV, SSM state) over its median time, for "
                      "a whole prefill or one decode step; `of matmul` and `of copy`: those over the machine's "
                      "measured ceilings. stdev is blank for one repetition (`reps`).", "",
                      to_markdown(table, cols)]
        lines += _serve_section(rows)
        for name in plots:
            lines += [f"## {PLOTS[name]}", "", f"![{name}]({name}.png)", ""]
        md = redact("\n".join(lines)) + "\n"
        (tmp / "report.md").write_text(md, encoding="utf-8")
        (tmp / "report.html").write_text(markdown_to_html(md, tmp, "granite bench report"), encoding="utf-8")
        with open(tmp / "rows.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(json_safe(scrub(r.to_dict()))) + "\n")
        (tmp / "analysis.json").write_text(json.dumps(json_safe(scrub(analysis.to_dict())), indent=2) + "\n",
                                           encoding="utf-8")
    return out_dir
