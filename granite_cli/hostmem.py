"""Host (CPU) heap policy for benchmark processes: keep freed memory for reuse.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap and
unmaps it on free, so each large activation of a CPU forward is faulted in and zeroed by the kernel
again. With mmap off and trimming off, freed blocks stay in the heap and the next layer reuses them
(what that saved is measured in docs/decisions.md, "Host heap policy").

This is process-wide, so only the benchmark entry points turn it on (`granite bench` on a CPU, the
benchmark scripts' workers); importing granite_cli changes nothing. GRANITE_HOST_MALLOC=system
opts out. Memory figures stay honest: `release_free_memory()` hands the retained free memory back
(malloc_trim) before every RSS baseline, so a phase's RSS increase is still its own working set.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1  # mallopt takes a C int
_policy: str | None = None
_libc = None


def retain_freed_memory() -> str:
    """Apply the policy once; returns what is in force: "glibc-retain" or "system" (other C
    libraries, or GRANITE_HOST_MALLOC=system)."""
    global _policy, _libc
    if _policy is None:
        _policy = "system"
        if os.environ.get("GRANITE_HOST_MALLOC", "retain") != "system" and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None)
                ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
            except (OSError, AttributeError):  # no mallopt: not glibc
                ok = False
            if ok:
                _policy, _libc = "glibc-retain", libc
    return _policy


def policy() -> str:
    """The policy in force, without applying anything."""
    return _policy or "system"


def release_free_memory() -> None:
    """Return retained free heap memory to the OS (a no-op unless the retain policy is on)."""
    if _libc is not None:
        _libc.malloc_trim(0)
