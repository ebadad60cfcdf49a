"""Side-by-side CPU benchmark of the core on the cpu-hybrid shape: granite vs transformers vs llama.cpp.

Same random weights (seed 0) for every tool: our checkpoint in Hugging Face layout for granite and
transformers, and the same tensors written as a granitehybrid GGUF for llama.cpp (when
llama-cpp-python is installed). One fresh process per measurement; the tools alternate within each
round; the figure is the median over rounds. Peak memory: the process RSS high-water mark, reset
just before the timed prefill (/proc/self/clear_refs), minus the RSS at that point.

    python benchmarks/core_cpu.py --out reports/core-cpu            # full run (about 15-20 minutes)
    python benchmarks/core_cpu.py --quick --out /tmp/core-cpu       # a fast look
    python benchmarks/core_cpu.py --host-malloc retain ...          # both torch tools keep freed heap

Tools: granite (the eager core), granite+compile (decode cells only: the steps under torch.compile,
granite_cli.model.compiled; its warmup pass compiles and is reported as "first pass s"),
transformers, llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

PROFILE = "cpu-hybrid"
GEN = 32  # decode tokens timed per repetition


# ---------------------------------------------------------------------------------------------- worker
def _rss():
    from granite_cli.measure import peak_rss_bytes, reset_peak_rss, rss_bytes

    return rss_bytes, peak_rss_bytes, reset_peak_rss


def worker(a) -> dict:
    import torch

    torch.set_num_threads(2)
    if a.host_malloc == "retain" and a.tool != "llama.cpp":
        # the same heap policy for both torch tools (granite_cli.hostmem): a fair, stated environment
        from granite_cli.hostmem import retain_freed_memory

        retain_freed_memory()
    rss_bytes, peak_rss_bytes, reset_peak_rss = _rss()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 1024, (1, a.ctx + GEN), generator=g)
    res = {"tool": a.tool, "phase": a.phase, "ctx": a.ctx, "dtype": a.dtype, "samples_s": []}

    if a.tool in ("granite", "granite+compile"):
        from granite_cli.model.loading import load_model

        m = load_model(a.ckpt, weights="checkpoint", dtype=a.dtype)
        cache = m.allocate_cache(1, a.ctx + GEN)
        fwd = m
        if a.tool == "granite+compile":  # decode steps under torch.compile (granite_cli.model.compiled)
            from granite_cli.model.compiled import compiled_forward

            fwd = compiled_forward(m)

        def prefill():
            cache.reset()
            for s in range(0, a.ctx, a.ubatch):
                out = m(ids[:, s : min(a.ctx, s + a.ubatch)], cache, logits="last")
            return out

        def step(i):
            return fwd(ids[:, a.ctx + i : a.ctx + i + 1], cache, logits="last")

        snapshot, restore = cache.snapshot, cache.restore
    elif a.tool == "transformers":
        import logging

        logging.disable(logging.WARNING)
        from transformers import GraniteMoeHybridForCausalLM

        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
        m = GraniteMoeHybridForCausalLM.from_pretrained(a.ckpt, dtype=dt).eval()
        state = {}

        def prefill():
            o = m(ids[:, : a.ctx], use_cache=True, logits_to_keep=1)
            state["pkv"] = o.past_key_values
            return o.logits

        def step(i):
            o = m(ids[:, a.ctx + i : a.ctx + i + 1], past_key_values=state["pkv"], use_cache=True, logits_to_keep=1)
            state["pkv"] = o.past_key_values
            return o.logits

        snapshot = restore = None
    else:
        from llama_cpp import Llama

        llm = Llama(model_path=a.gguf, n_ctx=a.ctx + GEN + 8, n_batch=512, n_ubatch=512, n_threads=2,
                    n_threads_batch=2, flash_attn=True, verbose=False, logits_all=False)
        toks = ids[0].tolist()

        def prefill():
            llm.reset()
            llm.eval(toks[: a.ctx])

        def step(i):
            llm.eval([toks[a.ctx + i]])

        snapshot, restore = llm.save_state, llm.load_state

    with torch.inference_mode():
        if a.phase == "prefill":
            from granite_cli.hostmem import release_free_memory

            for r in range(a.warmup + a.reps):
                release_free_memory()  # retained free heap must not hide this prefill's growth
                before = rss_bytes()
                reset_peak_rss()
                t0 = time.perf_counter()
                prefill()
                el = time.perf_counter() - t0
                if r >= a.warmup:
                    res["samples_s"].append(el)
                    if "peak_delta_bytes" not in res:
                        res["peak_delta_bytes"] = peak_rss_bytes() - before
            res["tokens_per_s"] = a.ctx / statistics.median(res["samples_s"])
        else:
            prefill()
            snap = snapshot() if snapshot else None
            for r in range(a.warmup + a.reps):
                if r and snap is not None:
                    restore(snap)
                elif r:  # transformers: re-prefill (its cache cannot be restored cheaply)
                    prefill()
                t0 = time.perf_counter()
                for i in range(GEN):
                    step(i)
                el = time.perf_counter() - t0
                if r >= a.warmup:
                    res["samples_s"].append(el / GEN)
                elif r == 0 and a.tool == "granite+compile":
                    res["first_pass_s"] = el  # compilation (the warmup pass; never timed)
            res["tokens_per_s"] = 1 / statistics.median(res["samples_s"])
    return res


# ---------------------------------------------------------------------------------------------- driver
def _run(tool, phase, ctx, dtype, ckpt, gguf_paths, reps, warmup, ubatch, host_malloc):
    cmd = [sys.executable, __file__, "--worker", tool, "--phase", phase, "--ctx", str(ctx), "--dtype", dtype,
           "--ckpt", str(ckpt), "--reps", str(reps), "--warmup", str(warmup), "--ubatch", str(ubatch),
           "--host-malloc", host_malloc]
    if tool == "llama.cpp":
        cmd += ["--gguf", str(gguf_paths[dtype])]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"tool": tool, "phase": phase, "ctx": ctx, "dtype": dtype, "error": p.stderr.strip().splitlines()[-1:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--tool")
    ap.add_argument("--phase", default="prefill")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--ckpt")
    ap.add_argument("--gguf")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--ubatch", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tools", default="granite,granite+compile,transformers,llama.cpp",
                    help="granite+compile runs the decode cells only (torch.compile'd steps)")
    ap.add_argument("--out", type=Path, default=Path("reports/core-cpu"))
    ap.add_argument("--host-malloc", choices=["retain", "system"], default="system",
                    help="heap policy of both torch tools' workers (granite_cli.hostmem): system, the core as a "
                         "library runs; retain, what `granite bench` turns on. llama.cpp keeps its own buffers")
    a = ap.parse_args()
    if a.worker:
        a.tool = a.worker
        print(json.dumps(worker(a)))
        return

    import torch

    from granite_cli.config import load_config
    from granite_cli.flops import decode_bytes_per_token, prefill_flops_per_token
    from granite_cli.model.loading import load_model, save_checkpoint
    from granite_cli.ops.ssd import chunk_for

    tools = a.tools.split(",")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        tools = [t for t in tools if t != "llama.cpp"]
        print("llama-cpp-python is not installed: llama.cpp is left out", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="granite-core-bench-"))
    cfg = load_config(PROFILE)
    m = load_model(PROFILE, dtype="fp32", seed=0)
    save_checkpoint(m, work / "ckpt")
    gguf_paths = {}
    if "llama.cpp" in tools:
        from granite_cli.convert.run import convert

        gguf_paths = {}
        for d in ("fp32", "bf16"):
            gguf_paths[d] = work / f"model-{d}.gguf"
            convert(work / "ckpt", gguf_paths[d], dtype=d, verify=False)
    del m

    cells = [("prefill", 4096, "fp32"), ("prefill", 4096, "bf16"), ("prefill", 16384, "fp32"),
             ("prefill", 32768, "fp32"), ("decode", 4096, "fp32")]
    if a.quick:
        cells = [("prefill", 4096, "fp32"), ("decode", 4096, "fp32")]
    results = []
    for rnd in range(a.rounds):
        for phase, ctx, dtype in cells:
            reps = 3 if ctx <= 4096 else 1
            order = tools if rnd % 2 == 0 else tools[::-1]
            for tool in order:
                if tool == "granite+compile" and phase != "decode":
                    continue
                r = _run(tool, phase, ctx, dtype, work / "ckpt", gguf_paths, reps, 1 if ctx <= 16384 else 0, a.ubatch,
                         a.host_malloc)
                r["round"] = rnd
                results.append(r)
                print(f"round {rnd} {phase:7s} ctx {ctx:6d} {dtype} {tool:12s} "
                      f"{r.get('tokens_per_s', float('nan')):9.1f} tok/s  peak "
                      f"+{(r.get('peak_delta_bytes') or 0) / 2**20:7.0f} MiB"
                      f"  {r.get('error') or ''}", file=sys.stderr, flush=True)

    # medians over rounds
    table = []
    for phase, ctx, dtype in cells:
        row = {"phase": phase, "ctx": ctx, "dtype": dtype}
        for tool in tools:
            rs = [r for r in results if (r["tool"], r["phase"], r["ctx"], r["dtype"]) == (tool, phase, ctx, dtype)
                  and "tokens_per_s" in r]
            row[tool] = statistics.median(r["tokens_per_s"] for r in rs) if rs else None
            if phase == "prefill" and rs:
                row[f"{tool} peak MiB"] = statistics.median(r["peak_delta_bytes"] for r in rs) / 2**20
        g = row.get("granite")
        if g:
            if phase == "prefill":
                per_token = prefill_flops_per_token(cfg, ctx, chunk_for(cfg.mamba_chunk_size, "cpu"))
                row["granite GFLOP/s"] = g * per_token / 1e9
            else:
                row["granite GB/s"] = g * decode_bytes_per_token(cfg, ctx) / 1e9
            for tool in tools:
                if not tool.startswith("granite") and row.get(tool):
                    row[f"x {tool}"] = g / row[tool]
        gc = row.get("granite+compile")
        if gc:
            row["granite+compile GB/s"] = gc * decode_bytes_per_token(cfg, ctx) / 1e9
            for tool in tools:
                if not tool.startswith("granite") and row.get(tool):
                    row[f"compiled x {tool}"] = gc / row[tool]
            fp = [r["first_pass_s"] for r in results if r["tool"] == "granite+compile" and "first_pass_s" in r]
            if fp:
                row["granite+compile first pass s"] = statistics.median(fp)
        table.append(row)
    a.out.mkdir(parents=True, exist_ok=True)
    meta = {"profile": PROFILE, "torch": torch.__version__, "threads": 2, "rounds": a.rounds, "gen": GEN,
            "ubatch": a.ubatch, "date": time.strftime("%Y-%m-%d %H:%M"), "tools": tools, "host_malloc": a.host_malloc}
    (a.out / "results.json").write_text(json.dumps({"meta": meta, "table": table, "raw": results}, indent=2) + "\n")
    from granite_cli.render import to_markdown

    def fmt(v):
        return round(v, 2) if isinstance(v, float) else v

    md = [f"# Core CPU benchmark: {PROFILE}, 2 threads", "", f"`{json.dumps(meta)}`", "",
          "tokens/s (median over rounds); `x tool` = granite / tool; peak = RSS increase during one prefill", "",
          to_markdown([{k: fmt(v) for k, v in r.items()} for r in table])]
    (a.out / "results.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
