"""Checkpoint (Hugging Face safetensors) names ↔ our parameter names, per architecture.

Each Entry says: checkpoint tensor `ckpt` is `param[index]` of our model. Most entries are whole
tensors; the splits are the SwiGLU gate/up halves of Llama-style MLPs (fused here as w_in) and the
per-expert tensors of Qwen3-MoE (stacked here as [E, ...]). The table is the schema: loading and
saving both walk it, and a test checks it covers every parameter exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

from granite_cli.config import ModelConfig


@dataclass(frozen=True)
class Entry:
    ckpt: str
    param: str
    index: tuple = ()


def checkpoint_entries(cfg: ModelConfig) -> list[Entry]:
    a = cfg.architecture
    out = [Entry("model.embed_tokens.weight", "embed.weight"), Entry("model.norm.weight", "norm.weight")]
    if not cfg.tie_word_embeddings:
        out.append(Entry("lm_head.weight", "lm_head.weight"))
    for i, kind in enumerate(cfg.layer_types):
        c, o = f"model.layers.{i}.", f"layers.{i}."
        out += [Entry(c + "input_layernorm.weight", o + "norm1.weight"),
                Entry(c + "post_attention_layernorm.weight", o + "norm2.weight")]
        if kind == "mamba":
            m = c + "mamba."
            names = ["in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"]
            if cfg.mamba_conv_bias:
                names.append("conv1d.bias")
            if cfg.mamba_proj_bias:
                names += ["in_proj.bias", "out_proj.bias"]
            out += [Entry(m + n, o + "mixer." + n) for n in names]
        else:
            names = [f"{x}_proj.weight" for x in "qkvo"]
            if cfg.attention_bias:
                names += [f"{x}_proj.bias" for x in "qkvo"]
            if cfg.qk_norm:
                names += ["q_norm.weight", "k_norm.weight"]
            out += [Entry(c + "self_attn." + n, o + "mixer." + n) for n in names]
        if a == "granitemoehybrid":
            if cfg.num_local_experts:
                out += [
                    Entry(c + "block_sparse_moe.router.layer.weight", o + "moe.router.weight"),
                    Entry(c + "block_sparse_moe.input_linear.weight", o + "moe.w_in"),
                    Entry(c + "block_sparse_moe.output_linear.weight", o + "moe.w_out"),
                ]
            out += [Entry(c + "shared_mlp.input_linear.weight", o + "mlp.w_in.weight"),
                    Entry(c + "shared_mlp.output_linear.weight", o + "mlp.w_out.weight")]
        elif a == "qwen3_moe":
            w = cfg.expert_width
            out.append(Entry(c + "mlp.gate.weight", o + "moe.router.weight"))
            for e in range(cfg.num_local_experts):
                x = f"{c}mlp.experts.{e}."
                out += [Entry(x + "gate_proj.weight", o + "moe.w_in", (e, slice(0, w))),
                        Entry(x + "up_proj.weight", o + "moe.w_in", (e, slice(w, 2 * w))),
                        Entry(x + "down_proj.weight", o + "moe.w_out", (e,))]
        else:  # llama, qwen3, granite: separate gate/up/down
            w = cfg.mlp_width
            out += [Entry(c + "mlp.gate_proj.weight", o + "mlp.w_in.weight", (slice(0, w),)),
                    Entry(c + "mlp.up_proj.weight", o + "mlp.w_in.weight", (slice(w, 2 * w),)),
                    Entry(c + "mlp.down_proj.weight", o + "mlp.w_out.weight")]
    return out


# Names a checkpoint may carry that are not parameters of the model (safe to skip).
IGNORED_CKPT_SUFFIXES = ("rotary_emb.inv_freq",)
