"""What a conversion will write, before anything is written: the output tensors (names, shapes,
storage types, bytes), the memory and disk it needs (convert.layout holds them). Refused up front
(exit 2) when DST may not be replaced or the disk is too small (check_disk=False, for a dry run,
reports the shortfall instead).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from granite_cli.checkpoint.dtypes import parse_dtype
from granite_cli.checkpoint.sources import Source
from granite_cli.convert.formats import format_for
from granite_cli.convert.layout import ConvertOptions, Out, Plan, existing_parent
from granite_cli.convert.tokenizer import SYNTHETIC_NOTE
from granite_cli.errors import InputError
from granite_cli.fsutil import check_destination
from granite_cli.paths import check_output_paths
from granite_cli.render import parse_bytes


def plan(source: Source, dst: str | Path, o: ConvertOptions | None = None, check_disk: bool = True) -> Plan:
    o = o or ConvertOptions()
    dst = Path(os.path.abspath(dst))  # "." and ".." get a name, and a parent to write the temporary beside
    check_output_paths(dst, what="DST")
    fmt = format_for(dst)
    check_destination(dst, None if source.kind == "profile" else Path(source.path), fmt.kind, o.force)
    qm = fmt.quant_method(o.quant)
    want = parse_dtype(o.dtype) if o.dtype else None
    hf_dtype = {n: want or source.dtype(n) for n in source.names}
    method = {n: "exact" for n in source.names}
    notes: list[str] = []
    outs = fmt.outs(source, hf_dtype, method, qm, o.keep, notes)
    vocab = fmt.vocab(source, o.no_vocab)
    if vocab is not None and vocab.synthetic:
        notes.append(SYNTHETIC_NOTE)
    p = Plan(source, dst, fmt, outs, hf_dtype, method, notes=notes, quant=qm, vocab=vocab, force=o.force)
    p.shards = _shards(outs, int(parse_bytes(o.shard_size, "--shard-size"))) if fmt.sharded else []
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
    where = existing_parent(p.dst)
    free = shutil.disk_usage(where).free
    if p.bytes_out <= free:
        return None
    return (f"too little disk at {where}: the output needs {_gb(p.bytes_out)}, {_gb(free)} is free; "
            f"free some space or choose another DST")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"
