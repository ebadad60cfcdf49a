"""The torch.compile'd decode step (granite_cli.model.compiled) against the eager model.

Run: python -m pytest -q tests/test_compiled.py
"""

from __future__ import annotations

import pytest
import torch

from granite_cli.errors import InputError
from granite_cli.model import compiled
from granite_cli.model.loading import load_model
from tests.conftest import assert_close, tiny

needs_compile = pytest.mark.skipif(compiled.compile_available() is not None,
                                   reason=f"torch.compile unavailable: {compiled.compile_available()}")


@needs_compile
def test_compiled_decode_equals_eager_for_a_moe_hybrid_across_positions():
    # MoE routing (the graph-friendly expert path), Mamba steps and attention over a growing KV
    # prefix, batch 2, up to the step that fills the cache: one dynamic compilation for the
    # positions (plus the variant for the full cache), and the same logits and cache states as eager.
    m = load_model(tiny("granitemoehybrid", mamba_n_groups=2), weights="random", dtype="fp32", seed=5, std=0.1)
    torch.manual_seed(0)
    fwd = compiled.compiled_forward(m)
    assert compiled.compiled_forward(m) is fwd  # built once per model
    b, depth, n = 2, 9, 6
    ids = torch.randint(0, m.cfg.vocab_size, (b, depth + n))
    with torch.inference_mode():
        ce, cc = m.allocate_cache(b, depth + n), m.allocate_cache(b, depth + n)
        m(ids[:, :depth], ce)
        m(ids[:, :depth], cc)
        eager = torch.cat([m(ids[:, i : i + 1], ce, logits="last") for i in range(depth, depth + n)], 1)
        comp = torch.cat([fwd(ids[:, i : i + 1], cc, logits="last") for i in range(depth, depth + n)], 1)
    assert cc.pos == ce.pos == depth + n
    assert_close(comp, eager, 1e-5, "compiled decode")
    for le, lc in zip(ce.layers, cc.layers):  # the caches were updated identically
        for a, c in zip(vars(le).values(), vars(lc).values()):
            assert_close(c, a, 1e-5, "cache state")
    assert fwd.compile_s is not None and fwd.compile_s > 0


def test_compile_refused_without_a_cxx_compiler(monkeypatch):
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    m = load_model(tiny("granitemoehybrid"), weights="random", dtype="fp32", seed=1)
    with pytest.raises(InputError, match="no C\\+\\+ compiler"):
        compiled.compiled_forward(m)
