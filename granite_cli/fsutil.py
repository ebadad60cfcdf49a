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
Output is built under a temporary name beside its destination and renamed into place when
complete, so an interrupted run leaves the previous output as it was.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from granite_cli.errors import InputError

MANIFEST = ".granite-manifest.json"

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
        d = json.loads(p.read_text())
        files = d["files"]
        if d.get("tool") != "granite" or not isinstance(files, dict):
            return None
        return {str(k): (v if isinstance(v, str) else None) for k, v in files.items()
                if isinstance(k, str) and "/" not in k and k not in ("", ".", "..")}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None


def _write_manifest(folder: Path, files: dict[str, str | None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f"{MANIFEST}.", suffix=".partial", dir=folder)
    with os.fdopen(fd, "w") as f:
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


def partial_dir(out_dir: Path) -> Path:
    """A fresh, empty temporary folder beside out_dir (its parents created)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))


@contextmanager
def report_dir(out_dir: Path, names: tuple[str, ...]):
    """`with report_dir(out, names) as tmp:` write the report's files into tmp; on success they are
    committed into out (commit_report_dir), on any failure or interrupt tmp is removed."""
    tmp = partial_dir(out_dir)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_report_dir(tmp, out_dir, names)


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
        os.replace(tmp, out_dir)
        return out_dir
    try:
        check_report_dir(out_dir, names)
    except InputError as e:  # the folder changed under the run: keep the finished report where it is
        raise InputError(f"{e}; the finished report is kept in {tmp}") from None
    old = _read_manifest(out_dir) or {}
    for n in made:
        os.replace(tmp / n, out_dir / n)
    for n, h in old.items():
        if n not in files and h is not None and _ours(out_dir, n, old):
            (out_dir / n).unlink()
    kept = {n: h for n, h in old.items() if h is None and (out_dir / n).exists() and n not in files}
    _write_manifest(out_dir, {**kept, **files})
    tmp.rmdir()
    return out_dir


def _check_parent(p: Path, what: str) -> None:
    """The nearest existing ancestor of p must be a folder (not a file)."""
    q = Path(os.path.abspath(p)).parent
    while not q.exists() and q != q.parent:
        q = q.parent
    if not q.is_dir():
        raise InputError(f"{what} {p}: {q} is a file, not a folder; choose a path inside a folder")


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not purely a checkpoint (a sub-folder, a link, a file of another kind), or None."""
    for p in sorted(Path(folder).iterdir()):
        if p.is_symlink():
            return f"{p.name} is a symbolic link"
        if p.is_dir():
            return f"{p.name}/ is a folder"
        if not any(fnmatch.fnmatch(p.name, g) for g in CHECKPOINT_FILES) and p.name != MANIFEST:
            return f"{p.name} is not part of a checkpoint"
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


def temp_file_beside(dst: Path) -> Path:
    """A fresh, empty temporary file beside dst (its parents created)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent)
    os.close(fd)
    return Path(name)


def replace_checkpoint(tmp: Path, dst: Path, fmt: str) -> None:
    """Put the finished output at dst. An existing dst is re-checked (it may have changed during the
    run) and replaced only if it still is a checkpoint; the old one is removed after the swap."""
    dst = Path(dst)
    if dst.is_symlink() or dst.exists():
        check_destination(dst, None, fmt, force=True)
    if fmt == "gguf" or not dst.exists():
        os.replace(tmp, dst)
        return
    hold = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
    os.replace(dst, hold / dst.name)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(hold / dst.name, dst)
        hold.rmdir()
        raise
    shutil.rmtree(hold)  # a folder of our own making, holding only the checkpoint checked above
