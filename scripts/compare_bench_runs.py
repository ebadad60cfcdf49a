"""Compare `granite bench --format json` outputs of two trees, each run more than once, side by side.

Usage: python scripts/compare_bench_runs.py BEFORE.json [BEFORE2.json ...] -- AFTER.json [AFTER2.json ...]

Prints, as markdown: each run's wall time; whether every field that does not depend on timing
(statuses, validity, guard differences, measured and predicted peaks, cache and weight bytes) is
identical across all runs; the tokens/s ratio after/before (geometric mean over the runs of each
tree) beside the run-to-run ratio within each tree; and the verdict lines that differ, split into
memory parts (deterministic) and timing parts.
"""

from __future__ import annotations

import json
import math
import re
import sys

EXACT = ("status", "valid", "guard_max_diff", "guard_depth_diff", "guard_full_diff", "peak_total_bytes",
         "predicted_total_bytes", "cache_bytes", "weights_bytes", "params_total", "params_active", "prefill_from")


def key(r: dict) -> tuple:
    return r["model"], r["batch"], r["ctx"], r["phase"]


def geo(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def main(argv: list[str]) -> None:
    cut = argv.index("--")
    names = {"before": argv[:cut], "after": argv[cut + 1:]}
    runs = {side: [json.load(open(p)) for p in paths] for side, paths in names.items()}
    print("| tree | run | wall s (bench's own) | rows ok |\n|---|---|---|---|")
    for side, ds in runs.items():
        for i, d in enumerate(ds, 1):
            ok = sum(r["status"] == "ok" for r in d["rows"])
            print(f"| {side} | {i} | {d['wall_s']:.1f} | {ok}/{len(d['rows'])} |")
    ref = {key(r): r for r in runs["before"][0]["rows"]}
    diffs = [(side, i, k, f) for side, ds in runs.items() for i, d in enumerate(ds, 1) for r in d["rows"]
             for k in [key(r)] for f in EXACT if r.get(f) != ref[k].get(f)]
    print(f"\nTiming-independent fields ({', '.join(EXACT)}): {len(diffs)} differences over "
          f"{sum(len(d['rows']) for ds in runs.values() for d in ds)} rows" + (f", e.g. {diffs[:3]}" if diffs else ""))

    def tps(side: str) -> dict:
        return {k: geo([{key(r): r for r in d["rows"]}[k]["tokens_per_s"] for d in runs[side]]) for k in ref}

    b, a = tps("before"), tps("after")
    for phase in ("prefill", "decode"):
        xs = [a[k] / b[k] for k in ref if k[3] == phase]
        print(f"- {phase} tokens/s after/before: geomean {geo(xs):.3f} (min {min(xs):.3f}, max {max(xs):.3f})")
    for side, ds in runs.items():
        if len(ds) > 1:
            xs = [{key(r): r for r in ds[1]["rows"]}[k]["tokens_per_s"] / {key(r): r for r in ds[0]["rows"]}[k]
                  ["tokens_per_s"] for k in ref]
            print(f"- {side} run 2 / run 1 tokens/s (noise): geomean {geo(xs):.3f} (min {min(xs):.3f}, "
                  f"max {max(xs):.3f})")
    mem = re.compile(r"peak memory.*")
    v0 = runs["before"][0]["verdicts"]
    for side, ds in runs.items():
        for i, d in enumerate(ds, 1):
            same_mem = all((mem.search(x) or [None])[0] == (mem.search(y) or [None])[0]
                           for x, y in zip(v0, d["verdicts"]))
            n = sum(x != y for x, y in zip(v0, d["verdicts"]))
            print(f"- {side} run {i} vs before run 1: {n} of {len(v0)} verdict lines differ; memory parts "
                  f"{'identical' if same_mem else 'DIFFER'}")


if __name__ == "__main__":
    main(sys.argv[1:])
