"""Decode steps under torch.compile (TorchInductor): the CPU's answer to a CUDA graph.

An eager CPU decode step is a couple of thousand small torch calls around the GEMVs, and on a small
CPU the calls cost about as much as the GEMVs. Under torch.compile the core takes graph-friendly forms
of three ops (each checks torch.compiler.is_compiling()): single-row projections and the routed
experts become multiply-reduces (the experts' weights indexed in place by the chosen ids, never
gathered into a copy), and decode attention likewise. Inductor turns these and every elementwise op
into a few vectorised, threaded C++ loops that stream the weights faster than MKL's sgemv
(docs/decisions.md has the figures; benchmarks/core_cpu.py measures it beside transformers and
llama.cpp).

The price is compile time and a C++ compiler on the machine. A model and batch size need up to three
compiled variants: the general step; the step that fills the cache's last slot (the KV prefix's
contiguity enters the guards); and, once, positions past 4,095 (a range guard that the compiled code
carries); shapes are compiled dynamic, so each variant serves every position in its range.
Inductor's cache on disk makes later processes faster. So it is opt-in:
`compiled_forward(model)` here, `granite bench --compile` in the CLI. The eager model stays the
reference; the compiled step agrees with it to float rounding (tests/test_compiled.py).
"""

from __future__ import annotations

import shutil
import time

import torch

from granite_cli.errors import InputError


def compile_available() -> str | None:
    """None when torch.compile can run here for CPU tensors, else the reason it cannot."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("clang++") is None:
        return "no C++ compiler (g++, c++ or clang++) on PATH; TorchInductor needs one for CPU code"
    return None


class CompiledForward:
    """`model(ids, cache, logits=...)` under torch.compile(dynamic=True). `compile_s` is the wall
    time of the first call (tracing and code generation included); later calls run the compiled
    graph. Build it with compiled_forward(model)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._fn = torch.compile(model, dynamic=True)
        self.compile_s: float | None = None

    def __call__(self, ids: torch.Tensor, cache=None, logits: str = "all") -> torch.Tensor:
        # a fresh [b, t] copy with standard strides: a column slice keeps its row stride (contiguous()
        # keeps it too when b is 1), which enters the guards tied to the cache position (a recompile)
        ids = ids.clone(memory_format=torch.contiguous_format)
        if self.compile_s is None:
            t0 = time.perf_counter()
            out = self._fn(ids, cache, logits=logits)
            self.compile_s = time.perf_counter() - t0
            return out
        return self._fn(ids, cache, logits=logits)


def compiled_forward(model: torch.nn.Module) -> CompiledForward:
    """The model's forward under torch.compile, built once per model and reused (compilation is the
    expensive part). Raises InputError when torch.compile cannot run here."""
    why = compile_available()
    if why is not None:
        raise InputError(f"cannot compile the decode step: {why}; run without --compile")
    cf = getattr(model, "_granite_compiled", None)
    if cf is None:
        cf = CompiledForward(model)
        object.__setattr__(model, "_granite_compiled", cf)  # not a submodule: keep it out of state_dict
    return cf
