"""The GGUF files `granite convert` writes, checked by independent readers: the `gguf` package
(metadata, tensor names/types/shapes, Q8_0 bytes) and llama.cpp itself (llama-cpp-python, when
installed: it loads the file and gives the same logits as our core).

Run: python -m pytest -q tests/test_gguf.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from granite_cli.checkpoint.gguf import GGUFFile, dequantize_q8_0, quantize_q8_0
from granite_cli.convert.run import ConvertOptions, convert
from granite_cli.model.loading import load_model, save_checkpoint
from tests.conftest import tiny

gguf = pytest.importorskip("gguf")


def _ckpt(folder, **over):
    kw = dict(vocab_size=256, mamba_n_groups=2, attention_layers=[1, 3], max_position_embeddings=256)
    cfg = tiny("granitemoehybrid", **{**kw, **over})
    m = load_model(cfg, weights="random", dtype="fp32", seed=4, std=0.1)
    save_checkpoint(m, folder)
    return m


def test_gguf_package_reads_our_metadata_and_tensors(tmp_path):
    m = _ckpt(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "m.gguf")
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert r.fields["general.architecture"].contents() == "granitehybrid"
    assert r.fields["granitehybrid.attention.head_count_kv"].contents() == [0, 2, 0, 2]
    assert r.fields["granitehybrid.ssm.time_step_rank"].contents() == m.cfg.mamba_n_heads
    assert r.fields["granitehybrid.ssm.group_count"].contents() == 2
    assert r.fields["granitehybrid.ssm.inner_size"].contents() == m.cfg.d_inner
    assert r.fields["granitehybrid.rope.scaling.finetuned"].contents() is False
    assert r.fields["granitehybrid.context_length"].contents() == 2**20  # NoPE: no trained length limit
    # no tokenizer in the source: a synthetic byte-level vocabulary, so llama.cpp's servers can serve the file
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(r.fields["tokenizer.ggml.tokens"].contents()) == m.cfg.vocab_size
    t = {x.name: x for x in r.tensors}
    expected = set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GRANITE_HYBRID])
    names = {gguf.TENSOR_NAMES[k] for k in expected}
    for n in t:  # every tensor name is one llama.cpp knows for this architecture
        base = n.split(".", 2)[-1] if n.startswith("blk.") else n
        assert base.rsplit(".", 1)[0] in {x.replace("blk.{bid}.", "") for x in names}, n
    assert not any(n.startswith("blk.1.ssm") for n in t) and "blk.1.attn_q.weight" in t
    assert np.allclose(np.asarray(t["blk.0.ssm_a"].data).reshape(-1), (-torch.exp(m.layers[0].mixer.A_log)).numpy())
    gate = np.asarray(t["blk.0.ffn_gate_exps.weight"].data)
    assert np.array_equal(gate, m.layers[0].moe.w_in[:, : m.cfg.expert_width].numpy())
    assert t["blk.0.ssm_conv1d.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert list(t["blk.0.ssm_norm.weight"].shape) == [m.cfg.d_inner // 2, 2]  # ggml order


def test_q8_0_bytes_match_the_gguf_package(tmp_path):
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    x[3, :32] = 0  # an all-zero block
    # rounding edges: with amax 127 the scale is 1, so these are the quantizer's inputs as they are
    x[5, :32] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 0.49999997, -0.49999997, 126.5, -126.5] + [0.0] * 22)
    x[8:] = x[8:].to(torch.bfloat16).float()  # bf16 values: exact ties (k + 0.5) are common after scaling
    ours = quantize_q8_0(x).numpy()
    theirs = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0).reshape(-1)
    assert np.array_equal(ours, theirs)
    back = dequantize_q8_0(torch.from_numpy(theirs.copy()), (64, 96))
    assert np.allclose(back.numpy(), gguf.quants.dequantize(theirs, gguf.GGMLQuantizationType.Q8_0).reshape(64, 96))


def test_q8_0_file_read_back(tmp_path):
    _ckpt(tmp_path / "src")
    rep = convert(tmp_path / "src", tmp_path / "q.gguf", ConvertOptions(quant="q8_0"))
    assert rep["verification"]["tensors"]["quantized"] > 0
    r = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    types = {x.name: x.tensor_type for x in r.tensors}
    assert types["blk.0.ssm_in.weight"] == gguf.GGMLQuantizationType.Q8_0
    for keep in ("token_embd.weight", "blk.0.ffn_gate_inp.weight", "blk.0.ssm_conv1d.weight", "blk.0.ssm_a"):
        assert types[keep] == gguf.GGMLQuantizationType.F32, keep
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0


def test_foreign_gguf_without_our_side_keys_still_converts(tmp_path):
    """A file from another producer has only the standard keys: the config is rebuilt from them."""
    from granite_cli.checkpoint import gguf_map as mapping

    _ckpt(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "m.gguf")
    f = GGUFFile(tmp_path / "m.gguf")
    kv = {k: v for k, v in f.kv.items() if not k.startswith("granite.")}
    cfg, d = mapping.config_from_gguf(kv, f.tensors, "foreign.gguf")
    src_cfg = load_model(tmp_path / "src", device="meta").cfg
    for k in ("layer_types", "hidden_size", "num_key_value_heads", "mamba_n_heads", "mamba_d_head", "mamba_n_groups",
              "expert_width", "mlp_width", "num_local_experts", "embedding_multiplier", "logits_scaling"):
        assert getattr(cfg, k) == getattr(src_cfg, k), k


def _tokenizer(folder, vocab_size):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size - 16, special_tokens=["<|end_of_text|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    text = ["the quick brown fox jumps over the lazy dog " * 3, "granite hybrid mamba attention " * 3,
            "hello world, hello granite!"] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(folder / "tokenizer.json"))
    return tok


def test_tokenizer_is_carried_into_the_gguf(tmp_path):
    m = _ckpt(tmp_path / "src", vocab_size=320)
    tok = _tokenizer(tmp_path / "src", m.cfg.vocab_size)
    convert(tmp_path / "src", tmp_path / "t.gguf")
    r = gguf.GGUFReader(str(tmp_path / "t.gguf"))
    tj = json.loads((tmp_path / "src" / "tokenizer.json").read_text())
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == m.cfg.vocab_size
    for t, i in tj["model"]["vocab"].items():
        assert tokens[i] == t
    merges = r.fields["tokenizer.ggml.merges"].contents()
    assert merges[:5] == [x if isinstance(x, str) else " ".join(x) for x in tj["model"]["merges"][:5]]
    types = r.fields["tokenizer.ggml.token_type"].contents()
    assert types[tok.token_to_id("<|end_of_text|>")] == 3 and types[-1] == 5  # CONTROL; unused padding
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "t.gguf"), n_ctx=64, verbose=False)
    text = "hello granite, the quick brown fox"
    assert llm.tokenize(text.encode(), add_bos=False) == tok.encode(text).ids


@pytest.mark.parametrize("case", ["hybrid-f32", "dense-rope-f32", "hybrid-q8_0", "hybrid-bf16"])
def test_llama_cpp_loads_it_and_matches_our_logits(tmp_path, case):
    llama_cpp = pytest.importorskip("llama_cpp")
    over = dict(attention_layers=[0, 1, 2, 3], position_embedding_type="rope") if case.startswith("dense") else {}
    _ckpt(tmp_path / "src", **over)
    kind = case.split("-")[-1]
    convert(tmp_path / "src", tmp_path / "m.gguf", ConvertOptions(quant="q8_0" if kind == "q8_0" else None,
                                                                  dtype="bf16" if kind == "bf16" else None))
    # what the GGUF holds, as our core reads it
    convert(tmp_path / "m.gguf", tmp_path / "back", ConvertOptions(dtype="fp32"))
    m = load_model(tmp_path / "back", weights="checkpoint", dtype="fp32")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, n_batch=64, n_ubatch=64, logits_all=True,
                          verbose=False, type_k=0, type_v=0)  # f32 KV cache
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    llm.eval(ids[0].tolist())
    theirs = np.array(llm.scores[:40])
    with torch.no_grad():
        ours = m(ids)[0].numpy()
    diff = np.abs(theirs - ours).max()
    # f32/bf16 weights: same values, float32 maths in both. Q8_0: llama.cpp also quantizes activations to
    # 8 bits for its Q8_0 dot products, so it differs from our dequantised-weights reference by more.
    # BF16 likewise rounds activations to bf16. (Measured: q8_0 0.0076 and bf16 0.0011 on logits of
    # magnitude 1.2; f32 agrees to ~1e-7.)
    tol = {"q8_0": 2e-2, "bf16": 5e-3}.get(kind, 1e-4)
    assert diff < tol * max(1.0, np.abs(ours).max()), f"max logit difference {diff:.3g}"
    agree = (theirs.argmax(-1) == ours.argmax(-1)).mean()
    assert agree >= (1.0 if kind == "f32" else 0.9), agree


def test_every_tensor_of_the_map_goes_to_gguf_and_back_bit_exact():
    """Each Kind of the name map has both directions, and each HF tensor of a hybrid MoE model is
    rebuilt exactly from its GGUF parts (A_log from the exact values the writer stores beside A)."""
    from granite_cli.checkpoint import gguf_map as m
    from granite_cli.checkpoint.names import checkpoint_entries

    cfg = tiny()
    shapes = {e.ckpt: e.shape for e in checkpoint_entries(cfg)}
    g = torch.Generator().manual_seed(0)
    kinds = set()
    for t in m.tensor_map(cfg):
        kinds.update(p.kind for p in t.parts)
        x = torch.randn(shapes[t.hf], generator=g)
        a = t.parts[0].kind is m.Kind.A
        parts = [m.to_gguf(p, x) for p in t.parts]
        back = m.from_gguf(t, parts, x if a else None)
        assert back.shape == x.shape and torch.equal(back, x), t.hf
    assert kinds == set(m.Kind)
