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


def decode_flops_per_token(cfg: ModelConfig, depth: int) -> float:
    """One decode step for one sequence at cache depth `depth`: every projection at its active width,
    the attention core over `depth` keys (QKᵀ and PV), the SSM state update and read-out (≈5·H·P·N)
    and the depthwise conv, and the lm_head (every step makes its logits)."""
    n_att, n_mam = len(cfg.attention_layers), len(cfg.mamba_layers)
    proj = (n_att * attention_mixer_params(cfg) + n_mam * mamba_mixer_params(cfg)
            + cfg.num_hidden_layers * _ffn_active(cfg))
    core = n_att * 4 * depth * cfg.num_attention_heads * cfg.head_dim
    ssm = 0.0
    if cfg.is_hybrid:
        state = cfg.mamba_n_heads * cfg.mamba_d_head * cfg.mamba_d_state
        ssm = n_mam * (5 * state + 2 * cfg.mamba_d_conv * cfg.conv_dim)
    return 2 * proj + core + ssm + 2 * cfg.hidden_size * cfg.vocab_size


def weights_read(cfg: ModelConfig, tokens: int) -> float:
    """Parameters one forward over `tokens` tokens must read: every dense weight and the head (the
    tied embedding counts once, as the head; the lookup reads a few rows), and of each layer's routed
    experts the expected number of distinct ones that `tokens` independent top-k draws pick,
    E·(1 − (1 − k/E)^tokens)."""
    p = count_params(cfg)
    head = cfg.vocab_size * cfg.hidden_size
    dense = p.total - p.groups["embedding"] - p.groups["head"] - p.groups["routed_experts"] + head
    routed = p.groups["routed_experts"]
    if routed:
        e, k = cfg.num_local_experts, cfg.num_experts_per_tok
        routed *= 1 - (1 - k / e) ** max(1, tokens)
    return dense + routed


def _kv_per_token(cfg: ModelConfig) -> int:
    return len(cfg.attention_layers) * 2 * cfg.num_key_value_heads * cfg.head_dim


def _state_per_sequence(cfg: ModelConfig) -> int:
    if not cfg.is_hybrid:
        return 0
    return len(cfg.mamba_layers) * cfg.mamba_n_heads * cfg.mamba_d_head * cfg.mamba_d_state


def decode_step_bytes(cfg: ModelConfig, depth: int, batch: int = 1, weight_bytes: int = 4, kv_bytes: int = 4,
                      state_bytes: int = 4) -> float:
    """Bytes one decode step of `batch` sequences must move at least: the weights it reads (shared by
    the batch), each sequence's KV at `depth`, and each sequence's SSM state read and written."""
    return (weights_read(cfg, batch) * weight_bytes + batch * _kv_per_token(cfg) * depth * kv_bytes
            + batch * 2 * _state_per_sequence(cfg) * state_bytes)


def prefill_bytes(cfg: ModelConfig, ctx: int, batch: int = 1, ubatch: int | None = None, weight_bytes: int = 4,
                  kv_bytes: int = 4, state_bytes: int = 4) -> float:
    """Bytes a prefill of `batch` prompts of `ctx` tokens in `ubatch`-token pieces must move at least:
    the weights once per piece, the KV written once and read by every later piece's attention (each
    piece reads the keys before it and its own), and the SSM state read and written per piece."""
    u = min(ubatch or ctx, ctx)
    ends = list(range(u, ctx, u)) + [ctx]
    pieces = len(ends)
    weights = sum(weights_read(cfg, batch * (end - start)) for start, end in zip([0] + ends, ends))
    kv = batch * _kv_per_token(cfg) * (ctx + sum(ends)) * kv_bytes
    state = batch * 2 * _state_per_sequence(cfg) * pieces * state_bytes
    return weights * weight_bytes + kv + state
