"""Decode equals prefill; chunked prefill equals one prefill; snapshot/restore; cache sizes.

Run: python -m pytest -q tests/test_cache.py
"""

from __future__ import annotations

import pytest
import torch

from granite_cli.model.loading import load_model
from tests.conftest import assert_close, tiny

MODELS = {
    "hybrid": dict(arch="granitemoehybrid", mamba_n_groups=2),
    "hybrid-dense-mlp": dict(arch="granitemoehybrid", num_local_experts=0, num_experts_per_tok=0, attention_layers=[0]),
    "dense-rope": dict(arch="granitemoehybrid", attention_layers="all", position_embedding_type="rope"),
    "llama": dict(arch="llama"),
    "qwen3-moe": dict(arch="qwen3_moe"),
}


def _model(name):
    over = dict(MODELS[name])
    return load_model(tiny(over.pop("arch"), **over), weights="random", dtype="fp32", seed=5, std=0.1)


@pytest.mark.parametrize("name", list(MODELS))
def test_token_by_token_decode_equals_full_forward(name):
    m = _model(name)
    torch.manual_seed(0)
    ids = torch.randint(0, m.cfg.vocab_size, (3, 40))
    with torch.no_grad():
        full = m(ids)
        cache = m.allocate_cache(3, 40)
        steps = [m(ids[:, :17], cache)]  # a prefix, then one token at a time
        steps += [m(ids[:, i : i + 1], cache) for i in range(17, 40)]
    assert cache.pos == 40
    assert_close(torch.cat(steps, dim=1), full, 1e-4, name)


@pytest.mark.parametrize("name", list(MODELS))
def test_chunked_prefill_in_uneven_pieces_equals_one_prefill(name):
    m = _model(name)
    ids = torch.randint(0, m.cfg.vocab_size, (2, 53))
    with torch.no_grad():
        full = m(ids)
        cache = m.allocate_cache(2, 64)
        parts = [m(ids[:, a:b], cache) for a, b in ((0, 7), (7, 38), (38, 53))]
    assert_close(torch.cat(parts, dim=1), full, 1e-4, name)


def test_multi_token_decode_from_cache():
    m = _model("hybrid")
    ids = torch.randint(0, m.cfg.vocab_size, (2, 30))
    with torch.no_grad():
        full = m(ids)
        cache = m.allocate_cache(2, 30)
        m(ids[:, :26], cache)
        tail = m(ids[:, 26:], cache)  # four tokens at once, continuing from the cache
    assert_close(tail, full[:, 26:], 1e-4, "multi-token decode")


def test_snapshot_restore_replays_identically():
    m = _model("hybrid")
    ids = torch.randint(0, m.cfg.vocab_size, (1, 20))
    nxt = torch.randint(0, m.cfg.vocab_size, (1, 1))
    with torch.no_grad():
        cache = m.allocate_cache(1, 32)
        m(ids, cache)
        snap = cache.snapshot()
        a = m(nxt, cache)
        m(nxt, cache)  # move the state on
        cache.restore(snap)
        assert cache.pos == 20
        b = m(nxt, cache)
    assert torch.equal(a, b)


def test_cache_holds_kv_only_for_attention_layers():
    cfg = tiny("granitemoehybrid", attention_layers=[1])
    m = load_model(cfg, weights="random", dtype="fp32")
    c = m.allocate_cache(2, 100, state_dtype=torch.float32)
    nb = c.nbytes()
    assert nb["attention_kv"] == 2 * 2 * cfg.num_key_value_heads * 100 * cfg.head_dim * 4  # K and V, one layer
    assert nb["mamba_ssm"] == 3 * 2 * cfg.mamba_n_heads * cfg.mamba_d_head * cfg.mamba_d_state * 4
    assert nb["mamba_conv"] == 3 * 2 * cfg.conv_dim * (cfg.mamba_d_conv - 1) * 4
    c16 = m.allocate_cache(2, 100, dtype=torch.bfloat16, state_dtype=torch.bfloat16)
    assert c16.nbytes()["total"] * 2 == nb["total"]


def test_cache_overflow_is_a_clear_error():
    from granite_cli.errors import InputError

    m = _model("hybrid")
    cache = m.allocate_cache(1, 8)
    with pytest.raises(InputError, match="allocate a longer cache"):
        m(torch.zeros(1, 9, dtype=torch.long), cache)
