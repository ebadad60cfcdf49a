"""What a conversion writes, as data: the conversion's options, each output tensor (name, shape,
storage type, bytes) and the whole plan (convert.plan makes it; convert.formats writes it)."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from granite_cli.checkpoint import gguf_map as mapping
from granite_cli.checkpoint.dtypes import BY_SHORT
from granite_cli.checkpoint.gguf import Q8_0_BLOCK, Q8_0_BLOCK_BYTES
from granite_cli.checkpoint.sources import Source

if TYPE_CHECKING:
    from granite_cli.convert.formats import Format
    from granite_cli.convert.tokenizer import Vocab

# the torch dtype each storage kind is written as (q8_0 is GGUF blocks: 34 bytes per 32 values)
STORE = {**{k: BY_SHORT[k] for k in ("f32", "f16", "bf16", "fp8")},
         "int8": torch.int32, "scale": torch.float32, "shape": torch.int64}  # int8: packed four to an int32


@dataclass
class ConvertOptions:
    """What `granite convert` takes beside SRC and DST (the CLI fills it; defaults are the command's)."""

    dtype: str | None = None            # bf16, fp16 or fp32; None: the source's
    quant: str | None = None            # fp8, int8 (safetensors) or q8_0 (GGUF)
    keep: tuple[str, ...] = ()          # globs of tensors never quantized
    shard_size: str = "5GB"
    force: bool = False                 # replace an existing DST (if it is a checkpoint)
    verify: bool = True
    seed: int = 0                       # for --from-profile weights
    no_vocab: bool = False
    from_profile: str | None = None     # random weights at this profile's shapes instead of SRC


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
        return n // Q8_0_BLOCK * Q8_0_BLOCK_BYTES if self.store == "q8_0" else n * STORE[self.store].itemsize


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

    @cached_property
    def by_src(self) -> dict[str, list[Out]]:
        out: dict[str, list[Out]] = {}
        for o in self.outs:
            out.setdefault(o.src, []).append(o)
        return out

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
        free = shutil.disk_usage(existing_parent(self.dst)).free
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


def existing_parent(p: Path) -> Path:
    p = p.resolve().parent
    while not p.exists():
        p = p.parent
    return p
