"""What an architecture family is to granite: everything that differs between Granite 4.0,
Granite 3.x, Llama, Qwen3 and Qwen3-MoE, in one class a family module subclasses.

A family says how its Hugging Face config.json is named and parsed (its transformers class, the
class defaults for keys a config may omit, the keys it reads beyond the common ones), how it is
written back, which rules its geometry obeys, how wide its MLP and experts are, how its experts
route, how its feed-forward tensors are named in a checkpoint, and which llama.cpp GGUF architecture
runs it. The rest of the project asks `granite_cli.arch.get_arch(name)`.

Nothing here imports the config (it hands back plain values), so config can import the registry.
"""

from __future__ import annotations

import enum
import math
from typing import TYPE_CHECKING, Any

from granite_cli.errors import InputError

if TYPE_CHECKING:
    from granite_cli.config import ModelConfig


class Routing(str, enum.Enum):
    """How a router's logits become expert weights."""

    TOPK_SOFTMAX = "topk_softmax"            # top-k of the logits, softmax over those k (Granite)
    SOFTMAX_TOPK = "softmax_topk"            # softmax over all experts, then top-k (Qwen3-MoE)
    SOFTMAX_TOPK_NORM = "softmax_topk_norm"  # the same, the k weights renormalised to sum to 1


# Keys every family's config.json may hold and the common parser reads.
COMMON_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "attention_bias", "layer_types",
})
SLIDING = "sliding_attention"
# Defaults every family's transformers class shares (a family's own hf_defaults add to or override these).
COMMON_DEFAULTS: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=None, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_theta=10000.0, attention_bias=False,
)
FFNEntry = tuple[str, str, tuple, tuple]  # (checkpoint suffix, parameter suffix, shape, index)


class Arch:
    name: str = ""
    hf_class: str = ""
    hf_defaults: dict[str, Any] = {}   # transformers class defaults (5.24.0), on top of COMMON_DEFAULTS
    hf_keys: frozenset = frozenset()   # keys read beyond COMMON_KEYS
    mamba: bool = False                # may have Mamba layers
    experts: bool = False              # may have routed experts
    needs_experts: bool = False        # must have routed experts
    profile_defaults: dict[str, Any] = {"position_embedding_type": "rope"}

    def defaults(self) -> dict[str, Any]:
        return {**COMMON_DEFAULTS, **self.hf_defaults}

    def parse(self, d: dict[str, Any], g: dict[str, Any], source: str) -> dict[str, Any]:
        """The ModelConfig fields of this family beyond the common ones, from config.json `d` and
        `g` (d over the class defaults). Layer types included: attention on every layer (transformers 5
        writes them out, full or sliding; sliding_layers() says where a window applies)."""
        n = g["num_hidden_layers"]
        raw = d.get("layer_types")
        if raw is not None:
            if not isinstance(raw, list) or len(raw) != n:
                got = f"has {len(raw)} entries" if isinstance(raw, list) else "is not a list"
                raise InputError(f"{source}: layer_types {got} for num_hidden_layers {n}; give one type per layer")
            bad = next((t for t in raw if t not in ("full_attention", "attention", SLIDING)), None)
            if bad is not None:
                raise InputError(f"{source}: layer type {str(bad)[:40]!r} is not one architecture {self.name} has "
                                 "(full_attention or sliding_attention)")
        return {"layer_types": ("attention",) * n, "position_embedding_type": "rope"}

    def sliding_layers(self, d: dict[str, Any], g: dict[str, Any]) -> list[int]:
        """The layers transformers limits to a `sliding_window` of keys for config.json `d` (none for
        most families)."""
        return []

    def export(self, cfg: "ModelConfig") -> dict[str, Any]:
        """The config.json keys of this family beyond the common ones."""
        return {"head_dim": cfg.head_dim}

    def expert_width(self, cfg: "ModelConfig") -> int:
        """Width of one routed expert (0 when the model has none)."""
        return cfg.intermediate_size if cfg.num_local_experts else 0

    def mlp_width(self, cfg: "ModelConfig") -> int:
        """Width of the dense MLP, or of the shared expert beside the routed ones (0 = none)."""
        return cfg.intermediate_size

    def routing(self, cfg: "ModelConfig") -> Routing:
        return Routing.TOPK_SOFTMAX

    def gguf_arch(self, cfg: "ModelConfig") -> str | None:
        """llama.cpp's architecture for this model, or None where granite writes no GGUF for the family."""
        return None

    def check(self, cfg: "ModelConfig", fail) -> None:
        """This family's rules beyond the common geometry; fail(message) raises."""
        if not self.mamba and "mamba" in cfg.layer_types:
            raise fail(f"architecture {self.name} has no Mamba layers; use granitemoehybrid")
        if not self.experts and cfg.num_local_experts:
            raise fail(f"architecture {self.name} has no experts; use qwen3_moe or granitemoehybrid")
        if self.needs_experts and not cfg.num_local_experts:
            raise fail(f"{self.name} needs num_local_experts > 0")

    def ffn_entries(self, cfg: "ModelConfig") -> list[FFNEntry]:
        """One layer's feed-forward tensors: a Llama-style MLP with separate gate, up and down, whose
        gate and up are the two halves of our fused w_in."""
        w, d = cfg.mlp_width, cfg.hidden_size
        return [("mlp.gate_proj.weight", "mlp.w_in.weight", (w, d), (slice(0, w),)),
                ("mlp.up_proj.weight", "mlp.w_in.weight", (w, d), (slice(w, 2 * w),)),
                ("mlp.down_proj.weight", "mlp.w_out.weight", (d, w), ())]


def fail_in(source: str):
    def fail(msg: str) -> InputError:
        return InputError(f"{source}: {msg}")

    return fail


# ---------------------------------------------------------------------------------------------
# helpers the families' parsers share

LAYER_TYPE_ALIASES = {
    "mamba": "mamba",
    "linear_attention": "mamba",
    "attention": "attention",
    "full_attention": "attention",
}


def layer_types(raw: Any, n_layers: int, src: str) -> tuple[str, ...]:
    """Both vocabularies (legacy mamba/attention and transformers 5's linear_/full_attention) → mamba/attention."""
    if not isinstance(raw, (list, tuple)):
        raise InputError(f"{src}: layer_types must be a list of strings")
    out = []
    for t in raw:
        norm = LAYER_TYPE_ALIASES.get(t) if isinstance(t, str) else None
        if norm is None:
            raise InputError(f"{src}: unknown layer type {t!r}; use mamba/attention or linear_attention/full_attention")
        out.append(norm)
    return tuple(out)


def layers_from_indices(indices: Any, n_layers: int, src: str) -> tuple[str, ...]:
    """Attention at the given layer indices ("all": every layer), Mamba elsewhere."""
    if indices == "all":
        return ("attention",) * n_layers
    if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise InputError(f"{src}: attention_layers must be a list of layer indices or \"all\"")
    for i in indices:
        if not 0 <= i < n_layers:
            raise InputError(f"{src}: attention layer index {i} is outside 0..{n_layers - 1}")
    return tuple("attention" if i in set(indices) else "mamba" for i in range(n_layers))


def time_step_limit(raw: Any, src: str) -> tuple[float, float]:
    """A [low, high] clamp for the Mamba time step ((0, inf) when absent); transformers 5 writes
    infinity as {"__float__": "Infinity"}."""
    def num(v: Any) -> float:
        if isinstance(v, dict) and "__float__" in v:
            return float(v["__float__"])
        return float(v)

    if raw is None:
        return (0.0, math.inf)
    if not isinstance(raw, (list, tuple)) or len(raw) != 2:
        raise InputError(f"{src}: time_step_limit must be a pair [low, high], got {raw!r}")
    try:
        return (num(raw[0]), num(raw[1]))
    except (TypeError, ValueError):
        raise InputError(f"{src}: time_step_limit must hold two numbers, got {raw!r}") from None
