"""One `granite bench` run as a library call: the output checks, the stored rows (fresh or resumed),
the up-front refusal and estimate, the sweep, the analysis and report, and the gates.

run_sweep() returns a SweepOutcome; its raise_for_gates() raises CheckFailed (exit 3) for a failed
--check or regression gate, and GraniteError (exit 1) when a case errored, after the caller has
printed the rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from granite_cli.bench import analysis as an
from granite_cli.bench.analysis import Analysis
from granite_cli.bench.contention import CONTENDED_CORES, RETRIES, auto_threads, busy_elsewhere, usable_cpus
from granite_cli.bench.endpoints import RequestsFile, ServeOptions, cases, check_workload, run_endpoints, servers
from granite_cli.bench.endpoints import check_fits as check_server_fits
from granite_cli.bench.estimate import check_fits, estimate_seconds, kernel_build_pending, matmul_gflops
from granite_cli.bench.report import REPORT_FILES, write_report
from granite_cli.bench.row import Row
from granite_cli.bench.rows import (
    JsonlStore,
    RowsNotStored,
    check_rows_file,
    client_environment,
    finished_keys,
    read_rows,
)
from granite_cli.bench.runner import Runner
from granite_cli.bench.spec import IN_PROCESS_FIELDS, SweepSpec
from granite_cli.checkpoint.dtypes import parse_dtype
from granite_cli.errors import CheckFailed, GraniteError, InputError
from granite_cli.fsutil import check_report_dir, prepare_report_dir
from granite_cli.hostmem import retain_freed_memory
from granite_cli.paths import check_distinct, check_output_paths
from granite_cli.serve.probe import ServerGone


class Progress:
    """What the caller is told as the sweep goes: the number of cases and the estimate, each case as it
    starts, each row as it ends, and the end. The default says nothing."""

    def start(self, cases: int, estimate_s: float) -> None: ...

    def case(self, info: dict) -> None: ...

    def row(self, row: dict) -> None: ...

    def stop(self) -> None: ...


@dataclass
class Outputs:
    """Where a sweep's rows and report go: `out` a report folder (rows.jsonl streamed into it unless
    `jsonl` names another file), `jsonl` a rows file, `resume` to keep the finished rows already there."""

    out: Path | None = None
    jsonl: Path | None = None
    resume: bool = False


@dataclass
class Gates:
    """What fails the run (exit 3): `check` the scaling claims, a drop against `baseline` rows of more
    than `fail_on_regression` (e.g. "10%")."""

    baseline: Path | None = None
    fail_on_regression: str | None = None
    check: bool = False


@dataclass
class SweepOutcome:
    rows: list[Row]
    analysis: Analysis
    wall_s: float
    gates: list[str] = field(default_factory=list)  # failed --check / --fail-on-regression gates
    fatal: GraniteError | None = None                # what ended the sweep early (a server that stopped)
    fresh: list[Row] = field(default_factory=list)   # the rows this run made (not those kept by --resume)

    def raise_for_gates(self) -> None:
        if self.fatal is not None:
            raise self.fatal
        if self.gates:
            raise CheckFailed(f"{len(self.gates)} check(s) failed: " + "; ".join(self.gates))
        errored = [r for r in self.rows if r.status == "error"]
        if errored:
            e = errored[0]
            raise GraniteError(f"{len(errored)} case(s) errored, e.g. {e.model} ctx {e.ctx}: {e.error}")
        if self.fresh and all(r.status == "skipped" for r in self.fresh):
            e = self.fresh[0]
            raise GraniteError(f"no case was measured: all {len(self.fresh)} were skipped, e.g. {e.model} batch "
                               f"{e.batch} ctx {e.ctx}: {e.error}")


def parse_threshold(text: str | None, baseline: Path | None) -> float | None:
    """`--fail-on-regression 10%` (or 0.1) as a fraction in [0, 1): a gate that can fire. It needs a
    baseline."""
    if text is None:
        return None
    if baseline is None:
        raise InputError("--fail-on-regression needs --baseline FILE")
    t = text.strip()
    pct = t.endswith("%")
    bad = f"bad --fail-on-regression {text!r}: use a drop between 0% and 100% such as 10% (or 0.1)"
    try:
        v = float(t[:-1] if pct else t) / (100 if pct else 1)
    except ValueError:
        raise InputError(bad) from None
    if not (math.isfinite(v) and 0 <= v < 1):
        if not pct and 1 <= v < 100:
            raise InputError(f"{bad}; did you mean {t}%?")
        raise InputError(bad + "; a drop of 100% or more, or a negative or NaN one, can never fail the gate")
    return v


def run_sweep(spec: SweepSpec, outputs: Outputs | None = None, gates: Gates | None = None,
              serve: ServeOptions | None = None, say: Callable[[str], None] = lambda msg: None,
              progress: Progress | None = None) -> SweepOutcome:
    """Run the sweep, streaming rows to `outputs.jsonl` or `outputs.out`/rows.jsonl; write the report into
    `outputs.out`. With `serve`, its endpoints are probed before any work and swept after the in-process
    models."""
    progress = progress or Progress()
    o, g = outputs or Outputs(), gates or Gates()
    out = o.out
    threshold, base_rows = _check_inputs(spec, o, g, serve)
    found = servers(serve) if serve and serve.endpoints else []
    if found:
        check_server_fits(found, spec, serve)
    store, kept = _open_store(o)
    requests_file = RequestsFile(serve.requests_out) if found and serve.requests_out else None
    if requests_file:
        requests_file.open(o.resume)
    rows = [r for r in kept if r.finished]
    if spec.models and spec.device == "cpu":
        _choose_threads(spec, say)
    device = torch.device(spec.device)
    est = estimate_seconds(spec, matmul_gflops(device, parse_dtype(spec.dtype))) if spec.models else 0.0
    _announce(spec, found, serve, est, say)
    if kept:
        say(f"resuming: {len(finished_keys(kept))} finished row(s) kept from {store.path}")

    def on_row(r: Row) -> None:
        rows.append(r)
        if store:
            store.append(r)
        progress.row(r)

    progress.start(len(spec.models) * len(spec.ctx) * len(spec.batch) + (len(found) * len(cases(spec, serve))
                                                                          if found else 0), est)
    fresh_from = len(rows)
    t0 = time.perf_counter()
    gone = None
    try:
        if spec.models:
            Runner(spec, on_row, on_case=progress.case, done=finished_keys(kept)).run()
        if found:
            run_endpoints(found, spec, serve, client_environment(), on_row, progress.case, finished_keys(kept),
                          requests_file.append if requests_file else None)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the CLI says "interrupted" and what was kept
        progress.stop()
        e.args = (f"{len(rows)} row(s) kept in {store.path} (rerun with --resume)",) if store else ()
        raise
    except (ServerGone, RowsNotStored) as e:  # the finished rows still make a report; the exit status says why
        gone = e
    progress.stop()
    wall = time.perf_counter() - t0
    fresh = rows[fresh_from:]
    order = {m: i for i, m in enumerate([*spec.models, *(s.name for s in found)])}
    rows.sort(key=lambda r: (order.get(r.model, len(order)), r.workload or "", r.batch, r.ctx, r.phase))
    result = an.analyse(rows, slo=serve.slo if serve else None)
    if shared := an.uncontended(fresh)[1]:
        say("warning: " + an.contended_note(shared).removeprefix("note: "))
    if out:
        _report(out, rows, result, _sweep_record(spec, found, serve), wall, say, gone)
    failed = an.check_claims(rows, result) if g.check else []
    if base_rows is not None and threshold is not None:
        failed += an.regressions(rows, base_rows, threshold)
    return SweepOutcome(rows, result, wall, failed, gone, fresh)


def _choose_threads(spec: SweepSpec, say: Callable[[str], None]) -> None:
    """The CPU cases' threads: --threads N, or auto: the CPUs other processes leave free (measured over
    half a second before any work). A busy machine is named before the sweep, not found out after it."""
    others, cpus = busy_elsewhere(0.5), usable_cpus()
    n = auto_threads(others, cpus) if spec.threads == "auto" else int(spec.threads)
    torch.set_num_threads(n)
    if others is not None and others >= CONTENDED_CORES:
        use = (f"granite uses the {n} thread(s) left free (--threads auto)" if spec.threads == "auto" else
               f"--threads {n} competes with them" if n > auto_threads(others, cpus) else
               f"--threads {n} runs on the cores left free")
        say(f"warning: {others:.1f} of {cpus} cores busy elsewhere before the sweep; {use}. A case measured while "
            f"others take CPU it needs is measured again (up to {RETRIES} times), then flagged contended and left "
            "out of fits and verdicts")


def _check_inputs(spec: SweepSpec, o: Outputs, g: Gates, serve: ServeOptions | None) -> tuple[float | None,
                                                                                              list | None]:
    """Every local input checked (exit 2) before any server is asked or any file written; returns the
    regression threshold and the baseline rows."""
    if o.resume and not (o.jsonl or o.out):
        raise InputError("--resume needs --jsonl FILE or --out DIR to find finished rows")
    check_output_paths(o.out, o.jsonl, serve.requests_out if serve else None)
    check_distinct({"--jsonl": o.jsonl, "--requests-out": serve.requests_out if serve else None},
                   ("--out", o.out),
                   {"--baseline": g.baseline, "--dataset": serve.dataset if serve else None})
    threshold = parse_threshold(g.fail_on_regression, g.baseline)
    base_rows = read_rows(g.baseline) if g.baseline else None
    if serve and serve.endpoints:
        check_workload(spec, serve.validate())
    check_fits(spec)
    if o.out:
        check_report_dir(o.out, REPORT_FILES)
    if o.jsonl:
        check_rows_file(o.jsonl)
    return threshold, base_rows


def _announce(spec: SweepSpec, found: list, serve: ServeOptions | None, est: float,
              say: Callable[[str], None]) -> None:
    if spec.models:
        say(f"granite bench: {len(spec.models)} model(s) x {len(spec.batch)} batch x {len(spec.ctx)} context(s) "
            f"on {spec.device} ({spec.dtype}, {spec.reps} rep(s) + {spec.warmup} warmup); expected about "
            f"{duration(est)}")
        if spec.ctx_from:
            say(f"--ctx {spec.ctx_from} is the sweep up to it: contexts {_list(spec.ctx)}, so the scaling can be "
                f"fitted (--ctx ={spec.ctx_from} runs that context alone)")
    for s in found:
        say(f"granite bench: endpoint {s.name} ({s.engine or 'unknown engine'} {s.version or ''}".rstrip() +
            f", serving {s.served_model}): {serve_plan(spec, serve)}")
    if spec.device == "cpu" and spec.models:
        say("note: CPU timings share this machine with whatever else runs; compare ratios, not absolute times")
        if kernel_build_pending(spec):
            from granite_cli.ops.native import build_plan

            say(f"note: {build_plan()}")
        if retain_freed_memory() == "glibc-retain":  # the runner would apply it too; here, to say so
            say("note: freed heap memory is kept for reuse during the sweep (GRANITE_HOST_MALLOC=system turns it off)")


def serve_plan(spec: SweepSpec, serve: ServeOptions) -> str:
    """What each server case sends, in words."""
    api = "chat completions" if serve.api == "chat" else "completions"
    prompts = (f"prompts from {serve.loaded.label}" if serve.loaded else
               f"{'exact' if serve.lengths == 'exact' else serve.lengths} prompt lengths {_list(spec.ctx)}")
    n = serve.requests if serve.requests is not None else None
    budget = (f"{n} request(s) per case" if n is not None else "the default requests per case") + \
        (f" or {serve.duration:g} s" if serve.duration else "")
    if serve.rates:
        cap = f"at most {_list(serve.max_concurrency)} in flight" if serve.max_concurrency else "no in-flight cap"
        loop = f"open loop at {_list(serve.rates)} request(s)/s, {cap}"
    else:
        loop = f"closed loop, {_list(spec.batch)} session(s)"
        if serve.turns > 1:
            loop += f" of {serve.turns}-turn conversations" + (f" ({serve.think_time:g} s think time)"
                                                                if serve.think_time else "")
    runs = f", {serve.runs} runs" if serve.runs > 1 else ""
    return f"{loop}; {api}, {prompts}, {spec.gen} output tokens, {budget}{runs}; prompt seed {serve.seed}"


def _list(xs) -> str:
    return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in xs)


def _sweep_record(spec: SweepSpec, found: list, serve: ServeOptions | None) -> dict:
    """The sweep as the report records it, with what was asked of the servers (the key stays out)."""
    sweep = spec.as_dict()
    if found and not spec.models:
        # nothing ran in-process: its settings would read as if they had shaped the server rows
        for k in IN_PROCESS_FIELDS:
            sweep.pop(k, None)
    if found:
        sweep["endpoints"] = {s.name: s.endpoint.url for s in found}
        sweep.update({k: getattr(serve, k) for k in ("api", "rates", "max_concurrency", "shared_prefix",
                                                      "request_timeout", "requests", "duration", "turns",
                                                      "think_time", "lengths", "runs", "seed")})
        sweep["dataset"] = serve.loaded.label if serve.loaded else None
        sweep["slo"] = serve.slo.describe() or None
    return sweep


def _report(out: Path, rows: list[Row], result: Analysis, sweep: dict, wall: float, say: Callable[[str], None],
            gone: GraniteError | None) -> None:
    try:
        write_report(out, rows, result, sweep, wall, say=say)
        say(f"report written to {Path(out) / 'report.md'}")
    except OSError as e:
        if gone is None:
            raise
        say(f"note: the report could not be written either ({e.strerror or e})")


def _open_store(o: Outputs) -> tuple[JsonlStore | None, list[Row]]:
    """Where rows stream to (refused up front if it holds anything granite did not write), and the
    finished rows kept from it with --resume."""
    if o.out and not o.jsonl:
        prepare_report_dir(o.out, REPORT_FILES, appended=("rows.jsonl",))
    if not (o.jsonl or o.out):
        return None, []
    store = JsonlStore(o.jsonl or (Path(o.out) / "rows.jsonl"))
    return store, store.open(o.resume)


def duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"
