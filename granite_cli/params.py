"""Exact parameter accounting from a ModelConfig (no torch needed).

Groups: embedding, head (untied lm_head only), attention, mamba, router, routed_experts,
shared_expert (the MLP beside routed experts), dense_mlp (the MLP of a model without routed
experts), norms. The groups add up to the parameter count of the built model; tests check that
against `sum(p.numel())` of transformers' own model and of ours.
"""

from __future__ import annotations

from dataclasses import dataclass

from granite_cli.config import ModelConfig


def attention_mixer_params(cfg: ModelConfig) -> int:
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    n = cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size
    if cfg.attention_bias:
        n += q + 2 * kv + cfg.hidden_size
    if cfg.qk_norm:
        n += 2 * cfg.head_dim
    return n


def mamba_mixer_params(cfg: ModelConfig) -> int:
    if not cfg.is_hybrid:
        return 0
    d, h = cfg.hidden_size, cfg.mamba_n_heads
    n = d * cfg.in_proj_dim + (cfg.in_proj_dim if cfg.mamba_proj_bias else 0)
    n += cfg.conv_dim * cfg.mamba_d_conv + (cfg.conv_dim if cfg.mamba_conv_bias else 0)
    n += 3 * h  # dt_bias, A_log, D
    n += cfg.d_inner  # gated norm weight
    n += cfg.d_inner * d + (d if cfg.mamba_proj_bias else 0)
    return n


def ffn_params(cfg: ModelConfig) -> dict[str, int]:
    """Per-layer feed-forward parameters by group."""
    d = cfg.hidden_size
    out = {"router": 0, "routed_experts": 0, "shared_expert": 0, "dense_mlp": 0}
    if cfg.num_local_experts:
        out["router"] = cfg.num_local_experts * d
        out["routed_experts"] = cfg.num_local_experts * 3 * cfg.expert_width * d
        out["shared_expert"] = 3 * cfg.mlp_width * d
    else:
        out["dense_mlp"] = 3 * cfg.mlp_width * d
    return out


@dataclass(frozen=True)
class ParamCount:
    groups: dict[str, int]
    by_layer_type: dict[str, int]  # mixer + FFN + norms of the layers of each type
    total: int
    active: int  # per token: routed experts counted at top-k / E

    def as_dict(self) -> dict:
        return {"total": self.total, "active": self.active, "groups": dict(self.groups),
                "by_layer_type": dict(self.by_layer_type)}


def count_params(cfg: ModelConfig) -> ParamCount:
    d, v = cfg.hidden_size, cfg.vocab_size
    n_att, n_mam = len(cfg.attention_layers), len(cfg.mamba_layers)
    layers = cfg.num_hidden_layers
    ffn = ffn_params(cfg)
    ffn_layer = sum(ffn.values())
    groups = {
        "embedding": v * d,
        "head": 0 if cfg.tie_word_embeddings else v * d,
        "attention": n_att * attention_mixer_params(cfg),
        "mamba": n_mam * mamba_mixer_params(cfg),
        "router": layers * ffn["router"],
        "routed_experts": layers * ffn["routed_experts"],
        "shared_expert": layers * ffn["shared_expert"],
        "dense_mlp": layers * ffn["dense_mlp"],
        "norms": layers * 2 * d + d,
    }
    total = sum(groups.values())
    inactive = 0
    if cfg.num_local_experts:
        inactive = groups["routed_experts"] * (cfg.num_local_experts - cfg.num_experts_per_tok) // cfg.num_local_experts
    by_type = {
        "attention": n_att * (attention_mixer_params(cfg) + ffn_layer + 2 * d),
        "mamba": n_mam * (mamba_mixer_params(cfg) + ffn_layer + 2 * d),
    }
    return ParamCount(groups=groups, by_layer_type=by_type, total=total, active=total - inactive)


def human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)
