"""CPU decode of the core beside llama.cpp, side by side: cpu-hybrid and cpu-dense, fp32 and bf16,
batch 1 and 4, at depths 1k, 4k, 8k and 16k.

Same random weights (seed 0) for both tools: our checkpoint in Hugging Face layout for granite, the same
tensors written as a GGUF by `granite convert` for llama.cpp (its server, llama-server, through the
xllamacpp wheel, in the worker's process). One fresh process per (tool, model, dtype[, batch]); the
tools alternate within each round, and the figures are medians over rounds.

    python benchmarks/core_cpu.py --out reports/core-cpu        # the full grid, 2 rounds (66 min on the 2-core VM)
    python benchmarks/core_cpu.py --quick --out /tmp/core-cpu   # 4k only, one round

How each tool's decode is timed, from the same state:
- granite: the cache is filled by a chunked prefill to each depth in turn (1k, then on to 4k, ...);
  batch 4 copies the batch-1 state into four rows. Then `gen` steps with one new token per sequence
  (different tokens per sequence), timed per repetition, through the decode path `granite bench`
  runs by default (bench.steps.native_steps: the CPU decode kernel) and through the eager PyTorch
  steps (granite-eager), alternating. Each repetition starts from the same state (Cache.mark/rewind).
- llama.cpp: one server per batch size with that many slots (2 threads, flash attention on, its own
  defaults otherwise). The prompt is prefilled once into slot 0 and saved (/slots?action=save); each
  repetition restores it into every slot and sends one request per slot, whose prompt is the saved
  one plus one different token, so every slot prefills one token and all decode together. The figure
  is the sum over slots of llama-server's own predicted tokens/s (its timing, without HTTP).
Also measured: what the kernel costs before the first step, built (once per machine) and loaded
(every run), in fresh processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

MODELS = ("cpu-hybrid", "cpu-dense")
# llama-server's flash attention: its default (auto, which turns it on for a CPU) and off, which decodes
# faster at depth on the CPUs measured; a cell's target is the faster of the two
LLAMA_TOOLS = {"auto": "llama.cpp", "disabled": "llama.cpp fa-off"}
DEPTHS = (1024, 4096, 8192, 16384)
GEN = 32


# ---------------------------------------------------------------------------------------------- workers
def granite_worker(a) -> list[dict]:
    """Decode tokens/s of the default path and the eager path, at each depth and batch size."""
    import torch

    torch.set_num_threads(2)
    from granite_cli.bench.steps import eager_steps, native_steps
    from granite_cli.hostmem import retain_freed_memory
    from granite_cli.model.loading import load_model

    retain_freed_memory()  # what `granite bench` runs under
    m = load_model(a.ckpt, weights="checkpoint", dtype=a.dtype)
    depths, batches = sorted(a.depths), sorted(a.batches)
    top = depths[-1] + GEN + 1
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, m.cfg.vocab_size, (1, top), generator=g)
    nxt = torch.randint(0, m.cfg.vocab_size, (max(batches), GEN), generator=g)  # per-sequence decode tokens
    base = m.allocate_cache(1, top)
    wide = {b: m.allocate_cache(b, top) for b in batches if b > 1}
    out, done = [], 0
    with torch.inference_mode():
        for depth in depths:
            for s in range(done, depth, 4096):
                m(ids[:, s : min(depth, s + 4096)], base)
            done = depth
            for b in batches:
                cache = base if b == 1 else wide[b]
                if b > 1:  # the batch-1 state in every row
                    for src, dst in zip(base.layers, cache.layers):
                        if hasattr(dst, "k"):
                            for x, y in ((src.k, dst.k), (src.v, dst.v)):
                                y[:, :, :depth].copy_(x[:, :, :depth].expand_as(y[:, :, :depth]))
                        else:
                            dst.conv.copy_(src.conv.expand_as(dst.conv))
                            dst.ssm.copy_(src.ssm.expand_as(dst.ssm))
                    cache.pos = depth
                mark = cache.mark()
                paths = {"granite": lambda: native_steps(m, cache, nxt[:b], GEN),
                         "granite-eager": lambda: (eager_steps(m, cache, nxt[:b], GEN), "eager", None)}
                order = list(paths) if (depth // 1024 + b) % 2 else list(paths)[::-1]
                res = {}
                for tool in order:
                    t0 = time.perf_counter()
                    step, mode, note = paths[tool]()
                    setup = time.perf_counter() - t0
                    samples = []
                    for r in range(a.warmup + a.reps):
                        cache.rewind(mark)
                        t0 = time.perf_counter()
                        step()
                        if r >= a.warmup:
                            samples.append((time.perf_counter() - t0) / GEN)
                    cache.rewind(mark)
                    res[tool] = {"tool": tool, "model": a.model, "dtype": a.dtype, "batch": b, "depth": depth,
                                 "ms_per_step": statistics.median(samples) * 1e3,
                                 "tokens_per_s": b / statistics.median(samples), "samples_s": samples,
                                 "mode": mode, "note": note, "setup_s": setup}
                out += [res[t] for t in paths]
    return out


def _post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.loads(r.read())


def llama_worker(a) -> list[dict]:
    """llama-server's decode tokens/s with a.batches[0] slots, at each depth, flash attention a.fa."""
    import socket

    import xllamacpp as xlc

    b = a.batches[0]
    depths = sorted(a.depths)
    slots = tempfile.mkdtemp(prefix="granite-llama-slots-")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    p = xlc.CommonParams()
    p.model.path = a.gguf
    p.hostnames = ["127.0.0.1"]
    p.port = port
    p.n_parallel = b
    p.n_ctx = b * (depths[-1] + GEN + 16)
    p.cont_batching = True
    p.flash_attn_type = getattr(xlc.llama_flash_attn_type, "LLAMA_FLASH_ATTN_TYPE_" + a.fa.upper())
    p.cpuparams.n_threads = 2
    p.cpuparams_batch.n_threads = 2
    p.slot_save_path = slots + "/"
    p.cache_ram_mib = 0  # no host-memory prompt cache: every repetition restores the same saved state
    p.verbosity = -1
    t0 = time.perf_counter()
    server = xlc.Server(p)  # noqa: F841 -- serves while referenced
    load_s = time.perf_counter() - t0
    import random

    rnd = random.Random(7)
    toks = [rnd.randrange(1024) for _ in range(depths[-1])]
    extra = [rnd.randrange(1024) for _ in range(b)]
    out = []
    for depth in depths:
        if depth != depths[0]:
            _post(port, "/slots/0?action=restore", {"filename": "state.bin"})  # the prompt so far, then on
        _post(port, "/completion", {"prompt": toks[:depth], "n_predict": 1, "id_slot": 0, "cache_prompt": True,
                                    "temperature": 0})
        _post(port, "/slots/0?action=save", {"filename": "state.bin"})
        samples = []
        for r in range(a.warmup + a.reps):
            for i in range(b):
                _post(port, f"/slots/{i}?action=restore", {"filename": "state.bin"})
            got: list = [None] * b

            def one(i):
                got[i] = _post(port, "/completion", {
                    "prompt": toks[:depth] + [extra[i]], "n_predict": GEN, "id_slot": i, "cache_prompt": True,
                    "temperature": 0, "ignore_eos": True})["timings"]

            threads = [threading.Thread(target=one, args=(i,)) for i in range(b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if any(t["prompt_n"] != 1 or t["predicted_n"] != GEN for t in got):
                raise RuntimeError(f"llama-server did not resume every slot from the saved state: {got}")
            if r >= a.warmup:
                samples.append(sum(t["predicted_per_second"] for t in got))
        tps = statistics.median(samples)
        out.append({"tool": LLAMA_TOOLS[a.fa], "model": a.model, "dtype": a.dtype, "batch": b, "depth": depth,
                    "tokens_per_s": tps, "ms_per_step": b / tps * 1e3, "samples_tok_s": samples,
                    "setup_s": load_s})
    return out


def kernel_cost_worker(a) -> dict:
    """The kernel's cost before the first step in this process: build (if none is cached) and load."""
    import torch  # noqa: F401 - as in bench: torch first (its OpenMP runtime)

    from granite_cli.ops import native

    building = native.will_build()
    t0 = time.perf_counter()
    assert native.load() is not None, native.why()
    return {"built": building, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------- driver
def _run(args: list[str], env: dict | None = None):
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    has = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({os.cpu_count()} CPUs; {' '.join(has) or 'no AVX2'})"


def summarise(results: list[dict], depths: list[int]) -> tuple[list[dict], list[dict]]:
    """(one row per cell with each tool's median over rounds, the targets with their figures)."""
    cells: dict = {}
    for r in results:
        if "tokens_per_s" in r:
            cells.setdefault((r["model"], r["dtype"], r["batch"], r["depth"]), {}).setdefault(r["tool"], []).append(r)
    table = []
    for (model, dtype, b, depth), tools in sorted(cells.items()):
        row = {"model": model, "dtype": dtype, "batch": b, "depth": depth}
        for tool, rs in tools.items():
            row[tool] = statistics.median(x["tokens_per_s"] for x in rs)
        peers = [row[t] for t in LLAMA_TOOLS.values() if row.get(t)]
        if peers:
            row["llama.cpp best"] = max(peers)
            for tool in ("granite", "granite-eager"):
                if row.get(tool):
                    row[f"{tool} / best"] = row[tool] / row["llama.cpp best"]
        table.append(row)
    targets = []
    wins = [r for r in table if "granite / best" in r]
    if wins:
        worst = min(wins, key=lambda r: r["granite / best"])
        targets.append({"target": "default decode >= llama.cpp (its faster setting) in every cell",
                        "figure": f"{sum(r['granite / best'] >= 1 for r in wins)} of {len(wins)} cells; lowest "
                                  f"{worst['granite / best']:.2f}x ({worst['model']} {worst['dtype']} batch "
                                  f"{worst['batch']} depth {worst['depth']})",
                        "met": all(r["granite / best"] >= 1 for r in wins)})

    def tps(model, dtype, b, depth, tool):
        return next((r.get(tool) for r in table if (r["model"], r["dtype"], r["batch"], r["depth"]) ==
                     (model, dtype, b, depth)), None)

    tools = ("granite", "granite-eager", *LLAMA_TOOLS.values())

    def ratios(dtype, b, num: tuple, den: tuple) -> dict:
        """{tool: tokens/s at (model, depth) `num` over tokens/s at `den`}: a ratio of decode times den/num."""
        both = {t: (tps(*num[:1], dtype, b, num[1], t), tps(*den[:1], dtype, b, den[1], t)) for t in tools}
        return {t: x / y for t, (x, y) in both.items() if x and y}

    lo, hi = min(depths), max(depths)
    for dtype in sorted({r["dtype"] for r in table}):
        for b in sorted({r["batch"] for r in table}):
            checks = [(f"cpu-dense decode time growth {lo // 1024}k -> {hi // 1024}k within 15% of llama.cpp's "
                       f"({dtype}, batch {b})", "x", ratios(dtype, b, ("cpu-dense", lo), ("cpu-dense", hi)))]
            if 8192 in depths:
                checks.insert(0, (f"hybrid/dense decode time at 8k within 15% of llama.cpp's ({dtype}, batch {b})",
                                  "", ratios(dtype, b, ("cpu-dense", 8192), ("cpu-hybrid", 8192))))
            for what, unit, got in checks:
                peers = [t for t in LLAMA_TOOLS.values() if t in got]
                if "granite" not in got or not peers or lo == hi:
                    continue
                offs = {t: got["granite"] / got[t] - 1 for t in peers}
                targets.append({"target": what,
                                "figure": ", ".join(f"{t} {v:.2f}{unit}" for t, v in got.items()) + "; granite off by "
                                          + ", ".join(f"{offs[t]:+.0%} ({t})" for t in peers),
                                "met": any(abs(v) <= 0.15 for v in offs.values())})
    return table, targets


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["granite", "llama.cpp", "kernel-cost"])
    ap.add_argument("--model")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--ckpt")
    ap.add_argument("--gguf")
    ap.add_argument("--fa", choices=list(LLAMA_TOOLS), default="auto")
    ap.add_argument("--depths", default=",".join(map(str, DEPTHS)))
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="depth 4k only, one round")
    ap.add_argument("--out", type=Path, default=Path("reports/core-cpu"))
    a = ap.parse_args()
    a.depths = [int(x) for x in str(a.depths).split(",")]
    a.batches = [int(x) for x in str(a.batches).split(",")]
    if a.worker:
        fn = {"granite": granite_worker, "llama.cpp": llama_worker, "kernel-cost": kernel_cost_worker}[a.worker]
        print(json.dumps(fn(a)))
        return
    if a.quick:
        a.depths, a.rounds = [4096], 1

    import torch

    from granite_cli.convert.layout import ConvertOptions
    from granite_cli.convert.run import convert
    from granite_cli.model.loading import load_model, save_checkpoint

    try:
        import xllamacpp  # noqa: F401

        with_llama = True
    except ImportError:
        with_llama = False
        print("xllamacpp is not installed: llama.cpp is left out (pip install xllamacpp)", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="granite-core-cpu-"))
    models, dtypes = a.models.split(","), a.dtypes.split(",")
    for name in models:
        save_checkpoint(load_model(name, dtype="fp32", seed=0), work / name)
        if with_llama:
            for d in dtypes:
                convert(work / name, work / f"{name}-{d}.gguf", ConvertOptions(dtype=d, verify=False))

    def say(msg):
        print(msg, file=sys.stderr, flush=True)

    # the kernel's one-time and per-run cost, in fresh processes with an empty cache folder
    env = dict(os.environ, GRANITE_CACHE_DIR=str(work / "kernel-cache"))
    cost = {"build_and_load": _run(["--worker", "kernel-cost"], env), "load": [_run(["--worker", "kernel-cost"], env)
                                                                               for _ in range(3)]}
    say(f"kernel: first run {cost['build_and_load']}, later runs {cost['load']}")

    meta = {"cpu": cpu_name(), "torch": torch.__version__, "threads": 2, "rounds": a.rounds, "gen": GEN,
            "reps": a.reps, "warmup": a.warmup, "date": time.strftime("%Y-%m-%d %H:%M"),
            "llama.cpp": _llama_version() if with_llama else None, "kernel_cost": cost}
    depths = ",".join(map(str, a.depths))
    common = ["--depths", depths, "--reps", str(a.reps), "--warmup", str(a.warmup)]
    results = []
    for rnd in range(a.rounds):
        for name in models:
            for d in dtypes:
                jobs = [("granite", ["--worker", "granite", "--model", name, "--dtype", d, "--ckpt", str(work / name),
                                     "--batches", ",".join(map(str, a.batches)), *common])]
                if with_llama:
                    jobs += [(LLAMA_TOOLS[fa], ["--worker", "llama.cpp", "--model", name, "--dtype", d, "--gguf",
                                                str(work / f"{name}-{d}.gguf"), "--batches", str(b), "--fa", fa,
                                                *common])
                             for b in a.batches for fa in LLAMA_TOOLS]
                for tool, args in (jobs if rnd % 2 == 0 else jobs[::-1]):
                    t0 = time.perf_counter()
                    got = _run(args)
                    if isinstance(got, dict):
                        say(f"round {rnd} {name} {d} {tool}: {got['error']}")
                        continue
                    for r in got:
                        r["round"] = rnd
                        say(f"round {rnd} {name} {d} b{r['batch']} depth {r['depth']:6d} {r['tool']:13s} "
                            f"{r['tokens_per_s']:8.1f} tok/s ({r.get('mode') or ''})")
                    results += got
                    say(f"  ({time.perf_counter() - t0:.0f} s)")
                    write(a, results, meta)
    write(a, results, meta)
    print((a.out / "results.md").read_text())


def write(a, results: list[dict], meta: dict) -> None:
    """results.json and results.md from the rows so far (rewritten after every worker, so an
    interrupted run keeps what it measured)."""
    table, targets = summarise(results, a.depths)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps({"meta": meta, "table": table, "targets": targets,
                                                    "raw": results}, indent=2) + "\n")
    from granite_cli.render import to_markdown

    def fmt(v):
        return round(v, 2) if isinstance(v, float) else v

    first = meta["kernel_cost"]["build_and_load"]
    later = [x.get("seconds") for x in meta["kernel_cost"]["load"] if "seconds" in x]
    md = [f"# CPU decode: granite's default path beside llama.cpp ({meta['cpu']})", "",
          f"`{json.dumps({k: v for k, v in meta.items() if k != 'kernel_cost'})}`", "",
          f"The kernel before the first step: built and loaded once per machine in {first.get('seconds', 0):.2f} s; "
          f"loaded in {max(later or [0]):.3f} s or less on later runs.", "",
          "Decode tokens/s over all sequences (median over rounds); `granite` is what `granite bench` runs by "
          "default (the CPU decode kernel), `granite-eager` the PyTorch steps.", "",
          to_markdown([{k: fmt(v) for k, v in r.items()} for r in table]), "", "## Targets", "",
          to_markdown([{**t, "met": "yes" if t["met"] else "no"} for t in targets])]
    (a.out / "results.md").write_text("\n".join(md) + "\n")


def _llama_version() -> str | None:
    try:
        from importlib.metadata import version

        return "xllamacpp " + version("xllamacpp")
    except Exception:  # noqa: BLE001 - a label only
        return None


if __name__ == "__main__":
    main()
