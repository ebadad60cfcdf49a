"""Running servers as sweep subjects (`granite bench --endpoint`): the same context x batch grammar,
where a context is the prompt's tokens and a batch the concurrent sessions (with `--rate`, the most
requests in flight); one row per case, in the bench row schema with phase "serve", streamed as the
in-process rows are.

A server sweep has its own defaults, whatever machine the client runs on: enough requests per case for
the percentiles it prints (MIN_REQUESTS, and four per session), one untimed warm-up request per server,
and prompts no earlier run sent (a fresh seed per run, recorded in the rows; --seed repeats one).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from granite_cli.bench.row import ServeRow, case_key
from granite_cli.bench.spec import SweepSpec
from granite_cli.errors import InputError
from granite_cli.redact import redact, scrub
from granite_cli.serve.dataset import Dataset, load
from granite_cli.serve.http import APIS, HTTPFailure, parse_endpoint, stream_completion
from granite_cli.serve.probe import Server, ServerGone, probe, still_there
from granite_cli.serve.stats import Slo, request_record
from granite_cli.serve.workload import LENGTHS, Workload, run_case

PHASE = "serve"
# Beyond these a sweep is a typo, not a measurement: refused before any request is sent.
MIN_RATE = 1e-3
MAX_REQUEST_TIMEOUT = 86400.0
MAX_REQUESTS_PER_CASE = 100_000
MAX_TURNS = 1000
MAX_RUNS = 100
# A case's default request count: enough for a p90 (10 values) and a few rounds of every session; an
# open-loop case, this many seconds of arrivals at least.
MIN_REQUESTS, REQUESTS_PER_SESSION, OPEN_LOOP_SECONDS = 16, 4, 10


# Each numeric option's range: (lowest, highest, what the refusal says it must be).
_RANGES = {
    "shared_prefix": (0, 1 << 24, "0 or more tokens"),
    "request_timeout": (1e-3, MAX_REQUEST_TIMEOUT, "a number of seconds above 0 and at most 86400 (a day)"),
    "requests": (1, MAX_REQUESTS_PER_CASE, f"between 1 and {MAX_REQUESTS_PER_CASE:,}"),
    "duration": (1e-3, MAX_REQUEST_TIMEOUT, "a number of seconds above 0 and at most 86400 (a day)"),
    "turns": (1, MAX_TURNS, f"between 1 and {MAX_TURNS}"),
    "think_time": (0, MAX_REQUEST_TIMEOUT, "a number of seconds, 0 or more"),
    "runs": (1, MAX_RUNS, f"between 1 and {MAX_RUNS}"),
    "warmup": (0, 1000, "between 0 and 1000 requests"),
    "seed": (0, 2**31 - 1, "between 0 and 2147483647"),
}


@dataclass
class ServeOptions:
    """What is asked of the servers (`granite bench --endpoint ...`)."""

    endpoints: list[str]
    api_key: str | None = None
    api: str = "completions"
    rates: list[float] | None = None          # open loop: each rate a case; None: closed loop
    max_concurrency: list[int] | None = None  # with rates: --batch, the most in flight; None: no cap
    shared_prefix: int = 0
    request_timeout: float = 600.0
    requests: int | None = None               # per case (and run); None: the default
    duration: float | None = None             # seconds of sending per case (and run)
    turns: int = 1
    think_time: float = 0.0
    dataset: Path | None = None
    lengths: str = "exact"
    runs: int = 1
    seed: int | None = None                   # the prompts' seed; None: a fresh one per run of granite
    warmup: int = 1
    slo: Slo = field(default_factory=Slo)
    requests_out: Path | None = None
    energy: bool = True                       # NVML, where a GPU is visible and the server is on this host
    dcgm: str | None = None                   # a DCGM exporter's URL instead
    loaded: Dataset | None = None             # the dataset, once read (validate)

    def validate(self) -> "ServeOptions":
        """Every option checked (InputError, exit 2); the dataset read; a fresh prompt seed drawn unless
        --seed gave one."""
        if self.api not in APIS:
            raise InputError(f"unknown --api {self.api!r}; use completions or chat")
        if self.lengths not in LENGTHS:
            raise InputError(f"unknown --lengths {self.lengths!r}; use {', '.join(LENGTHS)}")
        for r in self.rates or []:
            if not (r > 0 and math.isfinite(r)):
                raise InputError("--rate must be positive numbers of requests per second")
            if r < MIN_RATE:
                raise InputError(f"--rate {r:g}: below {MIN_RATE:g} request(s) per second a case takes days; give "
                                 "a higher rate")
        for name, (lo, hi, what) in _RANGES.items():
            v = getattr(self, name)
            if v is not None and not (lo <= v <= hi and math.isfinite(v)):
                raise InputError(f"--{name.replace('_', '-')} must be {what}")
        self._check_combinations()
        self.slo.validate()
        if self.dcgm is not None:
            parse_endpoint(self.dcgm, flag="--dcgm")  # a bad URL is exit 2 here, not a silent lack of energy figures
        if self.dataset is not None:
            self.loaded = load(self.dataset)
        if self.requests_out is not None:
            RequestsFile(self.requests_out).check()
        if self.seed is None:
            self.seed = secrets.randbelow(2**31)
        return self

    def _check_combinations(self) -> None:
        if self.think_time and self.turns == 1:
            raise InputError("--think-time is the pause between the turns of a conversation; give --turns N too")
        if self.turns > 1 and self.rates:
            raise InputError("--turns runs closed-loop sessions; it cannot be combined with --rate")
        if self.dataset is not None and (self.lengths != "exact" or self.shared_prefix):
            raise InputError("--dataset gives the prompts; --lengths and --shared-prefix are for generated ones")

    def label(self, rate: float | None) -> str:
        """The case's workload as its key and the row name it: what makes two cases of one prompt length
        and concurrency different measurements."""
        parts = [f"rate={rate:g}/s" if rate else "", f"turns={self.turns}" if self.turns > 1 else "",
                 "chat" if self.api == "chat" else "", f"dataset={self.loaded.label}" if self.loaded else "",
                 f"lengths={self.lengths}" if self.lengths != "exact" else "",
                 f"prefix={self.shared_prefix}" if self.shared_prefix else ""]
        return ",".join(p for p in parts if p)

    def requests_for(self, concurrency: int, rate: float | None) -> int | None:
        """The requests a case sends per run: --requests, else (with no --duration) the default."""
        if self.requests is not None:
            return self.requests
        if self.duration is not None:
            return None
        if self.turns > 1:
            return concurrency * self.turns  # one conversation per session
        if rate:
            return max(MIN_REQUESTS, math.ceil(OPEN_LOOP_SECONDS * rate))
        return max(MIN_REQUESTS, REQUESTS_PER_SESSION * concurrency)


@dataclass(frozen=True)
class ServeCase:
    batch: int            # the row's batch: sessions, or with --rate the in-flight cap
    ctx: int
    rate: float | None
    workload: str


def cases(spec: SweepSpec, opts: ServeOptions) -> list[ServeCase]:
    """The cases of each server, in order: batch (or cap), then rate, then prompt length."""
    label = opts.label
    if not opts.rates:
        return [ServeCase(b, c, None, label(None)) for b in spec.batch for c in spec.ctx]
    out = []
    for cap in opts.max_concurrency or [None]:
        for r in opts.rates:
            for c in spec.ctx:
                # no cap: as many in flight as there are requests, which the row records as its batch
                b = cap or opts.requests_for(1, r) or MAX_REQUESTS_PER_CASE
                out.append(ServeCase(b, c, r, label(r)))
    return out


def check_workload(spec: SweepSpec, opts: ServeOptions) -> None:
    """Refuse (exit 2) a server sweep that could not finish in any reasonable time."""
    for case in cases(spec, opts):
        n = opts.requests_for(case.batch, case.rate)
        if n is not None and n * opts.runs > MAX_REQUESTS_PER_CASE:
            raise InputError(f"{n:,} requests x {opts.runs} run(s) in one case, more than {MAX_REQUESTS_PER_CASE:,}; "
                             "lower --requests or --runs")
        if case.rate and n and n / case.rate > MAX_REQUEST_TIMEOUT:
            raise InputError(f"{n:,} requests at --rate {case.rate:g}/s take {n / case.rate / 3600:,.0f} h in one "
                             "case; raise --rate or lower --requests")
    if opts.shared_prefix and opts.shared_prefix > min(spec.ctx):
        raise InputError(f"--shared-prefix {opts.shared_prefix} is longer than the shortest prompt ({min(spec.ctx)} "
                         "tokens)")


def servers(opts: ServeOptions) -> list[Server]:
    """Every endpoint probed before any case runs (a wrong URL or a stopped server: one line, exit 2);
    two endpoints may not share a name."""
    found = [probe(parse_endpoint(e, opts.api_key), opts.request_timeout, opts.api) for e in opts.endpoints]
    names = [s.name for s in found]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise InputError(f"two endpoints are both named {dup!r}; name them with --endpoint NAME=URL")
    return found


def check_fits(found: list[Server], spec: SweepSpec, opts: ServeOptions) -> None:
    """Refuse (exit 2) a sweep none of whose cases fits any server's context per request."""
    for s in found:
        if s.n_ctx and all(_too_long(s, spec, opts, c) for c in spec.ctx):
            raise InputError(f"--endpoint {s.name}: every prompt + output ({min(spec.ctx) * opts.turns} + "
                             f"{spec.gen * opts.turns} tokens at the least) exceeds the server's {s.n_ctx} tokens per "
                             "request; give a smaller --ctx, --gen or --turns")


def _too_long(s: Server, spec: SweepSpec, opts: ServeOptions, ctx: int) -> bool:
    # the last turn of a conversation carries every earlier prompt and answer
    return bool(s.n_ctx) and opts.turns * (ctx + spec.gen) > s.n_ctx


def kind_of(server: Server) -> str | None:
    """hybrid or dense, when the subject's name or the served model names a known profile (the pairing
    behind hybrid-vs-dense ratios); None otherwise."""
    from granite_cli.config.files import load_config, profile_names
    from granite_cli.hub import model_name

    known = {n.lower(): n for n in profile_names()}  # Hub ids spell them Qwen/Qwen3-32B
    for cand in (server.name, server.served_model):
        stem = cand.rsplit("/", 1)[-1].removesuffix(".gguf")
        for n in (cand, stem, model_name(cand) if "/" in cand else stem):
            if n.lower() in known:
                return "hybrid" if load_config(known[n.lower()]).is_hybrid else "dense"
    return None


def _is_local(server: Server) -> bool:
    import socket

    host = server.endpoint.host[0]
    return host in ("127.0.0.1", "localhost", "::1", "0.0.0.0", socket.gethostname())


def _meter(server: Server, opts: ServeOptions):
    """A GPU power meter for the server's cases: its host's DCGM exporter, else NVML where the server runs on
    this machine and NVML sees a GPU; None otherwise."""
    from granite_cli.energy import DcgmSource, NvmlSource, PowerMeter, load_nvml

    if opts.dcgm is not None:
        return PowerMeter(DcgmSource(opts.dcgm))
    if opts.energy and _is_local(server) and (nvml := load_nvml()) is not None:
        return PowerMeter(NvmlSource(nvml))
    return None


def run_endpoints(found: list[Server], spec: SweepSpec, opts: ServeOptions, env: dict,
                  on_row: Callable[[ServeRow], None], on_case: Callable[[dict], None], done: set,
                  on_requests: Callable[[list[dict]], None] | None = None) -> None:
    """Each server's cases (see `cases`); a server that stops answering ends the sweep (ServerGone,
    exit 1) after its row is kept."""
    for server in found:
        kind = kind_of(server)
        warmed = False
        for case in cases(spec, opts):
            b, c = case.batch, case.ctx
            if case_key(server.name, "server", "endpoint", b, c, PHASE, case.workload) in done:
                continue
            on_case({"model": server.name, "batch": b, "ctx": c, "workload": case.workload})
            row = _base(server, kind, spec, opts, case, env)
            if _too_long(server, spec, opts, c):
                row.update(status="skipped", error=f"prompt + output ({opts.turns} x ({c} + {spec.gen})) exceeds the "
                                                   f"server's context per request ({server.n_ctx})")
                on_row(row)
                continue
            if not warmed:
                _warm(server, opts)
                warmed = True
            w = Workload(ctx=c, concurrency=b, gen=spec.gen, requests=opts.requests_for(b, case.rate),
                         duration=opts.duration, shared_prefix=opts.shared_prefix, rate=case.rate, turns=opts.turns,
                         think_time=opts.think_time, api=opts.api, lengths=opts.lengths, dataset=opts.loaded,
                         timeout=opts.request_timeout, seed=opts.seed)
            result = run_case(server, w, opts.runs, opts.slo, _meter(server, opts))
            row.update(**scrub(result.fields))
            on_row(row)
            if on_requests is not None:
                head = {"model": row.model, "batch": b, "ctx": c, "workload": case.workload}
                on_requests([{**head, **request_record(r, result.starts[r.run])} for r in result.log.records])
            if row.status == "error" and not still_there(server, opts.request_timeout):
                raise ServerGone(f"{server.name} at {server.endpoint.url} stopped answering during batch {b} "
                                 f"ctx {c}; the finished rows are kept (rerun with --resume)")


def _warm(server: Server, opts: ServeOptions) -> None:
    """Untimed requests before the server's first case (first-request allocations, graph capture)."""
    for i in range(opts.warmup):
        body = {"model": server.served_model, "max_tokens": 4, "ignore_eos": True}
        if opts.api == "chat":
            body["messages"] = [{"role": "user", "content": "warm up " * 8}]
        else:
            body["prompt"] = [1 + i] * 16 if server.prompt_mode == "token_ids" else "warm up " * 8
        try:
            stream_completion(server.endpoint, body, opts.request_timeout, opts.api)
        except HTTPFailure:
            return  # the case itself will count and report the failure


def _base(server: Server, kind: str | None, spec: SweepSpec, opts: ServeOptions, case: ServeCase,
          env: dict) -> ServeRow:
    """A case's row before it runs (the server's names are redacted: a key may hide in them)."""
    return ServeRow(model=redact(server.name), kind=kind, dtype="server", device="endpoint", batch=case.batch,
                    ctx=case.ctx, phase=PHASE, workload=case.workload or None, gen=spec.gen, **scrub(server.fields()),
                    **env, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), api=opts.api, rate_rps=case.rate,
                    turns=opts.turns, think_time_s=opts.think_time or None, runs=opts.runs,
                    prompt_seed=opts.seed, dataset=opts.loaded.label if opts.loaded else None,
                    lengths=opts.lengths, duration_s=opts.duration)


class RequestsFile:
    """`--requests-out FILE`: one JSON line per request, appended case by case as the rows are. Only a
    new file, or one granite wrote (every line a request record), is replaced."""

    KEYS = ("model", "batch", "ctx", "request")

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def check(self) -> None:
        p = self.path
        if p.is_symlink() or (p.exists() and not p.is_file()):
            raise InputError(f"--requests-out {p} is not a plain file; give a new file name")
        if not p.exists():
            return
        try:
            lines = p.read_bytes().decode("utf-8").splitlines()
            ok = all(isinstance(d := json.loads(x), dict) and all(k in d for k in self.KEYS)
                     for x in lines if x.strip())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            ok = False
        if not ok:
            raise InputError(f"--requests-out {p} holds something granite did not write; choose another file")

    def open(self, resume: bool) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and not resume:
                self.path.unlink()  # proven granite's by check()
            os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666))
        except OSError as e:
            raise InputError(f"--requests-out {self.path}: cannot write there ({e.strerror})") from None

    def append(self, records: list[dict]) -> None:
        from granite_cli.bench.rows import append_whole
        from granite_cli.render import json_safe

        data = "".join(json.dumps(json_safe(scrub(r))) + "\n" for r in records).encode()
        append_whole(self.path, data, "request records")
