"""Lazy safetensors reading: a validated header and zero-copy tensor views over an mmap.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the data. A tensor here is a view of the mapped file, so loading copies each tensor exactly
once, into its destination parameter (with the dtype cast), and the page cache does the rest.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from pathlib import Path

import torch

from granite_cli.errors import InputError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}


def open_input(path: Path, kind: str):
    """(size, binary file) of an input checkpoint file, or a one-line InputError naming it."""
    try:
        return os.path.getsize(path), open(path, "rb")
    except OSError as e:
        raise InputError(f"{path}: cannot open {kind} file ({e.strerror})") from None


class SafetensorsFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        size, fh = open_input(self.path, "safetensors")
        with fh:
            if size < 8:
                raise InputError(f"{self.path}: truncated safetensors file ({size} bytes); re-download or "
                                 "re-convert it")
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8 or n > 100 * 2**20:
                raise InputError(f"{self.path}: corrupt safetensors header (length {n} in a {size}-byte file)")
            try:
                header = json.loads(fh.read(n))
            except (UnicodeDecodeError, ValueError, RecursionError):
                raise InputError(f"{self.path}: corrupt safetensors header (not valid JSON)") from None
            if not isinstance(header, dict):
                raise InputError(f"{self.path}: corrupt safetensors header (not a JSON object)")
            self.metadata = header.pop("__metadata__", None) or {}
            if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
                raise InputError(f"{self.path}: corrupt safetensors header (__metadata__ is not an object of strings)")
            self.data_start = 8 + n
            self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
            data_len = size - self.data_start
            for name, info in header.items():
                dt, shape, start, end = self._entry(name, info)
                numel = 1
                for s in shape:
                    numel *= s
                if end - start != numel * dt.itemsize or not 0 <= start <= end <= data_len:
                    raise InputError(
                        f"{self.path}: tensor {name!r} lies outside the file or has the wrong byte size "
                        "(truncated or corrupt file)"
                    )
                self.entries[name] = (dt, shape, start, end)
            self._check_layout(data_len)
            self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else None

    def _entry(self, name: str, info) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        def ints(v, k: int | None) -> bool:
            return (isinstance(v, list) and (k is None or len(v) == k)
                    and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v))

        ok = (isinstance(info, dict) and info.get("dtype") in DTYPES and ints(info.get("shape"), None)
              and ints(info.get("data_offsets"), 2))
        if not ok:
            raise InputError(f"{self.path}: corrupt safetensors header entry for {name[:80]!r} (needs dtype, shape "
                             "and data_offsets [begin, end])")
        return DTYPES[info["dtype"]], tuple(info["shape"]), *info["data_offsets"]

    def _check_layout(self, data_len: int) -> None:
        """The tensors tile the data section exactly, as the safetensors format requires: no overlap
        (two tensors sharing bytes would convert as if independent), no gap, nothing after."""
        end = 0
        for name, (_, _, start, stop) in sorted(self.entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
            if start != end:
                what = "overlaps the tensor before it" if start < end else "leaves a gap before it"
                raise InputError(f"{self.path}: tensor {name!r} {what} (data_offsets); the file is corrupt: "
                                 "re-download or re-convert it")
            end = stop
        if end != data_len:
            raise InputError(f"{self.path}: {data_len - end} bytes after the last tensor; the file is corrupt or "
                             "truncated: re-download or re-convert it")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy CPU view of the tensor's bytes in the mapped file."""
        dt, shape, start, end = self.entries[name]
        if end == start:
            return torch.empty(shape, dtype=dt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flat = torch.frombuffer(self._mm, dtype=dt, count=(end - start) // dt.itemsize,
                                    offset=self.data_start + start)
        return flat.view(shape)

    def read(self, name: str) -> torch.Tensor:
        """A private copy of the tensor, read with pread: unlike a touched mmap view it leaves no
        file pages mapped into the process, so streaming a checkpoint keeps RSS near one tensor."""
        dt, shape, start, end = self.entries[name]
        return _pread(self.path, self.data_start + start, end - start).view(dt).view(shape)

    def close(self) -> None:
        self._mm = None


def _pread(path: Path, offset: int, n: int) -> torch.Tensor:
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


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors to `path` through a temporary name, renamed only when complete."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    off = 0
    order = list(tensors)
    for name in order:
        t = tensors[name]
        nb = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + nb]}
        off += nb
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # align the data section to 8 bytes
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name in order:
            t = tensors[name].detach().contiguous().cpu()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)
