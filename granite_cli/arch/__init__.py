"""The architecture families granite runs, one module each; this is their registry.

Adding a family is one module with an `Arch` subclass (granite_cli.arch.base says what it holds)
and its line here, plus a test.
"""

from __future__ import annotations

from granite_cli.arch import granite, granitemoehybrid, llama, qwen3, qwen3_moe
from granite_cli.arch.base import Arch, Routing
from granite_cli.errors import InputError

ARCHS: dict[str, Arch] = {a.name: a for a in (granitemoehybrid.ARCH, granite.ARCH, llama.ARCH, qwen3.ARCH,
                                              qwen3_moe.ARCH)}
ARCHITECTURES = tuple(ARCHS)

__all__ = ["ARCHITECTURES", "ARCHS", "Arch", "Routing", "get_arch"]


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise InputError(f"unknown architecture {name!r}; supported: {', '.join(ARCHITECTURES)}")
    return ARCHS[name]
