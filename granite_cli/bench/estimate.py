"""What a sweep will take before it runs: its time (estimate_seconds, from FLOP counts and the
machine's measured matmul rate) and its memory (check_fits refuses a sweep whose largest case cannot
fit the device, by memory-report's model, which predicted_total also gives each row)."""

from __future__ import annotations

import math
import time

import torch

from granite_cli.bench.spec import SweepSpec
from granite_cli.config import load_config
from granite_cli.errors import InputError
from granite_cli.measure import sync
from granite_cli.params import count_params


def prefix_point(spec: SweepSpec, c: int) -> bool:
    """Whether a prefill of c tokens ends where a longer one of the same sweep passes: prefixes are
    shared (CPU only) and c is a whole number of ubatch pieces."""
    return spec.share_prefill and torch.device(spec.device).type == "cpu" and c % spec.ubatch == 0


def device_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are) of the memory a sweep on `device` can use."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"{torch.cuda.get_device_name(device)}'s memory"
    import psutil

    return psutil.virtual_memory().total, "this machine's memory"


def check_fits(spec: SweepSpec, have: int | None = None, where: str = "") -> None:
    """Refuse (InputError) a sweep whose largest case, by memory-report's model (weights, KV cache,
    Mamba state, working set), needs more than the device has: such a case could only fail, after
    minutes of smaller ones or an attempt to allocate terabytes."""
    from granite_cli.memory.predict import predict
    from granite_cli.render import human_bytes

    if have is None:
        have, where = device_memory(torch.device(spec.device))
    b, c = max(spec.batch), max(spec.ctx)
    for name in spec.models:
        cfg = load_config(name)

        def need(ctx: int) -> float:
            return predict(cfg, ctx + spec.gen, b, spec.dtype, spec.dtype, "fp32", spec.ubatch).total_bytes

        if need(c) <= have:
            continue
        lo, hi = 0, c  # the largest context that fits at this batch, by bisection
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if need(mid) <= have else (lo, mid - 1)
        hint = f"at batch {b} up to about {lo} tokens fit" if lo else f"not even one token fits at batch {b}"
        raise InputError(f"{cfg.name} at ctx {c} x batch {b} needs about {human_bytes(need(c))} (predicted: weights, "
                         f"KV cache, Mamba state, working set), more than the {human_bytes(have)} of {where}; "
                         f"lower --ctx or --batch ({hint})")


def predicted_total(cfg, dtype: str, batch: int, cache_len: int, tokens: int, weights: int) -> float:
    """memory-report's model of a phase's total peak: the weights, a cache of cache_len tokens (KV, conv
    state; fp32 SSM state) and the working set of a forward of `tokens` new tokens per sequence."""
    from granite_cli.memory.predict import activation_bytes, kv_bytes, state_bytes

    return (weights + kv_bytes(cfg, cache_len, batch, dtype) + state_bytes(cfg, batch, "fp32", dtype)["total"]
            + activation_bytes(cfg, tokens, batch, dtype))


def estimate_seconds(spec: SweepSpec, gflops: float) -> float:
    """A rough up-front estimate of the sweep's run time from FLOP counts and a measured matmul rate."""
    total = 0.0
    for name in spec.models:
        cfg = load_config(name)
        p = count_params(cfg)
        per_tok = 2 * (p.active - p.groups["embedding"]) + 2 * cfg.hidden_size * cfg.vocab_size / max(1, spec.ubatch)
        att = len(cfg.attention_layers) * cfg.num_attention_heads * cfg.head_dim
        for b in spec.batch:
            c0 = 0  # the shared prefix a case continues from (0: none)
            for c in sorted(spec.ctx):
                # causal QK and PV: 2·2·(c²/2)·heads·hd; a shared prefix's part is not run again
                flops = b * (per_tok * (c - c0) + 2 * att * (c * c - c0 * c0))
                if prefix_point(spec, c):
                    c0 = c
                runs = spec.warmup + spec.reps
                t = flops / (gflops * 1e9) * runs * 1.6  # 1.6: what a CPU forward reaches of the matmul rate
                if "decode" in spec.phases:
                    t += b * runs * spec.gen * (2 * p.active * 4 / 20e9 + 4 * att * c / (gflops * 1e9))
                total += t
        if spec.compile and "decode" in spec.phases and spec.device == "cpu":
            # compilation per model and batch size: two or three variants (docs/decisions.md)
            total += 120.0 * len(spec.batch)
    if kernel_build_pending(spec):
        from granite_cli.ops.native import BUILD_S

        total += BUILD_S
    return total


def kernel_build_pending(spec: SweepSpec) -> bool:
    """True when this sweep's CPU decode will first build the decode kernel (none cached for this machine)."""
    if not (spec.models and spec.device == "cpu" and "decode" in spec.phases and spec.decode_kernel
            and not spec.compile):
        return False
    from granite_cli.ops import native

    return native.will_build()


def matmul_gflops(device: torch.device, dtype: torch.dtype) -> float:
    """The machine's matmul rate (GFLOP/s) for the up-front estimate: the best of 8 timed 1024³
    products after 2 untimed ones. The best, not the mean: a single timing at start-up swings with
    thread pools waking and other work on the machine; the fastest product is what the machine can do."""
    n = 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ a
    sync(device)
    best = math.inf
    for _ in range(8):
        t0 = time.perf_counter()
        a @ a
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9
