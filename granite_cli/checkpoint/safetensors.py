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
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from granite_cli.checkpoint.dtypes import BY_ST, st_code
from granite_cli.checkpoint.stream import OrderedWriter, pread, tensor_bytes
from granite_cli.config import read_json_config
from granite_cli.errors import InputError
from granite_cli.fsutil import file_mode, shortened


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

        ok = (isinstance(info, dict) and info.get("dtype") in BY_ST and ints(info.get("shape"), None)
              and ints(info.get("data_offsets"), 2))
        if not ok:
            raise InputError(f"{self.path}: corrupt safetensors header entry for {name[:80]!r} (needs dtype, shape "
                             "and data_offsets [begin, end])")
        return BY_ST[info["dtype"]], tuple(info["shape"]), *info["data_offsets"]

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
        return pread(self.path, self.data_start + start, end - start).view(dt).view(shape)

    def close(self) -> None:
        self._mm = None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype  # as stored (int32 for packed int8, and so on)
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


class SafetensorsWriter(OrderedWriter):
    """A safetensors file written streaming: the header for a known list of tensors first, then each
    tensor's bytes in that order."""

    format = "safetensors"

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> None:
        header: dict = {"__metadata__": metadata} if metadata else {}
        off = 0
        for t in specs:
            header[t.name] = {"dtype": st_code(t.dtype), "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
            off += t.nbytes
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)  # align the data section to 8 bytes
        super().__init__(path, [(t.name, t.nbytes) for t in specs], struct.pack("<Q", len(hb)) + hb)

    def write(self, name: str, t: torch.Tensor) -> None:
        """The next tensor's bytes (its dtype may differ from the spec's; its byte size may not)."""
        self.write_next(name, [tensor_bytes(t)])


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors to `path` through a fresh temporary name, renamed only when complete."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{shortened(path.name)}.", suffix=".partial", dir=path.parent)
    os.fchmod(fd, file_mode())  # the user's umask, not mkstemp's private 0600
    os.close(fd)
    try:
        w = SafetensorsWriter(Path(tmp), [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], metadata)
        for n, t in tensors.items():
            w.write(n, t)
        w.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shard_name(i: int, n: int) -> str:
    """The file name of shard i (1-based) of n, as Hugging Face names them."""
    return "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json: which shard holds each tensor."""
    (Path(folder) / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2) + "\n",
        encoding="utf-8")


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Map tensor name → safetensors file, from model.safetensors.index.json or the lone file."""
    idx = folder / "model.safetensors.index.json"
    if idx.is_file():
        d = read_json_config(idx)
        wm = d.get("weight_map") if isinstance(d, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise InputError(f"{idx}: not a valid safetensors index (weight_map must be an object of shard file names)")
        out = {}
        for fname in sorted(set(wm.values())):
            # an index names files in its own folder; a path could make a conversion read anything
            if fname in ("", ".", "..") or "/" in fname or "\\" in fname or not fname.endswith(".safetensors"):
                raise InputError(f"{idx}: shard name {fname[:80]!r} is not a .safetensors file name in the "
                                 "checkpoint folder; fix the index")
            if not (folder / fname).is_file():
                raise InputError(f"{idx}: shard {fname} is named in the index but missing from {folder}")
            have = set(SafetensorsFile(folder / fname).keys())
            lacking = sorted(n for n, f in wm.items() if f == fname and n not in have)
            if lacking:
                raise InputError(f"{idx}: maps {len(lacking)} tensor(s) to {fname}, which lacks them, e.g. "
                                 f"{lacking[0]}; fix the index or re-download the shard")
        for name, fname in wm.items():
            out[name] = folder / fname
        return out
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder}: no .safetensors files and no model.safetensors.index.json")
    out = {}
    for f in files:
        for name in SafetensorsFile(f).keys():
            out[name] = f
    return out
