"""`granite convert`: checkpoints between safetensors and GGUF, dtypes and FP8/INT8/Q8_0, streamed and verified.
CLI layer only: parsing, progress and printing; the work is granite_cli.convert."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from granite_cli.commands.common import Format, FormatOpt, emit_rows, say


def convert(
    args: Annotated[Optional[list[str]], typer.Argument(
        metavar="SRC DST | inspect PATH", show_default=False,
        help="SRC: checkpoint folder, .gguf or Hub id org/name[@rev]; DST: folder or .gguf path.")] = None,
    dtype: Annotated[Optional[str],
                     typer.Option(help="Output dtype: bf16, fp16 or fp32 (default: the source's).")] = None,
    quant: Annotated[Optional[str], typer.Option(
        help="fp8 or int8 (compressed-tensors safetensors, per-channel), q8_0 (GGUF).")] = None,
    keep_high_precision: Annotated[Optional[list[str]], typer.Option("--keep-high-precision", metavar="GLOB",
        help="Tensors (HF names, glob) never quantized, in addition to embeddings, lm_head, norms, router, conv1d, "
             "A_log, D, dt_bias.")] = None,
    shard_size: Annotated[str, typer.Option(help="Largest safetensors shard, e.g. 5GB or 500MB.")] = "5GB",
    from_profile: Annotated[Optional[str],
                            typer.Option(metavar="NAME",
                                         help="Write random weights at this profile's real shapes (no SRC).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for --from-profile weights.")] = 0,
    dry_run: Annotated[bool,
                       typer.Option("--dry-run",
                                    help="Print the plan (tensors, bytes, memory, disk) and write nothing.")] = False,
    verify: Annotated[bool, typer.Option(
        help="Check inventory, metadata, every tensor and logits before renaming into place.")] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing DST.")] = False,
    no_vocab: Annotated[bool, typer.Option(
        "--no-vocab", help="Without a source tokenizer, write no vocabulary instead of a synthetic byte-level one "
                           "(llama.cpp can load such a GGUF but not serve it).")] = False,
    fmt: FormatOpt = Format.table,
) -> None:
    """Convert a checkpoint: HF folder <-> HF folder or .gguf, a .gguf -> HF folder (`convert inspect PATH`
    is `granite inspect PATH`).

    Output goes to a temporary name and is renamed into place only when written and verified.

    Examples: granite convert ./granite-4.0-h-tiny h-tiny-q8.gguf --quant q8_0;
    granite convert ./ckpt ./ckpt-fp8 --quant fp8;  granite convert --from-profile granite-4.0-h-1b ./h1b;
    granite convert inspect h-tiny-q8.gguf
    """
    from granite_cli.errors import InputError

    args = args or []
    if args[:1] == ["inspect"]:
        if len(args) != 2:
            raise InputError("usage: granite convert inspect PATH")
        return _inspect(args[1], fmt)
    if from_profile:
        if len(args) != 1:
            raise InputError("usage: granite convert --from-profile NAME DST")
        src, dst = None, args[0]
    elif len(args) != 2:
        raise InputError("usage: granite convert SRC DST (or: granite convert inspect PATH; --from-profile NAME DST)")
    else:
        src, dst = args

    from granite_cli.convert import run
    from granite_cli.render import human_bytes

    o = run.ConvertOptions(dtype, quant, tuple(keep_high_precision or ()), shard_size, force, verify, seed, no_vocab,
                           from_profile)
    source = run.open_any(src, o)
    p = run.plan(source, dst, o, check_disk=not dry_run)
    if dry_run:  # a plan is reported even when it would not fit; the shortfall is a field and a warning
        if short := run.disk_shortfall(p):
            say(f"warning: {short} (a real run stops here, exit 2)")
        s = p.summary()
        if fmt is Format.json:  # the per-tensor plan too (a table would be one row per tensor)
            s["tensor_plan"] = p.tensor_plan()
        return _emit(s, fmt, human_bytes)
    rep = run.execute(p, verify_output=verify, progress=_progress(source), status=say)
    for n in p.notes:
        say(f"note: {n}")
    _emit(rep, fmt, human_bytes)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and all(not isinstance(x, dict) for x in v.values()) and len(v) <= 4 and prefix:
            out[prefix + k] = ", ".join(f"{a}: {b}" for a, b in v.items())
        elif isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _emit(rep: dict, fmt: Format, hb) -> None:
    """json: the report as is; table/md/csv: one row per (dotted) field, sizes in human units for people."""
    if fmt is Format.json:
        emit_rows([], fmt, json_obj=rep)
        return
    rows = []
    for k, v in _flat(rep).items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}: {b}" for a, b in v.items())
        elif isinstance(v, list):
            v = "; ".join(map(str, v)) or "-"
        elif fmt is not Format.csv and "bytes" in k and isinstance(v, int):
            v = hb(v)
        elif v is None:
            v = "-"
        rows.append({"field": k, "value": v})
    emit_rows(rows, fmt, columns=["field", "value"])


def inspect(
    path: Annotated[str, typer.Argument(
        help="A Hugging Face checkpoint folder, a .gguf file or a Hub id org/name[@rev].")],
    fmt: FormatOpt = Format.table,
) -> None:
    """What a checkpoint is: format, architecture, layer pattern, dtypes, sizes, parameters, tokenizer.

    Also spelled `granite convert inspect PATH`.
    """
    _inspect(path, fmt)


def _inspect(path: str, fmt: Format) -> None:
    from granite_cli.convert.inspect import inspect as describe
    from granite_cli.render import human_bytes

    _emit(describe(path), fmt, human_bytes)


def _progress(source):
    """A Rich bar on a terminal (stderr); nothing when piped, so logs stay clean."""
    if not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("converting"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                   TimeRemainingColumn(), TextColumn("{task.description}"), console=Console(stderr=True),
        transient=True)
    state = {"task": None}

    def update(done: int, total: int, name: str) -> None:
        if state["task"] is None:
            bar.start()
            state["task"] = bar.add_task("", total=total)
        bar.update(state["task"], completed=done, description=name)
        if done >= total:
            bar.stop()

    return update
