"""GGUF export of a Granite 4.0 hybrid (`granitehybrid`) as llama.cpp reads it (peers.md §C1).

Metadata: the `granitehybrid.*` keys, with a per-layer `attention.head_count_kv` array (0 at Mamba
layers), `ssm.*` keys (`ssm.time_step_rank` = number of Mamba heads) and `rope.scaling.finetuned`
reused as the "uses RoPE" flag. Tensors: gate/up halves split for experts and the shared MLP,
`dt_bias` → `ssm_dt.bias`, `ssm_a` = −exp(A_log), conv weight squeezed; 1-D tensors, norms, the
router, the conv and the SSM scalars stay F32. Needs the `gguf` package (`pip install granite-cli[gguf]`).

Without a tokenizer, the file carries a placeholder SentencePiece-style vocabulary of `vocab_size`
tokens (`<0>`, `<1>`, …) so that llama.cpp loads it and maps token ids to logits one to one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from granite_cli.errors import InputError


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def granitehybrid_tensors(model) -> list[tuple[str, torch.Tensor, bool]]:
    """(gguf name, tensor in PyTorch layout, keep_f32) for every tensor of the GGUF."""
    cfg = model.cfg
    out = [("token_embd.weight", model.embed.weight, False), ("output_norm.weight", model.norm.weight, True)]
    if model.lm_head is not None:
        out.append(("output.weight", model.lm_head.weight, False))
    for i, layer in enumerate(model.layers):
        b = f"blk.{i}."
        out.append((b + "attn_norm.weight", layer.norm1.weight, True))
        mx = layer.mixer
        if layer.kind == "mamba":
            g = cfg.mamba_n_groups
            out += [
                (b + "ssm_in.weight", mx.in_proj.weight, False),
                (b + "ssm_conv1d.weight", mx.conv1d.weight[:, 0, :], True),
                (b + "ssm_dt.bias", mx.dt_bias, True),
                (b + "ssm_a", (-torch.exp(mx.A_log.float())).reshape(-1, 1), True),
                (b + "ssm_d", mx.D.reshape(-1, 1), True),
                (b + "ssm_norm.weight", mx.norm.weight.reshape(g, -1), True),
                (b + "ssm_out.weight", mx.out_proj.weight, False),
            ]
            if mx.conv1d.bias is not None:
                out.append((b + "ssm_conv1d.bias", mx.conv1d.bias, True))
            if mx.in_proj.bias is not None:
                raise InputError("GGUF export: Mamba projection biases have no granitehybrid tensor in llama.cpp")
        else:
            out += [(b + f"attn_{n}.weight", getattr(mx, f"{p}_proj").weight, False)
                    for n, p in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o"))]
        out.append((b + "ffn_norm.weight", layer.norm2.weight, True))
        if layer.moe is not None:
            w = cfg.expert_width
            out += [(b + "ffn_gate_inp.weight", layer.moe.router.weight, True),
                    (b + "ffn_gate_exps.weight", layer.moe.w_in[:, :w], False),
                    (b + "ffn_up_exps.weight", layer.moe.w_in[:, w:], False),
                    (b + "ffn_down_exps.weight", layer.moe.w_out, False)]
        if layer.mlp is not None:
            s = layer.mlp.width
            sfx = "_shexp" if layer.moe is not None else ""
            out += [(b + f"ffn_gate{sfx}.weight", layer.mlp.w_in.weight[:s], False),
                    (b + f"ffn_up{sfx}.weight", layer.mlp.w_in.weight[s:], False),
                    (b + f"ffn_down{sfx}.weight", layer.mlp.w_out.weight, False)]
    return out


def write_granitehybrid_gguf(model, path: str | Path, outtype: str = "f32") -> Path:
    try:
        import gguf
    except ImportError:
        raise InputError("GGUF export needs the gguf package: pip install 'granite-cli[gguf]'") from None
    cfg = model.cfg
    if not cfg.is_hybrid or cfg.architecture != "granitemoehybrid":
        raise InputError("GGUF export currently writes granitehybrid (Granite 4.0-H) models only")
    qtypes = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    ftypes = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    if outtype not in qtypes:
        raise InputError(f"unknown GGUF outtype {outtype!r}; use f32, f16, bf16 or q8_0")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    w = gguf.GGUFWriter(str(tmp), "granitehybrid")
    w.add_name(cfg.name)
    w.add_file_type(ftypes[outtype])
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv([cfg.num_key_value_heads if t == "attention" else 0 for t in cfg.layer_types])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_scaling_finetuned(cfg.uses_rope)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.num_local_experts:
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_shared_feed_forward_length(cfg.shared_intermediate_size)
    w.add_attention_scale(cfg.softmax_scale)
    w.add_embedding_scale(cfg.embedding_multiplier)
    w.add_residual_scale(cfg.residual_multiplier)
    w.add_logit_scale(cfg.logits_scaling)
    w.add_ssm_conv_kernel(cfg.mamba_d_conv)
    w.add_ssm_state_size(cfg.mamba_d_state)
    w.add_ssm_group_count(cfg.mamba_n_groups)
    w.add_ssm_inner_size(cfg.d_inner)
    w.add_ssm_time_step_rank(cfg.mamba_n_heads)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<{i}>" for i in range(cfg.vocab_size)])
    w.add_token_scores([0.0] * cfg.vocab_size)
    w.add_token_types([gguf.TokenType.NORMAL] * cfg.vocab_size)
    w.add_bos_token_id(0)
    w.add_eos_token_id(min(1, cfg.vocab_size - 1))
    w.add_unk_token_id(0)
    for name, t, keep in granitehybrid_tensors(model):
        a = _np(t)
        q = qtypes["f32"] if (keep or a.ndim == 1) else qtypes[outtype]
        if q == qtypes["f32"]:
            w.add_tensor(name, a.astype(np.float32))
        elif q == qtypes["f16"]:
            w.add_tensor(name, a.astype(np.float16))
        else:
            if a.shape[-1] % 32 and outtype == "q8_0":
                w.add_tensor(name, a.astype(np.float32))
                continue
            w.add_tensor(name, gguf.quants.quantize(a, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path
