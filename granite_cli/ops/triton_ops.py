"""Triton kernels for the hot paths, each a drop-in twin of a pure-PyTorch reference.

| kernel (this module)  | reference (`_ref` twin, same signature)                 |
|-----------------------|--------------------------------------------------------|
| ssd_chunked           | granite_cli.ops.ssd.ssd_chunked                         |
| ssd_step              | granite_cli.ops.ssd.ssd_step                            |
| causal_conv1d         | granite_cli.ops.basic.causal_conv1d                     |
| causal_conv1d_step    | granite_cli.ops.basic.causal_conv1d_step                |
| gated_rms_norm        | granite_cli.ops.basic.gated_rms_norm                    |
| moe_experts           | granite_cli.ops.basic.moe_experts                       |

Designs: the SSD scan and its decode update live in granite_cli.ops.triton_ssd (exported here); the
conv reads its K−1 history columns from the initial state; the MoE is one grouped GEMM launch per
projection over (token, slot) rows sorted by expert, with no per-expert Python loop. Arithmetic is
fp32; loads and stores keep the tensors' dtypes.

Names in the kernels: a tensor's strides arrive as one group, `stride_<tensor>_<dim>`, in the order of
its shape; constexpr sizes are spelled out (HEADDIM, DSTATE, CHUNK) and their power-of-two tiles are
BLOCK_<size>. Each launcher checks every shape before it launches: a kernel indexes raw pointers, so a
wrong shape would otherwise be a wrong answer rather than an error.

Every kernel runs under the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors, which is how CI
tests them (fp32, small grids); on CUDA they run compiled. Import this module only through
granite_cli.ops.dispatch, which decides once whether it is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from granite_cli.ops import OPS, basic, ssd
from granite_cli.ops.launch import dot_precision, expect_shapes, grouped_gemm_tiles, low_precision_dots
from granite_cli.ops.triton_ssd import ssd_chunked, ssd_step  # noqa: F401 - the dispatch's set of kernels

_P2 = triton.next_power_of_2


# ------------------------------------------------------------------------------------------ causal conv1d

@triton.jit
def _conv_kernel(x_ptr, w_ptr, bias_ptr, state_ptr, out_ptr, seqlen, channels,
                 stride_x_batch, stride_x_seq, stride_x_chan,
                 WIDTH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_STATE: tl.constexpr):
    """Per (sequence, BLOCK_T positions, BLOCK_C channels): silu(bias + Σ_j w[c, j]·in[t − (WIDTH−1) + j]),
    inputs before the block read from the state [b, c, WIDTH−1]; w, state and out contiguous."""
    bi = tl.program_id(0)
    tb = tl.program_id(1)
    cb = tl.program_id(2)
    tt = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    cc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mt = tt < seqlen
    mc = cc < channels
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cc, mask=mc, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(WIDTH):
        src = tt - (WIDTH - 1) + j
        wj = tl.load(w_ptr + cc * WIDTH + j, mask=mc, other=0.0).to(tl.float32)
        v = tl.load(x_ptr + bi * stride_x_batch + src[:, None] * stride_x_seq + cc[None, :] * stride_x_chan,
                    mask=(src >= 0)[:, None] & mt[:, None] & mc[None, :], other=0.0).to(tl.float32)
        if HAS_STATE:
            hist = (WIDTH - 1) + src  # column of the initial state for src < 0
            v += tl.load(state_ptr + (bi * channels + cc[None, :]) * (WIDTH - 1) + hist[:, None],
                         mask=(src < 0)[:, None] & mt[:, None] & mc[None, :], other=0.0).to(tl.float32)
        acc += v * wj[None, :]
    out = acc * tl.sigmoid(acc)
    tl.store(out_ptr + (bi * seqlen + tt[:, None]) * channels + cc[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mt[:, None] & mc[None, :])


def causal_conv1d(xbc, weight, bias, conv_state):
    """Causal depthwise conv + SiLU over a block of tokens; the reference is
    granite_cli.ops.basic.causal_conv1d.

    xbc [b, t, c] (may be strided); weight [c, 1, k]; bias [c] or None; conv_state [b, c, k-1] or None
    (zeros). Returns (out [b, t, c] in xbc's dtype, new_state [b, c, k-1])."""
    b, t, c = xbc.shape
    k = weight.shape[-1]
    expect_shapes("causal_conv1d", weight=(weight, (c, 1, k)), bias=(bias, (c,)),
                  conv_state=(conv_state, (b, c, k - 1)))
    out = torch.empty(b, t, c, device=xbc.device, dtype=xbc.dtype)
    st = conv_state.contiguous() if conv_state is not None else None
    bt, bc = 16, min(128, _P2(c))
    w = weight.contiguous()
    _conv_kernel[(b, triton.cdiv(t, bt), triton.cdiv(c, bc))](
        xbc, w, bias if bias is not None else w, st if st is not None else w, out, t, c, *xbc.stride(),
        WIDTH=k, BLOCK_T=bt, BLOCK_C=bc, HAS_BIAS=bias is not None, HAS_STATE=st is not None)
    return out, basic.conv_state_after(xbc, k, st)


@triton.jit
def _conv_step_kernel(x_ptr, w_ptr, bias_ptr, state_ptr, out_ptr, channels, WIDTH: tl.constexpr,
                      BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per (sequence, BLOCK_C channels): silu of the conv over the state's WIDTH−1 inputs and x, then the
    state shifts left by one with x appended, in place. Every tensor is contiguous."""
    bi = tl.program_id(0)
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = cc < channels
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cc, mask=mc, other=0.0).to(tl.float32)
    xv = tl.load(x_ptr + bi * channels + cc, mask=mc, other=0.0)
    base = state_ptr + (bi * channels + cc) * (WIDTH - 1)
    for j in tl.static_range(WIDTH - 1):
        v = tl.load(base + j, mask=mc, other=0.0)
        acc += v.to(tl.float32) * tl.load(w_ptr + cc * WIDTH + j, mask=mc, other=0.0).to(tl.float32)
        if j > 0:
            tl.store(base + j - 1, v, mask=mc)   # shift left in place (each program owns its channels)
    acc += xv.to(tl.float32) * tl.load(w_ptr + cc * WIDTH + WIDTH - 1, mask=mc, other=0.0).to(tl.float32)
    if WIDTH > 1:
        tl.store(base + WIDTH - 2, xv.to(state_ptr.dtype.element_ty), mask=mc)
    tl.store(out_ptr + bi * channels + cc, (acc * tl.sigmoid(acc)).to(out_ptr.dtype.element_ty), mask=mc)


def causal_conv1d_step(x, weight, bias, conv_state):
    """One token of the causal conv + SiLU; the reference is granite_cli.ops.basic.causal_conv1d_step.

    x [b, c]; weight [c, 1, k]; bias [c] or None; conv_state [b, c, k-1], contiguous, shifted in place.
    Returns silu(conv) [b, c] in the promoted dtype of conv_state and weight."""
    b, c = x.shape
    k = weight.shape[-1]
    expect_shapes("causal_conv1d_step", weight=(weight, (c, 1, k)), bias=(bias, (c,)),
                  conv_state=(conv_state, (b, c, k - 1)))
    if not conv_state.is_contiguous():
        raise ValueError("the conv update shifts a contiguous conv_state in place")
    out_dtype = torch.promote_types(conv_state.dtype, weight.dtype)
    out = torch.empty(b, c, device=x.device, dtype=out_dtype)
    bc = min(256, _P2(c))
    w = weight.contiguous()
    _conv_step_kernel[(b, triton.cdiv(c, bc))](
        x.contiguous(), w, bias if bias is not None else w, conv_state, out, c,
        WIDTH=k, BLOCK_C=bc, HAS_BIAS=bias is not None)
    return out


# ------------------------------------------------------------------------------------------ gated RMSNorm

@triton.jit
def _gated_norm_kernel(y_ptr, z_ptr, w_ptr, out_ptr, width, eps, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """Per (row, group of GROUP features): v = y·silu(z); out = v / rms(v) · w. Every tensor is contiguous."""
    row = tl.program_id(0)
    grp = tl.program_id(1)
    i = tl.arange(0, BLOCK)
    m = i < GROUP
    off = row * width + grp * GROUP + i
    y = tl.load(y_ptr + off, mask=m, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + off, mask=m, other=0.0).to(tl.float32)
    v = y * z * tl.sigmoid(z)
    rstd = 1.0 / tl.sqrt(tl.sum(v * v, 0) / GROUP + eps)
    w = tl.load(w_ptr + grp * GROUP + i, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, v * rstd * w, mask=m)


def gated_rms_norm(y, z, weight, eps, group_size):
    """Mamba-2's gated RMSNorm (norm_before_gate=False); the reference is
    granite_cli.ops.basic.gated_rms_norm.

    y, z [..., d] of one shape, with group_size dividing d; weight [d]. Returns fp32 [..., d]."""
    shape = y.shape
    d = shape[-1]
    expect_shapes("gated_rms_norm", z=(z, shape), weight=(weight, (d,)))
    if group_size < 1 or d % group_size:
        raise ValueError(f"gated_rms_norm: group size {group_size} does not divide the width {d}")
    y2 = y.reshape(-1, d).contiguous()
    z2 = z.reshape(-1, d).contiguous()
    out = torch.empty(y2.shape, device=y.device, dtype=torch.float32)
    _gated_norm_kernel[(y2.shape[0], d // group_size)](
        y2, z2, weight.contiguous(), out, d, eps, GROUP=group_size, BLOCK=_P2(group_size))
    return out.view(shape)


# ------------------------------------------------------------------------------------------ MoE grouped GEMM

@triton.jit
def _grouped_gemm_kernel(a_ptr, rows_ptr, w_ptr, offsets_ptr, scale_ptr, out_ptr, n_out, k_in,
                         stride_a_row,
                         stride_w_expert, stride_w_out, stride_w_in,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         HAS_SCALE: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr):
    """Per (expert, BLOCK_M of its rows, BLOCK_N outputs): out[r] = a[rows[r]] @ w[e]ᵀ (× scale[r]) for the
    rows offsets[e] ≤ r < offsets[e+1]; out [rows, n_out] contiguous."""
    e = tl.program_id(0)
    mb = tl.program_id(1)
    nb = tl.program_id(2)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    if start + mb * BLOCK_M >= end:  # no rows of this expert in this block: read no weights
        return
    r = start + mb * BLOCK_M + tl.arange(0, BLOCK_M)      # sorted (token, slot) rows of expert e
    mr = r < end
    src = tl.load(rows_ptr + r, mask=mr, other=0)  # the token each row reads
    nn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = nn < n_out
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mk = kk < k_in
        a = tl.load(a_ptr + src[:, None] * stride_a_row + kk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        w = tl.load(w_ptr + e * stride_w_expert + nn[:, None] * stride_w_out + kk[None, :] * stride_w_in,
                    mask=mn[:, None] & mk[None, :], other=0.0)
        if LOWP:  # the tensor cores' bf16/fp16 operands, fp32 accumulation
            acc += tl.dot(a, tl.trans(w), out_dtype=tl.float32)
        else:
            acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision=PREC)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + r, mask=mr, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + r[:, None] * n_out + nn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mr[:, None] & mn[None, :])


def grouped_gemm(a, rows, w, offsets, max_rows, scale=None, tiles=None, lowp=None):
    """out[r] = a[rows[r]] @ w[e(r)]ᵀ (× scale[r]) for rows r sorted by expert; one launch.

    a [tokens, k]; rows [R] int32 (the token row r reads); w [E, n, k] (may be strided); offsets [E+1]
    int32, expert e's rows being offsets[e] ≤ r < offsets[e+1]; max_rows bounds any expert's row count;
    scale [R] or None. Returns [R, n] in a's dtype. `tiles` (BLOCK_M, BLOCK_N, BLOCK_K) and `lowp`
    (bf16/fp16 operands into the dots) default to the tile table and the device."""
    e, n, k = w.shape
    r = rows.shape[0]
    expect_shapes("grouped_gemm", a=(a, (a.shape[0], k)), rows=(rows, (r,)), offsets=(offsets, (e + 1,)),
            scale=(scale, (r,)))
    out = torch.empty(r, n, device=a.device, dtype=a.dtype)
    if r == 0:
        return out
    bm, bn, bk = tiles or grouped_gemm_tiles(r, n, k, a.dtype, a.device)
    a = a.contiguous()
    _grouped_gemm_kernel[(e, triton.cdiv(max_rows, bm), triton.cdiv(n, bn))](
        a, rows, w, offsets, scale if scale is not None else a, out, n, k, a.stride(0), *w.stride(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, HAS_SCALE=scale is not None, PREC=dot_precision(a),
        LOWP=(low_precision_dots(a) and a.dtype == w.dtype) if lowp is None else lowp)
    return out


def moe_experts(x, w_in, w_out, weights, ids):
    """Routed SwiGLU experts as two grouped-GEMM launches over (token, slot) rows sorted by expert; the
    reference is granite_cli.ops.basic.moe_experts.

    x [tokens, D]; w_in [E, 2I, D] (gate rows, then up); w_out [E, D, I]; weights, ids [tokens, k].
    Returns [tokens, D] in x's dtype."""
    n, k = ids.shape
    e, i2, d = w_in.shape
    expect_shapes("moe_experts", x=(x, (n, d)), w_out=(w_out, (e, d, i2 // 2)), weights=(weights, (n, k)))
    i_w = i2 // 2
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = (order // k).to(torch.int32)
    wsel = weights.to(x.dtype).reshape(-1)[order]
    # (bincount reads its maximum back to the host on CUDA: a sync, which a CUDA graph cannot hold)
    counts = torch.zeros(e, dtype=torch.int64, device=x.device).index_add_(0, flat, torch.ones_like(flat))
    offsets = torch.zeros(e + 1, dtype=torch.int32, device=x.device)
    offsets[1:] = torch.cumsum(counts, 0)
    # Rows per expert are at most the token count; for a few tokens (decode) use that bound and
    # skip reading counts back to the host, so the step has no sync and can be a CUDA graph.
    max_rows = n if n <= 64 else int(counts.max())
    h = grouped_gemm(x, tok, w_in, offsets, max_rows)                       # [n·k, 2I]
    m = (torch.nn.functional.silu(h[:, :i_w].float()) * h[:, i_w:].float()).to(x.dtype)
    seq = torch.arange(m.shape[0], dtype=torch.int32, device=x.device)
    o = grouped_gemm(m, seq, w_out, offsets, max_rows, scale=wsel)          # [n·k, D]
    return torch.zeros_like(x).index_add_(0, tok.long(), o)


# The references, as `*_ref` twins of the kernels with the same signatures.
ssd_chunked_ref, ssd_step_ref = ssd.ssd_chunked, ssd.ssd_step
causal_conv1d_ref, causal_conv1d_step_ref = basic.causal_conv1d, basic.causal_conv1d_step
gated_rms_norm_ref, moe_experts_ref = basic.gated_rms_norm, basic.moe_experts
KERNELS = OPS


def _random(g: torch.Generator, device, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(device)


def self_test(device) -> list[str]:
    """Run every kernel once on small random inputs on `device` and compare with its reference.
    Returns what failed (compile errors, launch errors, mismatches); empty when all agree. `auto`
    runs this before choosing Triton on a GPU, so a kernel that does not build there means the
    reference ops, with a warning, instead of a failed run."""
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return _random(g, device, *s)

    def rate(*s):
        return (torch.rand(*s, generator=g) * 0.2 + 0.01).to(device)

    def decay(h):
        return -(torch.rand(h, generator=g) + 0.5).to(device)

    cases = {
        "ssd_chunked": lambda: ((r(1, 40, 4, 16), rate(1, 40, 4), decay(4), r(1, 40, 2, 16), r(1, 40, 2, 16), 16,
                                 r(4), r(1, 4, 16, 16)), None),
        "ssd_step": lambda: ((r(2, 4, 16, 16), r(2, 4, 16), rate(2, 4), decay(4), r(2, 2, 16), r(2, 2, 16), r(4)), 0),
        "causal_conv1d": lambda: ((r(2, 20, 48), r(48, 1, 4), r(48), r(2, 48, 3)), None),
        "causal_conv1d_step": lambda: ((r(2, 48), r(48, 1, 4), r(48), r(2, 48, 3)), 3),
        "gated_rms_norm": lambda: ((r(6, 64), r(6, 64), r(64), 1e-5, 32), None),
        "moe_experts": lambda: ((r(10, 32), r(4, 48, 32) * 0.2, r(4, 32, 24) * 0.2,
                                 torch.rand(10, 2, generator=g).to(device),
                                 torch.randint(0, 3, (10, 2), generator=g).to(device)), None),
    }
    failed = []
    for op, make in cases.items():
        try:
            args, inplace = make()
            a2 = tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in args)
            got, want = globals()[op](*args), globals()[op + "_ref"](*a2)
            pairs = list(zip(got, want)) if isinstance(got, tuple) else [(got, want)]
            if inplace is not None:
                pairs.append((args[inplace], a2[inplace]))
            for x, y in pairs:
                if not torch.allclose(x.float(), y.float(), rtol=1e-3, atol=1e-3):
                    raise AssertionError(f"max difference {(x.float() - y.float()).abs().max().item():.3g}")
        except Exception as e:  # noqa: BLE001 - reported, and the caller falls back
            failed.append(f"{op}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return failed
