"""The CLI contract: commands listed, formats that parse, exit codes, one-line errors, fast --help.

Run: python -m pytest -q tests/test_cli.py
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def granite(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "granite_cli", *args], capture_output=True, text=True, cwd=cwd,
                          stdin=subprocess.DEVNULL, timeout=600)


def test_help_lists_commands_without_importing_torch():
    code = ("import sys; from typer.testing import CliRunner; from granite_cli.app import app; "
            "r = CliRunner().invoke(app, ['--help']); print(r.output); print('TORCH', 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                       timeout=120)
    for cmd in ("bench", "memory-report", "convert", "profiles", "env"):
        assert cmd in r.stdout
    assert "TORCH False" in r.stdout


def test_profiles_list_json(tmp_path):
    r = granite("profiles", "list", "--format", "json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["profiles"]
    by = {x["name"]: x for x in rows}
    assert len(by) == 19
    assert by["granite-4.0-h-small"]["params_total"] == 32_207_337_984
    assert by["granite-4.0-h-small"]["params_active"] == 8_803_121_664
    assert by["cpu-hybrid"]["attention_layers"] == 2 and by["cpu-hybrid"]["mamba_layers"] == 8
    assert by["qwen3-8b"]["kind"] == "dense"


@pytest.mark.parametrize("fmt,check", [("csv", lambda s: s.splitlines()[0].startswith("name,kind")),
                                        ("md", lambda s: s.startswith("| name | kind")),
                                        ("table", lambda s: "granite-4.0-h-tiny" in s)])
def test_profiles_list_other_formats(fmt, check):
    r = granite("profiles", "list", "-f", fmt)
    assert r.returncode == 0 and check(r.stdout), r.stdout[:300]


def test_profiles_show_and_export(tmp_path):
    r = granite("profiles", "show", "tiny-hybrid", "-f", "json")
    d = json.loads(r.stdout)
    assert d["config"]["attention_layer_indices"] == [1, 3]
    assert sum(d["params"]["groups"].values()) == d["params"]["total"]
    r = granite("profiles", "export", "granite-4.0-h-tiny", str(tmp_path / "out"))
    assert r.returncode == 0 and r.stdout.strip().endswith("config.json")
    transformers = pytest.importorskip("transformers")
    hf = transformers.GraniteMoeHybridConfig.from_pretrained(str(tmp_path / "out"))
    assert hf.num_local_experts == 64 and hf.layer_types[5] == "full_attention"


def test_env_json():
    r = granite("env", "--format", "json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for key in ("python", "torch", "triton", "cuda_available", "gpu", "cpu", "torch_threads", "kernel_impl",
                "cpu_decode_kernel"):
        assert key in d
    assert d["kernel_impl"] == "torch"


@pytest.mark.parametrize("args,msg", [
    (["profiles", "show", "no-such-model"], "unknown model 'no-such-model'"),
    (["profiles", "show", "{bad}"], "top-k must not exceed"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, args, msg):
    bad = tmp_path / "bad.toml"
    bad.write_text((
        'architecture = "granitemoehybrid"\nvocab_size = 8\nhidden_size = 8\nnum_hidden_layers = 1\n'
        'num_attention_heads = 2\nnum_key_value_heads = 1\nintermediate_size = 4\nshared_intermediate_size = 4\n'
        'num_local_experts = 2\nnum_experts_per_tok = 3\n'))
    r = granite(*[str(bad) if a == "{bad}" else a for a in args])
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in r.stderr


def test_bad_usage_exits_2():
    r = granite("profiles", "list", "--format", "xml")
    assert r.returncode == 2


def test_every_subpackage_ships_in_the_wheel():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"granite_cli." + p.parent.name for p in (root / "granite_cli").glob("*/__init__.py")}
    found |= {"granite_cli", "granite_cli.commands", "granite_cli.profiles"}
    assert found <= listed, f"not packaged: {sorted(found - listed)}"


def test_inspect_is_a_command_and_the_old_spelling_still_works(tmp_path):
    r = granite("convert", "--from-profile", "tiny-hybrid", str(tmp_path / "m.gguf"), "--no-verify")
    assert r.returncode == 0, r.stderr
    new = granite("inspect", str(tmp_path / "m.gguf"), "-f", "json")
    old = granite("convert", "inspect", str(tmp_path / "m.gguf"), "-f", "json")
    assert new.returncode == old.returncode == 0
    assert json.loads(new.stdout) == json.loads(old.stdout)
    assert json.loads(new.stdout)["architecture"] == "granitehybrid"
