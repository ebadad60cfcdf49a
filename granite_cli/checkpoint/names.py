"""Checkpoint (Hugging Face safetensors) names ↔ our parameter names and shapes, per architecture.

Each Entry says: checkpoint tensor `ckpt`, of shape `shape`, is `param[index]` of our model. Most
entries are whole tensors; the splits are the SwiGLU gate/up halves of Llama-style MLPs (fused here
as w_in) and the per-expert tensors of Qwen3-MoE (stacked here as [E, ...]). The table is the
schema: loading, saving and the inventory check of every source walk it, and a test checks that it
covers every parameter exactly once, at the parameter's shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from granite_cli.arch import get_arch
from granite_cli.config import ModelConfig


@dataclass(frozen=True)
class Entry:
    ckpt: str
    param: str
    shape: tuple[int, ...]
    index: tuple = ()


def checkpoint_entries(cfg: ModelConfig) -> list[Entry]:
    d, v = cfg.hidden_size, cfg.vocab_size
    out = [Entry("model.embed_tokens.weight", "embed.weight", (v, d)), Entry("model.norm.weight", "norm.weight", (d,))]
    if not cfg.tie_word_embeddings:
        out.append(Entry("lm_head.weight", "lm_head.weight", (v, d)))
    ffn = get_arch(cfg.architecture).ffn_entries
    for i, kind in enumerate(cfg.layer_types):
        c, o = f"model.layers.{i}.", f"layers.{i}."
        out += [Entry(c + "input_layernorm.weight", o + "norm1.weight", (d,)),
                Entry(c + "post_attention_layernorm.weight", o + "norm2.weight", (d,))]
        part = _mamba(cfg) if kind == "mamba" else _attention(cfg)
        prefix = "mamba." if kind == "mamba" else "self_attn."
        out += [Entry(c + prefix + n, o + "mixer." + n, s) for n, s in part]
        out += [Entry(c + ck, o + p, s, idx) for ck, p, s, idx in ffn(cfg)]
    return out


def _mamba(cfg: ModelConfig) -> list[tuple[str, tuple]]:
    d, h, conv = cfg.hidden_size, cfg.mamba_n_heads, cfg.conv_dim
    out = [("in_proj.weight", (cfg.in_proj_dim, d)), ("conv1d.weight", (conv, 1, cfg.mamba_d_conv)), ("dt_bias", (h,)),
           ("A_log", (h,)), ("D", (h,)), ("norm.weight", (cfg.d_inner,)), ("out_proj.weight", (d, cfg.d_inner))]
    if cfg.mamba_conv_bias:
        out.append(("conv1d.bias", (conv,)))
    if cfg.mamba_proj_bias:
        out += [("in_proj.bias", (cfg.in_proj_dim,)), ("out_proj.bias", (d,))]
    return out


def _attention(cfg: ModelConfig) -> list[tuple[str, tuple]]:
    d, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    rows = {"q": q, "k": kv, "v": kv, "o": d}
    out = [(f"{x}_proj.weight", (rows[x], q if x == "o" else d)) for x in "qkvo"]
    if cfg.attention_bias:
        out += [(f"{x}_proj.bias", (rows[x],)) for x in "qkvo"]
    if cfg.qk_norm:
        out += [("q_norm.weight", (cfg.head_dim,)), ("k_norm.weight", (cfg.head_dim,))]
    return out


# Names a checkpoint may carry that are not parameters of the model (safe to skip).
IGNORED_CKPT_SUFFIXES = ("rotary_emb.inv_freq",)
