"""`granite memory-report`: what each model needs, predicted (and traced / measured), with budgets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from granite_cli.commands.common import Format, FormatOpt, emit_rows, say
from granite_cli.commands.common import out as out_text

ModelOpt = Annotated[Optional[list[str]], typer.Option(
    "--model", "-m", metavar="MODEL",
    help="Profile, config.json, checkpoint folder, .gguf file or Hub id (repeatable). A folder's or GGUF's weights are "
         "sized from its files; a config's quantization_config is honoured. Default: the family and the baselines.")]
WeightsOpt = Annotated[str, typer.Option(
    help="Weight format where the checkpoint does not say: bf16, fp16, fp32, fp8, int8, q8_0, q4_0.")]
KvOpt = Annotated[str, typer.Option(
    help="KV cache dtype: bf16, fp16, fp32, fp8, int8 (llama.cpp: f16, q8_0, q4_0, ... as -ctk/-ctv).")]
StateOpt = Annotated[Optional[str], typer.Option(
    help="Mamba SSM state dtype. Default: the engine's (vLLM: the model dtype, bf16; llama.cpp and none: fp32).")]
EngineOpt = Annotated[str, typer.Option(
    help="How sessions per GPU are counted: vllm (its paged block allocator, version 0.33), llama.cpp (its slots) or "
         "none (granite's memory model).")]
GpuOpt = Annotated[Optional[str], typer.Option(
    "--gpu", "--gpu-mem",
    help="The GPU: h100-80gb (default), h100-nvl, h200, a100-80gb, a100-40gb, l40s, l4, a10, t4, rtx-4090, or a size "
         "such as 80GiB. Presets carry the memory the driver reports.")]
KvBudgetOpt = Annotated[Optional[str], typer.Option(
    help="The KV cache memory vLLM logs as 'Available KV cache memory' (e.g. 40GiB): replaces granite's estimate of "
         "the weights, activation peak, CUDA graphs and context.")]
MaxSeqsOpt = Annotated[Optional[int], typer.Option(
    help="vLLM's --max-num-seqs (default: vLLM's for the GPU, 1024 on H100/H200, 256 on smaller GPUs).")]
MaxTokensOpt = Annotated[Optional[int], typer.Option(
    help="vLLM's --max-num-batched-tokens (its profile run's size; default: vLLM's for the GPU).")]
PrefixOpt = Annotated[bool, typer.Option(
    "--prefix-caching", help="vLLM with --enable-prefix-caching: 3 Mamba blocks per request instead of 1.")]
TpOpt = Annotated[int, typer.Option(
    help="Tensor-parallel GPUs: every row is then one GPU's share, sharded as vLLM shards (attention and KV heads, "
         "Mamba heads and state, expert and MLP widths, vocabulary split; see docs/sharding.md).")]


def memory_report(
    model: ModelOpt = None,
    ctx: Annotated[str, typer.Option(help="Contexts: 4k,32k,128k or a range 4k-128k*2.")] = "4k,32k,128k",
    batch: Annotated[str, typer.Option(help="Batch sizes (concurrent sequences): 1,8 or 1-8*2.")] = "1,8",
    weights: WeightsOpt = "bf16",
    kv: KvOpt = "bf16",
    state: StateOpt = None,
    ubatch: Annotated[int,
                      typer.Option(help="Prefill piece (tokens per forward) for the activation working set.")] = 4096,
    engine: EngineOpt = "vllm",
    gpu: GpuOpt = None,
    gpu_util: Annotated[float, typer.Option(help="vLLM's --gpu-memory-utilization.")] = 0.9,
    kv_budget: KvBudgetOpt = None,
    max_num_seqs: MaxSeqsOpt = None,
    max_num_batched_tokens: MaxTokensOpt = None,
    block_size: Annotated[Optional[int], typer.Option(help="vLLM's --block-size (a multiple of 16).")] = None,
    prefix_caching: PrefixOpt = False,
    trace: Annotated[bool, typer.Option(
        help="Also run the core's forward on the meta device and report its own peak.")] = False,
    measure: Annotated[bool, typer.Option(
        help="Also run real forwards (CPU: what fits in RAM; CUDA: allocator peaks).")] = False,
    device: Annotated[str, typer.Option(help="Device for --measure: cpu or cuda.")] = "cpu",
    budget: Annotated[Optional[str],
                      typer.Option(help="Exit 3 if any row's total exceeds this, e.g. 10GiB or 24GB.")] = None,
    out: Annotated[Optional[Path],
                   typer.Option(help="Write report.md, report.json and plots into this folder.")] = None,
    tp: TpOpt = 1,
    gpus: Annotated[int, typer.Option(help="GPUs per node for the sessions-per-node table (1 to this many).")] = 8,
    fmt: FormatOpt = Format.table,
) -> None:
    """Weights, KV cache, Mamba state and activations per model, context and batch; sessions per GPU as an
    engine counts them; IBM's claims.

    Examples: granite memory-report;  granite memory-report -m granite-4.0-h-tiny --ctx 128k --batch 4 --budget 24GB;
    granite memory-report -m granite-4.0-h-small --ctx 4k,32k --gpu h100-80gb --kv-budget 40GiB -f json;
    granite memory-report -m model.gguf --engine llama.cpp --kv q8_0 --gpu l4
    """
    from granite_cli.memory import report as R
    from granite_cli.memory.engines import VllmSettings
    from granite_cli.render import human_bytes, parse_bytes

    vllm = VllmSettings(gpu_util, max_num_seqs, max_num_batched_tokens, block_size, prefix_caching,
                        int(parse_bytes(kv_budget, "--kv-budget")) if kv_budget is not None else None)
    opts = R.MemoryOptions(model, ctx, batch, weights, kv, state, ubatch, trace, measure, device, budget, tp, gpus,
                           gpu, engine, vllm)
    outcome = R.run_report(opts, out=out, say=say)
    _show(outcome.report, fmt, tp)
    outcome.raise_for_budget()
    if outcome.budget_bytes is not None:
        say(f"all {len(outcome.report['rows'])} case(s) within the {human_bytes(outcome.budget_bytes)} budget")


def _show(rep: dict, fmt: Format, tp: int) -> None:
    """The rows, then (table, md) the capacity table; each headed by the engine, GPU and dtypes."""
    from granite_cli.render import human_bytes

    cols = ["model", *(["tp"] if tp > 1 else []), "ctx", "batch", "weights_bytes", "kv_bytes", "state_bytes",
            "activation_bytes", "total_bytes", "sessions_per_gpu"]
    cols += [c for c in ("traced_total_bytes", "measured_total_bytes") if any(c in r for r in rep["rows"])]
    hb = lambda v: human_bytes(v) if isinstance(v, (int, float)) else ""  # noqa: E731
    headers = {c: c.replace("_bytes", "") for c in cols}
    headers["sessions_per_gpu"] = f"sessions/GPU ({rep['engine']})"
    if fmt is Format.md:
        out_text(f"Memory per case; sessions per GPU as {rep['deployment']}:\n")
    emit_rows(rep["rows"], fmt, columns=cols, headers=headers, json_obj=rep,
              formatters={c: hb for c in cols if c.endswith("bytes")},
              title=f"memory per case; sessions per GPU as {rep['deployment']}" if fmt is Format.table else None)
    if fmt in (Format.table, Format.md):
        cap_cols = [c for c in (rep["capacity"][0] if rep["capacity"] else {}) if c != "gpu_bytes"]
        if fmt is Format.md:
            out_text(f"\nSessions per GPU, as {rep['capacity_deployment']}:\n")
        emit_rows(rep["capacity"], fmt, columns=cap_cols,
                  title=f"sessions per GPU ({rep['engine']})" if fmt is Format.table else None)
    if fmt is Format.table:
        if rep["claims"]:
            say("claims:")
        for c in rep["claims"]:
            say(f"  {c['claim']}: {c['verdict']}")
