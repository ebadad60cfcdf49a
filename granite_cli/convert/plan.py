"""What a conversion will write, before anything is written: the output tensors (names, shapes,
storage types, bytes), the memory and disk it needs. Refused up front (exit 2) when DST may not be
replaced or the disk is too small (check_disk=False, for a dry run, reports the shortfall instead).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from granite_cli.checkpoint import gguf_map as mapping
from granite_cli.checkpoint.dtypes import BY_SHORT, parse_dtype
from granite_cli.checkpoint.sources import Source
from granite_cli.convert.tokenizer import SYNTHETIC_NOTE
from granite_cli.errors import InputError
from granite_cli.fsutil import check_destination, check_output_paths
from granite_cli.render import parse_bytes

if TYPE_CHECKING:
    from granite_cli.convert.formats import Format
    from granite_cli.convert.tokenizer import Vocab

# the torch dtype each storage kind is written as (q8_0 is GGUF blocks: 34 bytes per 32 values)
STORE = {**{k: BY_SHORT[k] for k in ("f32", "f16", "bf16", "fp8")},
         "int8": torch.int32, "scale": torch.float32, "shape": torch.int64}  # int8: packed four to an int32


@dataclass
class Out:
    name: str                 # output tensor name
    src: str                  # canonical source tensor
    shape: tuple[int, ...]    # PyTorch order
    store: str                # f32 f16 bf16 q8_0 | fp8 | int8 (packed 4 to an int32) | scale | shape
    part: mapping.Part | None = None

    @property
    def nbytes(self) -> int:
        n = math.prod(self.shape)
        return n // 32 * 34 if self.store == "q8_0" else n * STORE[self.store].itemsize


@dataclass
class Plan:
    source: Source
    dst: Path
    fmt: "Format"                  # the output format (convert.formats)
    outs: list[Out]
    hf_dtype: dict[str, torch.dtype]  # dtype of each canonical tensor as the output represents it
    method: dict[str, str]         # canonical name → exact | fp8 | int8 | q8_0
    shards: list[list[Out]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    quant: str | None = None
    bytes_out: int = 0
    vocab: "Vocab | None" = None   # written beyond the source's tokenizer files (GGUF metadata, or a synthetic one)
    force: bool = False            # an existing DST may be replaced (if it still is a checkpoint at the end)

    @property
    def by_src(self) -> dict[str, list[Out]]:
        if not hasattr(self, "_by_src"):
            self._by_src: dict[str, list[Out]] = {}
            for o in self.outs:
                self._by_src.setdefault(o.src, []).append(o)
        return self._by_src

    @property
    def memory_needed(self) -> int:
        """Peak working set of the write: the largest (source tensor + its outputs) plus piece temporaries."""
        per = {}
        for o in self.outs:
            per[o.src] = per.get(o.src, 0) + o.nbytes
        src = {n: math.prod(self.source.shape(n)) * self.source.dtype(n).itemsize for n in self.source.names}
        return max(src[n] + per.get(n, 0) for n in self.source.names) + 64 * 2**20

    def tensor_plan(self) -> list[dict]:
        """One row per output tensor: name, source tensor, shape, storage type, bytes."""
        return [{"name": o.name, "source": o.src, "shape": list(o.shape), "storage": o.store, "bytes": o.nbytes}
                for o in self.outs]

    def summary(self) -> dict:
        by_store: dict[str, int] = {}
        for o in self.outs:
            by_store[o.store] = by_store.get(o.store, 0) + 1
        free = shutil.disk_usage(_existing_parent(self.dst)).free
        return {
            "source": str(self.source.path), "source_format": self.source.kind, "destination": str(self.dst),
            "format": self.fmt.name, "model": self.source.cfg.name,
            "architecture": self.fmt.architecture(self.source.cfg),
            "tensors_in": len(self.source.names), "tensors_out": len(self.outs), "storage": by_store,
            "quant": self.quant, "shards": max(1, len(self.shards)),
            "bytes_in": self.source.nbytes, "bytes_out": self.bytes_out,
            "memory_needed_bytes": self.memory_needed,
            "disk_needed_bytes": self.bytes_out, "disk_free_bytes": free, "disk_enough": free >= self.bytes_out,
            "notes": self.notes,
        }


def _existing_parent(p: Path) -> Path:
    p = p.resolve().parent
    while not p.exists():
        p = p.parent
    return p


def plan(source: Source, dst: str | Path, *, dtype: str | None = None, quant_method: str | None = None,
         keep: tuple[str, ...] = (), shard_size: str = "5GB", force: bool = False,
         check_disk: bool = True, no_vocab: bool = False) -> Plan:
    from granite_cli.convert.formats import format_for

    dst = Path(os.path.abspath(dst))  # "." and ".." get a name, and a parent to write the temporary beside
    check_output_paths(dst, what="DST")
    fmt = format_for(dst)
    check_destination(dst, None if source.kind == "profile" else Path(source.path), fmt.kind, force)
    qm = fmt.quant_method(quant_method)
    want = parse_dtype(dtype) if dtype else None
    hf_dtype = {n: want or source.dtype(n) for n in source.names}
    method = {n: "exact" for n in source.names}
    notes: list[str] = []
    outs = fmt.outs(source, hf_dtype, method, qm, keep, notes)
    vocab = fmt.vocab(source, no_vocab)
    if vocab is not None and vocab.synthetic:
        notes.append(SYNTHETIC_NOTE)
    p = Plan(source, dst, fmt, outs, hf_dtype, method, notes=notes, quant=qm, vocab=vocab, force=force)
    p.shards = _shards(outs, int(parse_bytes(shard_size))) if fmt.sharded else []
    p.bytes_out = fmt.bytes_out(p)
    if check_disk and (short := disk_shortfall(p)):
        raise InputError(short)
    return p


def _shards(outs: list[Out], limit: int) -> list[list[Out]]:
    """Consecutive shards of at most `limit` bytes; a canonical tensor's parts never straddle two."""
    shards: list[list[Out]] = [[]]
    size = 0
    for o in outs:
        if shards[-1] and size + o.nbytes > limit and o.src != shards[-1][-1].src:
            shards.append([])
            size = 0
        shards[-1].append(o)
        size += o.nbytes
    return shards


def disk_shortfall(p: Plan) -> str | None:
    """The one-line reason the output will not fit on DST's disk, or None when it fits."""
    where = _existing_parent(p.dst)
    free = shutil.disk_usage(where).free
    if p.bytes_out <= free:
        return None
    return (f"too little disk at {where}: the output needs {_gb(p.bytes_out)}, {_gb(free)} is free; "
            f"free some space or choose another DST")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"
