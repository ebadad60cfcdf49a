"""Weights sized from what a checkpoint holds, not from the profile's dtype: the tensor bytes of its
safetensors files (quantized or not, exactly), the tensors of a GGUF (every GGML type, block scales
included), or, where only config.json is at hand (a Hub id), the `quantization_config` it declares
(compressed-tensors FP8/INT8/INT4, FP8, AWQ, GPTQ) applied to the layers such schemes quantize.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from granite_cli.config import ModelConfig
from granite_cli.errors import InputError
from granite_cli.params import count_params


@dataclass
class Weights:
    bytes: float        # the whole model's weights
    source: str         # where the figure comes from
    scheme: str         # what they are stored as


def _safetensors_bytes(folder: Path) -> float | None:
    """The tensor bytes of a folder's safetensors shards (file size less the header, read from its
    first 8 bytes), or None when it has none."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
        if len(head) < 8 or (n := struct.unpack("<Q", head)[0]) > size - 8:
            raise InputError(f"{f}: truncated or corrupt safetensors file; re-download it")
        total += size - 8 - n
    return float(total)


def gguf_bytes(path: Path) -> tuple[float, dict[str, int]]:
    """(tensor bytes, tensors per GGML type name) of a GGUF file, whatever types it holds."""
    from granite_cli.checkpoint.gguf import GGUFFile, type_name

    f = GGUFFile(path, layout_only=True)
    kinds: dict[str, int] = {}
    for t in f.tensors.values():
        kinds[type_name(t.gtype)] = kinds.get(type_name(t.gtype), 0) + 1
    return float(sum(t.nbytes for t in f.tensors.values())), kinds


def _linear_params(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters in the Linear layers a quantization scheme stores quantized, their output rows):
    the attention and Mamba projections and the experts' and MLPs' matrices; embeddings, LM head,
    norms, router, conv and the SSM scalars stay in the model dtype."""
    g = count_params(cfg).groups
    d = cfg.hidden_size
    att = len(cfg.attention_layers) * ((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim * d
                                       + cfg.num_attention_heads * cfg.head_dim * d)
    mam = len(cfg.mamba_layers) * (cfg.in_proj_dim * d + cfg.d_inner * d) if cfg.is_hybrid else 0
    ffn = g["routed_experts"] + g["shared_expert"] + g["dense_mlp"]
    rows = len(cfg.attention_layers) * ((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim + d)
    if cfg.is_hybrid:
        rows += len(cfg.mamba_layers) * (cfg.in_proj_dim + d)
    e = cfg.num_local_experts
    rows += cfg.num_hidden_layers * (e * (2 * cfg.expert_width + d) + (2 * cfg.mlp_width + d if cfg.mlp_width else 0))
    return att + mam + ffn, rows


def _scheme(qc: dict) -> tuple[str, float, float, float]:
    """A quantization_config as (its name, bytes per quantized weight, bytes of scales per output row,
    bytes of scales and zero points per weight from per-group or per-block scales)."""
    method = str(qc.get("quant_method", "")).lower()
    bits, group = qc.get("bits"), qc.get("group_size")
    if method == "compressed-tensors":
        groups = qc.get("config_groups") or {}
        w = next((g.get("weights") for g in groups.values() if isinstance(g, dict) and g.get("weights")), {}) or {}
        bits = w.get("num_bits", 8)
        strategy, group = w.get("strategy", "channel"), w.get("group_size")
        kind = "fp" if w.get("type") == "float" else "int"
        if strategy == "group" and group:
            zero = 0 if w.get("symmetric", True) else bits / 8
            return f"compressed-tensors {kind}{bits} (group {group})", bits / 8, 0.0, (2 + zero) / group
        return f"compressed-tensors {kind}{bits} ({strategy})", bits / 8, 4.0 if strategy == "channel" else 0.0, 0.0
    if method == "fp8":
        blk = qc.get("weight_block_size")
        if blk:
            return f"fp8 (blocks {blk[0]}x{blk[1]})", 1.0, 0.0, 4.0 / (blk[0] * blk[1])
        return "fp8 (per tensor)", 1.0, 0.0, 0.0
    if method in ("awq", "gptq"):
        bits, group = bits or 4, group or 128
        if group == -1:
            group = 0
        zeros = bits / 8  # a packed zero point per group (AWQ always; GPTQ stores qzeros too)
        per_group = (2 + zeros) / group if group else 0.0
        per_row = 0.0 if group else 2 + zeros
        return f"{method} int{bits} (group {group or 'per channel'})", bits / 8, per_row, per_group
    raise InputError(f"quantization_config quant_method {method!r} is not one granite can size; size it with "
                     "--weights, or pass the checkpoint folder (its files are then measured)")


def quantized_bytes(cfg: ModelConfig, qc: dict, model_dtype_bytes: float = 2.0) -> Weights:
    """The weights a config's quantization_config implies."""
    name, per_weight, per_row, per_group = _scheme(qc)
    linear, rows = _linear_params(cfg)
    total = count_params(cfg).total
    q = linear * (per_weight + per_group) + rows * per_row
    return Weights(q + (total - linear) * model_dtype_bytes, "config.json quantization_config", name)


def checkpoint_weights(spec: str, cfg: ModelConfig, hf: dict | None) -> Weights | None:
    """What a model argument's weights take where it says (files or quantization_config), or None
    (then they are sized from the dtype asked for)."""
    p = Path(spec)
    if p.is_file() and p.suffix.lower() == ".gguf":
        total, kinds = gguf_bytes(p)
        return Weights(total, "GGUF tensors", ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())))
    if p.is_dir() and (st := _safetensors_bytes(p)) is not None:
        qc = (hf or {}).get("quantization_config")
        scheme = _scheme(qc)[0] if isinstance(qc, dict) and _known(qc) else str((hf or {}).get("torch_dtype", ""))
        return Weights(st, "safetensors files", scheme or "as stored")
    qc = (hf or {}).get("quantization_config")
    if isinstance(qc, dict):
        return quantized_bytes(cfg, qc)
    return None


def _known(qc: dict) -> bool:
    try:
        _scheme(qc)
        return True
    except InputError:
        return False


def hf_dict(spec: str) -> dict | None:
    """The config.json dict behind a model argument (a folder, a config.json, a Hub id), or None."""
    from granite_cli import hub
    from granite_cli.config import read_json_config

    p = Path(spec)
    path = (p / "config.json") if p.is_dir() else p if p.is_file() and p.suffix.lower() == ".json" else None
    if path is None and hub.parse_id(spec):
        path = hub.snapshot(spec, weights=False) / "config.json"
    if path is None or not path.is_file():
        return None
    d = read_json_config(path)
    return d if isinstance(d, dict) else None

