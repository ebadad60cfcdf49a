"""Granite 3.x: Llama's layout with µP-style multipliers (embedding, attention, residual, logits)."""

from __future__ import annotations

from typing import Any

from granite_cli.arch.base import Arch

MULTIPLIER_KEYS = frozenset({"embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling"})
MULTIPLIER_DEFAULTS = dict(embedding_multiplier=1.0, logits_scaling=1.0, residual_multiplier=1.0,
                           attention_multiplier=1.0)


def multipliers(g: dict[str, Any]) -> dict[str, float]:
    return {k: float(g[k]) for k in MULTIPLIER_KEYS}


def export_multipliers(cfg) -> dict[str, float]:
    return {"embedding_multiplier": cfg.embedding_multiplier, "attention_multiplier": cfg.softmax_scale,
            "residual_multiplier": cfg.residual_multiplier, "logits_scaling": cfg.logits_scaling}


class Granite(Arch):
    name = "granite"
    hf_class = "GraniteForCausalLM"
    hf_defaults = MULTIPLIER_DEFAULTS
    hf_keys = MULTIPLIER_KEYS

    def parse(self, d: dict[str, Any], g: dict[str, Any], source: str) -> dict[str, Any]:
        return {**super().parse(d, g, source), **multipliers(g)}

    def export(self, cfg) -> dict[str, Any]:
        return {**super().export(cfg), **export_multipliers(cfg)}


ARCH = Granite()
