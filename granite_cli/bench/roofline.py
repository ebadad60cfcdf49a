"""How close a case came to the machine: the case's FLOPs and bytes (granite_cli.flops), the rates it
achieved, and their fractions of the device's measured ceilings.

The ceilings are probes run once per sweep on the sweep's device and dtype: the best of a few large
square matmuls (what the projections can reach) and the best of a few large tensor copies (what
streaming weights, cache and state can reach; read plus write). They are what this machine does,
not a vendor's nominal figures.

Work per case:
- prefill: the whole prefill of `batch` prompts of `ctx` tokens in `ubatch`-token pieces;
- decode: one step of `batch` sequences at the mean depth of its timed steps (ctx + gen/2).
Bytes are the floor the case must move (weights, KV, SSM state), not the activations' traffic, so
the achieved GB/s is a lower bound on the real one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from granite_cli.bench.spec import SweepSpec
from granite_cli.config import ModelConfig
from granite_cli.flops import decode_flops_per_token, decode_step_bytes, prefill_bytes, prefill_flops_per_token
from granite_cli.measure import sync
from granite_cli.ops.ssd import chunk_for

# Large enough to reach the library's steady rate, small enough to cost about a second on 2 CPU cores.
MATMUL_N = {"cpu": 2048, "cuda": 8192}
COPY_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}
PROBE_REPS = 5


@dataclass(frozen=True)
class Ceilings:
    """The device's measured matmul rate (GFLOP/s, in the sweep's dtype) and copy bandwidth (GB/s,
    bytes read plus written)."""

    matmul_gflops: float
    copy_gbps: float
    source: str

    def fields(self) -> dict:
        return {"ceiling_gflops": self.matmul_gflops, "ceiling_gbps": self.copy_gbps, "ceiling_source": self.source}


def _best(fn, device: torch.device) -> float:
    fn()
    sync(device)
    best = float("inf")
    for _ in range(PROBE_REPS):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def probe(device: torch.device, dtype: torch.dtype) -> Ceilings:
    """The matmul and copy ceilings of `device` in `dtype` (about a second on a CPU)."""
    n = MATMUL_N.get(device.type, 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    mm = _best(lambda: a @ a, device)
    size = COPY_BYTES.get(device.type, 256 << 20)
    src = torch.ones(size // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    cp = _best(lambda: dst.copy_(src), device)
    return Ceilings(2 * n**3 / mm / 1e9, 2 * size / cp / 1e9,
                    f"probe: best of {PROBE_REPS} {n}x{n} {str(dtype).removeprefix('torch.')} matmuls and "
                    f"{size >> 20} MiB copies")


def work(cfg: ModelConfig, phase: str, batch: int, ctx: int, gen: int | None, ubatch: int | None,
         dtype_bytes: int, device: str = "cpu") -> tuple[float, float]:
    """(FLOPs, bytes) of a case's timed unit: a whole prefill, or one decode step. The KV cache is in
    the model's dtype and the SSM state in fp32, as the core keeps them."""
    if phase == "prefill":
        flops = batch * ctx * prefill_flops_per_token(cfg, ctx, chunk_for(cfg.mamba_chunk_size, device))
        moved = prefill_bytes(cfg, ctx, batch, ubatch, dtype_bytes, dtype_bytes, 4)
    else:
        depth = ctx + (gen or 0) / 2
        flops = batch * decode_flops_per_token(cfg, depth)
        moved = decode_step_bytes(cfg, depth, batch, dtype_bytes, dtype_bytes, 4)
    return flops, moved


def rates(flops: float, moved: float, seconds: float, ceilings: Ceilings | None) -> dict:
    """A row's achieved rates, its arithmetic intensity and its fractions of the ceilings."""
    out = {"work_flops": flops, "work_bytes": moved, "intensity_flop_per_byte": flops / moved if moved else None,
           "achieved_tflops": flops / seconds / 1e12 if seconds > 0 else None,
           "achieved_gbps": moved / seconds / 1e9 if seconds > 0 else None}
    if ceilings is not None:
        out.update(ceilings.fields())
        if out["achieved_tflops"] is not None:
            out["flops_frac"] = out["achieved_tflops"] * 1e3 / ceilings.matmul_gflops
            out["bandwidth_frac"] = out["achieved_gbps"] / ceilings.copy_gbps
    return out


def case_rates(cfg: ModelConfig, spec: SweepSpec, phase: str, batch: int, ctx: int, seconds: float,
               ceilings: Ceilings | None) -> dict:
    """`rates` of one case of the sweep `spec` (its gen, ubatch, dtype and device)."""
    from granite_cli.checkpoint.dtypes import parse_dtype

    flops, moved = work(cfg, phase, batch, ctx, spec.gen, spec.ubatch, parse_dtype(spec.dtype).itemsize,
                        torch.device(spec.device).type)
    return rates(flops, moved, seconds, ceilings)
