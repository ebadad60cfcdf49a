"""Run a sweep: one row per (model, batch, context, phase), streamed to a callback as it finishes.

Prefill: time to process `ctx` tokens from an empty cache (in `ubatch`-token pieces), logits for
the last position only; median over `reps` after `warmup` runs. The first warmup run carries
forward hooks that attribute time to layer types (Mamba mixers, attention, MoE/MLP, rest).
Shared prefixes (CPU, `share_prefill`): the cases of one model and batch read one token stream, so
when a smaller context c0 of the sweep is a multiple of `ubatch`, a larger context's prefill passes
through exactly the cache state that c0's prefill ended in (the same pieces, the same tokens). That
case restores c0's cache (untimed) and times only the pieces after it; its samples are c0's samples
plus those, its attribution the sum, and its row says `prefill_from: c0`. Memory is measured from
before the restore, so the restored KV counts as it would in a prefill from empty.
Decode: the cache is prefilled to depth `ctx` once, snapshotted, and restored before each
repetition; then `gen` tokens are decoded one step at a time. On a GPU each step is captured as a
CUDA graph after the warmups (row field `decode_mode`; `eager`, with `decode_note` saying why, where
capture is impossible), and every time is taken with CUDA events; on a CPU, with perf_counter, and
with `compile` the steps run under torch.compile (`decode_mode` compiled; one untimed pass first
compiles them, and `decode_note` gives its time).
Failures are data: an out-of-memory case, or one the fitted curve predicts to exceed
`max_case_seconds`, becomes a row with that status and the sweep goes on.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from granite_cli.bench.fit import fit_scaling
from granite_cli.bench.rows import SCHEMA_VERSION, case_key, environment_fields
from granite_cli.bench.spec import SweepSpec
from granite_cli.config import load_config
from granite_cli.errors import InputError
from granite_cli.hostmem import retain_freed_memory
from granite_cli.measure import PeakMemory, Stopwatch, sync
from granite_cli.memory.trace import AllocationReplay, LiveTensorBytes
from granite_cli.model.loading import load_model, parse_dtype
from granite_cli.ops import dispatch
from granite_cli.ops.basic import record_routing, replay_routing
from granite_cli.params import count_params

GUARD_TOKENS = 16


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(e).lower()


def _weights_for(spec_model: str) -> str:
    p = Path(spec_model)
    if p.is_dir() and (any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists()):
        return "checkpoint"
    return "random"


class _Attribution:
    """Forward hooks timing each layer type; synchronises on CUDA (used in a warmup run only)."""

    def __init__(self, model, device) -> None:
        self.device = device
        self.times = {"mamba": 0.0, "attention": 0.0, "moe_mlp": 0.0}
        self.handles = []
        for layer in model.layers:
            self._hook(layer.mixer, "mamba" if layer.kind == "mamba" else "attention")
            for sub in (layer.moe, layer.mlp):
                if sub is not None:
                    self._hook(sub, "moe_mlp")

    def _hook(self, mod, key) -> None:
        def pre(_m, _a):
            sync(self.device)
            _m._t0 = time.perf_counter()

        def post(_m, _a, _o):
            sync(self.device)
            self.times[key] += time.perf_counter() - _m._t0

        self.handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]

    def close(self, total: float) -> dict:
        for h in self.handles:
            h.remove()
        out = dict(self.times)
        out["rest"] = max(0.0, total - sum(self.times.values()))
        return out


def _stats(samples: list[float]) -> dict:
    return {
        "median_s": statistics.median(samples),
        "stdev_s": statistics.stdev(samples) if len(samples) > 1 else 0.0,
        "min_s": min(samples),
        "max_s": max(samples),
        "samples_s": samples,
    }


def correctness_guard(model, device) -> tuple[bool, float]:
    """Decode logits must equal prefill logits on a short prefix (fp32: 1e-3 of the logit scale;
    half precision: 5%)."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, model.cfg.vocab_size, (1, GUARD_TOKENS), generator=g).to(device)
    with torch.inference_mode():
        full = model(ids).float()
        cache = model.allocate_cache(1, GUARD_TOKENS)
        steps = [model(ids[:, :4], cache).float()]
        steps += [model(ids[:, i : i + 1], cache).float() for i in range(4, GUARD_TOKENS)]
    got = torch.cat(steps, 1)
    if not (torch.isfinite(full).all() and torch.isfinite(got).all()):
        return False, math.inf
    diff = (got - full).abs().max().item()
    scale = full.abs().max().item() or 1.0
    tol = 1e-3 if model.dtype == torch.float32 else 5e-2
    return diff <= tol * max(scale, 1.0), diff


PROBE_COLUMNS = 256


@functools.lru_cache(maxsize=8)
def probe_columns(vocab: int, device: torch.device) -> torch.Tensor:
    """A fixed spread of vocabulary columns whose logits the depth guard compares: a wrong state
    moves every logit, so a few hundred find it, at the cost of a small gather in a timed step."""
    g = torch.Generator().manual_seed(7)
    return torch.randperm(vocab, generator=g)[:PROBE_COLUMNS].sort().values.to(device)


GUARD_RTOL = {torch.float32: 1e-5, torch.float64: 1e-9}


def guard_tolerance(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """What two correct code paths over the same state may differ by, relative to the logit scale
    (the largest |logit| compared): 1e-5 in fp32, 5% in half precision. The fp32 bound sits two
    orders of magnitude above how far two correct fp32 paths drift apart, and an order below what
    an offset of one token does even to a small random-weight model."""
    scale = ref.abs().max().item() if ref.numel() else 1.0
    return GUARD_RTOL.get(dtype, 5e-2) * max(scale, 1e-6)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    return (a - b).abs().max().item()


class Runner:
    def __init__(
        self,
        spec: SweepSpec,
        on_row: Callable[[dict], None],
        on_case: Callable[[dict], None] | None = None,
        done: set | None = None,
    ) -> None:
        self.spec = spec.validate()
        self.on_row = on_row
        self.on_case = on_case or (lambda info: None)
        self.done = done or set()
        self.device = torch.device(spec.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda but no CUDA device is available; use --device cpu")
        self.dtype = parse_dtype(spec.dtype)
        if self.device.type == "cpu":
            retain_freed_memory()  # reuse freed activations instead of faulting fresh pages (hostmem)
        self.env = environment_fields(self.device)

    # ------------------------------------------------------------------------------------------
    def run(self) -> None:
        for name in self.spec.models:
            cfg = load_config(name)  # fails fast on a bad model before anything heavy
            pending = [
                (b, c) for b in self.spec.batch for c in self.spec.ctx
                if any(case_key(cfg.name, self.spec, b, c, p) not in self.done for p in self.spec.phases)
            ]
            if not pending:
                continue
            model = load_model(name, weights=_weights_for(name), dtype=self.dtype, device=self.device,
                               seed=self.spec.seed)
            params = count_params(cfg)
            ok, diff = correctness_guard(model, self.device)
            base = {"model": cfg.name, "kind": "hybrid" if cfg.is_hybrid else "dense", "params_total": params.total,
                    "params_active": params.active, "guard_max_diff": diff, "valid": ok,
                    "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
            fits: dict[int, list] = {}
            self._bases: dict[int, dict] = {}  # batch -> the latest shareable prefill (see the module docstring)
            self._ids: dict[int, torch.Tensor] = {}
            for b, c in pending:
                self._case(model, base, b, c, fits)
            del model, self._bases

    def _totals(self, cfg, base: dict, b: int, c: int, cache_bytes: int, pm, tracked: int | None,
                tokens: int) -> dict:
        """A phase's total peak memory (weights + cache + working set) and memory-report's prediction of
        it. Of record: on a GPU the allocator's peak; on a CPU the live-tensor tracker's (the RSS peak
        counts the allocator's and the runtime's own memory too, and stays in peak_bytes beside it)."""
        pred = predicted_total(cfg, self.spec.dtype, b, c + self.spec.gen, tokens, base["weights_bytes"])
        if self.device.type == "cuda":
            total, source = pm.peak, "cuda_allocated"
        else:
            total = None if tracked is None else base["weights_bytes"] + cache_bytes + tracked
            source = "tracked" if tracked is not None else None
        return {"peak_total_bytes": total, "peak_total_source": source, "predicted_total_bytes": int(pred)}

    @torch.no_grad()
    def _tracked_step(self, model, cache, mark: dict, ids: torch.Tensor, base: dict, cache_bytes: int) -> dict:
        """One untimed decode step at the case's depth under the live-tensor tracker (CPU): the decode
        phase's tracked total. (Under --compile the timed steps run a compiled graph; this is the eager step.)"""
        t0 = time.perf_counter()
        cache.rewind(mark)
        c = mark["pos"]
        with LiveTensorBytes() as tr:
            model(ids[:, c : c + 1], cache, logits="last")
        return {"peak_total_bytes": base["weights_bytes"] + cache_bytes + tr.peak, "peak_total_source": "tracked",
                "memory_s": round(time.perf_counter() - t0, 4)}

    def _full_guard(self, c: int) -> bool:
        return self.spec.guard == "full" and c == max(self.spec.ctx)

    @torch.no_grad()
    def _depth_guard(self, model, cache, mark: dict, ids: torch.Tensor, steps: list | None, full: bool) -> dict:
        """The case's correctness at its real depth c, from the state its prefill left (`mark`): k
        single-token decode steps against one k-token continuation (the chunked path) over the same
        tokens; with `full`, also against a prefill of c + k tokens from an empty cache. `steps`: the
        timed decode's recorded probe logits (k = gen), or None to run k = min(gen, 4) steps here."""
        c = mark["pos"]
        probe = probe_columns(model.cfg.vocab_size, self.device)
        if steps is None:  # a prefill-only sweep: a few untimed steps
            cache.rewind(mark)
            steps = [model(ids[:, c + i : c + i + 1], cache, logits="last")[..., probe]
                     for i in range(min(self.spec.gen, 4))]
        k = len(steps)
        want = torch.cat(steps, dim=1).float()  # [b, k, P]
        cache.rewind(mark)
        chunk = model(ids[:, c : c + k], cache, logits="all")[..., probe].float()
        res = {"guard_depth_diff": _max_diff(chunk, want), "guard_full_diff": None,
               "guard_tol": guard_tolerance(model.dtype, want)}
        if full:
            cache.reset()
            tail = None
            for s in range(0, c + k, self.spec.ubatch):
                h = model.hidden_states(ids[:, s : min(s + self.spec.ubatch, c + k)], cache)
                tail = h if tail is None else torch.cat([tail, h], dim=1)[:, -k:]
            res["guard_full_diff"] = _max_diff(model.logits(tail[:, -k:])[..., probe].float(), want)
        return res

    def _judge(self, rows: list[dict], g: dict) -> None:
        """Put the depth guard's figures in the case's rows; a failure makes them invalid (never fast)."""
        bad = [f"{name} differ from the decode steps by {g[key]:.3g} (tolerance {g['guard_tol']:.3g})"
               for key, name in (("guard_depth_diff", "a chunked continuation's logits"),
                                 ("guard_full_diff", "a from-empty prefill's logits"))
               if g[key] is not None and not g[key] <= g["guard_tol"]]
        for row in rows:
            row.update(g)
            if bad and row["status"] in ("ok", "invalid"):
                row.update(status="invalid", valid=False,
                           error=f"depth guard at ctx {row['ctx']}: " + "; ".join(bad))

    def _row(self, base: dict, b: int, c: int, phase: str, **metrics) -> dict:
        row = {
            "schema_version": SCHEMA_VERSION, **base, "dtype": self.spec.dtype, "device": self.device.type,
            "batch": b, "ctx": c, "phase": phase, "gen": self.spec.gen if phase == "decode" else None,
            "ubatch": self.spec.ubatch if phase == "prefill" else None, "reps": self.spec.reps,
            "status": "ok", "error": None, "tokens_per_s": None, "latency_ms": None, "median_s": None,
            "stdev_s": None, "min_s": None, "max_s": None, "samples_s": [], "peak_bytes": None,
            "peak_delta_bytes": None, "memory_source": None, "reserved_peak_bytes": None, "nvml_used_bytes": None,
            "cache_bytes": None, "attribution_s": None, "prefill_from": None, "decode_mode": None, "decode_note": None,
            "guard_depth_diff": None, "guard_full_diff": None, "guard_tol": None, "guard_s": None,
            "peak_total_bytes": None, "peak_total_source": None, "predicted_total_bytes": None, "memory_s": None,
            **self.env, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        row.update(metrics)
        if not base["valid"] and row["status"] == "ok":
            row["status"] = "invalid"
        return row

    def _emit(self, row: dict) -> None:
        self.done.add(case_key(row["model"], self.spec, row["batch"], row["ctx"], row["phase"]))
        self.on_row(row)

    def _case(self, model, base: dict, b: int, c: int, fits: dict) -> None:
        spec = self.spec
        phases = [p for p in spec.phases if case_key(base["model"], spec, b, c, p) not in self.done]
        prev = fits.setdefault(b, [])
        self._bases = {k: v for k, v in self._bases.items() if k == b}  # other batches are done
        start = self._bases.get(b)
        if start is not None and not start["ctx"] < c:
            start = None
        # this case's own run time: a shared prefix is not run again
        est = self.predicted_seconds(prev, c) - (self.predicted_seconds(prev, start["ctx"]) if start else 0.0)
        if est > spec.max_case_seconds:
            for p in phases:
                self._emit(self._row(base, b, c, p, status="skipped",
                                     error=f"predicted {est:.0f} s > --max-case-seconds {spec.max_case_seconds:g}"))
            return
        self.on_case({"model": base["model"], "batch": b, "ctx": c, "phases": phases})
        cache = None
        try:
            with torch.inference_mode():
                cache = model.allocate_cache(b, c + spec.gen)
                cache_bytes = cache.nbytes()["total"]
                ids = self._tokens(model, b)[:, : c + spec.gen]
                prefill_row = self._prefill(model, cache, ids[:, :c], base, b, c, cache_bytes, start)
                # depth c: where each decode repetition starts, and where a larger context may continue
                snap = cache.snapshot() if ("decode" in phases or self._shareable(b, c)) else None
                mark = cache.mark()
                if prefill_row["status"] in ("ok", "invalid"):
                    prev.append((c, prefill_row["median_s"]))
                if self._shareable(b, c) and prefill_row["status"] == "ok":
                    self._bases[b] = {"ctx": c, "snap": snap, "samples": prefill_row["samples_s"],
                                      "attribution": prefill_row["attribution_s"]}
                steps = None
                rows = [prefill_row] if "prefill" in phases else []
                if "decode" in phases:
                    steps = []
                    rows.append(self._decode(model, cache, ids[:, c:], base, b, c, cache_bytes, snap, steps))
                t0 = time.perf_counter()
                g = self._depth_guard(model, cache, mark, ids, steps, full=self._full_guard(c))
                self._judge(rows, {**g, "guard_s": round(time.perf_counter() - t0, 4)})
                if "decode" in phases and self.device.type == "cpu":
                    rows[-1].update(self._tracked_step(model, cache, mark, ids, base, cache_bytes))
                for row in rows:
                    self._emit(row)
        except Exception as e:  # noqa: BLE001 - a failed case is a row, the sweep goes on
            status = "oom" if _is_oom(e) else "error"
            for p in phases:
                if case_key(base["model"], spec, b, c, p) not in self.done:
                    self._emit(self._row(base, b, c, p, status=status, error=f"{type(e).__name__}: {str(e)[:300]}"))
        finally:
            del cache
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def predicted_seconds(self, prev: list[tuple[int, float]], c: int) -> float:
        """This case's predicted run time, from the fit of this model's earlier prefill times at the same
        batch (0 until two points exist)."""
        if len(prev) < 2:
            return 0.0
        f = fit_scaling([x for x, _ in prev], [y for _, y in prev])
        return f.predict(c) * (self.spec.warmup + self.spec.reps) if f else 0.0

    def _tokens(self, model, b: int) -> torch.Tensor:
        """One token stream per model and batch size, long enough for every context of the sweep:
        each case reads a prefix of it, so a larger context's prefill extends a smaller one's."""
        if b not in self._ids:
            g = torch.Generator().manual_seed(self.spec.seed + b)
            n = max(self.spec.ctx) + self.spec.gen
            self._ids[b] = torch.randint(0, model.cfg.vocab_size, (b, n), generator=g).to(self.device)
        return self._ids[b]

    def _shareable(self, b: int, c: int) -> bool:
        """Whether case (b, c)'s end state is where a later, larger case's prefill passes: c is a whole
        number of ubatch pieces and a larger context of this batch is still to come."""
        return prefix_point(self.spec, c) and any(x > c for x in self.spec.ctx)

    def _prefill_ready(self, cache, start: dict | None) -> None:
        """Untimed: an empty cache, or the shared prefix's state restored."""
        if start is None:
            cache.reset()
        else:
            cache.restore(start["snap"])

    def _prefill_once(self, model, cache, ids) -> torch.Tensor:
        """The prefill pieces from the cache's position to the end of ids (from 0 after a reset)."""
        out = None
        for s in range(cache.pos, ids.shape[1], self.spec.ubatch):
            out = model(ids[:, s : s + self.spec.ubatch], cache, logits="last")
        return out

    def _prefill(self, model, cache, ids, base, b, c, cache_bytes, start: dict | None = None) -> dict:
        spec = self.spec
        # Layer-type attribution. CPU: hooks in the first warmup run, or with no warmup in the first
        # timed run (there they only read a timer). GPU: one extra untimed run after the timed ones,
        # since the hooks synchronise and the first run also compiles the Triton kernels.
        gpu = self.device.type == "cuda"
        hook_warm = spec.warmup > 0 and not gpu
        attribution = None
        for w in range(spec.warmup):
            self._prefill_ready(cache, start)
            if w == 0 and hook_warm:
                attribution = self._attributed(model, cache, ids)
            else:
                self._prefill_once(model, cache, ids)
        samples, routing = [], []
        finite = True
        pm = PeakMemory(self.device)
        for r in range(spec.reps):
            # from before the restore: restored KV counts as prefill memory; the first repetition's
            # MoE routing is kept for the allocation replay below
            with (pm if r == 0 else _null()), (record_routing(routing) if r == 0 else _null()):
                self._prefill_ready(cache, start)
                if r == 0 and not hook_warm and self.device.type == "cpu":
                    t0 = time.perf_counter()
                    attribution = self._attributed(model, cache, ids)
                    samples.append(time.perf_counter() - t0)
                    out = self._last_out
                else:
                    with Stopwatch(self.device) as sw:
                        out = self._prefill_once(model, cache, ids)
                    samples.append(sw.seconds)
            finite = finite and bool(torch.isfinite(out).all())
        t0 = time.perf_counter()
        tracked = None if gpu else self._replayed_prefill(model, cache, ids, start, routing)
        memory_s = None if gpu else round(time.perf_counter() - t0, 4)
        if gpu:
            self._prefill_ready(cache, start)
            attribution = self._attributed(model, cache, ids)
        if start is not None:  # the shared prefix's own time, sample by sample (same reps), and its attribution
            samples = [x + y for x, y in zip(samples, start["samples"], strict=True)]
            attribution = {k: v + start["attribution"][k] for k, v in attribution.items()}
        st = _stats(samples)
        row = self._row(base, b, c, "prefill", **st, tokens_per_s=b * c / st["median_s"],
                        latency_ms=st["median_s"] * 1e3,
                        peak_bytes=pm.peak, peak_delta_bytes=pm.delta, memory_source=pm.source,
                        reserved_peak_bytes=pm.reserved, nvml_used_bytes=pm.nvml_used,
                        cache_bytes=cache_bytes, attribution_s=attribution,
                        prefill_from=None if start is None else start["ctx"],
                        **self._totals(model.cfg, base, b, c, cache_bytes, pm, tracked, min(c, spec.ubatch)),
                        memory_s=memory_s)
        if not finite:
            row.update(status="invalid", error="non-finite logits")
        return row

    def _replayed_prefill(self, model, cache, ids, start: dict | None, routing: list) -> int:
        """The CPU prefill's working set of record: the live-tensor tracker over an allocation replay of
        the pieces just timed, with their own routing (memory.trace.AllocationReplay: the same tensors,
        no arithmetic). The tracker slows every op it sees, so a timed run cannot carry it, and a
        second real run would double the sweep. The replay writes no state: the end state is put back."""
        end = cache.mark()
        self._prefill_ready(cache, start)
        with AllocationReplay() as tr, replay_routing(routing):
            self._prefill_once(model, cache, ids)
        cache.rewind(end)
        return tr.peak

    def _attributed(self, model, cache, ids) -> dict:
        att = _Attribution(model, self.device)
        sync(self.device)
        t0 = time.perf_counter()
        try:
            self._last_out = self._prefill_once(model, cache, ids)
            sync(self.device)
        finally:
            result = att.close(time.perf_counter() - t0)
        return result

    def _decode(self, model, cache, nxt, base, b, c, cache_bytes, snap: dict, record: list) -> dict:
        """Timed decode repetitions from the snapshot; the last one also records each step's probe
        logits into `record` (a gather of a few hundred values a step), for the depth guard."""
        spec = self.spec
        samples, finite = [], True
        pm = PeakMemory(self.device)

        step, mode, note = self._eager(model, cache, nxt), "eager", None
        if spec.compile and self.device.type == "cpu":
            step, mode, note = self._compiled_decode(model, cache, nxt, snap)
        for r in range(spec.warmup + spec.reps):
            cache.restore(snap)
            if r == spec.warmup and self.device.type == "cuda" and spec.cuda_graph:
                # After the eager warmups (Triton kernels compiled, cuBLAS initialised): capture.
                step, mode, note = self._graph_decode(model, cache, nxt, snap)
                cache.restore(snap)
            timed_rep = r >= spec.warmup
            with (pm if r == spec.warmup else _null()), Stopwatch(self.device) as sw:
                out = step(record) if r == spec.warmup + spec.reps - 1 else step()
            if timed_rep:
                samples.append(sw.seconds / spec.gen)
                finite = finite and bool(torch.isfinite(out).all())
        st = _stats(samples)
        row = self._row(base, b, c, "decode", **st, tokens_per_s=b / st["median_s"], latency_ms=st["median_s"] * 1e3,
                        peak_bytes=pm.peak, peak_delta_bytes=pm.delta, memory_source=pm.source, cache_bytes=cache_bytes,
                        reserved_peak_bytes=pm.reserved, nvml_used_bytes=pm.nvml_used, decode_mode=mode,
                        decode_note=note, **self._totals(model.cfg, base, b, c, cache_bytes, pm, None, 1))
        if not finite:
            row.update(status="invalid", error="non-finite logits")
        return row

    def _eager(self, model, cache, nxt):
        def step(record: list | None = None):
            for i in range(self.spec.gen):
                out = model(nxt[:, i : i + 1], cache, logits="last")
                if record is not None:
                    record.append(out[..., probe_columns(out.shape[-1], out.device)])
            return out

        return step

    def _compiled_decode(self, model, cache, nxt, snap):
        """torch.compile'd decode: the eager loop over granite_cli.model.compiled's forward. One
        untimed pass over the `gen` steps compiles them (and the variant for the step that fills the
        cache), then the cache is restored. Returns (step, "compiled", note with the compile time), or
        the eager loop with the reason when compilation fails."""
        from granite_cli.model.compiled import compiled_forward

        t0 = time.perf_counter()
        try:
            step = self._eager(compiled_forward(model), cache, nxt)
            step()
        except Exception as e:  # noqa: BLE001 - compilation is an optimisation; eager always works
            cache.restore(snap)
            return self._eager(model, cache, nxt), "eager", f"torch.compile failed ({_reason(e)})"
        cache.restore(snap)
        return step, "compiled", f"torch.compile: first pass {time.perf_counter() - t0:.1f} s (compilation; not timed)"

    def _graph_decode(self, model, cache, nxt, snap):
        """CUDA-graph decode: one graph per step (each bakes its cache position), captured in order
        into one memory pool and replayed in that order, so the host launches `gen` graphs instead
        of thousands of kernels. Returns (replay, "cuda_graph", None), or the eager loop with the
        reason when capture is impossible (an op that syncs with the host, e.g. MoE routing on the
        reference ops)."""
        spec = self.spec
        graphs, outs = [], []
        if model.cfg.num_local_experts and dispatch.kernels(self.device).name != "triton":
            why = "CUDA graphs need the Triton MoE kernel (the reference routes on the host)"
            return self._eager(model, cache, nxt), "eager", why
        if spec.warmup == 0:  # compile and initialise eagerly first: nothing of that may happen in a capture
            self._eager(model, cache, nxt)()
            torch.cuda.synchronize()
            cache.restore(snap)
        try:
            pool = None
            for i in range(spec.gen):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    outs.append(model(nxt[:, i : i + 1], cache, logits="last"))
                pool = g.pool()  # one pool, replayed in capture order: the steps share memory
                graphs.append(g)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - capture is an optimisation; the eager loop always works
            torch.cuda.synchronize()
            cache.restore(snap)
            return self._eager(model, cache, nxt), "eager", f"CUDA graph capture failed ({_reason(e)})"

        def replay(record: list | None = None):
            for i, g in enumerate(graphs):
                g.replay()
                if record is not None:
                    record.append(outs[i][..., probe_columns(outs[i].shape[-1], outs[i].device)])
            return outs[-1]

        return replay, "cuda_graph", None


def _reason(e: BaseException) -> str:
    """An exception as one short line for a row's note: its type and the first line of its message."""
    msg = str(e).splitlines()
    return f"{type(e).__name__}: {msg[0][:160]}" if msg else type(e).__name__


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def prefix_point(spec: SweepSpec, c: int) -> bool:
    """Whether a prefill of c tokens ends where a longer one of the same sweep passes: prefixes are
    shared (CPU only) and c is a whole number of ubatch pieces."""
    return spec.share_prefill and torch.device(spec.device).type == "cpu" and c % spec.ubatch == 0


def device_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are) of the memory a sweep on `device` can use."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"{torch.cuda.get_device_name(device)}'s memory"
    import psutil

    return psutil.virtual_memory().total, "this machine's memory"


def check_fits(spec: SweepSpec, have: int | None = None, where: str = "") -> None:
    """Refuse (InputError) a sweep whose largest case, by memory-report's model (weights, KV cache,
    Mamba state, working set), needs more than the device has: such a case could only fail, after
    minutes of smaller ones or an attempt to allocate terabytes."""
    from granite_cli.memory.predict import predict
    from granite_cli.render import human_bytes

    if have is None:
        have, where = device_memory(torch.device(spec.device))
    b, c = max(spec.batch), max(spec.ctx)
    for name in spec.models:
        cfg = load_config(name)

        def need(ctx: int) -> float:
            return predict(cfg, ctx + spec.gen, b, spec.dtype, spec.dtype, "fp32", spec.ubatch).total_bytes

        if need(c) <= have:
            continue
        lo, hi = 0, c  # the largest context that fits at this batch, by bisection
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if need(mid) <= have else (lo, mid - 1)
        hint = f"at batch {b} up to about {lo} tokens fit" if lo else f"not even one token fits at batch {b}"
        raise InputError(f"{cfg.name} at ctx {c} x batch {b} needs about {human_bytes(need(c))} (predicted: weights, "
                         f"KV cache, Mamba state, working set), more than the {human_bytes(have)} of {where}; "
                         f"lower --ctx or --batch ({hint})")


def predicted_total(cfg, dtype: str, batch: int, cache_len: int, tokens: int, weights: int) -> float:
    """memory-report's model of a phase's total peak: the weights, a cache of cache_len tokens (KV, conv
    state; fp32 SSM state) and the working set of a forward of `tokens` new tokens per sequence."""
    from granite_cli.memory.predict import activation_bytes, kv_bytes, state_bytes

    return (weights + kv_bytes(cfg, cache_len, batch, dtype) + state_bytes(cfg, batch, "fp32", dtype)["total"]
            + activation_bytes(cfg, tokens, batch, dtype))


def estimate_seconds(spec: SweepSpec, gflops: float) -> float:
    """A rough up-front estimate of the sweep's run time from FLOP counts and a measured matmul rate."""
    total = 0.0
    for name in spec.models:
        cfg = load_config(name)
        p = count_params(cfg)
        per_tok = 2 * (p.active - p.groups["embedding"]) + 2 * cfg.hidden_size * cfg.vocab_size / max(1, spec.ubatch)
        att = len(cfg.attention_layers) * cfg.num_attention_heads * cfg.head_dim
        for b in spec.batch:
            c0 = 0  # the shared prefix a case continues from (0: none)
            for c in sorted(spec.ctx):
                # causal QK and PV: 2·2·(c²/2)·heads·hd; a shared prefix's part is not run again
                flops = b * (per_tok * (c - c0) + 2 * att * (c * c - c0 * c0))
                if prefix_point(spec, c):
                    c0 = c
                runs = spec.warmup + spec.reps
                t = flops / (gflops * 1e9) * runs * 1.6  # 1.6: what a CPU forward reaches of the matmul rate
                if "decode" in spec.phases:
                    t += b * runs * spec.gen * (2 * p.active * 4 / 20e9 + 4 * att * c / (gflops * 1e9))
                total += t
        if spec.compile and "decode" in spec.phases and spec.device == "cpu":
            # compilation per model and batch size: two or three variants (docs/decisions.md)
            total += 120.0 * len(spec.batch)
    return total


def matmul_gflops(device: torch.device, dtype: torch.dtype) -> float:
    """The machine's matmul rate (GFLOP/s) for the up-front estimate: the best of 8 timed 1024³
    products after 2 untimed ones. The best, not the mean: a single timing at start-up swings with
    thread pools waking and other work on the machine; the fastest product is what the machine can do."""
    n = 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ a
    sync(device)
    best = math.inf
    for _ in range(8):
        t0 = time.perf_counter()
        a @ a
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9
