"""Triton kernels for the hot paths, each a drop-in twin of a pure-PyTorch reference.

| kernel (this module)  | reference (`_ref` twin, same signature and docstring) |
|-----------------------|--------------------------------------------------------|
| ssd_chunked           | granite_cli.ops.ssd.ssd_chunked                         |
| ssd_step              | granite_cli.ops.ssd.ssd_step                            |
| causal_conv1d         | granite_cli.ops.basic.causal_conv1d                     |
| causal_conv1d_step    | granite_cli.ops.basic.causal_conv1d_step                |
| gated_rms_norm        | granite_cli.ops.basic.gated_rms_norm                    |
| moe_experts           | granite_cli.ops.basic.moe_experts                       |

Designs: the SSD scan is three launches, chunk state (decay-weighted xᵀB per
chunk, with the in-chunk cumsum of dt·A), state passing (sequential over chunks, fp32), and chunk scan
(C·S_prev plus the causal (C Bᵀ ∘ L)·(dt x) term in BLOCK_M × BLOCK_M tiles, stopping at the diagonal);
the decode update changes the state in place; the conv reads its K−1 history columns from the
initial state; the MoE is one grouped GEMM launch per projection over (token, slot) rows sorted by
expert, with no per-expert Python loop. Arithmetic is fp32; loads and stores keep the tensors' dtypes.

Every kernel runs under the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors, which is how CI
tests them (fp32, small grids); on CUDA they run compiled. Import this module only through
granite_cli.ops.dispatch, which decides once whether it is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from granite_cli.ops import OPS, basic, launch, ssd
from granite_cli.ops.launch import dot_precision, grouped_gemm_tiles, low_precision_dots

_P2 = triton.next_power_of_2


# ------------------------------------------------------------------------------------------ SSD scan

@triton.jit
def _chunk_program(NC, HG):
    """(sequence, chunk, head, group) of a program in a grid of (sequences x chunks, heads, ...)."""
    pid = tl.program_id(0)
    hi = tl.program_id(1)
    return pid // NC, pid % NC, hi, hi // HG


@triton.jit
def _mma(a, b, op_dtype, PREC: tl.constexpr, LOWP: tl.constexpr):
    """a @ b accumulated in fp32; with LOWP the fp32 operands are rounded to the input's dtype first (bf16
    tensor-core dots), else multiplied in fp32 (tf32 on a GPU for bf16 inputs, ieee for fp32)."""
    if LOWP:
        return tl.dot(a.to(op_dtype), b.to(op_dtype), out_dtype=tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _chunk_state_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, st_ptr, acs_ptr,
                        T, H, NC, HG,
                        sxb, sxt, sxh, sxp, sdb, sdt, sdh, sbb, sbt, sbg, sbn,
                        P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr,
                        BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr):
    bi, c, hi, gi = _chunk_program(NC, HG)
    q = tl.arange(0, Q)
    pos = c * Q + q
    mq = pos < T
    dt = tl.load(dt_ptr + bi * sdb + pos * sdt + hi * sdh, mask=mq, other=0.0).to(tl.float32)
    a = tl.load(A_ptr + hi).to(tl.float32)
    acs = tl.cumsum(dt * a, 0)
    tl.store(acs_ptr + ((bi * H + hi) * NC + c) * Q + q, acs)
    last = tl.sum(dt * a, 0)
    w = tl.exp(last - acs) * dt
    pp = tl.arange(0, BP)
    nn = tl.arange(0, BN)
    xt = tl.load(x_ptr + bi * sxb + pos[:, None] * sxt + hi * sxh + pp[None, :] * sxp,
                 mask=mq[:, None] & (pp[None, :] < P), other=0.0).to(tl.float32)
    bt = tl.load(B_ptr + bi * sbb + pos[:, None] * sbt + gi * sbg + nn[None, :] * sbn,
                 mask=mq[:, None] & (nn[None, :] < N), other=0.0).to(tl.float32)
    s = _mma(tl.trans(xt * w[:, None]), bt, x_ptr.dtype.element_ty, PREC, LOWP)  # [BP, BN]
    base = (((bi * NC + c) * H + hi) * BP) * BN
    tl.store(st_ptr + base + pp[:, None] * BN + nn[None, :], s)


@triton.jit
def _state_pass_kernel(st_ptr, acs_ptr, init_ptr, prev_ptr, fin_ptr, H, NC,
                       Q: tl.constexpr, P: tl.constexpr, N: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                       BLOCK: tl.constexpr, HAS_INIT: tl.constexpr):
    bi = tl.program_id(0)
    hi = tl.program_id(1)
    blk = tl.program_id(2)
    i = blk * BLOCK + tl.arange(0, BLOCK)
    pi = i // BN
    ni = i % BN
    m = i < BP * BN
    real = m & (pi < P) & (ni < N)
    if HAS_INIT:
        s = tl.load(init_ptr + ((bi * H + hi) * P + pi) * N + ni, mask=real, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(0, NC):
        off = ((bi * NC + c) * H + hi) * BP * BN + i
        tl.store(prev_ptr + off, s, mask=m)
        decay = tl.exp(tl.load(acs_ptr + ((bi * H + hi) * NC + c) * Q + Q - 1))
        s = decay * s + tl.load(st_ptr + off, mask=m, other=0.0)
    tl.store(fin_ptr + ((bi * H + hi) * P + pi) * N + ni, s, mask=real)


@triton.jit
def _chunk_scan_kernel(x_ptr, dt_ptr, B_ptr, C_ptr, D_ptr, prev_ptr, acs_ptr, y_ptr,
                       T, H, NC, HG,
                       sxb, sxt, sxh, sxp, sdb, sdt, sdh, sbb, sbt, sbg, sbn, scb, sct, scg, scn,
                       P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr, BM: tl.constexpr,
                       BP: tl.constexpr, BN: tl.constexpr, HAS_D: tl.constexpr, PREC: tl.constexpr,
                       LOWP: tl.constexpr):
    bi, c, hi, gi = _chunk_program(NC, HG)
    mb = tl.program_id(2)
    pp = tl.arange(0, BP)
    nn = tl.arange(0, BN)
    rm = mb * BM + tl.arange(0, BM)            # rows (positions within the chunk)
    pos_m = c * Q + rm
    mm = pos_m < T
    acs_base = acs_ptr + ((bi * H + hi) * NC + c) * Q
    acs_m = tl.load(acs_base + rm)
    cm = tl.load(C_ptr + bi * scb + pos_m[:, None] * sct + gi * scg + nn[None, :] * scn,
                 mask=mm[:, None] & (nn[None, :] < N), other=0.0).to(tl.float32)
    prev = tl.load(prev_ptr + ((bi * NC + c) * H + hi) * BP * BN + pp[:, None] * BN + nn[None, :])
    op = x_ptr.dtype.element_ty
    acc = _mma(cm, tl.trans(prev), op, PREC, LOWP) * tl.exp(acs_m)[:, None]  # [BM, BP]
    for k0 in range(0, (mb + 1) * BM, BM):   # source tiles up to the diagonal
        rs = k0 + tl.arange(0, BM)
        pos_s = c * Q + rs
        ms = pos_s < T
        acs_s = tl.load(acs_base + rs)
        dt_s = tl.load(dt_ptr + bi * sdb + pos_s * sdt + hi * sdh, mask=ms, other=0.0).to(tl.float32)
        bs = tl.load(B_ptr + bi * sbb + pos_s[:, None] * sbt + gi * sbg + nn[None, :] * sbn,
                     mask=ms[:, None] & (nn[None, :] < N), other=0.0).to(tl.float32)
        xs = tl.load(x_ptr + bi * sxb + pos_s[:, None] * sxt + hi * sxh + pp[None, :] * sxp,
                     mask=ms[:, None] & (pp[None, :] < P), other=0.0).to(tl.float32)
        cb = _mma(cm, tl.trans(bs), op, PREC, LOWP)  # [BM, BM]
        causal = rm[:, None] >= rs[None, :]
        lmat = tl.where(causal, tl.exp(tl.minimum(acs_m[:, None] - acs_s[None, :], 0.0)), 0.0)
        acc += _mma(cb * lmat * dt_s[None, :], xs, op, PREC, LOWP)
    if HAS_D:
        xm = tl.load(x_ptr + bi * sxb + pos_m[:, None] * sxt + hi * sxh + pp[None, :] * sxp,
                     mask=mm[:, None] & (pp[None, :] < P), other=0.0).to(tl.float32)
        acc += tl.load(D_ptr + hi).to(tl.float32) * xm
    tl.store(y_ptr + ((bi * T + pos_m[:, None]) * H + hi) * P + pp[None, :], acc,
             mask=mm[:, None] & (pp[None, :] < P))


def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, initial_state=None, block_tokens=None):
    # block_tokens: the reference path's batching of chunks; the kernel grids over every chunk at once
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    q = chunk_size
    if q & (q - 1):
        raise ValueError(f"the Triton SSD scan needs a power-of-two chunk size, got {q}")
    nc = triton.cdiv(t, q)
    bp, bn = max(16, _P2(p)), max(16, _P2(n))
    bm = min(q, 64)
    dev = x.device
    f32 = torch.float32
    acs = torch.empty(b, h, nc, q, device=dev, dtype=f32)
    states = torch.empty(b, nc, h, bp, bn, device=dev, dtype=f32)
    prev = torch.empty_like(states)
    final = torch.empty(b, h, p, n, device=dev, dtype=f32)
    y = torch.empty(b, t, h, p, device=dev, dtype=f32)
    prec, lowp = dot_precision(x), launch.SSD_DOTS == "input" and low_precision_dots(x)
    _chunk_state_kernel[(b * nc, h)](x, dt, A, B, states, acs, t, h, nc, h // g, *x.stride(), *dt.stride(), *B.stride(),
                                     P=p, N=n, Q=q, BP=bp, BN=bn, PREC=prec, LOWP=lowp)
    init = initial_state.contiguous() if initial_state is not None else final
    block = min(1024, bp * bn)
    has_init = initial_state is not None
    _state_pass_kernel[(b, h, triton.cdiv(bp * bn, block))](states, acs, init, prev, final, h, nc, Q=q, P=p, N=n,
                                                            BP=bp, BN=bn, BLOCK=block, HAS_INIT=has_init)
    _chunk_scan_kernel[(b * nc, h, q // bm)](x, dt, B, C, D if D is not None else A, prev, acs, y, t, h, nc, h // g,
                                             *x.stride(), *dt.stride(), *B.stride(), *C.stride(),
                                             P=p, N=n, Q=q, BM=bm, BP=bp, BN=bn, HAS_D=D is not None, PREC=prec,
                                             LOWP=lowp)
    return y, final


# ------------------------------------------------------------------------------------------ decode update

@triton.jit
def _ssd_step_kernel(s_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr, H, HG,
                     P: tl.constexpr, N: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HAS_D: tl.constexpr):
    bi = tl.program_id(0)
    hi = tl.program_id(1)
    pb = tl.program_id(2)
    gi = hi // HG
    pp = pb * BP + tl.arange(0, BP)
    nn = tl.arange(0, BN)
    mp = pp < P
    mn = nn < N
    m2 = mp[:, None] & mn[None, :]
    sp = s_ptr + ((bi * H + hi) * P + pp[:, None]) * N + nn[None, :]
    s = tl.load(sp, mask=m2, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + bi * H + hi).to(tl.float32)
    a = tl.load(A_ptr + hi).to(tl.float32)
    x = tl.load(x_ptr + (bi * H + hi) * P + pp, mask=mp, other=0.0).to(tl.float32)
    bv = tl.load(B_ptr + (bi * (H // HG) + gi) * N + nn, mask=mn, other=0.0).to(tl.float32)
    cv = tl.load(C_ptr + (bi * (H // HG) + gi) * N + nn, mask=mn, other=0.0).to(tl.float32)
    s = s * tl.exp(dt * a) + (dt * x)[:, None] * bv[None, :]
    tl.store(sp, s.to(s_ptr.dtype.element_ty), mask=m2)
    y = tl.sum(s * cv[None, :], 1)
    if HAS_D:
        y += tl.load(D_ptr + hi).to(tl.float32) * x
    tl.store(y_ptr + (bi * H + hi) * P + pp, y, mask=mp)


def ssd_step(state, x, dt, A, B, C, D=None):
    b, h, p, n = state.shape
    g = B.shape[1]
    if not state.is_contiguous():
        raise ValueError("the decode update works in place on a contiguous state")
    y = torch.empty(b, h, p, device=state.device, dtype=torch.float32)
    bp = min(_P2(p), 16)
    _ssd_step_kernel[(b, h, triton.cdiv(p, bp))](state, x.contiguous(), dt.contiguous(), A, B.contiguous(),
                                                 C.contiguous(), D if D is not None else A, y, h, h // g, P=p, N=n,
                                                 BP=bp, BN=_P2(n), HAS_D=D is not None)
    return y


# ------------------------------------------------------------------------------------------ causal conv1d

@triton.jit
def _conv_kernel(x_ptr, w_ptr, b_ptr, st_ptr, o_ptr, T, Cn, sxb, sxt, sxc,
                 K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr):
    bi = tl.program_id(0)
    tb = tl.program_id(1)
    cb = tl.program_id(2)
    tt = tb * BT + tl.arange(0, BT)
    cc = cb * BC + tl.arange(0, BC)
    mt = tt < T
    mc = cc < Cn
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cc, mask=mc, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(K):
        src = tt - (K - 1) + j
        wj = tl.load(w_ptr + cc * K + j, mask=mc, other=0.0).to(tl.float32)
        v = tl.load(x_ptr + bi * sxb + src[:, None] * sxt + cc[None, :] * sxc,
                    mask=(src >= 0)[:, None] & mt[:, None] & mc[None, :], other=0.0).to(tl.float32)
        if HAS_STATE:
            hist = (K - 1) + src  # column of the initial state for src < 0
            v += tl.load(st_ptr + (bi * Cn + cc[None, :]) * (K - 1) + hist[:, None],
                         mask=(src < 0)[:, None] & mt[:, None] & mc[None, :], other=0.0).to(tl.float32)
        acc += v * wj[None, :]
    out = acc * tl.sigmoid(acc)
    tl.store(o_ptr + (bi * T + tt[:, None]) * Cn + cc[None, :], out.to(o_ptr.dtype.element_ty),
             mask=mt[:, None] & mc[None, :])


def causal_conv1d(xbc, weight, bias, conv_state):
    b, t, c = xbc.shape
    k = weight.shape[-1]
    out = torch.empty(b, t, c, device=xbc.device, dtype=xbc.dtype)
    st = conv_state.contiguous() if conv_state is not None else None
    bt, bc = 16, min(128, _P2(c))
    _conv_kernel[(b, triton.cdiv(t, bt), triton.cdiv(c, bc))](
        xbc, weight.contiguous(), bias if bias is not None else weight, st if st is not None else weight, out, t, c,
        *xbc.stride(), K=k, BT=bt, BC=bc, HAS_BIAS=bias is not None, HAS_STATE=st is not None)
    return out, basic.conv_state_after(xbc, k, st)


@triton.jit
def _conv_step_kernel(x_ptr, w_ptr, b_ptr, st_ptr, o_ptr, Cn, K: tl.constexpr, BC: tl.constexpr,
                      HAS_BIAS: tl.constexpr):
    bi = tl.program_id(0)
    cc = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = cc < Cn
    acc = tl.zeros([BC], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cc, mask=mc, other=0.0).to(tl.float32)
    xv = tl.load(x_ptr + bi * Cn + cc, mask=mc, other=0.0)
    base = st_ptr + (bi * Cn + cc) * (K - 1)
    for j in tl.static_range(K - 1):
        v = tl.load(base + j, mask=mc, other=0.0)
        acc += v.to(tl.float32) * tl.load(w_ptr + cc * K + j, mask=mc, other=0.0).to(tl.float32)
        if j > 0:
            tl.store(base + j - 1, v, mask=mc)   # shift left in place (each program owns its channels)
    acc += xv.to(tl.float32) * tl.load(w_ptr + cc * K + K - 1, mask=mc, other=0.0).to(tl.float32)
    if K > 1:
        tl.store(base + K - 2, xv.to(st_ptr.dtype.element_ty), mask=mc)
    tl.store(o_ptr + bi * Cn + cc, (acc * tl.sigmoid(acc)).to(o_ptr.dtype.element_ty), mask=mc)


def causal_conv1d_step(x, weight, bias, conv_state):
    b, c = x.shape
    k = weight.shape[-1]
    if not conv_state.is_contiguous():
        raise ValueError("the conv update shifts a contiguous conv_state in place")
    out_dtype = torch.promote_types(conv_state.dtype, weight.dtype)
    out = torch.empty(b, c, device=x.device, dtype=out_dtype)
    bc = min(256, _P2(c))
    _conv_step_kernel[(b, triton.cdiv(c, bc))](x.contiguous(), weight.contiguous(),
                                               bias if bias is not None else weight,
                                               conv_state, out, c, K=k, BC=bc, HAS_BIAS=bias is not None)
    return out


# ------------------------------------------------------------------------------------------ gated RMSNorm

@triton.jit
def _gated_norm_kernel(y_ptr, z_ptr, w_ptr, o_ptr, D, eps, GS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    grp = tl.program_id(1)
    i = tl.arange(0, BLOCK)
    m = i < GS
    off = row * D + grp * GS + i
    y = tl.load(y_ptr + off, mask=m, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + off, mask=m, other=0.0).to(tl.float32)
    v = y * z * tl.sigmoid(z)
    rstd = 1.0 / tl.sqrt(tl.sum(v * v, 0) / GS + eps)
    w = tl.load(w_ptr + grp * GS + i, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + off, v * rstd * w, mask=m)


def gated_rms_norm(y, z, weight, eps, group_size):
    shape = y.shape
    d = shape[-1]
    y2 = y.reshape(-1, d).contiguous()
    z2 = z.reshape(-1, d).contiguous()
    out = torch.empty(y2.shape, device=y.device, dtype=torch.float32)
    _gated_norm_kernel[(y2.shape[0], d // group_size)](y2, z2, weight, out, d, eps, GS=group_size,
                                                       BLOCK=_P2(group_size))
    return out.view(shape)


# ------------------------------------------------------------------------------------------ MoE grouped GEMM

@triton.jit
def _grouped_gemm_kernel(a_ptr, rows_ptr, w_ptr, off_ptr, scale_ptr, o_ptr, Nn, Kk,
                         sab, swe, swn, swk,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_SCALE: tl.constexpr,
                         PREC: tl.constexpr, LOWP: tl.constexpr):
    e = tl.program_id(0)
    mb = tl.program_id(1)
    nb = tl.program_id(2)
    start = tl.load(off_ptr + e)
    end = tl.load(off_ptr + e + 1)
    if start + mb * BM >= end:  # no rows of this expert in this block: read no weights
        return
    r = start + mb * BM + tl.arange(0, BM)      # sorted (token, slot) rows of expert e
    mr = r < end
    src = tl.load(rows_ptr + r, mask=mr, other=0)  # the token each row reads
    nn = nb * BN + tl.arange(0, BN)
    mn = nn < Nn
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, Kk, BK):
        kk = k0 + tl.arange(0, BK)
        mk = kk < Kk
        a = tl.load(a_ptr + src[:, None] * sab + kk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        w = tl.load(w_ptr + e * swe + nn[:, None] * swn + kk[None, :] * swk, mask=mn[:, None] & mk[None, :], other=0.0)
        if LOWP:  # the tensor cores' bf16/fp16 operands, fp32 accumulation
            acc += tl.dot(a, tl.trans(w), out_dtype=tl.float32)
        else:
            acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision=PREC)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + r, mask=mr, other=0.0).to(tl.float32)[:, None]
    tl.store(o_ptr + r[:, None] * Nn + nn[None, :], acc.to(o_ptr.dtype.element_ty), mask=mr[:, None] & mn[None, :])


def grouped_gemm(a, rows, w, offsets, max_rows, scale=None, tiles=None, lowp=None):
    """out[r] = a[rows[r]] @ w[e(r)]ᵀ (× scale[r]) for rows r sorted by expert; one launch. `tiles`
    (BM, BN, BK) and `lowp` (bf16/fp16 operands into the dots) default to the tile table and the device."""
    e, n, k = w.shape
    out = torch.empty(rows.shape[0], n, device=a.device, dtype=a.dtype)
    if rows.shape[0] == 0:
        return out
    bm, bn, bk = tiles or grouped_gemm_tiles(rows.shape[0], n, k, a.dtype, a.device)
    a = a.contiguous()
    _grouped_gemm_kernel[(e, triton.cdiv(max_rows, bm), triton.cdiv(n, bn))](
        a, rows, w, offsets, scale if scale is not None else a, out, n, k, a.stride(0), *w.stride(),
        BM=bm, BN=bn, BK=bk, HAS_SCALE=scale is not None, PREC=dot_precision(a),
        LOWP=(low_precision_dots(a) and a.dtype == w.dtype) if lowp is None else lowp)
    return out


def moe_experts(x, w_in, w_out, weights, ids):
    n, k = ids.shape
    e = w_in.shape[0]
    i_w = w_in.shape[1] // 2
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


# The references as `*_ref` twins of the kernels, with the kernels' docstrings.
ssd_chunked_ref, ssd_step_ref = ssd.ssd_chunked, ssd.ssd_step
causal_conv1d_ref, causal_conv1d_step_ref = basic.causal_conv1d, basic.causal_conv1d_step
gated_rms_norm_ref, moe_experts_ref = basic.gated_rms_norm, basic.moe_experts
KERNELS = OPS
for _op in KERNELS:
    globals()[_op].__doc__ = globals()[_op + "_ref"].__doc__


def self_test(device) -> list[str]:
    """Run every kernel once on small random inputs on `device` and compare with its reference.
    Returns what failed (compile errors, launch errors, mismatches); empty when all agree. `auto`
    runs this before choosing Triton on a GPU, so a kernel that does not build there means the
    reference ops, with a warning, instead of a failed run."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    cases = {
        "ssd_chunked": lambda: ((r(1, 40, 4, 16), (torch.rand(1, 40, 4, generator=g) * 0.2 + 0.01).to(device),
                                 -(torch.rand(4, generator=g) + 0.5).to(device), r(1, 40, 2, 16), r(1, 40, 2, 16), 16,
                                 r(4), r(1, 4, 16, 16)), None),
        "ssd_step": lambda: ((r(2, 4, 16, 16), r(2, 4, 16), (torch.rand(2, 4, generator=g) * 0.2).to(device),
                              -(torch.rand(4, generator=g) + 0.5).to(device), r(2, 2, 16), r(2, 2, 16), r(4)), 0),
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
