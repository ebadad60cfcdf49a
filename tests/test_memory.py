"""memory-report: formulas against the core's caches, predicted vs traced vs measured, capacity,
claims, budgets and bad input.

Run: python -m pytest -q tests/test_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from granite_cli.config import load_config
from granite_cli.errors import InputError
from granite_cli.memory.claims import all_claims, max_batch, max_context
from granite_cli.memory.predict import kv_bytes, kv_state_crossover, predict, state_bytes, weight_bytes
from granite_cli.memory.trace import LiveTensorBytes, measured_cpu, traced
from granite_cli.model.loading import build_empty
from granite_cli.params import count_params
from granite_cli.render import parse_bytes

SMALL = ["tiny-hybrid", "tiny-dense", "cpu-hybrid", "cpu-dense"]


@pytest.mark.parametrize("name", SMALL + ["granite-4.0-h-small", "qwen3-30b-a3b"])
@pytest.mark.parametrize("kv,state", [("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16")])
def test_cache_formulas_equal_allocated_cache_bytes(name, kv, state):
    cfg = load_config(name)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}
    m = build_empty(cfg, dt[kv], "meta")
    cache = m.allocate_cache(3, 1000, state_dtype=dt[state])
    nb = cache.nbytes()
    assert nb["attention_kv"] == kv_bytes(cfg, 1000, 3, kv)
    st = state_bytes(cfg, 3, state, kv)
    assert nb["mamba_conv"] == st["conv"] and nb["mamba_ssm"] == st["ssm"]


def test_weight_bytes_by_format():
    cfg = load_config("granite-4.0-h-tiny")
    n = count_params(cfg).total
    assert weight_bytes(cfg, "fp32")["total"] == 4 * n
    assert weight_bytes(cfg, "bf16")["total"] == 2 * n
    int8 = weight_bytes(cfg, "int8")
    assert n < int8["total"] < 1.01 * n and int8["scales"] > 0  # one fp32 scale per output row
    q8 = weight_bytes(cfg, "q8_0")["total"]
    assert n * 34 / 32 < q8 < n * 34 / 32 * 1.01  # plus the F32-kept norms, router, conv, SSM scalars
    w = weight_bytes(cfg, "bf16")
    assert w["total"] - w["active"] == pytest.approx(w["routed_experts"] * (64 - 6) / 64)


def test_hybrid_state_is_constant_in_context_and_kv_is_attention_only():
    h = load_config("granite-4.0-h-small")
    assert state_bytes(h, 1, "fp32")["ssm"] == 36 * 128 * 64 * 128 * 4 == 2 * state_bytes(h, 1, "bf16")["ssm"]
    assert predict(h, 4096).state_bytes == predict(h, 131072).state_bytes
    assert kv_bytes(h, 131072, 1, "bf16") == 4 * 2 * 8 * 128 * 2 * 131072  # 4 attention layers: 2 GiB
    # where the KV cache, growing per token, reaches the constant state: about 4.7k tokens
    assert kv_state_crossover(h, "bf16", "bf16") == pytest.approx(4719, abs=5)
    assert kv_state_crossover(load_config("granite-4.0-h-tiny"), "bf16", "fp32") == pytest.approx(7000, rel=0.02)


@pytest.mark.parametrize("name,ctx,batch", [("tiny-hybrid", 300, 2), ("tiny-dense", 300, 2), ("cpu-hybrid", 2048, 1),
                                            ("cpu-dense", 2048, 1)])
def test_predicted_within_5_percent_of_measured_on_cpu(name, ctx, batch):
    cfg = load_config(name)
    pred = predict(cfg, ctx, batch, weights="fp32", kv="fp32", state="fp32", ubatch=4096)
    meas = measured_cpu(cfg, ctx, batch, torch.float32)
    measured_total = meas["weights_bytes"] + meas["cache_bytes"] + meas["prefill_activation_bytes"]
    assert pred.weights_bytes == meas["weights_bytes"]
    assert abs(pred.total_bytes / measured_total - 1) < 0.05, (pred, meas)


def test_traced_on_meta_equals_tracked_on_cpu(monkeypatch):
    from granite_cli.ops import ssd

    # The same computation on both devices: the CPU's shorter SSD chunk (ssd.chunk_for) is turned
    # off, so the CPU runs the config's chunk as the meta trace does.
    monkeypatch.setattr(ssd, "CPU_CHUNK", 1 << 30)
    cfg = load_config("cpu-hybrid")
    # the SSD caches its [Q, Q] causal masks per device on first use; warm both devices so that
    # neither run counts a one-off allocation the other does not
    traced(cfg, 256, 1, torch.float32, ubatch=256)
    measured_cpu(cfg, 256, 1, torch.float32, ubatch=256)
    for ubatch in (1024, 512):
        t = traced(cfg, 1024, 2, torch.float32, ubatch=ubatch)
        m = measured_cpu(cfg, 1024, 2, torch.float32, ubatch=ubatch)
        assert t["prefill_activation_bytes"] == m["prefill_activation_bytes"], ubatch
        assert t["cache_bytes"] == m["cache_bytes"] and t["weights_bytes"] == m["weights_bytes"]


def test_live_tensor_tracker_counts_allocations_not_views():
    with LiveTensorBytes() as tr:
        a = torch.ones(1000)  # 4000 B
        v = a.view(10, 100)  # a view: nothing new
        a.mul_(2)  # in place: nothing new
        b = a + 1  # 4000 B more
        del b
        c = torch.ones(250)  # 1000 B
    assert tr.peak == 8000 and tr.live == 5000
    del a, v, c


def test_capacity_is_consistent_with_predictions():
    cfg = load_config("granite-4.0-h-tiny")
    mem = 80e9
    b = max_batch(cfg, mem, 131072)
    assert predict(cfg, 131072, b).total_bytes <= mem < predict(cfg, 131072, b + 1).total_bytes
    c = max_context(cfg, mem, 8)
    assert predict(cfg, c, 8).total_bytes <= mem * 1.0001
    dense = load_config("qwen3-8b")
    assert max_batch(dense, mem, 131072) < b  # the hybrid fits more long sessions


def test_claims_table_shape_and_e1b():
    claims = all_claims()
    assert {"claim", "conditions", "ratio", "verdict"} <= set(claims[0])
    e1b = [c for c in claims if c["claim"].startswith("E1b")]
    assert len(e1b) == 4 and all(c["verdict"] == "reproduced" for c in e1b)
    assert all(c["verdict"].split()[0] in ("reproduced", "holds", "not") for c in claims)


def test_parse_bytes():
    assert parse_bytes("10GiB") == 10 * 2**30 and parse_bytes("24GB") == 24e9 and parse_bytes("512MiB") == 2**29
    for bad in ("ten", "-1GB", "10XB", ""):
        with pytest.raises(InputError, match="bad size"):
            parse_bytes(bad)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "granite_cli", "memory-report", *args], capture_output=True, text=True)


def test_cli_json_rows_and_claims():
    r = _cli("-m", "granite-4.0-h-micro", "-m", "granite-4.0-micro", "--ctx", "4k,128k", "--batch", "1,8", "-f", "json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert len(d["rows"]) == 8
    for row in d["rows"]:
        for k in ("model", "ctx", "batch", "weights_bytes", "kv_bytes", "state_bytes", "activation_bytes",
                  "total_bytes",
                  "decode_activation_bytes"):
            assert k in row
        assert 0 < row["decode_activation_bytes"] < row["activation_bytes"]
    assert d["claims"] and all({"claim", "conditions", "ratio", "verdict"} <= set(c) for c in d["claims"])


def test_cli_budget_gate_exit_codes():
    ok = _cli("-m", "granite-4.0-h-tiny", "--ctx", "128k", "--batch", "1", "--weights", "int8", "--kv", "int8",
              "--budget", "9GB", "-f", "csv")
    assert ok.returncode == 0, ok.stderr
    over = _cli("-m", "granite-4.0-h-tiny", "--ctx", "128k", "--batch", "8", "--budget", "10GiB", "-f", "csv")
    assert over.returncode == 3
    line = over.stderr.strip().splitlines()[-1]
    assert "granite-4.0-h-tiny at ctx 131072 x batch 8 needs" in line and "over the 10.00 GiB budget" in line


@pytest.mark.parametrize("args,msg", [(["-m", "nope"], "unknown model"), (["--ctx", "12x"], "bad context '12x'"),
                                      (["--batch", "-1"], "bad batch"), (["--budget", "ten"], "bad size 'ten'"),
                                      (["--weights", "int3"], "unknown dtype")])
def test_cli_bad_input_exits_2(args, msg):
    r = _cli(*args)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_report_folder(tmp_path):
    r = _cli("-m", "granite-4.0-h-micro", "-m", "llama-3.2-3b", "--ctx", "4k,32k", "--batch", "1", "--out",
             str(tmp_path / "rep"), "-f", "md")
    assert r.returncode == 0, r.stderr
    for f in ("report.md", "report.json", "memory_vs_context.png", "capacity.png"):
        assert (tmp_path / "rep" / f).exists()
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert len(rep["rows"]) == 4 and rep["claims"]
    assert "## IBM's claims" in (tmp_path / "rep" / "report.md").read_text()


@pytest.mark.parametrize("name,ctx,batch,ubatch", [("tiny-hybrid", 96, 2, 40), ("tiny-dense", 96, 2, 40),
                                                   ("tiny-hybrid", 300, 1, 4096), ("cpu-hybrid", 1024, 1, 512)])
def test_allocation_replay_peak_equals_the_trackers_over_a_real_run(name, ctx, batch, ubatch):
    """bench's CPU memory of record: the tracker over a replay that allocates what the run allocated
    (first pieces and continuations, routed experts with the run's own routing) equals, to the byte,
    the tracker over the real run; the replay leaves the cache as it found it."""
    from granite_cli.memory.trace import AllocationReplay, LiveTensorBytes
    from granite_cli.model.loading import load_model
    from granite_cli.ops.basic import record_routing, replay_routing

    model = load_model(name)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, ctx), generator=torch.Generator().manual_seed(0))
    cache = model.allocate_cache(batch, ctx)

    def prefill():
        for s in range(0, ctx, ubatch):
            model(ids[:, s : s + ubatch], cache, logits="last")

    routing: list = []
    with torch.inference_mode():
        with LiveTensorBytes() as real, record_routing(routing):
            prefill()
        tensors = [t for layer in cache.layers for t in vars(layer).values()]
        state = [t.clone() for t in tensors]
        cache.pos = 0
        with AllocationReplay() as replay, replay_routing(routing):
            prefill()
    assert replay.peak == real.peak > 0
    assert (len(routing) > 0) == bool(model.cfg.num_local_experts)
    assert all(torch.equal(t, saved) for t, saved in zip(tensors, state))
