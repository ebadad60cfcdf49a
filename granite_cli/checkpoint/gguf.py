"""The GGUF container (version 3), read and written by this project, one tensor at a time.

Layout: magic "GGUF", version, tensor count, metadata count; the metadata key/value pairs; one
info record per tensor (name, dims innermost-first, ggml type, offset into the data section);
padding to `general.alignment` (32); then each tensor's bytes, each padded to the alignment.
Because every offset follows from the names, shapes and types, the whole header is written first
and tensor data then streams in order: nothing is held in memory but the tensor being written.
The reader maps the file and hands out zero-copy views.
"""

from __future__ import annotations

import mmap
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from granite_cli.checkpoint.dtypes import TABLE
from granite_cli.checkpoint.stream import OrderedWriter, pread, tensor_bytes
from granite_cli.errors import InputError
from granite_cli.ggml import (  # noqa: F401 -- the format's names, re-exported for the modules that read GGUF
    ALIGN,
    ARR,
    BOOL,
    F32,
    F64,
    GGML_BF16,
    GGML_F16,
    GGML_F32,
    GGML_LAYOUT,
    GGML_Q8_0,
    I8,
    I16,
    I32,
    I64,
    INTEGER_TYPES,
    MAGIC,
    NUMBER_TYPES,
    Q8_0_BLOCK,
    Q8_0_BLOCK_BYTES,
    READ_VERSIONS,
    STR,
    U8,
    U16,
    U32,
    U64,
    VERSION,
)

_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
           U64: "<Q", I64: "<q", F64: "<d"}

# The types this project reads and writes.
GGML_TYPES = {t: GGML_LAYOUT[t] for t in (GGML_F32, GGML_F16, GGML_Q8_0, GGML_BF16)}


def type_name(t: int) -> str:
    return GGML_LAYOUT[t][0] if t in GGML_LAYOUT else f"type {t}"


def tensor_nbytes(shape: tuple[int, ...], t: int) -> int:
    n = 1
    for s in shape:
        n *= s
    _, blk, nb = GGML_LAYOUT[t]
    return n // blk * nb


def _pad(n: int) -> int:
    return -n % ALIGN


@dataclass(frozen=True)
class KV:
    key: str
    vtype: int
    value: Any
    atype: int | None = None  # element type when vtype is ARR

    @classmethod
    def of(cls, key: str, value: Any) -> KV:
        """The entry a plain Python value (as GGUFFile.kv reads it back) is written as: bool BOOL, int U32
        where it fits else I64, float F32, str STR, a sequence an ARR typed by its first element."""
        if isinstance(value, bool):
            return cls(key, BOOL, value)
        if isinstance(value, int):
            return cls(key, U32 if 0 <= value < 2**32 else I64, value)
        if isinstance(value, float):
            return cls(key, F32, value)
        if isinstance(value, str):
            return cls(key, STR, value)
        first = value[0] if len(value) else 0
        return cls(key, ARR, list(value), STR if isinstance(first, str) else F32 if isinstance(first, float) else I32)


def _enc_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _enc_value(vtype: int, value, atype: int | None) -> bytes:
    if vtype == STR:
        return _enc_str(value)
    if vtype == ARR:
        out = [struct.pack("<IQ", atype, len(value))]
        if atype == STR:
            out += [_enc_str(v) for v in value]
        else:
            out.append(struct.pack(f"<{len(value)}{_SCALAR[atype][1]}", *value))
        return b"".join(out)
    return struct.pack(_SCALAR[vtype], value)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (outermost first)
    gtype: int

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.gtype)


class GGUFWriter(OrderedWriter):
    """Write the header for a known list of tensors, then each tensor's bytes in that order."""

    format = "GGUF"

    def __init__(self, path: Path, kvs: list[KV], tensors: list[TensorInfo]) -> None:
        head = [MAGIC, struct.pack("<IQQ", VERSION, len(tensors), len(kvs))]
        for kv in kvs:
            head += [_enc_str(kv.key), struct.pack("<I", kv.vtype), _enc_value(kv.vtype, kv.value, kv.atype)]
        off = 0
        for t in tensors:
            dims = tuple(reversed(t.shape)) or (1,)
            head += [_enc_str(t.name), struct.pack(f"<I{len(dims)}Q", len(dims), *dims),
                     struct.pack("<IQ", t.gtype, off)]
            off += t.nbytes + _pad(t.nbytes)
        self.data_bytes = off
        h = b"".join(head)
        self.header = h + b"\0" * _pad(len(h))
        super().__init__(path, [(t.name, t.nbytes) for t in tensors], self.header)

    @property
    def total_bytes(self) -> int:
        return len(self.header) + self.data_bytes

    def write(self, name: str, data: torch.Tensor | list[torch.Tensor]) -> None:
        """The next tensor's bytes: one tensor, or a list of pieces written in order."""
        raws = [tensor_bytes(d) for d in (data if isinstance(data, list) else [data])]
        self.write_next(name, raws, _pad(sum(r.nbytes for r in raws)))


# Bounds that no real model file reaches, so a header cannot make the reader allocate without limit:
# counts are checked before anything is allocated for them, metadata arrays longer than _EAGER_ITEMS
# (the vocabulary) stay compact (numpy) or undecoded (strings), and at most _EAGER_BUDGET elements
# in all become Python objects.
MAX_TENSORS = 1 << 16
MAX_KEYS = 1 << 16
MAX_DIMS = 4
_EAGER_ITEMS = 4096
_EAGER_BUDGET = 1 << 18


class GGUFStrings:
    """A metadata array of strings, kept undecoded: its length, and its items on iteration."""

    def __init__(self, f: "GGUFFile", n: int) -> None:
        self._f, self._start, self._n = f, f._pos, n
        for _ in range(n):  # step over the strings, checking each lies in the file
            (k,) = f._take("<Q")
            if f._pos + k > f.size:
                raise struct.error("past end")
            f._pos += k

    def __len__(self) -> int:
        return self._n

    def __iter__(self):
        return self.decoded("replace")

    def decoded(self, errors: str = "strict"):
        """The strings in order; with errors="strict" a string that is not UTF-8 raises UnicodeDecodeError."""
        mm, pos = self._f._mm, self._start
        for _ in range(self._n):
            (k,) = struct.unpack_from("<Q", mm, pos)
            yield bytes(mm[pos + 8 : pos + 8 + k]).decode("utf-8", errors=errors)
            pos += 8 + k


class GGUFFile:
    """A mapped GGUF file: `.kv` (key → value), `.tensors` (name → TensorInfo), `.raw(name)`."""

    def __init__(self, path: str | Path, layout_only: bool = False) -> None:
        """layout_only: accept tensors of any ggml type (to size them); their data cannot be read."""
        from granite_cli.checkpoint.safetensors import open_input

        self.path = Path(path)
        self._known = GGML_LAYOUT if layout_only else GGML_TYPES
        size, fh = open_input(self.path, "GGUF")
        with fh:
            self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        self._pos = 0
        self.size = size
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, IndexError, OverflowError):
            raise InputError(f"{self.path}: truncated or corrupt GGUF header; re-download or re-convert it") from None

    def _take(self, fmt: str):
        n = struct.calcsize(fmt)
        if self._pos + n > self.size:
            raise struct.error("past end")
        v = struct.unpack_from(fmt, self._mm, self._pos)
        self._pos += n
        return v

    def _str(self) -> str:
        (n,) = self._take("<Q")
        if self._pos + n > self.size:
            raise struct.error("past end")
        s = bytes(self._mm[self._pos : self._pos + n]).decode("utf-8")
        self._pos += n
        return s

    def _corrupt(self, what: str) -> InputError:
        return InputError(f"{self.path}: corrupt GGUF header ({what}); re-download or re-convert it")

    def _value(self, vtype: int):
        if vtype == STR:
            return self._str()
        if vtype == ARR:
            atype, n = self._take("<IQ")
            if atype == STR:
                if n > (self.size - self._pos) // 8:  # each string takes at least its 8-byte length
                    raise struct.error("past end")
                if n > _EAGER_ITEMS or n > self._budget:
                    return GGUFStrings(self, n)
                self._budget -= n
                return [self._str() for _ in range(n)]
            if atype not in _SCALAR:
                raise self._corrupt(f"metadata array of value type {atype}")
            code = _SCALAR[atype][1]
            width = struct.calcsize("<" + code)
            if n > (self.size - self._pos) // width:
                raise struct.error("past end")
            if n > _EAGER_ITEMS or n > self._budget:  # a compact copy: exactly the file's bytes
                import numpy as np

                a = np.frombuffer(self._mm, dtype=np.dtype("<" + code), count=n, offset=self._pos).copy()
                self._pos += n * width
                return a
            self._budget -= n
            return list(self._take(f"<{n}{code}"))
        if vtype not in _SCALAR:
            raise self._corrupt(f"metadata value type {vtype}")
        return self._take(_SCALAR[vtype])[0]

    def _parse(self) -> None:
        if self.size < 24 or bytes(self._mm[:4]) != MAGIC:
            raise InputError(f"{self.path}: not a GGUF file (bad magic); pass a .gguf written by llama.cpp or granite")
        self._pos = 4
        version, nt, nkv = self._take("<IQQ")
        if version not in READ_VERSIONS:
            raise InputError(f"{self.path}: GGUF version {version} is not supported (only 2 and 3)")
        if nt > min(self.size, MAX_TENSORS) or nkv > min(self.size, MAX_KEYS):
            raise InputError(f"{self.path}: corrupt GGUF header (counts {nt}/{nkv})")
        self._read_metadata(nkv)
        align = self.kv.get("general.alignment", ALIGN)
        if not isinstance(align, int) or isinstance(align, bool) or align < 1 or align & (align - 1):
            raise self._corrupt(f"general.alignment {align!r:.20} is not a power of two")
        infos = [self._read_info() for _ in range(nt)]
        start = self._pos + (-self._pos % align)
        self.tensors: dict[str, TensorInfo] = {}
        self.offsets: dict[str, int] = {}
        for ti, off in infos:
            self._place(ti, off, start, align)
        spans = sorted((self.offsets[n], self.offsets[n] + t.nbytes, n) for n, t in self.tensors.items())
        for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
            if begin < end:
                raise self._corrupt(f"tensors {a!r:.60} and {b!r:.60} overlap")

    def _read_metadata(self, nkv: int) -> None:
        self._budget = _EAGER_BUDGET
        self.kv: dict[str, Any] = {}
        self.kv_types: dict[str, tuple[int, int | None]] = {}  # key → (value type, element type of an array)
        for _ in range(nkv):
            key = self._str()
            (vt,) = self._take("<I")
            if key in self.kv:
                raise self._corrupt(f"metadata key {key!r} twice")
            at = struct.unpack_from("<I", self._mm, self._pos)[0] if vt == ARR and self._pos + 4 <= self.size else None
            self.kv[key] = self._value(vt)
            self.kv_types[key] = (vt, at)

    def _read_info(self) -> tuple[TensorInfo, int]:
        """One tensor-info record: (the tensor, its offset in the data section)."""
        name = self._str()
        (nd,) = self._take("<I")
        if nd > MAX_DIMS:
            raise self._corrupt(f"tensor {name!r:.60} has {nd} dimensions; GGUF allows {MAX_DIMS}")
        dims = self._take(f"<{nd}Q")
        gt, off = self._take("<IQ")
        if gt not in self._known:
            raise InputError(
                f"{self.path}: tensor {name} is {type_name(gt)}, which granite cannot read (F32, F16, BF16, Q8_0); "
                "convert from the original safetensors checkpoint instead"
            )
        return TensorInfo(name, tuple(reversed(dims)), gt), off

    def _place(self, ti: TensorInfo, off: int, start: int, align: int) -> None:
        """Record a tensor at data offset `off`, once its dimensions, alignment and extent are possible."""
        name, shape = ti.name, ti.shape
        if name in self.tensors:
            raise self._corrupt(f"tensor {name!r:.60} twice")
        numel = 1
        for d in shape:
            numel *= d
        blk = GGML_LAYOUT[ti.gtype][1]
        if numel > self.size * blk or (shape and shape[-1] % blk):
            raise self._corrupt(f"tensor {name!r:.60} has impossible dimensions {list(shape)} for "
                                f"{type_name(ti.gtype)}")
        if off % align:
            raise self._corrupt(f"tensor {name!r:.60} is not aligned to {align} bytes")
        if start + off + ti.nbytes > self.size:
            raise InputError(f"{self.path}: tensor {name} lies past the end of the file (truncated download?)")
        self.tensors[name] = ti
        self.offsets[name] = start + off

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a zero-copy uint8 view."""
        ti = self.tensors[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.frombuffer(self._mm, dtype=torch.uint8, count=ti.nbytes, offset=self.offsets[name])

    def tensor(self, name: str, copy: bool = False) -> torch.Tensor:
        """Decoded to a float tensor in PyTorch order (F32/F16/BF16 a zero-copy view, or with copy=True
        a private pread copy that maps no file pages; Q8_0 dequantised to F32)."""
        ti = self.tensors[name]
        r = pread(self.path, self.offsets[name], ti.nbytes) if copy else self.raw(name)
        if ti.gtype == GGML_Q8_0:
            return dequantize_q8_0(r, ti.shape)
        dt = next(d.torch for d in TABLE if d.ggml == ti.gtype)
        return r.view(dt).view(ti.shape)


# ---- Q8_0: blocks of 32 values along the innermost dimension, an f16 scale then 32 int8 ----

def row_chunks(x: torch.Tensor, max_elems: int = 1 << 22):
    """Contiguous 2-D pieces of x ([rows, last dim]) in row-major order, each at most ~max_elems,
    so per-element work on a large (or non-contiguous) tensor needs only piece-sized temporaries."""
    if x.dim() >= 3:
        for i in range(x.shape[0]):
            yield from row_chunks(x[i], max_elems)
        return
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() == 2 else x.reshape(1, -1)
    step = max(1, max_elems // max(1, x2.shape[1]))
    for i in range(0, x2.shape[0], step):
        yield x2[i : i + step]


def quantize_q8_0_pieces(x: torch.Tensor) -> list[torch.Tensor]:
    """Bytes of `x` in Q8_0 as a list of pieces (in order), exactly as ggml's reference rounds:
    d = amax/127 (stored f16) and q = round-half-away-from-zero(x/d).

    The rounding is sign(v)·(⌊|v|⌋ + ⌊2·frac(|v|)⌋), with both floors taken by float → int32 casts:
    every step is exact, so ties (common with bf16 inputs) go away from zero and 0.49999997 goes to 0
    (floor(|v| + 0.5) would round it up). Pieces of 256K values keep the passes in cache, and only
    arithmetic ops with vectorised CPU kernels are used (docs/decisions.md, "Q8_0 quantisation"). The
    pieces are written as they are, without joining them."""
    pieces = []
    for c in row_chunks(x.detach(), 1 << 18):
        b = c.to(torch.float32, copy=True).reshape(-1, 32)
        d = b.abs().amax(dim=1, keepdim=True).div_(127)
        inv = torch.where(d == 0, 0.0, 1.0 / d)
        v = b.mul_(inv)
        a = v.abs()
        whole = a.to(torch.int32)
        half_up = a.sub_(whole).mul_(2).to(torch.int32)  # 1 when the fraction is at least one half
        q = (whole.add_(half_up) * torch.sign(v)).to(torch.int8)
        pieces.append(torch.cat((d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)), dim=1))
    return pieces


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """Bytes of `x` in Q8_0 as one uint8 tensor (see quantize_q8_0_pieces)."""
    return torch.cat([p.reshape(-1) for p in quantize_q8_0_pieces(x)])


def dequantize_q8_0(raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Q8_0 bytes → float32 tensor of `shape`, in cache-sized pieces."""
    blocks = raw.reshape(-1, Q8_0_BLOCK_BYTES)
    out = torch.empty(blocks.shape[0], 32, dtype=torch.float32)
    step = 8192
    for i in range(0, blocks.shape[0], step):
        b = blocks[i : i + step]
        d = b[:, :2].contiguous().view(torch.float16).to(torch.float32)
        o = out[i : i + step]
        o.copy_(b[:, 2:].contiguous().view(torch.int8))
        o.mul_(d)
    return out.reshape(shape)
