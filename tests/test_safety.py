"""Nothing a user owns is ever deleted: granite replaces only what it can prove it wrote.

One regression test per data-loss path found (report folders, convert --force over folders, files,
links and a DST holding SRC, profiles export), plus the paths that must keep working: rewriting a
granite report in place (keeping the user's files beside it) and replacing a granite checkpoint.

Run: python -m pytest -q tests/test_safety.py
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from granite_cli.fsutil import MANIFEST

BENCH = ["bench", "-m", "tiny-hybrid", "--ctx", "32", "--batch", "1", "--gen", "2", "--reps", "1", "--warmup", "0",
         "-f", "json"]
MEMORY = ["memory-report", "-m", "tiny-hybrid", "--ctx", "1k", "--batch", "1", "-f", "json"]


def granite(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "granite_cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, stdin=subprocess.DEVNULL, timeout=900)


def tree(root: Path) -> dict[str, str]:
    """Every file under root → sha256 (a link → its target), symlinks not followed."""
    out = {}
    for dp, dns, fns in os.walk(root):
        for f in fns + [d for d in dns if os.path.islink(os.path.join(dp, d))]:
            p = Path(dp) / f
            out[str(p.relative_to(root))] = ("link:" + os.readlink(p) if p.is_symlink()
                                             else hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def refused(r, *words):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("c") / "ckpt"
    r = granite("convert", "--from-profile", "tiny-hybrid", d, "--no-verify")
    assert r.returncode == 0, r.stderr
    return d


def user_files(d: Path) -> dict[str, str]:
    (d / "sub").mkdir(parents=True)
    (d / "notes.md").write_text("my notes\n")
    (d / "sub" / "a.txt").write_text("keep me\n")
    return tree(d)


# ------------------------------------------------------------------------------------ report folders

@pytest.mark.parametrize("cmd", [MEMORY, BENCH], ids=["memory-report", "bench"])
def test_out_into_a_users_folder_is_refused_before_any_work(tmp_path, cmd):
    before = user_files(tmp_path / "reports")
    r = granite(*cmd, "--out", tmp_path / "reports")
    refused(r, "holds files granite did not write")
    assert r.stdout == ""  # refused up front: nothing was run
    assert tree(tmp_path / "reports") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports"]  # no temporary left beside it


@pytest.mark.parametrize("cmd,made", [(MEMORY, {"report.md", "report.json"}),
                                      (BENCH, {"report.md", "rows.jsonl", "analysis.json"})],
                         ids=["memory-report", "bench"])
def test_a_granite_report_is_rewritten_in_place_keeping_the_users_files(tmp_path, cmd, made):
    out = tmp_path / "rep"
    assert granite(*cmd, "--out", out).returncode == 0
    listed = json.loads((out / MANIFEST).read_text())["files"]
    assert made <= set(listed) and set(listed) == {p.name for p in out.iterdir()} - {MANIFEST}
    (out / "README.md").write_text("what this run was for\n")  # the user's, beside the report
    (out / "stale.png").write_bytes(b"old plot")                 # granite's, not written again
    m = json.loads((out / MANIFEST).read_text())
    m["files"]["stale.png"] = hashlib.sha256(b"old plot").hexdigest()
    (out / MANIFEST).write_text(json.dumps(m))
    r = granite(*cmd, "--out", out)
    assert r.returncode == 0, r.stderr
    assert (out / "README.md").read_text() == "what this run was for\n"
    assert not (out / "stale.png").exists()
    assert made <= {p.name for p in out.iterdir()}
    assert "README.md" not in json.loads((out / MANIFEST).read_text())["files"]
    assert not list(tmp_path.glob(".rep.*"))


def test_a_report_file_the_user_changed_is_not_replaced(tmp_path):
    out = tmp_path / "rep"
    assert granite(*MEMORY, "--out", out).returncode == 0
    (out / "report.md").write_text("edited by hand\n")
    refused(granite(*MEMORY, "--out", out), "report.md was not written by granite, or was changed since")
    assert (out / "report.md").read_text() == "edited by hand\n"


def test_out_that_is_a_file_or_a_link_is_refused(tmp_path):
    (tmp_path / "f").write_text("mine\n")
    refused(granite(*MEMORY, "--out", tmp_path / "f"), "is a file")
    (tmp_path / "d").mkdir()
    os.symlink(tmp_path / "d", tmp_path / "lnk")
    refused(granite(*MEMORY, "--out", tmp_path / "lnk"), "symbolic link")
    assert (tmp_path / "f").read_text() == "mine\n" and list((tmp_path / "d").iterdir()) == []


def test_bench_jsonl_that_is_not_granite_rows_is_refused(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"my": "data"}\n')
    refused(granite(*BENCH, "--jsonl", f), "line 1 is not a granite bench row")
    assert f.read_text() == '{"my": "data"}\n'
    f.write_bytes(b"\xff\xfe binary")
    refused(granite(*BENCH, "--jsonl", f), "not a granite bench row")


def test_bench_jsonl_of_granite_rows_is_replaced_or_resumed(tmp_path):
    f = tmp_path / "rows.jsonl"
    assert granite(*BENCH, "--jsonl", f).returncode == 0
    n = len(f.read_text().splitlines())
    with open(f, "a") as fh:
        fh.write('{"schema_version": 1, "model": "tiny-hyb')  # a line cut by an interrupt
    r = granite(*BENCH, "--jsonl", f)
    assert r.returncode == 0, r.stderr
    assert len(f.read_text().splitlines()) == n


# ------------------------------------------------------------------------------------ convert --force

def test_dst_containing_src_is_refused_even_with_force(tmp_path):
    parent = tmp_path / "parent"
    r = granite("convert", "--from-profile", "tiny-hybrid", parent / "src", "--no-verify")
    assert r.returncode == 0
    (parent / "keep.txt").write_text("mine\n")
    before = tree(parent)
    refused(granite("convert", parent / "src", parent, "--force"), "contains SRC")
    refused(granite("convert", parent / "src", tmp_path, "--force"), "contains SRC")
    refused(granite("convert", "src", ".", "--force", cwd=parent), "contains SRC")
    assert tree(parent) == before


def test_force_over_a_folder_with_other_files_is_refused(tmp_path, ckpt):
    out = tmp_path / "out"
    before = user_files(out)
    refused(granite("convert", ckpt, out, "--force"), "not only a checkpoint", "--force replaces only a checkpoint")
    assert tree(out) == before
    # a checkpoint with one extra file of the user's is not only a checkpoint either
    assert granite("convert", ckpt, tmp_path / "c2").returncode == 0
    (tmp_path / "c2" / "NOTES.txt").write_text("mine\n")
    refused(granite("convert", ckpt, tmp_path / "c2", "--force"), "NOTES.txt is not part of a checkpoint")
    assert (tmp_path / "c2" / "NOTES.txt").read_text() == "mine\n"


def test_force_over_a_file_or_a_link_is_refused_and_leaves_nothing(tmp_path, ckpt):
    (tmp_path / "file.txt").write_text("mine\n")
    (tmp_path / "precious.bin").write_bytes(b"mine")
    os.symlink(tmp_path / "precious.bin", tmp_path / "x.gguf")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("mine\n")
    os.symlink(tmp_path / "mine", tmp_path / "lnk")
    (tmp_path / "not.gguf").write_text("not a gguf\n")
    before = tree(tmp_path)
    refused(granite("convert", ckpt, tmp_path / "file.txt", "--force"), "is a file")
    refused(granite("convert", ckpt, tmp_path / "x.gguf", "--force"), "symbolic link")
    refused(granite("convert", ckpt, tmp_path / "lnk", "--force"), "symbolic link")
    refused(granite("convert", ckpt, tmp_path / "not.gguf", "--force"), "not a GGUF file")
    refused(granite("convert", ckpt, tmp_path / "file.txt" / "o", "--force"), "is a file, not a folder")
    assert tree(tmp_path) == before  # and no hidden .old or .partial left


def test_force_replaces_a_checkpoint_and_a_gguf(tmp_path, ckpt):
    out, g = tmp_path / "out", tmp_path / "m.gguf"
    for _ in range(2):
        assert granite("convert", ckpt, out, "--force", "--dtype", "bf16").returncode == 0
        r = granite("convert", ckpt, g, "--force")
        assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "out"]


def test_profiles_export_never_replaces_a_users_file(tmp_path):
    (tmp_path / "f.txt").write_text("mine\n")
    refused(granite("profiles", "export", "tiny-hybrid", tmp_path / "f.txt"), "is a file")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text('{"mine": 1}\n')
    refused(granite("profiles", "export", "tiny-hybrid", tmp_path / "d"), "pass --force")
    assert (tmp_path / "d" / "config.json").read_text() == '{"mine": 1}\n'
    assert granite("profiles", "export", "tiny-hybrid", tmp_path / "d", "--force").returncode == 0
    assert json.loads((tmp_path / "d" / "config.json").read_text())["model_type"] == "granitemoehybrid"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["config.json"]
