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
repetition; then `gen` tokens are decoded one step at a time (bench.steps: eager, compiled on a CPU
with `compile`, CUDA graphs on a GPU). Every case then passes the depth guard (bench.guard).
Memory of record: on a GPU the allocator's peaks; on a CPU the live-tensor tracker, over an
allocation replay of the pieces just timed and over one decode step.
Failures are data: an out-of-memory case, or one the fitted curve predicts to exceed
`max_case_seconds`, becomes a row with that status and the sweep goes on.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from granite_cli.bench.attribution import Attribution
from granite_cli.bench.contention import RETRIES, CpuWindow, Watch, usable_cpus
from granite_cli.bench.estimate import predicted_total, prefix_point
from granite_cli.bench.fit import fit_scaling
from granite_cli.bench.guard import GUARD_TOKENS, correctness_guard, depth_guard, judge
from granite_cli.bench.roofline import Ceilings, case_rates, probe
from granite_cli.bench.row import ModelRow
from granite_cli.bench.rows import RowsNotStored, environment_fields, spec_key
from granite_cli.bench.spec import SweepSpec
from granite_cli.bench.steps import compiled_steps, eager_steps, graph_steps, native_steps
from granite_cli.checkpoint.dtypes import parse_dtype
from granite_cli.config import ModelConfig, load_config
from granite_cli.energy import NvmlSource, PowerMeter, load_nvml, nvml_index
from granite_cli.errors import InputError
from granite_cli.hostmem import retain_freed_memory
from granite_cli.measure import PeakMemory, Stopwatch, sync
from granite_cli.memory.trace import AllocationReplay, LiveTensorBytes
from granite_cli.model.loading import load_model
from granite_cli.ops.routing import record_routing, replay_routing
from granite_cli.params import count_params

__all__ = ["GUARD_TOKENS", "Runner"]


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(e).lower()


def _weights_for(spec_model: str, choice: str) -> str:
    """random or checkpoint; `auto` reads a local folder's weights where it has them, and otherwise
    (profiles, config.json files, Hub ids: only config.json is fetched) uses random weights."""
    if choice != "auto":
        return choice
    p = Path(spec_model)
    if p.is_dir() and (any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists()):
        return "checkpoint"
    return "random"


def _stats(samples: list[float]) -> dict:
    return {
        "median_s": statistics.median(samples),
        "stdev_s": statistics.stdev(samples) if len(samples) > 1 else None,  # one sample has no spread
        "min_s": min(samples),
        "max_s": max(samples),
        "samples_s": samples,
    }


@dataclass
class _ModelRun:
    """What the cases of one model share."""

    model: torch.nn.Module
    cfg: ModelConfig
    base: dict                                               # the model's fields in every row
    fits: dict[int, list] = field(default_factory=dict)      # batch -> [(ctx, prefill s)] for the skip rule
    prefix: dict[int, dict] = field(default_factory=dict)    # batch -> the latest shareable prefill's end
    streams: dict[int, torch.Tensor] = field(default_factory=dict)  # batch -> the token stream its cases read


@dataclass
class _Case:
    b: int
    c: int
    cache: object                 # model.cache.Cache for c + gen tokens
    cache_bytes: int
    ids: torch.Tensor             # [b, c + gen]: the prompt, then the decode tokens
    start: dict | None            # the shared prefix this prefill continues from, if any


class Runner:
    def __init__(
        self,
        spec: SweepSpec,
        on_row: Callable[[ModelRow], None],
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
        self.threads = torch.get_num_threads()
        self.ceilings: Ceilings | None = None

    # ------------------------------------------------------------------------------------------
    def run(self) -> None:
        for name in self.spec.models:
            cfg = load_config(name)  # fails fast on a bad model before anything heavy
            pending = [
                (b, c) for b in self.spec.batch for c in self.spec.ctx
                if any(spec_key(cfg.name, self.spec, b, c, p) not in self.done for p in self.spec.phases)
            ]
            if not pending:
                continue
            model = load_model(name, weights=_weights_for(name, self.spec.weights), dtype=self.dtype,
                               device=self.device, seed=self.spec.seed)
            params = count_params(cfg)
            ok, diff = correctness_guard(model, self.device)
            base = {"model": cfg.name, "kind": "hybrid" if cfg.is_hybrid else "dense", "params_total": params.total,
                    "params_active": params.active, "guard_max_diff": diff, "valid": ok,
                    "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
            if self.ceilings is None:  # once per sweep, before the first case, on a quiet machine
                self.ceilings = probe(self.device, self.dtype)
            run = _ModelRun(model, cfg, base)
            for b, c in pending:
                self._case(run, b, c)
            del model, run

    def _row(self, base: dict, b: int, c: int, phase: str, **metrics) -> ModelRow:
        row = ModelRow(**base, dtype=self.spec.dtype, device=self.device.type, batch=b, ctx=c, phase=phase,
                       gen=self.spec.gen if phase == "decode" else None,
                       ubatch=self.spec.ubatch if phase == "prefill" else None, reps=self.spec.reps, **self.env,
                       time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        row.update(**metrics)
        if not row.valid and row.status == "ok":
            row.status = "invalid"
        return row

    def _emit(self, row: ModelRow) -> None:
        self.done.add(row.key)
        self.on_row(row)

    def _case(self, run: _ModelRun, b: int, c: int) -> None:
        spec, base = self.spec, run.base
        phases = [p for p in spec.phases if spec_key(base["model"], spec, b, c, p) not in self.done]
        prev = run.fits.setdefault(b, [])
        run.prefix = {k: v for k, v in run.prefix.items() if k == b}  # other batches are done
        start = run.prefix.get(b)
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
                cache = run.model.allocate_cache(b, c + spec.gen)
                case = _Case(b, c, cache, cache.nbytes()["total"], self._tokens(run, b)[:, : c + spec.gen], start)
                for row in self._measure(run, case, phases, prev):
                    self._emit(row)
        except RowsNotStored:
            raise  # not this case's failure: the sweep cannot keep its rows
        except Exception as e:  # noqa: BLE001 - a failed case is a row, the sweep goes on
            status = "oom" if _is_oom(e) else "error"
            for p in phases:
                if spec_key(base["model"], spec, b, c, p) not in self.done:
                    self._emit(self._row(base, b, c, p, status=status, error=f"{type(e).__name__}: {str(e)[:300]}"))
        finally:
            del cache
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _measure(self, run: _ModelRun, case: _Case, phases: list[str], prev: list) -> list[ModelRow]:
        """The case's rows: its prefill (always run: decode starts from it), its decode, then the depth
        guard and, on a CPU, the tracked decode step."""
        spec, cache = self.spec, case.cache
        prefill_row = self._prefill(run, case)
        # depth c: where each decode repetition starts, and where a larger context may continue
        shareable = self._shareable(case.c)
        snap = cache.snapshot() if ("decode" in phases or shareable) else None
        mark = cache.mark()
        if prefill_row.status in ("ok", "invalid"):
            prev.append((case.c, prefill_row.median_s))
        if shareable and prefill_row.status == "ok":
            run.prefix[case.b] = {"ctx": case.c, "snap": snap, "samples": prefill_row.samples_s,
                                  "attribution": prefill_row.attribution_s}
        steps = None
        rows = [prefill_row] if "prefill" in phases else []
        if "decode" in phases:
            steps = []
            rows.append(self._decode(run, case, snap, steps))
        t0 = time.perf_counter()
        g = depth_guard(run.model, cache, mark, case.ids, steps, gen=spec.gen, ubatch=spec.ubatch,
                        full=spec.guard == "full" and case.c == max(spec.ctx))
        judge(rows, {**g, "guard_s": round(time.perf_counter() - t0, 4)})
        if "decode" in phases and self.device.type == "cpu":
            rows[-1].update(**self._tracked_step(run, case, mark))
        return rows

    def predicted_seconds(self, prev: list[tuple[int, float]], c: int) -> float:
        """This case's predicted run time, from the fit of this model's earlier prefill times at the same
        batch (0 until two points exist)."""
        if len(prev) < 2:
            return 0.0
        f = fit_scaling([x for x, _ in prev], [y for _, y in prev])
        return f.predict(c) * (self.spec.warmup + self.spec.reps) if f else 0.0

    def _tokens(self, run: _ModelRun, b: int) -> torch.Tensor:
        """One token stream per model and batch size, long enough for every context of the sweep:
        each case reads a prefix of it, so a larger context's prefill extends a smaller one's."""
        if b not in run.streams:
            g = torch.Generator().manual_seed(self.spec.seed + b)
            n = max(self.spec.ctx) + self.spec.gen
            run.streams[b] = torch.randint(0, run.model.cfg.vocab_size, (b, n), generator=g).to(self.device)
        return run.streams[b]

    def _shareable(self, c: int) -> bool:
        """Whether a case's end state at c is where a later, larger case's prefill passes: c is a whole
        number of ubatch pieces and a larger context of the sweep is still to come."""
        return prefix_point(self.spec, c) and any(x > c for x in self.spec.ctx)

    # ------------------------------------------------------------------------------------------ prefill
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

    def _prefill(self, run: _ModelRun, case: _Case) -> ModelRow:
        spec, model, cache, ids, start = self.spec, run.model, case.cache, case.ids[:, : case.c], case.start
        # Layer-type attribution. CPU: hooks in the first warmup run, or with no warmup in the first
        # timed run (there they only read a timer). GPU: one extra untimed run after the timed ones,
        # since the hooks synchronise and the first run also compiles the Triton kernels.
        gpu = self.device.type == "cuda"
        hook_warm = spec.warmup > 0 and not gpu
        attribution = None
        for w in range(spec.warmup):
            self._prefill_ready(cache, start)
            if w == 0 and hook_warm:
                attribution, _ = self._attributed(model, cache, ids)
            else:
                self._prefill_once(model, cache, ids)
        for retries in range(RETRIES + 1):  # measured again while other processes take the CPU it needs
            samples, routing, finite = [], [], True
            pm = PeakMemory(self.device)
            meter = self._meter()
            with Watch(self.threads) as watch:
                for r in range(spec.reps):
                    # from before the restore: restored KV counts as prefill memory; the first repetition's
                    # MoE routing is kept for the allocation replay below
                    with (pm if r == 0 else nullcontext()), (record_routing(routing) if r == 0 else nullcontext()):
                        self._prefill_ready(cache, start)
                        if r == 0 and not hook_warm and not gpu:
                            t0 = time.perf_counter()
                            attribution, out = self._attributed(model, cache, ids)
                            samples.append(time.perf_counter() - t0)
                        else:
                            with Stopwatch(self.device) as sw:
                                out = self._prefill_once(model, cache, ids)
                            samples.append(sw.seconds)
                    finite = finite and bool(torch.isfinite(out).all())
            if gpu or not self._contended(watch.window):
                break
        energy = self._energy(meter, prompt=spec.reps * case.b * case.c)
        t0 = time.perf_counter()
        tracked = None if gpu else self._replayed_prefill(model, cache, ids, start, routing)
        memory_s = None if gpu else round(time.perf_counter() - t0, 4)
        if gpu:
            self._prefill_ready(cache, start)
            attribution, _ = self._attributed(model, cache, ids)
        if start is not None:  # the shared prefix's own time, sample by sample (same reps), and its attribution
            samples = [x + y for x, y in zip(samples, start["samples"], strict=True)]
            attribution = {k: v + start["attribution"][k] for k, v in attribution.items()}
        st = _stats(samples)
        b, c = case.b, case.c
        row = self._row(run.base, b, c, "prefill", **st, tokens_per_s=b * c / st["median_s"],
                        latency_ms=st["median_s"] * 1e3, peak_bytes=pm.peak, peak_delta_bytes=pm.delta,
                        memory_source=pm.source, reserved_peak_bytes=pm.reserved, nvml_used_bytes=pm.nvml_used,
                        cache_bytes=case.cache_bytes, attribution_s=attribution,
                        prefill_from=None if start is None else start["ctx"],
                        **self._totals(run, case, pm, tracked, min(c, spec.ubatch)), memory_s=memory_s, **energy,
                        **(self._shared(watch.window, retries) if not gpu else {}),
                        **case_rates(run.cfg, spec, "prefill", b, c, st["median_s"], self.ceilings))
        if not finite:
            row.update(status="invalid", error="non-finite logits")
        return row

    def _contended(self, w: CpuWindow) -> bool:
        """Whether other processes took CPU this case needed: more busy cores elsewhere than it left free
        (the usable CPUs beyond its threads), or a hypervisor's steal."""
        return w.contended_beyond(usable_cpus() - self.threads)

    def _shared(self, w: CpuWindow, retries: int) -> dict:
        return {**w.fields(), "contended": self._contended(w), "contended_retries": retries}

    def _meter(self):
        """A started power meter on this run's GPU (NVML), or None (a CPU, --no-energy, no NVML)."""
        if self.device.type != "cuda" or not self.spec.energy or (nvml := load_nvml()) is None:
            return None
        index = nvml_index(nvml, str(torch.cuda.get_device_properties(self.device).uuid), self.device.index or 0)
        return PowerMeter(NvmlSource(nvml, [index])).start()

    def _energy(self, meter, prompt: int = 0, output: int = 0) -> dict:
        """The timed repetitions' GPU energy, per prompt token (prefill) or per output token (decode)."""
        if meter is None:
            return {}
        sync(self.device)
        e = meter.stop()
        joules = e["energy_j"]
        return {**e, "j_per_prompt_token": joules / prompt if joules is not None and prompt else None,
                "j_per_output_token": joules / output if joules is not None and output else None}

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

    def _attributed(self, model, cache, ids) -> tuple[dict, torch.Tensor]:
        """(attribution by layer type, last logits) of one prefill run with the timing hooks on."""
        att = Attribution(model, self.device)
        sync(self.device)
        t0 = time.perf_counter()
        try:
            out = self._prefill_once(model, cache, ids)
            sync(self.device)
        finally:
            result = att.close(time.perf_counter() - t0)
        return result, out

    # ------------------------------------------------------------------------------------------ decode
    def _decode(self, run: _ModelRun, case: _Case, snap: dict, record: list) -> ModelRow:
        """Timed decode repetitions from the snapshot; the last one also records each step's probe
        logits into `record` (a gather of a few hundred values a step), for the depth guard."""
        spec, model, cache, nxt = self.spec, run.model, case.cache, case.ids[:, case.c :]
        samples, finite = [], True
        pm = PeakMemory(self.device)
        step, mode, note = eager_steps(model, cache, nxt, spec.gen), "eager", None
        if spec.compile and self.device.type == "cpu":
            step, mode, note = compiled_steps(model, cache, nxt, spec.gen, snap)
        elif spec.decode_kernel and self.device.type == "cpu":
            step, mode, note = native_steps(model, cache, nxt, spec.gen)
        for _ in range(spec.warmup):
            cache.restore(snap)
            step()
        sync(self.device)  # the warmups finished before a capture or a timed step begins
        gpu = self.device.type == "cuda"
        for retries in range(RETRIES + 1):  # measured again while other processes take the CPU it needs
            samples, finite = [], True
            record.clear()
            meter = self._meter()
            with Watch(self.threads) as watch:
                for r in range(spec.reps):
                    cache.restore(snap)
                    if r == 0 and retries == 0 and gpu and spec.cuda_graph:
                        # After the eager warmups (Triton kernels compiled, cuBLAS initialised): capture.
                        step, mode, note = graph_steps(model, cache, nxt, spec.gen, snap, warmed=spec.warmup > 0)
                        cache.restore(snap)
                    with (pm if r == 0 and retries == 0 else nullcontext()), Stopwatch(self.device) as sw:
                        out = step(record) if r == spec.reps - 1 else step()
                    samples.append(sw.seconds / spec.gen)
                    finite = finite and bool(torch.isfinite(out).all())
            if gpu or not self._contended(watch.window):
                break
        energy = self._energy(meter, output=spec.reps * case.b * spec.gen)
        st = _stats(samples)
        row = self._row(run.base, case.b, case.c, "decode", **st, tokens_per_s=case.b / st["median_s"],
                        latency_ms=st["median_s"] * 1e3, peak_bytes=pm.peak, peak_delta_bytes=pm.delta,
                        memory_source=pm.source, cache_bytes=case.cache_bytes, reserved_peak_bytes=pm.reserved,
                        nvml_used_bytes=pm.nvml_used, decode_mode=mode, decode_note=note,
                        **self._totals(run, case, pm, None, 1), **energy,
                        **(self._shared(watch.window, retries) if not gpu else {}),
                        **case_rates(run.cfg, spec, "decode", case.b, case.c, st["median_s"], self.ceilings))
        if not finite:
            row.update(status="invalid", error="non-finite logits")
        return row

    @torch.no_grad()
    def _tracked_step(self, run: _ModelRun, case: _Case, mark: dict) -> dict:
        """One untimed decode step at the case's depth under the live-tensor tracker (CPU): the decode
        phase's tracked total. (The timed steps may run the decode kernel or a compiled graph; this is the
        eager step, whose working set is the larger.)"""
        t0 = time.perf_counter()
        case.cache.rewind(mark)
        with LiveTensorBytes() as tr:
            run.model(case.ids[:, case.c : case.c + 1], case.cache, logits="last")
        return {"peak_total_bytes": run.base["weights_bytes"] + case.cache_bytes + tr.peak,
                "peak_total_source": "tracked", "memory_s": round(time.perf_counter() - t0, 4)}

    def _totals(self, run: _ModelRun, case: _Case, pm, tracked: int | None, tokens: int) -> dict:
        """A phase's total peak memory (weights + cache + working set) and memory-report's prediction of
        it. Of record: on a GPU the allocator's peak; on a CPU the live-tensor tracker's (the RSS peak
        counts the allocator's and the runtime's own memory too, and stays in peak_bytes beside it)."""
        weights = run.base["weights_bytes"]
        pred = predicted_total(run.model.cfg, self.spec.dtype, case.b, case.c + self.spec.gen, tokens, weights)
        if self.device.type == "cuda":
            total, source = pm.peak, "cuda_allocated"
        else:
            total = None if tracked is None else weights + case.cache_bytes + tracked
            source = "tracked" if tracked is not None else None
        return {"peak_total_bytes": total, "peak_total_source": source, "predicted_total_bytes": int(pred)}
