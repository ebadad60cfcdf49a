"""Fits and verdicts over bench rows: per model and per layer type, the doubling cost of prefill,
decode cost vs depth, and hybrid/dense ratios of speed and memory at each context."""

from __future__ import annotations

from collections import defaultdict

from granite_cli.bench.fit import describe, fit_scaling

OK = ("ok",)


def _group(rows, phase):
    g = defaultdict(list)
    for r in rows:
        if r["phase"] == phase and r["status"] in OK:
            g[(r["model"], r["batch"])].append(r)
    return g


def analyse(rows: list[dict], slo_ttft_ms: float | None = None, slo_itl_ms: float | None = None) -> dict:
    fits: list[dict] = []
    verdicts: list[str] = []
    for (model, batch), rs in sorted(_group(rows, "prefill").items()):
        rs = sorted(rs, key=lambda r: r["ctx"])
        n = [r["ctx"] for r in rs]
        total = fit_scaling(n, [r["median_s"] for r in rs])
        entry = {"model": model, "batch": batch, "phase": "prefill", "part": "total",
                 **(total.as_dict() if total else {})}
        fits.append(entry)
        verdicts.append(describe(f"{model} b{batch} prefill", total))
        for part, label in (("mamba", "Mamba layers"), ("attention", "attention layers")):
            ts = [(r.get("attribution_s") or {}).get(part) for r in rs]
            if not any(ts):
                continue
            f = fit_scaling(n, ts)
            fits.append({"model": model, "batch": batch, "phase": "prefill", "part": part,
                         **(f.as_dict() if f else {})})
            verdicts.append(describe(f"{model} b{batch} {label}", f))
    for (model, batch), rs in sorted(_group(rows, "decode").items()):
        rs = sorted(rs, key=lambda r: r["ctx"])
        f = fit_scaling([r["ctx"] for r in rs], [r["median_s"] for r in rs])
        if f:
            fits.append({"model": model, "batch": batch, "phase": "decode", "part": "per_token", **f.as_dict()})
            lo, hi = rs[0], rs[-1]
            verdicts.append(
                f"{model} b{batch} decode: {lo['latency_ms']:.2f} ms/token at depth {lo['ctx']} -> "
                f"{hi['latency_ms']:.2f} ms at {hi['ctx']} ({hi['median_s'] / lo['median_s']:.2f}x over "
                f"{hi['ctx'] / lo['ctx']:.0f}x depth)")
    ratios = hybrid_dense_ratios(rows)
    verdicts += [ratio_verdict(r) for r in ratios]
    served = serve_analysis(rows, slo_ttft_ms, slo_itl_ms)
    fits += served["fits"]
    verdicts += served["verdicts"]
    return {"fits": fits, "verdicts": verdicts, "ratios": ratios, "serve_ratios": served["ratios"]}


def _x(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.2f}x"


def _ms(v) -> str:
    return "n/a" if v is None else f"{v:.0f} ms" if v >= 100 else f"{v:.1f} ms"


def serve_analysis(rows: list[dict], slo_ttft_ms: float | None = None, slo_itl_ms: float | None = None) -> dict:
    """Verdicts on servers (phase "serve" rows): how time to first token grows with the prompt (fitted as
    prefill is), inter-token latency against depth, throughput against concurrency and where it stops
    growing, the sessions per server within an SLO, hybrid/dense ratios, and failed requests."""
    fits, verdicts = [], []
    g = _group(rows, "serve")
    for (model, b), rs in sorted(g.items()):
        rs = sorted(rs, key=lambda r: r["ctx"])
        f = fit_scaling([r["ctx"] for r in rs], [r["ttft_ms_p50"] and r["ttft_ms_p50"] / 1e3 for r in rs])
        fits.append({"model": model, "batch": b, "phase": "serve", "part": "ttft", **(f.as_dict() if f else {})})
        verdicts.append(describe(f"{model} c{b} time to first token", f))
        lo, hi = rs[0], rs[-1]
        if lo is not hi and lo.get("itl_ms_p50") and hi.get("itl_ms_p50"):
            verdicts.append(f"{model} c{b} inter-token latency: {_ms(lo['itl_ms_p50'])} after a {lo['ctx']}-token "
                            f"prompt -> {_ms(hi['itl_ms_p50'])} after {hi['ctx']} "
                            f"({hi['itl_ms_p50'] / lo['itl_ms_p50']:.2f}x over {hi['ctx'] / lo['ctx']:.0f}x depth)")
    verdicts += _throughput_verdicts(g, slo_ttft_ms, slo_itl_ms)
    ratios = _serve_ratios(rows)
    verdicts += [f"{r['hybrid']} vs {r['dense']} c{r['batch']} prompt {r['ctx']}: time to first token "
                 f"{_x(r['ttft'])}, inter-token latency {_x(r['itl'])}, output tokens/s {_x(r['output_speed'])}"
                 for r in ratios]
    failed: dict[str, dict[str, int]] = {}
    for r in rows:
        if r["phase"] == "serve" and r.get("errors"):
            for k, n in r["errors"].items():
                failed.setdefault(r["model"], {}).setdefault(k, 0)
                failed[r["model"]][k] += n
    for m, kinds in failed.items():
        verdicts.append(f"{m}: {sum(kinds.values())} request(s) failed ("
                        + ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items())) + ")")
    return {"fits": fits, "verdicts": verdicts, "ratios": ratios}


def _throughput_verdicts(g: dict, slo_ttft_ms: float | None, slo_itl_ms: float | None) -> list[str]:
    """Per server and prompt length: output tokens/s over concurrency, the concurrency past which it grows
    by less than 10%, and with an SLO the largest concurrency whose p90s meet it."""
    by: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for (model, b), rs in g.items():
        for r in rs:
            by[(model, r["ctx"])][b] = r
    out = []
    for (model, ctx), per in sorted(by.items()):
        cs = sorted(per)
        if len(cs) > 1:
            tps = [per[c].get("output_tokens_per_s") or 0.0 for c in cs]
            sat = next((c for c, a, nxt in zip(cs, tps, tps[1:]) if nxt < a * 1.10), None)
            out.append(f"{model} prompt {ctx}: output tokens/s " + ", ".join(f"{t:.1f} (c{c})" for c, t in
                                                                               zip(cs, tps))
                       + (f"; saturates at concurrency {sat}" if sat else f"; still growing at concurrency {cs[-1]}"))
        if slo_ttft_ms is None and slo_itl_ms is None:
            continue
        meets = [c for c in cs if not per[c].get("errors")
                 and (slo_ttft_ms is None or (per[c].get("ttft_ms_p90") or 1e30) <= slo_ttft_ms)
                 and (slo_itl_ms is None or (per[c].get("itl_ms_p90") or 1e30) <= slo_itl_ms)]
        slo = " and ".join(x for x in (f"TTFT p90 <= {slo_ttft_ms:g} ms" if slo_ttft_ms else "",
                                       f"ITL p90 <= {slo_itl_ms:g} ms" if slo_itl_ms else "") if x)
        out.append(f"{model} prompt {ctx}: " + (f"{max(meets)} session(s) per server within {slo}" if meets else
                                                  f"no measured concurrency ({', '.join(map(str, cs))}) meets {slo}"))
    return out


def _serve_ratios(rows: list[dict]) -> list[dict]:
    idx = {(r["model"], r["batch"], r["ctx"]): r for r in rows if r["phase"] == "serve" and r["status"] in OK}
    kinds = {r["model"]: r.get("kind") for r in rows if r["phase"] == "serve"}
    out = []
    for h in (m for m, k in kinds.items() if k == "hybrid"):
        for d in (m for m, k in kinds.items() if k == "dense"):
            for (m, b, c), rh in sorted(idx.items()):
                rd = idx.get((d, b, c))
                if m != h or rd is None:
                    continue

                def ratio(key):
                    x, y = rh.get(key), rd.get(key)
                    return x / y if x is not None and y else float("nan")

                out.append({"hybrid": h, "dense": d, "batch": b, "ctx": c, "ttft": ratio("ttft_ms_p50"),
                            "itl": ratio("itl_ms_p50"), "output_speed": ratio("output_tokens_per_s")})
    return out


_SOURCE = {"tracked": "tracked", "cuda_allocated": "allocator"}


def ratio_verdict(r: dict) -> str:
    """One hybrid-vs-dense line: speed, then total peak memory per phase (weights + cache + working
    set, the memory the claim is about) measured beside memory-report's prediction, then the cache.
    The RSS increase over the baseline is not in it: it leaves out the weights and the cache."""
    src = _SOURCE.get(r.get("memory_total_source"), "measured")
    return (f"{r['hybrid']} vs {r['dense']} b{r['batch']} ctx {r['ctx']}: prefill {_x(r['prefill_speed'])}, "
            f"decode {_x(r['decode_speed'])} speed; peak memory ({src}: weights + cache + working set) prefill "
            f"{_x(r['prefill_total_memory'])}, decode {_x(r['decode_total_memory'])} (predicted "
            f"{_x(r['prefill_total_predicted'])}, {_x(r['decode_total_predicted'])}); cache (KV + state) "
            f"{_x(r['cache_memory'])}")


def hybrid_dense_ratios(rows: list[dict]) -> list[dict]:
    kinds = {r["model"]: r.get("kind") for r in rows}
    hybrids = [m for m, k in kinds.items() if k == "hybrid"]
    denses = [m for m, k in kinds.items() if k == "dense"]
    idx = {(r["model"], r["batch"], r["ctx"], r["phase"]): r for r in rows if r["status"] in OK}
    out = []
    for h in hybrids:
        for d in denses:
            for (m, b, c, p) in sorted(k for k in idx if k[0] == h and k[3] == "prefill"):
                rd = idx.get((d, b, c, "prefill"))
                if not rd:
                    continue
                rh = idx[(h, b, c, "prefill")]
                dh, dd = idx.get((h, b, c, "decode")), idx.get((d, b, c, "decode"))

                def ratio(x, y):
                    return x / y if x is not None and y else float("nan")

                def rss_ratio(x, y):  # RSS deltas under 16 MiB are allocator noise, not the model
                    return x / y if x and y and min(x, y) >= 16 * 2**20 else float("nan")

                def field(row, key):
                    return row.get(key) if row else None

                out.append({
                    "hybrid": h, "dense": d, "batch": b, "ctx": c,
                    "prefill_speed": ratio(rh["tokens_per_s"], rd["tokens_per_s"]),
                    "decode_speed": ratio(field(dh, "tokens_per_s"), field(dd, "tokens_per_s")),
                    "prefill_total_memory": ratio(rh.get("peak_total_bytes"), rd.get("peak_total_bytes")),
                    "decode_total_memory": ratio(field(dh, "peak_total_bytes"), field(dd, "peak_total_bytes")),
                    "prefill_total_predicted": ratio(rh.get("predicted_total_bytes"), rd.get("predicted_total_bytes")),
                    "decode_total_predicted": ratio(field(dh, "predicted_total_bytes"),
                                                    field(dd, "predicted_total_bytes")),
                    "memory_total_source": rh.get("peak_total_source"),
                    "cache_memory": ratio(rh.get("cache_bytes"), rd.get("cache_bytes")),
                    # secondary: the peak's increase over the phase's baseline (RSS on a CPU), not the total
                    "prefill_increase_memory": rss_ratio(rh.get("peak_delta_bytes"), rd.get("peak_delta_bytes")),
                    "memory_source": rh.get("memory_source"),
                })
    return out


def check_claims(rows: list[dict], analysis: dict) -> list[str]:
    """Claims `--check` holds the sweep to; returns the failures (empty = reproduced)."""
    fails = []
    for f in analysis["fits"]:
        if f.get("part") == "mamba" and f.get("doubling") is not None and f["doubling"] > 2.6:
            fails.append(f"{f['model']} b{f['batch']}: Mamba layers not linear (doubling {f['doubling']:.2f}x)")
    for part, what, pairs in (("total", "prefill", analysis["ratios"]),
                              ("ttft", "time to first token", analysis.get("serve_ratios", []))):
        fails += _faster_growth(analysis["fits"], part, what, pairs)
    invalid = [r for r in rows if r["status"] == "invalid"]
    if invalid:
        fails.append(f"{len(invalid)} case(s) failed the correctness guard")
    return sorted(set(fails))


def _faster_growth(fits: list[dict], part: str, what: str, pairs: list[dict]) -> list[str]:
    """A hybrid whose cost grows faster with context than its dense twin's, at the same batch."""
    fails = []
    by = {(f["model"], f["batch"]): f for f in fits if f.get("part") == part and f.get("doubling")}
    for r in pairs:  # one pair per context: the caller drops the repeated lines
        fh, fd = by.get((r["hybrid"], r["batch"])), by.get((r["dense"], r["batch"]))
        if fh and fd and fh["doubling"] > fd["doubling"] * 1.05:
            fails.append(f"{r['hybrid']} {what} grows faster than {r['dense']} at b{r['batch']} "
                         f"(doubling {fh['doubling']:.2f}x vs {fd['doubling']:.2f}x)")
    return fails


def regressions(rows: list[dict], baseline: list[dict], threshold: float) -> list[str]:
    base = {(r["model"], r["dtype"], r["device"], r["batch"], r["ctx"], r["phase"]): r for r in baseline
            if r.get("status") == "ok"}
    out = []
    for r in rows:
        b = base.get((r["model"], r["dtype"], r["device"], r["batch"], r["ctx"], r["phase"]))
        if not b or r["status"] != "ok" or not b.get("tokens_per_s"):
            continue
        change = r["tokens_per_s"] / b["tokens_per_s"] - 1
        if change < -threshold:
            out.append(f"{r['model']} b{r['batch']} ctx {r['ctx']} {r['phase']}: {r['tokens_per_s']:.1f} tok/s vs "
                       f"baseline {b['tokens_per_s']:.1f} ({change * 100:+.1f}%)")
    return out
