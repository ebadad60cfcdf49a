"""`granite memory-report`: what each model needs, predicted (and traced / measured), with budgets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from granite_cli.commands.common import Format, FormatOpt, emit_rows, say


def memory_report(
    model: Annotated[Optional[list[str]],
                     typer.Option("--model", "-m", metavar="MODEL",
                                  help="Profile, config.json, checkpoint folder or Hub id (repeatable). "
                                       "Default: the family and the baselines.")] = None,
    ctx: Annotated[str, typer.Option(help="Contexts: 4k,32k,128k or a range 4k-128k*2.")] = "4k,32k,128k",
    batch: Annotated[str, typer.Option(help="Batch sizes (concurrent sequences): 1,8 or 1-8*2.")] = "1,8",
    weights: Annotated[str, typer.Option(help="Weight format: bf16, fp16, fp32, fp8, int8, q8_0, q4_0.")] = "bf16",
    kv: Annotated[str,
                  typer.Option(help="KV cache dtype (and Mamba conv state): bf16, fp16, fp32, fp8, int8.")] = "bf16",
    state: Annotated[str, typer.Option(
        help="Mamba SSM state dtype: fp32 (llama.cpp, our core) or bf16 (vLLM default).")] = "fp32",
    ubatch: Annotated[int,
                      typer.Option(help="Prefill piece (tokens per forward) for the activation working set.")] = 4096,
    trace: Annotated[bool, typer.Option(
        help="Also run the core's forward on the meta device and report its own peak.")] = False,
    measure: Annotated[bool, typer.Option(
        help="Also run real forwards (CPU: what fits in RAM; CUDA: allocator peaks).")] = False,
    device: Annotated[str, typer.Option(help="Device for --measure: cpu or cuda.")] = "cpu",
    budget: Annotated[Optional[str],
                      typer.Option(help="Exit 3 if any row's total exceeds this, e.g. 10GiB or 24GB.")] = None,
    out: Annotated[Optional[Path],
                   typer.Option(help="Write report.md, report.json and plots into this folder.")] = None,
    tp: Annotated[int, typer.Option(
        help="Tensor-parallel GPUs: every row is then one GPU's share, sharded as vLLM shards (attention and KV "
             "heads, Mamba heads and state, expert and MLP widths, vocabulary split; see docs/sharding.md).")] = 1,
    gpus: Annotated[int, typer.Option(help="GPUs per node for the sessions-per-node table (1 to this many).")] = 8,
    gpu_mem: Annotated[str, typer.Option(help="Memory of one GPU for the sessions-per-node table.")] = "80GB",
    fmt: FormatOpt = Format.table,
) -> None:
    """Weights, KV cache, Mamba state and activations per model, context and batch; capacity; IBM's claims.

    Examples: granite memory-report;  granite memory-report -m granite-4.0-h-tiny --ctx 128k --batch 4 --budget 24GB;
    granite memory-report -m granite-4.0-h-small --ctx 128k --batch 32 --tp 4 --budget 80GB  (per GPU)
    """
    from granite_cli.memory import report as R
    from granite_cli.render import human_bytes

    outcome = R.run_report(model, ctx, batch, weights=weights, kv=kv, state=state, ubatch=ubatch, trace=trace,
                           measure=measure, device=device, out=out, budget=budget, tp=tp, gpus=gpus,
                           gpu_mem=gpu_mem, say=say)
    rep = outcome.report
    cols = ["model", *(["tp"] if tp > 1 else []), "ctx", "batch", "weights_bytes", "kv_bytes", "state_bytes",
            "activation_bytes", "total_bytes"]
    cols += [c for c in ("traced_total_bytes", "measured_total_bytes") if any(c in r for r in rep["rows"])]
    hb = lambda v: human_bytes(v) if isinstance(v, (int, float)) else ""  # noqa: E731
    emit_rows(rep["rows"], fmt, columns=cols,
              headers={c: c.replace("_bytes", "") for c in cols}, json_obj=rep,
              formatters={c: hb for c in cols if c.endswith("bytes")})
    if fmt is Format.table:
        say("claims:")
        for c in rep["claims"]:
            say(f"  {c['claim']}: {c['verdict']}")
    outcome.raise_for_budget()
    if outcome.budget_bytes is not None:
        say(f"all {len(rep['rows'])} case(s) within the {human_bytes(outcome.budget_bytes)} budget")
