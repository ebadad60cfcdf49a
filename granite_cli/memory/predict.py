"""Predicted memory from a ModelConfig alone (no torch): weights, KV cache, Mamba state, activations.

- Weights by group, in any storage format: bf16/fp16 (2 B), fp32 (4 B), fp8/int8 (1 B + one fp32
  scale per output row), GGUF q8_0 (34 B per 32 weights) and q4_0 (18 B per 32); the tensors
  llama.cpp and our converter keep in F32 (norms, router, conv, SSM scalars) are counted as F32 in
  the GGUF formats. Routed-expert, shared-expert and dense bytes; total and active.
- KV cache: attention layers only (2 · kv_heads · head_dim · ctx · batch · kv bytes per layer).
- Mamba state per sequence, constant in context: conv [conv_dim, d_conv − 1] in the KV/model dtype,
  SSM [heads, head_dim, d_state] in the state dtype (fp32 by default, as llama.cpp keeps it).
- Activations: the working set of the core's prefill of `ubatch` tokens (chunked prefill) and of
  a decode step, from the tensors its forward keeps alive at its peak layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from granite_cli.config import ModelConfig
from granite_cli.errors import InputError
from granite_cli.ggml import bytes_per_value
from granite_cli.params import count_params

BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "q8_0": bytes_per_value("q8_0"),
         "q4_0": bytes_per_value("q4_0")}
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "f32": "fp32", "f16": "fp16", "8bit": "int8"}


def norm_dtype(d: str) -> str:
    k = ALIASES.get(d.lower(), d.lower())
    if k not in BYTES:
        raise InputError(f"unknown dtype {d!r}; use one of {', '.join(BYTES)}")
    return k


def _mamba_f32_params(cfg: ModelConfig) -> int:
    """Mamba parameters llama.cpp keeps in F32 whatever the file type: conv, SSM scalars, gated norm."""
    if not cfg.is_hybrid:
        return 0
    per = (cfg.conv_dim * cfg.mamba_d_conv + (cfg.conv_dim if cfg.mamba_conv_bias else 0) + 3 * cfg.mamba_n_heads
           + cfg.d_inner)
    return len(cfg.mamba_layers) * per


def _row_count(cfg: ModelConfig) -> int:
    """Output rows of the 2-D weight matrices (one scale each in per-channel fp8/int8)."""
    d = cfg.hidden_size
    rows = cfg.vocab_size * (1 if cfg.tie_word_embeddings else 2)
    att = cfg.num_attention_heads * cfg.head_dim + 2 * cfg.num_key_value_heads * cfg.head_dim + d
    rows += len(cfg.attention_layers) * att
    if cfg.is_hybrid:
        rows += len(cfg.mamba_layers) * (cfg.in_proj_dim + d)
    e = cfg.num_local_experts
    rows += cfg.num_hidden_layers * (e * (2 * cfg.expert_width + d) + (2 * cfg.mlp_width + d if cfg.mlp_width else 0))
    return rows


def weight_bytes(cfg: ModelConfig, dtype: str = "bf16") -> dict[str, float]:
    """Bytes by parameter group in `dtype`, plus total and active (routed experts at top-k)."""
    dtype = norm_dtype(dtype)
    p = count_params(cfg)
    per = BYTES[dtype]
    out = {g: n * per for g, n in p.groups.items()}
    if dtype in ("q8_0", "q4_0"):
        # GGUF keeps norms, the router, and the Mamba conv / SSM scalars / gated norm in F32
        out["norms"] = p.groups["norms"] * 4.0
        out["router"] = p.groups["router"] * 4.0
        out["mamba"] += _mamba_f32_params(cfg) * (4.0 - per)
        if cfg.qk_norm:
            out["attention"] += len(cfg.attention_layers) * 2 * cfg.head_dim * (4.0 - per)
    if dtype in ("fp8", "int8"):
        out["scales"] = _row_count(cfg) * 4.0
    total = sum(out.values())
    inactive = out["routed_experts"] * (cfg.num_local_experts - cfg.num_experts_per_tok) / max(1, cfg.num_local_experts)
    out["total"] = total
    out["active"] = total - inactive
    return out


def kv_bytes(cfg: ModelConfig, ctx: int, batch: int = 1, kv_dtype: str = "bf16") -> float:
    per_tok = 2 * len(cfg.attention_layers) * cfg.num_key_value_heads * cfg.head_dim * BYTES[norm_dtype(kv_dtype)]
    return per_tok * ctx * batch


def state_bytes(cfg: ModelConfig, batch: int = 1, state_dtype: str = "fp32",
                conv_dtype: str = "bf16") -> dict[str, float]:
    n = len(cfg.mamba_layers)
    conv = n * cfg.conv_dim * (cfg.mamba_d_conv - 1) * BYTES[norm_dtype(conv_dtype)] * batch
    ssm = n * cfg.mamba_n_heads * cfg.mamba_d_head * cfg.mamba_d_state * BYTES[norm_dtype(state_dtype)] * batch
    return {"conv": conv, "ssm": ssm, "total": conv + ssm}


def kv_state_crossover(cfg: ModelConfig, kv_dtype: str = "bf16", state_dtype: str = "fp32") -> float | None:
    """The context at which one sequence's KV cache equals its Mamba state (None without both)."""
    per_tok = kv_bytes(cfg, 1, 1, kv_dtype)
    st = state_bytes(cfg, 1, state_dtype, kv_dtype)["total"]
    if not per_tok or not st:
        return None
    return st / per_tok


def activation_bytes(cfg: ModelConfig, tokens: int, batch: int = 1, dtype: str = "bf16") -> float:
    """Peak working set of one forward of `tokens` new tokens per sequence (a prefill piece or a
    decode step), modelled on what the core keeps alive at each layer type's peak:

    - Mamba mixer: the residual and its normalised copy, the in_proj output, the conv output, the
      fp32 scan output, and two of one chunk's fp32 [heads, Q, Q] tiles;
    - attention: the residual pair, q/k/v, the attention output and its projection;
    - MoE/MLP: the layer's input and its updated residual, the normalised input, the routed
      output (MoE only) and the down-projection, [tokens, hidden] each, and three [tokens, width]
      ones (the gate|up projection and SiLU(gate), which the up half multiplies in place);
    plus the last-position logits (fp32).
    """
    s = BYTES[norm_dtype(dtype)]
    bt = batch * tokens
    d = cfg.hidden_size
    parts = []
    if cfg.is_hybrid:
        q = min(cfg.mamba_chunk_size, tokens)
        parts.append(bt * (2 * d + cfg.in_proj_dim + cfg.conv_dim) * s + bt * cfg.d_inner * (8 - s)
                     + 2 * batch * cfg.mamba_n_heads * q * q * 4)  # (8 - s): fp32 scan output + upcasts
    if cfg.attention_layers:
        qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
        parts.append(bt * (2 * d + qkv + 2 * cfg.num_attention_heads * cfg.head_dim + d) * s)
    width = cfg.mlp_width or cfg.expert_width
    if cfg.num_local_experts and not cfg.mlp_width:  # routed experts only: one expert's rows at a time
        rows = bt * cfg.num_experts_per_tok / cfg.num_local_experts
        parts.append(bt * 3 * d * s + rows * (d + 4 * width) * s)
    else:
        parts.append(bt * ((5 if cfg.num_local_experts else 4) * d + 3 * width) * s)
    return max(parts) + batch * cfg.vocab_size * 4


@dataclass
class Prediction:
    model: str
    ctx: int
    batch: int
    weights_bytes: float
    kv_bytes: float
    state_bytes: float
    activation_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.kv_bytes + self.state_bytes + self.activation_bytes


def predict(cfg: ModelConfig, ctx: int, batch: int = 1, weights: str = "bf16", kv: str = "bf16",
            state: str = "fp32", ubatch: int = 4096) -> Prediction:
    return Prediction(
        model=cfg.name, ctx=ctx, batch=batch,
        weights_bytes=weight_bytes(cfg, weights)["total"],
        kv_bytes=kv_bytes(cfg, ctx, batch, kv),
        state_bytes=state_bytes(cfg, batch, state, kv)["total"],
        activation_bytes=activation_bytes(cfg, min(ctx, ubatch), batch, kv),
    )
