"""Capacity as the serving engines count it: how many sessions of L tokens a GPU holds under vLLM's
paged KV allocator or llama.cpp's slots, and the figures each engine logs at start.

vLLM 0.33 (its functions are cited in docs/engines.md; tests/test_engines.py checks these formulas
against figures vLLM's own code computed):
- the conv and SSM states of a Mamba layer are kept in the model dtype (`mamba_cache_dtype=auto`);
- on a hybrid, the attention block grows until one attention page holds one Mamba state: the
  kernel's multiple (16 for FLASH_ATTN, or a larger `--block-size`) times ⌈state / (multiple ·
  attention bytes per token per layer)⌉; the Mamba page is padded to the attention page;
- layers are grouped so every group has as many layers as the rarer kind (the larger kind's count
  when it is less than 1.5x the other); one block is one page in each layer of a group, so a block
  costs group size × page bytes, and `num_blocks = available // that`;
- a request of L tokens takes ⌈L / block⌉ blocks in each attention group and 1 block in each Mamba
  group, or 3 with prefix caching (the state, its copy and a prefill checkpoint);
- vLLM logs "GPU KV cache size: int(Y·L) tokens, Maximum concurrency for L tokens per request:
  Y.YYx" with Y = num_blocks / blocks per request; one block (the null block) is never handed out,
  so the requests that fit at once are ⌊(num_blocks − 1) / blocks per request⌋, and at most
  `max_num_seqs` run.

llama.cpp (llama-server): `--ctx-size` is padded to a multiple of 256 and split over `--parallel`
slots (each slot's share padded to 256 again) unless the cache is unified (the server's default
without `--parallel`: 4 slots sharing the whole context); the KV cache exists on attention layers
only, in the `-ctk`/`-ctv` types; every slot has one recurrent state per Mamba layer, conv (R) and
SSM (S) in f32.
"""

from __future__ import annotations

from dataclasses import dataclass

from granite_cli.config import ModelConfig
from granite_cli.errors import InputError
from granite_cli.ggml import BY_NAME
from granite_cli.memory.predict import BYTES, activation_bytes, norm_dtype

GiB = 2**30
VLLM_VERSION = "0.33"
ENGINES = ("vllm", "llama.cpp", "none")
# FLASH_ATTN, vLLM's attention backend on NVIDIA GPUs, takes any block size that is a multiple of 16.
KERNEL_BLOCK = 16
# Mamba blocks a request holds: the running state; with prefix caching also its copy and a prefill
# checkpoint (MambaSpec.max_memory_usage_bytes in "align" mode, with mamba_mixer2's checkpoint block).
MAMBA_BLOCKS = {False: 1, True: 3}
# What the engine process holds beside torch's tensors: the CUDA context, cuBLAS workspaces and,
# with tensor parallelism, NCCL's buffers. Estimates (vLLM measures them at start); --kv-budget
# replaces every estimate with the figure vLLM logs.
CUDA_CONTEXT_BYTES = int(0.5 * GiB)
NCCL_BYTES = int(0.25 * GiB)
# vLLM captures decode CUDA graphs for batch sizes up to this many sequences.
MAX_CAPTURE = 512
# llama.cpp's context and per-slot context are multiples of this many cells.
LLAMA_CTX_PAD = 256


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------- vLLM

@dataclass
class VllmSettings:
    """The `vllm serve` options capacity depends on (None: vLLM's default for the GPU)."""

    gpu_util: float = 0.9
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int | None = None
    prefix_caching: bool = False
    kv_budget: int | None = None        # "Available KV cache memory", as vLLM logs it: replaces the estimate

    FLAGS = {"gpu_util": "--gpu-util", "max_num_seqs": "--max-num-seqs",
             "max_num_batched_tokens": "--max-num-batched-tokens", "block_size": "--block-size",
             "prefix_caching": "--prefix-caching", "kv_budget": "--kv-budget"}

    def given(self) -> list[str]:
        """The options set away from vLLM's defaults, as flags."""
        default = VllmSettings()
        return [flag for name, flag in self.FLAGS.items() if getattr(self, name) != getattr(default, name)]

    def check_for(self, engine: str, gpu_bytes: int) -> "VllmSettings":
        """check(), and refuse what this engine would silently ignore (a vLLM setting under another
        engine) or what no GPU of `gpu_bytes` can hold (a KV budget larger than the GPU)."""
        self.check()
        if engine != "vllm" and (given := self.given()):
            raise InputError(f"{given[0]} is a vLLM setting and --engine {engine} would ignore it; leave it out or "
                             "use --engine vllm")
        if self.kv_budget is not None and self.kv_budget > gpu_bytes:
            raise InputError(f"--kv-budget {gib(self.kv_budget)} is more than the GPU's {gib(gpu_bytes)}; give the "
                             "'Available KV cache memory' vLLM logged for this GPU, or a larger --gpu")
        return self

    def check(self) -> "VllmSettings":
        if not (0 < self.gpu_util <= 1):
            raise InputError(f"--gpu-util must be in (0, 1], got {self.gpu_util:g}")
        for flag, v in (("--max-num-seqs", self.max_num_seqs), ("--max-num-batched-tokens",
                                                                 self.max_num_batched_tokens),
                        ("--block-size", self.block_size)):
            if v is not None and v < 1:
                raise InputError(f"{flag} must be at least 1")
        if self.block_size is not None and self.block_size % KERNEL_BLOCK:
            raise InputError(f"--block-size {self.block_size}: vLLM's FLASH_ATTN backend needs a multiple of "
                             f"{KERNEL_BLOCK}")
        return self


def vllm_batch_defaults(gpu_bytes: int, gpu_label: str) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) that `vllm serve` 0.33 picks for a GPU of this size
    (EngineArgs.get_batch_defaults, the OpenAI API server's row)."""
    if gpu_bytes >= 160 * GiB:
        return 16384, 1024
    if gpu_bytes >= 70 * GiB and "a100" not in gpu_label.lower():
        return 8192, 1024
    return 2048, 256


@dataclass
class VllmLayout:
    """How vLLM lays out one worker's KV cache for a model (per tensor-parallel rank)."""

    attention_block_size: int
    page_bytes: int             # one block of one layer (the padded Mamba state on a hybrid)
    mamba_state_bytes: int      # one Mamba layer's conv + SSM state, before padding
    attention_token_bytes: int  # K and V of one token in one attention layer
    group_size: int
    attention_groups: int
    mamba_groups: int
    attention_layers: int
    mamba_layers: int

    @property
    def bytes_per_block(self) -> int:
        return self.group_size * self.page_bytes

    def blocks_per_request(self, tokens: int, prefix_caching: bool) -> int:
        return (self.attention_groups * cdiv(tokens, self.attention_block_size)
                + self.mamba_groups * MAMBA_BLOCKS[prefix_caching])

    def needed_for_one(self, tokens: int, prefix_caching: bool) -> int:
        """What vLLM checks at start against the available memory: every layer's cache for one request
        of `tokens` (it refuses to start when this does not fit)."""
        return self.page_bytes * (self.attention_layers * cdiv(tokens, self.attention_block_size)
                                  + self.mamba_layers * MAMBA_BLOCKS[prefix_caching])


def vllm_layout(rank: ModelConfig, kv_dtype: str = "bf16", model_dtype: str = "bf16", ssm_dtype: str | None = None,
                block_size: int | None = None) -> VllmLayout:
    """`rank` is one worker's share of the model (memory.shard.rank_config). The conv state is in the
    model dtype, the SSM state in `ssm_dtype` (vLLM's --mamba-ssm-cache-dtype; the model dtype when
    None, its default)."""
    n_att, n_mamba = len(rank.attention_layers), len(rank.mamba_layers)
    tok = int(2 * rank.num_key_value_heads * rank.head_dim * BYTES[norm_dtype(kv_dtype)])
    state = 0
    if n_mamba:
        conv, ssm = BYTES[norm_dtype(model_dtype)], BYTES[norm_dtype(ssm_dtype or model_dtype)]
        state = int((rank.mamba_d_conv - 1) * rank.conv_dim * conv + rank.mamba_n_heads * rank.mamba_d_head
                    * rank.mamba_d_state * ssm)
    multiple = max(KERNEL_BLOCK, block_size or KERNEL_BLOCK)
    block = block_size or KERNEL_BLOCK
    if n_mamba and n_att:
        aligned = multiple * cdiv(state, multiple * tok)
        block = max(block, KERNEL_BLOCK * cdiv(aligned, KERNEL_BLOCK))
    if n_att and not n_mamba:  # one kind of layer: one group holding them all
        return VllmLayout(block, block * tok, 0, tok, n_att, 1, 0, n_att, 0)
    if n_mamba and not n_att:
        return VllmLayout(block, state, state, 0, n_mamba, 0, 1, 0, n_mamba)
    lo, hi = min(n_att, n_mamba), max(n_att, n_mamba)
    group = hi if hi < lo * 1.5 else lo
    return VllmLayout(block, block * tok, state, tok, group, cdiv(n_att, group), cdiv(n_mamba, group), n_att, n_mamba)


def vllm_reserve(rank: ModelConfig, weights_bytes: float, gpu_bytes: int, tp: int, s: VllmSettings,
                 mnbt: int, mns: int, dtype: str = "bf16") -> dict[str, int]:
    """What vLLM keeps from the KV cache on one worker, each estimated: the weights, the peak of its
    profile run (a forward of max_num_batched_tokens tokens, then the sampler over max_num_seqs
    rows of logits), the CUDA graphs of decode batches up to 512 sequences, and the memory outside
    torch (CUDA context, NCCL)."""
    activation = activation_bytes(rank, mnbt, 1, dtype) + mns * rank.vocab_size * 4
    graphs = activation_bytes(rank, 1, min(mns, MAX_CAPTURE), dtype)
    other = CUDA_CONTEXT_BYTES + (NCCL_BYTES if tp > 1 else 0)
    requested = int(s.gpu_util * gpu_bytes)
    available = requested - int(weights_bytes) - int(activation) - int(graphs) - other
    return {"requested_bytes": requested, "weights_bytes": int(weights_bytes), "activation_peak_bytes": int(activation),
            "cuda_graph_bytes": int(graphs), "non_torch_bytes": other, "available_kv_bytes": available}


def vllm_capacity(rank: ModelConfig, tokens: int, max_model_len: int, layout: VllmLayout, available: int,
                  s: VllmSettings, mns: int) -> dict:
    """The figures vLLM reaches for requests of `tokens` (its max_model_len) with `available` bytes of
    KV cache memory: its log lines, and how many requests really run at once."""
    row: dict = {"attention_block_size": layout.attention_block_size, "page_bytes": layout.page_bytes,
                 "mamba_state_bytes": layout.mamba_state_bytes, "kv_groups": layout.attention_groups +
                 layout.mamba_groups, "group_size": layout.group_size, "bytes_per_block": layout.bytes_per_block,
                 "available_kv_bytes": available, "max_num_seqs": mns}
    if tokens > max_model_len:
        row.update(refused=f"max_model_len {tokens} exceeds the model's limit {max_model_len}", sessions=0)
        return row
    num_blocks = max(0, available) // layout.bytes_per_block
    bpr = layout.blocks_per_request(tokens, s.prefix_caching)
    conc = num_blocks / bpr
    row.update(num_blocks=num_blocks, blocks_per_request=bpr, per_request_bytes=bpr * layout.bytes_per_block,
               max_concurrency=round(conc, 2), kv_cache_tokens=int(conc * tokens))
    need = layout.needed_for_one(tokens, s.prefix_caching)
    if available <= 0 or need > available:
        row.update(refused=f"one request of {tokens} tokens needs {need / GiB:.2f} GiB of KV cache, more than the "
                           f"{max(0, available) / GiB:.2f} GiB available", sessions=0)
        return row
    fit = max(0, num_blocks - 1) // bpr
    row.update(sessions=min(fit, mns), limited_by="max_num_seqs" if mns < fit else "KV cache", refused=None)
    row["log"] = (f"Available KV cache memory: {available / GiB:.2f} GiB; GPU KV cache size: "
                  f"{row['kv_cache_tokens']:,} tokens, Maximum concurrency for {tokens:,} tokens per request: "
                  f"{conc:.2f}x")
    return row


# ---------------------------------------------------------------------------------------- llama.cpp

# ggml types a llama.cpp KV cache may use (-ctk/-ctv): elements per block, bytes per block.
CACHE_TYPES = {t: BY_NAME[t] for t in ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")}


def row_bytes(cache_type: str, n: int) -> int:
    """ggml_row_size: the bytes of n elements of a cache type."""
    blk, size = CACHE_TYPES[cache_type]
    if n % blk:
        raise InputError(f"cache type {cache_type} needs rows that are a multiple of {blk} elements; this model's "
                         f"are {n}")
    return n // blk * size


def cache_type(name: str) -> str:
    key = {"fp16": "f16", "fp32": "f32", "float16": "f16", "bfloat16": "bf16"}.get(name.lower(), name.lower())
    if key not in CACHE_TYPES:
        raise InputError(f"unknown llama.cpp cache type {name!r}; use one of {', '.join(CACHE_TYPES)}")
    return key


@dataclass
class LlamaSizes:
    n_ctx: int           # the whole context after padding
    n_ctx_seq: int       # one slot's share (the whole context when unified)
    cells: int           # KV cells allocated (n_ctx either way)
    slots: int
    kv_bytes: int
    k_bytes: int
    v_bytes: int
    recurrent_bytes: int
    r_bytes: int
    s_bytes: int

    def log_lines(self, cfg: ModelConfig, ctk: str, ctv: str) -> list[str]:
        """llama.cpp's own start-up lines for these sizes (sizes in MiB to 2 decimals, as it prints)."""
        mib = 2**20
        lines = []
        if cfg.attention_layers:
            lines.append(f"llama_kv_cache: size = {self.kv_bytes / mib:.2f} MiB ({self.n_ctx_seq} cells, "
                         f"{len(cfg.attention_layers)} layers, {self.slots}/{self.slots} seqs), K ({ctk}): "
                         f"{self.k_bytes / mib:.2f} MiB, V ({ctv}): {self.v_bytes / mib:.2f} MiB")
        if cfg.mamba_layers:
            lines.append(f"llama_memory_recurrent: size = {self.recurrent_bytes / mib:.2f} MiB ({self.slots} cells, "
                         f"{cfg.num_hidden_layers} layers, {self.slots} seqs), R (f32): {self.r_bytes / mib:.2f} MiB, "
                         f"S (f32): {self.s_bytes / mib:.2f} MiB")
        return lines


def llamacpp_sizes(cfg: ModelConfig, n_ctx: int, slots: int, ctk: str = "f16", ctv: str = "f16",
                   unified: bool = False) -> LlamaSizes:
    """The KV cache and recurrent state llama.cpp allocates for `--ctx-size n_ctx --parallel slots`."""
    pad = lambda n: cdiv(n, LLAMA_CTX_PAD) * LLAMA_CTX_PAD  # noqa: E731
    ctx = pad(n_ctx)
    per = ctx if unified else pad(ctx // slots)
    if not unified:
        ctx = per * slots
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    n_att = len(cfg.attention_layers)
    k = ctx * n_att * row_bytes(ctk, kv_dim)
    v = ctx * n_att * row_bytes(ctv, kv_dim)
    n_m = len(cfg.mamba_layers)
    r = slots * n_m * (cfg.mamba_d_conv - 1) * cfg.conv_dim * 4
    s = slots * n_m * cfg.mamba_d_state * cfg.d_inner * 4
    return LlamaSizes(ctx, per, ctx, slots, k + v, k, v, r + s, r, s)


def llamacpp_capacity(cfg: ModelConfig, tokens: int, mem_bytes: int, weights_bytes: float, ctk: str, ctv: str,
                      ubatch: int = 512) -> dict:
    """The most `--parallel` slots of `tokens` tokens each that fit in `mem_bytes` beside the weights
    and the compute buffer (an estimate: the working set of one `ubatch`-token forward, in f32)."""
    if tokens > cfg.max_position_embeddings:
        return {"sessions": 0, "refused": f"{tokens} tokens exceed the model's limit {cfg.max_position_embeddings}"}
    compute = int(activation_bytes(cfg, ubatch, 1, "fp32"))
    room = mem_bytes - int(weights_bytes) - compute

    def fits(n: int) -> bool:
        z = llamacpp_sizes(cfg, tokens * n, n, ctk, ctv)
        return z.kv_bytes + z.recurrent_bytes <= room

    lo, hi = 0, 1
    while fits(hi) and hi < 1 << 16:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    row = {"sessions": lo, "compute_buffer_bytes": compute, "refused": None if lo else
           "not even one slot fits beside the weights"}
    if lo:
        z = llamacpp_sizes(cfg, tokens * lo, lo, ctk, ctv)
        row.update(kv_bytes=z.kv_bytes, recurrent_bytes=z.recurrent_bytes, n_ctx=z.n_ctx, n_ctx_seq=z.n_ctx_seq,
                   log="; ".join(z.log_lines(cfg, ctk, ctv)))
    return row


def state_default(engine: str) -> str:
    """The SSM state dtype an engine keeps: vLLM the model dtype (bf16), llama.cpp and granite's core f32."""
    return "bf16" if engine == "vllm" else "fp32"


def check_engine(name: str) -> str:
    key = name.lower().replace("llamacpp", "llama.cpp").replace("llama-cpp", "llama.cpp")
    if key not in ENGINES:
        raise InputError(f"unknown --engine {name!r}; use vllm, llama.cpp or none")
    return key


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"

