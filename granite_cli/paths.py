"""Output paths checked before any work: names the file system can hold, and outputs of one run that
would write over each other or over one of its inputs."""

from __future__ import annotations

import os
from pathlib import Path

from granite_cli.errors import InputError


def check_output_paths(*paths: Path | None, what: str = "output") -> None:
    """Refuse (exit 2, before any work) an output path the file system cannot hold: a name over its
    limit (NAME_MAX, 255 bytes on most) or a path over PATH_MAX."""
    for p in paths:
        if p is None:
            continue
        full = os.fsencode(os.path.abspath(p))
        if len(full) >= 4096:
            raise InputError(f"{what} path {str(p)[:60]}...: {len(full)} bytes, longer than a path may be (4096)")
        limit = _name_max(Path(os.path.abspath(p)))
        for part in Path(os.path.abspath(p)).parts:
            if len(os.fsencode(part)) > limit:
                raise InputError(f"{what} name {part[:40]}...: {len(os.fsencode(part))} bytes, longer than a file "
                                 f"name may be here ({limit}); choose a shorter name")


def _where(p: Path) -> str:
    """A path as the file system will resolve it, whether or not it exists yet."""
    a = os.path.abspath(p)
    return os.path.join(os.path.realpath(os.path.dirname(a)), os.path.basename(a))


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (the same inode where both exist; else the same resolved path)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return _where(a) == _where(b)


def is_inside(p: Path, folder: Path) -> bool:
    return _where(p).startswith(os.path.realpath(os.path.abspath(folder)) + os.sep)


def check_distinct(outputs: dict[str, Path | None], folder: tuple[str, Path | None] = ("", None),
                   inputs: dict[str, Path | None] | None = None) -> None:
    """Refuse (exit 2, before any work) outputs that would write over each other or over an input: two
    output options naming one file, an output or input inside the report folder (whose files the report
    replaces), an output that is an input."""
    outs = {k: v for k, v in outputs.items() if v is not None}
    ins = {k: v for k, v in (inputs or {}).items() if v is not None}
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if same_file(outs[a], outs[b]):
                raise InputError(f"{a} {outs[a]} and {b} {outs[b]} are the same file: each output needs its own file")
    flag, out_dir = folder
    for a, p in {**outs, **ins}.items():
        if out_dir is not None and is_inside(p, out_dir):
            raise InputError(f"{a} {p} is inside {flag} {out_dir}, whose files the report replaces; give a path "
                             f"outside {out_dir}")
    for a, p in outs.items():
        for b, q in ins.items():
            if same_file(p, q):
                raise InputError(f"{a} {p} is the file {b} reads: writing it would destroy the input; give another "
                                 "file")


def _name_max(p: Path) -> int:
    q = p.parent
    while not q.exists() and q != q.parent:
        q = q.parent
    try:
        return os.pathconf(q, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255
