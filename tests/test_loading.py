"""Checkpoint loading: sharded and single files, dtype cast, clear errors; random init at real shapes.

Run: python -m pytest -q tests/test_loading.py
"""

from __future__ import annotations

import time

import pytest
import torch

from granite_cli.checkpoint.safetensors import SafetensorsFile, write_safetensors
from granite_cli.errors import InputError
from granite_cli.model.loading import load_model, save_checkpoint
from tests.conftest import tiny


@pytest.fixture
def ckpt(tmp_path):
    m = load_model(tiny("granitemoehybrid"), weights="random", dtype="fp32", seed=2, std=0.1)
    save_checkpoint(m, tmp_path)
    return m, tmp_path


def test_round_trip_single_and_sharded(tmp_path, ckpt):
    m, folder = ckpt
    ids = torch.randint(0, 128, (1, 20))
    ref = m(ids)
    assert torch.equal(load_model(folder, weights="checkpoint", dtype="fp32")(ids), ref)
    sharded = tmp_path / "sharded"
    save_checkpoint(m, sharded, shard_bytes=100_000)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    assert torch.equal(load_model(sharded, weights="checkpoint", dtype="fp32")(ids), ref)


def test_dtype_cast_on_load(ckpt):
    m, folder = ckpt
    b = load_model(folder, weights="checkpoint", dtype="bf16")
    assert b.dtype == torch.bfloat16
    assert torch.equal(b.embed.weight, m.embed.weight.to(torch.bfloat16))


def _rewrite(folder, fn):
    f = SafetensorsFile(folder / "model.safetensors")
    tensors = {k: f.tensor(k).clone() for k in f.keys()}
    f.close()
    fn(tensors)
    write_safetensors(folder / "model.safetensors", tensors)


def test_missing_tensor_is_named(ckpt):
    _, folder = ckpt
    _rewrite(folder, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(InputError, match="missing 1 tensor.*model.layers.1.self_attn.k_proj.weight"):
        load_model(folder, weights="checkpoint")


def test_unexpected_tensor_is_named(ckpt):
    _, folder = ckpt
    _rewrite(folder, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(InputError, match="unexpected tensor.*model.layers.0.extra.weight"):
        load_model(folder, weights="checkpoint")


def test_misshaped_tensor_is_named(ckpt):
    _, folder = ckpt
    _rewrite(folder, lambda t: t.__setitem__("model.norm.weight", torch.ones(63)))
    with pytest.raises(InputError, match=r"wrong shape.*model.norm.weight \[63\] \(expected \[64\]\)"):
        load_model(folder, weights="checkpoint")


def test_missing_shard_and_corrupt_header(tmp_path, ckpt):
    m, _ = ckpt
    sharded = tmp_path / "s"
    save_checkpoint(m, sharded, shard_bytes=100_000)
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(InputError, match=f"shard {victim.name} is named in the index but missing"):
        load_model(sharded, weights="checkpoint")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(InputError, match="corrupt safetensors header"):
        SafetensorsFile(bad)
    trunc = tmp_path / "trunc.safetensors"
    good = sorted(sharded.glob("model-*.safetensors"))[0]
    trunc.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(InputError, match="truncated or corrupt"):
        SafetensorsFile(trunc)


def test_real_shapes_on_meta_instantly_and_random_in_bf16():
    t0 = time.perf_counter()
    m = load_model("granite-4.0-h-small", device="meta")
    assert time.perf_counter() - t0 < 10  # generous; the point is that nothing is allocated
    assert sum(p.numel() for p in m.parameters()) == 32_207_337_984
    assert all(p.device.type == "meta" for p in m.parameters())
    small = load_model("cpu-hybrid", dtype="bf16")
    assert small.dtype == torch.bfloat16 and small.cfg.name == "cpu-hybrid"
    out = small(torch.randint(0, 1024, (1, 8)))
    assert out.shape == (1, 8, 1024) and torch.isfinite(out).all()


def test_profile_has_no_checkpoint():
    with pytest.raises(InputError, match="weights='random'"):
        load_model("tiny-hybrid", weights="checkpoint")


@pytest.mark.parametrize("arch", ["granitemoehybrid", "granite", "llama", "qwen3", "qwen3_moe"])
def test_name_map_covers_every_parameter_element_once(arch):
    from granite_cli.checkpoint.names import checkpoint_entries
    from granite_cli.model.loading import build_empty

    cfg = tiny(arch, tie_word_embeddings=False)
    m = build_empty(cfg, torch.float32, "cpu")
    hits = {n: torch.zeros_like(p, dtype=torch.int32) for n, p in m.named_parameters()}
    names = [e.ckpt for e in checkpoint_entries(cfg)]
    assert len(names) == len(set(names))
    for e in checkpoint_entries(cfg):
        part = hits[e.param][e.index] if e.index else hits[e.param]
        assert tuple(part.shape) == e.shape, f"{e.ckpt}: table says {e.shape}, the model has {tuple(part.shape)}"
        part.add_(1)
    for n, h in hits.items():
        assert bool((h == 1).all()), f"{n} covered {h.min().item()}..{h.max().item()} times"
