"""The CPU decode kernel (granite_cli.ops.native, granite_cli.model.native_decode) against the eager model.

Run: python -m pytest -q tests/test_native_decode.py
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from granite_cli.bench.steps import native_steps
from granite_cli.model.loading import load_model
from granite_cli.model.native_decode import NativeDecoder, unsupported
from granite_cli.ops import native
from tests.conftest import assert_close, granite, tiny
from tests.test_model_vs_hf import CASES

needs_cc = pytest.mark.skipif(native._compiler() is None, reason="no C compiler")

# beyond the oracle's cases: a hidden size and head size that leave tails after the 16-wide vectors
# (the scalar paths), and a MoE hybrid with two SSM groups at batch sizes that share experts
EXTRA = {"odd-widths": dict(arch="granitemoehybrid", hidden_size=40, num_attention_heads=4, num_key_value_heads=1,
                            mamba_d_head=20, intermediate_size=36, shared_intermediate_size=30),
         "hybrid-g2": dict(arch="granitemoehybrid", mamba_n_groups=2)}


def _model(case: str, dtype: str = "fp32"):
    over = dict({**CASES, **EXTRA}[case])
    return load_model(tiny(over.pop("arch"), **over), weights="random", dtype=dtype, seed=3, std=0.1)


def _both(m, b: int, depth: int, n: int):
    """(eager logits, kernel logits, eager cache, kernel cache) of n decode steps after a depth-token prefill."""
    ids = torch.randint(0, m.cfg.vocab_size, (b, depth + n), generator=torch.Generator().manual_seed(b))
    with torch.inference_mode():
        ce, cn = m.allocate_cache(b, depth + n), m.allocate_cache(b, depth + n)
        m(ids[:, :depth], ce)
        m(ids[:, :depth], cn)
        dec = NativeDecoder(m, cn)
        eager = torch.cat([m(ids[:, i : i + 1], ce, logits="last") for i in range(depth, depth + n)], 1)
        got = torch.cat([dec(ids[:, i : i + 1]) for i in range(depth, depth + n)], 1)
    return eager, got, ce, cn


@needs_cc
@pytest.mark.parametrize("case", [*CASES, *EXTRA])
@pytest.mark.parametrize("b", [1, 3])
def test_kernel_decode_equals_eager_fp32(case, b):
    # every architecture the model covers (RoPE with Llama-3 scaling, q/k norms, biases, untied heads,
    # the three routings, dense MLPs and shared experts), up to the step that fills the cache
    m = _model(case)
    assert unsupported(m) is None
    eager, got, ce, cn = _both(m, b, 9, 6)
    assert got.dtype == eager.dtype and got.shape == eager.shape == (b, 6, m.cfg.vocab_size)
    assert eager.std() > 1e-3  # logits spread far beyond the tolerance, so the comparison means something
    assert_close(got, eager, 1e-5 * max(1.0, eager.abs().max().item()), case)
    assert cn.pos == ce.pos == 15
    for le, ln in zip(ce.layers, cn.layers):  # the same states were written in place
        for (name, a), c in zip(vars(le).items(), vars(ln).values()):
            assert_close(c, a, 1e-5, f"{case} cache {name}")


@needs_cc
@pytest.mark.parametrize("case", ["hybrid-moe-g2", "llama"])
def test_kernel_decode_in_bf16_stays_within_half_precision(case):
    m = _model(case, "bf16")
    eager, got, _, _ = _both(m, 2, 7, 5)
    assert got.dtype == torch.bfloat16
    assert_close(got, eager, 3e-2 * eager.float().abs().max().item(), case)


@needs_cc
def test_kernel_refuses_a_token_outside_the_vocabulary_and_another_cache():
    m = _model("hybrid-g2")
    cache = m.allocate_cache(2, 8)
    dec = NativeDecoder(m, cache)
    with pytest.raises(IndexError, match="outside the vocabulary"):
        dec(torch.tensor([[1], [m.cfg.vocab_size]]))
    assert cache.pos == 0
    with pytest.raises(ValueError, match="another cache"):
        dec(torch.tensor([[1], [2]]), m.allocate_cache(2, 8))
    with pytest.raises(ValueError, match=r"shape \[2, 1\]"):
        dec(torch.tensor([[1, 2], [3, 4]]))


def test_what_the_kernel_does_not_cover_is_said():
    m = _model("hybrid-g2")
    assert "SSM state in fp32" in unsupported(m, m.allocate_cache(1, 4, state_dtype=torch.float64))
    assert "at most 64" in unsupported(m, m.allocate_cache(65, 2))
    assert "fp32 or bf16" in unsupported(load_model(tiny(), weights="random", dtype="fp16", seed=0))


@pytest.fixture
def fresh_kernel(tmp_path, monkeypatch):
    """The kernel module as in a new process, building into an empty cache folder."""
    monkeypatch.setenv("GRANITE_CACHE_DIR", str(tmp_path / "cache"))
    for name, value in (("_lib", None), ("_error", None), ("build_note", None)):
        monkeypatch.setattr(native, name, value)
    return tmp_path


@needs_cc
def test_the_kernel_is_built_once_per_source_and_then_only_loaded(fresh_kernel, monkeypatch):
    assert native.will_build() and native.status().startswith("not built yet")
    assert native.load() is not None and native.build_note.startswith("built the CPU decode kernel")
    assert native.status() == f"built: {native.library_path(native._compiler())}"
    built = [p for p in (fresh_kernel / "cache" / "kernels").iterdir() if p.suffix == ".so"]
    assert len(built) == 1  # no temporary left beside it
    assert {p.name for p in built[0].parent.iterdir()} == {built[0].name, built[0].name + ".sha256", ".build.lock"}
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "build_note", None)
    assert not native.will_build() and native.load() is not None and native.build_note is None
    changed = fresh_kernel / "decode_cpu.c"  # an edited kernel is a new library, never the stale one
    shutil.copy(native.SOURCE, changed)
    changed.write_text(changed.read_text() + "\n/* edited */\n")
    monkeypatch.setattr(native, "SOURCE", changed)
    monkeypatch.setattr(native, "_lib", None)
    cc = native._compiler()
    assert native.library_path(cc) != built[0] and native.will_build()


def test_without_a_compiler_bench_decodes_eagerly_and_says_why(fresh_kernel, monkeypatch):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.status().startswith("unavailable: no C compiler") and not native.will_build()
    m = _model("hybrid-g2")
    cache = m.allocate_cache(1, 12)
    ids = torch.randint(0, m.cfg.vocab_size, (1, 12))
    with torch.inference_mode():
        m(ids[:, :8], cache)
        step, mode, note = native_steps(m, cache, ids[:, 8:], 4)
        out = step()
    assert (mode, note) == ("eager", "no C compiler (cc, gcc or clang) on PATH")
    assert out.shape == (1, 1, m.cfg.vocab_size) and cache.pos == 12


@needs_cc
def test_bench_decodes_through_the_kernel_by_default_and_the_depth_guard_holds(tmp_path):
    args = ["bench", "-m", "tiny-hybrid", "--ctx", "=48", "--batch", "1,3", "--phase", "decode", "--gen", "4",
            "--reps", "1", "--warmup", "0", "-f", "json"]
    rows = json.loads(granite(*args).stdout)["rows"]
    assert [(r["batch"], r["decode_mode"], r["status"]) for r in rows] == [(1, "native", "ok"), (3, "native", "ok")]
    assert all(r["guard_depth_diff"] <= r["guard_tol"] for r in rows)  # kernel steps against an eager chunk
    (tmp_path / "s.toml").write_text("decode_kernel = false\n")
    r = granite(*args, "--sweep", str(tmp_path / "s.toml"))
    assert [x["decode_mode"] for x in json.loads(r.stdout)["rows"]] == ["eager", "eager"]
    r = granite(*args, "--no-decode-kernel")
    assert [x["decode_mode"] for x in json.loads(r.stdout)["rows"]] == ["eager", "eager"]
