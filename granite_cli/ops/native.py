"""The CPU decode kernel (decode_cpu.c), built once per machine and cached on disk.

A decode step in torch is a couple of thousand small calls around ~100 GEMVs; on a small CPU the
calls cost as much as the GEMVs, and MKL's single-row GEMV streams weights at half the memory's rate.
decode_cpu.c computes a whole step in one call. It is compiled here with the system's C compiler
(-O3 -march=native -fopenmp: a few seconds), into the user's cache folder, under a name that hashes
the source, the compiler, the flags and the CPU's feature flags: a changed kernel, compiler or CPU
builds a new library, and a built one is only ever loaded, never rebuilt. The build writes a
temporary name and renames it, so concurrent first runs cannot load half a file.

OpenMP: the library links libgomp.so.1 by soname, the runtime torch has already loaded, so the
kernel's threads are torch's threads (two pools would fight over the cores).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

SOURCE = Path(__file__).with_name("decode_cpu.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-fno-math-errno"]
BUILD_S = 3.0  # what building takes, for estimates and messages: 1.3-3.2 s with gcc 12 on the 2-core VM

_lib: ctypes.CDLL | None = None
_error: str | None = None
build_note: str | None = None  # set when this process built the library (what it took)


def cache_dir() -> Path:
    """Where granite keeps what it builds: $GRANITE_CACHE_DIR, else $XDG_CACHE_HOME/granite, else ~/.cache/granite."""
    if os.environ.get("GRANITE_CACHE_DIR"):
        return Path(os.environ["GRANITE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "granite"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.machine() + platform.processor()


@functools.lru_cache(maxsize=4)
def _compiler_version(cc: str) -> str:
    # asked once per process: a bench run looks the library up for its estimate, its notes and the load
    return subprocess.run([cc, "--version"], capture_output=True, text=True).stdout


def library_path(cc: str) -> Path:
    """The cached library's path for this source, compiler, flags and CPU."""
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, _compiler_version(cc), " ".join(FLAGS),
                                    _cpu_flags()]).encode())
    return cache_dir() / "kernels" / f"decode_cpu-{key.hexdigest()[:20]}.so"


def status() -> str:
    """The kernel on this machine, in words, without building it (`granite env`)."""
    cc = _compiler()
    if cc is None:
        return "unavailable: no C compiler (cc, gcc or clang) on PATH; CPU decode runs eagerly"
    path = library_path(cc)
    if path.exists():
        return f"built: {path}"
    return f"not built yet: the first CPU decode builds it (about {BUILD_S:.0f} s) into {path.parent}"


def will_build() -> bool:
    """True when the next load() compiles (no cached library for this machine yet)."""
    cc = _compiler()
    return cc is not None and _lib is None and not library_path(cc).exists()


def load() -> ctypes.CDLL | None:
    """The loaded library, building it first when no cached one fits; None when it cannot be built
    or loaded here (why() says why). torch must be imported first (its OpenMP runtime)."""
    global _lib, _error, build_note
    if _lib is not None or _error is not None:
        return _lib
    import torch  # noqa: F401 - loads the OpenMP runtime the library must share

    cc = _compiler()
    if cc is None:
        _error = "no C compiler (cc, gcc or clang) on PATH"
        return None
    path = library_path(cc)
    try:
        if not path.exists():
            t0 = time.perf_counter()
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".decode_cpu-", suffix=".so", dir=path.parent)
            os.close(fd)
            try:
                p = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
                if p.returncode != 0:
                    msg = (p.stderr.strip().splitlines() or ["no output"])[-1]
                    _error = f"building the CPU decode kernel failed ({msg[:160]})"
                    return None
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            build_note = f"built the CPU decode kernel in {time.perf_counter() - t0:.1f} s (cached in {path.parent})"
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        _error = f"the CPU decode kernel could not be built or loaded ({e})"
        return None
    p64, dbl, i32 = ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int
    lib.granite_step.argtypes = [p64, dbl, p64, i32, p64, i32, p64, p64]
    lib.granite_step.restype = i32
    lib.granite_step_work.argtypes = [p64, i32]
    lib.granite_step_work.restype = ctypes.c_int64
    lib.granite_abi.argtypes = [i32]
    lib.granite_abi.restype = i32
    _lib = lib
    return lib


def why() -> str | None:
    """Why load() returned None (None when it has not failed)."""
    return _error
