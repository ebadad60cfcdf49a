"""Sessions per GPU as the serving engines count them (granite_cli/memory/engines.py), against the
engines themselves:

- vLLM 0.33: `tests/data/vllm-0.33-capacity.json` holds what vLLM's own functions computed
  (`scripts/vllm_capacity_oracle.py`: its Platform._align_hybrid_block_size, MambaStateShapeCalculator,
  MambaSpec/FullAttentionSpec, get_kv_cache_groups, get_kv_cache_config_from_groups and
  get_max_concurrency_for_kv_cache_config, run on these profiles' config.json with 40 GiB of KV
  memory) for h-small, h-tiny, h-micro, micro and h-1b at 4k/32k/128k, TP 1 and 2, prefix caching
  off and on;
- llama.cpp: its real server (xllamacpp) logs its KV-cache and recurrent-state sizes at start; they
  must equal memory-report's for several --parallel/--ctx-size/cache-type settings.

Run: python -m pytest -q tests/test_engines.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from granite_cli.config import load_config
from granite_cli.memory.engines import VllmSettings, llamacpp_sizes, vllm_capacity, vllm_layout
from granite_cli.memory.shard import rank_config

ROOT = Path(__file__).resolve().parents[1]
ORACLE = json.loads((ROOT / "tests" / "data" / "vllm-0.33-capacity.json").read_text())


def granite(*args):
    return subprocess.run([sys.executable, "-m", "granite_cli", *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)


@pytest.mark.parametrize("case", ORACLE, ids=lambda c: f"{c['config'].split('/')[0]}-tp{c['tp']}-{c['L']}-"
                                                       f"{'prefix' if c['prefix'] else 'plain'}")
def test_vllm_block_size_per_request_bytes_and_concurrency_match_vllm(case):
    cfg = rank_config(load_config(case["config"].split("/")[0]), case["tp"])
    row = vllm_capacity(cfg, case["L"], 131072, vllm_layout(cfg), 40 * 2**30,
                        VllmSettings(prefix_caching=case["prefix"]), 10**6)
    assert row["attention_block_size"] == case["block"]
    assert row["per_request_bytes"] == pytest.approx(case["per_request_bytes"], rel=0.005)
    assert row["max_concurrency"] == pytest.approx(case["max_concurrency"], rel=0.01)
    # what we compute is exactly what vLLM computes
    assert (row["num_blocks"], row["blocks_per_request"], row["kv_cache_tokens"]) == (
        case["num_blocks"], case["blocks_per_request"], case["kv_cache_tokens"])
    assert row["sessions"] == (case["num_blocks"] - 1) // case["blocks_per_request"]  # the null block is kept back


def test_kv_budget_through_the_cli_gives_vllms_log_lines():
    r = granite("memory-report", "-m", "granite-4.0-h-small", "--ctx", "4k", "--batch", "1", "--kv-budget", "40GiB",
                "--prefix-caching", "-f", "json")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)["rows"][0]["vllm"]
    assert v["attention_block_size"] == 528 and v["blocks_per_request"] == 35 and v["max_concurrency"] == 141.83
    assert "GPU KV cache size: 580,929 tokens, Maximum concurrency for 4,096 tokens per request: 141.83x" in v["log"]
    assert "Available KV cache memory: 40.00 GiB" in v["log"]


def test_vllm_state_dtype_is_the_models_unless_asked():
    rank = load_config("granite-4.0-h-small")
    bf16, fp32 = vllm_layout(rank), vllm_layout(rank, ssm_dtype="fp32")
    assert bf16.mamba_state_bytes == 3 * 8448 * 2 + 128 * 64 * 128 * 2
    assert fp32.mamba_state_bytes == 3 * 8448 * 2 + 128 * 64 * 128 * 4
    assert fp32.attention_block_size > bf16.attention_block_size  # the page grows to hold the larger state


def test_max_num_seqs_and_model_limit_bound_sessions():
    cfg = load_config("granite-4.0-h-micro")
    lay = vllm_layout(cfg)
    row = vllm_capacity(cfg, 4096, 131072, lay, 40 * 2**30, VllmSettings(), 256)
    assert row["sessions"] == 256 and row["limited_by"] == "max_num_seqs"
    row = vllm_capacity(cfg, 262144, 131072, lay, 40 * 2**30, VllmSettings(), 256)
    assert row["sessions"] == 0 and "exceeds the model's limit" in row["refused"]
    row = vllm_capacity(cfg, 131072, 131072, lay, 2**20, VllmSettings(), 256)
    assert row["sessions"] == 0 and "more than the" in row["refused"]


# ---------------------------------------------------------------------------------------- llama.cpp

_KV = re.compile(r"llama_kv_cache: size =\s+([\d.]+) MiB \(\s*(\d+) cells,.*K \((\w+)\):\s+([\d.]+) MiB, "
                 r"V \((\w+)\):\s+([\d.]+) MiB")
_REC = re.compile(r"llama_memory_recurrent: size =\s+([\d.]+) MiB \(\s*(\d+) cells.*R \(f32\):\s+([\d.]+) MiB, "
                  r"S \(f32\):\s+([\d.]+) MiB")


@pytest.fixture(scope="module")
def cpu_ggufs(tmp_path_factory):
    pytest.importorskip("xllamacpp")
    d = tmp_path_factory.mktemp("engines")
    for name in ("cpu-hybrid", "cpu-dense"):
        r = granite("convert", "--from-profile", name, d / f"{name}.gguf", "--dtype", "bf16", "--no-verify")
        assert r.returncode == 0, r.stderr
    return d


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_sizes(gguf: Path, slots: int, ctx: int, ctk: str, ctv: str) -> str:
    """llama.cpp's start-up log for these settings (a fresh free port per try: another test's server may
    take the one picked between the pick and the bind)."""
    err = ""
    for _ in range(3):
        # a tiny model loads in about a second; the script exits as soon as the server answers /health
        try:
            r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "llama_server.py"), str(gguf), "--port",
                                str(_free_port()), "--slots", str(slots), "--ctx-size", str(ctx), "--cache-type-k",
                                ctk, "--cache-type-v", ctv, "--verbosity", "4", "--load-only", "--threads", "1"],
                               capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
        except subprocess.TimeoutExpired as e:
            err = f"no exit within 120 s: {(e.stderr or b'')[-2000:]!r}"
            continue
        if r.returncode == 0 and "ready" in r.stdout and "llama_kv_cache: size" in r.stderr:
            return r.stderr
        err = r.stderr[-2000:]
    raise AssertionError(f"llama.cpp's server did not start: {err}")


@pytest.mark.parametrize("slots,ctx,ctk,ctv", [(1, 4096, "f16", "f16"), (3, 5000, "f16", "f16"),
                                               (4, 8192, "q8_0", "q8_0"), (2, 1537, "f32", "q8_0")])
@pytest.mark.parametrize("model", ["cpu-hybrid", "cpu-dense"])
def test_llamacpp_kv_and_recurrent_sizes_equal_the_servers_log(cpu_ggufs, model, slots, ctx, ctk, ctv):
    log = _server_sizes(cpu_ggufs / f"{model}.gguf", slots, ctx, ctk, ctv)
    cfg = load_config(model)
    z = llamacpp_sizes(cfg, ctx, slots, ctk, ctv)
    mib = lambda b: round(b / 2**20, 2)  # noqa: E731 -- the server prints MiB to two decimals
    kv = _KV.search(log)
    assert kv, log[-3000:]
    assert float(kv.group(1)) == mib(z.kv_bytes) and int(kv.group(2)) == z.n_ctx_seq
    assert (kv.group(3), float(kv.group(4)), kv.group(5), float(kv.group(6))) == (ctk, mib(z.k_bytes), ctv,
                                                                                  mib(z.v_bytes))
    rec = _REC.search(log)
    if cfg.mamba_layers:
        assert rec, log[-3000:]
        assert (float(rec.group(1)), int(rec.group(2)), float(rec.group(3)), float(rec.group(4))) == (
            mib(z.recurrent_bytes), slots, mib(z.r_bytes), mib(z.s_bytes))
    else:
        assert rec is None and z.recurrent_bytes == 0


def test_llamacpp_engine_through_the_cli(cpu_ggufs):
    r = granite("memory-report", "-m", cpu_ggufs / "cpu-hybrid.gguf", "--engine", "llama.cpp", "--kv", "q8_0", "--gpu",
                "l4", "--ctx", "8k", "--batch", "1", "-f", "json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    row = rep["rows"][0]
    assert row["engine"] == "llama.cpp" and row["state_dtype"] == "fp32" and row["sessions_per_gpu"] > 100
    w = [x for x in rep["weights"] if x["model"] == "cpu-hybrid"][0]
    assert w["stored_bytes"] < (cpu_ggufs / "cpu-hybrid.gguf").stat().st_size < w["stored_bytes"] * 1.05
    assert "GGUF tensors" in w["stored_as"] and "BF16" in w["stored_as"]


# ---------------------------------------------------------------------------------------- weights and output

def test_ggml_layout_matches_the_gguf_package():
    gguf = pytest.importorskip("gguf")
    from granite_cli.checkpoint.gguf import GGML_LAYOUT

    theirs = {int(t): v for t, v in gguf.constants.GGML_QUANT_SIZES.items()}
    for t, (name, blk, size) in GGML_LAYOUT.items():
        assert theirs[t] == (blk, size), name
        assert gguf.constants.GGMLQuantizationType(t).name == name


def test_weights_of_a_quantized_checkpoint_are_its_files(tmp_path):
    from safetensors import safe_open

    d = tmp_path / "fp8"
    assert granite("convert", "--from-profile", "tiny-hybrid", d, "--quant", "fp8", "--no-verify").returncode == 0
    want = 0
    for f in d.glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            for k in s.keys():
                t = s.get_tensor(k)
                want += t.numel() * t.element_size()
    r = granite("memory-report", "-m", d, "--ctx", "1k", "--batch", "1", "-f", "json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["rows"][0]["weights_bytes"] == want
    assert rep["weights"][0]["stored_bytes"] == want and "compressed-tensors fp8" in rep["weights"][0]["stored_as"]


@pytest.mark.parametrize("qc,lo,hi", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128}, 0.25, 0.36),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, 0.25, 0.36),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, 0.5, 0.6),
    ({"quant_method": "compressed-tensors", "config_groups": {"group_0": {"weights": {
        "num_bits": 8, "type": "int", "strategy": "channel"}}}}, 0.5, 0.6),
])
def test_weights_from_a_quantization_config(tmp_path, qc, lo, hi):
    from granite_cli.memory.weights import quantized_bytes

    d = tmp_path / "m"
    assert granite("profiles", "export", "granite-4.0-h-micro", d).returncode == 0
    cj = json.loads((d / "config.json").read_text())
    cj["quantization_config"] = qc
    (d / "config.json").write_text(json.dumps(cj))
    r = granite("memory-report", "-m", d / "config.json", "--ctx", "4k", "--batch", "1", "-f", "json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)["rows"][0]
    bf16 = 2 * 3_190_000_000
    assert lo < row["weights_bytes"] / bf16 < hi, row["weights_bytes"] / bf16
    assert row["weights_bytes"] == int(quantized_bytes(load_config(d / "config.json"), qc).bytes)


def test_gguf_of_any_ggml_type_is_sized_from_its_tensors(tmp_path):
    import torch

    from granite_cli.checkpoint import gguf as G

    src = tmp_path / "m.gguf"
    assert granite("convert", "--from-profile", "cpu-dense", src, "--no-verify").returncode == 0
    f = G.GGUFFile(src)
    infos = [G.TensorInfo(n, t.shape, 12 if n.endswith("ffn_up_shexp.weight") else t.gtype)  # some Q4_K
             for n, t in f.tensors.items()]
    kvs = [G.KV(k, *f.kv_types[k][:1], v, f.kv_types[k][1]) for k, v in f.kv.items()]
    w = G.GGUFWriter(tmp_path / "q4k.gguf", kvs, infos)
    for info in infos:
        w.write(info.name, torch.zeros(info.nbytes, dtype=torch.uint8) if info.gtype == 12 else f.raw(info.name))
    w.close()
    r = granite("memory-report", "-m", tmp_path / "q4k.gguf", "--ctx", "1k", "--batch", "1", "-f", "json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["rows"][0]["weights_bytes"] == sum(i.nbytes for i in infos)
    assert "Q4_K x" in rep["weights"][0]["stored_as"]


def test_capacity_in_every_format_and_the_options_honoured():
    md = granite("memory-report", "-m", "granite-4.0-h-tiny", "--ctx", "4k,128k", "--batch", "1", "-f", "md")
    assert md.returncode == 0, md.stderr
    assert "sessions/GPU (vllm)" in md.stdout and "Sessions per GPU, as vLLM 0.33" in md.stdout
    assert "Mamba state bf16" in md.stdout and "NVIDIA H100 80GB (79.65 GiB)" in md.stdout
    csv = granite("memory-report", "-m", "granite-4.0-h-tiny", "--ctx", "4k,128k", "--batch", "1", "-f", "csv")
    head, *lines = csv.stdout.splitlines()
    assert "sessions_per_gpu" in head and "e+" not in csv.stdout
    weights = int(lines[0].split(",")[head.split(",").index("weights_bytes")])
    assert weights > 10**9  # an exact integer byte count, not 1.38776e+10
    small = json.loads(granite("memory-report", "-m", "granite-4.0-h-tiny", "--ctx", "128k", "--batch", "1", "--gpu",
                               "l4", "-f", "json").stdout)
    big = json.loads(granite("memory-report", "-m", "granite-4.0-h-tiny", "--ctx", "128k", "--batch", "1", "--gpu-mem",
                             "141GiB", "--gpus", "2", "-f", "json").stdout)
    assert small["rows"][0]["sessions_per_gpu"] < big["rows"][0]["sessions_per_gpu"]
    assert [c["gpu"] for c in small["capacity"]] == ["l4"] and len(big["node_capacity"]) == 2
    assert all(c["max_ctx@1"] <= c["model_limit"] for c in big["capacity"])
    assert small["gpu_bytes"] == 23034 * 2**20


def test_claims_only_for_the_models_they_concern():
    qwen = json.loads(granite("memory-report", "-m", "qwen3-4b", "--ctx", "4k", "--batch", "1", "-f", "json").stdout)
    assert qwen["claims"] == []
    tiny = json.loads(granite("memory-report", "-m", "granite-4.0-h-tiny", "--ctx", "4k", "--batch", "1", "-f",
                              "json").stdout)
    assert tiny["claims"] and all("h-tiny" in c["claim"] for c in tiny["claims"])


def test_profiles_list_names_moe_models():
    rows = {r["name"]: r for r in json.loads(granite("profiles", "list", "-f", "json").stdout)["profiles"]}
    assert rows["qwen3-30b-a3b"]["kind"] == "moe" and rows["granite-4.0-h-tiny"]["kind"] == "hybrid moe"
    assert rows["qwen3-8b"]["kind"] == "dense" and rows["granite-4.0-h-micro"]["kind"] == "hybrid"
