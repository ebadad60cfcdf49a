"""One GPU's share of a model under tensor parallelism, as the serving engines shard it (vLLM's rules;
docs/sharding.md states them with their source):

- attention: query heads split over the ranks; KV heads split too, or replicated (one per rank)
  when there are fewer KV heads than ranks, so the KV cache per rank is max(1, kv_heads / tp) heads;
- Mamba-2: heads split, with their conv channels, dt, A, D, gated norm and SSM state; the B/C groups
  split when the ranks divide them, else replicated so that each rank holds one;
- feed-forward: every expert's and the shared expert's (or dense MLP's) width split, router replicated;
- vocabulary (embedding, LM head, logits) split; hidden-size norms replicated.

The share is a ModelConfig with those counts divided (`rank_config`), so the single-GPU formulas
(memory.predict) give the per-GPU weights, KV cache, state and working set unchanged.
"""

from __future__ import annotations

import dataclasses
import math

from granite_cli.config import ModelConfig
from granite_cli.errors import InputError

MAX_TP = 64


def kv_heads_per_rank(kv_heads: int, tp: int) -> int:
    return max(1, kv_heads // tp)


def groups_per_rank(groups: int, tp: int) -> int:
    return groups // tp if groups % tp == 0 else 1


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Refuse (exit 2) a rank count the engines cannot shard this model over."""
    if not 1 <= tp <= MAX_TP:
        raise InputError(f"--tp must be between 1 and {MAX_TP}, got {tp}")
    why = []
    if cfg.attention_layers and cfg.num_attention_heads % tp:
        why.append(f"its {cfg.num_attention_heads} attention heads")
    kv = cfg.num_key_value_heads
    if cfg.attention_layers and kv >= tp and kv % tp:
        why.append(f"its {kv} KV heads")
    if cfg.is_hybrid and cfg.mamba_n_heads % tp:
        why.append(f"its {cfg.mamba_n_heads} Mamba heads")
    g = cfg.mamba_n_groups
    if cfg.is_hybrid and g % tp and tp % g:
        why.append(f"its {g} Mamba groups")
    if why:
        raise InputError(f"{cfg.name} cannot be split over {tp} GPUs: {' and '.join(why)} do not divide evenly; "
                         "choose a --tp that divides them")


def rank_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The model as one of `tp` ranks holds it (not a runnable model: only its sizes are meaningful)."""
    check_tp(cfg, tp)
    if tp == 1:
        return cfg
    return dataclasses.replace(
        cfg,
        name=f"{cfg.name} (1 of {tp} GPUs)",
        vocab_size=math.ceil(cfg.vocab_size / tp),
        num_attention_heads=cfg.num_attention_heads // tp if cfg.attention_layers else cfg.num_attention_heads,
        num_key_value_heads=kv_heads_per_rank(cfg.num_key_value_heads, tp),
        intermediate_size=math.ceil(cfg.intermediate_size / tp),
        shared_intermediate_size=math.ceil(cfg.shared_intermediate_size / tp),
        moe_intermediate_size=math.ceil(cfg.moe_intermediate_size / tp),
        mamba_n_heads=cfg.mamba_n_heads // tp,
        mamba_n_groups=groups_per_rank(cfg.mamba_n_groups, tp) if cfg.is_hybrid else cfg.mamba_n_groups,
    )
