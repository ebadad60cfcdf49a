"""Rows files: JSONL storage (append + flush per row, resume), the checks a rows file must pass to be
appended to, resumed or compared with, and the environment fields every row records. What a row
is: bench.row.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path

from granite_cli.bench.row import PHASES, SCHEMA_VERSION, STATUSES, Row, case_key
from granite_cli.errors import GraniteError, InputError


def spec_key(model: str, spec, batch: int, ctx: int, phase: str) -> tuple:
    """The key of a case of sweep `spec` before its row exists."""
    return case_key(model, spec.dtype, spec.device, batch, ctx, phase)


def _git() -> tuple[str | None, bool | None]:
    # A copy run outside its checkout (a lent GPU machine) names its commit in GRANITE_COMMIT.
    if os.environ.get("GRANITE_COMMIT"):
        return os.environ["GRANITE_COMMIT"][:12], os.environ.get("GRANITE_DIRTY") == "1"
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                    capture_output=True, text=True, timeout=5).stdout.strip()) if commit else None
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def environment_fields(device) -> dict:
    import torch

    from granite_cli import __version__
    from granite_cli.env import cpu_model
    from granite_cli.hostmem import policy
    from granite_cli.ops.dispatch import resolved_impl

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    commit, dirty = _git()
    gpu = torch.cuda.get_device_name(device) if getattr(device, "type", "cpu") == "cuda" else None
    return {
        "granite_version": __version__, "torch": torch.__version__, "triton": tv, "python": platform.python_version(),
        "cpu": cpu_model(), "gpu": gpu, "threads": torch.get_num_threads(), "kernel_impl": resolved_impl(),
        "commit": commit, "dirty": dirty, "host": os.uname().nodename,
        "host_malloc": policy() if getattr(device, "type", "cpu") == "cpu" else None,
    }


def client_environment() -> dict:
    """The environment fields of a row measured against a server: the client's, without torch's."""
    from granite_cli import __version__
    from granite_cli.env import cpu_model

    commit, dirty = _git()
    return {"granite_version": __version__, "python": platform.python_version(), "cpu": cpu_model(),
            "commit": commit, "dirty": dirty, "host": os.uname().nodename}


# The fields a row is found by (its case), each of its JSON type.
_KEY_TYPES = {"model": str, "dtype": str, "device": str, "batch": int, "ctx": int, "phase": str, "status": str}
# Fields the analysis, the verdicts and the regression gate compute with: numbers (or null) where present.
_NUMBERS = ("tokens_per_s", "latency_ms", "median_s", "stdev_s", "min_s", "max_s", "peak_bytes", "peak_delta_bytes",
            "peak_total_bytes", "predicted_total_bytes", "cache_bytes", "weights_bytes", "ttft_ms_p50", "ttft_ms_p90",
            "ttft_ms_p99", "itl_ms_p50", "itl_ms_p90", "itl_ms_p99", "tpot_ms_p50", "tpot_ms_p90", "e2e_ms_p50",
            "output_tokens_per_s", "requests_per_s", "max_in_flight")
_OBJECTS = ("attribution_s", "errors")
# A line holding these is a granite bench row, of this schema or an older one.
_OWNED_KEYS = ("model", "batch", "ctx", "phase", "status")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def row_problem(r) -> str | None:
    """Why `r` is not a bench row granite can read back (resume, baseline, rerender), or None."""
    if not isinstance(r, dict):
        return "not a JSON object"
    for k, t in _KEY_TYPES.items():
        if k not in r:
            return f"it has no {k!r}"
        v = r[k]
        if isinstance(v, bool) or not isinstance(v, t) or (t is int and v <= 0):
            return f"{k} is {json.dumps(v)[:40]}, not {'a positive integer' if t is int else 'a string'}"
    if r["phase"] not in PHASES:
        return f"unknown phase {r['phase'][:40]!r}"
    if r["status"] not in STATUSES:
        return f"unknown status {r['status'][:40]!r}"
    sv = r.get("schema_version", SCHEMA_VERSION)
    if isinstance(sv, bool) or not isinstance(sv, int) or sv > SCHEMA_VERSION:
        return f"schema_version {json.dumps(sv)[:20]} (this granite reads up to {SCHEMA_VERSION})"
    for k in _NUMBERS:
        if r.get(k) is not None and not _is_number(r[k]):
            return f"{k} is {json.dumps(r[k])[:40]}, not a number"
    for k in _OBJECTS:
        v = r.get(k)
        if v is not None and not (isinstance(v, dict) and all(isinstance(a, str) and _is_number(b)
                                                               for a, b in v.items())):
            return f"{k} is not an object of numbers"
    if r["status"] in ("ok", "invalid") and r["phase"] != "serve":
        for k in ("median_s", "tokens_per_s", "latency_ms"):  # what the fits, verdicts and gates compute with
            if not (_is_number(r.get(k)) and r[k] > 0):
                return f"a finished case without {k}"
    return None


def check_rows_file(path: Path) -> None:
    """Refuse (exit 2) a --jsonl file that granite may not append to or replace: a link, a folder, or
    a file with a line that is not a bench row (a last line cut by an interruption is allowed)."""
    path = Path(path)
    if path.is_symlink():
        raise InputError(f"--jsonl {path} is a symbolic link; give the file it points to, or a new file")
    if not path.exists():
        return
    if not path.is_file():
        raise InputError(f"--jsonl {path} is not a file; give a new file or one granite bench wrote")
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        lines = ["\0"]
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            ok = isinstance(r, dict) and all(k in r for k in _OWNED_KEYS)
        except (ValueError, RecursionError):  # a row cut mid-write, as an interrupt leaves it
            ok = i == len(lines) and line.startswith('{"schema_version": ')
        if not ok:
            raise InputError(f"--jsonl {path}: line {i} is not a granite bench row, so the file is not granite's; "
                             "choose another file")


class RowsNotStored(GraniteError):
    """A finished row could not be written to the rows file (a full disk, a size limit, a folder made
    read-only): the sweep stops (exit 1), the rows stored before are kept whole."""


class JsonlStore:
    """Rows appended as one JSON line each, flushed as they finish, so an interrupted sweep keeps them.
    A write that fails is undone to the last whole row, and raised as RowsNotStored."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.stored = 0

    def open(self, resume: bool) -> list[Row]:
        """Make the file ready before any work: with `resume`, its whole rows (a last line cut by an
        interruption is removed; each row is checked, InputError naming the first bad one); without,
        an empty file. Refused (InputError) where it cannot be written."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            rows = self._repair() if resume and self.path.exists() else []
            if not resume and self.path.exists():
                self.path.unlink()  # proven granite's rows by check_rows_file
            os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666))
        except OSError as e:
            raise InputError(f"--jsonl {self.path}: cannot write there ({e.strerror}); choose a writable "
                             "place") from None
        for i, r in enumerate(rows, 1):
            if why := row_problem(r):
                raise InputError(f"{self.path}: row {i} cannot be resumed from ({why}); rerun without --resume to "
                                 "start the file again, or give another --jsonl")
        return [Row.from_dict(r) for r in rows]

    def _repair(self) -> list[dict]:
        """The rows of the file, after cutting a last line that an interruption left incomplete (or
        closing a whole last row that lost its newline)."""
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            try:
                whole = isinstance(json.loads(data[cut:]), dict)
            except (ValueError, RecursionError):
                whole = False
            with open(self.path, "r+b") as f:
                if whole:
                    f.seek(0, os.SEEK_END)
                    f.write(b"\n")
                    data += b"\n"
                else:
                    f.truncate(cut)
                    data = data[:cut]
                f.flush()
                os.fsync(f.fileno())
        return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]

    def read(self) -> list[Row]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a line cut by an interruption: that case reruns
            if isinstance(d, dict):
                rows.append(Row.from_dict(d))
        return rows

    def append(self, row: Row) -> None:
        from granite_cli.redact import scrub
        from granite_cli.render import json_safe

        append_whole(self.path, (json.dumps(json_safe(scrub(row.to_dict()))) + "\n").encode(), "a row",
                     self.stored)
        self.stored += 1


def append_whole(path: Path, data: bytes, what: str, stored: int | None = None) -> None:
    """Append `data` to `path` and fsync, or leave the file as it was: a write that fails is undone to the
    last whole line and raised as RowsNotStored (exit 1) naming what was lost."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise _lost(path, e, what, stored) from None
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, size)  # no cut line is left behind
            except OSError:
                pass
            raise _lost(path, e, what, stored) from None
    finally:
        os.close(fd)


def _lost(path: Path, e: OSError, what: str, stored: int | None) -> RowsNotStored:
    kept = (f"the {stored} row(s) stored before are kept whole" if stored is not None else
            "what was stored before is kept whole")
    return RowsNotStored(f"cannot store {what} in {path} ({e.strerror or e}); the sweep stopped, and {kept} (free "
                         "space or fix the folder, then rerun with --resume)")


def finished_keys(rows: list[Row]) -> set:
    return {r.key for r in rows if r.finished}


def read_rows(path: Path) -> list[Row]:
    """Earlier rows to compare with: JSONL, or `granite bench --format json` output; each row checked."""
    bad = InputError(f"{path}: not bench rows (expected JSONL or granite bench --format json output)")
    try:
        text = Path(path).read_bytes().decode("utf-8")
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
    if not isinstance(rows, list) or not rows:
        raise bad
    for i, r in enumerate(rows, 1):
        if why := row_problem(r):
            raise InputError(f"{path}: row {i} is not a bench row granite can compare with ({why})")
    return [Row.from_dict(r) for r in rows]
