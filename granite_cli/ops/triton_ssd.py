"""Triton kernels for Mamba-2's SSD: the chunked scan (three launches) and the decode update.

The chunked scan: chunk state (decay-weighted xᵀB per chunk, with the in-chunk cumsum of dt·A), state
passing (sequential over chunks, fp32), and chunk scan (C·S_prev plus the causal (C Bᵀ ∘ L)·(dt x) term
in BLOCK_M × BLOCK_M tiles, stopping at the diagonal). The decode update changes the state in place.
Conventions (stride groups, names, shape checks) are those of granite_cli.ops.triton_ops, which
exports these launchers beside the other kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from granite_cli.ops import launch
from granite_cli.ops.launch import dot_precision, expect_shapes, low_precision_dots

_P2 = triton.next_power_of_2


# ------------------------------------------------------------------------------------------ SSD scan

@triton.jit
def _chunk_program(nchunks, heads_per_group):
    """(sequence, chunk, head, group) of a program in a grid of (sequences x chunks, heads, ...)."""
    pid = tl.program_id(0)
    head = tl.program_id(1)
    return pid // nchunks, pid % nchunks, head, head // heads_per_group


@triton.jit
def _tile(ptr, rows, row_ok, stride_row, cols, ncols, stride_col):
    """The fp32 tile ptr[rows, cols] (zeros where a row is not row_ok or a column is ≥ ncols)."""
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col,
                   mask=row_ok[:, None] & (cols[None, :] < ncols), other=0.0).to(tl.float32)


@triton.jit
def _mma(a, b, op_dtype, PREC: tl.constexpr, LOWP: tl.constexpr):
    """a @ b accumulated in fp32; with LOWP the fp32 operands are rounded to the input's dtype first (bf16
    tensor-core dots), else multiplied in fp32 (tf32 on a GPU for bf16 inputs, ieee for fp32)."""
    if LOWP:
        return tl.dot(a.to(op_dtype), b.to(op_dtype), out_dtype=tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _chunk_state_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, states_ptr, acs_ptr,
                        seqlen, nheads, nchunks, heads_per_group,
                        stride_x_batch, stride_x_seq, stride_x_head, stride_x_dim,
                        stride_dt_batch, stride_dt_seq, stride_dt_head,
                        stride_B_batch, stride_B_seq, stride_B_group, stride_B_state,
                        HEADDIM: tl.constexpr, DSTATE: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr):
    """Per (sequence, chunk, head): acs = cumsum(dt·A) over the chunk, and the chunk's own state
    Σ_q exp(acs_last − acs_q)·dt_q · x_qᵀ B_q into states [b, chunks, h, BLOCK_P, BLOCK_N] (fp32)."""
    bi, c, hi, gi = _chunk_program(nchunks, heads_per_group)
    q = tl.arange(0, CHUNK)
    pos = c * CHUNK + q
    in_seq = pos < seqlen
    dt = tl.load(dt_ptr + bi * stride_dt_batch + pos * stride_dt_seq + hi * stride_dt_head,
                 mask=in_seq, other=0.0).to(tl.float32)
    a = tl.load(A_ptr + hi).to(tl.float32)
    acs = tl.cumsum(dt * a, 0)
    tl.store(acs_ptr + ((bi * nheads + hi) * nchunks + c) * CHUNK + q, acs)
    last = tl.sum(dt * a, 0)
    w = tl.exp(last - acs) * dt
    pp = tl.arange(0, BLOCK_P)
    nn = tl.arange(0, BLOCK_N)
    x_seq = x_ptr + bi * stride_x_batch + hi * stride_x_head     # this sequence's and head's x, B
    B_seq = B_ptr + bi * stride_B_batch + gi * stride_B_group
    xt = _tile(x_seq, pos, in_seq, stride_x_seq, pp, HEADDIM, stride_x_dim)
    bt = _tile(B_seq, pos, in_seq, stride_B_seq, nn, DSTATE, stride_B_state)
    s = _mma(tl.trans(xt * w[:, None]), bt, x_ptr.dtype.element_ty, PREC, LOWP)  # [BLOCK_P, BLOCK_N]
    base = (((bi * nchunks + c) * nheads + hi) * BLOCK_P) * BLOCK_N
    tl.store(states_ptr + base + pp[:, None] * BLOCK_N + nn[None, :], s)


@triton.jit
def _state_pass_kernel(states_ptr, acs_ptr, init_ptr, prev_ptr, final_ptr, nheads, nchunks,
                       CHUNK: tl.constexpr, HEADDIM: tl.constexpr, DSTATE: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr, HAS_INIT: tl.constexpr):
    """Per (sequence, head, slice of the state): walk the chunks in order, storing each chunk's entry
    state in prev and carrying S ← exp(acs_last)·S + chunk state; the last S is the final state."""
    bi = tl.program_id(0)
    hi = tl.program_id(1)
    blk = tl.program_id(2)
    i = blk * BLOCK + tl.arange(0, BLOCK)
    pi = i // BLOCK_N
    ni = i % BLOCK_N
    in_tile = i < BLOCK_P * BLOCK_N
    real = in_tile & (pi < HEADDIM) & (ni < DSTATE)
    if HAS_INIT:
        s = tl.load(init_ptr + ((bi * nheads + hi) * HEADDIM + pi) * DSTATE + ni, mask=real, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(0, nchunks):
        off = ((bi * nchunks + c) * nheads + hi) * BLOCK_P * BLOCK_N + i
        tl.store(prev_ptr + off, s, mask=in_tile)
        decay = tl.exp(tl.load(acs_ptr + ((bi * nheads + hi) * nchunks + c) * CHUNK + CHUNK - 1))
        s = decay * s + tl.load(states_ptr + off, mask=in_tile, other=0.0)
    tl.store(final_ptr + ((bi * nheads + hi) * HEADDIM + pi) * DSTATE + ni, s, mask=real)


@triton.jit
def _chunk_scan_kernel(x_ptr, dt_ptr, B_ptr, C_ptr, D_ptr, prev_ptr, acs_ptr, y_ptr,
                       seqlen, nheads, nchunks, heads_per_group,
                       stride_x_batch, stride_x_seq, stride_x_head, stride_x_dim,
                       stride_dt_batch, stride_dt_seq, stride_dt_head,
                       stride_B_batch, stride_B_seq, stride_B_group, stride_B_state,
                       stride_C_batch, stride_C_seq, stride_C_group, stride_C_state,
                       HEADDIM: tl.constexpr, DSTATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_D: tl.constexpr, PREC: tl.constexpr,
                       LOWP: tl.constexpr):
    """Per (sequence, chunk, head, BLOCK_M rows of the chunk): y = exp(acs)·C·S_prev + Σ over source
    tiles up to the diagonal of (C Bᵀ ∘ L)·(dt x), + D·x; y [b, t, h, p] fp32."""
    bi, c, hi, gi = _chunk_program(nchunks, heads_per_group)
    mb = tl.program_id(2)
    pp = tl.arange(0, BLOCK_P)
    nn = tl.arange(0, BLOCK_N)
    rm = mb * BLOCK_M + tl.arange(0, BLOCK_M)            # rows (positions within the chunk)
    pos_m = c * CHUNK + rm
    mm = pos_m < seqlen
    acs_base = acs_ptr + ((bi * nheads + hi) * nchunks + c) * CHUNK
    acs_m = tl.load(acs_base + rm)
    x_seq = x_ptr + bi * stride_x_batch + hi * stride_x_head     # this sequence's and head's x, B, C
    B_seq = B_ptr + bi * stride_B_batch + gi * stride_B_group
    cm = _tile(C_ptr + bi * stride_C_batch + gi * stride_C_group, pos_m, mm, stride_C_seq, nn, DSTATE, stride_C_state)
    prev = tl.load(prev_ptr + ((bi * nchunks + c) * nheads + hi) * BLOCK_P * BLOCK_N
                   + pp[:, None] * BLOCK_N + nn[None, :])
    op = x_ptr.dtype.element_ty
    acc = _mma(cm, tl.trans(prev), op, PREC, LOWP) * tl.exp(acs_m)[:, None]  # [BLOCK_M, BLOCK_P]
    for k0 in range(0, (mb + 1) * BLOCK_M, BLOCK_M):   # source tiles up to the diagonal
        rs = k0 + tl.arange(0, BLOCK_M)
        pos_s = c * CHUNK + rs
        ms = pos_s < seqlen
        acs_s = tl.load(acs_base + rs)
        dt_s = tl.load(dt_ptr + bi * stride_dt_batch + pos_s * stride_dt_seq + hi * stride_dt_head,
                       mask=ms, other=0.0).to(tl.float32)
        bs = _tile(B_seq, pos_s, ms, stride_B_seq, nn, DSTATE, stride_B_state)
        xs = _tile(x_seq, pos_s, ms, stride_x_seq, pp, HEADDIM, stride_x_dim)
        cb = _mma(cm, tl.trans(bs), op, PREC, LOWP)  # [BLOCK_M, BLOCK_M]
        causal = rm[:, None] >= rs[None, :]
        lmat = tl.where(causal, tl.exp(tl.minimum(acs_m[:, None] - acs_s[None, :], 0.0)), 0.0)
        acc += _mma(cb * lmat * dt_s[None, :], xs, op, PREC, LOWP)
    if HAS_D:
        xm = _tile(x_seq, pos_m, mm, stride_x_seq, pp, HEADDIM, stride_x_dim)
        acc += tl.load(D_ptr + hi).to(tl.float32) * xm
    tl.store(y_ptr + ((bi * seqlen + pos_m[:, None]) * nheads + hi) * HEADDIM + pp[None, :], acc,
             mask=mm[:, None] & (pp[None, :] < HEADDIM))


def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, initial_state=None, block_tokens=None):
    """Chunked SSD scan in three launches (chunk state, state passing, chunk scan); the reference is
    granite_cli.ops.ssd.ssd_chunked, whose module docstring gives the maths.

    x [b, t, h, p]; dt [b, t, h]; A [h]; B, C [b, t, g, n] with g dividing h; D [h] or None;
    initial_state [b, h, p, n] or None; chunk_size a power of two. x, dt, B and C may be strided.
    Returns (y [b, t, h, p], final_state [b, h, p, n]), both fp32. `block_tokens` is accepted for the
    reference's signature and ignored: the kernels grid over every chunk at once."""
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if h % g:
        raise ValueError(f"ssd_chunked: {h} heads do not split into {g} groups")
    expect_shapes("ssd_chunked", dt=(dt, (b, t, h)), A=(A, (h,)), B=(B, (b, t, g, n)), C=(C, (b, t, g, n)),
            D=(D, (h,)), initial_state=(initial_state, (b, h, p, n)))
    q = chunk_size
    if q < 1 or q & (q - 1):
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
    _chunk_state_kernel[(b * nc, h)](
        x, dt, A.contiguous(), B, states, acs, t, h, nc, h // g, *x.stride(), *dt.stride(), *B.stride(),
        HEADDIM=p, DSTATE=n, CHUNK=q, BLOCK_P=bp, BLOCK_N=bn, PREC=prec, LOWP=lowp)
    init = initial_state.contiguous() if initial_state is not None else final
    block = min(1024, bp * bn)
    _state_pass_kernel[(b, h, triton.cdiv(bp * bn, block))](
        states, acs, init, prev, final, h, nc, CHUNK=q, HEADDIM=p, DSTATE=n, BLOCK_P=bp, BLOCK_N=bn, BLOCK=block,
        HAS_INIT=initial_state is not None)
    _chunk_scan_kernel[(b * nc, h, q // bm)](
        x, dt, B, C, D.contiguous() if D is not None else A, prev, acs, y, t, h, nc, h // g,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(),
        HEADDIM=p, DSTATE=n, CHUNK=q, BLOCK_M=bm, BLOCK_P=bp, BLOCK_N=bn, HAS_D=D is not None, PREC=prec, LOWP=lowp)
    return y, final


# ------------------------------------------------------------------------------------------ decode update

@triton.jit
def _ssd_step_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr, nheads, heads_per_group,
                     HEADDIM: tl.constexpr, DSTATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_D: tl.constexpr):
    """Per (sequence, head, BLOCK_P rows of the state): S ← exp(dt·A)·S + dt·x ⊗ B in place, y = S·C + D·x.
    Every tensor is contiguous."""
    bi = tl.program_id(0)
    hi = tl.program_id(1)
    pb = tl.program_id(2)
    gi = hi // heads_per_group
    ngroups = nheads // heads_per_group
    pp = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    nn = tl.arange(0, BLOCK_N)
    mp = pp < HEADDIM
    mn = nn < DSTATE
    m2 = mp[:, None] & mn[None, :]
    sp = state_ptr + ((bi * nheads + hi) * HEADDIM + pp[:, None]) * DSTATE + nn[None, :]
    s = tl.load(sp, mask=m2, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + bi * nheads + hi).to(tl.float32)
    a = tl.load(A_ptr + hi).to(tl.float32)
    x = tl.load(x_ptr + (bi * nheads + hi) * HEADDIM + pp, mask=mp, other=0.0).to(tl.float32)
    bv = tl.load(B_ptr + (bi * ngroups + gi) * DSTATE + nn, mask=mn, other=0.0).to(tl.float32)
    cv = tl.load(C_ptr + (bi * ngroups + gi) * DSTATE + nn, mask=mn, other=0.0).to(tl.float32)
    s = s * tl.exp(dt * a) + (dt * x)[:, None] * bv[None, :]
    tl.store(sp, s.to(state_ptr.dtype.element_ty), mask=m2)
    y = tl.sum(s * cv[None, :], 1)
    if HAS_D:
        y += tl.load(D_ptr + hi).to(tl.float32) * x
    tl.store(y_ptr + (bi * nheads + hi) * HEADDIM + pp, y, mask=mp)


def ssd_step(state, x, dt, A, B, C, D=None):
    """One decode step of the SSD recurrence; the reference is granite_cli.ops.ssd.ssd_step.

    state [b, h, p, n], contiguous, updated in place; x [b, h, p]; dt [b, h] (softplus'ed); A [h];
    B, C [b, g, n] with g dividing h; D [h] or None. Returns y [b, h, p] in fp32."""
    b, h, p, n = state.shape
    g = B.shape[1]
    if h % g:
        raise ValueError(f"ssd_step: {h} heads do not split into {g} groups")
    expect_shapes("ssd_step", x=(x, (b, h, p)), dt=(dt, (b, h)), A=(A, (h,)), B=(B, (b, g, n)), C=(C, (b, g, n)),
            D=(D, (h,)))
    if not state.is_contiguous():
        raise ValueError("the decode update works in place on a contiguous state")
    y = torch.empty(b, h, p, device=state.device, dtype=torch.float32)
    bp = min(_P2(p), 16)
    _ssd_step_kernel[(b, h, triton.cdiv(p, bp))](
        state, x.contiguous(), dt.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
        D.contiguous() if D is not None else A, y, h, h // g,
        HEADDIM=p, DSTATE=n, BLOCK_P=bp, BLOCK_N=_P2(n), HAS_D=D is not None)
    return y
