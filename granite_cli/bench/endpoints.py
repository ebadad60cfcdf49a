"""Running servers as sweep subjects (`granite bench --endpoint`): the same context x batch grammar,
where a context is the prompt's tokens and a batch the concurrent sessions; one row per case, in the
bench row schema with phase "serve", streamed as the in-process rows are."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

from granite_cli.bench.row import ServeRow, case_key
from granite_cli.bench.spec import SweepSpec
from granite_cli.errors import InputError
from granite_cli.redact import redact, scrub
from granite_cli.serve.http import HTTPFailure, parse_endpoint, stream_completion
from granite_cli.serve.probe import Server, ServerGone, probe, still_there
from granite_cli.serve.workload import Workload, run_case

PHASE = "serve"


@dataclass
class ServeOptions:
    endpoints: list[str]
    api_key: str | None = None
    rate: float | None = None
    shared_prefix: int = 0
    request_timeout: float = 600.0
    slo_ttft_ms: float | None = None
    slo_itl_ms: float | None = None

    def validate(self) -> "ServeOptions":
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise InputError("--rate must be a positive number of requests per second")
        if self.rate is not None and self.rate < MIN_RATE:
            raise InputError(f"--rate {self.rate:g}: below {MIN_RATE:g} request(s) per second a case takes days; "
                             "give a higher rate")
        if self.shared_prefix < 0:
            raise InputError("--shared-prefix must not be negative")
        if not (self.request_timeout > 0 and self.request_timeout <= MAX_REQUEST_TIMEOUT):
            raise InputError(f"--request-timeout must be a number of seconds above 0 and at most "
                             f"{MAX_REQUEST_TIMEOUT:g} (a day)")
        for flag, v in (("--slo-ttft", self.slo_ttft_ms), ("--slo-itl", self.slo_itl_ms)):
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise InputError(f"{flag} must be a positive number of milliseconds")
        return self


# Beyond these a sweep is a typo, not a measurement: refused before any request is sent.
MIN_RATE = 1e-3
MAX_REQUEST_TIMEOUT = 86400.0
MAX_REQUESTS_PER_CASE = 100_000


def check_workload(spec: SweepSpec, opts: ServeOptions) -> None:
    """Refuse (exit 2) a server sweep that could not finish in any reasonable time."""
    for b in spec.batch:
        n = b * spec.reps
        if n > MAX_REQUESTS_PER_CASE:
            raise InputError(f"batch {b} x reps {spec.reps} = {n:,} requests in one case, more than "
                             f"{MAX_REQUESTS_PER_CASE:,}; lower --reps or --batch")
        if opts.rate and n / opts.rate > MAX_REQUEST_TIMEOUT:
            raise InputError(f"{n:,} requests at --rate {opts.rate:g}/s take {n / opts.rate / 3600:,.0f} h in one "
                             "case; raise --rate or lower --reps")
    if opts.shared_prefix and opts.shared_prefix > min(spec.ctx):
        raise InputError(f"--shared-prefix {opts.shared_prefix} is longer than the shortest prompt ({min(spec.ctx)} "
                         "tokens)")


def servers(opts: ServeOptions) -> list[Server]:
    """Every endpoint probed before any case runs (a wrong URL or a stopped server: one line, exit 2);
    two endpoints may not share a name."""
    found = [probe(parse_endpoint(e, opts.api_key), opts.request_timeout) for e in opts.endpoints]
    names = [s.name for s in found]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise InputError(f"two endpoints are both named {dup!r}; name them with --endpoint NAME=URL")
    return found


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


def run_endpoints(found: list[Server], spec: SweepSpec, opts: ServeOptions, env: dict,
                  on_row: Callable[[ServeRow], None], on_case: Callable[[dict], None], done: set) -> None:
    """Each server's cases, batch-major then context; a server that stops answering ends the sweep
    (ServerGone, exit 1) after its row is kept."""
    for server in found:
        kind = kind_of(server)
        warmed = False
        for b in spec.batch:
            for c in spec.ctx:
                if case_key(server.name, "server", "endpoint", b, c, PHASE) in done:
                    continue
                on_case({"model": server.name, "batch": b, "ctx": c})
                row = _base(server, kind, spec, b, c, env)
                if server.n_ctx and c + spec.gen > server.n_ctx:
                    row.update(status="skipped", error=f"prompt + output ({c} + {spec.gen}) exceeds the server's "
                                                       f"context per request ({server.n_ctx})")
                    on_row(row)
                    continue
                if not warmed:
                    _warm(server, spec, opts)
                    warmed = True
                w = Workload(ctx=c, concurrency=b, gen=spec.gen, reps=spec.reps, shared_prefix=opts.shared_prefix,
                             rate=opts.rate, timeout=opts.request_timeout, seed=spec.seed)
                row.update(**scrub(run_case(server, w)))
                on_row(row)
                if row.status == "error" and not still_there(server, opts.request_timeout):
                    raise ServerGone(f"{server.name} at {server.endpoint.url} stopped answering during batch {b} "
                                     f"ctx {c}; the finished rows are kept (rerun with --resume)")


def _warm(server: Server, spec: SweepSpec, opts: ServeOptions) -> None:
    """Untimed requests before the server's first case (first-request allocations, graph capture)."""
    for i in range(spec.warmup):
        try:
            prompt = [1 + i] * 16 if server.prompt_mode == "token_ids" else "warm up " * 8
            stream_completion(server.endpoint, {"model": server.served_model, "prompt": prompt, "max_tokens": 4,
                                                "ignore_eos": True}, opts.request_timeout)
        except HTTPFailure:
            return  # the case itself will count and report the failure


def _base(server: Server, kind: str | None, spec: SweepSpec, b: int, c: int, env: dict) -> ServeRow:
    """A case's row before it runs (the server's names are redacted: a key may hide in them)."""
    return ServeRow(model=redact(server.name), kind=kind, dtype="server", device="endpoint", batch=b, ctx=c,
                    phase=PHASE, gen=spec.gen, reps=spec.reps, **scrub(server.fields()), **env,
                    time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
