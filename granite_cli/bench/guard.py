"""Correctness guards of a bench sweep.

- correctness_guard: once per model, decode steps against a full forward over a short prefix.
- depth_guard: at each case's own depth c, from the state its prefill left, k single-token decode
  steps against one k-token chunked continuation over the same tokens; with `full`, also against a
  prefill of c + k tokens from an empty cache. Logits are compared on a fixed spread of vocabulary
  columns (probe_columns), within guard_tolerance.
- judge: a failing guard makes the case's rows invalid, so they stay out of every fit and verdict.
"""

from __future__ import annotations

import functools
import math

import torch

GUARD_TOKENS = 16
PROBE_COLUMNS = 256
GUARD_RTOL = {torch.float32: 1e-5, torch.float64: 1e-9}


def correctness_guard(model, device) -> tuple[bool, float]:
    """Decode logits must equal prefill logits on a short prefix (fp32: 1e-3 of the logit scale;
    half precision: 5%)."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, model.cfg.vocab_size, (1, GUARD_TOKENS), generator=g).to(device)
    with torch.inference_mode():
        full = model(ids).float()
        cache = model.allocate_cache(1, GUARD_TOKENS)
        steps = [model(ids[:, :4], cache).float()]
        steps += [model(ids[:, i : i + 1], cache).float() for i in range(4, GUARD_TOKENS)]
    got = torch.cat(steps, 1)
    if not (torch.isfinite(full).all() and torch.isfinite(got).all()):
        return False, math.inf
    diff = (got - full).abs().max().item()
    scale = full.abs().max().item() or 1.0
    tol = 1e-3 if model.dtype == torch.float32 else 5e-2
    return diff <= tol * max(scale, 1.0), diff


@functools.lru_cache(maxsize=8)
def probe_columns(vocab: int, device: torch.device) -> torch.Tensor:
    """A fixed spread of vocabulary columns whose logits the depth guard compares: a wrong state
    moves every logit, so a few hundred find it, at the cost of a small gather in a timed step."""
    g = torch.Generator().manual_seed(7)
    return torch.randperm(vocab, generator=g)[:PROBE_COLUMNS].sort().values.to(device)


def probe(logits: torch.Tensor) -> torch.Tensor:
    """The probe columns of logits [..., vocab]."""
    return logits[..., probe_columns(logits.shape[-1], logits.device)]


def guard_tolerance(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """What two correct code paths over the same state may differ by, relative to the logit scale
    (the largest |logit| compared): 1e-5 in fp32, 5% in half precision. The fp32 bound sits two
    orders of magnitude above how far two correct fp32 paths drift apart, and an order below what
    an offset of one token does even to a small random-weight model."""
    scale = ref.abs().max().item() if ref.numel() else 1.0
    return GUARD_RTOL.get(dtype, 5e-2) * max(scale, 1e-6)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    return (a - b).abs().max().item()


@torch.no_grad()
def depth_guard(model, cache, mark: dict, ids: torch.Tensor, steps: list | None, *, gen: int, ubatch: int,
                full: bool) -> dict:
    """The case's correctness at its real depth c = mark["pos"], from the state its prefill left.

    steps: the timed decode's recorded probe logits (k = gen), or None to run k = min(gen, 4) steps
    here. ids holds the case's tokens, at least c + k of them. Returns the row fields
    guard_depth_diff, guard_full_diff (None without `full`) and guard_tol."""
    c = mark["pos"]
    if steps is None:  # a prefill-only sweep: a few untimed steps
        cache.rewind(mark)
        steps = [probe(model(ids[:, c + i : c + i + 1], cache, logits="last")) for i in range(min(gen, 4))]
    k = len(steps)
    want = torch.cat(steps, dim=1).float()  # [b, k, P]
    cache.rewind(mark)
    chunk = probe(model(ids[:, c : c + k], cache, logits="all")).float()
    res = {"guard_depth_diff": max_diff(chunk, want), "guard_full_diff": None,
           "guard_tol": guard_tolerance(model.dtype, want)}
    if full:
        cache.reset()
        tail = None
        for s in range(0, c + k, ubatch):
            h = model.hidden_states(ids[:, s : min(s + ubatch, c + k)], cache)
            tail = h if tail is None else torch.cat([tail, h], dim=1)[:, -k:]
        res["guard_full_diff"] = max_diff(probe(model.logits(tail[:, -k:])).float(), want)
    return res


def judge(rows: list, g: dict) -> None:
    """Put the depth guard's figures in the case's rows (bench.row.ModelRow); a failure makes them
    invalid (never fast)."""
    bad = [f"{name} differ from the decode steps by {g[key]:.3g} (tolerance {g['guard_tol']:.3g})"
           for key, name in (("guard_depth_diff", "a chunked continuation's logits"),
                             ("guard_full_diff", "a from-empty prefill's logits"))
           if g[key] is not None and not g[key] <= g["guard_tol"]]
    for row in rows:
        row.update(**g)
        if bad and row.status in ("ok", "invalid"):
            row.update(status="invalid", valid=False, error=f"depth guard at ctx {row.ctx}: " + "; ".join(bad))
