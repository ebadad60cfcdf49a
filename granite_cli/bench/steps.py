"""Decode step loops for bench: eager, the CPU decode kernel (the CPU default), torch.compile'd
(CPU) and CUDA graphs (GPU).

Each builder returns (step, mode, note): step(record=None) runs `gen` decode steps over the tokens
`nxt` from the cache's position and returns the last logits; with a list `record` it also appends
each step's probe logits (bench.guard.probe) for the depth guard. mode is "eager", "native",
"compiled" or "cuda_graph"; note says why a faster mode fell back to eager, or what building or
compiling took.
"""

from __future__ import annotations

import time

import torch

from granite_cli.bench.guard import probe
from granite_cli.ops import dispatch


def eager_steps(model, cache, nxt: torch.Tensor, gen: int):
    def step(record: list | None = None):
        for i in range(gen):
            out = model(nxt[:, i : i + 1], cache, logits="last")
            if record is not None:
                record.append(probe(out))
        return out

    return step


def native_steps(model, cache, nxt: torch.Tensor, gen: int):
    """Decode through the CPU decode kernel (granite_cli.model.native_decode): one call per step.
    Falls back to the eager loop, with the reason, for a model or cache the kernel does not cover or
    where the kernel cannot be built (no C compiler)."""
    from granite_cli.model.native_decode import NativeDecoder, unsupported
    from granite_cli.ops import native

    why = unsupported(model, cache)
    if why is None:
        try:
            dec = NativeDecoder(model, cache)
        except (RuntimeError, ValueError) as e:
            why = str(e)
    if why is not None:
        return eager_steps(model, cache, nxt, gen), "eager", why
    cols = [nxt[:, i : i + 1].contiguous() for i in range(gen)]  # one id per sequence and step, ready to pass

    def step(record: list | None = None):
        for c in cols:
            out = dec(c)
            if record is not None:
                record.append(probe(out))
        return out

    return step, "native", native.build_note


def compiled_steps(model, cache, nxt: torch.Tensor, gen: int, snap: dict):
    """torch.compile'd decode: the eager loop over granite_cli.model.compiled's forward. One untimed
    pass over the steps compiles them (and the variant for the step that fills the cache), then the
    cache is restored to `snap`. Falls back to the eager loop, with the reason, when compiling fails."""
    from granite_cli.model.compiled import compiled_forward

    t0 = time.perf_counter()
    try:
        step = eager_steps(compiled_forward(model), cache, nxt, gen)
        step()
    except Exception as e:  # noqa: BLE001 - compilation is an optimisation; eager always works
        cache.restore(snap)
        return eager_steps(model, cache, nxt, gen), "eager", f"torch.compile failed ({reason(e)})"
    cache.restore(snap)
    return step, "compiled", f"torch.compile: first pass {time.perf_counter() - t0:.1f} s (compilation; not timed)"


def graph_steps(model, cache, nxt: torch.Tensor, gen: int, snap: dict, warmed: bool):
    """CUDA-graph decode: one graph per step (each bakes its cache position), captured in order into
    one memory pool and replayed in that order, so the host launches `gen` graphs instead of
    thousands of kernels. warmed: eager steps have run (kernels compiled, libraries initialised);
    if not, one eager pass runs first, since nothing of that may happen inside a capture. Falls back
    to the eager loop, with the reason, where capture is impossible (an op that syncs with the host,
    e.g. MoE routing on the reference ops)."""
    if model.cfg.num_local_experts and dispatch.kernels(model.device).name != "triton":
        why = "CUDA graphs need the Triton MoE kernel (the reference routes on the host)"
        return eager_steps(model, cache, nxt, gen), "eager", why
    if not warmed:
        eager_steps(model, cache, nxt, gen)()
        torch.cuda.synchronize()
        cache.restore(snap)
    graphs, outs = [], []
    try:
        pool = None
        for i in range(gen):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                outs.append(model(nxt[:, i : i + 1], cache, logits="last"))
            pool = g.pool()  # one pool, replayed in capture order: the steps share memory
            graphs.append(g)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - capture is an optimisation; the eager loop always works
        torch.cuda.synchronize()
        cache.restore(snap)
        return eager_steps(model, cache, nxt, gen), "eager", f"CUDA graph capture failed ({reason(e)})"

    def replay(record: list | None = None):
        for g, out in zip(graphs, outs):
            g.replay()
            if record is not None:
                record.append(probe(out))
        return outs[-1]

    return replay, "cuda_graph", None


def reason(e: BaseException) -> str:
    """An exception as one short line for a row's note: its type and the first line of its message."""
    msg = str(e).splitlines()
    return f"{type(e).__name__}: {msg[0][:160]}" if msg else type(e).__name__
