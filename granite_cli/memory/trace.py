"""Traced and measured memory: the core's own forward, with live tensor bytes tracked.

`LiveTensorBytes` is a TorchDispatchMode that adds the bytes of every tensor an op creates (outputs
that alias an input, i.e. views and in-place results, allocate nothing) and subtracts them when the
tensor is freed; `peak` is the high-water mark. On the meta device the forward runs at real shapes
with no memory at all, so h-small at 128k x batch 8 traces in seconds on a CPU. On real CPU tensors
the same tracker gives the measured live-tensor peak, next to the process RSS peak.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

from granite_cli.config import ModelConfig


class LiveTensorBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        flat, _ = tree_flatten(out)
        for i, t in enumerate(flat):
            if not isinstance(t, torch.Tensor):
                continue
            ret = returns[min(i, len(returns) - 1)] if returns else None
            if ret is not None and ret.alias_info is not None:
                continue  # a view or an in-place result: no new memory
            n = t.numel() * t.element_size()
            if n == 0:
                continue
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, n)
        return out


class AllocationReplay(LiveTensorBytes):
    """LiveTensorBytes over a run that computes nothing: each op that would create a tensor creates
    an uninitialised one of the same size, strides, dtype and device; views run for real (they
    allocate nothing); in-place ops return their target untouched. The shapes, and so the live bytes
    and their peak, are those of a real run of the same inputs, as long as nothing depends on values:
    in the core only the MoE routing does, and it is replayed from the real run (ops.basic
    replay_routing). The peak equals the tracker's over the real run to the byte (tests/test_memory.py),
    at the cost of dispatching the ops, not of running them.

    Caches and states are not written: a caller that needs them afterwards restores them."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rets = func._schema.returns
        if any(r.alias_info is not None for r in rets):
            for a, arg in zip(func._schema.arguments, args):
                if a.alias_info is not None and a.alias_info.is_write:
                    return arg  # in place (or out=): the target, unchanged
            for a in func._schema.arguments:
                if a.alias_info is not None and a.alias_info.is_write and a.name in kwargs:
                    return kwargs[a.name]
            return func(*args, **kwargs)  # a view of a real tensor: no allocation, no arithmetic
        with _disable_current_modes():
            shaped = func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))
            out = tree_map(_like_on(_device_of(args, kwargs)), shaped)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                n = t.numel() * t.element_size()
                if n:
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, n)
        return out


def _to_meta(x):
    return x.to("meta") if isinstance(x, torch.Tensor) else x


def _device_of(args, kwargs) -> torch.device:
    for x in tree_flatten((args, kwargs))[0]:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def _like_on(device):
    def real(x):
        if isinstance(x, torch.Tensor) and x.device.type == "meta":
            return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)
        return x

    return real


def run_forward(model, ctx: int, batch: int, ubatch: int, device, last_piece_only: bool = False) -> dict:
    """Prefill ctx tokens in ubatch pieces, then one decode step; returns the peak live bytes of each
    phase above what existed before it (weights and the cache are allocated outside).

    last_piece_only: run just the final prefill piece, from position ctx - ubatch (every piece has
    the same working set; on the meta device there is no state to get wrong)."""
    cache = model.allocate_cache(batch, ctx + 1)
    ids = torch.zeros(batch, ctx + 1, dtype=torch.long, device=device)
    out = {}
    starts = list(range(0, ctx, ubatch))
    if last_piece_only:
        cache.pos = starts[-1]
        starts = starts[-1:]
    with torch.inference_mode():
        with LiveTensorBytes() as tr:
            for s in starts:
                model(ids[:, s : min(ctx, s + ubatch)], cache, logits="last")
        out["prefill_activation_bytes"] = tr.peak
        with LiveTensorBytes() as tr:
            model(ids[:, ctx : ctx + 1], cache, logits="last")
        out["decode_activation_bytes"] = tr.peak
    out["cache_bytes"] = cache.nbytes()["total"]
    out["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    return out


def traced(cfg: ModelConfig, ctx: int, batch: int, dtype: torch.dtype, ubatch: int = 4096,
           state_dtype: torch.dtype = torch.float32) -> dict:
    """The implementation's own peak at real shapes, on the meta device (no memory, no GPU)."""
    from granite_cli.model.loading import build_empty

    model = build_empty(cfg, dtype, "meta")
    _patch_cache_dtype(model, state_dtype)
    return run_forward(model, ctx, batch, ubatch, torch.device("meta"), last_piece_only=True)


def measured_cpu(cfg: ModelConfig, ctx: int, batch: int, dtype: torch.dtype, ubatch: int = 4096) -> dict:
    """A real CPU forward with random weights: the tracked live-tensor peak and the process RSS peak."""
    from granite_cli.measure import PeakMemory
    from granite_cli.model.loading import load_model

    model = load_model(cfg, weights="random", dtype=dtype)
    with PeakMemory("cpu") as pm:
        res = run_forward(model, ctx, batch, ubatch, torch.device("cpu"))
    res["rss_peak_delta_bytes"] = pm.delta
    return res


def _patch_cache_dtype(model, state_dtype) -> None:
    orig = model.allocate_cache

    def alloc(batch_size, max_len, dtype=None, state_dtype_=state_dtype):
        return orig(batch_size, max_len, dtype, state_dtype_)

    model.allocate_cache = alloc
