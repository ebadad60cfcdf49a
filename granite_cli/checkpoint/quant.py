"""Weight quantization in the compressed-tensors layout vLLM loads, and its inverse.

- `fp8`:  FP8 E4M3 weights with one float32 scale per output channel (`weight`, `weight_scale`),
          format "float-quantized" (weight-only, W8A16-FP8).
- `int8`: symmetric INT8 weights with one float32 scale per output channel, packed four to an
          int32 as compressed-tensors does for 8 bits (`weight_packed` = (q + 128) bytes,
          `weight_shape`, `weight_scale`), format "pack-quantized" (W8A16, vLLM's WNA16 path).
Expert tensors [E, out, in] get one scale per (expert, output channel): [E, out, 1].

Which tensors: projection and expert matrices only. Never embeddings, lm_head, norms, the router,
conv1d, A_log, D or dt_bias (they are tiny, and quantizing them breaks hybrids); users add more
with --keep-high-precision glob patterns.
"""

from __future__ import annotations

import fnmatch

import torch

from granite_cli.errors import InputError

DEFAULT_KEEP = ("*embed_tokens*", "lm_head*", "*norm*", "*router*", "*mlp.gate.weight", "*conv1d*",
                "*A_log", "*.D", "*dt_bias")
FP8_MAX = 448.0


def quantizable(name: str, shape: tuple[int, ...], keep: tuple[str, ...]) -> bool:
    return (name.endswith(".weight") and len(shape) in (2, 3)
            and not any(fnmatch.fnmatchcase(name, p) for p in DEFAULT_KEEP + tuple(keep)))


def _amax(w: torch.Tensor) -> torch.Tensor:
    return w.abs().amax(dim=-1, keepdim=True).to(torch.float32)


def _per_row(w: torch.Tensor, fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply fn(rows f32) -> (q rows, scale [rows, 1]) over row pieces of w; peak temporaries stay piece-sized."""
    from granite_cli.checkpoint.gguf import row_chunks

    qs, ss = [], []
    for c in row_chunks(w):
        q, s = fn(c.to(torch.float32))
        qs.append(q)
        ss.append(s)
    q = torch.cat(qs).reshape(w.shape[:-1] + qs[0].shape[-1:])
    return q, torch.cat(ss).reshape(*w.shape[:-1], 1)


def _fp8_rows(w: torch.Tensor):
    scale = _amax(w) / FP8_MAX
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def _int8_rows(w: torch.Tensor):
    scale = _amax(w) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(w / scale).clamp(-128, 127).to(torch.int16)
    return (q + 128).to(torch.uint8).view(torch.int32), scale


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 weight, f32 scale [..., 1]) with one scale per output channel."""
    return _per_row(w, _fp8_rows)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight_packed int32 [..., in/4], weight_shape int64, weight_scale f32 [..., 1])."""
    if w.shape[-1] % 4:
        raise InputError(f"int8 packing needs an input width divisible by 4, got {w.shape[-1]}; "
                         "use --quant fp8 or keep this tensor with --keep-high-precision")
    packed, scale = _per_row(w, _int8_rows)
    return packed, torch.tensor(list(w.shape), dtype=torch.int64), scale


def error_bound(w: torch.Tensor, method: str) -> torch.Tensor:
    """Largest |dequantised − original| each element may show (float32, same shape as w)."""
    w = w.to(torch.float32)
    if method == "int8":
        return (_amax(w) / 127 * 0.5001).expand_as(w)
    if method == "fp8":  # half an E4M3 ulp: 2^-4 relative for normals, 2^-10 of the scale for subnormals
        s = _amax(w) / FP8_MAX
        return torch.maximum(w.abs() / 16, s / 1024) * 1.0001 + 1e-30
    if method == "q8_0":
        b = w.reshape(-1, 32)
        d = b.abs().amax(dim=1, keepdim=True) / 127
        return (d * 0.57 + 1e-30).expand_as(b).reshape(w.shape)
    raise AssertionError(method)


def compressed_tensors_config(method: str, ignore: list[str]) -> dict:
    fmt = "float-quantized" if method == "fp8" else "pack-quantized"
    weights = {"num_bits": 8, "type": "float" if method == "fp8" else "int", "symmetric": True,
               "strategy": "channel", "group_size": None, "block_structure": None, "dynamic": False,
               "actorder": None, "observer": "minmax", "observer_kwargs": {}}
    return {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": fmt}},
        "ignore": ignore, "kv_cache_scheme": None, "sparsity_config": {},
    }


def compressed_layout(raw_config: dict) -> str | None:
    """'fp8' / 'int8' / None for a config.json; refuses layouts we cannot read."""
    qc = raw_config.get("quantization_config")
    if not qc:
        return None
    if qc.get("quant_method") != "compressed-tensors":
        raise InputError(f"quantization {qc.get('quant_method')!r} is not supported; granite reads compressed-tensors "
                         "FP8/INT8 weight-only checkpoints and unquantized ones")
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise InputError("compressed-tensors checkpoints with several config groups are not supported")
    w = groups[0].get("weights") or {}
    fmt = qc.get("format") or groups[0].get("format")
    if w.get("num_bits") != 8 or w.get("strategy") not in ("channel", "tensor"):
        raise InputError(f"compressed-tensors {w.get('num_bits')}-bit {w.get('strategy')} weights are not supported "
                         "(only 8-bit, per-channel or per-tensor)")
    if fmt == "float-quantized":
        return "fp8"
    if fmt in ("pack-quantized", "int-quantized", "naive-quantized"):
        return "int8"
    raise InputError(f"compressed-tensors format {fmt!r} is not supported")


def dequantize(get, name: str, have: set[str]) -> torch.Tensor | None:
    """The float32 weight `name` rebuilt from its compressed-tensors pieces, or None if not quantized."""
    base = name[: -len(".weight")]
    if base + ".weight_scale" not in have:
        return None
    scale = get(base + ".weight_scale").to(torch.float32)
    if base + ".weight_packed" in have:
        shape = tuple(int(x) for x in get(base + ".weight_shape").tolist())
        packed = get(base + ".weight_packed").contiguous()
        q = packed.view(torch.uint8).to(torch.int16) - 128
        q = q.reshape(*shape[:-1], -1)[..., : shape[-1]]
        if base + ".weight_zero_point" in have:
            raise InputError(f"{name}: asymmetric (zero-point) INT8 is not supported")
    else:
        q = get(name)
    w = q.to(torch.float32)
    if scale.dim() < w.dim():
        scale = scale.reshape(*scale.shape, *([1] * (w.dim() - scale.dim())))
    return w * scale


QUANT_SUFFIXES = (".weight_scale", ".weight_packed", ".weight_shape", ".weight_zero_point", ".input_scale")
