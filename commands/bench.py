"""`granite bench`: context x batch sweeps of prefill and decode, with scaling fits and verdicts.
CLI layer only: options, one precedence rule, progress and printing; the work is granite_cli.bench."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from granite_cli.commands.common import Format, FormatOpt, emit_rows, say
from granite_cli.redact import redact

# The options whose help is long, declared once here to keep bench() readable.
CtxOpt = Annotated[Optional[str], typer.Option(
    help="Contexts: one value is the sweep up to it (128k: 512, 1k, ... 128k on a CPU, from 1k on a GPU; at least 4 "
         "contexts) so the scaling can be fitted; =128k is that context alone; a list 1k,4k,128k or a range "
         "1k-128k*2 / 512-4k+512 is exactly what it says, as is a sweep file's ctx. With only --endpoint, one value "
         "is one prompt length.")]
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
DecodeKernelOpt = Annotated[Optional[bool], typer.Option(
    "--decode-kernel/--no-decode-kernel",
    help="On a CPU, run decode steps through granite's decode kernel: one call per step, built once per machine "
         "with the C compiler (a few seconds) and cached under ~/.cache/granite; falls back to eager, with the reason, "
         "where it cannot run. On by default; --no-decode-kernel times the eager PyTorch steps.")]
SweepOpt = Annotated[Optional[Path], typer.Option(
    help="TOML sweep file with any of the options above (models, ctx, batch, phases, gen, dtype, device, reps, "
         "warmup, ubatch, share_prefill, cuda_graph, compile, decode_kernel, max_case_seconds, seed, guard, weights, "
         "energy, threads). An option given on the command line wins over the file, and the file over the defaults.")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on GPU).")]
RepsOpt = Annotated[Optional[int], typer.Option(
    help="Timed repetitions per case (default 3; on a CPU 1 for the default sweep and above 16k).")]
WarmupOpt = Annotated[Optional[int], typer.Option(
    help="Untimed runs per case (default 1; on a CPU 0 for the default sweep and above 16k).")]
ThreadsOpt = Annotated[Optional[str], typer.Option(
    help="CPU threads: auto (the default: the CPUs other processes leave free, measured before the sweep) or a "
         "number. A case measured while other processes take CPU it needs is measured again (twice at most), "
         "flagged `contended`, and left out of fits and verdicts.")]
WeightsOpt = Annotated[Optional[str], typer.Option(
    help="random, checkpoint, or auto (the default: a local folder's weights where it has them, else random "
         "at the model's real shapes; a Hub id then fetches config.json only).")]

EndpointOpt = Annotated[Optional[list[str]], typer.Option(
    "--endpoint", metavar="[NAME=]URL",
    help="An OpenAI-compatible server to sweep (vLLM, SGLang, llama.cpp's llama-server, ...), repeatable, beside or "
         "instead of -m: --ctx is then prompt tokens, --batch concurrent sessions (closed loop), --gen output tokens. "
         "NAME defaults to the served model.")]
ApiKeyOpt = Annotated[Optional[str], typer.Option(
    envvar="GRANITE_API_KEY", show_default=False, show_envvar=True,
    help="Bearer token for --endpoint servers (never printed or stored).")]
ApiOpt = Annotated[str, typer.Option(
    help="completions (/v1/completions, exact token-id prompts) or chat (/v1/chat/completions: messages through "
         "the server's chat template).")]
RateOpt = Annotated[Optional[str], typer.Option(
    help="Open loop: requests arriving as a Poisson process at each of these rates per second (e.g. 1,2,4,8: a rate "
         "sweep, whose knee and best goodput are named); --batch then caps the requests in flight.")]
RequestsOpt = Annotated[Optional[int], typer.Option(
    help="Requests per server case (default: 16, or 4 per session if more; with --turns one conversation per "
         "session; with --rate 10 s of arrivals).")]
DurationOpt = Annotated[Optional[float], typer.Option(
    help="Seconds each server case sends requests (with --requests, whichever ends first).")]
TurnsOpt = Annotated[int, typer.Option(
    help="Multi-turn sessions: each turn resends the whole history (earlier prompts and answers) and a new user "
         "message of --ctx tokens; rows get per-turn TTFT and the prompt tokens the server reused.")]
ThinkOpt = Annotated[float, typer.Option(help="Seconds a session waits between an answer and its next turn.")]
DatasetOpt = Annotated[Optional[Path], typer.Option(
    help="Real prompts: JSONL or JSON of {prompt|text}, OpenAI {messages} or ShareGPT {conversations} entries; "
         "--ctx is then the longest first prompt taken.")]
LengthsOpt = Annotated[str, typer.Option(
    help="Prompt lengths around --ctx: exact (the default, for scaling fits), uniform (ctx/2 to 3ctx/2) or "
         "lognormal (mean ctx).")]
RunsOpt = Annotated[int, typer.Option(
    help="Run each server case this many times with fresh prompts; rows get 95% confidence intervals.")]
RequestsOutOpt = Annotated[Optional[Path], typer.Option(
    help="Write one JSON line per request (times, tokens, cached tokens, errors) to this file.")]
SharedPrefixOpt = Annotated[int, typer.Option(
    help="Leading prompt tokens shared by every request of a case (to measure prefix caching); 0 = none.")]
RequestTimeoutOpt = Annotated[float, typer.Option(help="Seconds a request may take before it counts as a "
                                                      "timeout.")]
SloTtftOpt = Annotated[Optional[float], typer.Option(
    help="SLO on time to first token, ms, at --slo-percentile (and per request, for goodput).")]
SloItlOpt = Annotated[Optional[float], typer.Option(
    help="SLO on ITL, the gap between streamed chunks (vLLM's ITL), ms, at --slo-percentile.")]
SloTpotOpt = Annotated[Optional[float], typer.Option(
    help="SLO on TPOT, (e2e - TTFT) / (tokens - 1) per request (AIPerf's and GuideLLM's ITL), ms.")]
SloE2eOpt = Annotated[Optional[float], typer.Option(help="SLO on end-to-end request latency, ms.")]
SloPctOpt = Annotated[float, typer.Option(help="The percentile the SLOs are judged at per case (default 90).")]
EnergyOpt = Annotated[Optional[bool], typer.Option(
    "--energy/--no-energy",
    help="GPU power and joules per token from NVML where a GPU is visible (in-process, or a server on this host).")]
DcgmOpt = Annotated[Optional[str], typer.Option(
    metavar="URL", help="A DCGM exporter (e.g. http://gpu-host:9400) to read a remote server's GPU power from.")]

# Options that only a server sweep reads, and what they default to.
_SERVE_ONLY = {"api": "completions", "rate": None, "requests": None, "duration": None, "turns": 1,
               "think_time": 0.0, "dataset": None, "lengths": "exact", "runs": 1, "requests_out": None,
               "shared_prefix": 0, "request_timeout": 600.0, "slo_ttft": None, "slo_itl": None, "slo_tpot": None,
               "slo_e2e": None, "slo_percentile": 90.0, "dcgm": None, "api_key": None}


def bench(
    model: Annotated[Optional[list[str]], typer.Option(
        "--model", "-m", metavar="MODEL",
        help="Profile, config.json, checkpoint folder or Hub id org/name[@rev] (repeatable).")] = None,
    weights: WeightsOpt = None,
    ctx: CtxOpt = None,
    batch: Annotated[Optional[str], typer.Option(help="Batch sizes: 1,4 or a range 1-16*2.")] = None,
    phase: Annotated[Optional[str], typer.Option(help="prefill, decode, or prefill,decode (the default).")] = None,
    gen: Annotated[Optional[int], typer.Option(help="Decode tokens timed per repetition (default 16).")] = None,
    dtype: DtypeOpt = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or auto (the default).")] = None,
    reps: RepsOpt = None,
    warmup: WarmupOpt = None,
    ubatch: Annotated[Optional[int], typer.Option(help="Prefill tokens per forward (chunked prefill; 4096).")] = None,
    share_prefill: SharePrefillOpt = None,
    cuda_graph: CudaGraphOpt = None,
    compile_decode: CompileOpt = None,
    decode_kernel: DecodeKernelOpt = None,
    threads: ThreadsOpt = None,
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
    endpoint: EndpointOpt = None,
    api_key: ApiKeyOpt = None,
    api: ApiOpt = "completions",
    rate: RateOpt = None,
    requests: RequestsOpt = None,
    duration: DurationOpt = None,
    turns: TurnsOpt = 1,
    think_time: ThinkOpt = 0.0,
    dataset: DatasetOpt = None,
    lengths: LengthsOpt = "exact",
    runs: RunsOpt = 1,
    requests_out: RequestsOutOpt = None,
    shared_prefix: SharedPrefixOpt = 0,
    request_timeout: RequestTimeoutOpt = 600.0,
    slo_ttft: SloTtftOpt = None,
    slo_itl: SloItlOpt = None,
    slo_tpot: SloTpotOpt = None,
    slo_e2e: SloE2eOpt = None,
    slo_percentile: SloPctOpt = 90.0,
    energy: EnergyOpt = None,
    dcgm: DcgmOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Sweep context and batch: prefill and decode throughput, latency and memory; fit the scaling.

    With no arguments: on a CPU, cpu-hybrid vs cpu-dense over 512-8k at batch 1 and 4; on a GPU,
    granite-4.0-h-micro vs granite-4.0-micro with random bf16 weights over 1k-32k. Every sweep field
    comes from its option if given, else from --sweep FILE, else from the default.

    Examples: granite bench --ctx 128k;  granite bench -m granite-4.0-h-tiny --ctx 1k-32k*2 --batch 1,8 --out rep/;
    granite bench --endpoint h=http://127.0.0.1:8080 --endpoint d=http://127.0.0.1:8081 --ctx 512-8k*2 --batch 1,2,4;
    granite bench --endpoint h=URL --endpoint d=URL --ctx 512 --batch 1,4 --turns 4
    """
    args = dict(locals())  # before any import below can shadow a parameter's name
    from granite_cli.bench.session import Gates, Outputs, run_sweep
    from granite_cli.bench.session import duration as took

    spec, serve = _specs(args)
    outcome = run_sweep(spec, Outputs(out, jsonl, resume), Gates(baseline, fail_on_regression, check), serve, say,
                        _Progress(sys.stderr.isatty()))
    _show(outcome, fmt)
    say(f"done in {took(outcome.wall_s)}")
    outcome.raise_for_gates()


def _specs(a: dict):
    """The sweep (one precedence rule: option > --sweep file > default) and what is asked of the servers,
    from bench()'s arguments. An option of one kind of subject given without that subject is refused."""
    import torch

    from granite_cli.bench.endpoints import ServeOptions
    from granite_cli.bench.spec import resolve_spec
    from granite_cli.errors import InputError
    from granite_cli.serve.stats import Slo
    from granite_cli.sizes import parse_rates

    given = [k for k, default in _SERVE_ONLY.items() if a[k] != default]
    if given and not a["endpoint"]:
        flag = "--" + given[0].replace("_", "-")
        raise InputError(f"{flag} is for --endpoint servers; give --endpoint URL, or leave {flag} out")
    flags = {"models": a["model"], "phases": a["phase"], "compile": a["compile_decode"],
             **{k: a[k] for k in ("ctx", "batch", "gen", "dtype", "device", "reps", "warmup", "ubatch", "share_prefill",
                                  "cuda_graph", "decode_kernel", "max_case_seconds", "seed", "guard", "weights",
                                  "energy", "threads")}}
    spec = resolve_spec(flags, a["sweep"], torch.cuda.is_available(), endpoints=bool(a["endpoint"]))
    rate = a["rate"]
    serve = ServeOptions(
        a["endpoint"] or [], api_key=a["api_key"], api=a["api"], rates=parse_rates(rate) if rate is not None else None,
        max_concurrency=spec.batch if rate is not None and a["batch"] else None, shared_prefix=a["shared_prefix"],
        request_timeout=a["request_timeout"], requests=a["requests"], duration=a["duration"], turns=a["turns"],
        think_time=a["think_time"], dataset=a["dataset"], lengths=a["lengths"], runs=a["runs"], seed=a["seed"],
        warmup=1 if a["warmup"] is None else a["warmup"], requests_out=a["requests_out"], energy=spec.energy,
        dcgm=a["dcgm"], slo=Slo(a["slo_ttft"], a["slo_itl"], a["slo_tpot"], a["slo_e2e"], a["slo_percentile"]))
    return spec, serve


def _show(outcome, fmt: Format) -> None:
    """The rows in the chosen format (JSON: with the analysis), then the verdicts for people."""
    from granite_cli.bench.row import ModelRow, ServeRow, columns, formats, headers

    kinds = {type(r) for r in outcome.rows}
    model, serve = columns(ModelRow), columns(ServeRow)
    cols = serve if kinds == {ServeRow} else model + [c for c in serve if c not in model] if ServeRow in kinds \
        else model
    result = outcome.analysis.to_dict()
    rows = [r.to_dict() for r in outcome.rows]
    emit_rows(rows, fmt, columns=cols, headers=headers(),
              json_obj={"schema_version": 1, "rows": rows, "verdicts": result["verdicts"], "fits": result["fits"],
                        "ratios": result["ratios"], "serve_ratios": result["serve_ratios"], "wall_s": outcome.wall_s},
              formatters={k: _FORMAT[f] for k, f in formats().items()})
    if fmt is Format.table:
        for v in result["verdicts"]:
            say(f"  {v}")


def _bytes(v):
    from granite_cli.render import human_bytes

    return "" if v is None else human_bytes(v)


def _errors(v):
    return "" if not v else ", ".join(f"{k}: {n}" for k, n in sorted(v.items()))


def _number(v):
    from granite_cli.render import number_text

    return number_text(v)


def _percent(v):
    from granite_cli.render import percent_text

    return percent_text(v)


_FORMAT = {"num": _number, "pct": _percent, "bytes": _bytes, "errors": _errors}


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
            self.bar.update(self.task, description=redact(msg).replace("[", "\\["), completed=self.n - 1)
        else:
            say(msg)

    def row(self, r) -> None:
        tps = f"{r.tokens_per_s:.1f} tok/s" if r.tokens_per_s else (r.error or "")
        line = f"    {r.phase:7s} {r.status:7s} {tps}"
        if getattr(r, "contended", None):
            line += (f"  contended: {r.cpu_others_cores or 0:.1f} cores busy elsewhere after "
                     f"{r.contended_retries} retries")
        if self.bar:
            self.bar.console.print(redact(f"{r.model} b{r.batch} ctx {r.ctx}{line}"), markup=False)
        else:
            say(line)

    def stop(self) -> None:
        if self.bar:
            self.bar.stop()
            self.bar = None
