"""Causal grouped-query attention over a key/value prefix, without copying KV heads.

q [b, hq, t, d]; k, v [b, hkv, s, d] with s ≥ t: the t queries are the last t positions of the s
keys (bottom-right causal alignment). Returns [b, hq, t, d].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    t, s = q.shape[2], k.shape[2]
    if q.device.type == "meta":  # tracing: the flash kernels' output, with O(t) workspace only
        return torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    if s == t:  # a fresh prefill: the flash kernel's causal mask is exactly ours
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if t == 1:  # decode: the one query sees every key
        if q.device.type == "cpu":
            # Two batched matmuls with the queries of each KV head stacked: K and V are read once, in
            # place. (The CPU flash kernel is slower for a single query.)
            b, hq, _, d = q.shape
            hkv = k.shape[1]
            qg = q.reshape(b, hkv, hq // hkv, d).float()
            if torch.compiler.is_compiling():
                # under torch.compile: multiply-reduces, which inductor fuses into loops that read
                # K and V once (faster than its extern bmm calls)
                scores = (qg[:, :, :, None, :] * k[:, :, None].float()).sum(-1)  # [b, hkv, rep, s]
                p = torch.softmax(scores * scale, dim=-1)
                return (p[..., None] * v[:, :, None].float()).sum(-2).to(q.dtype).reshape(b, hq, 1, d)
            p = torch.softmax((qg @ k.transpose(-1, -2).float()) * scale, dim=-1)
            return (p @ v.float()).to(q.dtype).reshape(b, hq, 1, d)
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    off = s - t
    if _has_lse_flash(q):
        # Continuation: prefix keys unmasked, then the new block causally; merge by log-sum-exp.
        # The prefix part has no mask, so the queries of each KV head are stacked along the time axis
        # and the (long) prefix K/V are read in place; only the short new block is expanded. No
        # [t, s] mask is ever built (at 128k that would be gigabytes per layer on a GPU).
        b, hq, _, d = q.shape
        hkv = k.shape[1]
        rep = hq // hkv
        qg = q.reshape(b, hkv, rep * t, d)
        o1, l1 = _flash_lse(qg, k[:, :, :off], v[:, :, :off], False, scale)
        o1, l1 = o1.reshape(b, hq, t, d), l1.reshape(b, hq, t)
        kn, vn = k[:, :, off:], v[:, :, off:]
        if rep > 1:
            kn, vn = kn.repeat_interleave(rep, dim=1), vn.repeat_interleave(rep, dim=1)
        o2, l2 = _flash_lse(q, kn, vn, True, scale)
        lse = torch.logaddexp(l1, l2)
        return o1 * torch.exp(l1 - lse)[..., None].to(o1.dtype) + o2 * torch.exp(l2 - lse)[..., None].to(o2.dtype)
    mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(off)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _has_lse_flash(q: torch.Tensor) -> bool:
    """A flash kernel that also returns the log-sum-exp: PyTorch's CPU one (fp32/bf16/fp16), or its
    CUDA one (bf16/fp16, head_dim a multiple of 8 up to 256)."""
    if q.device.type == "cpu":
        return _cpu_flash is not None and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return (q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256 and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention"))


def _flash_lse(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [b, h, t, d], log-sum-exp [b, h, t] fp32) of softmax attention; causal is top-left,
    used only for square blocks."""
    if q.device.type == "cpu":
        return _cpu_flash(q, k, v, 0.0, causal, scale=scale)
    r = torch.ops.aten._scaled_dot_product_flash_attention(q.contiguous(), k, v, 0.0, causal, False, scale=scale)
    return r[0], r[1][..., : q.shape[2]]
