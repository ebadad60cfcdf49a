"""Triton kernels against their PyTorch references (and float64 oracles), run on CPU through the
Triton interpreter in fp32 with small grids (odd sizes throughout); on CUDA in bf16 (marked gpu).
The whole model with GRANITE_KERNELS=triton equals the torch path.

Run: python -m pytest -q tests/test_kernels.py
"""

from __future__ import annotations

import os
import re

import pytest
import torch

CUDA = torch.cuda.is_available()
# Without a GPU the kernels run in Triton's interpreter on CPU tensors. With one they are compiled
# (the interpreter would also take over the gpu-marked tests), and the interpreter tests below are
# skipped unless TRITON_INTERPRET=1 is set by hand. Must precede the kernels' definition (import).
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
pytest.importorskip("triton")

from granite_cli.arch import Routing  # noqa: E402
from granite_cli.ops import basic, dispatch, ssd  # noqa: E402
from granite_cli.ops import triton_ops as T  # noqa: E402

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _interpreter_tests_need_the_interpreter(request):
    node = request.node
    if CUDA and not INTERPRETING and not (node.get_closest_marker("gpu") or node.get_closest_marker("any_device")):
        pytest.skip("CPU interpreter test: on a GPU machine set TRITON_INTERPRET=1 to run it")


def _close(a, b, rtol=2e-4, atol=2e-5):
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item()
    assert err <= atol + rtol * b.abs().max().item(), f"max error {err:.3g} (scale {b.abs().max().item():.3g})"


def _ssd_inputs(b, t, h, p, g, n, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x, B, C = r(b, t, h, p), r(b, t, g, n) * 0.5, r(b, t, g, n) * 0.5
    dt = torch.rand(b, t, h, generator=gen) * 0.3 + 0.01
    A = -(torch.rand(h, generator=gen) + 0.5)
    D, init = r(h), r(b, h, p, n)
    cast = lambda v: v.to(device=device, dtype=dtype)  # noqa: E731
    f = lambda v: v.to(device=device)  # noqa: E731
    return cast(x), f(dt), f(A), cast(B), cast(C), f(D), f(init)


@pytest.mark.parametrize("t,chunk,init", [(37, 16, True), (16, 16, False), (70, 32, True)])
def test_ssd_chunked_matches_reference_and_naive_oracle(t, chunk, init):
    x, dt, A, B, C, D, s0 = _ssd_inputs(2, t, 6, 12, 3, 10)  # p, n not powers of two; 2 heads per group
    s0 = s0 if init else None
    y, fin = T.ssd_chunked(x, dt, A, B, C, chunk, D, s0)
    y_ref, fin_ref = T.ssd_chunked_ref(x, dt, A, B, C, chunk, D, s0)
    y64, fin64 = ssd.ssd_naive(*(v.double() for v in (x, dt, A, B, C)), chunk, D.double(),
                               None if s0 is None else s0.double())
    _close(y, y64)
    _close(fin, fin64)
    _close(y, y_ref)
    _close(fin, fin_ref)


def test_ssd_chunked_with_input_precision_dot_operands(monkeypatch):
    # the GPU's bf16-operand variant (GRANITE_SSD_DOTS=input); here fp32 inputs, which the interpreter computes right
    from granite_cli.ops import launch

    monkeypatch.setattr(launch, "SSD_DOTS", "input")
    monkeypatch.setattr(T, "low_precision_dots", lambda t: True)
    x, dt, A, B, C, D, s0 = _ssd_inputs(2, 37, 6, 12, 3, 10)
    y, fin = T.ssd_chunked(x, dt, A, B, C, 16, D, s0)
    y64, fin64 = ssd.ssd_naive(*(v.double() for v in (x, dt, A, B, C)), 16, D.double(), s0.double())
    _close(y, y64)
    _close(fin, fin64)


def test_ssd_chunked_takes_strided_views():
    x, dt, A, B, C, D, s0 = _ssd_inputs(1, 40, 4, 16, 1, 16)
    big = torch.cat([x.reshape(1, 40, -1), B.reshape(1, 40, -1), C.reshape(1, 40, -1)], dim=-1)
    xv, Bv, Cv = big.split([64, 16, 16], dim=-1)  # non-contiguous views, as the model passes them
    y, fin = T.ssd_chunked(xv.view(1, 40, 4, 16), dt, A, Bv.view(1, 40, 1, 16), Cv.view(1, 40, 1, 16), 16, D, s0)
    y0, f0 = T.ssd_chunked_ref(x, dt, A, B, C, 16, D, s0)
    _close(y, y0)
    _close(fin, f0)


def test_ssd_step_updates_the_state_in_place():
    b, h, p, g, n = 3, 6, 12, 3, 10
    gen = torch.Generator().manual_seed(1)
    state = torch.randn(b, h, p, n, generator=gen)
    x, dt = torch.randn(b, h, p, generator=gen), torch.rand(b, h, generator=gen) * 0.2
    A, D = -torch.rand(h, generator=gen) - 0.5, torch.randn(h, generator=gen)
    B, C = torch.randn(b, g, n, generator=gen), torch.randn(b, g, n, generator=gen)
    s_ref = state.clone()
    s64 = state.double()
    y64 = ssd.ssd_step(s64, x.double(), dt.double(), A.double(), B.double(), C.double(), D.double())
    ptr = state.data_ptr()
    y = T.ssd_step(state, x, dt, A, B, C, D)
    y_ref = T.ssd_step_ref(s_ref, x, dt, A, B, C, D)
    assert state.data_ptr() == ptr
    _close(y, y64)
    _close(state, s64)
    _close(y, y_ref)


@pytest.mark.parametrize("k,with_state", [(4, True), (4, False), (2, True)])
def test_causal_conv1d(k, with_state):
    gen = torch.Generator().manual_seed(2)
    b, t, c = 2, 21, 40
    x = torch.randn(b, t, c, generator=gen)
    w, bias = torch.randn(c, 1, k, generator=gen), torch.randn(c, generator=gen)
    st = torch.randn(b, c, k - 1, generator=gen) if with_state else None
    o, s = T.causal_conv1d(x, w, bias, st)
    o_ref, s_ref = T.causal_conv1d_ref(x, w, bias, st)
    o64, _ = T.causal_conv1d_ref(x.double(), w.double(), bias.double(), None if st is None else st.double())
    _close(o, o64)
    _close(o, o_ref)
    assert torch.equal(s, s_ref)


def test_causal_conv1d_step_shifts_in_place():
    gen = torch.Generator().manual_seed(3)
    b, c, k = 3, 40, 4
    x, w, bias = torch.randn(b, c, generator=gen), torch.randn(c, 1, k, generator=gen), torch.randn(c, generator=gen)
    st = torch.randn(b, c, k - 1, generator=gen)
    st_ref = st.clone()
    o = T.causal_conv1d_step(x, w, bias, st)
    o_ref = T.causal_conv1d_step_ref(x, w, bias, st_ref)
    _close(o, o_ref)
    assert torch.equal(st, st_ref)


@pytest.mark.parametrize("group", [24, 48])
def test_gated_rms_norm(group):
    gen = torch.Generator().manual_seed(4)
    y, z = torch.randn(2, 5, 48, generator=gen), torch.randn(2, 5, 48, generator=gen)
    w = torch.randn(48, generator=gen)
    out = T.gated_rms_norm(y, z, w, 1e-5, group)
    _close(out, T.gated_rms_norm_ref(y.double(), z.double(), w.double(), 1e-5, group))
    _close(out, T.gated_rms_norm_ref(y, z, w, 1e-5, group))


def test_moe_grouped_gemm_with_empty_experts():
    gen = torch.Generator().manual_seed(5)
    n, d, e, i, k = 13, 40, 6, 20, 2
    x = torch.randn(n, d, generator=gen)
    w_in, w_out = torch.randn(e, 2 * i, d, generator=gen) * 0.2, torch.randn(e, d, i, generator=gen) * 0.2
    ids = torch.randint(0, e - 2, (n, k), generator=gen)  # experts e-2, e-1 get no tokens
    weights = torch.rand(n, k, generator=gen)
    out = T.moe_experts(x, w_in, w_out, weights, ids)
    _close(out, T.moe_experts_ref(x.double(), w_in.double(), w_out.double(), weights.double(), ids))
    _close(out, T.moe_experts_ref(x, w_in, w_out, weights, ids))


@pytest.mark.parametrize("tiles", [None, (16, 16, 16), (32, 64, 32), (64, 32, 64)])
@pytest.mark.parametrize("lowp", [False, True])
def test_grouped_gemm_tile_and_dot_variants(tiles, lowp):
    # lowp=True is the GPU's bf16-operand path; here with fp32 operands, which the interpreter computes right
    gen = torch.Generator().manual_seed(6)
    e, n, k, rows = 5, 40, 72, 29
    a = torch.randn(23, k, generator=gen)
    src = torch.randint(0, 23, (rows,), generator=gen, dtype=torch.int32)
    counts = torch.tensor([7, 0, 13, 9, 0])
    offsets = torch.zeros(e + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(counts, 0)
    w = torch.randn(e, n, k, generator=gen) * 0.1
    scale = torch.rand(rows, generator=gen)
    out = T.grouped_gemm(a, src, w, offsets, int(counts.max()), scale=scale, tiles=tiles, lowp=lowp)
    expert = torch.repeat_interleave(torch.arange(e), counts)
    ref = torch.einsum("rk,rnk->rn", a[src.long()].double(), w[expert].double()) * scale.double()[:, None]
    _close(out, ref)


def test_tile_table_picks_the_nearest_measured_shape(monkeypatch):
    from granite_cli.ops import launch as tiles

    monkeypatch.setattr(tiles, "_TILES", {"": {tiles.shape_key(24576, 1024, 1536, torch.bfloat16): [64, 128, 64],
                                               tiles.shape_key(48, 1024, 1536, torch.bfloat16): [16, 64, 128]}})
    cpu = torch.device("cpu")  # the table's "" entry stands for the device here
    assert tiles.grouped_gemm_tiles(24000, 1024, 1536, torch.bfloat16, cpu) == (64, 128, 64)
    assert tiles.grouped_gemm_tiles(40, 1024, 1536, torch.bfloat16, cpu) == (16, 64, 128)
    assert tiles.grouped_gemm_tiles(2000, 1024, 1536, torch.bfloat16, cpu) == (16, 64, 64)  # far from both
    assert tiles.grouped_gemm_tiles(24576, 1024, 1536, torch.float32, cpu) == (16, 64, 64)  # other dtype


@gpu
@needs_cuda
def test_ssd_bf16_dot_operands_on_cuda(monkeypatch):
    # not yet run on a GPU: the bound is bf16 rounding of the operands, summed in fp32 over a chunk
    from granite_cli.ops import launch

    monkeypatch.setattr(launch, "SSD_DOTS", "input")
    x, dt, A, B, C, D, s0 = _ssd_inputs(2, 1000, 8, 64, 1, 128, dtype=torch.bfloat16, device="cuda")
    y = T.ssd_chunked(x, dt, A, B, C, 256, D, s0)[0]
    ref = ssd.ssd_naive(x.double(), dt.double(), A.double(), B.double(), C.double(), 256, D.double(), s0.double())[0]
    assert (y.double() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


@pytest.mark.any_device
def test_kernels_share_signatures_and_name_their_references():
    import inspect

    for op in T.KERNELS:
        kern, ref = getattr(T, op), getattr(T, op + "_ref")
        assert list(inspect.signature(kern).parameters) == list(inspect.signature(ref).parameters), op
        # each launcher documents itself (shapes, what it returns) and says which reference it twins
        assert kern.__doc__ and kern.__doc__ != ref.__doc__, op
        assert f"{ref.__module__}.{ref.__name__}" in " ".join(kern.__doc__.split()), op


def _good_args():
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "ssd_chunked": [r(1, 8, 4, 16), r(1, 8, 4).abs(), -r(4).abs(), r(1, 8, 2, 16), r(1, 8, 2, 16), 8, r(4),
                        r(1, 4, 16, 16)],
        "ssd_step": [r(2, 4, 16, 16), r(2, 4, 16), r(2, 4).abs(), -r(4).abs(), r(2, 2, 16), r(2, 2, 16), r(4)],
        "causal_conv1d": [r(2, 5, 8), r(8, 1, 4), r(8), r(2, 8, 3)],
        "causal_conv1d_step": [r(2, 8), r(8, 1, 4), r(8), r(2, 8, 3)],
        "gated_rms_norm": [r(3, 16), r(3, 16), r(16), 1e-5, 8],
        "moe_experts": [r(5, 8), r(3, 12, 8), r(3, 8, 6), r(5, 2).abs(), torch.randint(0, 3, (5, 2), generator=g)],
    }


@pytest.mark.parametrize("op,arg,bad,says", [
    ("ssd_chunked", 1, (1, 8, 3), "dt has shape [1, 8, 3], expected [1, 8, 4]"),
    ("ssd_chunked", 4, (1, 7, 2, 16), "C has shape [1, 7, 2, 16], expected [1, 8, 2, 16]"),
    ("ssd_chunked", 7, (1, 4, 16, 8), "initial_state has shape"),
    ("ssd_chunked", 3, (1, 8, 3, 16), "4 heads do not split into 3 groups"),
    ("ssd_step", 1, (2, 4, 15), "x has shape [2, 4, 15], expected [2, 4, 16]"),
    ("ssd_step", 6, (3,), "D has shape [3], expected [4]"),
    ("causal_conv1d", 1, (8, 4), "weight has shape [8, 4], expected [8, 1, 4]"),
    ("causal_conv1d", 3, (2, 8, 4), "conv_state has shape [2, 8, 4], expected [2, 8, 3]"),
    ("causal_conv1d_step", 2, (9,), "bias has shape [9], expected [8]"),
    ("gated_rms_norm", 1, (3, 15), "z has shape [3, 15], expected [3, 16]"),
    ("gated_rms_norm", 4, 5, "group size 5 does not divide the width 16"),
    ("moe_experts", 0, (5, 7), "x has shape [5, 7], expected [5, 8]"),
    ("moe_experts", 2, (3, 8, 5), "w_out has shape [3, 8, 5], expected [3, 8, 6]"),
])
def test_launchers_refuse_wrong_shapes_before_launching(op, arg, bad, says):
    args = _good_args()[op]
    getattr(T, op)(*args)  # the good arguments run
    args[arg] = torch.zeros(bad) if isinstance(bad, tuple) else bad
    with pytest.raises(ValueError, match=re.escape(says)):
        getattr(T, op)(*args)


def test_whole_model_triton_equals_torch(monkeypatch):
    from granite_cli.model.loading import load_model
    from tests.conftest import tiny

    cfg = tiny("granitemoehybrid", mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16)
    m = load_model(cfg, weights="random", dtype="fp32", seed=7, std=0.1)
    ids = torch.randint(0, cfg.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))

    def run(impl):
        monkeypatch.setenv("GRANITE_KERNELS", impl)
        dispatch.reset()
        assert dispatch.resolved_impl() == impl
        with torch.no_grad():
            cache = m.allocate_cache(2, 24)
            pre = m(ids, cache)
            steps = [m(ids[:, i : i + 1], cache) for i in range(2)]  # decode: conv + state updates in place
        return pre, torch.cat(steps, 1), cache.layers[0].ssm.clone()

    try:
        torch_out = run("torch")
        triton_out = run("triton")
    finally:
        dispatch.reset()
    for a, b in zip(triton_out, torch_out):
        _close(a, b, rtol=1e-4, atol=1e-5)


def test_dispatch_refuses_triton_without_gpu_or_interpreter(monkeypatch):
    from granite_cli.errors import InputError

    monkeypatch.setenv("GRANITE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    dispatch.reset()
    try:
        if not CUDA:
            with pytest.raises(InputError, match="needs a CUDA GPU"):
                dispatch.resolved_impl()
        monkeypatch.setenv("GRANITE_KERNELS", "fast")
        dispatch.reset()
        with pytest.raises(InputError, match="not one of"):
            dispatch.resolved_impl()
        monkeypatch.setenv("GRANITE_KERNELS", "auto")
        dispatch.reset()
        assert dispatch.resolved_impl() == ("triton" if CUDA else "torch")
    finally:
        dispatch.reset()


# ---- on a GPU: bf16, error at most 2x the same-precision torch reference's error vs float64 ----

@gpu
@needs_cuda
@pytest.mark.parametrize("op", ["ssd_chunked", "ssd_step", "causal_conv1d", "gated_rms_norm", "moe_experts"])
def test_bf16_on_cuda_within_2x_of_torch(op):
    dev, bf = "cuda", torch.bfloat16
    if op == "ssd_chunked":
        x, dt, A, B, C, D, s0 = _ssd_inputs(2, 1000, 8, 64, 1, 128, dtype=bf, device=dev)
        args = (x, dt, A, B, C, 256, D, s0)
        ref64 = ssd.ssd_naive(x.double(), dt.double(), A.double(), B.double(), C.double(), 256, D.double(),
                              s0.double())[0]
        pick = lambda r: r[0]  # noqa: E731
    elif op == "ssd_step":
        g = torch.Generator(device=dev).manual_seed(0)
        st = torch.randn(4, 8, 64, 128, device=dev, generator=g)
        mk = lambda *s: torch.randn(*s, device=dev, generator=g)  # noqa: E731
        x, dt, A = mk(4, 8, 64).to(bf), mk(4, 8).abs() * 0.1, -mk(8).abs()
        B, C, D = mk(4, 1, 128).to(bf), mk(4, 1, 128).to(bf), mk(8)
        args = (st, x, dt, A, B, C, D)
        ref64 = ssd.ssd_step(st.double(), x.double(), dt.double(), A.double(), B.double(), C.double(), D.double())
        pick = lambda r: r  # noqa: E731
    elif op == "causal_conv1d":
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(2, 2048, 3328, device=dev, generator=g).to(bf)
        w, bias = torch.randn(3328, 1, 4, device=dev,
                              generator=g).to(bf), torch.randn(3328, device=dev, generator=g).to(bf)
        args = (x, w, bias, None)
        ref64 = basic.causal_conv1d(x.double(), w.double(), bias.double(), None)[0]
        pick = lambda r: r[0]  # noqa: E731
    elif op == "gated_rms_norm":
        g = torch.Generator(device=dev).manual_seed(0)
        y, z = torch.randn(4096, 3072, device=dev, generator=g), torch.randn(4096, 3072, device=dev, generator=g).to(bf)
        w = torch.randn(3072, device=dev, generator=g).to(bf)
        args = (y, z, w, 1e-5, 3072)
        ref64 = basic.gated_rms_norm(y.double(), z.double(), w.double(), 1e-5, 3072)
        pick = lambda r: r  # noqa: E731
    else:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(512, 1536, device=dev, generator=g).to(bf)
        w_in = (torch.randn(64, 1024, 1536, device=dev, generator=g) * 0.02).to(bf)
        w_out = (torch.randn(64, 1536, 512, device=dev, generator=g) * 0.02).to(bf)
        weights, ids = basic.route(torch.randn(512, 64, device=dev, generator=g), 6, Routing.TOPK_SOFTMAX)
        args = (x, w_in, w_out, weights, ids)
        ref64 = basic.moe_experts(x.double(), w_in.double(), w_out.double(), weights.double(), ids)
        pick = lambda r: r  # noqa: E731
    clone = lambda a: tuple(v.clone() if isinstance(v, torch.Tensor) else v for v in a)  # noqa: E731
    ours = pick(getattr(T, op)(*clone(args)))
    theirs = pick(getattr(T, op + "_ref")(*clone(args)))
    e_ours = (ours.double() - ref64).abs().max().item()
    e_ref = (theirs.double() - ref64).abs().max().item()
    assert e_ours <= 2 * e_ref + 1e-6, f"{op}: triton error {e_ours:.3g} vs torch {e_ref:.3g}"


@pytest.mark.any_device
def test_gpu_check_script_dry_run_prints_its_plan():
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([str(root / "scripts" / "gpu-check"), "--dry-run", "--out", "/nonexistent/x"],
                       capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable},
                       stdin=subprocess.DEVNULL, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pytest -m gpu" in r.stdout and "kernels_gpu.py" in r.stdout and "granite-4.0-h-tiny" in r.stdout
    assert not Path("/nonexistent/x").exists()
    # the anchors, the tile sweep and the memory claim are planned, inside the 9-minute call
    assert "at most 540 s" in r.stdout and "--tune" in r.stdout and "mamba_chunk_scan_combined" in r.stdout
    assert "--ctx 64k,128k --batch 4,8" in r.stdout and "granite-3.3-8b" in r.stdout
    limits = [int(x) for x in re.findall(r"timeout -k 5 (\d+)", (root / "scripts" / "gpu-check").read_text())]
    assert len(limits) == 9 and sum(limits) <= 530


def test_self_test_passes_in_the_interpreter_and_reports_a_broken_kernel(monkeypatch):
    assert T.self_test("cpu") == []
    monkeypatch.setattr(T, "gated_rms_norm", lambda y, z, w, eps, gs: T.gated_rms_norm_ref(y, z, w, eps, gs) + 1)
    failed = T.self_test("cpu")
    assert len(failed) == 1 and failed[0].startswith("gated_rms_norm: AssertionError")
