"""Hugging Face `config.json` <-> ModelConfig.

A config.json is read by its `model_type` (the architecture family, granite_cli.arch): keys are the
common ones or the family's own, each of its JSON type; a missing key takes the family's transformers
class default, as transformers would. A key granite does not know is a warning (naming it, with the
known key it is closest to), never an error: transformers accepts such keys and real checkpoints
carry them (fine-tuning tools add their own). A known key whose value the core cannot honour (a
sliding attention window, another activation, MLP biases) is an error: it would give wrong logits.
Export writes a `config.json` that the family's transformers config class loads, with layer types in
the legacy `mamba`/`attention` vocabulary, the one IBM publishes and llama.cpp's converter
reads (transformers 5 maps it on load).
"""

from __future__ import annotations

import difflib
import json
import warnings
from typing import Any

from granite_cli.arch import ARCHITECTURES, ARCHS, get_arch
from granite_cli.arch.base import COMMON_KEYS
from granite_cli.config.model import MAX_DIM, ModelConfig, check_layer_count, check_types, invalid, validate
from granite_cli.errors import GraniteWarning, InputError

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
    # bookkeeping and generation defaults that PretrainedConfig writes or older configs carry
    "_attn_implementation_autoset", "attn_implementation", "use_return_dict", "output_scores", "max_length",
    "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "keys_to_ignore_at_inference", "cache_implementation",
}
# Keys whose values change the forward pass in a way the core does not implement: the values it does.
_HF_HONOURED = {"hidden_act": ("silu",), "mlp_bias": (False, None), "normalization_function": ("rmsnorm", None)}

# The JSON type of each key the parser reads. null means "not given" (the transformers default) only
# for the keys in _HF_NULLABLE; anywhere else it is an error, as it would be in transformers' forward.
_HF_TYPES: dict[str, str] = {
    **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "shared_intermediate_size",
                     "num_local_experts", "num_experts_per_tok", "mamba_n_heads", "mamba_n_groups", "mamba_d_state",
                     "mamba_d_conv", "mamba_expand", "mamba_chunk_size", "moe_intermediate_size", "num_experts",
                     "decoder_sparse_step", "sliding_window", "max_window_layers"), "integer"),
    **dict.fromkeys(("rms_norm_eps", "rope_theta", "embedding_multiplier", "attention_multiplier",
                     "residual_multiplier", "logits_scaling"), "number"),
    **dict.fromkeys(("tie_word_embeddings", "attention_bias", "mamba_conv_bias", "mamba_proj_bias",
                     "norm_topk_prob", "use_sliding_window"), "true or false"),
    **dict.fromkeys(("position_embedding_type", "torch_dtype", "dtype"), "string"),
    **dict.fromkeys(("rope_scaling", "rope_parameters"), "object"),
    **dict.fromkeys(("layer_types", "layers_block_type", "attn_layer_indices", "mlp_only_layers", "time_step_limit"),
                    "list"),
}
_HF_NULLABLE = {"num_key_value_heads", "head_dim", "position_embedding_type", "torch_dtype", "dtype", "rope_scaling",
                "sliding_window",
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
                raise invalid(source, f"{k} must be {_a(_HF_TYPES[k])}, got null; give a value or remove the key")
            continue
        if k == "mamba_d_head":
            if v != "auto" and not _json_type_ok(v, "integer"):
                raise invalid(source, f"mamba_d_head must be an integer or \"auto\", got {v!r}")
        elif k in _HF_TYPES and not _json_type_ok(v, _HF_TYPES[k]):
            raise invalid(source, f"{k} must be {_a(_HF_TYPES[k])}, got {json.dumps(v)[:60]}")
    for k in ("num_attention_heads", "num_hidden_layers", "hidden_size"):  # divisors and counts used below
        if k in d and d[k] <= 0:
            raise invalid(source, f"{k} must be a positive integer, got {d[k]}")
    for k, v in d.items():
        if _HF_TYPES.get(k) == "integer" and isinstance(v, int) and v > MAX_DIM:
            raise invalid(source, f"{k} must be at most {MAX_DIM}, got {v}")
    check_layer_count(d.get("num_hidden_layers", 0), source)
    if d.get("mamba_n_heads") is not None and d["mamba_n_heads"] < 0:
        raise invalid(source, f"mamba_n_heads must not be negative, got {d['mamba_n_heads']}")


def _a(kind: str) -> str:
    return {"integer": "an integer", "number": "a number", "true or false": "true or false", "string": "a string",
            "object": "a JSON object", "list": "a list"}[kind]


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


def unknown_keys(d: dict[str, Any]) -> list[tuple[str, str | None]]:
    """The keys of config dict `d` granite does not read, each with the known key it is closest to (a
    likely misspelling) or None."""
    arch = ARCHS.get(d.get("model_type")) if isinstance(d.get("model_type"), str) else None
    if arch is None:
        return []
    known = COMMON_KEYS | arch.hf_keys | _HF_IGNORED
    return [(k, next(iter(difflib.get_close_matches(k, sorted(known), n=1, cutoff=0.8)), None))
            for k in sorted(d) if k not in known]


# (model_type, key) pairs already warned of: a run reads one config several times (the estimate, the
# load, a conversion's verification of its own staged output); the user hears of each key once, as
# found in their own file.
_WARNED: set[tuple[str, str]] = set()


def _warn_unknown(d: dict[str, Any], source: str) -> None:
    for k, near in unknown_keys(d):
        if (d["model_type"], k) in _WARNED:
            continue
        _WARNED.add((d["model_type"], k))
        hint = f"; did you mean {near!r}?" if near else " (transformers ignores it too)"
        warnings.warn(f"{source}: key {k!r} is not one granite reads for model_type {d['model_type']}, so it is "
                      f"ignored{hint}", GraniteWarning, stacklevel=3)


def _check_honoured(d: dict[str, Any], source: str) -> None:
    for k, ok in _HF_HONOURED.items():
        if k in d and d[k] not in ok:
            raise invalid(source, f"{k} = {json.dumps(d[k])[:40]} is not supported (granite's core implements "
                                  f"{k} = {json.dumps(ok[0])} only); its logits would be wrong")


def from_hf_dict(d: dict[str, Any], name: str = "", source: str = "config.json") -> ModelConfig:
    """Parse a Hugging Face config dict. Unknown keys are warnings (GraniteWarning, naming the closest
    known key); values of the wrong JSON type, and values the core cannot honour, are errors."""
    if not isinstance(d, dict):
        raise invalid(source, "expected a JSON object")
    mt = d.get("model_type")
    if not isinstance(mt, str) or mt not in ARCHS:
        raise invalid(source, f"unsupported model_type {mt!r}; supported: {', '.join(ARCHITECTURES)}")
    arch = ARCHS[mt]
    _warn_unknown(d, source)
    _check_hf_types(d, source)
    _check_honoured(d, source)
    defaults = arch.defaults()
    g = {**defaults, **{k: v for k, v in d.items() if v is not None or k not in defaults}}
    slid = arch.sliding_layers(d, g)
    if slid and d["sliding_window"] < g["max_position_embeddings"]:
        raise invalid(source, f"use_sliding_window with a {d['sliding_window']}-token window on {len(slid)} "
                              f"layer(s) (from layer {slid[0]}) is not supported: granite's core attends to the whole "
                              "context on every layer, so its logits would be wrong beyond the window")
    heads = g["num_attention_heads"]
    try:
        theta, scaling = _rope_from_hf(d, g.get("rope_theta", 10000.0))
    except InputError as e:
        raise invalid(source, str(e)) from None
    cfg = ModelConfig(
        name=name, architecture=mt, vocab_size=g["vocab_size"], hidden_size=g["hidden_size"],
        num_hidden_layers=g["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=g.get("num_key_value_heads") or heads,
        head_dim=g.get("head_dim") or (g["hidden_size"] // heads), intermediate_size=g["intermediate_size"],
        max_position_embeddings=g["max_position_embeddings"], rms_norm_eps=float(g["rms_norm_eps"]),
        tie_word_embeddings=bool(g["tie_word_embeddings"]), rope_theta=theta, rope_scaling=scaling,
        attention_bias=bool(g.get("attention_bias", False)),
        torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"), **arch.parse(d, g, source),
    )
    check_types(cfg, source)
    return validate(cfg, source)


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """A Hugging Face `config.json` dict that the architecture's transformers config class loads."""
    arch = get_arch(cfg.architecture)
    d: dict[str, Any] = {
        "architectures": [arch.hf_class], "model_type": cfg.architecture, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
        "rope_theta": cfg.rope_theta, "torch_dtype": cfg.torch_dtype,
    }
    if cfg.rope_scaling:
        d["rope_scaling"] = dict(cfg.rope_scaling)
    d.update(arch.export(cfg))
    return d
