"""What a bench row is: one case measured, as a dataclass made of parts (the case, its result, its
memory, its correctness guard, the model, the environment, a server's figures). A row in the core's
own forward is a ModelRow; a row against a server (`granite bench --endpoint`) is a ServeRow. Both
write to JSON as one flat object with the keys the rows files have always had (`to_dict`), and read
back from one (`from_dict`, which keeps keys it does not know in `extra` and takes defaults for the
ones an older file lacks). The table and report columns are the fields marked `column(...)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

SCHEMA_VERSION = 1
PHASES = ("prefill", "decode", "serve")
STATUSES = ("ok", "invalid", "oom", "skipped", "error")
FINISHED = ("ok", "invalid", "oom", "skipped")


def case_key(model: str, dtype: str, device: str, batch: int, ctx: int, phase: str, workload: str = "") -> tuple:
    """A case as resume and baselines find it (`workload`: what else sets a server case apart, such as its
    rate or turns; empty for the in-process cases)."""
    return (model, dtype, device, batch, ctx, phase, workload)


BOTH = ("table", "report")


def column(header: str, fmt: str = "", model: tuple = (), serve: tuple = (), default: Any = None):
    """A field shown as a column: `model` and `serve` say where for each kind of row ("table": the
    command's output, "report": report.md); `header` is the table's heading, `fmt` how values print
    (num, bytes, errors)."""
    return field(default=default, metadata={"header": header, "fmt": fmt, "model": model, "serve": serve})


@dataclass(kw_only=True)
class Case:
    """Which case a row measures."""

    schema_version: int = SCHEMA_VERSION
    model: str = column("model", model=BOTH, serve=BOTH, default="")
    kind: str | None = None                     # hybrid or dense (the pairing behind the ratios), when known
    dtype: str = ""
    device: str = ""
    batch: int = column("batch", model=BOTH, serve=BOTH, default=0)  # sequences (in-process) or sessions (server)
    ctx: int = column("ctx", model=BOTH, serve=BOTH, default=0)      # context (in-process) or prompt tokens
    phase: str = column("phase", model=BOTH, default="")             # prefill, decode or serve
    workload: str | None = column("workload", serve=BOTH)  # a server case's rate, turns, API, dataset, ...
    gen: int | None = None
    ubatch: int | None = None
    reps: int | None = column("reps", model=("report",))  # timed repetitions (in-process)

    @property
    def key(self) -> tuple:
        return case_key(self.model, self.dtype, self.device, self.batch, self.ctx, self.phase, self.workload or "")


@dataclass(kw_only=True)
class Result:
    """How the case went and how fast."""

    status: str = column("status", model=BOTH, serve=BOTH, default="ok")   # ok invalid oom skipped error
    error: str | None = None
    tokens_per_s: float | None = column("tok/s", "num", model=BOTH)
    latency_ms: float | None = column("latency ms", "num", model=BOTH)
    median_s: float | None = None


@dataclass(kw_only=True)
class Spread:
    """An in-process case's repetitions: each one's seconds and their spread (a server case has its
    percentiles in Server instead)."""

    stdev_s: float | None = column("stdev s", "num", model=BOTH)
    min_s: float | None = None
    max_s: float | None = None
    samples_s: list = field(default_factory=list)


@dataclass(kw_only=True)
class Timing:
    """Where an in-process case's time went."""

    attribution_s: dict | None = None           # prefill seconds by layer type (mamba, attention, moe_mlp, rest)
    prefill_from: int | None = None             # the smaller context whose end state this prefill continued
    decode_mode: str | None = None              # native, cuda_graph, compiled or eager
    decode_note: str | None = None


@dataclass(kw_only=True)
class Roofline:
    """How close an in-process case came to the machine (bench.roofline): its FLOPs and bytes (a whole
    prefill, or one decode step), the rates achieved, and their fractions of the measured ceilings."""

    work_flops: float | None = None
    work_bytes: float | None = None             # the floor: weights, KV, SSM state (not activations)
    intensity_flop_per_byte: float | None = None
    achieved_tflops: float | None = column("TFLOP/s", "num", model=("report",))
    achieved_gbps: float | None = column("GB/s", "num", model=("report",))
    flops_frac: float | None = column("of matmul", "pct", model=BOTH)      # of the probed matmul rate
    bandwidth_frac: float | None = column("of copy", "pct", model=BOTH)    # of the probed copy bandwidth
    ceiling_gflops: float | None = None
    ceiling_gbps: float | None = None
    ceiling_source: str | None = None


@dataclass(kw_only=True)
class Memory:
    """An in-process case's memory: measured peaks, and memory-report's prediction."""

    peak_total_bytes: int | None = column("peak mem", "bytes", model=BOTH)   # weights + cache + working set
    peak_total_source: str | None = None        # tracked (CPU, the live-tensor tracker) or cuda_allocated
    predicted_total_bytes: int | None = column("predicted", "bytes", model=BOTH)   # memory-report's model of it
    cache_bytes: int | None = column("cache", "bytes", model=("report",))
    peak_delta_bytes: int | None = column("peak +mem", "bytes", model=BOTH)  # the peak over the phase's baseline
    peak_bytes: int | None = None               # RSS (CPU) or allocator (GPU) peak during the phase
    memory_source: str | None = None
    reserved_peak_bytes: int | None = None
    nvml_used_bytes: int | None = None
    memory_s: float | None = None               # untimed seconds the memory measurement took


@dataclass(kw_only=True)
class Guard:
    """The correctness guards: at load, and at the case's own depth."""

    valid: bool | None = None
    guard_max_diff: float | None = None
    guard_depth_diff: float | None = None
    guard_full_diff: float | None = None
    guard_tol: float | None = None
    guard_s: float | None = None


@dataclass(kw_only=True)
class ModelInfo:
    params_total: int | None = None
    params_active: int | None = None
    weights_bytes: int | None = None


@dataclass(kw_only=True)
class ClientEnvironment:
    """Where granite ran (a server row's whole environment: bench.rows.client_environment fills it)."""

    granite_version: str | None = None
    python: str | None = None
    cpu: str | None = None
    commit: str | None = None
    dirty: bool | None = None
    host: str | None = None
    time: str | None = None


@dataclass(kw_only=True)
class Environment(ClientEnvironment):
    """What an in-process row was measured on: the client's environment and the core's (torch, Triton,
    the GPU, threads, which kernels, the host allocator); bench.rows.environment_fields fills it."""

    torch: str | None = None
    triton: str | None = None
    gpu: str | None = None
    threads: int | None = None
    kernel_impl: str | None = None
    host_malloc: str | None = None


@dataclass(kw_only=True)
class Contention:
    """What a CPU case's timed repetitions shared the machine with (bench.contention): a contended case is
    measured again (contended_retries times), and a row still contended is left out of fits and verdicts."""

    cpu_share: float | None = None           # own CPU time / (wall time x threads)
    cpu_others_cores: float | None = column("others' cores", "num", model=("report",))
    cpu_steal_pct: float | None = None
    cpu_pressure_pct: float | None = None    # PSI: share of the time some task waited for a CPU
    contended: bool | None = None
    contended_retries: int | None = None


@dataclass(kw_only=True)
class Energy:
    """GPU energy over the measured work (NVML, or a server host's DCGM exporter; granite_cli.energy)."""

    energy_j: float | None = None
    power_w_mean: float | None = None
    power_w_max: float | None = None
    gpu_util_pct_mean: float | None = None
    gpu_mem_used_max_bytes: float | None = None
    sm_clock_mhz_mean: float | None = None
    energy_source: str | None = None
    j_per_prompt_token: float | None = None
    j_per_output_token: float | None = column("J/out tok", "num", model=("report",), serve=("report",))


@dataclass(kw_only=True)
class Server:
    """A server's figures for one case (serve.stats.summarize fills them): the workload, latency
    distributions in ms (ITL: the gap between streamed chunks, as vLLM names it; TPOT: per request,
    (e2e − TTFT) / (tokens − 1), what AIPerf and GuideLLM call ITL), throughput, failures, prompt reuse,
    SLO attainment, per-turn figures, the server's own metrics and timings, and the client's own cost."""

    endpoint: str | None = None
    engine: str | None = None
    server_version: str | None = None
    served_model: str | None = None
    server_slots: int | None = None
    prompt_mode: str | None = None
    api: str | None = None
    rate_rps: float | None = None
    offered_rps: float | None = None            # open loop: the rate the arrivals drawn actually offered
    turns: int | None = None
    think_time_s: float | None = None
    runs: int | None = None
    prompt_seed: int | None = None
    dataset: str | None = None
    lengths: str | None = None
    duration_s: float | None = None
    requests: int | None = None
    requests_ok: int | None = None
    wall_s: float | None = None
    prompt_tokens_measured: list | None = None
    prompt_tokens_exact: bool | None = None
    output_tokens: int | None = None
    output_tokens_min: int | None = None
    ttft_ms_mean: float | None = None
    ttft_ms_std: float | None = None
    ttft_ms_p50: float | None = column("TTFT ms", "num", serve=BOTH)
    ttft_ms_p90: float | None = column("TTFT p90", "num", serve=BOTH)
    ttft_ms_p95: float | None = None
    ttft_ms_p99: float | None = column("TTFT p99", "num", serve=("report",))
    itl_ms_mean: float | None = None
    itl_ms_std: float | None = None
    itl_ms_p50: float | None = column("ITL ms (chunk gap)", "num", serve=BOTH)
    itl_ms_p90: float | None = column("ITL p90", "num", serve=BOTH)
    itl_ms_p95: float | None = None
    itl_ms_p99: float | None = None
    tpot_ms_mean: float | None = None
    tpot_ms_std: float | None = None
    tpot_ms_p50: float | None = column("TPOT ms (per request)", "num", serve=BOTH)
    tpot_ms_p90: float | None = column("TPOT p90", "num", serve=BOTH)
    tpot_ms_p95: float | None = None
    tpot_ms_p99: float | None = None
    e2e_ms_mean: float | None = None
    e2e_ms_std: float | None = None
    e2e_ms_p50: float | None = column("e2e ms", "num", serve=BOTH)
    e2e_ms_p90: float | None = None
    e2e_ms_p95: float | None = None
    e2e_ms_p99: float | None = None
    output_tokens_per_s: float | None = column("out tok/s", "num", serve=BOTH)
    total_tokens_per_s: float | None = None
    requests_per_s: float | None = column("req/s", "num", serve=BOTH)
    max_in_flight: int | None = column("in flight", serve=BOTH)
    server_running_max: float | None = column("running", serve=("report",))
    errors: dict | None = column("errors", "errors", serve=BOTH)
    ttft_ms_p50_ci95: list | None = None        # over --runs: each run's own figure
    tpot_ms_p50_ci95: list | None = None
    itl_ms_p50_ci95: list | None = None
    output_tokens_per_s_ci95: list | None = None
    cached_prompt_tokens: int | None = None     # the server's usage (or llama.cpp's timings.cache_n), summed
    reusable_prompt_tokens: int | None = None   # what the workload made reusable: a shared prefix, the history
    prefix_reuse: float | None = column("reuse", "num", serve=("report",))  # reused of reusable, 0-1
    unexpected_reuse_tokens: int | None = None  # reused beyond that: an earlier run's prompts still cached
    server_prefix_hits: float | None = None     # the server's prefix-cache counters over the case (tokens)
    server_prefix_queries: float | None = None
    server_prefix_source: str | None = None
    slo: str | None = None
    slo_percentiles: dict | None = None         # the case's figures at the SLO's percentile
    slo_attained: float | None = None           # share of requests meeting every per-request SLO
    goodput_rps: float | None = column("goodput req/s", "num", serve=("report",))
    turn_ttft_ms_p50: list | None = None        # per turn of a conversation (index 0 = turn 1)
    turn_tpot_ms_p50: list | None = None
    turn_itl_ms_p50: list | None = None
    turn_prompt_tokens: list | None = None
    turn_cached_tokens: list | None = None
    turn_reusable_tokens: list | None = None
    tokens_without_chunk: int | None = None
    server_prompt_ms_p50: float | None = None
    server_prompt_ms_p90: float | None = None
    server_prompt_ms_p99: float | None = None
    server_tpot_ms_p50: float | None = None
    server_tpot_ms_p90: float | None = None
    server_tpot_ms_p99: float | None = None
    client_cpu_ms_per_request: float | None = None
    shared_prefix: int | None = None
    client_row_ms: float | None = None
    server_metrics: str | None = None
    server_waiting_max: float | None = None
    server_kv_cache_usage_max: float | None = None
    server_busy_slots_per_decode_max: float | None = None
    server_kv_cache_source: str | None = None
    server_ttft_mean_ms: float | None = None
    token_ids_from: str | None = None


@dataclass(kw_only=True)
class Row(Case, Result):
    """What every row has; ModelRow and ServeRow add their parts."""

    extra: dict = field(default_factory=dict)   # keys of a rows file this schema does not know, kept as read
    PARTS: ClassVar[tuple] = (Case, Result)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_dict(self) -> dict:
        """The flat JSON object of the rows files: the parts' fields in order, then `extra`."""
        out: dict[str, Any] = {}
        for part in self.PARTS:
            for f in fields(part):
                out[f.name] = getattr(self, f.name)
        return {**out, **{k: v for k, v in self.extra.items() if k not in out}}

    def update(self, **values) -> "Row":
        """Set fields by name. A name the schema does not know is a KeyError: the builders fill rows
        through here, so a renamed or misspelt key fails where it is written, in the tests, not later in
        a table or a plot. (Reading a rows file keeps unknown keys in `extra`: see from_dict.)"""
        names = {f.name for f in fields(self)} - {"extra"}
        unknown = sorted(set(values) - names)
        if unknown:
            raise KeyError(f"{type(self).__name__} has no field {', '.join(unknown)}")
        for k, v in values.items():
            setattr(self, k, v)
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "Row":
        """A row of a rows file (this schema or an older one): ServeRow for phase serve, else ModelRow."""
        kind = ServeRow if d.get("phase") == "serve" else ModelRow
        names = {f.name for f in fields(kind)} - {"extra"}
        row = kind(**{k: v for k, v in d.items() if k in names})
        row.extra = {k: v for k, v in d.items() if k not in names}
        return row


@dataclass(kw_only=True)
class ModelRow(Row, Spread, Timing, Roofline, Memory, Energy, Contention, Guard, ModelInfo, Environment):
    """A case run in granite's own core (prefill or decode)."""

    PARTS: ClassVar[tuple] = (Case, ModelInfo, Guard, Result, Spread, Contention, Timing, Roofline, Memory, Energy,
                              Environment)


@dataclass(kw_only=True)
class ServeRow(Row, Server, Energy, ClientEnvironment):
    """A case sent to a server."""

    PARTS: ClassVar[tuple] = (Case, Result, Server, Energy, ClientEnvironment)


def columns(kind: type[Row], where: str = "table") -> list[str]:
    """The columns of a kind of row (ModelRow or ServeRow) in the command's table or in report.md."""
    which = "serve" if kind is ServeRow else "model"
    return [f.name for part in kind.PARTS for f in fields(part) if where in f.metadata.get(which, ())]


def _marked(key: str) -> dict[str, str]:
    return {f.name: f.metadata[key] for part in (*ModelRow.PARTS, Server) for f in fields(part)
            if f.metadata.get(key)}


def headers() -> dict[str, str]:
    """Each column's heading."""
    return _marked("header")


def formats() -> dict[str, str]:
    """How each column's values print: num, pct, bytes or errors."""
    return _marked("fmt")


def is_nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)

