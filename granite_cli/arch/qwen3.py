"""Qwen3: Llama's layout with per-head q/k RMSNorm and an explicit head_dim."""

from __future__ import annotations

from typing import Any

from granite_cli.arch.base import SLIDING, Arch


class Qwen3(Arch):
    name = "qwen3"
    hf_class = "Qwen3ForCausalLM"
    hf_defaults = dict(vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768, head_dim=128)
    profile_defaults = {"position_embedding_type": "rope", "qk_norm": True}

    def parse(self, d: dict[str, Any], g: dict[str, Any], source: str) -> dict[str, Any]:
        return {**super().parse(d, g, source), "qk_norm": True}

    def sliding_layers(self, d: dict[str, Any], g: dict[str, Any]) -> list[int]:
        """transformers' Qwen3: with use_sliding_window and a window, the layers layer_types marks
        sliding, or (without layer_types) those from max_window_layers on."""
        if not (d.get("use_sliding_window") is True and d.get("sliding_window") is not None):
            return []
        raw = d.get("layer_types")
        if raw is not None:
            if not isinstance(raw, list) or len(raw) != g["num_hidden_layers"]:
                return []  # not one type per layer: parse() refuses the list itself, naming the count
            return [i for i, t in enumerate(raw) if t == SLIDING]
        return list(range(d.get("max_window_layers", 28), g["num_hidden_layers"]))


ARCH = Qwen3()
