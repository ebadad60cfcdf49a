"""HF -> GGUF conversion speed and peak memory: `granite convert` against llama.cpp's
convert_hf_to_gguf.py on the same synthetic checkpoint (random weights at a real shape).

Each conversion runs in its own process under a small wrapper that reports wall time and the
child's peak RSS (getrusage RUSAGE_CHILDREN, so exactly one process tree is measured). Tools
alternate order each round; the medians over rounds are reported. The source is written once
and is in the page cache for every run (both tools read warm).

Usage:
  python benchmarks/convert_gguf.py --llama-cpp DIR [--profile granite-4.0-h-1b] [--rounds 2] [--out reports/convert]
DIR is llama.cpp's source tree (the llama-cpp-python sdist has it under vendor/llama.cpp).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd in a fresh wrapper process; return wall seconds, peak RSS and the exit code."""
    code = ("import json,resource,subprocess,sys,time;t=time.perf_counter();"
            "r=subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL,stderr=subprocess.PIPE,text=True);"
            "w=time.perf_counter()-t;u=resource.getrusage(resource.RUSAGE_CHILDREN);"
            "print(json.dumps({'rc':r.returncode,'wall_s':w,'peak_rss_bytes':u.ru_maxrss*1024,"
            "'cpu_s':u.ru_utime+u.ru_stime,'stderr_tail':r.stderr[-600:]}))")
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, env=env)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", required=True, type=Path, help="llama.cpp source tree (has convert_hf_to_gguf.py)")
    ap.add_argument("--profile", default="granite-4.0-h-1b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/granite-convert-bench"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--outtypes", default="bf16,q8_0")
    ap.add_argument("--out", type=Path, default=Path("reports/convert"))
    a = ap.parse_args()
    conv = a.llama_cpp / "convert_hf_to_gguf.py"
    if not conv.is_file():
        sys.exit(f"error: {conv} not found; pass --llama-cpp pointing at llama.cpp's source tree")
    a.work.mkdir(parents=True, exist_ok=True)
    src = a.work / f"{a.profile}-bf16"
    granite = [sys.executable, "-m", "granite_cli"]
    made = None
    if not (src / "config.json").is_file():
        made = measure(granite + ["convert", "--from-profile", a.profile, str(src), "--dtype", "bf16", "--no-verify"])
        if made["rc"] != 0:
            sys.exit(made["stderr_tail"])
        print(f"synthetic checkpoint: {made['wall_s']:.1f} s, peak RSS {made['peak_rss_bytes'] / 2**20:.0f} MiB",
              file=sys.stderr)
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the converter's own gguf-py, as shipped
    rows = []
    for outtype in a.outtypes.split(","):
        tools = {
            "granite (verify)": lambda d, o=outtype: granite + ["convert", str(src), str(d), "--force"]
            + (["--quant", "q8_0"] if o == "q8_0" else ["--dtype", o]),
            "granite (--no-verify)": lambda d,
            o=outtype: granite + ["convert", str(src), str(d), "--force", "--no-verify"]
            + (["--quant", "q8_0"] if o == "q8_0" else ["--dtype", o]),
            "llama.cpp convert_hf_to_gguf.py": lambda d, o=outtype: [sys.executable, str(conv), str(src), "--outfile",
                                                                     str(d), "--outtype", o],
        }
        names = list(tools)
        for rnd in range(a.rounds):
            for name in names if rnd % 2 == 0 else names[::-1]:
                dst = a.work / f"out-{outtype}-{names.index(name)}.gguf"
                if dst.exists():
                    dst.unlink()
                os.sync()  # start every run with no dirty pages from the previous one
                time.sleep(1)
                r = measure(tools[name](dst), env)
                if r["rc"] != 0:
                    sys.exit(f"{name} failed: {r['stderr_tail']}")
                r.update(tool=name, outtype=outtype, round=rnd, out_bytes=dst.stat().st_size)
                rows.append(r)
                print(f"{outtype:5s} {name:34s} {r['wall_s']:7.1f} s  {r['peak_rss_bytes'] / 2**20:7.0f} MiB",
                      file=sys.stderr)
    summary = []
    for outtype in a.outtypes.split(","):
        sel = [r for r in rows if r["outtype"] == outtype]
        ref = [r for r in sel if r["tool"].startswith("llama.cpp")]
        ref_wall = statistics.median(r["wall_s"] for r in ref)
        ref_rss = statistics.median(r["peak_rss_bytes"] for r in ref)
        for tool in dict.fromkeys(r["tool"] for r in sel):
            rs = [r for r in sel if r["tool"] == tool]
            wall = statistics.median(r["wall_s"] for r in rs)
            rss = statistics.median(r["peak_rss_bytes"] for r in rs)
            summary.append({"outtype": outtype, "tool": tool, "wall_s": round(wall, 2),
                            "peak_rss_mib": round(rss / 2**20),
                            "out_mib": round(rs[0]["out_bytes"] / 2**20),
                "speedup_vs_llama_cpp": round(ref_wall / wall, 2),
                            "rss_vs_llama_cpp": round(rss / ref_rss, 3)})
    res = {"profile": a.profile, "source_bytes": src_bytes, "rounds": a.rounds, "cpus": os.cpu_count(),
           "machine": platform.processor() or platform.machine(), "synthetic_checkpoint": made,
           "summary": summary, "runs": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["| output | tool | wall (s) | peak RSS (MiB) | output (MiB) | speed vs llama.cpp | RSS vs llama.cpp |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for s in summary:
        lines.append(f"| {s['outtype']} | {s['tool']} | {s['wall_s']} | {s['peak_rss_mib']} | {s['out_mib']} | "
                     f"{s['speedup_vs_llama_cpp']}x | {s['rss_vs_llama_cpp']} |")
    (a.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(a.work / "unused", ignore_errors=True)


if __name__ == "__main__":
    main()
