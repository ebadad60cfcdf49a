"""Output files and folders that never cost the user anything they own.

The rule: granite deletes or replaces only what it can prove it wrote.
- A report folder (`--out DIR` of bench and memory-report) carries a manifest, MANIFEST, naming
  each file granite wrote there and its SHA-256. Writing a report into an existing folder is
  allowed when the folder is empty or carries the manifest; then only files listed in the manifest
  (and unchanged since) are replaced or removed, and every other file in the folder is left alone.
  A folder with files and no manifest is refused, before any work starts.
- A checkpoint destination (`convert --force`) is replaced only when it is a checkpoint and nothing
  else (checkpoint_problem says what else it holds), never through a symbolic link, and never when
  it contains the source.
- Temporary names are fresh (tempfile), so no cleanup can hit a file that happened to have the name.
Output is built in a staging folder beside its destination (Staging) and renamed into place when
complete, so an interrupted run leaves the previous output as it was. A staging folder carries a
marker naming its destination, so the next run into the same destination can prove a leftover of a
killed run is granite's, and removes it (saying so). One run at a time writes a destination: a lock
beside it refuses the second, as it would be refused after the first had finished. Outputs get the
modes the user's umask gives, as any file the user makes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from granite_cli.errors import InputError

MANIFEST = ".granite-manifest.json"
PARTIAL_MARKER = ".granite-partial.json"
LOCK_SUFFIX = ".granite-lock"

# What a Hugging Face checkpoint folder holds (what `granite convert` writes, and the files it
# carries along from a source folder); anything else in a DST is the user's.
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "*.safetensors",
                    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "chat_template.jinja", "tokenizer.model", "added_tokens.json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_manifest(folder: Path) -> dict[str, str | None] | None:
    """{file name: sha256, or None for a file granite appends to}, or None when there is no manifest."""
    p = folder / MANIFEST
    if not p.is_file() or p.is_symlink():
        return None
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        files = d["files"]
        if d.get("tool") != "granite" or not isinstance(files, dict):
            return None
        return {str(k): (v if isinstance(v, str) else None) for k, v in files.items()
                if isinstance(k, str) and "/" not in k and k not in ("", ".", "..")}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError):
        return None


def _write_manifest(folder: Path, files: dict[str, str | None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f"{MANIFEST}.", suffix=".partial", dir=folder)
    os.fchmod(fd, file_mode())
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps({"tool": "granite", "files": dict(sorted(files.items()))}, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)


def _ours(folder: Path, name: str, manifest: dict[str, str | None]) -> bool:
    """True when `name` in folder is a file granite wrote and nobody changed since."""
    p = folder / name
    if name not in manifest or p.is_symlink() or not p.is_file():
        return False
    return manifest[name] is None or _sha256(p) == manifest[name]


def check_report_dir(out_dir: Path, names: tuple[str, ...], what: str = "--out") -> None:
    """Refuse (InputError, exit 2) an output folder granite may not write into; see the module rule.

    names: the file names (globs) the report may write, checked against what the folder holds."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        raise InputError(f"{what} {out_dir} is a symbolic link; give the folder it points to, or a new folder")
    _check_parent(out_dir, what)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(f"{what} {out_dir} is a file; give a folder (new, empty, or an earlier granite report)")
    held = sorted(p.name for p in out_dir.iterdir())
    if not held:
        return
    manifest = _read_manifest(out_dir)
    if manifest is None:
        raise InputError(f"{what} {out_dir} holds files granite did not write (e.g. {held[0]}); choose a new or empty "
                         "folder, or one an earlier granite report wrote")
    for n in held:
        if n != MANIFEST and any(fnmatch.fnmatch(n, g) for g in names) and not _ours(out_dir, n, manifest):
            raise InputError(f"{what} {out_dir}: {n} was not written by granite, or was changed since; move it away "
                             "or choose another folder")


def prepare_report_dir(out_dir: Path, names: tuple[str, ...], appended: tuple[str, ...] = ()) -> Path:
    """Check out_dir (check_report_dir), create it if missing, and list `appended` files (written in
    place while the work runs, such as streamed rows) in its manifest before the first write."""
    out_dir = Path(out_dir)
    check_report_dir(out_dir, names)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(out_dir) or {}
    for n in appended:
        manifest[n] = None
    _write_manifest(out_dir, manifest)
    return out_dir


@contextmanager
def report_dir(out_dir: Path, names: tuple[str, ...], say: Callable[[str], None] | None = None):
    """`with report_dir(out, names) as tmp:` write the report's files into tmp (a new folder in a
    Staging beside out); on success they are committed into out (commit_report_dir); on any failure
    or interrupt the staging folder is removed."""
    with Staging(out_dir, say) as st:
        st.target.mkdir(mode=dir_mode())
        yield st.target
        commit_report_dir(st.target, out_dir, names)


def commit_report_dir(tmp: Path, out_dir: Path, names: tuple[str, ...]) -> Path:
    """Move the finished report in `tmp` into out_dir and record it in the manifest.

    A missing out_dir is the renamed tmp. An existing one (empty, or a granite report) keeps every
    file granite did not write; of granite's files, those the new report does not write again are
    removed, the rest replaced, each by an atomic rename."""
    tmp, out_dir = Path(tmp), Path(out_dir)
    made = sorted(p.name for p in tmp.iterdir())
    files = {n: _sha256(tmp / n) for n in made}
    if not out_dir.exists():
        _write_manifest(tmp, files)
        rename_noreplace(tmp, out_dir)
        return out_dir
    check_report_dir(out_dir, names)  # the folder may have changed under the run
    old = _read_manifest(out_dir) or {}
    for n in made:
        os.replace(tmp / n, out_dir / n)
    for n, h in old.items():
        if n not in files and h is not None and _ours(out_dir, n, old):
            (out_dir / n).unlink()
    kept = {n: h for n, h in old.items() if h is None and (out_dir / n).exists() and n not in files}
    _write_manifest(out_dir, {**kept, **files})
    return out_dir


# ---------------------------------------------------------------------------------------------
# modes, names, staging folders, locks and renames

def _umask() -> int:
    try:  # read without changing it (os.umask can only be read by setting it, which races other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    m = os.umask(0o022)
    os.umask(m)
    return m


def file_mode() -> int:
    """The mode a new file of the user's gets (as `touch` would make it)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def shortened(name: str, limit: int = 48) -> str:
    """At most `limit` bytes of a file name (whole characters), for the temporary names built from it."""
    b = os.fsencode(name)
    return name if len(b) <= limit else os.fsdecode(b[:limit]).encode("utf-8", "ignore").decode("utf-8", "ignore")


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename src to dst only if nothing is at dst (FileExistsError otherwise), atomically where the
    kernel offers it (renameat2 with RENAME_NOREPLACE), so a destination that appeared during the run
    is never replaced by accident."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is not None:
        at_fdcwd, noreplace = -100, 1
        if fn(at_fdcwd, os.fsencode(str(src)), at_fdcwd, os.fsencode(str(dst)), noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no C library to ask
        return None


class Staging:
    """`with Staging(dst, say) as st:` write the output at `st.target` (inside a fresh folder beside
    dst, `.NAME.XXXX.partial`, carrying a marker that names dst); `st.commit(...)` renames it into
    place; leaving the block removes the staging folder, whatever happened.

    On entry it takes dst's lock (refusing, exit 2, while another run holds it) and removes the
    staging folders earlier runs into the same dst left when they were killed: their marker proves
    them granite's, and the lock proves their run is over."""

    def __init__(self, dst: Path, say: Callable[[str], None] | None = None) -> None:
        self.dst = Path(os.path.abspath(dst))
        self.say = say or (lambda msg: None)
        self.dir: Path | None = None
        self._lock: tuple[int, Path] | None = None

    @property
    def target(self) -> Path:
        assert self.dir is not None
        return self.dir / self.dst.name

    def __enter__(self) -> "Staging":
        parent = self.dst.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._lock = _take_lock(self.dst)
        except OSError as e:
            raise InputError(f"cannot write in {parent} ({e.strerror}); choose another place") from None
        try:
            self._remove_leftovers()
            self.dir = Path(tempfile.mkdtemp(prefix=f".{shortened(self.dst.name)}.", suffix=".partial", dir=parent))
            marker = {"tool": "granite", "dst": self.dst.name, "pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (self.dir / PARTIAL_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)  # a folder of our own making
            self.dir = None
        if self._lock is not None:
            _drop_lock(*self._lock)
            self._lock = None

    def _remove_leftovers(self) -> None:
        parent = self.dst.parent
        for p in sorted(parent.iterdir()):
            if not (p.name.startswith(".") and p.name.endswith(".partial")) or p.is_symlink() or not p.is_dir():
                continue
            m = p / PARTIAL_MARKER
            try:
                d = json.loads(m.read_text(encoding="utf-8")) if m.is_file() and not m.is_symlink() else None
            except (OSError, ValueError, RecursionError):
                d = None
            if not (isinstance(d, dict) and d.get("tool") == "granite" and d.get("dst") == self.dst.name):
                continue  # not provably a staging folder of a run into this destination
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(p, ignore_errors=True)
            self.say(f"note: removed {p.name} ({size / 1e6:.1f} MB), left by a granite run into {self.dst.name} "
                     f"that was killed (pid {d.get('pid')}, started {d.get('started')})")

    def commit(self, replace: Callable[[Path], None] | None = None) -> None:
        """Rename the finished target to dst. With `replace` (the caller's check that an existing dst
        may still be replaced: it raises if not), an existing dst is swapped out into the staging
        folder (removed with it); without, a dst that exists is refused (FileExistsError)."""
        dst = self.dst
        if replace is not None and (dst.exists() or dst.is_symlink()):
            replace(dst)
            old = self.dir / ".replaced"
            os.rename(dst, old)
            try:
                os.rename(self.target, dst)
            except BaseException:
                os.rename(old, dst)
                raise
            return
        rename_noreplace(self.target, dst)


def _lock_path(dst: Path) -> Path:
    tag = hashlib.sha256(os.fsencode(dst.name)).hexdigest()[:8]
    return dst.parent / f".{shortened(dst.name)}.{tag}{LOCK_SUFFIX}"


def _take_lock(dst: Path) -> tuple[int, Path]:
    """An exclusive lock on dst for this process (released when it exits, however it exits)."""
    path = _lock_path(dst)
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise InputError(f"another granite run is writing {dst} ({who or 'a process'}); wait for it to finish, "
                             "or choose another destination") from None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its last holder removed after we opened it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
            return fd, path
        os.close(fd)
    raise InputError(f"could not lock {dst} (its lock file keeps changing); try again")


def _drop_lock(fd: int, path: Path) -> None:
    try:
        if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    except OSError:
        pass
    os.close(fd)


def _check_parent(p: Path, what: str) -> None:
    """The nearest existing ancestor of p must be a folder (not a file)."""
    q = Path(os.path.abspath(p)).parent
    while not q.exists() and q != q.parent:
        q = q.parent
    if not q.is_dir():
        raise InputError(f"{what} {p}: {q} is a file, not a folder; choose a path inside a folder")


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not purely a checkpoint (a sub-folder, a link, a file of another kind, or no
    config.json and no weights: tokenizer files alone are not a checkpoint), or None. An empty
    folder holds nothing to lose."""
    held = sorted(Path(folder).iterdir())
    for p in held:
        if p.is_symlink():
            return f"{p.name} is a symbolic link"
        if p.is_dir():
            return f"{p.name}/ is a folder"
        if not any(fnmatch.fnmatch(p.name, g) for g in CHECKPOINT_FILES) and p.name != MANIFEST:
            return f"{p.name} is not part of a checkpoint"
    if held and not any(p.name == "config.json" or p.name.endswith(".safetensors") or
                        p.name == "model.safetensors.index.json" for p in held):
        return "it has no config.json and no weights, only " + ", ".join(p.name for p in held[:3])
    return None


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def check_destination(dst: Path, src: Path | None, fmt: str, force: bool) -> None:
    """Refuse (InputError) a conversion destination that would cost the user a file: see the module rule."""
    dst = Path(dst)
    if dst.is_symlink():
        raise InputError(f"DST {dst} is a symbolic link; granite never writes through or replaces a link: "
                         "give the real path")
    _check_parent(dst, "DST")
    if src is not None:
        s, d = Path(src).resolve(), dst.resolve()
        if s == d:
            raise InputError("DST is the same as SRC; write to a new path")
        if d in s.parents:
            raise InputError(f"DST {dst} contains SRC {src}; replacing it would delete the source: choose another DST")
    if not dst.exists():
        return
    if not force:
        raise InputError(f"{dst} already exists; pass --force to replace it")
    if fmt == "gguf":
        if dst.is_dir():
            raise InputError(f"{dst} is a folder; a .gguf destination must be a file path")
        if not is_gguf(dst):
            raise InputError(f"{dst} is not a GGUF file; --force replaces only a .gguf: move it or choose another DST")
        return
    if not dst.is_dir():
        raise InputError(f"{dst} is a file; a safetensors destination is a folder: move it or choose another DST")
    why = checkpoint_problem(dst)
    if why:
        raise InputError(f"{dst} is not only a checkpoint ({why}); --force replaces only a checkpoint folder: "
                         "move it or choose another DST")


