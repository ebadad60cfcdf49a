"""Launch settings for the Triton kernels, kept apart from them so they import without Triton:

- dot precision: fp32 operands (ieee for fp32 inputs, tf32 for bf16 on a GPU), or the input's own
  bf16/fp16 operands into the tensor cores with fp32 accumulation;
- tile sizes for the grouped GEMM (the MoE experts), per device and shape: the winners of the
  on-device sweep (`benchmarks/kernels_gpu.py --tune`), kept in moe_tiles.json beside this module
  as {device name: {"rows,n,k,dtype": [BM, BN, BK]}}. A shape the sweep did not measure takes the
  nearest measured one within a factor of two overall, else the defaults.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import torch

TABLE = Path(__file__).with_name("moe_tiles.json")


def dot_precision(t: torch.Tensor) -> str:
    """Triton's input_precision for fp32 operands made from tensors of t's dtype."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def expect_shapes(op: str, **tensors: tuple[torch.Tensor | None, tuple[int, ...]]) -> None:
    """Raise ValueError unless each named tensor has its expected shape (a None tensor is an absent option).
    A kernel indexes raw pointers, so each launcher calls this first: a wrong shape is an error, not a wrong
    answer."""
    for name, (t, want) in tensors.items():
        if t is not None and tuple(t.shape) != tuple(want):
            raise ValueError(f"{op}: {name} has shape {list(t.shape)}, expected {list(want)}")


# The SSD scan's dot operands on a GPU: "fp32" (tf32 tensor cores for bf16 inputs; the default) or "input"
# (rounded to the input's bf16/fp16, as mamba_ssm's kernels do). benchmarks/kernels_gpu.py times both;
# the default changes only with a GPU measurement of speed and error behind it.
SSD_DOTS = os.environ.get("GRANITE_SSD_DOTS", "fp32")


def low_precision_dots(t: torch.Tensor) -> bool:
    """bf16/fp16 operands straight into the dot (fp32 accumulation) on a GPU. Triton's CPU interpreter
    computes bf16 dots wrongly, so there (CI) the same kernel upcasts its operands to fp32 first."""
    return t.is_cuda and t.dtype in (torch.bfloat16, torch.float16)


_P2 = lambda v: 1 << max(0, int(v) - 1).bit_length()  # noqa: E731


def grouped_gemm_tiles(rows: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int]:
    """(BM, BN, BK) for a grouped GEMM: the on-device sweep's winner for the nearest measured shape
    (granite_cli/ops/moe_tiles.json, written by benchmarks/kernels_gpu.py --tune), else the defaults."""
    table = tile_table().get(_device_name(device.index) if device.type == "cuda" else "", {})
    key = min(table, default=None, key=lambda s: _shape_distance(s, rows, n, k, dtype))
    if key is not None and _shape_distance(key, rows, n, k, dtype) < 1.0:
        return tuple(table[key])
    return 16, min(64, max(16, _P2(n))), min(64, max(16, _P2(k)))


def _shape_distance(key: str, rows: int, n: int, k: int, dtype: torch.dtype) -> float:
    """How far a table key `rows,n,k,dtype` is from a shape (log2 units; a dtype mismatch is far)."""
    r0, n0, k0, d0 = key.split(",")
    if d0 != str(dtype).removeprefix("torch."):
        return math.inf
    return sum(abs(math.log2(max(1, a)) - math.log2(max(1, int(b)))) for a, b in ((rows, r0), (n, n0), (k, k0)))


_TILES: dict | None = None


@functools.lru_cache(maxsize=None)
def _device_name(index: int | None) -> str:  # called on every launch, so asked of the driver once
    return torch.cuda.get_device_name(index)


def tile_table() -> dict:
    global _TILES
    if _TILES is None:
        _TILES = json.loads(TABLE.read_text(encoding="utf-8")) if TABLE.is_file() else {}
    return _TILES


def shape_key(rows: int, n: int, k: int, dtype: torch.dtype) -> str:
    return f"{rows},{n},{k},{str(dtype).removeprefix('torch.')}"
