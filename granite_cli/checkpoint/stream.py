"""What the two container formats (safetensors, GGUF) share: a file written header first, then each
tensor's bytes in the order the header declared, so that nothing but the tensor being written is
held in memory; and byte ranges read into memory of their own.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from granite_cli.errors import InputError


def tensor_bytes(t: torch.Tensor):
    """A zero-copy byte view of a tensor (made contiguous and moved to the CPU first)."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data


def pread(path: Path, offset: int, n: int) -> torch.Tensor:
    """n bytes of `path` from `offset`, read into a fresh tensor (a copy that owns its memory)."""
    buf = torch.empty(n, dtype=torch.uint8)
    if n:
        mv = memoryview(buf.numpy()).cast("B")
        fd = os.open(path, os.O_RDONLY)
        try:
            got = 0
            while got < n:
                k = os.preadv(fd, [mv[got:]], offset + got)
                if k <= 0:
                    raise InputError(f"{path}: file ended early (truncated?)")
                got += k
        finally:
            os.close(fd)
    return buf


class OrderedWriter:
    """A file whose header lists every tensor (name and byte size) before any data. Tensors must then
    come in that order at those sizes, and close() refuses a file with tensors missing, which would
    otherwise be a well-formed-looking short file."""

    format = "checkpoint"

    def __init__(self, path: Path, sizes: list[tuple[str, int]], header: bytes) -> None:
        self.path, self._sizes, self._next = Path(path), sizes, 0
        self._f = open(self.path, "wb")
        self._f.write(header)

    def write_next(self, name: str, raws: list, pad: int = 0) -> None:
        """The next tensor: its byte pieces in order, then `pad` zero bytes."""
        want, nbytes = self._sizes[self._next]
        got = sum(r.nbytes for r in raws)
        if name != want or got != nbytes:
            raise RuntimeError(f"{self.format} writer: got {name} of {got} bytes, expected {want} of {nbytes}")
        for raw in raws:
            if raw.nbytes:
                self._f.write(raw)
        if pad:
            self._f.write(b"\0" * pad)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._sizes):
            self._f.close()
            raise RuntimeError(f"{self.format} writer closed after {self._next} of {len(self._sizes)} tensors")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        """Close after a failure (the caller removes the partial file)."""
        self._f.close()
