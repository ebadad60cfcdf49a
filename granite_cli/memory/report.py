"""memory-report: rows (predicted, and optionally traced / measured), capacity, claims, report files."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from granite_cli.config import load_config
from granite_cli.errors import InputError
from granite_cli.fsutil import report_dir
from granite_cli.memory import engines as E
from granite_cli.memory.capacity import Deployment, Sized, check_dtypes, max_context, sessions
from granite_cli.memory.claims import claims_for
from granite_cli.memory.engines import VllmSettings, check_engine
from granite_cli.memory.gpus import DEFAULT_GPU, GPU, GPUS, REPORT_GPUS, parse_gpu
from granite_cli.memory.predict import activation_bytes, kv_state_crossover, predict, weight_bytes
from granite_cli.memory.shard import MAX_TP, rank_config
from granite_cli.render import human_bytes, json_safe, to_markdown

DEFAULT_MODELS = [
    "granite-4.0-h-small", "granite-4.0-h-tiny", "granite-4.0-h-micro", "granite-4.0-micro", "granite-4.0-h-1b",
    "granite-4.0-h-350m", "granite-4.0-1b", "granite-4.0-350m", "granite-3.3-8b", "llama-3.1-8b", "llama-3.2-3b",
    "qwen3-4b", "qwen3-8b", "qwen3-30b-a3b", "qwen3-32b",
]

# What a report folder may hold of granite's (fsutil checks an existing --out against it up front).
REPORT_FILES = ("report.md", "report.json", "*.png")

def rows_for(sized: list[Sized], ctxs, batches, d: Deployment) -> list[dict]:
    """One row per model, context and batch, by granite's memory model; with d.tp > 1 every byte count
    is one GPU's of `tp`. Each row also says how many sessions of its context one GPU serves, as the
    deployment's engine counts them (vLLM's own figures under `vllm`)."""
    check_dtypes(d)
    out = []
    for m in sized:
        cfg = rank_config(m.cfg, d.tp)
        w = m.weights_bytes(d.weights, d.tp)
        for c in ctxs:
            cap = sessions(m, d, c)
            for b in batches:
                p = predict(cfg, c, b, d.weights, d.kv, d.state_dtype, d.ubatch)
                total = w + p.kv_bytes + p.state_bytes + p.activation_bytes
                row = {
                    "model": m.cfg.name, "kind": "hybrid" if cfg.is_hybrid else "dense", "ctx": c, "batch": b,
                    "tp": d.tp, "weights_dtype": m.weights_label(d.weights), "kv_dtype": d.kv,
                    "state_dtype": d.state_dtype, "weights_bytes": int(w), "kv_bytes": int(p.kv_bytes),
                    "state_bytes": int(p.state_bytes), "activation_bytes": int(p.activation_bytes),
                    "total_bytes": int(total), "decode_activation_bytes": int(activation_bytes(cfg, 1, b, d.kv)),
                    "engine": d.engine, "gpu": d.gpu.name, "sessions_per_gpu": cap.get("sessions", 0),
                }
                if d.engine == "vllm":
                    row["vllm"] = {k: cap.get(k) for k in VLLM_FIELDS}
                out.append(row)
    return out


# What a row records of vLLM's own figures (the JSON's `vllm` object).
VLLM_FIELDS = ("attention_block_size", "per_request_bytes", "max_concurrency", "kv_cache_tokens", "available_kv_bytes",
               "num_blocks", "blocks_per_request", "bytes_per_block", "kv_groups", "group_size", "max_num_seqs",
               "max_num_batched_tokens", "limited_by", "refused", "log")


def _compute_dtype(name: str, fallback: str):
    """The torch dtype the core computes in for a row's dtype name; `fallback` for fp8, int8 and q8_0
    (weights the core does not run: traced at the fallback's width)."""
    from granite_cli.checkpoint.dtypes import is_float_name, parse_dtype

    return parse_dtype(name if is_float_name(name) else fallback)


def add_traced(rows: list[dict], ubatch: int) -> None:
    from granite_cli.memory.trace import traced

    for r in rows:
        t = traced(load_config(r["model"]), r["ctx"], r["batch"], _compute_dtype(r["weights_dtype"], "bf16"), ubatch,
                   _compute_dtype(r["state_dtype"], "fp32"))
        r["traced_activation_bytes"] = t["prefill_activation_bytes"]
        r["traced_decode_activation_bytes"] = t["decode_activation_bytes"]
        r["traced_cache_bytes"] = t["cache_bytes"]
        r["traced_total_bytes"] = t["weights_bytes"] + t["cache_bytes"] + t["prefill_activation_bytes"]
        r["traced_vs_predicted"] = r["traced_total_bytes"] / r["total_bytes"] - 1


def add_measured(rows: list[dict], ubatch: int, device: str) -> None:
    """Real forward passes: CPU (tracked live tensors + RSS) for what fits in RAM; CUDA allocator peaks on a GPU."""
    import psutil
    import torch

    from granite_cli.checkpoint.dtypes import is_float_name
    from granite_cli.memory.trace import measured_cpu

    if device == "cuda":
        avail, where = torch.cuda.mem_get_info()[1] * 0.9, "this GPU"
    else:
        avail, where = 0.5 * psutil.virtual_memory().available, "this machine"
    for r in rows:
        runs = is_float_name(r["weights_dtype"])
        if r["total_bytes"] > avail or not runs:
            r["measured_status"] = (f"skipped: too large for {where}" if runs
                                    else f"skipped: {r['weights_dtype']} weights are not run by the core")
            continue
        cfg = load_config(r["model"])
        try:
            if device == "cuda":
                m = _measured_cuda(cfg, r, _compute_dtype(r["weights_dtype"], "bf16"), ubatch)
            else:
                m = measured_cpu(cfg, r["ctx"], r["batch"], _compute_dtype(r["weights_dtype"], "bf16"), ubatch)
        except (torch.OutOfMemoryError, MemoryError) as e:
            r["measured_status"] = f"oom: {str(e).splitlines()[0][:160]}"
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        r["measured_status"] = "ok"
        r["measured_activation_bytes"] = m["prefill_activation_bytes"]
        r["measured_total_bytes"] = m["weights_bytes"] + m["cache_bytes"] + m["prefill_activation_bytes"]
        r["measured_rss_peak_delta_bytes"] = m.get("rss_peak_delta_bytes")
        r["measured_cuda_max_allocated_bytes"] = m.get("cuda_max_allocated_bytes")
        r["measured_cuda_max_reserved_bytes"] = m.get("cuda_max_reserved_bytes")
        r["measured_nvml_used_bytes"] = m.get("nvml_used_bytes")
        r["measured_vs_predicted"] = r["measured_total_bytes"] / r["total_bytes"] - 1


def _measured_cuda(cfg, r, dtype, ubatch) -> dict:
    import torch

    from granite_cli.measure import PeakMemory
    from granite_cli.memory.trace import run_forward
    from granite_cli.model.loading import load_model

    model = load_model(cfg, weights="random", dtype=dtype, device="cuda")
    with PeakMemory("cuda") as pm:
        res = run_forward(model, r["ctx"], r["batch"], ubatch, torch.device("cuda"))
    res["cuda_max_allocated_bytes"] = pm.peak
    res["cuda_max_reserved_bytes"] = pm.reserved
    res["nvml_used_bytes"] = pm.nvml_used
    del model
    torch.cuda.empty_cache()
    return res


def capacity(sized: list[Sized], ctxs, gpus: list[GPU], d: Deployment) -> list[dict]:
    """Sessions per GPU at each context, for each GPU, as the deployment's engine counts them; and the
    longest context one session and eight sessions reach (at most the model's limit)."""
    out = []
    for m in sized:
        for g in gpus:
            dg = dataclasses.replace(d, gpu=g)
            row = {"model": m.cfg.name, "gpu": g.name, "gpu_bytes": g.total_bytes, "engine": d.engine, "tp": d.tp}
            for c in ctxs:
                row[f"sessions@{_k(c)}"] = sessions(m, dg, c).get("sessions", 0)
            row["max_ctx@1"] = max_context(m, dg, 1)
            row["max_ctx@8"] = max_context(m, dg, 8)
            row["model_limit"] = m.cfg.max_position_embeddings
            out.append(row)
    return out


def _k(c: int) -> str:
    return f"{c // 1024}k" if c % 1024 == 0 else str(c)


def node_capacity(sized: list[Sized], ctxs, gpus: int, d: Deployment) -> list[dict]:
    """Sessions per node of 1..`gpus` GPUs of d.gpu: for each GPU count, the best split into
    tensor-parallel groups (tp dividing the count and the model) times the sessions one group holds,
    as the engine counts them (llama.cpp: tp 1, one server per GPU)."""
    out = []
    for m in sized:
        for n in range(1, gpus + 1):
            best = None
            for tp in (t for t in range(1, n + 1) if n % t == 0):
                if d.engine == "llama.cpp" and tp > 1:
                    continue
                try:
                    rank_config(m.cfg, tp)
                except InputError:
                    continue
                dt = dataclasses.replace(d, tp=tp)
                per = {c: n // tp * sessions(m, dt, c).get("sessions", 0) for c in ctxs}
                if best is None or per[max(ctxs)] > best[1][max(ctxs)]:
                    best = (tp, per)
            if best:
                out.append({"model": m.cfg.name, "gpus": n, "tp": best[0],
                            **{f"sessions@{_k(c)}": v for c, v in best[1].items()}})
    return out


def crossovers(cfgs, kv="bf16", state="fp32") -> list[dict]:
    out = []
    for cfg in cfgs:
        x = kv_state_crossover(cfg, kv, state)
        if x is not None:
            out.append({"model": cfg.name, "kv_equals_state_at_ctx": round(x), "kv_dtype": kv, "state_dtype": state})
    return out


def budget_failures(rows: list[dict], budget: float) -> list[str]:
    fails = []
    for r in rows:
        if r["total_bytes"] > budget:
            per = f" per GPU of {r['tp']}" if r.get("tp", 1) > 1 else ""
            fails.append(f"{r['model']} at ctx {r['ctx']} x batch {r['batch']} needs "
                         f"{human_bytes(r['total_bytes'])}{per}, {human_bytes(r['total_bytes'] - budget)} over the "
                         f"{human_bytes(budget)} budget")
    return fails


def full_report(o: "MemoryOptions", sized: list[Sized], ctxs: list[int], batches: list[int], d: Deployment) -> dict:
    rows = rows_for(sized, ctxs, batches, d)
    long = [c for c in ctxs if c >= 4096] or ctxs
    # a KV budget is what vLLM logged on one GPU: it says nothing of another GPU's capacity
    one = o.gpu is not None or d.vllm.kv_budget is not None
    gpus = [d.gpu] if one else [GPUS[g] for g in REPORT_GPUS]
    return {
        "schema_version": 2, "rows": rows, "deployment": d.describe(), "engine": d.engine,
        "capacity_deployment": d.describe(gpu=len(gpus) == 1),
        "claims": claims_for([m.cfg.name for m in sized]),
        "capacity": capacity(sized, long, gpus, d),
        "node_capacity": node_capacity(sized, long, o.gpus, d),
        "gpu": d.gpu.name, "gpu_bytes": d.gpu.total_bytes,
        "crossover": crossovers([m.cfg for m in sized], d.kv, d.state_dtype),
        "weights": [{"model": m.cfg.name, "stored_as": m.weights_label(d.weights),
                     **{k: int(v) for k, v in weight_bytes(m.cfg, d.weights).items()},
                     **({"stored_bytes": int(m.stored.bytes)} if m.stored else {})} for m in sized],
    }


@dataclass
class MemoryOptions:
    """Everything `granite memory-report` takes (the CLI fills it; defaults are the command's)."""

    models: list[str] | None = None
    ctx: str = "4k,32k,128k"
    batch: str = "1,8"
    weights: str = "bf16"
    kv: str = "bf16"
    state: str | None = None
    ubatch: int = 4096
    trace: bool = False
    measure: bool = False
    device: str = "cpu"
    budget: str | None = None
    tp: int = 1
    gpus: int = 8
    gpu: str | None = None              # a preset or a size; None: h100-80gb for rows, the report's GPUs for capacity
    engine: str = "vllm"
    vllm: VllmSettings = dataclasses.field(default_factory=VllmSettings)


def run_report(o: MemoryOptions, out: Path | None = None, say=lambda msg: None) -> "ReportOutcome":
    """What `granite memory-report` runs: the options checked before any work (an --out holding files
    granite did not write is refused up front), the predicted report with sessions per GPU as the
    engine counts them, optionally traced and measured rows, the report folder. Rows over the budget
    are returned, not raised, so the caller shows the table before ReportOutcome.raise_for_budget fails the
    job (exit 3)."""
    from granite_cli.fsutil import check_report_dir
    from granite_cli.paths import check_output_paths
    from granite_cli.render import parse_bytes
    from granite_cli.sizes import parse_list

    ctxs, batches = parse_list(o.ctx, "context"), parse_list(o.batch, "batch")
    if o.ubatch < 1:
        raise InputError("--ubatch must be at least 1")
    limit = parse_bytes(o.budget, "--budget") if o.budget is not None else None
    if o.device not in ("cpu", "cuda"):
        raise InputError(f"--device must be cpu or cuda, got {o.device!r}")
    if not 1 <= o.gpus <= MAX_TP:
        raise InputError(f"--gpus must be between 1 and {MAX_TP}, got {o.gpus}")
    if o.tp > 1 and (o.trace or o.measure):
        raise InputError("--trace and --measure run one device; use them without --tp")
    engine, gpu = check_engine(o.engine), parse_gpu(o.gpu or DEFAULT_GPU)
    d = Deployment(engine, gpu, o.tp, o.weights, o.kv, o.state, o.ubatch, o.vllm.check_for(engine, gpu.total_bytes))
    check_dtypes(d)
    if d.engine == "llama.cpp":
        E.cache_type(d.kv)
    if out:
        check_output_paths(out)
        check_report_dir(out, REPORT_FILES)
    sized = [Sized.of(m) for m in (o.models or DEFAULT_MODELS)]
    rep = full_report(o, sized, ctxs, batches, d)
    if o.trace:
        say(f"tracing {len(rep['rows'])} case(s) on the meta device ...")
        add_traced(rep["rows"], o.ubatch)
    if o.measure:
        say(f"measuring {len(rep['rows'])} case(s) on {o.device} ...")
        add_measured(rep["rows"], o.ubatch, o.device)
    if out:
        write_report_dir(out, rep)
        say(f"report written to {Path(out) / 'report.md'}")
    return ReportOutcome(rep, limit, budget_failures(rep["rows"], limit) if limit is not None else [])


@dataclass
class ReportOutcome:
    """A finished memory report, the budget it was held to (bytes, None for none) and the rows over it."""

    report: dict
    budget_bytes: float | None
    over_budget: list[str]

    def raise_for_budget(self) -> None:
        """CheckFailed (exit 3) naming the rows over the budget, if any."""
        from granite_cli.errors import CheckFailed

        fails = self.over_budget
        if fails:
            raise CheckFailed(f"{len(fails)} case(s) over budget: " + "; ".join(fails[:5]) +
                              (f"; and {len(fails) - 5} more" if len(fails) > 5 else ""))


def _plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    rows = report["rows"]
    b1 = min(r["batch"] for r in rows)
    fig, ax = plt.subplots(figsize=(8, 5))
    for m in dict.fromkeys(r["model"] for r in rows):
        rs = sorted((r for r in rows if r["model"] == m and r["batch"] == b1), key=lambda r: r["ctx"])
        ax.plot([r["ctx"] for r in rs], [r["total_bytes"] / 1e9 for r in rs],
                "o-" if rs[0]["kind"] == "hybrid" else "s--",
                label=m, lw=1.2, ms=3)
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel=f"total memory (GB), batch {b1}",
           title="Predicted memory vs context (hybrids solid, Transformers dashed)")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "memory_vs_context.png", dpi=110)
    plt.close(fig)
    made.append("memory_vs_context")

    cap = report["capacity"]
    keys = [k for k in cap[0] if k.startswith("sessions@")] if cap else []
    gpus = list(dict.fromkeys(c["gpu"] for c in cap))
    if keys:
        fig, axes = plt.subplots(1, len(gpus), figsize=(3.6 * len(gpus) + 1, 4), sharey=True, squeeze=False)
        for ax, g in zip(axes[0], gpus):
            for m in dict.fromkeys(c["model"] for c in cap):
                c = next(x for x in cap if x["model"] == m and x["gpu"] == g)
                xs = [int(k.split("@")[1][:-1]) * 1024 for k in keys]
                ys = [max(c[k], 0.5) for k in keys]
                ax.plot(xs, ys, "o-", lw=1, ms=3, label=m)
            ax.set(xscale="log", yscale="log", title=g, xlabel="context")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].set_ylabel(f"sessions per GPU ({report['engine']})")
        axes[0][-1].legend(fontsize=5)
        fig.tight_layout()
        fig.savefig(out / "capacity.png", dpi=110)
        plt.close(fig)
        made.append("capacity")
    return made


def write_report_dir(out_dir: Path, report: dict) -> Path:
    out_dir = Path(out_dir)
    with report_dir(out_dir, REPORT_FILES) as tmp:
        plots = _plots(report, tmp)
        (tmp / "report.md").write_text("\n".join(report_lines(report, plots)) + "\n", encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(json_safe(report), indent=1) + "\n", encoding="utf-8")
    return out_dir


def report_lines(report: dict, plots: list[str] = ()) -> list[str]:
    rows = report["rows"]
    tp = any(r.get("tp", 1) > 1 for r in rows)
    cols = ["model", *(["tp"] if tp else []), "ctx", "batch", "weights_bytes", "kv_bytes", "state_bytes",
            "activation_bytes", "total_bytes", "sessions_per_gpu"]
    extra = [c for c in ("traced_total_bytes", "measured_total_bytes", "measured_rss_peak_delta_bytes")
             if any(c in r for r in rows)]
    fmt = [{k: (human_bytes(v) if k.endswith("bytes") and isinstance(v, (int, float)) else v) for k, v in r.items()}
           for r in rows]
    r0 = rows[0] if rows else {}
    dtypes = f"weights {r0.get('weights_dtype')}, KV {r0.get('kv_dtype')}, Mamba state {r0.get('state_dtype')}"
    lines = ["# granite memory-report", "",
             f"Predicted from each model's config ({dtypes}; KV for attention layers only; Mamba conv + SSM state per "
             "sequence, constant in context; the working set of a prefill piece). Sizes in binary units. "
             f"sessions_per_gpu: as {report['deployment']}.", ""]
    if report["claims"]:
        lines += ["## IBM's claims", "",
                  "ratio: ours / IBM's figure (E1b); the smallest memory reduction over the grid, hybrid vs dense "
                  "(70%); the smallest comparable/Micro memory ratio where the conditions hold (E6).", "",
                  to_markdown(report["claims"], ["claim", "conditions", "ratio", "reduction_range", "verdict"])]
    cap_cols = [c for c in (report["capacity"][0] if report["capacity"] else {}) if c != "gpu_bytes"]
    lines += ["## Where a hybrid's KV cache overtakes its Mamba state", "", to_markdown(report["crossover"]),
              f"## Sessions per GPU, as the engine counts them: {report['capacity_deployment']}", "",
              "max_ctx@N: the longest context at which N sessions fit (at most the model's limit, model_limit).", "",
              to_markdown(report["capacity"], cap_cols),
              f"## Sessions per node ({report['gpu']}, {human_bytes(report['gpu_bytes'])} each; tensor parallel as "
              "vLLM shards, docs/sharding.md)", "",
              "For each GPU count, the tensor-parallel size (tp) that holds the most sessions at the longest "
              "context, times the groups of that size the node holds.", "",
              to_markdown(report["node_capacity"]), "## Memory by model, context and batch", "",
              to_markdown(fmt, cols + extra)]
    for p in plots:
        lines += [f"![{p}]({p}.png)", ""]
    return lines
