"""The chunked SSD against the naive fp32 recurrence, and the decode step against both.

Run: python -m pytest -q tests/test_ssd.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from granite_cli.ops.basic import causal_conv1d, causal_conv1d_step
from granite_cli.ops.ssd import segsum_exp, ssd_chunked, ssd_naive, ssd_step


def _inputs(b, t, h, p, g, n, seed):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(
        x=r(b, t, h, p), dt=F.softplus(r(b, t, h) - 1), A=-torch.exp(r(h)), B=r(b, t, g, n), C=r(b, t, g, n),
        D=r(h), initial_state=r(b, h, p, n),
    )


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), t=st.integers(1, 70), hg=st.integers(1, 3), g=st.sampled_from([1, 2]),
       p=st.sampled_from([4, 8]), n=st.sampled_from([8, 16]), q=st.sampled_from([5, 16, 32]),
       init=st.booleans(), seed=st.integers(0, 10_000), block=st.sampled_from([None, 1, 40, 64]))
def test_chunked_equals_naive_recurrence(b, t, hg, g, p, n, q, init, seed, block):
    # block: chunks batched block // q at a time (None or shorter than a chunk: one), with a tail
    kw = _inputs(b, t, hg * g, p, g, n, seed)
    if not init:
        kw["initial_state"] = None
    y1, s1 = ssd_chunked(chunk_size=q, block_tokens=block, **kw)
    y2, s2 = ssd_naive(**kw)
    assert _rel(y1, y2) < 1e-5
    assert _rel(s1, s2) < 1e-5


def test_segsum_exp_is_exact_where_fp32_cumsum_differences_are_not():
    # A large first decay makes the running sum ~-1000; the later segments are small. The difference
    # of fp32 cumsums would carry an error of ulp(1000) ≈ 6e-5 into every exponent (a relative error of
    # 6e-5 in L); ours must match the float64 masked cumsum to fp32 rounding.
    gen = torch.Generator().manual_seed(3)
    dA = -torch.rand(2, 3, 64, generator=gen) * 0.01
    dA[..., 0] = -1000.0
    q = dA.shape[-1]
    d64 = dA.double()
    seg = torch.cumsum(d64[..., None].expand(*d64.shape, q).tril(-1), dim=-2)  # Σ_{j<k≤i} dA_k
    ref = seg.masked_fill(torch.ones(q, q, dtype=torch.bool).triu(1), float("-inf")).exp()
    L = segsum_exp(dA)
    assert L.dtype == torch.float32
    assert torch.equal(L.triu(1), torch.zeros_like(L.triu(1)))  # zero above the diagonal, no inf/nan
    assert ((L.double() - ref).abs() / ref.clamp_min(1e-30)).max().item() < 1e-6
    cs32 = torch.cumsum(dA, -1)  # the unstable form, for contrast: it misses by far more
    naive = (cs32[..., :, None] - cs32[..., None, :]).exp().tril()
    assert ((naive.double() - ref).abs() / ref.clamp_min(1e-30)).max().item() > 1e-5


def test_chunked_split_anywhere_equals_one_pass():
    kw = _inputs(2, 100, 4, 8, 2, 16, 0)
    y, s = ssd_chunked(chunk_size=32, **kw)
    cut = 45
    first = {k: (v[:, :cut] if k in ("x", "dt", "B", "C") else v) for k, v in kw.items()}
    y1, s1 = ssd_chunked(chunk_size=32, **first)
    rest = {k: (v[:, cut:] if k in ("x", "dt", "B", "C") else v) for k, v in kw.items()}
    rest["initial_state"] = s1
    y2, s2 = ssd_chunked(chunk_size=32, **rest)
    assert _rel(torch.cat([y1, y2], 1), y) < 1e-5 and _rel(s2, s) < 1e-5


@pytest.mark.parametrize("shape", [(2, 4, 8, 2, 16), (3, 16, 64, 1, 128)])  # small state / above 2^20 elements
def test_decode_step_equals_recurrence_and_updates_state_in_place(shape):
    b, h, p, g, n = shape
    kw = _inputs(b, 12, h, p, g, n, 1)
    y_ref, s_ref = ssd_naive(**kw)
    state = kw["initial_state"].clone()
    ptr = state.data_ptr()
    ys = [ssd_step(state, kw["x"][:, i], kw["dt"][:, i], kw["A"], kw["B"][:, i], kw["C"][:, i], kw["D"])
          for i in range(12)]
    assert state.data_ptr() == ptr
    assert _rel(torch.stack(ys, 1), y_ref) < 1e-5 and _rel(state, s_ref) < 1e-5


def test_chunked_memory_does_not_grow_with_sequence_squared():
    # 16k tokens at chunk 64 would need 16k² x 4 heads x 4 B = 4 GiB if anything were O(t²). With the
    # live-tensor tracker: beyond its own output, the chunked path's peak is the same at 4k and 16k.
    from granite_cli.memory.trace import LiveTensorBytes

    extra = {}
    for t in (4096, 16384):
        kw = _inputs(1, t, 4, 4, 1, 4, 2)
        with LiveTensorBytes() as tr:
            y, s = ssd_chunked(chunk_size=64, **kw)
        assert y.shape == (1, t, 4, 4) and torch.isfinite(y).all()
        extra[t] = tr.peak - y.numel() * y.element_size()
    assert 0 < extra[16384] <= 1.25 * extra[4096] and extra[16384] < 2**20


def test_causal_conv_prefill_continuation_and_step_agree():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20, 6, generator=gen)
    w = torch.randn(6, 1, 4, generator=gen)
    bias = torch.randn(6, generator=gen)
    full, state_full = causal_conv1d(x, w, bias, None)
    a, st1 = causal_conv1d(x[:, :9], w, bias, None)
    b, st2 = causal_conv1d(x[:, 9:11], w, bias, st1)  # a block shorter than the k-1 history
    c, st3 = causal_conv1d(x[:, 11:15], w, bias, st2)
    state = st3.clone()
    steps = [causal_conv1d_step(x[:, i], w, bias, state) for i in range(15, 20)]
    got = torch.cat([a, b, c, torch.stack(steps, 1)], 1)
    assert torch.allclose(got, full, atol=1e-5)
    assert torch.allclose(state, state_full, atol=1e-6)
    # against a direct definition: out[t] = silu(sum_j w[j] x[t-3+j] + b)
    xp = F.pad(x.transpose(1, 2), (3, 0))
    direct = F.silu(sum(w[:, 0, j, None] * xp[:, :, j : j + 20] for j in range(4)) + bias[:, None]).transpose(1, 2)
    assert torch.allclose(full, direct, atol=1e-5)


def test_cpu_runs_long_config_chunks_shorter_with_the_same_logits(monkeypatch):
    """A config chunk above ops.ssd.CPU_CHUNK runs at CPU_CHUNK on a CPU; the logits are those of the
    config's chunk (the chunked form is exact for any chunk length)."""
    from granite_cli.model.loading import load_model
    from granite_cli.ops import dispatch, ssd
    from tests.conftest import tiny

    cfg = tiny("granitemoehybrid", mamba_chunk_size=128)
    assert ssd.chunk_for(128, torch.device("cpu")) == ssd.CPU_CHUNK < 128
    assert ssd.chunk_for(128, torch.device("meta")) == 128
    m = load_model(cfg, weights="random", dtype="fp32", seed=4, std=0.1)
    ids = torch.randint(0, cfg.vocab_size, (2, 300), generator=torch.Generator().manual_seed(5))
    calls = []
    real = ssd.ssd_chunked
    monkeypatch.setattr(ssd, "ssd_chunked", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    monkeypatch.setattr(dispatch, "_spaces", {})  # rebuilt with the recording wrapper
    n = len(cfg.mamba_layers)
    with torch.no_grad():
        short = m(ids)
        assert calls == [ssd.CPU_CHUNK] * n
        monkeypatch.setattr(ssd, "CPU_CHUNK", 1 << 30)
        full = m(ids)
    assert calls[n:] == [128] * n
    assert (short - full).abs().max().item() <= 1e-4 * full.abs().max().item()
