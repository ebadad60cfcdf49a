"""Our logits and greedy generations against transformers on the same safetensors (fp32, CPU).

Run: python -m pytest -q tests/test_model_vs_hf.py
"""

from __future__ import annotations

import json

import pytest
import torch

from granite_cli.config.hf import to_hf_dict
from granite_cli.model.loading import load_model, save_checkpoint
from tests.conftest import assert_close, hf_load, tiny

CASES = {
    "hybrid-moe-g1": dict(arch="granitemoehybrid"),
    "hybrid-moe-g2": dict(arch="granitemoehybrid", mamba_n_groups=2, attention_layers=[0, 2]),
    "hybrid-dense-mlp": dict(arch="granitemoehybrid", num_local_experts=0, num_experts_per_tok=0,
                             attention_layers=[2], mamba_chunk_size=8),
    "hybrid-untied-bias": dict(arch="granitemoehybrid", tie_word_embeddings=False, mamba_proj_bias=True,
                               attention_bias=True),
    "granite4-dense-rope": dict(arch="granitemoehybrid", attention_layers="all", position_embedding_type="rope",
                                rope_theta=10000.0, num_local_experts=0, num_experts_per_tok=0),
    "llama": dict(arch="llama"),
    "qwen3": dict(arch="qwen3"),
    "qwen3-moe": dict(arch="qwen3_moe"),
    "qwen3-moe-nonorm": dict(arch="qwen3_moe", norm_topk_prob=False),
    "granite3": dict(arch="granite"),
}


def _pair(tmp_path, case):
    over = dict(CASES[case])
    arch = over.pop("arch")
    cfg = tiny(arch, **over)
    ours = load_model(cfg, weights="random", dtype="fp32", seed=3, std=0.1)
    save_checkpoint(ours, tmp_path)
    return cfg, ours, hf_load(arch, tmp_path)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    cfg, ours, hf = _pair(tmp_path, case)
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 45))  # 45 is not a multiple of any chunk size used
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    assert got.shape == want.shape == (2, 45, cfg.vocab_size)
    assert want.std() > 0.03  # logits spread far beyond the tolerance, so the comparison means something
    assert_close(got, want, 1e-4, case)


@pytest.mark.parametrize("case", ["hybrid-moe-g2", "hybrid-dense-mlp", "llama", "qwen3-moe", "granite3"])
def test_greedy_generation_matches_transformers(tmp_path, case):
    cfg, ours, hf = _pair(tmp_path, case)
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=20)[:, 12:]
    got = ours.generate(ids, 20)
    assert torch.equal(got, want), f"{case}: ours {got.tolist()} vs transformers {want.tolist()}"


@pytest.mark.parametrize("vocab", ["legacy", "transformers5"])
def test_checkpoint_saved_by_transformers_loads(tmp_path, vocab):
    transformers = pytest.importorskip("transformers")
    cfg = tiny("granitemoehybrid", mamba_n_groups=2)
    hf_cfg = transformers.GraniteMoeHybridConfig(**{k: v for k, v in to_hf_dict(cfg).items()
                                                      if k not in ("architectures", "model_type", "torch_dtype")})
    torch.manual_seed(0)
    hf = transformers.GraniteMoeHybridForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    cj = tmp_path / "config.json"
    d = json.loads(cj.read_text())
    assert d["layer_types"][1] == "full_attention"  # what transformers 5 writes
    if vocab == "legacy":
        d["layer_types"] = ["attention" if t == "full_attention" else "mamba" for t in d["layer_types"]]
        cj.write_text(json.dumps(d))
    ours = load_model(tmp_path, weights="checkpoint", dtype="fp32")
    assert ours.cfg.layer_types == ("mamba", "attention", "mamba", "attention")
    ids = torch.randint(0, cfg.vocab_size, (1, 30))
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, 1e-4, vocab)
