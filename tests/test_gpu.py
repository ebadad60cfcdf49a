"""The whole model on a CUDA GPU (marked gpu; skipped without one): against transformers on the CPU,
chunked prefill against one prefill (the flash + log-sum-exp continuation path), and bench's
CUDA-graph decode against eager decode.

Run on a GPU machine: python -m pytest -q -m gpu tests/test_gpu.py
"""

from __future__ import annotations

import pytest
import torch

from granite_cli.model.loading import load_model, save_checkpoint
from tests.conftest import hf_load, tiny

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]

HYBRID = dict(attention_layers=[1, 3], mamba_chunk_size=16)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("moe", [True, False])
def test_fp32_on_cuda_matches_transformers_on_cpu(tmp_path, moe):
    over = dict(HYBRID) if moe else dict(HYBRID, num_local_experts=0, num_experts_per_tok=0)
    cfg = tiny("granitemoehybrid", **over)
    cpu_model = load_model(cfg, weights="random", dtype="fp32", seed=3, std=0.1)
    save_checkpoint(cpu_model, tmp_path)
    hf = hf_load("granitemoehybrid", tmp_path)
    ours = load_model(tmp_path, weights="checkpoint", dtype="fp32", device="cuda")
    ids = torch.randint(0, cfg.vocab_size, (2, 45), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids.cuda()).cpu()
    # TF32 may be used by Triton's dots in fp32: allow 1e-3 of the logit scale.
    assert (got - want).abs().max().item() <= 1e-3 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_chunked_prefill_and_decode_equal_one_prefill_on_cuda(dtype):
    cfg = tiny("granitemoehybrid", **HYBRID, num_attention_heads=4, num_key_value_heads=2)
    m = load_model(cfg, weights="random", dtype=dtype, device="cuda", seed=1, std=0.1)
    ids = torch.randint(0, cfg.vocab_size, (2, 70), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.inference_mode():
        full = m(ids).float()
        cache = m.allocate_cache(2, 80)
        parts = [m(ids[:, a:b], cache).float() for a, b in ((0, 23), (23, 50), (50, 66))]
        parts += [m(ids[:, i : i + 1], cache).float() for i in range(66, 70)]
    got = torch.cat(parts, 1)
    tol = 1e-4 if dtype == "fp32" else 3e-2
    assert _rel(got, full) <= tol


def test_bench_decode_rows_use_cuda_graphs_and_stay_valid():
    from granite_cli.bench.runner import Runner
    from granite_cli.bench.spec import SweepSpec

    rows = []
    for graph in (True, False):
        spec = SweepSpec(models=["tiny-hybrid"], ctx=[64], batch=[2], phases=["prefill", "decode"], gen=4,
                         dtype="bf16", device="cuda", reps=2, warmup=1, ubatch=32, cuda_graph=graph)
        Runner(spec, rows.append).run()
    dec = [r for r in rows if r.phase == "decode"]
    assert [r.decode_mode for r in dec] == ["cuda_graph", "eager"], [r.decode_note for r in dec]
    assert all(r.status == "ok" and r.valid for r in rows)
    assert all(r.memory_source == "cuda_allocated" and r.peak_bytes > 0 for r in rows)


def test_graph_replay_gives_the_eager_logits():
    """The captured steps, replayed after a restore, give the same logits as eager steps."""
    from granite_cli.bench.steps import graph_steps

    cfg = tiny("granitemoehybrid", **HYBRID)
    m = load_model(cfg, weights="random", dtype="bf16", device="cuda", seed=5, std=0.1)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.inference_mode():
        cache = m.allocate_cache(2, 40)
        m(ids[:, :32], cache)
        snap = cache.snapshot()
        eager = [m(ids[:, i : i + 1], cache, logits="last").float().clone() for i in range(32, 40)]
        cache.restore(snap)
        replay, mode, note = graph_steps(m, cache, ids[:, 32:], 8, snap, warmed=False)
        assert mode == "cuda_graph", note
        cache.restore(snap)
        last = replay().float()
    assert _rel(last, eager[-1]) <= 1e-2
