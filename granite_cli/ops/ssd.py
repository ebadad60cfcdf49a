"""Mamba-2 SSD: the chunked scan (the reference path) and a naive recurrence (the oracle).

Shapes (b batch, t tokens, h heads, p head dim, g groups, n state; heads h use group h // (h/g)):
    x  [b, t, h, p]   dt [b, t, h] (already softplus'ed and clamped; fp32)   A [h] (= -exp(A_log), fp32)
    B  [b, t, g, n]   C  [b, t, g, n]   D [h] or None   initial_state [b, h, p, n] or None
Returns y [b, t, h, p] (fp32) and the final state [b, h, p, n] (fp32).

Recurrence per head: S_t = exp(dt_t A) S_{t-1} + dt_t x_t ⊗ B_t ;  y_t = S_t C_t + D x_t.

The chunked form walks the sequence one block of chunks at a time (one chunk by default), so its
working memory is O(b·h·block·chunk + (block/chunk)·b·h·p·n) whatever the sequence length, which is
O(b·h·chunk² + b·h·p·n) for a fixed block (never O(t²), and never the
broadcast-then-sum (b, chunks, Q, Q, h, n) tensors of the older transformers torch path). Within a
chunk: the intra-chunk term is attention with a decay mask (L ∘ CBᵀ)·(dt x); the entry state
contributes exp(cumsum) · C·S; the chunk's own contribution to the state is a single GEMM per group.
"""

from __future__ import annotations

import torch

# The chunked form is exact for any chunk length; the length only moves rounding and speed. On a CPU
# the intra-chunk [Q, Q] decay block costs Q² exp/mask/cumsum work per chunk (Q per token), which at
# the configs' Q = 256 outweighs the GEMM efficiency a long chunk buys (benchmarks/ssd_chunk.py,
# docs/decisions.md). GPUs (the Triton kernel) and the meta device (memory tracing) keep the config's
# chunk.
CPU_CHUNK = 64


def chunk_for(config_chunk: int, device) -> int:
    """The chunk length the model runs the SSD with on `device`: min(config, CPU_CHUNK) on a CPU."""
    return min(config_chunk, CPU_CHUNK) if getattr(device, "type", device) == "cpu" else config_chunk


def segsum_exp(dA: torch.Tensor, cs: torch.Tensor | None = None) -> torch.Tensor:
    """exp of the segment sums of dA [..., q] → [..., q, q], zero above the diagonal.

    out[..., i, j] = exp(Σ_{k=j+1..i} dA_k) for i ≥ j, as exp(cs_i − cs_j) where cs is the inclusive
    cumsum of dA in float64 (callers that have it pass it in), the difference rounded once to dA's
    precision (at least fp32). The difference of cumsums is usually avoided because in fp32 its error
    is an ulp of the running sum, not of the segment. In float64 the running sums' error (about
    q·|cs|·1e-16) is far below one fp32 rounding of the exponent unless the chunk's total decay
    exceeds ~1e5, where every entry off the diagonal underflows anyway; so this is at least as accurate
    as the masked fp32 cumsum (one rounding per term) and takes three passes over [q, q] instead of
    five (docs/decisions.md has the timing). Above the diagonal the exponent is ≥ 0 and may overflow to
    inf; tril_ overwrites those entries with zeros (it writes, it does not multiply: no inf·0).
    """
    if cs is None:
        cs = torch.cumsum(dA, dim=-1, dtype=torch.float64)
    wide = torch.promote_types(dA.dtype, torch.float32)
    return (cs[..., :, None] - cs[..., None, :]).to(wide).exp_().tril_()


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    block_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan. See the module docstring for shapes; returns (y, final_state), both fp32.

    Chunks are processed `block_tokens // chunk_size` at a time (at least one; None: one): the
    intra-chunk terms and the chunks' own states are batched contractions over the block, and only
    the state hand-off between chunks is sequential. The work per chunk is unchanged and the torch
    calls fall by that factor. The model passes the config's chunk as the block when it runs a
    shorter chunk on a CPU (chunk_for), so the working set stays that of one config-sized chunk
    (what memory-report predicts) plus one state per chunk in the block."""
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    hg = h // g
    f32 = torch.float32
    A = A.to(f32)
    y = torch.empty(b, t, h, p, dtype=f32, device=x.device)
    state = (
        initial_state.to(f32).clone() if initial_state is not None
        else torch.zeros(b, h, p, n, dtype=f32, device=x.device)
    )
    per_block = max(1, (block_tokens or chunk_size) // chunk_size)
    # the entry states of one block, allocated once per call and reused by every block: a fresh
    # buffer per block would be faulted in again each time
    entries = torch.empty(b, g, min(per_block, max(1, t // chunk_size)), hg, p, n, dtype=f32, device=x.device)
    s = 0
    while s < t:
        c = min(per_block, (t - s) // chunk_size)  # whole chunks in this block
        q = chunk_size
        if c == 0:  # the tail: one short chunk
            c, q = 1, t - s
        e = s + c * q
        dtc = dt[:, s:e].to(f32)  # [b, c·q, h]
        xt = x[:, s:e].to(f32) * dtc[..., None]  # dt·x  [b, c·q, h, p]
        Bc = B[:, s:e].to(f32).view(b, c, q, g, n).permute(0, 3, 1, 2, 4)  # [b, g, c, q, n]
        Cc = C[:, s:e].to(f32).view(b, c, q, g, n).permute(0, 3, 1, 2, 4)  # [b, g, c, q, n]
        dA = (dtc * A).view(b, c, q, h).permute(0, 3, 1, 2)  # [b, h, c, q]
        cs = torch.cumsum(dA, dim=-1, dtype=torch.float64)  # [b, h, c, q]: exact enough to difference
        Acs = cs.to(f32)

        # intra-chunk: Y_diag = (L ∘ C Bᵀ) · (dt x), per head and chunk
        L = segsum_exp(dA, cs)  # [b, h, c, q, q]
        CB = Cc @ Bc.transpose(-1, -2)  # [b, g, c, q, q]
        M = L.view(b, g, hg, c, q, q).mul_(CB[:, :, None])
        xt_h = xt.view(b, c, q, h, p).permute(0, 3, 1, 2, 4)  # [b, h, c, q, p]
        yc = M.view(b, h, c, q, q) @ xt_h  # [b, h, c, q, p]

        # each chunk's own state: Σ_s exp(Acs_last − Acs_s) (dt x)_s ⊗ B_s, one GEMM per group and chunk
        w = (cs[..., -1:] - cs).to(f32).exp_()  # [b, h, c, q]
        xw = (xt_h * w[..., None]).view(b, g, hg, c, q, p).permute(0, 1, 3, 2, 5, 4).reshape(b, g, c, hg * p, q)
        S_loc = (xw @ Bc).view(b, g, c, hg, p, n)  # [b, g, c, hg, p, n]

        # the hand-off: the state entering each chunk (sequential, elementwise on [b, h, p, n])
        decay = Acs[..., -1].exp()  # [b, h, c]
        entry = entries[:, :, :c]
        for j in range(c):
            entry[:, :, j] = state.view(b, g, hg, p, n)
            state.mul_(decay[:, :, j, None, None]).add_(S_loc[:, :, j].reshape(b, h, p, n))

        # entry state → output: exp(Acs_t) · (C_t · S_entry), one GEMM per group and chunk over (heads·p)
        off = Cc @ entry.view(b, g, c, hg * p, n).transpose(-1, -2)  # [b, g, c, q, hg·p]
        off = off.view(b, g, c, q, hg, p).permute(0, 1, 4, 2, 3, 5).reshape(b, h, c, q, p)
        yc.add_(off.mul_(Acs.exp()[..., None]))
        y[:, s:e].view(b, c, q, h, p).copy_(yc.permute(0, 2, 3, 1, 4))  # one strided copy, no reshape temporary
        s = e
    if D is not None:
        y.view(b, t, h, p).addcmul_(x.to(f32), D.to(f32)[:, None])  # in place: no [t, h, p] temporary
    return y, state


def ssd_naive(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 0,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequential fp32 recurrence (float64 for float64 inputs), token by token: the oracle for
    `ssd_chunked` (same signature; `chunk_size` is ignored)."""
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    wide = torch.promote_types(x.dtype, torch.float32)
    idx = torch.arange(h, device=x.device) // (h // g)
    Bh = B.to(wide)[:, :, idx]  # [b, t, h, n]
    Ch = C.to(wide)[:, :, idx]
    S = (initial_state.to(wide).clone() if initial_state is not None
         else torch.zeros(b, h, p, n, dtype=wide, device=x.device))
    ys = []
    for i in range(t):
        dti = dt[:, i].to(wide)  # [b, h]
        a = torch.exp(dti * A.to(wide))  # [b, h]
        S = S * a[..., None, None] + (dti[..., None] * x[:, i].to(wide))[..., None] * Bh[:, i, :, None, :]
        yi = (S @ Ch[:, i, :, :, None]).squeeze(-1)  # [b, h, p]
        if D is not None:
            yi = yi + D.to(wide)[:, None] * x[:, i].to(wide)
        ys.append(yi)
    return torch.stack(ys, dim=1), S


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step, updating `state` [b, h, p, n] in place. x [b, h, p], dt [b, h] (fp32,
    softplus'ed), B, C [b, g, n]. Returns y [b, h, p] in fp32 (float64 for a float64 oracle)."""
    b, h, p, n = state.shape
    g = B.shape[1]
    wide = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(wide)
    S = state.view(b, g, h // g, p, n)
    S.mul_(torch.exp(dt * A).view(b, g, h // g, 1, 1))
    S.addcmul_((dt[..., None] * xf).view(b, g, h // g, p, 1), B.view(b, g, 1, 1, n).to(state.dtype))
    if S.numel() <= 1 << 20:  # small: multiply-sum is faster than a batched GEMV here
        y = (S.to(wide) * C.view(b, g, 1, 1, n).to(wide)).sum(-1).view(b, h, p)
    else:  # large (long batches, big models): a matmul, without a state-sized fp32 temporary
        y = (S.to(wide) @ C.view(b, g, 1, n, 1).to(wide)).view(b, h, p)
    if D is not None:
        y = torch.addcmul(y, D.to(wide)[:, None], xf)
    return y
