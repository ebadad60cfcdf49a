"""Qwen3-MoE: Qwen3 with routed experts in every layer (softmax over all experts, then top-k,
optionally renormalised), no dense MLP, each expert's gate/up/down a tensor of its own."""

from __future__ import annotations

from typing import Any

from granite_cli.arch.base import Arch, FFNEntry, Routing


class Qwen3Moe(Arch):
    name = "qwen3_moe"
    hf_class = "Qwen3MoeForCausalLM"
    hf_defaults = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                       num_key_value_heads=4, max_position_embeddings=32768, moe_intermediate_size=768,
                       num_experts_per_tok=8, num_local_experts=128, norm_topk_prob=False, head_dim=None)
    hf_keys = frozenset({"moe_intermediate_size", "num_experts", "num_local_experts", "num_experts_per_tok",
                         "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"})
    experts = needs_experts = True
    profile_defaults = {"position_embedding_type": "rope", "qk_norm": True}

    def parse(self, d: dict[str, Any], g: dict[str, Any], source: str) -> dict[str, Any]:
        from granite_cli.errors import InputError

        if g.get("mlp_only_layers") or g.get("decoder_sparse_step", 1) != 1:
            raise InputError(f"{source}: qwen3_moe with dense layers (mlp_only_layers / decoder_sparse_step) is not "
                             "supported")
        return {**super().parse(d, g, source), "qk_norm": True, "moe_intermediate_size": g["moe_intermediate_size"],
                "num_local_experts": d.get("num_local_experts", d.get("num_experts", g["num_local_experts"])),
                "num_experts_per_tok": g["num_experts_per_tok"], "norm_topk_prob": bool(g["norm_topk_prob"])}

    def export(self, cfg) -> dict[str, Any]:
        return {**super().export(cfg), "moe_intermediate_size": cfg.moe_intermediate_size,
                "num_local_experts": cfg.num_local_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
                "norm_topk_prob": cfg.norm_topk_prob, "decoder_sparse_step": 1, "mlp_only_layers": []}

    def sliding_layers(self, d: dict[str, Any], g: dict[str, Any]) -> list[int]:
        """transformers' Qwen3-MoE windows every layer when use_sliding_window is on with a window."""
        if d.get("use_sliding_window") is True and d.get("sliding_window") is not None:
            return list(range(g["num_hidden_layers"]))
        return []

    def expert_width(self, cfg) -> int:
        return cfg.moe_intermediate_size if cfg.num_local_experts else 0

    def mlp_width(self, cfg) -> int:
        return 0

    def routing(self, cfg) -> Routing:
        return Routing.SOFTMAX_TOPK_NORM if cfg.norm_topk_prob else Routing.SOFTMAX_TOPK

    def ffn_entries(self, cfg) -> list[FFNEntry]:
        w, d = cfg.expert_width, cfg.hidden_size
        out: list[FFNEntry] = [("mlp.gate.weight", "moe.router.weight", (cfg.num_local_experts, d), ())]
        for e in range(cfg.num_local_experts):
            x = f"mlp.experts.{e}."
            out += [(x + "gate_proj.weight", "moe.w_in", (w, d), (e, slice(0, w))),
                    (x + "up_proj.weight", "moe.w_in", (w, d), (e, slice(w, 2 * w))),
                    (x + "down_proj.weight", "moe.w_out", (d, w), (e,))]
        return out


ARCH = Qwen3Moe()
