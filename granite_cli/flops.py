"""FLOP and byte counts per token, for achieved-rate figures.

One multiply-accumulate = 2 FLOPs. Prefill counts the average causal context (ctx/2) for the
attention core, the chunked SSD at its full Q² intra-chunk cost, and the lm_head for the last token
only (as llama.cpp and `granite bench` compute it).
"""

from __future__ import annotations

from granite_cli.config import ModelConfig
from granite_cli.params import attention_mixer_params, count_params, ffn_params, mamba_mixer_params


def _ffn_active(cfg: ModelConfig) -> int:
    f = ffn_params(cfg)
    routed = f["routed_experts"] * cfg.num_experts_per_tok // max(1, cfg.num_local_experts)
    return f["router"] + routed + f["shared_expert"] + f["dense_mlp"]


def ssd_flops_per_token(cfg: ModelConfig, chunk: int | None = None) -> float:
    """At the config's chunk length, or at `chunk` (what a CPU run executes: ops.ssd.chunk_for)."""
    if not cfg.is_hybrid:
        return 0.0
    h, p, n, g = cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_d_state, cfg.mamba_n_groups
    q = chunk or cfg.mamba_chunk_size
    return h * (2 * q * p + 4 * n * p) + g * 2 * q * n + 2 * cfg.mamba_d_conv * cfg.conv_dim


def prefill_flops_per_token(cfg: ModelConfig, ctx: int, chunk: int | None = None) -> float:
    n_att, n_mam = len(cfg.attention_layers), len(cfg.mamba_layers)
    proj = (n_att * attention_mixer_params(cfg) + n_mam * mamba_mixer_params(cfg)
            + cfg.num_hidden_layers * _ffn_active(cfg))
    core = n_att * 2 * ctx * cfg.num_attention_heads * cfg.head_dim  # QKᵀ and PV at average context ctx/2
    return 2 * proj + core + n_mam * ssd_flops_per_token(cfg, chunk) + 2 * cfg.hidden_size * cfg.vocab_size / ctx


def decode_bytes_per_token(cfg: ModelConfig, depth: int, weight_bytes: int = 4, kv_bytes: int = 4,
                           state_bytes: int = 4) -> float:
    """Bytes a batch-1 decode step reads: active weights (and the lm_head), KV at `depth`, the SSM state
    read and written."""
    p = count_params(cfg)
    active = p.active - p.groups["embedding"] + cfg.vocab_size * cfg.hidden_size  # the (tied) head is read
    kv = len(cfg.attention_layers) * 2 * cfg.num_key_value_heads * cfg.head_dim * depth * kv_bytes
    state = len(cfg.mamba_layers) * 2 * cfg.mamba_n_heads * cfg.mamba_d_head * cfg.mamba_d_state * state_bytes
    return active * weight_bytes + kv + state
