"""The kernel implementation choice, made once per process and shown (`granite env`, bench rows).

`GRANITE_KERNELS` = auto | torch | triton. Only the pure-PyTorch path exists in this release, so
`auto` resolves to `torch` everywhere; asking for `triton` is an error rather than a silent fallback.
"""

from __future__ import annotations

import os

from granite_cli.errors import InputError

IMPLS = ("auto", "torch", "triton")
_resolved: str | None = None


def resolved_impl() -> str:
    global _resolved
    if _resolved is None:
        want = os.environ.get("GRANITE_KERNELS", "auto")
        if want not in IMPLS:
            raise InputError(f"GRANITE_KERNELS={want!r} is not one of {', '.join(IMPLS)}")
        if want == "triton":
            raise InputError("GRANITE_KERNELS=triton: the Triton kernels are not part of this release; use auto or torch")
        _resolved = "torch"
    return _resolved
