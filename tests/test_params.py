"""Parameter accounting: exact against transformers and our own model; the real profiles against
the published and derived figures (docs/sources.md), within 0.5%.

Run: python -m pytest -q tests/test_params.py
"""

from __future__ import annotations

import pytest
import torch

from granite_cli.config import load_config
from granite_cli.config.hf import to_hf_dict
from granite_cli.model.loading import build_empty
from granite_cli.params import count_params
from tests.conftest import HF_CLASSES, tiny

TINY = {
    "granitemoehybrid": {}, "granitemoehybrid-dense": dict(num_local_experts=0, num_experts_per_tok=0),
    "granitemoehybrid-bias": dict(attention_bias=True, mamba_proj_bias=True, tie_word_embeddings=False),
    "granite": {}, "llama": {}, "qwen3": {}, "qwen3_moe": {},
}


@pytest.mark.parametrize("case", list(TINY))
def test_counts_equal_transformers_numel(case):
    transformers = pytest.importorskip("transformers")
    arch = case.split("-")[0]
    cfg = tiny(arch, **TINY[case])
    hf_cfg_cls = getattr(transformers, HF_CLASSES[arch].replace("ForCausalLM", "Config"))
    d = {k: v for k, v in to_hf_dict(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    with torch.device("meta"):
        hf = getattr(transformers, HF_CLASSES[arch])(hf_cfg_cls(**d))
    want = sum(p.numel() for p in hf.parameters())
    assert count_params(cfg).total == want
    ours = build_empty(cfg, torch.float32, "meta")
    assert sum(p.numel() for p in ours.parameters()) == want


def test_groups_add_up_and_active_counts_top_k():
    cfg = tiny("granitemoehybrid")
    p = count_params(cfg)
    assert sum(p.groups.values()) == p.total
    routed = p.groups["routed_experts"]
    assert p.total - p.active == routed * (cfg.num_local_experts - cfg.num_experts_per_tok) // cfg.num_local_experts
    assert p.by_layer_type["mamba"] + p.by_layer_type["attention"] + p.groups["embedding"] + p.groups["head"] + \
        cfg.hidden_size == p.total


# derived from the configs (the model cards round them; docs/sources.md).
PUBLISHED = {
    "granite-4.0-h-small": (32.2e9, 8.8e9), "granite-4.0-h-tiny": (6.94e9, None), "granite-4.0-h-micro": (3.19e9, None),
    "granite-4.0-micro": (3.40e9, None), "granite-4.0-h-1b": (1.46e9, None), "granite-4.0-h-350m": (0.340e9, None),
    "granite-4.0-1b": (1.63e9, None), "granite-4.0-350m": (0.352e9, None),
    "granite-3.3-8b": (8.17e9, None), "llama-3.1-8b": (8.03e9, None), "llama-3.2-3b": (3.21e9, None),
    "qwen3-4b": (4.02e9, None), "qwen3-8b": (8.19e9, None), "qwen3-30b-a3b": (30.53e9, 3.35e9),
    "qwen3-32b": (32.76e9, None),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_real_profiles_match_published_counts(name):
    total, active = PUBLISHED[name]
    p = count_params(load_config(name))
    assert abs(p.total - total) / total < 0.005, f"{name}: {p.total:,} vs {total:,.0f}"
    if active:
        assert abs(p.active - active) / active < 0.005, f"{name} active: {p.active:,} vs {active:,.0f}"


def test_exact_figures_quoted_by_sources():
    assert count_params(load_config("granite-3.3-8b")).total == 8_170_864_640  # C7, "HF safetensors confirmed"
    assert count_params(load_config("granite-4.0-h-1b")).total == 1_461_538_368  # the h-1b shape
