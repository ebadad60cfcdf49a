"""memory-report: rows (predicted, and optionally traced / measured), capacity, claims, report files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from granite_cli.config import load_config
from granite_cli.errors import InputError
from granite_cli.fsutil import report_dir
from granite_cli.memory.claims import all_claims, max_batch, max_context
from granite_cli.memory.predict import activation_bytes, kv_state_crossover, norm_dtype, predict, weight_bytes
from granite_cli.memory.shard import MAX_TP, rank_config
from granite_cli.render import human_bytes, json_safe, to_markdown

DEFAULT_MODELS = [
    "granite-4.0-h-small", "granite-4.0-h-tiny", "granite-4.0-h-micro", "granite-4.0-micro", "granite-4.0-h-1b",
    "granite-4.0-h-350m", "granite-4.0-1b", "granite-4.0-350m", "granite-3.3-8b", "llama-3.1-8b", "llama-3.2-3b",
    "qwen3-4b", "qwen3-8b", "qwen3-30b-a3b", "qwen3-32b",
]
GPU_SIZES_GB = [24, 48, 80, 141]

# What a report folder may hold of granite's (fsutil checks an existing --out against it up front).
REPORT_FILES = ("report.md", "report.json", "*.png")

def rows_for(models, ctxs, batches, weights="bf16", kv="bf16", state="fp32", ubatch=4096, tp: int = 1) -> list[dict]:
    """One row per model, context and batch; with tp > 1 every byte count is one GPU's of `tp`."""
    for d in (weights, kv, state):
        norm_dtype(d)
    out = []
    for m in models:
        full = load_config(m)
        cfg = rank_config(full, tp)
        for c in ctxs:
            for b in batches:
                p = predict(cfg, c, b, weights, kv, state, ubatch)
                out.append({
                    "model": full.name, "kind": "hybrid" if cfg.is_hybrid else "dense", "ctx": c, "batch": b, "tp": tp,
                    "weights_dtype": weights, "kv_dtype": kv, "state_dtype": state,
                    "weights_bytes": p.weights_bytes, "kv_bytes": p.kv_bytes, "state_bytes": p.state_bytes,
                    "activation_bytes": p.activation_bytes, "total_bytes": p.total_bytes,
                    "decode_activation_bytes": activation_bytes(cfg, 1, b, kv),
                })
    return out


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


def capacity(models, ctxs, gpu_gb=GPU_SIZES_GB, weights="bf16", kv="bf16", state="fp32") -> list[dict]:
    out = []
    for m in models:
        cfg = load_config(m)
        for gb in gpu_gb:
            mem = gb * 1e9
            out.append({
                "model": cfg.name, "gpu_gb": gb,
                **{f"max_batch@{c // 1024}k": max_batch(cfg, mem, c, weights, kv, state) for c in ctxs},
                "max_ctx@b1": max_context(cfg, mem, 1, weights, kv, state),
                "max_ctx@b8": max_context(cfg, mem, 8, weights, kv, state),
            })
    return out


def node_capacity(models, ctxs, gpus: int = 8, gpu_bytes: float = 80e9, weights="bf16", kv="bf16",
                  state="fp32") -> list[dict]:
    """Sessions per node of 1..`gpus` GPUs of `gpu_bytes` each: for each GPU count, the best split into
    tensor-parallel groups (tp dividing the count and the model) times the sessions one group holds."""
    out = []
    for m in models:
        full = load_config(m)
        for n in range(1, gpus + 1):
            best = None
            for tp in (t for t in range(1, n + 1) if n % t == 0):
                try:
                    cfg = rank_config(full, tp)
                except InputError:
                    continue
                per = {c: n // tp * max_batch(cfg, gpu_bytes, c, weights, kv, state) for c in ctxs}
                if best is None or per[max(ctxs)] > best[1][max(ctxs)]:
                    best = (tp, per)
            if best:
                out.append({"model": full.name, "gpus": n, "tp": best[0],
                            **{f"sessions@{c // 1024}k": v for c, v in best[1].items()}})
    return out


def crossovers(models, kv="bf16", state="fp32") -> list[dict]:
    out = []
    for m in models:
        cfg = load_config(m)
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


def full_report(models, ctxs, batches, weights, kv, state, ubatch, tp: int = 1, gpus: int = 8,
                gpu_bytes: float = 80e9) -> dict:
    rows = rows_for(models, ctxs, batches, weights, kv, state, ubatch, tp)
    long = [c for c in ctxs if c >= 4096] or ctxs
    return {
        "schema_version": 1, "rows": rows, "claims": all_claims(),
        "capacity": capacity(models, long, weights=weights, kv=kv, state=state),
        "node_capacity": node_capacity(models, long, gpus, gpu_bytes, weights, kv, state),
        "gpu_bytes": gpu_bytes,
        "crossover": crossovers(models, kv, state),
        "weights": [{"model": c.name, **weight_bytes(c, weights)} for c in map(load_config, models)],
    }


def run_report(models: list[str] | None, ctx: str, batch: str, *, weights: str = "bf16", kv: str = "bf16",
               state: str = "fp32", ubatch: int = 4096, trace: bool = False, measure: bool = False,
               device: str = "cpu", out: Path | None = None, budget: str | None = None, tp: int = 1, gpus: int = 8,
               gpu_mem: str = "80GB", say=lambda msg: None) -> "Outcome":
    """What `granite memory-report` runs: the options checked before any work (an --out holding files
    granite did not write is refused up front), the predicted report, optionally traced and measured
    rows, the report folder. Rows over `budget` are returned, not raised, so the caller shows the table
    before Outcome.raise_for_budget fails the job (exit 3)."""
    from granite_cli.fsutil import check_report_dir
    from granite_cli.render import parse_bytes
    from granite_cli.sizes import parse_list

    models = models or DEFAULT_MODELS
    ctxs, batches = parse_list(ctx, "context"), parse_list(batch, "batch")
    if ubatch < 1:
        raise InputError("--ubatch must be at least 1")
    limit = parse_bytes(budget) if budget is not None else None
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device must be cpu or cuda, got {device!r}")
    if not 1 <= gpus <= MAX_TP:
        raise InputError(f"--gpus must be between 1 and {MAX_TP}, got {gpus}")
    if tp > 1 and (trace or measure):
        raise InputError("--trace and --measure run one device; use them without --tp")
    gpu_bytes = parse_bytes(gpu_mem)
    if out:
        check_report_dir(out, REPORT_FILES)
    rep = full_report(models, ctxs, batches, weights, kv, state, ubatch, tp, gpus, gpu_bytes)
    if trace:
        say(f"tracing {len(rep['rows'])} case(s) on the meta device ...")
        add_traced(rep["rows"], ubatch)
    if measure:
        say(f"measuring {len(rep['rows'])} case(s) on {device} ...")
        add_measured(rep["rows"], ubatch, device)
    if out:
        write_report_dir(out, rep)
        say(f"report written to {Path(out) / 'report.md'}")
    return Outcome(rep, limit, budget_failures(rep["rows"], limit) if limit is not None else [])


@dataclass
class Outcome:
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
    keys = [k for k in cap[0] if k.startswith("max_batch@")] if cap else []
    if keys:
        fig, axes = plt.subplots(1, len(GPU_SIZES_GB), figsize=(14, 4), sharey=True)
        for ax, gb in zip(axes, GPU_SIZES_GB):
            for m in dict.fromkeys(c["model"] for c in cap):
                c = next(x for x in cap if x["model"] == m and x["gpu_gb"] == gb)
                xs = [int(k.split("@")[1][:-1]) * 1024 for k in keys]
                ys = [max(c[k], 0.5) for k in keys]
                ax.plot(xs, ys, "o-", lw=1, ms=3, label=m)
            ax.set(xscale="log", yscale="log", title=f"{gb} GB", xlabel="context")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("max concurrent sequences (bf16)")
        axes[-1].legend(fontsize=5)
        fig.tight_layout()
        fig.savefig(out / "capacity.png", dpi=110)
        plt.close(fig)
        made.append("capacity")
    return made


def write_report_dir(out_dir: Path, report: dict) -> Path:
    out_dir = Path(out_dir)
    with report_dir(out_dir, REPORT_FILES) as tmp:
        plots = _plots(report, tmp)
        tp = any(r.get("tp", 1) > 1 for r in report["rows"])
        cols = ["model", *(["tp"] if tp else []), "ctx", "batch", "weights_bytes", "kv_bytes", "state_bytes",
                "activation_bytes", "total_bytes"]
        extra = [c for c in ("traced_total_bytes", "measured_total_bytes", "measured_rss_peak_delta_bytes")
                 if any(c in r for r in report["rows"])]
        fmt = [{k: (human_bytes(v) if k.endswith("bytes") and isinstance(v, (int, float)) else v) for k, v in r.items()}
               for r in report["rows"]]
        lines = ["# granite memory-report", "",
                 "Predicted from each model's config (weights by dtype; KV for attention layers only; Mamba conv + SSM "
                 "state per sequence, constant in context; the working set of a 4096-token prefill piece). "
                 "Sizes in binary units.", "",
                 "## IBM's claims", "",
                 "ratio: ours / IBM's figure (E1b); the smallest memory reduction over the grid, hybrid vs dense "
                 "(70%); the smallest comparable/Micro memory ratio where the conditions hold (E6).", "",
                 to_markdown(report["claims"], ["claim", "conditions", "ratio", "reduction_range", "verdict"]),
                 "## Where a hybrid's KV cache overtakes its Mamba state", "", to_markdown(report["crossover"]),
                 "## Capacity: most concurrent sequences that fit (bf16 weights and KV, fp32 state)", "",
                 to_markdown(report["capacity"]),
                 f"## Sessions per node ({human_bytes(report['gpu_bytes'])} GPUs, tensor parallel as vLLM shards; "
                 "docs/sharding.md)", "",
                 "For each GPU count, the tensor-parallel size (tp) that holds the most sessions at the longest "
                 "context, times the groups of that size the node holds.", "",
                 to_markdown(report["node_capacity"]), "## Memory by model, context and batch", "",
                 to_markdown(fmt, cols + extra)]
        for p in plots:
            lines += [f"![{p}]({p}.png)", ""]
        (tmp / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(json_safe(report), indent=1) + "\n", encoding="utf-8")
    return out_dir
