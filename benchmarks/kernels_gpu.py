"""Each Triton kernel against its PyTorch reference on a GPU, at Granite 4.0 shapes: median time,
achieved GB/s and TFLOP/s, and the fraction of the device's *measured* ceilings (a large
device-to-device copy for bandwidth, a large bf16 matmul for compute). Writes kernels.json and
kernels.md into --out. Run by scripts/gpu-check; on a machine without CUDA it says so and exits 2.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: nothing to measure (scripts/gpu-check --dry-run shows the plan)")
    os.environ.setdefault("GRANITE_KERNELS", "triton")
    from granite_cli.ops import triton_ops as T

    ceil = ceilings()
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
    a.out.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(), "ceilings": ceil, "kernels": rows}
    (a.out / "kernels.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"device: {res['device']}; measured copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul "
             f"{ceil['bf16_matmul_TFLOPs']:.0f} TFLOP/s", "",
             "| kernel | triton ms | torch ms | speedup | GB/s | TFLOP/s | of bandwidth | of compute |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['kernel']} | {r['triton_ms']:.3f} | {r['torch_ms']:.3f} | {r['speedup']:.1f}x | {r['GBps']:.0f} | "
              f"{r['TFLOPs']:.1f} | {r['bw_fraction']:.0%} | {r['flop_fraction']:.0%} |" for r in rows]
    (a.out / "kernels.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
