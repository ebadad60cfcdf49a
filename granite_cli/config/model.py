"""ModelConfig: one frozen dataclass for every architecture the core runs, and its validation.

What differs between architecture families (widths, routing, rules) is asked of granite_cli.arch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from granite_cli.arch import ARCHITECTURES, get_arch
from granite_cli.arch.base import Routing
from granite_cli.errors import InputError


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
        return get_arch(self.architecture).expert_width(self)

    @property
    def mlp_width(self) -> int:
        """Width of the dense MLP, or of the shared expert next to the routed ones (0 = none)."""
        return get_arch(self.architecture).mlp_width(self)

    @property
    def routing(self) -> Routing:
        """How the routed experts' router picks and weights them."""
        return get_arch(self.architecture).routing(self)

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



# ---------------------------------------------------------------------------------------------
# validation


def invalid(source: str, msg: str) -> InputError:
    """The error for an invalid config: the message prefixed with where the config came from."""
    return InputError(f"{source}: {msg}")


def validate(cfg: ModelConfig, source: str | None = None) -> ModelConfig:
    """Reject impossible geometry with a one-line error naming the field and the fix."""
    src = source or cfg.name or "config"
    if cfg.architecture not in ARCHITECTURES:
        raise invalid(src, f"unknown architecture {cfg.architecture!r}; supported: {', '.join(ARCHITECTURES)}")
    _check_layers(cfg, src)
    get_arch(cfg.architecture).check(cfg, lambda msg: invalid(src, msg))
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
            raise invalid(src, f"{f} must be a positive integer, got {v!r}")
    if len(cfg.layer_types) != cfg.num_hidden_layers:
        raise invalid(src, f"layer_types has {len(cfg.layer_types)} entries but num_hidden_layers is "
                      f"{cfg.num_hidden_layers}; give one type per layer")
    bad = [t for t in cfg.layer_types if t not in ("mamba", "attention")]
    if bad:
        raise invalid(src, f"unknown layer type {bad[0]!r}; use mamba/attention or linear_attention/full_attention")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise invalid(src, f"num_attention_heads {cfg.num_attention_heads} is not a multiple of num_key_value_heads "
                      f"{cfg.num_key_value_heads}")


def _check_experts(cfg: ModelConfig, src: str) -> None:
    e, k = cfg.num_local_experts, cfg.num_experts_per_tok
    if e < 0 or k < 0:
        raise invalid(src, "expert counts must not be negative")
    if k > e:
        raise invalid(src, f"num_experts_per_tok {k} is above num_local_experts {e}; top-k must not exceed the expert "
                      "count")
    if e and k == 0:
        raise invalid(src, "num_local_experts > 0 needs num_experts_per_tok >= 1")
    if e and cfg.expert_width <= 0:
        raise invalid(src, "routed experts need a positive expert width")
    if cfg.mlp_width <= 0 and not e:
        raise invalid(src, "the model has neither experts nor an MLP; set intermediate_size/shared_intermediate_size")


def _check_positions(cfg: ModelConfig, src: str) -> None:
    if cfg.position_embedding_type not in ("nope", "rope"):
        raise invalid(src, f"position_embedding_type must be 'nope' or 'rope', got {cfg.position_embedding_type!r}")
    if cfg.uses_rope and cfg.head_dim % 2:
        raise invalid(src, f"RoPE needs an even head_dim, got {cfg.head_dim}")
    if cfg.rope_scaling:
        rs = dict(cfg.rope_scaling)
        kind = rs.get("rope_type", rs.get("type"))
        if kind not in ("default", "llama3"):
            raise invalid(src, f"rope scaling type {kind!r} is not supported (default, llama3)")


def _check_mamba(cfg: ModelConfig, src: str) -> None:
    for f in ("mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_chunk_size"):
        v = getattr(cfg, f)
        if not isinstance(v, int) or v <= 0:
            raise invalid(src, f"{f} must be a positive integer for a model with Mamba layers, got {v!r}")
    inner = cfg.mamba_expand * cfg.hidden_size
    if inner % cfg.mamba_n_heads:
        raise invalid(src, f"mamba_n_heads {cfg.mamba_n_heads} does not divide the inner size {inner} "
                      f"(mamba_expand {cfg.mamba_expand} x hidden_size {cfg.hidden_size})")
    if cfg.d_inner != inner:
        raise invalid(src, f"mamba_n_heads x mamba_d_head = {cfg.d_inner} but mamba_expand x hidden_size = {inner}; "
                      "they must match")
    if cfg.mamba_n_heads % cfg.mamba_n_groups:
        raise invalid(src, f"mamba_n_groups {cfg.mamba_n_groups} does not divide mamba_n_heads {cfg.mamba_n_heads}")


MAX_DIM = 2**31 - 1  # beyond any model, and past it torch's index arithmetic would overflow
MAX_LAYERS = 65536    # beyond any model; the per-layer tables are built before anything else is checked


def check_layer_count(n: Any, source: str) -> None:
    if isinstance(n, int) and n > MAX_LAYERS:
        raise invalid(source, f"num_hidden_layers must be at most {MAX_LAYERS}, got {n}")


def _check_values(cfg: ModelConfig, src: str) -> None:
    """Ranges of the scalar fields (validate holds the geometry rules)."""
    for f in dataclasses.fields(ModelConfig):
        v = getattr(cfg, f.name)
        if f.type == "int" and isinstance(v, int) and not 0 <= v <= MAX_DIM:
            raise invalid(src, f"{f.name} must be between 0 and {MAX_DIM}, got {v}")
        if f.type == "float" and isinstance(v, (int, float)) and not math.isfinite(v):
            raise invalid(src, f"{f.name} must be a finite number, got {v}")
    if cfg.max_position_embeddings < 1:
        raise invalid(src, "max_position_embeddings must be a positive integer")
    if cfg.is_hybrid and cfg.mamba_expand < 1:
        raise invalid(src, "mamba_expand must be a positive integer for a model with Mamba layers")
    if not cfg.rms_norm_eps > 0:
        raise invalid(src, "rms_norm_eps must be positive")
    if not cfg.rope_theta > 0:
        raise invalid(src, f"rope_theta must be positive, got {cfg.rope_theta}")
    if cfg.logits_scaling == 0:
        raise invalid(src, "logits_scaling must not be 0 (the logits are divided by it)")
    if cfg.attention_multiplier < 0:
        raise invalid(src, f"attention_multiplier must not be negative, got {cfg.attention_multiplier}")
    lo, hi = cfg.time_step_limit
    if not 0 <= lo <= hi or math.isnan(hi):
        raise invalid(src, f"time_step_limit must be [low, high] with 0 <= low <= high, got {[lo, hi]}")
    rs = cfg.rope_scaling_dict
    if rs and rs.get("rope_type", rs.get("type")) == "llama3":
        for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            v = rs.get(k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise invalid(src, f"rope_scaling.{k} must be a positive number for llama3 scaling, got {v!r}")
        if rs["high_freq_factor"] == rs["low_freq_factor"]:
            raise invalid(src, "rope_scaling high_freq_factor must differ from low_freq_factor")


def check_types(cfg: ModelConfig, source: str) -> None:
    """Every field of cfg has its declared type (an InputError naming the first that does not)."""
    check_value_types({f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)}, source)


def check_value_types(d: dict[str, Any], source: str) -> None:
    """The scalar fields of d (ModelConfig field names) have their field's type."""
    for f in dataclasses.fields(ModelConfig):
        if f.name not in d:
            continue
        v = d[f.name]
        if f.type in ("int",) and (not isinstance(v, int) or isinstance(v, bool)):
            raise invalid(source, f"{f.name} must be an integer, got {v!r}")
        if f.type in ("float",) and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise invalid(source, f"{f.name} must be a number, got {v!r}")
        if f.type in ("bool",) and not isinstance(v, bool):
            raise invalid(source, f"{f.name} must be true or false, got {v!r}")
        if f.type in ("str",) and not isinstance(v, str):
            raise invalid(source, f"{f.name} must be a string, got {v!r}")
