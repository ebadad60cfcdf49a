"""What the analysis finds, as types: fitted cost curves, hybrid/dense ratios (in-process and served),
and the verdicts, which the JSON output and the report carry."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

NAN = float("nan")


@dataclass
class Fit:
    """A fitted cost curve (bench.fit) of one model, batch and part; the curve's fields are None when
    there were too few points."""

    model: str
    batch: int
    phase: str
    part: str                   # total, mamba, attention, per_token, ttft
    a: float | None = None
    b: float | None = None
    c: float | None = None
    slopes: list | None = None
    doubling: float | None = None
    r2: float | None = None


@dataclass
class Pairing:
    """Which hybrid is compared with which dense model, at one batch (concurrency) and context."""

    hybrid: str
    dense: str
    batch: int
    ctx: int


@dataclass
class Ratio(Pairing):
    """Hybrid over dense at one batch and context: speed and memory of each phase."""

    prefill_speed: float = NAN
    decode_speed: float = NAN
    prefill_total_memory: float = NAN
    decode_total_memory: float = NAN
    prefill_total_predicted: float = NAN
    decode_total_predicted: float = NAN
    memory_total_source: str | None = None
    cache_memory: float = NAN
    prefill_increase_memory: float = NAN     # secondary: the peak's increase over the baseline (RSS on a CPU)
    memory_source: str | None = None


@dataclass
class ServeRatio(Pairing):
    """Hybrid server over dense server at one concurrency, prompt length and workload."""

    ttft: float = NAN
    itl: float = NAN                          # the gap between streamed chunks
    output_speed: float = NAN
    tpot: float = NAN                         # per request: (e2e - TTFT) / (tokens - 1)
    workload: str = ""
    turn_ttft: list = field(default_factory=list)   # per turn of a conversation


@dataclass
class Analysis:
    fits: list[Fit] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    serve_ratios: list[ServeRatio] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"fits": [_fit_dict(f) for f in self.fits], "verdicts": list(self.verdicts),
                "ratios": [asdict(r) for r in self.ratios], "serve_ratios": [asdict(r) for r in self.serve_ratios]}


def _fit_dict(f: Fit) -> dict:
    """A fit as the JSON has it: the curve's fields only where a curve was fitted."""
    d = asdict(f)
    return d if f.a is not None else {k: d[k] for k in ("model", "batch", "phase", "part")}


def make_fit(model: str, batch: int, phase: str, part: str, curve) -> Fit:
    """A Fit from a fitted curve (bench.fit), or one with no curve where there were too few points."""
    return Fit(model, batch, phase, part, **(curve.as_dict() if curve else {}))
