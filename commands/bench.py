"""`granite bench`: context x batch sweeps of prefill and decode, with scaling fits and verdicts.
CLI layer only: options, one precedence rule, progress and printing; the work is granite_cli.bench."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from granite_cli.commands.common import Format, FormatOpt, emit_rows, say

COLUMNS = ["model", "batch", "ctx", "phase", "status", "tokens_per_s", "latency_ms", "stdev_s", "peak_total_bytes",
           "predicted_total_bytes", "peak_delta_bytes"]
HEADERS = {"tokens_per_s": "tok/s", "latency_ms": "latency ms", "stdev_s": "stdev s", "peak_total_bytes": "peak mem",
           "predicted_total_bytes": "predicted", "peak_delta_bytes": "peak +mem"}


def _fmt_num(v):
    return "" if v is None else (f"{v:,.1f}" if v >= 10 else f"{v:.3f}")


# The options whose help is long, declared once here to keep bench() readable.
SharePrefillOpt = Annotated[Optional[bool], typer.Option(
    "--share-prefill/--no-share-prefill",
    help="On a CPU, a context's prefill continues from a smaller context's end state where that is a whole "
         "number of --ubatch pieces (the same pieces and tokens; its time is added, and the row says "
         "prefill_from). On by default.")]
CudaGraphOpt = Annotated[Optional[bool], typer.Option(
    "--cuda-graph/--no-cuda-graph",
    help="On a GPU, replay decode steps as CUDA graphs (falls back to eager, with the reason, where capture is "
         "impossible). On by default.")]
CompileOpt = Annotated[Optional[bool], typer.Option(
    "--compile",
    help="On a CPU, run decode steps under torch.compile (TorchInductor; needs a C++ compiler). Compiling takes "
         "1-2.5 minutes per model and batch size on 2 cores, in untimed first passes.")]
SweepOpt = Annotated[Optional[Path], typer.Option(
    help="TOML sweep file with any of the options above (models, ctx, batch, phases, gen, dtype, device, reps, "
         "warmup, ubatch, share_prefill, cuda_graph, compile, max_case_seconds, seed, guard, weights). An "
         "option given on the command line wins over the file, and the file over the defaults.")]
WeightsOpt = Annotated[Optional[str], typer.Option(
    help="random, checkpoint, or auto (the default: a local folder's weights where it has them, else random "
         "at the model's real shapes; a Hub id then fetches config.json only).")]


def bench(
    model: Annotated[Optional[list[str]], typer.Option(
        "--model", "-m", metavar="MODEL",
        help="Profile, config.json, checkpoint folder or Hub id org/name[@rev] (repeatable).")] = None,
    weights: WeightsOpt = None,
    ctx: Annotated[Optional[str], typer.Option(help="Contexts: 1k,4k,128k or a range 1k-128k*2 / 512-4k+512.")] = None,
    batch: Annotated[Optional[str], typer.Option(help="Batch sizes: 1,4 or a range 1-16*2.")] = None,
    phase: Annotated[Optional[str], typer.Option(help="prefill, decode, or prefill,decode (the default).")] = None,
    gen: Annotated[Optional[int], typer.Option(help="Decode tokens timed per repetition (default 16).")] = None,
    dtype: Annotated[Optional[str], typer.Option(
        help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on GPU).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or auto (the default).")] = None,
    reps: Annotated[Optional[int], typer.Option(
        help="Timed repetitions per case (default 3; on a CPU 1 for the default sweep and above 16k).")] = None,
    warmup: Annotated[Optional[int], typer.Option(
        help="Untimed runs per case (default 1; on a CPU 0 for the default sweep and above 16k).")] = None,
    ubatch: Annotated[Optional[int], typer.Option(help="Prefill tokens per forward (chunked prefill; 4096).")] = None,
    share_prefill: SharePrefillOpt = None,
    cuda_graph: CudaGraphOpt = None,
    compile_decode: CompileOpt = None,
    sweep: SweepOpt = None,
    max_case_seconds: Annotated[Optional[float], typer.Option(
        help="Skip cases the fitted curve predicts to take longer (default 1800).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write report.md, rows.jsonl and plots into this folder.")] = None,
    jsonl: Annotated[Optional[Path], typer.Option(help="Append each row to this JSONL file as it finishes.")] = None,
    resume: Annotated[bool, typer.Option(help="Skip cases already finished in the JSONL file.")] = False,
    baseline: Annotated[Optional[Path], typer.Option(
        help="Earlier rows (JSONL or --format json output) to compare with.")] = None,
    fail_on_regression: Annotated[Optional[str], typer.Option(
        help="With --baseline: exit 3 if tokens/s drops by more, e.g. 10%.")] = None,
    check: Annotated[bool, typer.Option(help="Exit 3 when a scaling claim is not reproduced.")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Seed for random weights and inputs (default 0).")] = None,
    guard: Annotated[Optional[str], typer.Option(
        help="Correctness at each case's depth: 'depth' (the default) compares its decode steps with a chunked "
             "continuation from the same state; 'full' also with a from-empty prefill, at each model's largest "
             "context. A failing case is marked invalid.")] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Sweep context and batch: prefill and decode throughput, latency and memory; fit the scaling.

    With no arguments: on a CPU, cpu-hybrid vs cpu-dense over 512-8k at batch 1 and 4; on a GPU,
    granite-4.0-h-micro vs granite-4.0-micro with random bf16 weights over 1k-32k. Every sweep field
    comes from its option if given, else from --sweep FILE, else from the default.

    Examples: granite bench --ctx 128k;  granite bench -m granite-4.0-h-tiny --ctx 1k-32k*2 --batch 1,8 --out rep/
    """
    import torch

    from granite_cli.bench.session import duration, run_sweep
    from granite_cli.bench.spec import resolve_spec

    flags = {"models": model, "ctx": ctx, "batch": batch, "phases": phase, "gen": gen, "dtype": dtype,
             "device": device, "reps": reps, "warmup": warmup, "ubatch": ubatch, "share_prefill": share_prefill,
             "cuda_graph": cuda_graph, "compile": compile_decode, "max_case_seconds": max_case_seconds,
             "seed": seed, "guard": guard, "weights": weights}
    spec = resolve_spec(flags, sweep, torch.cuda.is_available())
    outcome = run_sweep(spec, out=out, jsonl=jsonl, resume=resume, baseline=baseline,
                        fail_on_regression=fail_on_regression, check=check, say=say,
                        progress=_Progress(sys.stderr.isatty()))
    result = outcome.analysis
    emit_rows(outcome.rows, fmt, columns=COLUMNS, headers=HEADERS,
              json_obj={"schema_version": 1, "rows": outcome.rows, "verdicts": result["verdicts"],
                        "fits": result["fits"], "ratios": result["ratios"], "wall_s": outcome.wall_s},
              formatters=FORMATTERS)
    if fmt is Format.table:
        for v in result["verdicts"]:
            say(f"  {v}")
    say(f"done in {duration(outcome.wall_s)}")
    outcome.raise_for_gates()


def _bytes(v):
    from granite_cli.render import human_bytes

    return "" if v is None else human_bytes(v)


FORMATTERS = {"tokens_per_s": _fmt_num, "latency_ms": _fmt_num, "stdev_s": _fmt_num, "peak_total_bytes": _bytes,
              "predicted_total_bytes": _bytes, "peak_delta_bytes": _bytes}


class _Progress:
    """One line per case on stderr; a Rich progress bar with an estimate when stderr is a terminal."""

    def __init__(self, tty: bool) -> None:
        self.tty, self.total, self.n, self.bar = tty, 0, 0, None

    def start(self, cases: int, estimate_s: float) -> None:
        self.total, self.t0 = cases, time.perf_counter()
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                TimeRemainingColumn(), transient=True,
                                console=Console(stderr=True))  # progress never touches stdout
            self.task = self.bar.add_task("bench", total=cases)
            self.bar.start()

    def case(self, info: dict) -> None:
        self.n += 1
        msg = f"[{self.n}/{self.total}] {info['model']} batch {info['batch']} ctx {info['ctx']}"
        if self.bar:
            self.bar.update(self.task, description=msg, completed=self.n - 1)
        else:
            say(msg)

    def row(self, r: dict) -> None:
        tps = f"{r['tokens_per_s']:.1f} tok/s" if r.get("tokens_per_s") else (r.get("error") or "")
        line = f"    {r['phase']:7s} {r['status']:7s} {tps}"
        if self.bar:
            self.bar.console.print(f"{r['model']} b{r['batch']} ctx {r['ctx']}{line}")
        else:
            say(line)

    def stop(self) -> None:
        if self.bar:
            self.bar.stop()
            self.bar = None
