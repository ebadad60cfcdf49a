"""Model configuration: one frozen dataclass for every architecture the core runs.

Sources of a `ModelConfig`:
- a profile TOML shipped in `profiles/` (our own key names, which are Hugging Face's where one exists;
  unknown keys are errors);
- a Hugging Face `config.json` (by `model_type`: granitemoehybrid, granite, llama, qwen3, qwen3_moe),
  where a missing key takes the transformers class default, exactly as transformers would;
- a checkpoint folder holding a `config.json`.

Layer types are normalised to "mamba" / "attention"; both vocabularies are accepted on input
(legacy `mamba`/`attention` and transformers 5's `linear_attention`/`full_attention`).
Export writes a `config.json` that the matching transformers config class loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from granite_cli.errors import InputError

ARCHITECTURES = ("granitemoehybrid", "granite", "llama", "qwen3", "qwen3_moe")

_LAYER_TYPE_ALIASES = {
    "mamba": "mamba",
    "linear_attention": "mamba",
    "attention": "attention",
    "full_attention": "attention",
}

_HF_CLASS = {
    "granitemoehybrid": "GraniteMoeHybridForCausalLM",
    "granite": "GraniteForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


@dataclass(frozen=True)
class ModelConfig:
    """Geometry and scalars of one model. Field names follow Hugging Face where one exists.

    Widths: `intermediate_size` keeps its Hugging Face meaning per architecture (granitemoehybrid:
    the routed expert width; llama/qwen3/granite: the dense MLP width; qwen3_moe: the unused dense
    width); use `expert_width` and `mlp_width` for what the model actually builds.
    """

    name: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    shared_intermediate_size: int = 0
    moe_intermediate_size: int = 0
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = True
    mamba_n_heads: int = 0
    mamba_d_head: int = 0
    mamba_n_groups: int = 1
    mamba_d_state: int = 0
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    position_embedding_type: str = "nope"
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    qk_norm: bool = False
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    embedding_multiplier: float = 1.0
    attention_multiplier: float = 0.0  # 0 = the standard 1/sqrt(head_dim)
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    torch_dtype: str = "bfloat16"
    description: str = field(default="", compare=False)

    # ---- derived geometry -------------------------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.mamba_n_heads * self.mamba_d_head

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.mamba_n_groups * self.mamba_d_state

    @property
    def in_proj_dim(self) -> int:
        return 2 * self.d_inner + 2 * self.mamba_n_groups * self.mamba_d_state + self.mamba_n_heads

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "attention")

    @property
    def mamba_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "mamba")

    @property
    def is_hybrid(self) -> bool:
        return bool(self.mamba_layers)

    @property
    def expert_width(self) -> int:
        """Width of one routed expert (0 when the model has no routed experts)."""
        if self.num_local_experts == 0:
            return 0
        if self.architecture == "qwen3_moe":
            return self.moe_intermediate_size
        return self.intermediate_size

    @property
    def mlp_width(self) -> int:
        """Width of the dense MLP, or of the shared expert next to the routed ones (0 = none)."""
        if self.architecture == "granitemoehybrid":
            return self.shared_intermediate_size
        if self.architecture == "qwen3_moe":
            return 0
        return self.intermediate_size

    @property
    def uses_rope(self) -> bool:
        return self.position_embedding_type == "rope"

    @property
    def softmax_scale(self) -> float:
        return self.attention_multiplier if self.attention_multiplier else 1.0 / math.sqrt(self.head_dim)

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def replace(self, **changes: Any) -> "ModelConfig":
        return validate(dataclasses.replace(self, **changes))

    # ---- export -----------------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face `config.json` dict that the architecture's transformers config class loads.

        Layer types are written in the legacy `mamba`/`attention` vocabulary, the one IBM publishes
        and llama.cpp's converter reads; transformers 5 maps it on load.
        """
        a = self.architecture
        d: dict[str, Any] = {
            "architectures": [_HF_CLASS[a]],
            "model_type": a,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "rope_theta": self.rope_theta,
            "torch_dtype": self.torch_dtype,
        }
        if self.rope_scaling:
            d["rope_scaling"] = dict(self.rope_scaling)
        if a in ("granitemoehybrid", "granite"):
            d.update(
                embedding_multiplier=self.embedding_multiplier,
                attention_multiplier=self.softmax_scale,
                residual_multiplier=self.residual_multiplier,
                logits_scaling=self.logits_scaling,
            )
        if a == "granitemoehybrid":
            d.update(
                shared_intermediate_size=self.shared_intermediate_size,
                num_local_experts=self.num_local_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                layer_types=list(self.layer_types),
                position_embedding_type=self.position_embedding_type,
                mamba_n_heads=self.mamba_n_heads,
                mamba_d_head=self.mamba_d_head,
                mamba_n_groups=self.mamba_n_groups,
                mamba_d_state=self.mamba_d_state,
                mamba_d_conv=self.mamba_d_conv,
                mamba_expand=self.mamba_expand,
                mamba_chunk_size=self.mamba_chunk_size,
                mamba_conv_bias=self.mamba_conv_bias,
                mamba_proj_bias=self.mamba_proj_bias,
            )
            if not self.is_hybrid and self.mamba_n_heads == 0:
                # Dense members carry unused mamba keys; keep the exported geometry self-consistent.
                d.update(mamba_n_heads=1, mamba_d_head=2 * self.hidden_size, mamba_d_state=1)
        else:
            d["head_dim"] = self.head_dim
        if a == "qwen3_moe":
            d.update(
                moe_intermediate_size=self.moe_intermediate_size,
                num_local_experts=self.num_local_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            )
        return d


# ---------------------------------------------------------------------------------------------
# validation


def _fail(source: str, msg: str) -> InputError:
    return InputError(f"{source}: {msg}")


def validate(cfg: ModelConfig, source: str | None = None) -> ModelConfig:
    """Reject impossible geometry with a one-line error naming the field and the fix."""
    src = source or cfg.name or "config"
    if cfg.architecture not in ARCHITECTURES:
        raise _fail(src, f"unknown architecture {cfg.architecture!r}; supported: {', '.join(ARCHITECTURES)}")
    _check_layers(cfg, src)
    _check_experts(cfg, src)
    _check_positions(cfg, src)
    if cfg.is_hybrid:
        _check_mamba(cfg, src)
    _check_values(cfg, src)
    return cfg


def _check_layers(cfg: ModelConfig, src: str) -> None:
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim"):
        v = getattr(cfg, f)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise _fail(src, f"{f} must be a positive integer, got {v!r}")
    if len(cfg.layer_types) != cfg.num_hidden_layers:
        raise _fail(src, f"layer_types has {len(cfg.layer_types)} entries but num_hidden_layers is "
                         f"{cfg.num_hidden_layers}; give one type per layer")
    bad = [t for t in cfg.layer_types if t not in ("mamba", "attention")]
    if bad:
        raise _fail(src, f"unknown layer type {bad[0]!r}; use mamba/attention or linear_attention/full_attention")
    if cfg.architecture != "granitemoehybrid" and "mamba" in cfg.layer_types:
        raise _fail(src, f"architecture {cfg.architecture} has no Mamba layers; use granitemoehybrid")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise _fail(src, f"num_attention_heads {cfg.num_attention_heads} is not a multiple of num_key_value_heads "
                         f"{cfg.num_key_value_heads}")


def _check_experts(cfg: ModelConfig, src: str) -> None:
    e, k = cfg.num_local_experts, cfg.num_experts_per_tok
    if e < 0 or k < 0:
        raise _fail(src, "expert counts must not be negative")
    if k > e:
        raise _fail(src, f"num_experts_per_tok {k} is above num_local_experts {e}; top-k must not exceed the expert "
                         "count")
    if e and k == 0:
        raise _fail(src, "num_local_experts > 0 needs num_experts_per_tok >= 1")
    if e and cfg.expert_width <= 0:
        raise _fail(src, "routed experts need a positive expert width")
    if cfg.architecture in ("llama", "qwen3", "granite") and e:
        raise _fail(src, f"architecture {cfg.architecture} has no experts; use qwen3_moe or granitemoehybrid")
    if cfg.architecture == "qwen3_moe" and not e:
        raise _fail(src, "qwen3_moe needs num_local_experts > 0")
    if cfg.mlp_width <= 0 and not e:
        raise _fail(src, "the model has neither experts nor an MLP; set intermediate_size/shared_intermediate_size")


def _check_positions(cfg: ModelConfig, src: str) -> None:
    if cfg.position_embedding_type not in ("nope", "rope"):
        raise _fail(src, f"position_embedding_type must be 'nope' or 'rope', got {cfg.position_embedding_type!r}")
    if cfg.uses_rope and cfg.head_dim % 2:
        raise _fail(src, f"RoPE needs an even head_dim, got {cfg.head_dim}")
    if cfg.rope_scaling:
        rs = dict(cfg.rope_scaling)
        kind = rs.get("rope_type", rs.get("type"))
        if kind not in ("default", "llama3"):
            raise _fail(src, f"rope scaling type {kind!r} is not supported (default, llama3)")


def _check_mamba(cfg: ModelConfig, src: str) -> None:
    for f in ("mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_chunk_size"):
        v = getattr(cfg, f)
        if not isinstance(v, int) or v <= 0:
            raise _fail(src, f"{f} must be a positive integer for a model with Mamba layers, got {v!r}")
    inner = cfg.mamba_expand * cfg.hidden_size
    if inner % cfg.mamba_n_heads:
        raise _fail(src, f"mamba_n_heads {cfg.mamba_n_heads} does not divide the inner size {inner} "
                         f"(mamba_expand {cfg.mamba_expand} x hidden_size {cfg.hidden_size})")
    if cfg.d_inner != inner:
        raise _fail(src, f"mamba_n_heads x mamba_d_head = {cfg.d_inner} but mamba_expand x hidden_size = {inner}; "
                         "they must match")
    if cfg.mamba_n_heads % cfg.mamba_n_groups:
        raise _fail(src, f"mamba_n_groups {cfg.mamba_n_groups} does not divide mamba_n_heads {cfg.mamba_n_heads}")


_MAX_DIM = 2**31 - 1  # beyond any model, and past it torch's index arithmetic would overflow
MAX_LAYERS = 65536    # beyond any model; the per-layer tables are built before anything else is checked


def check_layer_count(n: Any, source: str) -> None:
    if isinstance(n, int) and n > MAX_LAYERS:
        raise _fail(source, f"num_hidden_layers must be at most {MAX_LAYERS}, got {n}")


def _check_values(cfg: ModelConfig, src: str) -> None:
    """Ranges of the scalar fields (validate holds the geometry rules)."""
    for f in dataclasses.fields(ModelConfig):
        v = getattr(cfg, f.name)
        if f.type == "int" and isinstance(v, int) and not 0 <= v <= _MAX_DIM:
            raise _fail(src, f"{f.name} must be between 0 and {_MAX_DIM}, got {v}")
        if f.type == "float" and isinstance(v, (int, float)) and not math.isfinite(v):
            raise _fail(src, f"{f.name} must be a finite number, got {v}")
    if cfg.max_position_embeddings < 1:
        raise _fail(src, "max_position_embeddings must be a positive integer")
    if cfg.is_hybrid and cfg.mamba_expand < 1:
        raise _fail(src, "mamba_expand must be a positive integer for a model with Mamba layers")
    if not cfg.rms_norm_eps > 0:
        raise _fail(src, "rms_norm_eps must be positive")
    if not cfg.rope_theta > 0:
        raise _fail(src, f"rope_theta must be positive, got {cfg.rope_theta}")
    if cfg.logits_scaling == 0:
        raise _fail(src, "logits_scaling must not be 0 (the logits are divided by it)")
    if cfg.attention_multiplier < 0:
        raise _fail(src, f"attention_multiplier must not be negative, got {cfg.attention_multiplier}")
    lo, hi = cfg.time_step_limit
    if not 0 <= lo <= hi or math.isnan(hi):
        raise _fail(src, f"time_step_limit must be [low, high] with 0 <= low <= high, got {[lo, hi]}")
    rs = cfg.rope_scaling_dict
    if rs and rs.get("rope_type", rs.get("type")) == "llama3":
        for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            v = rs.get(k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise _fail(src, f"rope_scaling.{k} must be a positive number for llama3 scaling, got {v!r}")
        if rs["high_freq_factor"] == rs["low_freq_factor"]:
            raise _fail(src, "rope_scaling high_freq_factor must differ from low_freq_factor")


# ---------------------------------------------------------------------------------------------
# parsing helpers


def _layer_types(raw: Any, n_layers: int, src: str) -> tuple[str, ...]:
    if not isinstance(raw, (list, tuple)):
        raise _fail(src, "layer_types must be a list of strings")
    out = []
    for t in raw:
        norm = _LAYER_TYPE_ALIASES.get(t) if isinstance(t, str) else None
        if norm is None:
            raise _fail(src, f"unknown layer type {t!r}; use mamba/attention or linear_attention/full_attention")
        out.append(norm)
    return tuple(out)


def _layers_from_indices(indices: Any, n_layers: int, src: str) -> tuple[str, ...]:
    if indices == "all":
        return ("attention",) * n_layers
    if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise _fail(src, "attention_layers must be a list of layer indices or \"all\"")
    for i in indices:
        if not 0 <= i < n_layers:
            raise _fail(src, f"attention layer index {i} is outside 0..{n_layers - 1}")
    return tuple("attention" if i in set(indices) else "mamba" for i in range(n_layers))


def _rope_from_hf(d: dict[str, Any], default_theta: float) -> tuple[float, tuple | None]:
    """transformers 4 stores rope_theta + rope_scaling; transformers 5 stores rope_parameters."""
    theta = d.get("rope_theta", default_theta)
    scaling = d.get("rope_scaling")
    params = d.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if isinstance(theta, bool) or not isinstance(theta, (int, float)):
            raise InputError(f"rope_parameters.rope_theta must be a number, got {theta!r}")
        rt = params.get("rope_type", params.get("type", "default"))
        if rt != "default":
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if isinstance(scaling, dict):
        rt = scaling.get("rope_type", scaling.get("type", "default"))
        scaling = None if rt == "default" else tuple(sorted(scaling.items()))
    else:
        scaling = None
    return float(theta), scaling


def _time_step_limit(raw: Any) -> tuple[float, float]:
    def num(v: Any) -> float:
        if isinstance(v, dict) and "__float__" in v:  # transformers 5 JSON encoding of inf
            return float(v["__float__"])
        return float(v)

    if raw is None:
        return (0.0, math.inf)
    if not isinstance(raw, (list, tuple)) or len(raw) != 2:
        raise InputError(f"time_step_limit must be a pair [low, high], got {raw!r}")
    try:
        lo, hi = num(raw[0]), num(raw[1])
    except (TypeError, ValueError):
        raise InputError(f"time_step_limit must hold two numbers, got {raw!r}") from None
    return (lo, hi)


def _time_step_limit_in(raw: Any, source: str) -> tuple[float, float]:
    try:
        return _time_step_limit(raw)
    except InputError as e:
        raise _fail(source, str(e)) from None


# Keys transformers writes that do not change the forward pass (bookkeeping, token ids, training).
_HF_IGNORED = {
    "_name_or_path", "architectures", "transformers_version", "dtype", "use_cache", "bos_token_id",
    "eos_token_id", "pad_token_id", "initializer_range", "attention_dropout", "output_router_logits",
    "router_aux_loss_coef", "hidden_dropout", "embedding_dropout", "init_method", "normalization_function",
    "hidden_act", "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "pretraining_tp", "mlp_bias",
    "tie_word_embeddings", "use_sliding_window", "sliding_window", "max_window_layers", "z_loss_coefficient",
    "model_type", "torch_dtype", "tokenizer_class", "num_logits_to_keep", "use_mamba_kernels", "task_specific_params",
    "generation_config", "quantization_config", "auto_map", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "pruned_heads", "finetuning_task", "prefix", "sep_token_id", "decoder_start_token_id",
    "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "is_decoder",
}

_HF_KNOWN = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "attention_bias",
    # granite multipliers
    "embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling",
    # granitemoehybrid
    "shared_intermediate_size", "num_local_experts", "num_experts_per_tok", "layer_types", "layers_block_type",
    "position_embedding_type", "mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state", "mamba_d_conv",
    "mamba_expand", "mamba_chunk_size", "mamba_conv_bias", "mamba_proj_bias", "time_step_limit",
    "attn_layer_indices",
    # qwen3_moe
    "moe_intermediate_size", "num_experts", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
}

# transformers class defaults (5.24.0) for keys a config.json may omit. They are not Granite's values:
# a config.json without them means what transformers would build.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "granitemoehybrid": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=None, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_theta=10000.0, attention_bias=False, embedding_multiplier=1.0, logits_scaling=1.0,
        residual_multiplier=1.0, attention_multiplier=1.0, num_local_experts=8, num_experts_per_tok=2,
        shared_intermediate_size=1024, position_embedding_type=None, mamba_n_heads=128, mamba_n_groups=1,
        mamba_d_state=256, mamba_d_head="auto", mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256,
        mamba_conv_bias=True, mamba_proj_bias=False,
    ),
    "granite": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=None, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_theta=10000.0, attention_bias=False, embedding_multiplier=1.0, logits_scaling=1.0,
        residual_multiplier=1.0, attention_multiplier=1.0,
    ),
    "llama": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=None, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_theta=10000.0, attention_bias=False,
    ),
    "qwen3": dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=None, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_theta=10000.0, attention_bias=False, head_dim=128,
    ),
    "qwen3_moe": dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_theta=10000.0, attention_bias=False, moe_intermediate_size=768, num_experts_per_tok=8,
        num_local_experts=128, norm_topk_prob=False, head_dim=None,
    ),
}


# The JSON type of each key the parser reads. null means "not given" (the transformers default) only
# for the keys in _HF_NULLABLE; anywhere else it is an error, as it would be in transformers' forward.
_HF_TYPES: dict[str, str] = {
    **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "shared_intermediate_size",
                     "num_local_experts", "num_experts_per_tok", "mamba_n_heads", "mamba_n_groups", "mamba_d_state",
                     "mamba_d_conv", "mamba_expand", "mamba_chunk_size", "moe_intermediate_size", "num_experts",
                     "decoder_sparse_step"), "integer"),
    **dict.fromkeys(("rms_norm_eps", "rope_theta", "embedding_multiplier", "attention_multiplier",
                     "residual_multiplier", "logits_scaling"), "number"),
    **dict.fromkeys(("tie_word_embeddings", "attention_bias", "mamba_conv_bias", "mamba_proj_bias",
                     "norm_topk_prob"), "true or false"),
    **dict.fromkeys(("position_embedding_type", "torch_dtype", "dtype"), "string"),
    **dict.fromkeys(("rope_scaling", "rope_parameters"), "object"),
    **dict.fromkeys(("layer_types", "layers_block_type", "attn_layer_indices", "mlp_only_layers", "time_step_limit"),
                    "list"),
}
_HF_NULLABLE = {"num_key_value_heads", "head_dim", "position_embedding_type", "torch_dtype", "dtype", "rope_scaling",
                "rope_parameters", "layer_types", "layers_block_type", "attn_layer_indices", "mlp_only_layers",
                "time_step_limit", "mamba_d_head"}


def _json_type_ok(v: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, {"true or false": bool, "string": str, "object": dict, "list": (list, tuple)}[kind])


def _check_hf_types(d: dict[str, Any], source: str) -> None:
    for k, v in d.items():
        if v is None:
            if k in _HF_TYPES and k not in _HF_NULLABLE:
                raise _fail(source, f"{k} must be {_a(_HF_TYPES[k])}, got null; give a value or remove the key")
            continue
        if k == "mamba_d_head":
            if v != "auto" and not _json_type_ok(v, "integer"):
                raise _fail(source, f"mamba_d_head must be an integer or \"auto\", got {v!r}")
        elif k in _HF_TYPES and not _json_type_ok(v, _HF_TYPES[k]):
            raise _fail(source, f"{k} must be {_a(_HF_TYPES[k])}, got {json.dumps(v)[:60]}")
    for k in ("num_attention_heads", "num_hidden_layers", "hidden_size"):  # divisors and counts used below
        if k in d and d[k] <= 0:
            raise _fail(source, f"{k} must be a positive integer, got {d[k]}")
    for k, v in d.items():
        if _HF_TYPES.get(k) == "integer" and isinstance(v, int) and v > _MAX_DIM:
            raise _fail(source, f"{k} must be at most {_MAX_DIM}, got {v}")
    check_layer_count(d.get("num_hidden_layers", 0), source)
    if d.get("mamba_n_heads") is not None and d["mamba_n_heads"] < 0:
        raise _fail(source, f"mamba_n_heads must not be negative, got {d['mamba_n_heads']}")


def _a(kind: str) -> str:
    return {"integer": "an integer", "number": "a number", "true or false": "true or false", "string": "a string",
            "object": "a JSON object", "list": "a list"}[kind]


def from_hf_dict(d: dict[str, Any], name: str = "", source: str = "config.json") -> ModelConfig:
    """Parse a Hugging Face config dict. Unknown keys are errors (a misspelt key must not pass silently),
    and so are values of the wrong JSON type."""
    if not isinstance(d, dict):
        raise _fail(source, "expected a JSON object")
    mt = d.get("model_type")
    if not isinstance(mt, str) or mt not in _HF_DEFAULTS:
        raise _fail(source, f"unsupported model_type {mt!r}; supported: {', '.join(ARCHITECTURES)}")
    unknown = sorted(k for k in d if k not in _HF_KNOWN and k not in _HF_IGNORED)
    if unknown:
        raise _fail(source,
                    f"unknown key {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                    + f" for model_type {mt}; remove it or check its spelling")
    _check_hf_types(d, source)
    g = {**_HF_DEFAULTS[mt], **{k: v for k, v in d.items() if v is not None or k not in _HF_DEFAULTS[mt]}}
    n_layers = g["num_hidden_layers"]
    heads = g["num_attention_heads"]
    kv = g.get("num_key_value_heads") or heads
    head_dim = g.get("head_dim") or (g["hidden_size"] // heads)
    try:
        theta, scaling = _rope_from_hf(d, g.get("rope_theta", 10000.0))
    except InputError as e:
        raise _fail(source, str(e)) from None
    common = dict(
        name=name, architecture=mt, vocab_size=g["vocab_size"], hidden_size=g["hidden_size"],
        num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        intermediate_size=g["intermediate_size"], max_position_embeddings=g["max_position_embeddings"],
        rms_norm_eps=float(g["rms_norm_eps"]), tie_word_embeddings=bool(g["tie_word_embeddings"]),
        rope_theta=theta, rope_scaling=scaling, attention_bias=bool(g.get("attention_bias", False)),
        torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"),
    )
    if mt in ("granitemoehybrid", "granite"):
        common.update(
            embedding_multiplier=float(g["embedding_multiplier"]),
            attention_multiplier=float(g["attention_multiplier"]),
            residual_multiplier=float(g["residual_multiplier"]), logits_scaling=float(g["logits_scaling"]),
        )
    if mt == "granitemoehybrid":
        raw_types = d.get("layer_types", d.get("layers_block_type"))
        if raw_types is None and d.get("attn_layer_indices") is not None:
            types = _layers_from_indices(list(d["attn_layer_indices"]), n_layers, source)
        elif raw_types is None:
            types = ("mamba",) * n_layers
        else:
            types = _layer_types(raw_types, n_layers, source)
        n_heads = g["mamba_n_heads"]
        d_head = g["mamba_d_head"]
        if d_head == "auto":
            d_head = (g["mamba_expand"] * g["hidden_size"]) // n_heads if n_heads else 0
        pe = g.get("position_embedding_type")
        cfg = ModelConfig(
            **common, layer_types=types, position_embedding_type="rope" if pe == "rope" else "nope",
            shared_intermediate_size=g["shared_intermediate_size"], num_local_experts=g["num_local_experts"],
            num_experts_per_tok=g["num_experts_per_tok"], mamba_n_heads=n_heads, mamba_d_head=d_head,
            mamba_n_groups=g["mamba_n_groups"], mamba_d_state=g["mamba_d_state"], mamba_d_conv=g["mamba_d_conv"],
            mamba_expand=g["mamba_expand"], mamba_chunk_size=g["mamba_chunk_size"],
            mamba_conv_bias=bool(g["mamba_conv_bias"]), mamba_proj_bias=bool(g["mamba_proj_bias"]),
            time_step_limit=_time_step_limit_in(d.get("time_step_limit"), source),
        )
        if not cfg.is_hybrid:
            # dense members carry leftover mamba_* keys; they build nothing, so do not validate them
            cfg = dataclasses.replace(cfg, mamba_n_heads=0, mamba_d_head=0, mamba_d_state=0)
    else:
        layer_types = ("attention",) * n_layers
        extra: dict[str, Any] = {}
        if mt == "qwen3_moe":
            if g.get("mlp_only_layers") or g.get("decoder_sparse_step", 1) != 1:
                raise _fail(source,
                            "qwen3_moe with dense layers (mlp_only_layers / decoder_sparse_step) is not supported")
            extra = dict(
                moe_intermediate_size=g["moe_intermediate_size"],
                num_local_experts=d.get("num_local_experts", d.get("num_experts", g["num_local_experts"])),
                num_experts_per_tok=g["num_experts_per_tok"], norm_topk_prob=bool(g["norm_topk_prob"]),
            )
        cfg = ModelConfig(
            **common, layer_types=layer_types, position_embedding_type="rope", qk_norm=mt in ("qwen3", "qwen3_moe"),
            **extra,
        )
    _check_types(cfg, source)
    return validate(cfg, source)


# ---------------------------------------------------------------------------------------------
# profiles

_PROFILE_KEYS = {f.name for f in dataclasses.fields(ModelConfig)}
_PROFILE_KEYS -= {"name", "layer_types", "rope_scaling", "time_step_limit"}
_PROFILE_KEYS |= {"layer_types", "attention_layers", "rope_scaling", "time_step_limit"}


def profiles_dir():
    return resources.files("granite_cli.profiles")


def profile_names() -> list[str]:
    return sorted(p.name[: -len(".toml")] for p in profiles_dir().iterdir() if p.name.endswith(".toml"))


def from_profile_dict(d: dict[str, Any], name: str, source: str) -> ModelConfig:
    unknown = sorted(k for k in d if k not in _PROFILE_KEYS)
    if unknown:
        raise _fail(source,
                    f"unknown key {unknown[0]!r}; valid keys are the ModelConfig fields (see profiles/README.md)")
    d = dict(d)
    for req in ("architecture", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size"):
        if req not in d:
            raise _fail(source, f"missing required key {req!r}")
    _check_types_of(d, source)
    n = d["num_hidden_layers"]
    for k in ("num_hidden_layers", "num_attention_heads", "hidden_size"):  # counts and divisors used below
        if d[k] <= 0:
            raise _fail(source, f"{k} must be a positive integer, got {d[k]}")
    check_layer_count(n, source)
    if "layer_types" in d and "attention_layers" in d:
        raise _fail(source, "give either layer_types or attention_layers, not both")
    if "layer_types" in d:
        types = _layer_types(d.pop("layer_types"), n, source)
    else:
        types = _layers_from_indices(d.pop("attention_layers", "all"), n, source)
    if "rope_scaling" in d:
        rs = d.pop("rope_scaling")
        if not isinstance(rs, dict):
            raise _fail(source, f"rope_scaling must be a table, got {rs!r}")
        d["rope_scaling"] = tuple(sorted(rs.items())) if rs else None
    if "time_step_limit" in d:
        d["time_step_limit"] = _time_step_limit_in(d.pop("time_step_limit"), source)
    d.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"])
    if d["architecture"] in ("qwen3", "qwen3_moe"):
        d.setdefault("qk_norm", True)
    if d["architecture"] != "granitemoehybrid":
        d.setdefault("position_embedding_type", "rope")
    try:
        cfg = ModelConfig(name=name, layer_types=types, **d)
    except TypeError as e:  # pragma: no cover - guarded by the key check above
        raise _fail(source, str(e)) from None
    _check_types(cfg, source)
    return validate(cfg, source)


def _check_types(cfg: ModelConfig, source: str) -> None:
    _check_types_of({f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)}, source)


def _check_types_of(d: dict[str, Any], source: str) -> None:
    """The scalar fields of d (ModelConfig field names) have their field's type."""
    for f in dataclasses.fields(ModelConfig):
        if f.name not in d:
            continue
        v = d[f.name]
        if f.type in ("int",) and (not isinstance(v, int) or isinstance(v, bool)):
            raise _fail(source, f"{f.name} must be an integer, got {v!r}")
        if f.type in ("float",) and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise _fail(source, f"{f.name} must be a number, got {v!r}")
        if f.type in ("bool",) and not isinstance(v, bool):
            raise _fail(source, f"{f.name} must be true or false, got {v!r}")
        if f.type in ("str",) and not isinstance(v, str):
            raise _fail(source, f"{f.name} must be a string, got {v!r}")


def load_profile_file(path: Path, name: str | None = None) -> ModelConfig:
    try:
        if Path(path).stat().st_size > MAX_CONFIG_BYTES:
            raise InputError(f"{path}: too large to be a profile")
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read profile ({e.strerror})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a TOML profile (not UTF-8 text)") from None
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML ({e})") from None
    return from_profile_dict(d, name or Path(path).stem, str(path))


def load_config(spec: str | Path | ModelConfig) -> ModelConfig:
    """A profile name, a profile .toml, a config.json path, or a checkpoint folder → ModelConfig."""
    if isinstance(spec, ModelConfig):
        return spec
    s = str(spec)
    p = Path(s)
    if p.is_dir():
        cj = p / "config.json"
        if not cj.is_file():
            raise InputError(f"{p}: folder has no config.json; pass a checkpoint folder or a profile name")
        return _load_json(cj, p.name)
    if p.is_file():
        if p.suffix == ".toml":
            return load_profile_file(p)
        return _load_json(p, p.parent.name or p.stem)
    res = profiles_dir() / f"{s}.toml"
    if "/" not in s and res.is_file():
        d = tomllib.loads(res.read_text())
        return from_profile_dict(d, s, f"profiles/{s}.toml")
    raise InputError(
        f"unknown model {s!r}: not a profile, config.json or checkpoint folder; see `granite profiles list`"
    )


# A config.json is a few kB; anything far larger is not one (and is not read into memory to find out).
MAX_CONFIG_BYTES = 16 * 2**20


def read_json_config(path: Path) -> Any:
    """The parsed JSON of a config file, or an InputError naming what is wrong with it."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise InputError(f"{path}: {size} bytes is too large for a config.json; pass a checkpoint folder, a "
                             "config.json or a profile name")
        text = path.read_bytes().decode("utf-8")
        return json.loads(text)
    except OSError as e:
        raise InputError(f"{path}: cannot read config ({e.strerror})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a JSON config (not UTF-8 text); pass a checkpoint folder, a config.json or "
                         "a profile name") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix the file or re-download "
                         "it") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to be a config") from None


def _load_json(path: Path, name: str) -> ModelConfig:
    return from_hf_dict(read_json_config(path), name=name, source=str(path))


def export_hf_config(cfg: ModelConfig, out_dir: Path, overwrite: bool = True) -> Path:
    """Write `config.json` for cfg into out_dir (atomically) and return its path. With
    overwrite=False an existing config.json is refused (InputError) rather than replaced."""
    import tempfile

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} is a file; give a folder to write config.json into")
    dst = out_dir / "config.json"
    if dst.is_symlink() or (dst.exists() and not dst.is_file()):
        raise InputError(f"{dst} is not a regular file; choose another folder")
    if dst.exists() and not overwrite:
        raise InputError(f"{dst} already exists; pass --force to replace it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"{out_dir}: a parent is a file, not a folder; choose a path inside a folder") from None
    fd, tmp = tempfile.mkstemp(prefix=".config.json.", suffix=".partial", dir=out_dir)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(cfg.to_hf_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst
