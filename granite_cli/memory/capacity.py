"""Sessions per GPU for a model, a GPU, a tensor-parallel size and a context, as an engine counts
them (memory.engines): vLLM's paged allocator, llama.cpp's slots, or granite's own memory model
("none": the weights, one prefill working set, and each session's KV cache and Mamba state).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from granite_cli.config import ModelConfig, load_config
from granite_cli.errors import InputError
from granite_cli.memory import engines as E
from granite_cli.memory.gpus import GPU
from granite_cli.memory.predict import activation_bytes, kv_bytes, norm_dtype, state_bytes, weight_bytes
from granite_cli.memory.shard import rank_config
from granite_cli.memory.weights import Weights, checkpoint_weights, hf_dict


@dataclass
class Sized:
    """A model as the report sizes it: its config, and its weights where the checkpoint says."""

    spec: str
    cfg: ModelConfig
    stored: Weights | None = None

    @classmethod
    def of(cls, spec: str) -> "Sized":
        from pathlib import Path

        p = Path(spec)
        if p.is_file() and p.suffix.lower() == ".gguf":  # any ggml types: only the shapes are needed
            from granite_cli.checkpoint.gguf import GGUFFile
            from granite_cli.checkpoint.gguf_map import config_from_gguf

            f = GGUFFile(p, layout_only=True)
            cfg = config_from_gguf(f.kv, f.tensors, str(p))[0]
        else:
            cfg = load_config(spec)
        return cls(spec, cfg, checkpoint_weights(spec, cfg, None if p.suffix.lower() == ".gguf" else hf_dict(spec)))

    def weights_bytes(self, dtype: str, tp: int) -> float:
        """One rank's weights: the stored ones scaled by the rank's share of the model (as sharded in
        `dtype`), or the model in `dtype`."""
        rank = rank_config(self.cfg, tp)
        mine = weight_bytes(rank, dtype)["total"]
        if self.stored is None:
            return mine
        return self.stored.bytes * (mine / weight_bytes(self.cfg, dtype)["total"] if tp > 1 else 1.0)

    def weights_label(self, dtype: str) -> str:
        return f"{self.stored.scheme} ({self.stored.source})" if self.stored else dtype


@dataclass
class Deployment:
    """What sessions per GPU depend on beside the model."""

    engine: str
    gpu: GPU
    tp: int = 1
    weights: str = "bf16"
    kv: str = "bf16"
    state: str | None = None        # None: the engine's own (vLLM: the model dtype; llama.cpp, none: fp32)
    ubatch: int = 4096
    vllm: E.VllmSettings = field(default_factory=E.VllmSettings)

    @property
    def state_dtype(self) -> str:
        return self.state or E.state_default(self.engine)

    def describe(self, gpu: bool = True) -> str:
        if self.engine == "vllm":
            v = self.vllm
            what = (f"vLLM {E.VLLM_VERSION}'s block allocator, gpu util {v.gpu_util:g}"
                    + (f", KV budget {E.gib(v.kv_budget)}" if v.kv_budget else "")
                    + (", prefix caching" if v.prefix_caching else ""))
        elif self.engine == "llama.cpp":
            what = "llama.cpp's slots"
        else:
            what = "granite's memory model (one prefill working set per GPU)"
        where = f"{self.gpu.label} ({E.gib(self.gpu.total_bytes)}), " if gpu else ""
        return f"{what}; {where}tp {self.tp}; weights {self.weights}, KV {self.kv}, Mamba state {self.state_dtype}"


def sessions(m: Sized, d: Deployment, ctx: int) -> dict:
    """How many sessions of `ctx` tokens one GPU (one rank of `d.tp`) serves, with the engine's own
    figures (vLLM: its block size, per-request bytes, logged concurrency and token capacity)."""
    rank = rank_config(m.cfg, d.tp)
    w = m.weights_bytes(d.weights, d.tp)
    if d.engine == "vllm":
        mnbt, mns = E.vllm_batch_defaults(d.gpu.total_bytes, d.gpu.label)
        mnbt = d.vllm.max_num_batched_tokens or mnbt
        mns = min(d.vllm.max_num_seqs or mns, mnbt)
        layout = E.vllm_layout(rank, d.kv, "bf16", d.state, d.vllm.block_size)
        if d.vllm.kv_budget is not None:
            reserve, available = {}, d.vllm.kv_budget
        else:
            reserve = E.vllm_reserve(rank, w, d.gpu.total_bytes, d.tp, d.vllm, mnbt, mns, d.weights
                                     if d.weights in ("bf16", "fp16", "fp32") else "bf16")
            available = reserve["available_kv_bytes"]
        row = E.vllm_capacity(rank, ctx, m.cfg.max_position_embeddings, layout, available, d.vllm, mns)
        return {**reserve, **row, "weights_bytes": int(w), "max_num_batched_tokens": mnbt}
    if d.engine == "llama.cpp":
        if d.tp > 1:
            raise InputError("llama.cpp splits a model across GPUs by layers, not by tensor parallelism; use --tp 1 "
                             "with --engine llama.cpp")
        ctk = E.cache_type(d.kv)
        return {**E.llamacpp_capacity(rank, ctx, d.gpu.total_bytes, w, ctk, ctk), "weights_bytes": int(w)}
    return {**_granite_sessions(rank, w, d, ctx), "weights_bytes": int(w)}


def _granite_sessions(rank: ModelConfig, w: float, d: Deployment, ctx: int) -> dict:
    if ctx > rank.max_position_embeddings:
        return {"sessions": 0, "refused": f"{ctx} tokens exceed the model's limit {rank.max_position_embeddings}"}
    work = activation_bytes(rank, min(ctx, d.ubatch), 1, d.kv)
    per = kv_bytes(rank, ctx, 1, d.kv) + state_bytes(rank, 1, d.state_dtype, d.kv)["total"]
    room = d.gpu.total_bytes - w - work
    n = int(room // per) if room > 0 and per > 0 else 0
    return {"sessions": n, "per_request_bytes": int(per), "activation_peak_bytes": int(work),
            "refused": None if n else "not even one session fits beside the weights"}


def max_context(m: Sized, d: Deployment, sessions_wanted: int = 1) -> int:
    """The longest context (up to the model's limit) at which `sessions_wanted` sessions fit."""
    limit = m.cfg.max_position_embeddings
    if sessions(m, d, limit).get("sessions", 0) >= sessions_wanted:
        return limit
    lo, hi = 0, limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if sessions(m, d, mid).get("sessions", 0) >= sessions_wanted else (lo, mid)
    return lo


def check_dtypes(d: Deployment) -> None:
    for x in (d.weights, d.kv, d.state_dtype):
        norm_dtype(x)
