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
from granite_cli.memory.claims import all_claims
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


def test_granite_capacity_charges_one_prefill_working_set_per_gpu():
    from granite_cli.memory.capacity import Deployment, Sized, max_context, sessions
    from granite_cli.memory.gpus import GPU

    gpu = GPU("x", "x", 80 * 2**30)
    m, d = Sized.of("granite-4.0-h-tiny"), Deployment("none", gpu, state="fp32")
    n = sessions(m, d, 131072)["sessions"]
    one = predict(m.cfg, 131072, 1, state="fp32")
    per = one.kv_bytes + one.state_bytes
    assert one.weights_bytes + one.activation_bytes + n * per <= gpu.total_bytes
    assert one.weights_bytes + one.activation_bytes + (n + 1) * per > gpu.total_bytes
    c = max_context(m, d, 8)
    assert sessions(m, d, c)["sessions"] >= 8 and (c == m.cfg.max_position_embeddings or
                                                     sessions(m, d, c + 1)["sessions"] < 8)
    dense = Sized.of("qwen3-8b")
    assert sessions(dense, d, 131072)["sessions"] < n  # the hybrid fits more long sessions


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
    return subprocess.run([sys.executable, "-m", "granite_cli", "memory-report", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)


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
                                      (["--batch", "-1"], "bad batch"), (["--budget", "ten"], "bad --budget 'ten'"),
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
    from granite_cli.ops.routing import record_routing, replay_routing

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


def _shard(name: str, t: torch.Tensor, cfg, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s piece of checkpoint tensor `name` under tensor parallelism, by the rules of
    docs/sharding.md, applied to the tensor itself (the oracle for memory.shard's per-rank formulas)."""
    def split(x, dim):
        return x.chunk(tp, dim)[rank]

    def heads_or_one(x, n, dim=0):  # n heads (or groups) along dim: split, or the one this rank keeps
        if n % tp == 0:
            return split(x, dim)
        return x.unflatten(dim, (n, -1)).select(dim, rank * n // tp)

    di, gn, h = cfg.d_inner, cfg.mamba_n_groups * cfg.mamba_d_state, cfg.mamba_n_heads
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        rows = -(-t.shape[0] // tp) * tp  # the vocabulary padded to a multiple of the ranks
        return split(torch.cat([t, t.new_empty(rows - t.shape[0], *t.shape[1:])]), 0)
    if name.endswith(("q_proj.weight", "mamba.dt_bias", "mamba.A_log", "mamba.D", "mamba.norm.weight")):
        return split(t, 0)
    if name.endswith(("o_proj.weight", "mamba.out_proj.weight", "shared_mlp.output_linear.weight")):
        return split(t, 1)
    if name.endswith(("k_proj.weight", "v_proj.weight")):
        return heads_or_one(t, cfg.num_key_value_heads)
    if name.endswith(("mamba.in_proj.weight", "mamba.conv1d.weight", "mamba.conv1d.bias")):
        sizes = [di, di, gn, gn, h] if "in_proj" in name else [di, gn, gn]
        parts = list(t.split(sizes, 0))
        bc = len(parts) - 3 if "in_proj" in name else 1  # where B and C start
        return torch.cat([heads_or_one(p, cfg.mamba_n_groups) if bc <= i < bc + 2 else split(p, 0)
                          for i, p in enumerate(parts)])
    if name.endswith("block_sparse_moe.input_linear.weight") or name.endswith("shared_mlp.input_linear.weight"):
        dim = t.dim() - 2
        gate, up = t.chunk(2, dim)
        return torch.cat([split(gate, dim), split(up, dim)], dim)
    if name.endswith("block_sparse_moe.output_linear.weight"):
        return split(t, 2)
    assert name.endswith(("norm.weight", "layernorm.weight", "router.layer.weight")), name
    return t  # replicated


@pytest.mark.parametrize("groups,tp", [(1, 2), (1, 4), (2, 2), (2, 4)])
def test_tensor_parallel_bytes_per_rank_match_sharding_the_tensors(groups, tp):
    from granite_cli.checkpoint.names import checkpoint_entries
    from granite_cli.memory.shard import rank_config
    from tests.conftest import tiny

    cfg = tiny("granitemoehybrid", vocab_size=130, mamba_n_groups=groups, tie_word_embeddings=False)
    rank = rank_config(cfg, tp)
    want = weight_bytes(rank, "bf16")["total"]
    for r in range(tp):
        pieces = {e.ckpt: _shard(e.ckpt, torch.empty(e.shape, dtype=torch.bfloat16, device="meta"), cfg, tp, r)
                  for e in checkpoint_entries(cfg)}
        assert sum(p.numel() * 2 for p in pieces.values()) == want, f"rank {r}"
        # the caches follow the sharded projections: KV heads from k_proj, conv channels from conv1d, SSM heads
        kv_rows = pieces["model.layers.1.self_attn.k_proj.weight"].shape[0]
        assert kv_bytes(rank, 1, 1, "bf16") == 2 * len(cfg.attention_layers) * kv_rows * 2
        conv_ch = pieces["model.layers.0.mamba.conv1d.weight"].shape[0]
        heads = pieces["model.layers.0.mamba.A_log"].shape[0]
        st = state_bytes(rank, 1, "fp32", "bf16")
        assert st["conv"] == len(cfg.mamba_layers) * conv_ch * (cfg.mamba_d_conv - 1) * 2
        assert st["ssm"] == len(cfg.mamba_layers) * heads * cfg.mamba_d_head * cfg.mamba_d_state * 4
    assert want < weight_bytes(cfg, "bf16")["total"]


def test_tp_that_does_not_divide_the_heads_is_refused_and_node_capacity_grows_with_gpus():
    from granite_cli.memory.report import node_capacity
    from granite_cli.memory.shard import rank_config

    with pytest.raises(InputError, match="cannot be split over 3 GPUs: its 32 attention heads"):
        rank_config(load_config("granite-4.0-h-small"), 3)
    from granite_cli.memory.capacity import Deployment, Sized, sessions
    from granite_cli.memory.gpus import GPUS

    m, d = Sized.of("granite-4.0-h-small"), Deployment("vllm", GPUS["h100-80gb"])
    rows = node_capacity([m], [131072], 8, d)
    by = {r["gpus"]: r for r in rows}
    assert by[1]["sessions@128k"] == sessions(m, d, 131072)["sessions"]
    assert by[8]["sessions@128k"] > by[4]["sessions@128k"] > by[2]["sessions@128k"] > by[1]["sessions@128k"]
    assert 3 in by and by[3]["tp"] in (1,)  # 3 GPUs: three single-GPU replicas (32 heads do not split in 3)


def test_memory_report_tp_rows_are_per_gpu():
    def run(*extra):
        r = subprocess.run([sys.executable, "-m", "granite_cli", "memory-report", "-m", "granite-4.0-h-small", "--ctx",
                            "128k", "--batch", "8", "-f", "json", *extra], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=300)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["rows"][0]

    one, four = run(), run("--tp", "4")
    assert four["tp"] == 4 and one["tp"] == 1
    # KV heads (8) and Mamba heads split four ways; the replicated norms and router keep it above a quarter
    assert four["kv_bytes"] == one["kv_bytes"] / 4 and four["state_bytes"] < one["state_bytes"] / 3
    assert one["weights_bytes"] / 4 < four["weights_bytes"] < one["weights_bytes"] / 3.9
    r = subprocess.run([sys.executable, "-m", "granite_cli", "memory-report", "-m", "granite-4.0-h-small", "--tp", "3"],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert r.returncode == 2 and "cannot be split over 3 GPUs" in r.stderr and "Traceback" not in r.stderr
