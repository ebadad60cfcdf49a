"""`granite convert`: round trips (bit-exact where lossless, within the bound where quantized),
synthetic checkpoints, bad input (exit 2, nothing written), interruption, dry run, inspect.

Run: python -m pytest -q tests/test_convert.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from granite_cli.checkpoint import quant
from granite_cli.checkpoint.sources import HFSource, open_source
from granite_cli.convert.run import ConvertOptions, convert
from granite_cli.errors import CheckFailed, InputError
from granite_cli.model.loading import load_model, save_checkpoint
from tests.conftest import tiny


def granite(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "granite_cli", *args], capture_output=True, text=True, cwd=cwd,
                          stdin=subprocess.DEVNULL, timeout=900)


def _checkpoint(folder: Path, dtype="fp32", arch_over=None, seed=3) -> Path:
    """A tiny hybrid checkpoint with awkward values: random A_log (not log(1..H)), random norms and D."""
    cfg = tiny("granitemoehybrid", **(arch_over or {}))
    m = load_model(cfg, weights="random", dtype=dtype, seed=seed, std=0.1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("A_log", "D", "norm1.weight", "mixer.norm.weight", "dt_bias")):
                p.copy_((torch.rand(p.shape, generator=g) * 4 - 2).to(p.dtype))
    save_checkpoint(m, folder)
    return folder


def _same_tensors(a: Path, b: Path) -> None:
    sa, sb = HFSource(a), HFSource(b)
    assert sa.names == sb.names
    for n in sa.names:
        x, y = sa.get(n), sb.get(n)
        assert x.dtype == y.dtype and torch.equal(x, y), n


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_hf_to_gguf_to_hf_is_bit_exact(tmp_path, dtype):
    src = _checkpoint(tmp_path / "src", dtype)
    r1 = convert(src, tmp_path / "m.gguf")
    r2 = convert(tmp_path / "m.gguf", tmp_path / "back")
    _same_tensors(src, tmp_path / "back")
    assert r1["verification"]["logits"]["max_abs_diff"] == 0.0
    assert r2["verification"]["tensors"]["exact"] == len(HFSource(src).names)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["layer_types"] == \
        json.loads((src / "config.json").read_text())["layer_types"]


def test_dense_rope_model_round_trips_through_granite_gguf(tmp_path):
    src = _checkpoint(tmp_path / "src", arch_over=dict(attention_layers=[0, 1, 2, 3], position_embedding_type="rope",
                                                     num_local_experts=0, num_experts_per_tok=0))
    convert(src, tmp_path / "d.gguf")
    from granite_cli.checkpoint.gguf import GGUFFile

    f = GGUFFile(tmp_path / "d.gguf")
    assert f.kv["general.architecture"] == "granite" and f.kv["granite.rope.scaling.finetuned"] is True
    # q/k rows are permuted into ggml's rotary layout, so the stored tensor differs from the HF one
    q_hf = HFSource(src).get("model.layers.0.self_attn.q_proj.weight")
    assert not torch.equal(f.tensor("blk.0.attn_q.weight"), q_hf)
    convert(tmp_path / "d.gguf", tmp_path / "back")
    _same_tensors(src, tmp_path / "back")


def test_dtype_conversion_is_exactly_a_cast(tmp_path):
    src = _checkpoint(tmp_path / "src")
    r = convert(src, tmp_path / "bf", ConvertOptions(dtype="bf16", shard_size="100KB"))
    assert r["shards"] > 1 and (tmp_path / "bf" / "model.safetensors.index.json").is_file()
    a, b = HFSource(src), HFSource(tmp_path / "bf")
    for n in a.names:
        assert torch.equal(b.get(n), a.get(n).to(torch.bfloat16)), n
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_quantized_safetensors_within_bound_and_loadable(tmp_path, method):
    src = _checkpoint(tmp_path / "src", "bf16")
    r = convert(src, tmp_path / "q", ConvertOptions(quant=method))
    v = r["verification"]
    assert v["tensors"]["quantized"] > 0 and 0 < v["tensors"]["worst_error_over_bound"] <= 1
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    assert any("router" in i for i in qc["ignore"])
    out = HFSource(tmp_path / "q")
    raw = out._where
    w = "model.layers.0.mamba.in_proj.weight"
    if method == "fp8":
        assert out._raw(w).dtype == torch.float8_e4m3fn
        assert tuple(out._raw(w[:-7] + ".weight_scale").shape) == (out.shape(w)[0], 1)
    else:
        assert w[:-7] + ".weight_packed" in raw and out._raw(w[:-7] + ".weight_packed").dtype == torch.int32
    # never quantized: embeddings, norms, router, conv1d, A_log, D, dt_bias
    for keep in ("model.embed_tokens.weight", "model.layers.0.mamba.conv1d.weight", "model.layers.0.mamba.A_log",
                 "model.layers.0.block_sparse_moe.router.layer.weight", "model.layers.0.input_layernorm.weight"):
        assert keep in raw and out._raw(keep).dtype == torch.bfloat16, keep
    # the independent bound: every dequantised weight within half a step of the original
    a = HFSource(src)
    for n in a.names:
        if quant.quantizable(n, a.shape(n), ()):
            err = (out.get(n, cast=False) - a.get(n).float()).abs()
            assert (err <= quant.error_bound(a.get(n), method)).all(), n
    m = load_model(tmp_path / "q", weights="checkpoint", dtype="fp32")  # our loader dequantises
    assert torch.isfinite(m(torch.arange(8)[None])).all()


def test_keep_high_precision_patterns(tmp_path):
    src = _checkpoint(tmp_path / "src")
    convert(src, tmp_path / "q", ConvertOptions(quant="fp8", keep=("*.self_attn.*",)))
    out = HFSource(tmp_path / "q")
    assert out._raw("model.layers.1.self_attn.q_proj.weight").dtype == torch.float32
    assert out._raw("model.layers.0.mamba.in_proj.weight").dtype == torch.float8_e4m3fn


def test_from_profile_streams_a_loadable_checkpoint(tmp_path):
    r = convert(None, tmp_path / "p", ConvertOptions(from_profile="tiny-hybrid", dtype="bf16", shard_size="300KB"))
    assert r["shards"] >= 2 and r["verification"]["logits"]["max_abs_diff"] == 0.0
    m = load_model(tmp_path / "p", weights="checkpoint")
    assert m.dtype == torch.bfloat16 and m.cfg.layer_types == load_model("tiny-hybrid", device="meta").cfg.layer_types
    a_log = m.layers[0].mixer.A_log.float()
    assert torch.allclose(a_log, torch.log(torch.arange(1, a_log.numel() + 1, dtype=torch.float32)), atol=1e-2)


def test_transformers_saved_checkpoint_converts(tmp_path):
    transformers = pytest.importorskip("transformers")
    src = _checkpoint(tmp_path / "ours")
    hf = transformers.GraniteMoeHybridForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    hf.save_pretrained(str(tmp_path / "hf"))
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())["layer_types"]
    assert "linear_attention" in saved  # transformers 5 writes its own vocabulary
    convert(tmp_path / "hf", tmp_path / "m.gguf")
    from granite_cli.checkpoint.gguf import GGUFFile

    assert GGUFFile(tmp_path / "m.gguf").kv["granitehybrid.attention.head_count_kv"] == [0, 2, 0, 2]
    convert(tmp_path / "m.gguf", tmp_path / "back")
    _same_tensors(tmp_path / "hf", tmp_path / "back")


# ------------------------------------------------------------------------------------ bad input

def _one_line_exit_2(r, msg, *absent: Path):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in r.stderr, r.stderr
    for p in absent:
        assert not p.exists(), p
        assert not list(p.parent.glob(f".{p.name}.*"))  # no temporary left behind


def test_truncated_and_corrupt_safetensors(tmp_path):
    src = _checkpoint(tmp_path / "src")
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _one_line_exit_2(granite("convert", str(src), str(tmp_path / "o.gguf")), "truncated or corrupt",
                     tmp_path / "o.gguf")
    f.write_bytes(data[:8] + b"{not json" + data[17:])
    _one_line_exit_2(granite("convert", str(src), str(tmp_path / "o")), "corrupt safetensors header", tmp_path / "o")


def test_missing_shard_shape_mismatch_unknown_arch(tmp_path):
    src = tmp_path / "src"
    convert(None, src, ConvertOptions(from_profile="tiny-hybrid", shard_size="300KB"))
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.rename(tmp_path / "away")
    _one_line_exit_2(granite("convert", str(src), str(tmp_path / "o")), "named in the index but missing",
                     tmp_path / "o")
    (tmp_path / "away").rename(shard)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "shared_intermediate_size": 32}))
    _one_line_exit_2(granite("convert", str(src), str(tmp_path / "o")), "do not match config.json", tmp_path / "o")
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    _one_line_exit_2(granite("convert", str(src), str(tmp_path / "o")), "bert", tmp_path / "o")


def test_existing_dst_needs_force_and_too_little_disk(tmp_path, monkeypatch):
    src = _checkpoint(tmp_path / "src")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    r = granite("convert", str(src), str(tmp_path / "o"))
    assert r.returncode == 2 and "--force" in r.stderr
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"
    import granite_cli.convert.plan as plan_mod
    import granite_cli.convert.run as run_mod

    class Usage:
        free = 1000

    monkeypatch.setattr(plan_mod.shutil, "disk_usage", lambda p: Usage())
    with pytest.raises(InputError, match="too little disk"):
        convert(src, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    # a dry run plans anyway and reports the shortfall (the CLI warns on stderr and exits 0)
    p = run_mod.plan(run_mod.open_any(str(src)), tmp_path / "x.gguf", check_disk=False)
    s = p.summary()
    assert s["disk_enough"] is False and s["disk_free_bytes"] == 1000 and s["disk_needed_bytes"] > 1000
    assert "too little disk" in run_mod.disk_shortfall(p)


def test_gguf_errors(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(40))
    _one_line_exit_2(granite("convert", str(tmp_path / "bad.gguf"), str(tmp_path / "o")), "not a GGUF file",
                     tmp_path / "o")
    src = _checkpoint(tmp_path / "src")
    convert(src, tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 5000])
    _one_line_exit_2(granite("convert", str(tmp_path / "cut.gguf"), str(tmp_path / "o")), "past the end",
                     tmp_path / "o")
    _one_line_exit_2(granite("convert", str(src), str(tmp_path / "o"), "--quant", "q4_k"), "unknown --quant",
                     tmp_path / "o")
    _one_line_exit_2(granite("convert", str(src), str(tmp_path / "o"), "--quant", "q8_0"), "GGUF format",
                     tmp_path / "o")


def test_verification_catches_a_wrong_tensor(tmp_path, monkeypatch):
    from granite_cli.convert.formats import SafetensorsFormat

    src = _checkpoint(tmp_path / "src")
    real = SafetensorsFormat.products

    def corrupt(self, p, name, x):
        out = real(self, p, name, x)
        if name.endswith("layers.2.mamba.A_log"):
            out = {k: v + 1 for k, v in out.items()}
        return out

    monkeypatch.setattr(SafetensorsFormat, "products", corrupt)
    with pytest.raises(CheckFailed, match="layers.2.mamba.A_log"):
        convert(src, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


@pytest.mark.parametrize("sig,name",
                         [(signal.SIGTERM, "big"), (signal.SIGTERM, "big.gguf"), (signal.SIGKILL, "big.gguf")])
def test_interrupted_conversion_leaves_no_dst(tmp_path, sig, name):
    dst = tmp_path / name
    p = subprocess.Popen([sys.executable, "-m", "granite_cli", "convert", "--from-profile", "granite-4.0-h-350m",
                          "--dtype", "bf16", "--no-verify", str(dst)], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                         stdin=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        partials = list(tmp_path.glob(f".{dst.name}.*.partial"))  # the staging folder's name is fresh each run
        files = [f for q in partials for f in q.rglob("*") if f.suffix in (".safetensors", ".gguf")]
        if files and sum(f.stat().st_size for f in files) > 20e6:
            break
        time.sleep(0.05)
    assert p.poll() is None, "conversion finished before it could be interrupted"
    os.kill(p.pid, sig)
    p.wait(60)
    assert not dst.exists()
    if sig == signal.SIGTERM:
        assert p.returncode == 143 and not list(tmp_path.glob(f".{dst.name}.*"))  # cleaned up, lock included
        assert b"interrupted (SIGTERM)" in p.stderr.read()
    else:  # a kill leaves the staging folder, which the next run into the same DST proves its own and removes
        assert len(list(tmp_path.glob(f".{dst.name}.*.partial"))) == 1
    r = granite("convert", "--from-profile", "tiny-hybrid", str(dst), "--no-verify")
    assert r.returncode == 0 and dst.exists(), r.stderr
    assert ("note: removed" in r.stderr) == (sig == signal.SIGKILL), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [dst.name]


def test_dry_run_writes_nothing_and_reports_the_plan(tmp_path):
    r = granite("convert", "--from-profile", "granite-4.0-h-small", str(tmp_path / "s.gguf"), "--quant", "q8_0",
                "--dry-run", "-f", "json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert not (tmp_path / "s.gguf").exists()
    assert d["format"] == "gguf" and d["architecture"] == "granitehybrid"
    assert 30e9 < d["bytes_out"] < 40e9  # 32B params at ~1.06 bytes each
    assert d["storage"]["q8_0"] > 0 and d["disk_free_bytes"] > 0 and d["memory_needed_bytes"] < 4e9
    # planned whatever the disk holds (35 GB may not fit on a CI machine); the verdict is reported, not enforced
    assert d["disk_enough"] == (d["disk_free_bytes"] >= d["disk_needed_bytes"])
    assert ("too little disk" in r.stderr) == (not d["disk_enough"])
    plan = {t["name"]: t for t in d["tensor_plan"]}
    assert plan["blk.0.ssm_conv1d.weight"]["storage"] == "f32" and plan["blk.0.ssm_in.weight"]["storage"] == "q8_0"
    assert plan["token_embd.weight"]["storage"] == "bf16"  # embeddings are never quantized
    assert sum(t["bytes"] for t in d["tensor_plan"]) <= d["bytes_out"]


def test_inspect_hf_and_gguf(tmp_path):
    src = _checkpoint(tmp_path / "src")
    convert(src, tmp_path / "m.gguf", ConvertOptions(quant="q8_0"))
    for path, fmt in ((src, "safetensors"), (tmp_path / "m.gguf", "gguf")):
        r = granite("convert", "inspect", str(path), "-f", "json")
        assert r.returncode == 0, r.stderr
        d = json.loads(r.stdout)
        assert d["format"] == fmt and d["layer_pattern"] == "M A M A" and d["mamba_layers"] == 2
        assert d["params_in_tensors"] == d["params_total"]
    assert json.loads(granite("convert", "inspect", str(tmp_path / "m.gguf"), "-f",
                              "json").stdout)["quantization"] == "q8_0"


def test_open_source_rejects_non_checkpoints(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(InputError, match="folder or a .gguf"):
        open_source(tmp_path / "x.bin")
    with pytest.raises(InputError, match="no such file"):
        open_source(tmp_path / "nope")
