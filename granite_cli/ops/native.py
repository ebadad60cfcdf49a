"""The CPU decode kernel (decode_cpu.c), built once per machine and cached on disk, loaded only when
granite can show that it built the file itself.

A decode step in torch is a couple of thousand small calls around ~100 GEMVs; on a small CPU the
calls cost as much as the GEMVs, and MKL's single-row GEMV streams weights at half the memory's rate.
decode_cpu.c computes a whole step in one call. It is compiled here with the system's C compiler
(-O3 -march=native -fopenmp: a few seconds), into the user's cache folder, under a name that hashes
the source, the compiler, the flags and the CPU's feature flags: a changed kernel, compiler or CPU
builds a new library, and a built one is only ever loaded, never rebuilt.

Loading a shared library runs its constructors inside granite, so a library is loaded only when:
- every folder from the library up to the cache root is a real folder (no symbolic link) owned by
  this user and writable by nobody else, and every folder above the root is owned by this user or
  root and writable by nobody else unless sticky (as /tmp is), so no other user can put or swap a
  file there;
- the file itself is a regular file owned by this user, writable by nobody else, opened without
  following links;
- its SHA-256 equals the digest granite recorded beside it when it built it.
The bytes that were checked are the bytes loaded (from an anonymous memory file, or a copy in a
fresh folder only this user can open), so nothing can swap the file between the check and the load.
Where the cache cannot be trusted, or holds a file granite did not record, the kernel is built
privately for this run (in a fresh 0700 temporary folder, removed after loading) and the row's note
says why; a file granite did not record is never replaced or removed (it may be the user's).

The build takes a lock in the kernels folder, writes the digest and the library under temporary
names and renames them, digest first, so concurrent first runs cannot load half a file or record a
digest of another build.

OpenMP: the library links libgomp.so.1 by soname, the runtime torch has already loaded, so the
kernel's threads are torch's threads (two pools would fight over the cores).
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

SOURCE = Path(__file__).with_name("decode_cpu.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-fno-math-errno"]
BUILD_S = 3.0  # what building takes, for estimates and messages: 1.3-3.2 s with gcc 12 on the 2-core VM
# Part of the library's name: a cache written before digests were recorded is never mistaken for one with them.
CACHE_FORMAT = "sha256-recorded-1"
SYMBOLS = ("granite_step", "granite_step_work", "granite_abi")
_COMPILE_TIMEOUT_S = 300

_lib: ctypes.CDLL | None = None
_error: str | None = None
build_note: str | None = None  # set when this process built the library (what it took, and where)


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
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def library_path(cc: str) -> Path:
    """The cached library's path for this source, compiler, flags and CPU."""
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, _compiler_version(cc), " ".join(FLAGS),
                                    _cpu_flags(), CACHE_FORMAT]).encode())
    return cache_dir() / "kernels" / f"decode_cpu-{key.hexdigest()[:20]}.so"


def digest_path(library: Path) -> Path:
    """Where the SHA-256 granite recorded when it built `library` is kept."""
    return library.with_name(library.name + ".sha256")


# ---- what may be trusted ----------------------------------------------------------------------------

def _private(st: os.stat_result, what: str) -> str | None:
    """Why a file or folder is not this user's alone (None when it is)."""
    if st.st_uid != os.geteuid():
        return f"{what} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"{what} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def folder_problem(kernels: Path, root: Path | None = None) -> str | None:
    """Why another user could put or swap a file in `kernels` (None when nobody can): the folders from it
    up to the cache root must be this user's, unwritable by others and not symbolic links; those above
    the root this user's or root's, unwritable by others unless sticky."""
    root = root or kernels.parent
    chain = [kernels] + ([root] if root != kernels else [])
    for p in chain:
        try:
            st = os.lstat(p)
        except OSError as e:
            return f"{p}: {e.strerror}"
        if stat.S_ISLNK(st.st_mode):
            return f"{p} is a symbolic link"
        if not stat.S_ISDIR(st.st_mode):
            return f"{p} is not a folder"
        if why := _private(st, f"the folder {p}"):
            return why
    q = Path(os.path.realpath(root)).parent
    while True:
        try:
            st = os.stat(q)
        except OSError as e:
            return f"{q}: {e.strerror}"
        if st.st_uid not in (0, os.geteuid()):
            return f"the folder {q} above the cache belongs to uid {st.st_uid}"
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return f"the folder {q} above the cache is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
        if q == q.parent:
            return None
        q = q.parent


def _read_private(path: Path, limit: int) -> bytes:
    """The bytes of a regular file that is this user's alone, opened without following a link; OSError
    (with a reason) otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        if why := _private(st, str(path)):
            raise OSError(why)
        if st.st_size > limit:
            raise OSError(f"{path} is larger than a decode kernel ({st.st_size} bytes)")
        chunks, left = [], st.st_size + 1
        while left > 0 and (b := os.read(fd, min(left, 1 << 20))):
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


_MAX_LIBRARY = 64 << 20


def cached_library(path: Path) -> tuple[bytes | None, str | None]:
    """(the library's bytes, None) when `path` is a library granite built and recorded, in folders only
    this user can write; (None, why not) otherwise; (None, None) when there is none."""
    if not os.path.lexists(path):
        return None, None
    if why := folder_problem(path.parent, cache_dir()):
        return None, why
    try:
        data = _read_private(path, _MAX_LIBRARY)
    except OSError as e:
        return None, f"{path}: {e.strerror or e}"
    try:
        recorded = _read_private(digest_path(path), 4096).decode("ascii", "replace").strip()
    except OSError as e:
        why = "no digest recorded beside it" if isinstance(e, FileNotFoundError) else f"its digest: {e.strerror or e}"
        return None, f"{path} is not a library granite recorded ({why})"
    if hashlib.sha256(data).hexdigest() != recorded:
        return None, f"{path} is not the library granite built there (its SHA-256 differs from the one recorded)"
    return data, None


# ---- building ----------------------------------------------------------------------------------------

def _compile(cc: str, out: str) -> str | None:
    """Compile the kernel to `out`; None on success, else the compiler's last line."""
    try:
        p = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", out, "-lm"], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=_COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"the compiler ran over {_COMPILE_TIMEOUT_S} s"
    except OSError as e:
        return str(e)
    if p.returncode != 0:
        return ((p.stderr.strip().splitlines() or ["no output"])[-1])[:160]
    return None


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """`data` at `path` by a temporary name and a rename, readable by others but writable by this user only."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _mkdir_private(p: Path) -> None:
    if not os.path.lexists(p):
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            p.mkdir(mode=0o700)
        except FileExistsError:
            pass


def _build_cached(cc: str, path: Path) -> tuple[bytes | None, str | None]:
    """Build into the cache (under a lock; another process may have built it meanwhile). (bytes, None),
    or (None, why) when the cache is not usable."""
    root = cache_dir()
    try:
        _mkdir_private(root)
        if why := folder_problem(root, root):  # nothing is made where another user could swap it
            return None, why
        _mkdir_private(path.parent)
    except OSError as e:
        return None, f"cannot create {path.parent} ({e.strerror})"
    if why := folder_problem(path.parent, root):
        return None, why
    try:
        lock = os.open(path.parent / ".build.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        return None, f"cannot lock {path.parent} ({e.strerror})"
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data, why = cached_library(path)
        if data is not None or why is not None:  # built meanwhile, or a file granite did not record
            return data, why
        fd, tmp = tempfile.mkstemp(prefix=".decode_cpu-", suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            if err := _compile(cc, tmp):
                raise _BuildFailed(err)
            data = Path(tmp).read_bytes()
        finally:
            os.unlink(tmp)
        _write_new(digest_path(path), (hashlib.sha256(data).hexdigest() + "\n").encode(), 0o644)
        _write_new(path, data, 0o755)
        return data, None
    finally:
        os.close(lock)


class _BuildFailed(Exception):
    pass


def _build_private(cc: str) -> bytes:
    """Build in a fresh folder only this user can open, and return the library's bytes (the folder is
    removed)."""
    d = tempfile.mkdtemp(prefix="granite-kernel-")
    try:
        out = os.path.join(d, "decode_cpu.so")
        if err := _compile(cc, out):
            raise _BuildFailed(err)
        return Path(out).read_bytes()
    finally:
        shutil.rmtree(d, ignore_errors=True)


_held: list[int] = []  # memory files of loaded libraries, kept open so their /proc names are never reused


def _dlopen(data: bytes) -> ctypes.CDLL:
    """Load a library from the bytes that were checked, so nothing can swap it before the load: from an
    anonymous memory file where the kernel has them (kept open, so the loader never hands back an earlier
    library under a reused name), else from a copy in a fresh folder only this user can open."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("granite-decode-kernel", getattr(os, "MFD_CLOEXEC", 0))
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
        except OSError:  # no /proc, or memory files may not be mapped executable here
            os.close(fd)
        else:
            _held.append(fd)
            return lib
    d = tempfile.mkdtemp(prefix="granite-kernel-")
    try:
        p = os.path.join(d, "decode_cpu.so")
        with open(p, "wb") as f:
            f.write(data)
        return ctypes.CDLL(p)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _bind(data: bytes) -> ctypes.CDLL:
    """The loaded library with its entry points typed; AttributeError when it lacks one."""
    lib = _dlopen(data)
    p64, dbl, i32 = ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int
    lib.granite_step.argtypes = [p64, dbl, p64, i32, p64, i32, p64, p64]
    lib.granite_step.restype = i32
    lib.granite_step_work.argtypes = [p64, i32]
    lib.granite_step_work.restype = ctypes.c_int64
    lib.granite_abi.argtypes = [i32]
    lib.granite_abi.restype = i32
    return lib


# ---- the public face ---------------------------------------------------------------------------------

def status() -> str:
    """The kernel on this machine, in words, without building or loading anything (`granite env`)."""
    cc = _compiler()
    if cc is None:
        return "unavailable: no C compiler (cc, gcc or clang) on PATH; CPU decode runs eagerly"
    path = library_path(cc)
    data, why = cached_library(path)
    if data is not None:
        return f"built: {path}"
    if why is None and (why := _cache_problem(path)) is None:
        return f"not built yet: the first CPU decode builds it (about {BUILD_S:.0f} s) into {path.parent}"
    return f"built privately for each run (about {BUILD_S:.0f} s): the cache is not trusted ({why})"


def _cache_problem(path: Path) -> str | None:
    """Why the kernels folder could not take a build (None where it could, or does not exist yet)."""
    for p in (path.parent, cache_dir()):
        if os.path.lexists(p):
            return folder_problem(p, cache_dir())
    return None


def build_plan() -> str:
    """What the next load() will build, in words, for a note before the work starts."""
    cc = _compiler()
    path = library_path(cc) if cc else None
    why = None
    if path is not None:
        why = cached_library(path)[1] or _cache_problem(path)
    if why:
        return (f"building the CPU decode kernel privately for this run (about {BUILD_S:.0f} s): the cache is not "
                f"trusted ({why})")
    return f"building the CPU decode kernel first (once per machine, about {BUILD_S:.0f} s; cached in " \
           f"{cache_dir() / 'kernels'})"


def will_build() -> bool:
    """True when the next load() compiles (no trusted cached library for this machine)."""
    cc = _compiler()
    return cc is not None and _lib is None and _error is None and cached_library(library_path(cc))[0] is None


def load() -> ctypes.CDLL | None:
    """The loaded library: the cached one if granite can show it built it, else a fresh build (into the
    cache where only this user can write, else private to this run). None when it cannot be built or
    loaded here (why() says why). torch must be imported first (its OpenMP runtime)."""
    global _lib, _error, build_note
    if _lib is not None or _error is not None:
        return _lib
    import torch  # noqa: F401 - loads the OpenMP runtime the library must share

    cc = _compiler()
    if cc is None:
        _error = "no C compiler (cc, gcc or clang) on PATH"
        return None
    path = library_path(cc)
    t0 = time.perf_counter()
    data, distrust = cached_library(path)
    built_here = False
    try:
        if data is None and distrust is None:
            try:
                data, distrust = _build_cached(cc, path)
            except OSError as e:  # a full or read-only cache: this run still gets its kernel
                distrust = f"cannot write {path.parent} ({e.strerror or e})"
            built_here = data is not None
        if data is not None:
            try:
                _lib = _bind(data)
            except (OSError, AttributeError) as e:
                distrust = f"{path} is not a loadable decode kernel ({str(e)[:100]})"
                _lib = None
        if _lib is None:
            _lib = _bind(_build_private(cc))
            build_note = (f"built the CPU decode kernel privately for this run in {time.perf_counter() - t0:.1f} s: "
                          f"the cache is not trusted ({distrust})")
        elif built_here:
            build_note = f"built the CPU decode kernel in {time.perf_counter() - t0:.1f} s (cached in {path.parent})"
    except _BuildFailed as e:
        _error = f"building the CPU decode kernel failed ({e})"
    except (OSError, AttributeError) as e:
        _error = f"the CPU decode kernel could not be built or loaded ({str(e)[:160]})"
    return _lib


def why() -> str | None:
    """Why load() returned None (None when it has not failed)."""
    return _error
