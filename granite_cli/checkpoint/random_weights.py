"""Random weights at real shapes, made one tensor at a time by the reference init rules for its
name, so any order of tensors gives the same values (checkpoint.sources.ProfileSource, and the core's
models built with weights="random")."""

from __future__ import annotations

import math

import torch

from granite_cli.errors import InputError


def check_seed(seed: int) -> int:
    """A seed torch's generators take: 0 to 2^64-1 (an InputError otherwise)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise InputError(f"--seed must be an integer between 0 and 2^64-1, got {seed!r:.40}")
    return seed


# A prime-length block of random values, tiled with a per-tensor random offset: large tensors get
# distinct, well-spread values at memory speed (normal_ on billions of elements takes minutes on a CPU).
TILE = 1_000_003


@torch.no_grad()
def fill_random(name: str, p: torch.Tensor, g: torch.Generator, tile: torch.Tensor, std: float = 0.02) -> None:
    """Fill one tensor in place by the reference init rules for its name (a parameter or checkpoint
    name): norms and D = 1, A_log = log(1..H), dt_bias = softplus⁻¹ of dt log-uniform in [1e-3, 1e-1],
    biases 0, weights normal(0, std); tensors above the tile's size copy the tile from a random offset."""
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name and leaf == "weight":
        p.fill_(1.0)
    elif leaf == "A_log":
        p.copy_(torch.log(torch.arange(1, p.numel() + 1, dtype=torch.float32)).view(p.shape))
    elif leaf == "D":
        p.fill_(1.0)
    elif leaf == "dt_bias":
        dt = torch.exp(torch.rand(p.numel(), generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        p.copy_((dt + torch.log(-torch.expm1(-dt))).view(p.shape))
    elif leaf == "bias":
        p.zero_()
    elif p.numel() <= TILE:
        p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))
    else:
        flat = p.view(-1)
        off = int(torch.randint(0, TILE, (1,), generator=g))
        done = 0
        while done < flat.numel():
            n = min(TILE - off, flat.numel() - done)
            flat[done : done + n].copy_(tile[off : off + n])
            done += n
            off = 0


