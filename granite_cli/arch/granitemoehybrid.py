"""Granite 4.0 (granitemoehybrid): Mamba-2 and attention layers in any pattern, no positional
encoding in the hybrids (RoPE as an option), µP-style multipliers, routed experts (top-k of the
logits, then softmax) beside a shared expert, or a dense MLP (the shared expert alone).

The dense members (Micro, 350M, 1B) are this family with attention layers only; their config.json
still carries mamba_* keys, which build nothing. llama.cpp runs the hybrids as `granitehybrid` and
the dense members as `granite`, whose graph also builds routed experts with a shared expert and
honours a RoPE switch (its `granitemoe` would apply RoPE unconditionally, so NoPE models must not use it).
"""

from __future__ import annotations

from typing import Any

from granite_cli.arch.base import Arch, FFNEntry, layer_types, layers_from_indices, time_step_limit
from granite_cli.arch.granite import MULTIPLIER_DEFAULTS, MULTIPLIER_KEYS, export_multipliers, multipliers

MAMBA_KEYS = frozenset({"mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state", "mamba_d_conv",
                        "mamba_expand", "mamba_chunk_size", "mamba_conv_bias", "mamba_proj_bias", "time_step_limit"})


class GraniteMoeHybrid(Arch):
    name = "granitemoehybrid"
    hf_class = "GraniteMoeHybridForCausalLM"
    hf_defaults = dict(
        **MULTIPLIER_DEFAULTS, num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=1024,
        position_embedding_type=None, mamba_n_heads=128, mamba_n_groups=1, mamba_d_state=256, mamba_d_head="auto",
        mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256, mamba_conv_bias=True, mamba_proj_bias=False,
    )
    hf_keys = MULTIPLIER_KEYS | MAMBA_KEYS | frozenset({
        "shared_intermediate_size", "num_local_experts", "num_experts_per_tok", "layer_types", "layers_block_type",
        "position_embedding_type", "attn_layer_indices"})
    mamba = experts = True
    profile_defaults: dict[str, Any] = {}

    def gguf_arch(self, cfg) -> str:
        return "granitehybrid" if cfg.mamba_layers else "granite"

    def parse(self, d: dict[str, Any], g: dict[str, Any], source: str) -> dict[str, Any]:
        n_layers = g["num_hidden_layers"]
        raw = d.get("layer_types", d.get("layers_block_type"))
        if raw is None and d.get("attn_layer_indices") is not None:
            types = layers_from_indices(list(d["attn_layer_indices"]), n_layers, source)
        elif raw is None:
            types = ("mamba",) * n_layers
        else:
            types = layer_types(raw, n_layers, source)
        n_heads, d_head = g["mamba_n_heads"], g["mamba_d_head"]
        if d_head == "auto":
            d_head = (g["mamba_expand"] * g["hidden_size"]) // n_heads if n_heads else 0
        out = dict(
            **multipliers(g), layer_types=types,
            position_embedding_type="rope" if g.get("position_embedding_type") == "rope" else "nope",
            shared_intermediate_size=g["shared_intermediate_size"], num_local_experts=g["num_local_experts"],
            num_experts_per_tok=g["num_experts_per_tok"], mamba_n_heads=n_heads, mamba_d_head=d_head,
            mamba_n_groups=g["mamba_n_groups"], mamba_d_state=g["mamba_d_state"], mamba_d_conv=g["mamba_d_conv"],
            mamba_expand=g["mamba_expand"], mamba_chunk_size=g["mamba_chunk_size"],
            mamba_conv_bias=bool(g["mamba_conv_bias"]), mamba_proj_bias=bool(g["mamba_proj_bias"]),
            time_step_limit=time_step_limit(d.get("time_step_limit"), source),
        )
        if "mamba" not in types:  # dense members' leftover mamba_* keys build nothing: not validated
            out.update(mamba_n_heads=0, mamba_d_head=0, mamba_d_state=0)
        return out

    def export(self, cfg) -> dict[str, Any]:
        d = dict(
            **export_multipliers(cfg), shared_intermediate_size=cfg.shared_intermediate_size,
            num_local_experts=cfg.num_local_experts, num_experts_per_tok=cfg.num_experts_per_tok,
            layer_types=list(cfg.layer_types), position_embedding_type=cfg.position_embedding_type,
            mamba_n_heads=cfg.mamba_n_heads, mamba_d_head=cfg.mamba_d_head, mamba_n_groups=cfg.mamba_n_groups,
            mamba_d_state=cfg.mamba_d_state, mamba_d_conv=cfg.mamba_d_conv, mamba_expand=cfg.mamba_expand,
            mamba_chunk_size=cfg.mamba_chunk_size, mamba_conv_bias=cfg.mamba_conv_bias,
            mamba_proj_bias=cfg.mamba_proj_bias,
        )
        if not cfg.is_hybrid and cfg.mamba_n_heads == 0:
            # Dense members carry unused mamba keys; keep the exported geometry self-consistent.
            d.update(mamba_n_heads=1, mamba_d_head=2 * cfg.hidden_size, mamba_d_state=1)
        return d

    def mlp_width(self, cfg) -> int:
        return cfg.shared_intermediate_size

    def ffn_entries(self, cfg) -> list[FFNEntry]:
        d, e, w, s = cfg.hidden_size, cfg.num_local_experts, cfg.expert_width, cfg.mlp_width
        out: list[FFNEntry] = []
        if e:
            out += [("block_sparse_moe.router.layer.weight", "moe.router.weight", (e, d), ()),
                    ("block_sparse_moe.input_linear.weight", "moe.w_in", (e, 2 * w, d), ()),
                    ("block_sparse_moe.output_linear.weight", "moe.w_out", (e, d, w), ())]
        return out + [("shared_mlp.input_linear.weight", "mlp.w_in.weight", (2 * s, d), ()),
                      ("shared_mlp.output_linear.weight", "mlp.w_out.weight", (d, s), ())]


ARCH = GraniteMoeHybrid()
