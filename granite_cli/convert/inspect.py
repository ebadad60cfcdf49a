"""`granite convert inspect`: what a checkpoint is (architecture, layer pattern, dtypes, sizes, parameters)."""

from __future__ import annotations

import math
from pathlib import Path

from granite_cli.checkpoint.sources import GGUFSource, HFSource, open_source
from granite_cli.config.hf import unknown_keys
from granite_cli.params import count_params


def layer_pattern(types) -> str:
    """Run-length form, e.g. 'M×5 A M×9 A' (M = Mamba-2, A = attention)."""
    out, prev, n = [], None, 0
    for t in list(types) + [None]:
        if t == prev:
            n += 1
            continue
        if prev is not None:
            out.append(("M" if prev == "mamba" else "A") + (f"×{n}" if n > 1 else ""))
        prev, n = t, 1
    return " ".join(out)


def inspect(path: str | Path) -> dict:
    src = open_source(path)
    cfg = src.cfg
    storage = src.storage()
    if isinstance(src, GGUFSource):
        fmt = "gguf"
        arch = src.f.kv.get("general.architecture")
        vocab = src.f.kv.get("tokenizer.ggml.model", "absent")
        quant = "q8_0" if "Q8_0" in storage else None
    else:
        assert isinstance(src, HFSource)
        fmt = "safetensors"
        arch = cfg.architecture
        vocab = "tokenizer.json" if src.tokenizer_dir else "absent"
        quant = src.quant
    files = src.files
    params = count_params(cfg)
    n_tensor_params = sum(math.prod(src.shape(n)) for n in src.names)
    return {
        "path": str(path), "format": fmt, "architecture": arch, "model": cfg.name,
        "layers": cfg.num_hidden_layers, "mamba_layers": len(cfg.mamba_layers),
        "attention_layers": len(cfg.attention_layers), "layer_pattern": layer_pattern(cfg.layer_types),
        "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
        "experts": (f"{cfg.num_local_experts} (top-{cfg.num_experts_per_tok}) + shared" if cfg.num_local_experts
                    else "none"),
        "positions": cfg.position_embedding_type, "torch_dtype": cfg.torch_dtype, "quantization": quant or "none",
        "storage": storage, "tensors": len(src.names), "files": len(files),
        "bytes": sum(Path(f).stat().st_size for f in files),
        "params_total": params.total, "params_active": params.active, "params_in_tensors": n_tensor_params,
        "tokenizer": vocab,
        # config.json keys granite does not read (each also a warning when the config is loaded)
        "config_keys_ignored": ", ".join(k for k, _ in unknown_keys(src.hf_config)) or "none",
    }
