"""Each Triton kernel against its PyTorch reference on a GPU, at Granite 4.0 shapes: median time,
achieved GB/s and TFLOP/s, and the fraction of the device's *measured* ceilings (a large
device-to-device copy for bandwidth, a large bf16 matmul for compute). Writes kernels.json and
kernels.md into --out. Run by scripts/gpu-check; on a machine without CUDA it says so and exits 2.

Anchors, on the same inputs in the same process:
- SSD: mamba_ssm's Triton `mamba_chunk_scan_combined` at 4k, 16k and 64k tokens with h-micro (64),
  h-tiny (48) and h-small (128) head counts, loaded without mamba_ssm's package root, which imports a
  CUDA extension that a MAMBA_SKIP_CUDA_BUILD wheel (scripts/build-gpu-wheels) lacks;
- MoE: `torch._grouped_mm` where this torch has it, else a per-expert bf16 `torch.mm` loop.

--tune sweeps the grouped GEMM's tiles on the device at h-tiny's and h-small's expert shapes and
writes the winners to granite_cli/ops/moe_tiles.json (or --tiles-out). --dry-run prints all of it
and runs nothing, anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch


def timed(fn, reps=20, warmup=3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def ceilings() -> dict:
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    tm = timed(lambda: a @ a, reps=10)
    return {"copy_GBps": 2 * n / t / 1e9, "bf16_matmul_TFLOPs": 2 * 8192**3 / tm / 1e12}


def cases():
    from granite_cli.arch import Routing
    from granite_cli.ops import basic

    dev, bf = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s, dt=bf: torch.randn(*s, device=dev, generator=g).to(dt)  # noqa: E731
    # SSD prefill at 16k, h-tiny/h-small-like heads: H 48..128, P 64, N 128, one group
    b, t, h, p, n = 1, 16384, 48, 64, 128
    x, B, C = r(b, t, h, p), r(b, t, 1, n), r(b, t, 1, n)
    dt = torch.rand(b, t, h, device=dev, generator=g) * 0.1
    A, D = -torch.rand(h, device=dev, generator=g) - 0.5, r(h, dt=torch.float32)
    ssd_bytes = (x.numel() + 2 * B.numel()) * 2 + dt.numel() * 4 + b * t * h * p * 4
    ssd_flops = b * t * h * (4 * 256 * (p + n) / 2 + 4 * p * n)  # intra-chunk QxQ work + state terms (§15)
    yield "ssd_chunked 16k", "ssd_chunked", (x, dt, A, B, C, 256, D, None), ssd_bytes, ssd_flops
    # decode state update, batch 8 (in place)
    st = torch.randn(8, 128, 64, 128, device=dev, generator=g)
    yield ("ssd_step b8", "ssd_step",
           (st, r(8, 128, 64), torch.rand(8, 128, device=dev) * 0.1, A[:1].expand(128).contiguous(),
           r(8, 1, 128), r(8, 1, 128), None), 2 * st.numel() * 4, 4 * st.numel())
    xc = r(1, 16384, 3328)
    yield ("causal_conv1d 16k", "causal_conv1d", (xc, r(3328, 1, 4), r(3328), None), 2 * xc.numel() * 2,
           2 * 4 * xc.numel())
    yield ("gated_rms_norm 16k", "gated_rms_norm",
           (r(16384, 3072, dt=torch.float32), r(16384, 3072), r(3072), 1e-5, 3072),
           16384 * 3072 * (4 + 2 + 4), 6 * 16384 * 3072)
    xm = r(4096, 1536)
    wi, wo = r(64, 1024, 1536) * 0.02, r(64, 1536, 512) * 0.02
    wts, ids = basic.route(torch.randn(4096, 64, device=dev, generator=g), 6, Routing.TOPK_SOFTMAX)
    yield ("moe_experts 4k tok", "moe_experts", (xm, wi, wo, wts, ids), (wi.numel() + wo.numel()) * 2,
           2 * 4096 * 6 * (1024 * 1536 + 1536 * 512))
    # decode, batch 8: only the experts hit are read (the kernel skips empty blocks)
    wts8, ids8 = basic.route(torch.randn(8, 64, device=dev, generator=g), 6, Routing.TOPK_SOFTMAX)
    hit = int(torch.unique(ids8).numel())
    yield ("moe_experts decode b8", "moe_experts", (xm[:8].contiguous(), wi, wo, wts8, ids8),
           hit * (wi[0].numel() + wo[0].numel()) * 2, 2 * 8 * 6 * (1024 * 1536 + 1536 * 512))


SSD_ANCHOR = [(t, h) for t in (4096, 16384, 65536) for h in (64, 48, 128)]   # tokens x (h-micro, h-tiny, h-small) heads
# (label, tokens routed, experts, expert width, hidden, top-k): h-tiny and h-small expert shapes, prefill and decode
MOE_SHAPES = [("h-tiny 4k", 4096, 64, 512, 1536, 6), ("h-tiny decode b8", 8, 64, 512, 1536, 6),
              ("h-small 4k", 4096, 72, 768, 4096, 10), ("h-small decode b8", 8, 72, 768, 4096, 10)]
TILE_GRID = [(bm, bn, bk) for bm in (16, 32, 64, 128) for bn in (32, 64, 128) for bk in (32, 64, 128)]


def load_mamba_ssd():
    """mamba_ssm's mamba_chunk_scan_combined, or None with the reason. The package root is replaced by
    an empty module with the same search path, so only the Triton files (and einops) are imported."""
    import importlib.util
    import types

    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        return None, "mamba_ssm is not installed (scripts/build-gpu-wheels builds its wheel into .whl/)"
    if "mamba_ssm" not in sys.modules:
        root = types.ModuleType("mamba_ssm")
        root.__path__ = list(spec.submodule_search_locations)
        sys.modules["mamba_ssm"] = root
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:  # noqa: BLE001 -- a missing dependency (einops) is a reason, not a crash
        return None, f"mamba_ssm's Triton SSD did not import: {type(e).__name__}: {e}"
    return mamba_chunk_scan_combined, None


def moe_anchor():
    """(name, fn(x_sorted, w, counts) -> out) for the grouped GEMM anchor."""
    if hasattr(torch, "_grouped_mm"):
        def grouped(xs, w, offs):
            return torch._grouped_mm(xs, w.transpose(1, 2), offs=offs)
        return "torch._grouped_mm", grouped

    return "per-expert torch.mm", _mm_loop


def _mm_loop(xs, w, offs):
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        out.append(xs[start:end] @ w[e].T)
        start = end
    return torch.cat(out)


def plan() -> str:
    from granite_cli.ops import OPS

    lines = ["kernels_gpu plan:", "  ceilings: 1 GiB device copy, 8192^3 bf16 matmul",
             "  each kernel against its torch reference: " + ", ".join(OPS),
             "  SSD, ours with fp32 and with bf16 dot operands (and the latter's error), against mamba_ssm "
             "mamba_chunk_scan_combined; bf16, chunk 256, head dim 64, state 128, 1 group: "
             + ", ".join(f"{t // 1024}k x {h} heads" for t, h in SSD_ANCHOR),
             f"  MoE anchor ({moe_anchor()[0]} here): " + ", ".join(m[0] for m in MOE_SHAPES),
             f"  --tune: {len(TILE_GRID)} (BM, BN, BK) tilings x {len(MOE_SHAPES)} shapes x 2 projections, "
             "winners to granite_cli/ops/moe_tiles.json"]
    fn, why = load_mamba_ssd()
    lines.append("  mamba_ssm here: " + ("importable" if fn else why))
    return "\n".join(lines)


def ssd_anchor_rows(T, launch, ceil) -> list[dict]:
    fn, why = load_mamba_ssd()
    rows = []
    g = torch.Generator(device="cuda").manual_seed(1)
    for t, h in SSD_ANCHOR:
        x = torch.randn(1, t, h, 64, device="cuda", generator=g).bfloat16()
        B, C = (torch.randn(1, t, 1, 128, device="cuda", generator=g).bfloat16() for _ in range(2))
        dt = torch.rand(1, t, h, device="cuda", generator=g) * 0.1
        A = -torch.rand(h, device="cuda", generator=g) - 0.5
        ours = timed(lambda: T.ssd_chunked(x, dt, A, B, C, 256), reps=10)
        launch.SSD_DOTS = "input"  # the variant with bf16 operands in the dots, and its error against fp64
        try:
            ours_bf16 = timed(lambda: T.ssd_chunked(x, dt, A, B, C, 256), reps=10)
            y16 = T.ssd_chunked(x, dt, A, B, C, 256)[0] if t <= 16384 else None
        finally:
            launch.SSD_DOTS = "fp32"
        err = None
        if y16 is not None:
            ref = T.ssd_chunked_ref(x.double(), dt.double(), A.double(), B.double(), C.double(), 256)[0]
            err = float((y16.double() - ref).abs().max() / ref.abs().max())
        theirs = timed(lambda: fn(x, dt, A, B, C, 256), reps=10) if fn else None
        ht = t * h / 1e9
        rows.append({"shape": f"{t // 1024}k x {h} heads", "ours_ms": ours * 1e3, "ours_Ghead_tok_s": ht / ours,
                     "ours_bf16_dots_ms": ours_bf16 * 1e3, "bf16_dots_rel_err": err,
                     "mamba_ssm_ms": theirs and theirs * 1e3, "mamba_ssm_Ghead_tok_s": theirs and ht / theirs,
                     "ours_vs_mamba_ssm": theirs and theirs / ours, "note": why})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _moe_inputs(tokens, e, w_, d, k, g):
    from granite_cli.arch import Routing
    from granite_cli.ops import basic

    x = torch.randn(tokens, d, device="cuda", generator=g).bfloat16()
    w_in = (torch.randn(e, 2 * w_, d, device="cuda", generator=g) * 0.02).bfloat16()
    wts, ids = basic.route(torch.randn(tokens, e, device="cuda", generator=g), k, Routing.TOPK_SOFTMAX)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=e)
    offsets = torch.zeros(e + 1, dtype=torch.int32, device="cuda")
    offsets[1:] = torch.cumsum(counts, 0)
    return x, w_in, (order // k).to(torch.int32), offsets, int(counts.max())


def moe_anchor_rows(T, ceil) -> list[dict]:
    name, anchor = moe_anchor()
    g = torch.Generator(device="cuda").manual_seed(2)
    rows = []
    for label, tokens, e, w_, d, k in MOE_SHAPES:
        x, w_in, src, offsets, max_rows = _moe_inputs(tokens, e, w_, d, k, g)
        xs = x[src.long()].contiguous()
        ours = timed(lambda: T.grouped_gemm(x, src, w_in, offsets, max_rows), reps=10)
        try:
            theirs = timed(lambda: anchor(xs, w_in, offsets[1:]), reps=10)
        except RuntimeError as e:  # torch._grouped_mm refuses some shapes or devices: the loop then
            print(f"{name} failed ({str(e).splitlines()[0][:120]}); per-expert torch.mm instead", flush=True)
            name, anchor = "per-expert torch.mm", _mm_loop
            theirs = timed(lambda: anchor(xs, w_in, offsets[1:]), reps=10)
        flops = 2 * src.numel() * 2 * w_ * d
        rows.append({"shape": f"{label} (input projection)", "ours_ms": ours * 1e3, "anchor": name,
                     "anchor_ms": theirs * 1e3, "ours_TFLOPs": flops / ours / 1e12,
                     "flop_fraction": flops / ours / 1e12 / ceil["bf16_matmul_TFLOPs"],
                     "ours_vs_anchor": theirs / ours})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def tune(T, out: Path) -> dict:
    """The fastest valid tiling per shape and projection on this device, merged into the table at `out`."""
    from granite_cli.ops.launch import shape_key

    g = torch.Generator(device="cuda").manual_seed(3)
    dev = torch.cuda.get_device_name()
    table = json.loads(out.read_text()) if out.is_file() else {}
    mine = table.setdefault(dev, {})
    for label, tokens, e, w_, d, k in MOE_SHAPES:
        x, w_in, src, offsets, max_rows = _moe_inputs(tokens, e, w_, d, k, g)
        w_out = (torch.randn(e, d, w_, device="cuda", generator=g) * 0.02).bfloat16()
        m = torch.randn(src.numel(), w_, device="cuda", generator=g).bfloat16()
        seq = torch.arange(src.numel(), dtype=torch.int32, device="cuda")
        for a, rows, w in ((x, src, w_in), (m, seq, w_out)):
            best = None
            ref = T.grouped_gemm(a, rows, w, offsets, max_rows, tiles=(16, 64, 64))
            for tiles in TILE_GRID:
                try:
                    got = T.grouped_gemm(a, rows, w, offsets, max_rows, tiles=tiles)
                    if not torch.allclose(got.float(), ref.float(), rtol=2e-2, atol=2e-2):
                        continue
                    t = timed(lambda: T.grouped_gemm(a, rows, w, offsets, max_rows, tiles=tiles), reps=10)
                except Exception:  # noqa: BLE001 -- a tiling that does not compile or fit is skipped
                    continue
                if best is None or t < best[0]:
                    best = (t, tiles)
            if best:
                mine[shape_key(rows.numel(), w.shape[1], w.shape[2], a.dtype)] = list(best[1])
                print(json.dumps({"shape": label, "n": w.shape[1], "k": w.shape[2], "tiles": best[1],
                                  "ms": best[0] * 1e3}), flush=True)
    out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return mine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="print the plan and measure nothing")
    ap.add_argument("--tune", action="store_true", help="sweep the MoE grouped GEMM's tiles and write the winners")
    ap.add_argument("--tiles-out", type=Path, default=Path(__file__).resolve().parents[1] / "granite_cli" / "ops" /
                    "moe_tiles.json")
    a = ap.parse_args()
    if a.dry_run:
        print(plan())
        return
    if a.out is None:
        sys.exit("--out DIR is needed (or --dry-run)")
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: nothing to measure (scripts/gpu-check --dry-run shows the plan)")
    os.environ.setdefault("GRANITE_KERNELS", "triton")
    from granite_cli.ops import launch
    from granite_cli.ops import triton_ops as T

    ceil = ceilings()
    if a.tune:
        tuned = tune(T, a.tiles_out)
        (a.out / "moe_tiles.json").write_text(json.dumps(tuned, indent=1) + "\n")
        return
    rows = []
    for label, op, args, nbytes, flops in cases():
        # (ssd_step updates its state in place on every call; the values stay bounded, which is all timing needs)
        tk = timed(lambda: getattr(T, op)(*args))
        tr = timed(lambda: getattr(T, op + "_ref")(*args), reps=5)
        rows.append({"kernel": label, "triton_ms": tk * 1e3, "torch_ms": tr * 1e3, "speedup": tr / tk,
                     "GBps": nbytes / tk / 1e9, "TFLOPs": flops / tk / 1e12,
                     "bw_fraction": nbytes / tk / 1e9 / ceil["copy_GBps"],
                     "flop_fraction": flops / tk / 1e12 / ceil["bf16_matmul_TFLOPs"]})
        print(json.dumps(rows[-1]), flush=True)
    ssd_rows, moe_rows = ssd_anchor_rows(T, launch, ceil), moe_anchor_rows(T, ceil)
    a.out.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(), "ceilings": ceil, "kernels": rows, "ssd_anchor": ssd_rows,
           "moe_anchor": moe_rows}
    (a.out / "kernels.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"device: {res['device']}; measured copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul "
             f"{ceil['bf16_matmul_TFLOPs']:.0f} TFLOP/s", "",
             "| kernel | triton ms | torch ms | speedup | GB/s | TFLOP/s | of bandwidth | of compute |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['kernel']} | {r['triton_ms']:.3f} | {r['torch_ms']:.3f} | {r['speedup']:.1f}x | {r['GBps']:.0f} | "
              f"{r['TFLOPs']:.1f} | {r['bw_fraction']:.0%} | {r['flop_fraction']:.0%} |" for r in rows]
    lines += ["", "SSD against mamba_ssm's Triton mamba_chunk_scan_combined (same inputs, bf16, chunk 256); "
              "ours with fp32 dot operands (the default) and with bf16 ones (GRANITE_SSD_DOTS=input, max error "
              "relative to the largest output, against float64):", "",
              "| shape | ours ms | G head-tok/s | bf16 dots ms | its error | mamba_ssm ms | G head-tok/s | "
              "ours / mamba_ssm speed |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines += [f"| {r['shape']} | {r['ours_ms']:.3f} | {r['ours_Ghead_tok_s']:.2f} | {r['ours_bf16_dots_ms']:.3f} | "
              f"{f(r['bf16_dots_rel_err'], '.1e')} | {f(r['mamba_ssm_ms'], '.3f')} | "
              f"{f(r['mamba_ssm_Ghead_tok_s'], '.2f')} | {f(r['ours_vs_mamba_ssm'], '.2f')} |" for r in ssd_rows]
    lines += ["", f"MoE grouped GEMM against {moe_rows[0]['anchor'] if moe_rows else '-'} (bf16):", "",
              "| shape | ours ms | anchor ms | TFLOP/s | of compute | ours / anchor speed |",
              "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['shape']} | {r['ours_ms']:.3f} | {r['anchor_ms']:.3f} | {r['ours_TFLOPs']:.1f} | "
              f"{r['flop_fraction']:.0%} | {r['ours_vs_anchor']:.2f} |" for r in moe_rows]
    (a.out / "kernels.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
