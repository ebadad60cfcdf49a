"""Profiles and Hugging Face configs: parsing, both layer-type vocabularies, validation, export.

Run: python -m pytest -q tests/test_config.py
"""

from __future__ import annotations

import json

import pytest

from granite_cli.config import from_hf_dict, load_config, profile_names
from granite_cli.config.hf import to_hf_dict
from granite_cli.errors import GraniteWarning, InputError
from tests.conftest import HF_CLASSES, tiny

ALL = [
    "granite-4.0-h-small", "granite-4.0-h-tiny", "granite-4.0-h-micro", "granite-4.0-micro", "granite-4.0-h-1b",
    "granite-4.0-h-350m", "granite-4.0-1b", "granite-4.0-350m", "granite-3.3-8b", "llama-3.1-8b", "llama-3.2-3b",
    "qwen3-4b", "qwen3-8b", "qwen3-30b-a3b", "qwen3-32b", "tiny-hybrid", "tiny-dense", "cpu-hybrid", "cpu-dense",
]


def test_every_profile_ships_and_parses():
    assert sorted(profile_names()) == sorted(ALL)
    for n in ALL:
        assert load_config(n).name == n


def test_cpu_pair_geometry():
    h, d = load_config("cpu-hybrid"), load_config("cpu-dense")
    assert h.attention_layers == (4, 9) and len(h.mamba_layers) == 8
    assert d.attention_layers == tuple(range(10)) and not d.is_hybrid
    for c in (h, d):
        assert (c.vocab_size, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (1024, 512, 8, 2)
        assert (c.num_local_experts, c.num_experts_per_tok, c.intermediate_size,
                c.shared_intermediate_size) == (8, 2, 256, 1024)
        assert c.position_embedding_type == "nope" and c.max_position_embeddings == 131072
    assert (h.mamba_n_heads, h.mamba_d_state, h.mamba_n_groups, h.mamba_d_conv, h.mamba_expand, h.mamba_chunk_size) == \
        (16, 128, 1, 4, 2, 256)


def test_uncertain_values_carry_comments():
    from granite_cli.config import profiles_dir

    text = (profiles_dir() / "granite-4.0-h-small.toml").read_text()
    for key in ("mamba_n_groups", "embedding_multiplier", "logits_scaling", "mamba_chunk_size"):
        line = next(line for line in text.splitlines() if line.startswith(key))
        assert "NOT FOUND" in line


@pytest.mark.parametrize("types",
                         [["mamba", "attention", "mamba"], ["linear_attention", "full_attention", "linear_attention"]])
def test_both_layer_type_vocabularies(types):
    cfg = tiny("granitemoehybrid", num_hidden_layers=3, attention_layers=[1])
    d = to_hf_dict(cfg)
    d["layer_types"] = types
    assert from_hf_dict(d).layer_types == ("mamba", "attention", "mamba")


BAD = {
    "unknown key": ("mamba_d_sate = 16\n", "unknown key 'mamba_d_sate'"),
    "heads do not divide inner": ("mamba_n_heads = 5\nmamba_d_head = 25\n", "does not divide the inner size"),
    "layer list length": ('layer_types = ["mamba", "attention"]\n', "layer_types has 2 entries"),
    "top-k above experts": ("num_experts_per_tok = 9\n", "top-k must not exceed"),
}


def _tiny_toml(extra: str) -> str:
    base = {
        "architecture": '"granitemoehybrid"', "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 32, "shared_intermediate_size": 32,
        "num_local_experts": 4, "num_experts_per_tok": 2, "mamba_n_heads": 4, "mamba_d_head": 32, "mamba_d_state": 16,
    }
    keys = {line.split("=")[0].strip() for line in extra.splitlines() if "=" in line}
    text = "".join(f"{k} = {v}\n" for k, v in base.items() if k not in keys)
    if "layer_types" not in extra:
        text += "attention_layers = [1]\n"
    return text + extra


@pytest.mark.parametrize("case", list(BAD))
def test_bad_profiles_are_one_line_input_errors(tmp_path, case):
    extra, msg = BAD[case]
    p = tmp_path / "bad.toml"
    p.write_text(_tiny_toml(extra))
    with pytest.raises(InputError, match=msg):
        load_config(p)


def test_hf_config_warns_of_unknown_keys_and_rejects_unknown_architectures():
    d = to_hf_dict(tiny("llama"))
    with pytest.warns(GraniteWarning, match="'rope_thetaa' is not one granite reads.*did you mean 'rope_theta'"):
        cfg = from_hf_dict({**d, "rope_thetaa": 1.0})
    assert cfg.rope_theta == tiny("llama").rope_theta  # ignored, as transformers ignores it
    with pytest.raises(InputError, match="unsupported model_type 'mamba2'"):
        from_hf_dict({**d, "model_type": "mamba2"})


def test_missing_hf_keys_take_transformers_class_defaults():
    # tie_word_embeddings defaults to False in GraniteMoeHybridConfig (transformers' GraniteMoeHybridConfig)
    d = to_hf_dict(tiny("granitemoehybrid"))
    del d["tie_word_embeddings"], d["rms_norm_eps"]
    cfg = from_hf_dict(d)
    assert cfg.tie_word_embeddings is False and cfg.rms_norm_eps == 1e-6


@pytest.mark.parametrize("name", ALL)
def test_export_loads_in_transformers_config_class(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    from granite_cli.config import export_hf_config

    cfg = load_config(name)
    path = export_hf_config(cfg, tmp_path)
    d = json.loads(path.read_text())
    cls = getattr(transformers, HF_CLASSES[cfg.architecture].replace("ForCausalLM", "Config"))
    hf = cls.from_pretrained(str(tmp_path))
    assert hf.num_hidden_layers == cfg.num_hidden_layers and hf.hidden_size == cfg.hidden_size
    if cfg.architecture == "granitemoehybrid":
        assert [t == "full_attention" for t in hf.layer_types] == [t == "attention" for t in cfg.layer_types]
    # and it parses back to the same config
    assert from_hf_dict(d, name=name) == cfg
