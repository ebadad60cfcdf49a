"""`granite bench`: context x batch sweeps of prefill and decode, with scaling fits and verdicts."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from granite_cli.commands._common import Format, FormatOpt, emit_rows, say

COLUMNS = ["model", "batch", "ctx", "phase", "status", "tokens_per_s", "latency_ms", "stdev_s", "peak_total_bytes",
           "predicted_total_bytes", "peak_delta_bytes"]
HEADERS = {"tokens_per_s": "tok/s", "latency_ms": "latency ms", "stdev_s": "stdev s", "peak_total_bytes": "peak mem",
           "predicted_total_bytes": "predicted", "peak_delta_bytes": "peak +mem"}


def _fmt_num(v):
    return "" if v is None else (f"{v:,.1f}" if v >= 10 else f"{v:.3f}")


def bench(
    model: Annotated[Optional[list[str]],
                     typer.Option("--model", "-m", metavar="MODEL",
                                  help="Profile, config.json or checkpoint folder (repeatable).")] = None,
    ctx: Annotated[Optional[str], typer.Option(help="Contexts: 1k,4k,128k or a range 1k-128k*2 / 512-4k+512.")] = None,
    batch: Annotated[Optional[str], typer.Option(help="Batch sizes: 1,4 or a range 1-16*2.")] = None,
    phase: Annotated[str, typer.Option(help="prefill, decode, or prefill,decode.")] = "prefill,decode",
    gen: Annotated[Optional[int], typer.Option(help="Decode tokens timed per repetition (default 16).")] = None,
    dtype: Annotated[Optional[str],
                     typer.Option(help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on GPU).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    reps: Annotated[Optional[int],
                    typer.Option(help="Timed repetitions per case (default 3; on a CPU 1 for the default sweep and "
                                 "above 16k).")] = None,
    warmup: Annotated[Optional[int],
                      typer.Option(help="Untimed runs per case (default 1; on a CPU 0 for the default sweep and above "
                                   "16k).")] = None,
    ubatch: Annotated[int, typer.Option(help="Prefill tokens per forward (chunked prefill).")] = 4096,
    share_prefill: Annotated[bool,
                             typer.Option(help="On a CPU, a context's prefill continues from a smaller context's end "
                                          "state where that is a whole number of --ubatch pieces (the same pieces and "
                                          "tokens; its time is added, and the row says prefill_from).")] = True,
    cuda_graph: Annotated[bool,
                          typer.Option(help="On a GPU, replay decode steps as CUDA graphs (falls back to eager, with "
                                       "the reason, where capture is impossible).")] = True,
    compile_decode: Annotated[bool,
                              typer.Option("--compile",
                                           help="On a CPU, run decode steps under torch.compile (TorchInductor; needs "
                                                "a C++ compiler). Compiling takes 1-2.5 minutes per model and batch "
                                                "size on 2 cores, in untimed first passes.")] = False,
    sweep: Annotated[Optional[Path], typer.Option(help="TOML sweep file (the same fields as the options).")] = None,
    max_case_seconds: Annotated[float,
                                typer.Option(help="Skip cases the fitted curve predicts to take longer.")] = 1800.0,
    out: Annotated[Optional[Path], typer.Option(help="Write report.md, rows.jsonl and plots into this folder.")] = None,
    jsonl: Annotated[Optional[Path], typer.Option(help="Append each row to this JSONL file as it finishes.")] = None,
    resume: Annotated[bool, typer.Option(help="Skip cases already finished in the JSONL file.")] = False,
    baseline: Annotated[Optional[Path],
                        typer.Option(help="Earlier rows (JSONL or --format json output) to compare with.")] = None,
    fail_on_regression: Annotated[Optional[str], typer.Option(
        help="With --baseline: exit 3 if tokens/s drops by more, e.g. 10%.")] = None,
    check: Annotated[bool, typer.Option(help="Exit 3 when a scaling claim is not reproduced.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for random weights and inputs.")] = 0,
    guard: Annotated[str, typer.Option(
        help="Correctness at each case's depth: 'depth' compares its decode steps with a chunked continuation from "
             "the same state; 'full' also with a from-empty prefill, at each model's largest context. A failing "
             "case is marked invalid.")] = "depth",
    fmt: FormatOpt = Format.table,
) -> None:
    """Sweep context and batch: prefill and decode throughput, latency and memory; fit the scaling.

    With no arguments: on a CPU, cpu-hybrid vs cpu-dense over 512-8k at batch 1 and 4; on a GPU,
    granite-4.0-h-micro vs granite-4.0-micro with random bf16 weights over 1k-32k.

    Examples: granite bench --ctx 128k;  granite bench -m granite-4.0-h-tiny --ctx 1k-32k*2 --batch 1,8 --out rep/
    """
    import torch

    from granite_cli.bench import analysis as an
    from granite_cli.bench.report import REPORT_FILES, write_report
    from granite_cli.bench.rows import JsonlStore, check_rows_file, finished_keys
    from granite_cli.bench.runner import Runner, check_fits, estimate_seconds, matmul_gflops
    from granite_cli.bench.spec import SweepSpec, load_sweep_file, parse_list, run_defaults
    from granite_cli.errors import CheckFailed, InputError
    from granite_cli.fsutil import check_report_dir, prepare_report_dir
    from granite_cli.hostmem import retain_freed_memory
    from granite_cli.model.loading import parse_dtype

    fields = load_sweep_file(sweep) if sweep else {}
    dev = fields.get("device", device)
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = dev.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise InputError("--device cuda but no CUDA device is available; use --device cpu")
    if dev not in ("cpu",) and not gpu:
        raise InputError(f"--device must be cpu, cuda or auto, got {dev!r}")
    user_ctx = ctx is not None or "ctx" in fields
    default_models = ["granite-4.0-h-micro", "granite-4.0-micro"] if gpu else ["cpu-hybrid", "cpu-dense"]
    models = model or fields.get("models") or default_models
    default_ctx = "1k-32k*2" if gpu else "512-8k*2"
    ctxs = parse_list(ctx, "context") if ctx else fields.get("ctx") or parse_list(default_ctx, "context")
    batches = parse_list(batch, "batch") if batch else fields.get("batch") or ([1] if user_ctx else [1, 4])
    dflt = run_defaults(gpu, not (model or ctx or batch or sweep), max(ctxs))  # quick on a CPU; see there
    spec = SweepSpec(
        models=list(models), ctx=ctxs, batch=batches,
        phases=[p.strip() for p in (fields.get("phases") or phase.split(",")) if p.strip()],
        gen=gen if gen is not None else fields.get("gen", 16),
        dtype=fields.get("dtype", dtype or ("bf16" if gpu else "fp32")), device=dev,
        reps=reps if reps is not None else fields.get("reps", dflt["reps"]),
        warmup=warmup if warmup is not None else fields.get("warmup", dflt["warmup"]),
        ubatch=fields.get("ubatch", ubatch), share_prefill=fields.get("share_prefill", share_prefill),
        cuda_graph=fields.get("cuda_graph", cuda_graph),
        compile=fields.get("compile", compile_decode),
        max_case_seconds=fields.get("max_case_seconds", max_case_seconds),
        seed=fields.get("seed", seed), guard=fields.get("guard", guard),
    ).validate()
    parse_dtype(spec.dtype)
    if spec.compile:
        if gpu:
            raise InputError("--compile is for CPU decode; on a GPU decode steps replay as CUDA graphs (--cuda-graph)")
        from granite_cli.model.compiled import compile_available

        why = compile_available()
        if why:
            raise InputError(f"--compile: {why}; run without --compile")
    threshold = None
    if fail_on_regression is not None:
        if baseline is None:
            raise InputError("--fail-on-regression needs --baseline FILE")
        try:
            threshold = float(fail_on_regression.rstrip("%")) / (100 if fail_on_regression.endswith("%") else 1)
        except ValueError:
            raise InputError(f"bad --fail-on-regression {fail_on_regression!r}: use a percentage such as 10%") from None
    base_rows = _read_rows(baseline) if baseline else None

    if resume and not (jsonl or out):
        raise InputError("--resume needs --jsonl FILE or --out DIR to find finished rows")
    if out:  # refused before any work when it holds files granite did not write
        check_report_dir(out, REPORT_FILES)
    if jsonl:
        check_rows_file(jsonl)
    if out and not jsonl:
        prepare_report_dir(out, REPORT_FILES, appended=("rows.jsonl",))
    store = JsonlStore(jsonl or (out / "rows.jsonl")) if (jsonl or out) else None
    kept = store.read() if (store and resume) else []
    if store and not resume and store.path.exists():
        store.path.unlink()  # proven granite's rows above
    rows: list[dict] = [r for r in kept if r.get("status") in ("ok", "invalid", "oom", "skipped")]

    check_fits(spec)
    est = estimate_seconds(spec, matmul_gflops(torch.device(dev), parse_dtype(spec.dtype)))
    n_cases = len(spec.models) * len(spec.ctx) * len(spec.batch)
    say(f"granite bench: {len(spec.models)} model(s) x {len(spec.batch)} batch x {len(spec.ctx)} context(s) on {dev} "
        f"({spec.dtype}, {spec.reps} rep(s) + {spec.warmup} warmup); expected about {_dur(est)}")
    if not gpu:
        say("note: CPU timings share this machine with whatever else runs; compare ratios, not absolute times")
        if retain_freed_memory() == "glibc-retain":  # the runner would apply it too; here, to say so
            say("note: freed heap memory is kept for reuse during the sweep (GRANITE_HOST_MALLOC=system turns it off)")
    if kept:
        say(f"resuming: {len(finished_keys(kept))} finished row(s) kept from {store.path}")

    live = _Progress(n_cases, est, sys.stderr.isatty())
    t_start = time.perf_counter()

    def on_row(r):
        rows.append(r)
        if store:
            store.append(r)
        live.row(r)

    try:
        Runner(spec, on_row, on_case=live.case, done=finished_keys(kept)).run()
    except KeyboardInterrupt:
        live.stop()
        where = f"; {len(rows)} row(s) kept in {store.path} (rerun with --resume)" if store else ""
        say(f"interrupted{where}")
        raise
    live.stop()
    wall = time.perf_counter() - t_start
    rows.sort(key=lambda r: (spec.models.index(r["model"]) if r["model"] in spec.models else 99, r["batch"], r["ctx"],
                             r["phase"]))
    result = an.analyse(rows)
    if out:
        write_report(out, rows, result, {"models": spec.models, "ctx": spec.ctx, "batch": spec.batch,
                                         "phases": spec.phases, "dtype": spec.dtype, "device": spec.device,
                                         "reps": spec.reps, "warmup": spec.warmup, "gen": spec.gen,
                                         "ubatch": spec.ubatch, "share_prefill": spec.share_prefill,
                                         "guard": spec.guard}, wall)
        say(f"report written to {out / 'report.md'}")
    emit_rows(rows, fmt, columns=COLUMNS, headers=HEADERS,
              json_obj={"schema_version": 1, "rows": rows, "verdicts": result["verdicts"], "fits": result["fits"],
                        "ratios": result["ratios"], "wall_s": wall},
              formatters={"tokens_per_s": _fmt_num, "latency_ms": _fmt_num, "stdev_s": _fmt_num,
                          "peak_total_bytes": _bytes, "predicted_total_bytes": _bytes, "peak_delta_bytes": _bytes})
    if fmt is Format.table:
        for v in result["verdicts"]:
            say(f"  {v}")
    say(f"done in {_dur(wall)}")
    problems = []
    if check:
        problems += an.check_claims(rows, result)
    if base_rows is not None and threshold is not None:
        problems += an.regressions(rows, base_rows, threshold)
    if problems:
        raise CheckFailed(f"{len(problems)} check(s) failed: " + "; ".join(problems))
    errored = [r for r in rows if r["status"] == "error"]
    if errored:
        from granite_cli.errors import GraniteError

        raise GraniteError(f"{len(errored)} case(s) errored, e.g. {errored[0]['model']} ctx {errored[0]['ctx']}: "
                           f"{errored[0]['error']}")



def _bytes(v):
    from granite_cli.render import human_bytes

    return "" if v is None else human_bytes(v)


def _dur(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _read_rows(path: Path) -> list[dict]:
    import json

    from granite_cli.errors import InputError

    bad = InputError(f"{path}: not bench rows (expected JSONL or granite bench --format json output)")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read baseline ({e.strerror})") from None
    except UnicodeDecodeError:
        raise bad from None
    try:
        d = json.loads(text)
        rows = d["rows"] if isinstance(d, dict) else d
    except (ValueError, KeyError, TypeError, RecursionError):
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except (ValueError, RecursionError):
            raise bad from None
    keys = ("model", "dtype", "device", "batch", "ctx", "phase", "status")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and all(k in r for k in keys) for r in rows):
        raise bad
    return rows


class _Progress:
    """One line per case on stderr; a Rich progress bar with an estimate when stderr is a terminal."""

    def __init__(self, total: int, est: float, tty: bool) -> None:
        self.total, self.n, self.t0 = total, 0, time.perf_counter()
        self.bar = None
        if tty:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                TextColumn("{task.completed}/{task.total}"),
                                TimeElapsedColumn(), TimeRemainingColumn(), transient=True,
                                console=Console(stderr=True))  # progress never touches stdout
            self.task = self.bar.add_task("bench", total=total)
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
