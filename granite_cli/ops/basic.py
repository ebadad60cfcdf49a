"""Small functional ops with the numerics of the reference implementation (transformers' modeling code)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from granite_cli.arch.base import Routing
from granite_cli.ops.routing import routed

_NATIVE_BF16: bool | None = None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512_BF16 or AMX-BF16)."""
    global _NATIVE_BF16
    if _NATIVE_BF16 is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line for line in f if line.startswith("flags")), "")
            _NATIVE_BF16 = "avx512_bf16" in flags or "amx_bf16" in flags
        except OSError:
            _NATIVE_BF16 = True  # unknown platform: leave torch to it
    return _NATIVE_BF16


def widen_bf16(x: torch.Tensor) -> bool:
    """Whether bf16 work on x should run widened to fp32: a CPU tensor on a CPU without bf16 dot products."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not cpu_has_native_bf16()


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ wᵀ (+ b): the one place the model's projections go through.

    bf16 on a CPU without bf16 dot-product instructions: torch's bf16 GEMM falls to a scalar path
    an order of magnitude slower than fp32, so the operands are widened to fp32 and the result rounded
    back to bf16. A product of two bf16 numbers is exact in fp32, so this computes what a native bf16
    GEMM with fp32 accumulation computes, up to summation order. (docs/decisions.md: the figures, and
    the alternatives measured for decode rows and rejected.)
    """
    if widen_bf16(x):
        return F.linear(x.float(), w.float(), None if b is None else b.float()).to(torch.bfloat16)
    if x.device.type == "cpu" and torch.compiler.is_compiling() and x.numel() == x.shape[-1]:
        # one row (a decode step) under torch.compile: a multiply-reduce that inductor turns into a
        # vectorised, threaded GEMV loop, which streams the weights faster than MKL's sgemv
        out = (w * x.reshape(1, -1)).sum(-1).view(*x.shape[:-1], w.shape[0])
        return out if b is None else out + b
    return F.linear(x, w, b)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: statistics in fp32, cast back to the input dtype, then × weight (in that dtype).

    Written out rather than F.rms_norm: on a CPU that is a composite of the same ops (no fused
    kernel), and as one dispatch op it would hide its full-size temporaries from memory tracking.
    The weight multiplies in place into the fresh product (bit-identical to x · r · w)."""
    if x.dtype == torch.float32:  # already fp32: skip the casts (fewer ops matter in decode)
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).mul_(weight)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int) -> torch.Tensor:
    """Mamba-2 gated RMSNorm (norm_before_gate=False): v = y·silu(z) in fp32, normalised over
    groups of `group_size`, × weight. y is the fp32 scan output; the result is fp32 (float64 when y
    is, for an oracle). Fresh products are reused in place: three full-size tensors (silu(z)·y, its
    square, the result) where the plain form made five."""
    wide = torch.promote_types(y.dtype, torch.float32)
    v = F.silu(z.to(wide)).mul_(y.to(wide))  # = y·silu(z): silu(z) is fresh, the gate goes in place
    shape = v.shape
    vg = v.view(*shape[:-1], shape[-1] // group_size, group_size)
    out = vg * torch.rsqrt(vg.pow(2).mean(-1, keepdim=True) + eps)
    return out.view(shape).mul_(weight.to(wide))


def causal_conv1d(
    xbc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv + SiLU over time.

    xbc [b, t, c]; weight [c, 1, k]; bias [c]; conv_state [b, c, k-1] holds the k-1 inputs before
    this block (None = zeros, a fresh sequence). Returns (out [b, t, c], new_state [b, c, k-1]).

    Computed as k shifted multiply-adds in the [b, t, c] layout the projection produces: each tap is
    one pass over contiguous rows. torch's grouped conv1d wants [b, c, t] (a transposed copy in, and
    a strided result out) and its depthwise CPU kernel is several times slower than this
    (docs/decisions.md). Half-precision inputs accumulate in fp32 and are
    rounded once, as a conv with an fp32 accumulator does; SiLU then runs on the rounded value.
    """
    b, t, c = xbc.shape
    k = weight.shape[-1]
    wide = torch.promote_types(xbc.dtype, torch.float32)
    x = xbc.to(wide)
    taps = weight.reshape(c, k).to(wide).t().contiguous()  # [k, c]; tap k-1 meets the newest input
    # output i = Σ_j taps[j] · in[i - (k-1) + j]; inputs before the block come from conv_state
    if bias is not None:
        out = torch.addcmul(bias.to(wide), x, taps[k - 1])
    else:
        out = x * taps[k - 1]
    for j in range(k - 1):
        lag = k - 1 - j
        if lag < t:
            out[:, lag:].addcmul_(x[:, : t - lag], taps[j])
    if conv_state is not None and k > 1:
        hist = conv_state.to(wide)  # [b, c, k-1]: in[-(k-1)] .. in[-1]
        for i in range(min(k - 1, t)):  # output i sees history entries i .. k-2 through taps 0 .. k-2-i
            out[:, i] += (hist[:, :, i:] * taps[: k - 1 - i].t()).sum(-1)
    out = out.to(xbc.dtype)
    return F.silu(out, inplace=True), conv_state_after(xbc, k, conv_state)  # out is always a fresh tensor here


def conv_state_after(xbc: torch.Tensor, k: int, conv_state: torch.Tensor | None) -> torch.Tensor:
    """The conv state [b, c, k-1] after the block xbc [b, t, c]: its last k-1 inputs, the older state
    (zeros without one) filling in where the block is shorter than k-1."""
    b, t, c = xbc.shape
    xt = xbc.transpose(1, 2)  # [b, c, t] view
    if k == 1:
        return xt[:, :, :0]
    if t >= k - 1:
        return xt[:, :, t - (k - 1):]
    prev = conv_state.to(xt.dtype) if conv_state is not None else xt.new_zeros(b, c, k - 1)
    return torch.cat([prev[:, :, t:], xt], dim=-1)


def causal_conv1d_step(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor
) -> torch.Tensor:
    """One token: x [b, c]; conv_state [b, c, k-1] is shifted in place. Returns silu(conv) [b, c]."""
    window = torch.cat([conv_state, x[:, :, None].to(conv_state.dtype)], dim=-1)  # [b, c, k]
    out = (window.to(weight.dtype) * weight[:, 0, :]).sum(-1)  # a grouped conv1d call costs ~20x more here
    if bias is not None:
        out = out + bias
    conv_state.copy_(window[:, :, 1:])
    return F.silu(out)


# ---- rotary position embedding ------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """inv_freq [head_dim/2] in fp32, with Llama-3 frequency scaling when `scaling` says so."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if not scaling or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return inv
    # Llama 3: long wavelengths are divided by `factor`, short ones kept, the band between blended.
    factor = float(scaling["factor"])
    lo, hi = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    low_wl, high_wl = old / lo, old / hi
    scaled = torch.where(wavelen > low_wl, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, start: int, length: int, dtype: torch.dtype,
                 device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim] for positions start..start+length-1 (half-split layout)."""
    pos = torch.arange(start, start + length, device=device, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq.to(device)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, t, d]; rotate_half convention (first half / second half pairs)."""
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos + rot * sin


# ---- mixture of experts ------------------------------------------------------------------------


def route(logits: torch.Tensor, k: int, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing from router logits [tokens, E] (any dtype; done in fp32).

    TOPK_SOFTMAX: softmax over the k selected logits (Granite; equals vLLM renormalize).
    SOFTMAX_TOPK: softmax over all E, take the top k (Qwen3-MoE with norm_topk_prob=False).
    SOFTMAX_TOPK_NORM: the same, renormalised to sum to 1 (norm_topk_prob=True).
    Returns fp32 weights [tokens, k] and expert ids [tokens, k].
    """
    lf = logits.float()
    if routing is Routing.TOPK_SOFTMAX:
        top, ids = lf.topk(k, dim=-1)
        return torch.softmax(top, dim=-1), ids
    probs = torch.softmax(lf, dim=-1)
    w, ids = probs.topk(k, dim=-1)
    if routing is Routing.SOFTMAX_TOPK_NORM:
        w = w / w.sum(-1, keepdim=True)
    return w, ids


def moe_experts(
    x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """Routed SwiGLU experts, tokens grouped by expert (one GEMM pair per expert hit).

    x [tokens, D]; w_in [E, 2I, D] (gate rows first, then up); w_out [E, D, I];
    weights [tokens, k] (cast to x's dtype before use, as the reference does); ids [tokens, k].
    Returns [tokens, D] in x's dtype.
    """
    n, k = ids.shape
    i_w = w_in.shape[1] // 2
    wx = weights.to(x.dtype)
    if n * k <= 8 and torch.compiler.is_compiling():
        # decode under torch.compile: index the chosen experts' weights by tensor (no .tolist(), which
        # would break the graph). Eager, w_in[ids] would copy the weights; inductor fuses the indexing
        # into the GEMV loops and reads them in place.
        h = (w_in[ids] * x[:, None, None, :]).sum(-1)  # [n, k, 2I]: a multiply-reduce, as linear() does here
        m = F.silu(h[..., :i_w]) * h[..., i_w:]
        o = (w_out[ids] * m[:, :, None, :]).sum(-1)  # [n, k, D]
        return (o * wx[..., None]).sum(1)
    if n * k <= 8 and x.device.type != "meta":
        # decode: walk the few (token, expert) pairs directly; no sort, no scatter
        rows = []
        for t, (es, ws) in enumerate(zip(routed(lambda: ids.tolist()), wx.unbind(0))):
            acc = None
            for j, e in enumerate(es):
                h = linear(x[t], w_in[e])
                o = linear(F.silu(h[:i_w]).mul_(h[i_w:]), w_out[e]).mul_(ws[j])
                acc = o if acc is None else acc.add_(o)
            rows.append(acc)
        return torch.stack(rows)
    out = torch.zeros_like(x)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order // k
    wsel = wx.reshape(-1)[order]
    if x.device.type == "meta":  # tracing: routing is unknown, assume a balanced split
        counts = [n * k // w_in.shape[0] + (1 if e < n * k % w_in.shape[0] else 0) for e in range(w_in.shape[0])]
    else:
        counts = routed(lambda: torch.bincount(flat, minlength=w_in.shape[0]).tolist())
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        t_idx = tok[start : start + c]
        h = linear(x[t_idx], w_in[e])  # [c, 2I]
        m = F.silu(h[:, :i_w]).mul_(h[:, i_w:])
        o = linear(m, w_out[e]).mul_(wsel[start : start + c, None])
        out.index_add_(0, t_idx, o)
        start += c
    return out
