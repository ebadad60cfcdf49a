"""Hugging Face Hub ids (`org/name[@revision]`) as model arguments, offline, against a Hub cache
this test lays out itself in huggingface_hub's own layout (models--org--name/{refs,snapshots,blobs},
snapshot files linked to blobs), with HF_HUB_OFFLINE=1 so nothing reaches the network."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from granite_cli.model.loading import load_model, save_checkpoint
from tests.conftest import tiny

MAIN = "a" * 40
V1 = "b" * 40


def _snapshot(cache: Path, repo: str, commit: str, model, refs: tuple[str, ...]) -> Path:
    """Lay out one snapshot of `repo` at `commit` as the Hub cache does, refs pointing at it."""
    root = cache / ("models--" + repo.replace("/", "--"))
    staged = save_checkpoint(model, root / "staging")
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for f in sorted(staged.iterdir()):
        blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        f.replace(blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    staged.rmdir()
    (root / "refs").mkdir(exist_ok=True)
    for r in refs:
        (root / "refs" / r).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hub cache with acme/tiny-hybrid at main (4 layers) and at tag v1 (6 layers)."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    main = load_model(tiny(), seed=1)
    _snapshot(cache, "acme/tiny-hybrid", MAIN, main, ("main",))
    _snapshot(cache, "acme/tiny-hybrid", V1, load_model(tiny(num_hidden_layers=6, attention_layers=[1, 5]), seed=2),
              ("v1",))
    return cache, main


def _env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(cache.parent)}


def granite(cache: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "granite_cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**_env(cache), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
                          stdin=subprocess.DEVNULL, timeout=600)


def test_profiles_and_memory_report_read_the_config_of_a_hub_id(hub, tmp_path):
    cache, _ = hub
    r = granite(cache, "profiles", "show", "acme/tiny-hybrid", "--format", "json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["config"]["name"] == "tiny-hybrid" and shown["config"]["num_hidden_layers"] == 4
    r = granite(cache, "profiles", "show", "acme/tiny-hybrid@v1", "--format", "json", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["config"]["num_hidden_layers"] == 6, r.stderr
    r = granite(cache, "profiles", "show", f"acme/tiny-hybrid@{MAIN}", "--format", "json", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["config"]["num_hidden_layers"] == 4, r.stderr
    r = granite(cache, "memory-report", "-m", "acme/tiny-hybrid@v1", "--ctx", "1k", "--batch", "1", "--format",
                "json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert {row["model"] for row in rows} == {"tiny-hybrid"}


def test_a_missing_id_offline_is_one_line_and_exit_2(hub, tmp_path):
    cache, _ = hub
    for args in (("profiles", "show", "acme/absent"), ("convert", "acme/absent", str(tmp_path / "o")),
                 ("profiles", "show", "acme/tiny-hybrid@no-such-tag")):
        r = granite(cache, *args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert "HF_HUB_OFFLINE=1" in lines[0] and "local folder" in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


def test_a_local_folder_of_the_same_name_wins(hub, tmp_path):
    cache, _ = hub
    save_checkpoint(load_model(tiny(num_hidden_layers=2, attention_layers=[1]), seed=3), tmp_path / "acme" /
                    "tiny-hybrid")
    r = granite(cache, "profiles", "show", "acme/tiny-hybrid", "--format", "json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"]["num_hidden_layers"] == 2


def test_convert_reads_the_weights_of_a_hub_id(hub, tmp_path):
    cache, main = hub
    r = granite(cache, "convert", "acme/tiny-hybrid", str(tmp_path / "t.gguf"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = granite(cache, "convert", str(tmp_path / "t.gguf"), str(tmp_path / "back"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    back = load_model(tmp_path / "back", weights="checkpoint")
    want = main.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in back.state_dict().items())
    r = granite(cache, "inspect", str(tmp_path / "t.gguf"), "--format", "json", cwd=tmp_path)
    assert json.loads(r.stdout)["model"] == "tiny-hybrid"


def test_load_model_and_bench_take_a_hub_id(hub, tmp_path, monkeypatch):
    cache, main = hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    m = load_model("acme/tiny-hybrid", weights="checkpoint")
    assert m.cfg.name == "tiny-hybrid"
    assert all(torch.equal(v, main.state_dict()[k]) for k, v in m.state_dict().items())
    r = granite(cache, "bench", "-m", "acme/tiny-hybrid", "--weights", "checkpoint", "--ctx", "=64", "--batch",
                "1", "--phase", "prefill", "--reps", "1", "--warmup", "0", "--format", "json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert [(x["model"], x["status"]) for x in rows] == [("tiny-hybrid", "ok")]


def test_what_counts_as_a_hub_id(tmp_path, monkeypatch):
    from granite_cli.hub import model_name, parse_id

    monkeypatch.chdir(tmp_path)
    assert parse_id("ibm-granite/granite-4.0-h-tiny") == ("ibm-granite/granite-4.0-h-tiny", None)
    assert parse_id("ibm-granite/granite-4.0-h-tiny@refs/pr/3") == ("ibm-granite/granite-4.0-h-tiny", "refs/pr/3")
    assert model_name("ibm-granite/granite-4.0-h-tiny@v1") == "granite-4.0-h-tiny"
    for not_an_id in ("granite-4.0-h-tiny", "a/b/c", "../x", "a/config.json", "org/x.gguf", "a--b/c", "a/-b", "a/b@"):
        assert parse_id(not_an_id) is None, not_an_id
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse_id("org/name") is None  # the local folder wins
