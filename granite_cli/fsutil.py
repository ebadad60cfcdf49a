"""Atomic output folders: build under a temporary name, then swap into place, so an interrupted run
never leaves a half-written report where the previous one was."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def partial_dir(out_dir: Path) -> Path:
    """A fresh, empty temporary folder beside out_dir."""
    tmp = Path(out_dir).with_name(f".{Path(out_dir).name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, out_dir: Path) -> Path:
    """Put the finished temporary folder at out_dir, replacing what was there."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
    return out_dir
