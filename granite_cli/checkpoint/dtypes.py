"""The one table of dtypes: what each is called by the CLI, by config.json, by safetensors and by
GGUF, and the torch dtype behind it.

`short` is the CLI's and the converter's storage name (fp32 / f32 are both accepted on input),
`hf` config.json's `torch_dtype`, `st` the safetensors header's code, `ggml` the GGUF tensor type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from granite_cli.errors import InputError
from granite_cli.ggml import GGML_BF16, GGML_F16, GGML_F32


@dataclass(frozen=True)
class DType:
    short: str
    torch: torch.dtype
    hf: str | None = None
    st: str | None = None
    ggml: int | None = None
    aliases: tuple[str, ...] = ()


TABLE = (
    DType("f32", torch.float32, "float32", "F32", GGML_F32, ("fp32",)),
    DType("f16", torch.float16, "float16", "F16", GGML_F16, ("fp16",)),
    DType("bf16", torch.bfloat16, "bfloat16", "BF16", GGML_BF16),
    DType("f64", torch.float64, "float64", "F64"),
    DType("fp8", torch.float8_e4m3fn, None, "F8_E4M3"),
    DType("f8_e5m2", torch.float8_e5m2, None, "F8_E5M2"),
    DType("i64", torch.int64, None, "I64"),
    DType("i32", torch.int32, None, "I32"),
    DType("i16", torch.int16, None, "I16"),
    DType("i8", torch.int8, None, "I8"),
    DType("u8", torch.uint8, None, "U8"),
    DType("bool", torch.bool, None, "BOOL"),
)
BY_TORCH = {d.torch: d for d in TABLE}
BY_SHORT = {d.short: d.torch for d in TABLE}
BY_ST = {d.st: d.torch for d in TABLE if d.st}
BY_GGML = {d.ggml: d.torch for d in TABLE if d.ggml is not None}
FLOATS = ("f32", "f16", "bf16")  # what the core computes in

_BY_NAME = {n: d for d in TABLE if d.short in FLOATS for n in (d.short, d.hf, *d.aliases)}


def parse_dtype(d: str | torch.dtype | None, default: str = "float32") -> torch.dtype:
    """A float dtype the core computes in, from any of its names (fp32, f32, float32, bf16, ...)."""
    if isinstance(d, torch.dtype):
        return d
    key = (d or default).lower()
    if key not in _BY_NAME:
        raise InputError(f"unknown dtype {d!r}; use fp32, bf16 or fp16")
    return _BY_NAME[key].torch


def is_float_name(name: str) -> bool:
    """Whether `name` names a float dtype the core computes in (fp8, int8 or q8_0 do not)."""
    return str(name).lower() in _BY_NAME


def hf_name(dt: torch.dtype) -> str:
    """config.json's name for a float dtype (float32, bfloat16, float16)."""
    return BY_TORCH[dt].hf


def short_name(dt: torch.dtype) -> str:
    """The converter's storage name for a float dtype (f32, bf16, f16)."""
    return BY_TORCH[dt].short


def st_code(dt: torch.dtype) -> str:
    """The safetensors header's code for a dtype."""
    return BY_TORCH[dt].st
