"""Profile summaries for `granite profiles list/show` (plain data; no rendering)."""

from __future__ import annotations

import dataclasses

from granite_cli.config import load_config, profile_names
from granite_cli.params import count_params


def kind(cfg) -> str:
    """hybrid (Mamba-2 and attention), moe (a Transformer with routed experts) or dense; a hybrid with
    routed experts is "hybrid moe"."""
    moe = " moe" if cfg.num_local_experts else ""
    return "hybrid" + moe if cfg.is_hybrid else ("moe" if moe else "dense")


def profile_row(spec: str) -> dict:
    cfg = load_config(spec)
    p = count_params(cfg)
    return {
        "name": cfg.name,
        "kind": kind(cfg),
        "architecture": cfg.architecture,
        "layers": cfg.num_hidden_layers,
        "attention_layers": len(cfg.attention_layers),
        "mamba_layers": len(cfg.mamba_layers),
        "experts": f"{cfg.num_local_experts}/top-{cfg.num_experts_per_tok}" if cfg.num_local_experts else "-",
        "params_total": p.total,
        "params_active": p.active,
        "context": cfg.max_position_embeddings,
        "description": cfg.description,
    }


def profile_rows() -> list[dict]:
    return [profile_row(n) for n in profile_names()]


def profile_detail(spec: str) -> dict:
    cfg = load_config(spec)
    conf = dataclasses.asdict(cfg)
    conf["layer_types"] = list(cfg.layer_types)
    conf["rope_scaling"] = cfg.rope_scaling_dict
    conf["time_step_limit"] = list(cfg.time_step_limit)
    conf["attention_layer_indices"] = list(cfg.attention_layers)
    return {"config": conf, "params": count_params(cfg).as_dict()}
