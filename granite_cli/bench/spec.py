"""Sweep specification: model list, context and batch lists with range syntax, phases, run options.

Sizes: `512`, `4k` (4096), `128k`, `1m`; lists `1k,4k,128k`; ranges `first-last*mult` (geometric)
or `first-last+step` (arithmetic), e.g. `1k-128k*2`, `512-4k+512`. A TOML sweep file holds the same
fields. Cases are ordered model → dtype → batch → context, so each model is built once.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from granite_cli.errors import InputError
from granite_cli.sizes import parse_list

PHASES = ("prefill", "decode")
# Beyond these a sweep is a typo, not a measurement (reps = 1000000000 would run for months): refused up front.
LIMITS = {"reps": 10_000, "warmup": 1_000, "gen": 1 << 20, "ubatch": 1 << 24}
GUARDS = ("depth", "full")
WEIGHTS = ("auto", "random", "checkpoint")


def run_defaults(gpu: bool, default_sweep: bool, max_ctx: int) -> dict:
    """reps and warmup where the user gives none. On a CPU the default sweep (no model, context,
    batch or sweep file given) and contexts above 16k run one timed repetition with no warmup (the
    default must finish in under 3 minutes on a 2-core machine); elsewhere 3 reps after 1 warmup."""
    quick = not gpu and (default_sweep or max_ctx > 16384)
    return {"reps": 1 if quick else 3, "warmup": 0 if quick else 1}


@dataclass
class SweepSpec:
    models: list[str]
    ctx: list[int]
    batch: list[int]
    phases: list[str] = field(default_factory=lambda: list(PHASES))
    gen: int = 16
    dtype: str = "fp32"
    device: str = "cpu"
    reps: int = 3
    warmup: int = 1
    cuda_graph: bool = True
    compile: bool = False
    decode_kernel: bool = True  # CPU decode through granite_cli.ops.native's kernel (else eager)
    share_prefill: bool = True
    ubatch: int = 4096
    max_case_seconds: float = 1800.0
    seed: int = 0
    guard: str = "depth"
    weights: str = "auto"
    energy: bool = True        # GPU energy per token from NVML (in-process on CUDA; servers on this host)
    threads: int | str = "auto"  # CPU threads: a number, or auto (the CPUs other processes leave free)
    ctx_from: str | None = None  # a single --ctx value widened into the sweep up to it (see contexts)

    def validate(self, endpoints: bool = False) -> "SweepSpec":
        if not self.models and not endpoints:
            raise InputError("no model given; pass -m/--model (a profile, config.json or checkpoint folder) or "
                             "--endpoint URL")
        bad = [p for p in self.phases if p not in PHASES]
        if bad:
            raise InputError(f"unknown phase {bad[0]!r}; use prefill, decode or both")
        for name in ("gen", "reps", "ubatch"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name} must be at least 1")
        if self.warmup < 0:
            raise InputError("--warmup must not be negative")
        for name, most in LIMITS.items():
            if getattr(self, name) > most:
                raise InputError(f"--{name} {getattr(self, name):,} is more than {most:,}, which no sweep needs; "
                                 f"give a smaller --{name}")
        if self.guard not in GUARDS:
            raise InputError(f"unknown --guard {self.guard!r}; use depth or full")
        if self.weights not in WEIGHTS:
            raise InputError(f"unknown --weights {self.weights!r}; use auto, random or checkpoint")
        if not self.max_case_seconds > 0:
            raise InputError("--max-case-seconds must be positive")
        self.threads = parse_threads(self.threads)
        from granite_cli.checkpoint.dtypes import parse_dtype
        from granite_cli.checkpoint.random_weights import check_seed

        check_seed(self.seed)
        parse_dtype(self.dtype)
        return self

    def as_dict(self) -> dict:
        """The sweep as the report records it."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


_FILE_TYPES = {"models": (list, str), "ctx": (list, str, int), "batch": (list, str, int), "phases": (list, str),
               "gen": int, "dtype": str, "device": str, "reps": int, "warmup": int, "cuda_graph": bool,
               "compile": bool, "decode_kernel": bool, "share_prefill": bool, "ubatch": int,
               "max_case_seconds": (int, float), "seed": int, "guard": str, "weights": str, "energy": bool,
               "threads": (int, str)}
_FILE_WORDS = {k: ("true or false" if v is bool else "an integer" if v is int else "a string" if v is str
                   else "a number" if k == "max_case_seconds" else "a number or auto" if k == "threads"
                   else "a list or a string")
               for k, v in _FILE_TYPES.items()}
MAX_THREADS = 4096


def parse_threads(v: int | str) -> int | str:
    """--threads: `auto` or a number of threads from 1 to MAX_THREADS."""
    if isinstance(v, str) and v.strip().lower() == "auto":
        return "auto"
    try:
        n = int(str(v).strip()) if not isinstance(v, bool) else None
    except ValueError:
        n = None
    if n is None or not 1 <= n <= MAX_THREADS:
        raise InputError(f"bad --threads {str(v)[:20]!r}: give auto or a number of threads from 1 to {MAX_THREADS}")
    return n


def load_sweep_file(path: str | Path) -> dict:
    """A TOML sweep file whose keys are SweepSpec fields (models, ctx, batch, gen, reps, energy, ...).
    ctx and batch may be lists or range strings."""
    try:
        d = tomllib.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as e:
        raise InputError(f"{path}: cannot read sweep file ({e.strerror})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a TOML sweep file (not UTF-8 text)") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML ({e})") from None
    except RecursionError:
        raise InputError(f"{path}: TOML nested too deeply to be a sweep file") from None
    known = {f.name for f in fields(SweepSpec)} - {"ctx_from"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise InputError(f"{path}: unknown key {unknown[0]!r}; valid: {', '.join(sorted(known))}")
    for k, v in d.items():
        want = _FILE_TYPES[k]
        ok = (isinstance(v, want) and not (isinstance(v, bool) and bool not in (want if isinstance(want, tuple)
                                                                                    else (want,))))
        if k in ("models", "phases") and isinstance(v, list):
            ok = all(isinstance(x, str) for x in v)
        if k in ("ctx", "batch") and isinstance(v, list):
            ok = all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in v)
        if not ok:
            raise InputError(f"{path}: {k} must be {_FILE_WORDS[k]}, got {v!r:.60}")
    if isinstance(d.get("models"), str):
        d["models"] = [d["models"]]
    for k in ("ctx", "batch"):
        if k in d and not isinstance(d[k], list):
            d[k] = parse_list(str(d[k]), k)
        elif k in d:
            d[k] = parse_list(",".join(str(x) for x in d[k]), k)
    if "phases" in d and isinstance(d["phases"], str):
        d["phases"] = [p.strip() for p in d["phases"].split(",")]
    return d


# ---------------------------------------------------------------------------------------------
# one precedence rule for every field: an option on the command line, else the sweep file, else the default

FLAG_FIELDS = ("models", "ctx", "batch", "phases", "gen", "dtype", "device", "reps", "warmup", "ubatch",
               "share_prefill", "cuda_graph", "compile", "decode_kernel", "max_case_seconds", "seed", "guard",
               "weights", "energy", "threads")
# Fields a server sweep does not read: given with --endpoint alone, they would be silently ignored.
IN_PROCESS_FIELDS = ("reps", "dtype", "device", "phases", "ubatch", "share_prefill", "cuda_graph", "compile",
               "decode_kernel", "max_case_seconds", "guard", "weights", "threads")
_FLAG = {"phases": "phase"}
DEFAULT_CTX = {True: "1k-32k*2", False: "512-8k*2"}
# A single --ctx widens into a sweep down to the default start, with at least this many contexts (where
# they stay at least MIN_WIDENED tokens): a scaling fit needs points.
FIT_POINTS, MIN_WIDENED = 4, 16
GPU_MODELS, CPU_MODELS = ["granite-4.0-h-micro", "granite-4.0-micro"], ["cpu-hybrid", "cpu-dense"]


def contexts(text: str, gpu: bool, widen: bool = True) -> tuple[list[int], bool]:
    """--ctx as typed → (contexts, whether a single value was widened). `128k` alone is the sweep up to
    it: 128k, 64k, ... halving down to the default start (512 on a CPU, 1k on a GPU), at least
    FIT_POINTS contexts, so the scaling can be fitted. `=128k` is exactly that context; lists and
    ranges are exactly what they say."""
    t = str(text).strip()
    if t.startswith("="):
        return parse_list(t[1:], "context"), False
    xs = parse_list(t, "context")
    if not widen or len(xs) > 1 or "," in t or "-" in t:
        return xs, False
    start = parse_list(DEFAULT_CTX[gpu], "context")[0]
    out = xs[:]
    while out[-1] // 2 >= start or (len(out) < FIT_POINTS and out[-1] // 2 >= MIN_WIDENED):
        out.append(out[-1] // 2)
    return sorted(out), len(out) > 1


def resolve_spec(flags: dict, sweep_file: str | Path | None, cuda_available: bool,
                 endpoints: bool = False) -> SweepSpec:
    """The sweep from command-line options (None where not given; ctx, batch and phases as the strings
    typed), an optional TOML sweep file, and the defaults, in that order of precedence. Validated.
    With endpoints, no in-process model runs unless one is named."""
    unknown = set(flags) - set(FLAG_FIELDS)
    if unknown:
        raise ValueError(f"unknown sweep fields {sorted(unknown)}")
    given = {k: v for k, v in flags.items() if v is not None}
    ctx_text = given.pop("ctx", None)
    if "batch" in given:
        given["batch"] = parse_list(given["batch"], "batch")
    if "phases" in given:
        given["phases"] = [p.strip() for p in given["phases"].split(",") if p.strip()]
    file = load_sweep_file(sweep_file) if sweep_file else {}
    chosen = {**file, **given}
    device = chosen.get("device", "auto")
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    gpu = device.startswith("cuda")
    if ctx_text is not None:
        # only --endpoint: a prompt length is what was asked (with --turns, a message's), never a sweep
        in_process = bool(chosen.get("models")) or not endpoints
        chosen["ctx"], widened = contexts(ctx_text, gpu, widen=in_process)
        if widened:
            chosen["ctx_from"] = ctx_text.strip()
    if gpu and not cuda_available:
        raise InputError("--device cuda but no CUDA device is available; use --device cpu")
    if device != "cpu" and not gpu:
        raise InputError(f"--device must be cpu, cuda or auto, got {device!r}")
    ctx = chosen.get("ctx") or parse_list(DEFAULT_CTX[gpu], "context")
    quick = run_defaults(gpu, not chosen.keys() & {"models", "ctx", "batch"} and not sweep_file, max(ctx))
    models = [] if endpoints else GPU_MODELS if gpu else CPU_MODELS
    spec = SweepSpec(**{**quick, "models": models, "dtype": "bf16" if gpu else "fp32",
                        "batch": [1] if "ctx" in chosen else [1, 4], **chosen, "ctx": ctx, "device": device})
    spec.models = list(spec.models)
    if endpoints and not spec.models:
        idle = [k for k in IN_PROCESS_FIELDS if given.get(k) is not None]
        if idle:
            hint = "; give --requests N per server case (or --duration S)" if idle[0] == "reps" else ""
            raise InputError(f"--{_FLAG.get(idle[0], idle[0]).replace('_', '-')} is for in-process models (-m); with "
                             f"only --endpoint it would change nothing{hint}")
    if spec.compile and gpu:
        raise InputError("--compile is for CPU decode; on a GPU decode steps replay as CUDA graphs (--cuda-graph)")
    if spec.compile:
        from granite_cli.model.compiled import compile_available

        if why := compile_available():
            raise InputError(f"--compile: {why}; run without --compile")
    return spec.validate(endpoints)
