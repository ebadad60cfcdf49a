"""Qwen3: Llama's layout with per-head q/k RMSNorm and an explicit head_dim."""

from __future__ import annotations

from typing import Any

from granite_cli.arch.base import Arch


class Qwen3(Arch):
    name = "qwen3"
    hf_class = "Qwen3ForCausalLM"
    hf_defaults = dict(vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768, head_dim=128)
    profile_defaults = {"position_embedding_type": "rope", "qk_norm": True}

    def parse(self, d: dict[str, Any], g: dict[str, Any], source: str) -> dict[str, Any]:
        return {**super().parse(d, g, source), "qk_norm": True}


ARCH = Qwen3()
