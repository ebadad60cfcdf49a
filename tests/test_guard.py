"""The correctness guard at each bench case's real depth, proven by injected faults.

The short guard (decode vs prefill over 16 tokens, once per model) cannot see a fault that appears
only deeper in the cache; the depth guard compares k decode steps with a k-token chunked
continuation from the same restored state at the case's depth, and `--guard full` also with a
from-empty prefill of ctx + k tokens. A failing case is invalid, and invalid rows never reach the
fits or verdicts.

Run: python -m pytest -q tests/test_guard.py
"""

from __future__ import annotations

import pytest

from granite_cli.bench import analysis
from granite_cli.bench.guard import GUARD_TOKENS
from granite_cli.bench.runner import Runner
from granite_cli.bench.spec import SweepSpec
from granite_cli.model import model as M
from granite_cli.model import native_decode as N

DEPTH = 2 * GUARD_TOKENS  # deeper than the short guard ever goes


def _run(**over) -> list[dict]:
    spec = dict(models=["tiny-hybrid"], ctx=[64, 96], batch=[1], gen=4, reps=1, warmup=0, device="cpu", dtype="fp32")
    spec.update(over)
    rows: list[dict] = []
    Runner(SweepSpec(**spec), rows.append).run()
    return rows


@pytest.fixture
def kv_offset_fault(monkeypatch):
    """Single-token attention steps past DEPTH write their KV one slot early (an off-by-one offset),
    in the eager step and in the CPU decode kernel alike (bench times the kernel's steps)."""
    real = M.Attention.forward

    def faulty(self, u, kv, pos, rope):
        if kv is not None and u.shape[1] == 1 and pos >= DEPTH:
            pos -= 1
        return real(self, u, kv, pos, rope)

    monkeypatch.setattr(M.Attention, "forward", faulty)
    real_step = N.NativeDecoder.__call__

    def faulty_step(self, ids, cache=None, logits="last"):
        if self.cache.pos < DEPTH:
            return real_step(self, ids, cache, logits)
        self.cache.pos -= 1  # the kernel writes K/V at pos - 1 and attends over one key too few
        out = real_step(self, ids, cache, logits)
        self.cache.pos += 1
        return out

    monkeypatch.setattr(N.NativeDecoder, "__call__", faulty_step)


@pytest.fixture
def state_handoff_fault(monkeypatch):
    """A long multi-token forward (a prefill) hands a damaged conv state to what follows; its own
    outputs are right, and short forwards (the short guard's, a k-token continuation) are untouched.
    (The conv state, not the SSM state: in a random-weight model the SSM state is about 1e-5, so
    damage to it moves the logits by less than fp32 noise; see reports/reliability.)"""
    real = M.Mamba2Mixer._scan

    def faulty(self, K, xbc, dt, A, state, fresh):
        y = real(self, K, xbc, dt, A, state, fresh)
        if state is not None and xbc.shape[1] >= DEPTH:
            state.conv.mul_(0.5)
        return y

    monkeypatch.setattr(M.Mamba2Mixer, "_scan", faulty)


def test_healthy_cases_pass_the_depth_guard_with_their_figures():
    rows = _run(phases=["prefill", "decode"])
    assert rows and all(r.status == "ok" and r.valid for r in rows)
    for r in rows:
        assert r.guard_depth_diff <= r.guard_tol and r.guard_full_diff is None
        assert r.guard_depth_diff < r.guard_tol / 10  # two fp32 paths over one state agree far inside it


@pytest.mark.parametrize("phases", [["prefill", "decode"], ["prefill"]])
def test_a_kv_offset_fault_beyond_the_short_guard_is_caught_at_depth(kv_offset_fault, phases):
    rows = _run(phases=phases)
    assert all(r.guard_max_diff < 1e-5 for r in rows)  # the short guard saw nothing
    assert rows and all(r.status == "invalid" and not r.valid for r in rows)
    for r in rows:
        assert r.guard_depth_diff > r.guard_tol
        assert r.error.startswith(f"depth guard at ctx {r.ctx}: a chunked continuation")
    result = analysis.analyse(rows)  # invalid rows are never reported as fast
    assert result.fits == [] and result.verdicts == [] and result.ratios == []


def test_a_state_handoff_fault_is_caught_only_by_the_full_guard(state_handoff_fault):
    depth_only = _run()
    assert all(r.status == "ok" for r in depth_only)  # steps and continuation share the damaged state
    rows = _run(guard="full")
    by_ctx = {(r.ctx, r.phase): r for r in rows}
    for phase in ("prefill", "decode"):
        assert by_ctx[(64, phase)].status == "ok"  # full runs at the largest context only
        big = by_ctx[(96, phase)]
        assert big.status == "invalid" and big.guard_full_diff > big.guard_tol
        assert "a from-empty prefill's logits" in big.error
