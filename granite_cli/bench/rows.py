"""The bench row schema, its environment fields, and JSONL storage (append + flush per row, resume).

A row: schema_version; case parameters (model, kind, dtype, device, batch, ctx, phase, gen, ubatch,
reps); status (ok | invalid | oom | skipped | error) and error; metrics (tokens_per_s, latency_ms,
median_s, stdev_s, min_s, max_s, samples_s, peak_bytes, peak_delta_bytes, memory_source,
reserved_peak_bytes and nvml_used_bytes on a GPU, cache_bytes, attribution_s, prefill_from; the phase's total
peak of record, peak_total_bytes (weights + cache + working set; peak_total_source tracked on a CPU,
cuda_allocated on a GPU), memory-report's predicted_total_bytes, weights_bytes, and memory_s (the
untimed seconds its measurement took); decode_mode
cuda_graph | compiled | eager and decode_note); the correctness guards (valid, guard_max_diff: the short
guard at load; guard_depth_diff, guard_full_diff, guard_tol, guard_s: the depth guard at the case's
context); parameter counts; and the environment (torch, triton, python, cpu, gpu, threads,
kernel_impl, commit, dirty, time).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

SCHEMA_VERSION = 1
FINISHED = ("ok", "invalid", "oom", "skipped")


def case_key(model: str, spec, batch: int, ctx: int, phase: str) -> tuple:
    return (model, spec.dtype, spec.device, batch, ctx, phase)


def row_key(row: dict) -> tuple:
    return (row["model"], row["dtype"], row["device"], row["batch"], row["ctx"], row["phase"])


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


_ROW_KEYS = ("model", "batch", "ctx", "phase", "status")


def check_rows_file(path: Path) -> None:
    """Refuse (exit 2) a --jsonl file that granite may not append to or replace: a link, a folder, or
    a file with a line that is not a bench row (a last line cut by an interruption is allowed)."""
    from granite_cli.errors import InputError

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
            ok = isinstance(r, dict) and all(k in r for k in _ROW_KEYS)
        except ValueError:  # a row cut mid-write, as an interrupt leaves it
            ok = i == len(lines) and line.startswith('{"schema_version": ')
        if not ok:
            raise InputError(f"--jsonl {path}: line {i} is not a granite bench row, so the file is not granite's; "
                             "choose another file")


class JsonlStore:
    """Rows appended as one JSON line each, flushed as they finish, so an interrupted sweep keeps them."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        rows = []
        for i, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by an interruption: that case reruns
        return rows

    def append(self, row: dict) -> None:
        from granite_cli.render import json_safe

        with open(self.path, "a") as f:
            f.write(json.dumps(json_safe(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())


def finished_keys(rows: list[dict]) -> set:
    return {row_key(r) for r in rows if r.get("status") in FINISHED}


def read_rows(path: Path) -> list[dict]:
    """Earlier rows to compare with: JSONL, or `granite bench --format json` output."""
    from granite_cli.errors import InputError

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
    keys = ("model", "dtype", "device", "batch", "ctx", "phase", "status")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and all(k in r for k in keys) for r in rows):
        raise bad
    return rows
