"""Shared helpers: tiny configs of every architecture, and transformers as the oracle (test-only).

Run: python -m pytest -q
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from granite_cli.config import ModelConfig, from_profile_dict

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("transformers").setLevel(logging.ERROR)


def _free_threads() -> int:
    """The CPUs other processes leave free now. Beside a busy process a thread pool as wide as the machine
    waits on the busy core at every barrier (decode at 0.20-0.45x); on the free ones the suite runs
    at the speed those cores give. GRANITE_TEST_THREADS fixes the count."""
    if os.environ.get("GRANITE_TEST_THREADS"):
        return int(os.environ["GRANITE_TEST_THREADS"])
    from granite_cli.bench.contention import auto_threads, busy_elsewhere

    return auto_threads(busy_elsewhere(0.3))


THREADS = _free_threads()
torch.set_num_threads(THREADS)
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))  # the CLI runs the tests start take it too


def tiny(arch: str = "granitemoehybrid", **over) -> ModelConfig:
    """A tiny config of any architecture; keyword overrides are profile keys."""
    base = dict(architecture=arch, vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=48, rms_norm_eps=1e-5, max_position_embeddings=512,
                torch_dtype="float32")
    if arch == "granitemoehybrid":
        base.update(attention_layers=[1, 3], shared_intermediate_size=40, num_local_experts=4, num_experts_per_tok=2,
                    mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4,
                    mamba_expand=2, mamba_chunk_size=16, position_embedding_type="nope", embedding_multiplier=12.0,
                    attention_multiplier=0.0625, residual_multiplier=0.22, logits_scaling=6.0,
                    tie_word_embeddings=True)
    elif arch == "granite":
        base.update(embedding_multiplier=12.0, attention_multiplier=0.0625, residual_multiplier=0.22,
                    logits_scaling=6.0, rope_theta=10000.0, tie_word_embeddings=True)
    elif arch == "llama":
        base.update(rope_theta=500000.0, tie_word_embeddings=False,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 64})
    elif arch == "qwen3":
        base.update(head_dim=24, rope_theta=1000000.0, tie_word_embeddings=False)
    elif arch == "qwen3_moe":
        base.update(head_dim=24, moe_intermediate_size=24, num_local_experts=8, num_experts_per_tok=3,
                    norm_topk_prob=True, rope_theta=1000000.0, tie_word_embeddings=False)
    base.update(over)
    name = base.pop("name", f"tiny-{arch}")
    return from_profile_dict(base, name, "test")


HF_CLASSES = {
    "granitemoehybrid": "GraniteMoeHybridForCausalLM",
    "granite": "GraniteForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def granite(*args, timeout=600) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "granite_cli", *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


# No test may run longer than this (seconds; the slowest take about 3 minutes on 2 cores): a test
# that hangs fails with a TimeoutError naming it, and the suite goes on, instead of holding CI for
# hours. Subprocesses have their own, tighter limits where they are started.
TEST_LIMIT_S = int(os.environ.get("GRANITE_TEST_LIMIT_S", "900"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    def expired(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran over {TEST_LIMIT_S} s (GRANITE_TEST_LIMIT_S)")

    armed = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if armed:
        old = signal.signal(signal.SIGALRM, expired)
        signal.alarm(TEST_LIMIT_S)
    try:
        yield
    finally:
        if armed:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="session", autouse=True)
def kernel_cache(tmp_path_factory):
    """The CPU decode kernel builds into this run's own folder (inherited by the CLI runs): nothing is
    written to the user's cache, and a home folder that cannot be written does not change what runs."""
    os.environ["GRANITE_CACHE_DIR"] = str(tmp_path_factory.mktemp("granite-cache"))
    yield
    os.environ.pop("GRANITE_CACHE_DIR", None)


@pytest.fixture
def server():
    """Make hostile servers (tests/hostile_server.py) from routes; all stopped after the test."""
    from tests.hostile_server import HostileServer

    made = []

    def make(routes):
        s = HostileServer(routes)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def one_error(r, code: int, *words: str) -> str:
    """The run exited with code, printed exactly one error line holding every word, and no traceback."""
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def hf_load(arch: str, folder):
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, HF_CLASSES[arch])
    return cls.from_pretrained(str(folder), dtype=torch.float32).eval()


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float, name: str = "") -> None:
    diff = (a.float() - b.float()).abs()
    worst, mean = diff.max().item(), diff.mean().item()
    assert worst <= atol, f"{name}: max diff {worst:.3g} (mean {mean:.3g}) > {atol}"
