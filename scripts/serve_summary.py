"""The tables of reports/serve/README.md, from the two report folders benchmarks/serve_cpu.py writes.

    python scripts/serve_summary.py reports/serve
"""

from __future__ import annotations

import json
import statistics as st
import sys
from pathlib import Path
from types import SimpleNamespace


def rows(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "rows.jsonl").read_text().splitlines() if x.strip()]


def main(top: Path) -> None:
    ep = rows(top / "endpoints")
    a_ep = json.loads((top / "endpoints" / "analysis.json").read_text())
    a_core = json.loads((top / "in-process" / "analysis.json").read_text())
    from granite_cli.bench.fit import describe

    print("## doubling: engine TTFT vs core prefill\n")
    print("| subject | c/b | llama.cpp TTFT | granite core prefill |\n|---|---|---|---|")
    fe = {(f["model"], f["batch"]): f for f in a_ep["fits"] if f.get("part") == "ttft"}
    fc = {(f["model"], f["batch"]): f for f in a_core["fits"] if f.get("part") == "total"}
    for key in sorted(fe, key=lambda k: (k[0] != "cpu-hybrid", k[1])):
        def word(f):  # describe's class, from the stored doubling, to two decimals
            cls = describe("", SimpleNamespace(doubling=f.get("doubling"))).split(": ", 1)[1].split(" (")[0]
            return f"{cls} ({f['doubling']:.2f}x)"
        print(f"| {key[0]} | {key[1]} | {word(fe[key])} | {word(fc[key]) if key in fc else '-'} |")
    print("\n## hybrid/dense ratios (engine)\n")
    print("| concurrency | prompt | TTFT | ITL | output tok/s |\n|---|---|---|---|---|")
    for r in a_ep["serve_ratios"]:
        print(f"| {r['batch']} | {r['ctx']} | {r['ttft']:.2f}x | {r['itl']:.2f}x | {r['output_speed']:.2f}x |")
    print("\n## core ratios\n")
    for r in a_core["ratios"]:
        if r["ctx"] in (512, 8192):
            print(f"b{r['batch']} ctx {r['ctx']}: prefill speed {r['prefill_speed']:.2f}x, decode speed "
                  f"{r['decode_speed']:.2f}x")
    print("\n## ITL vs depth (engine)\n")
    for v in a_ep["verdicts"]:
        if "inter-token latency:" in v:
            print(v)
    print("\n## throughput (engine)\n")
    for v in a_ep["verdicts"]:
        if "output tokens/s" in v and " vs " not in v:
            print(v)
    print("\n## client cost\n")
    row_ms = [r["client_row_ms"] for r in ep]
    cpu = [r["client_cpu_ms_per_request"] for r in ep]
    print(f"client_row_ms median {st.median(row_ms):.2f}, max {max(row_ms):.2f}")
    print(f"client cpu ms/request median {st.median(cpu):.2f}, range {min(cpu):.2f}-{max(cpu):.2f}")
    d = [(r["model"], r["ctx"], r["ttft_ms_p50"] - r["server_prompt_ms_p50"], r["ttft_ms_p50"]) for r in ep
         if r["batch"] == 1 and r["ttft_ms_p50"] and r["server_prompt_ms_p50"]]
    print("c1 TTFT - server prompt ms: " + ", ".join(f"{m} {c}: {x:.1f} ({x / t:.1%})" for m, c, x, t in d))
    print(f"tokens without chunk: {sum(r['tokens_without_chunk'] for r in ep)} of "
          f"{sum(r['output_tokens'] for r in ep)}")
    print(f"exact prompts: {sum(bool(r['prompt_tokens_exact']) for r in ep)} of {len(ep)}; errors: "
          f"{sum(bool(r['errors']) for r in ep)}; in flight = concurrency: "
          f"{sum(r['max_in_flight'] == r['batch'] for r in ep)}; server running max = concurrency: "
          f"{sum(r.get('server_running_max') == r['batch'] for r in ep)}")
    print("KV use max (from " + str(ep[0].get("server_kv_cache_source")) + "): " +
          ", ".join(f"{r['model']} c{r['batch']} {r['ctx']}: {r['server_kv_cache_usage_max']:.2f}" for r in ep
                    if r["ctx"] == 8192))
    print(f"commit {ep[0]['commit']} dirty {ep[0]['dirty']}; server {ep[0]['server_version']}; cpu {ep[0]['cpu']}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("reports/serve"))
