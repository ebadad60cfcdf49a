"""The granitehybrid GGUF we write: read back with the gguf package, and run by llama.cpp
(llama-cpp-python, when installed) with the same logits as our core.

Run: python -m pytest -q tests/test_gguf.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from granite_cli.gguf_export import write_granitehybrid_gguf
from granite_cli.model.loading import load_model
from tests.conftest import tiny

gguf = pytest.importorskip("gguf")


def _model():
    cfg = tiny("granitemoehybrid", vocab_size=256, mamba_n_groups=2, attention_layers=[1, 3], max_position_embeddings=256)
    return load_model(cfg, weights="random", dtype="fp32", seed=4, std=0.1)


def test_gguf_metadata_and_tensors_read_back(tmp_path):
    m = _model()
    path = write_granitehybrid_gguf(m, tmp_path / "m.gguf", "f32")
    r = gguf.GGUFReader(str(path))
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    assert arch == "granitehybrid"
    kv = r.fields["granitehybrid.attention.head_count_kv"]
    assert [int(kv.parts[i][0]) for i in kv.data] == [0, 2, 0, 2]
    assert int(r.fields["granitehybrid.ssm.time_step_rank"].parts[-1][0]) == m.cfg.mamba_n_heads
    assert int(r.fields["granitehybrid.ssm.group_count"].parts[-1][0]) == 2
    t = {x.name: x for x in r.tensors}
    assert not any(n.startswith("blk.1.ssm") for n in t) and "blk.1.attn_q.weight" in t
    a = np.asarray(t["blk.0.ssm_a"].data).reshape(-1)
    assert np.allclose(a, (-torch.exp(m.layers[0].mixer.A_log)).numpy())
    gate = np.asarray(t["blk.0.ffn_gate_exps.weight"].data)
    assert np.array_equal(gate, m.layers[0].moe.w_in[:, : m.cfg.expert_width].numpy())
    assert not [n for n in t if "ssm_in.bias" in n]


def test_llama_cpp_loads_it_and_matches_our_logits(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    m = _model()
    path = write_granitehybrid_gguf(m, tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_ubatch=64, logits_all=True, verbose=False,
                          type_k=0, type_v=0)  # f32 KV cache, so the comparison is exact-ish
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    llm.eval(ids[0].tolist())
    theirs = np.array(llm.scores[:40])
    with torch.no_grad():
        ours = m(ids)[0].numpy()
    diff = np.abs(theirs - ours).max()
    assert diff < 1e-3, f"max logit difference {diff:.3g}"
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() == 1.0
