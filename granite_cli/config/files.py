"""Where a ModelConfig comes from: a profile shipped in `profiles/` (our own key names, which are
Hugging Face's where one exists; unknown keys are errors), a profile .toml of the user's, a Hugging
Face `config.json`, or a checkpoint folder holding one. And the config.json granite writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from granite_cli import hub
from granite_cli.arch import ARCHS
from granite_cli.arch.base import layer_types, layers_from_indices, time_step_limit
from granite_cli.config.hf import from_hf_dict, to_hf_dict
from granite_cli.config.model import ModelConfig, check_layer_count, check_types, check_value_types, invalid, validate
from granite_cli.errors import InputError
from granite_cli.fsutil import file_mode

_PROFILE_KEYS = {f.name for f in dataclasses.fields(ModelConfig)}
_PROFILE_KEYS -= {"name", "layer_types", "rope_scaling", "time_step_limit"}
_PROFILE_KEYS |= {"layer_types", "attention_layers", "rope_scaling", "time_step_limit"}


def profiles_dir():
    return resources.files("granite_cli.profiles")


def profile_names() -> list[str]:
    return sorted(p.name[: -len(".toml")] for p in profiles_dir().iterdir() if p.name.endswith(".toml"))


def from_profile_dict(d: dict[str, Any], name: str, source: str) -> ModelConfig:
    unknown = sorted(k for k in d if k not in _PROFILE_KEYS)
    if unknown:
        raise invalid(source,
                      f"unknown key {unknown[0]!r}; valid keys are the ModelConfig fields (see profiles/README.md)")
    d = dict(d)
    for req in ("architecture", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size"):
        if req not in d:
            raise invalid(source, f"missing required key {req!r}")
    check_value_types(d, source)
    n = d["num_hidden_layers"]
    for k in ("num_hidden_layers", "num_attention_heads", "hidden_size"):  # counts and divisors used below
        if d[k] <= 0:
            raise invalid(source, f"{k} must be a positive integer, got {d[k]}")
    check_layer_count(n, source)
    if "layer_types" in d and "attention_layers" in d:
        raise invalid(source, "give either layer_types or attention_layers, not both")
    if "layer_types" in d:
        types = layer_types(d.pop("layer_types"), n, source)
    else:
        types = layers_from_indices(d.pop("attention_layers", "all"), n, source)
    if "rope_scaling" in d:
        rs = d.pop("rope_scaling")
        if not isinstance(rs, dict):
            raise invalid(source, f"rope_scaling must be a table, got {rs!r}")
        d["rope_scaling"] = tuple(sorted(rs.items())) if rs else None
    if "time_step_limit" in d:
        d["time_step_limit"] = time_step_limit(d.pop("time_step_limit"), source)
    d.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"])
    arch = ARCHS.get(d["architecture"])  # an unknown one is refused by validate, naming the file
    for k, v in (arch.profile_defaults if arch else {}).items():
        d.setdefault(k, v)
    try:
        cfg = ModelConfig(name=name, layer_types=types, **d)
    except TypeError as e:  # pragma: no cover - guarded by the key check above
        raise invalid(source, str(e)) from None
    check_types(cfg, source)
    return validate(cfg, source)


def load_profile_file(path: Path, name: str | None = None) -> ModelConfig:
    try:
        if Path(path).stat().st_size > MAX_CONFIG_BYTES:
            raise InputError(f"{path}: too large to be a profile")
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read profile ({e.strerror})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a TOML profile (not UTF-8 text)") from None
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML ({e})") from None
    except RecursionError:
        raise InputError(f"{path}: TOML nested too deeply to be a profile") from None
    return from_profile_dict(d, name or Path(path).stem, str(path))


def load_config(spec: str | Path | ModelConfig) -> ModelConfig:
    """A profile name, a profile .toml, a config.json path, a checkpoint folder, or a Hugging Face
    Hub id `org/name[@revision]` (its config.json only) → ModelConfig. A local path wins over a Hub id."""
    if isinstance(spec, ModelConfig):
        return spec
    s = str(spec)
    p = Path(s)
    if p.is_dir():
        cj = p / "config.json"
        if not cj.is_file():
            raise InputError(f"{p}: folder has no config.json; pass a checkpoint folder or a profile name")
        return _load_json(cj, p.name)
    if p.is_file():
        if p.suffix == ".toml":
            return load_profile_file(p)
        return _load_json(p, p.parent.name or p.stem)
    res = profiles_dir() / f"{s}.toml"
    if "/" not in s and res.is_file():
        d = tomllib.loads(res.read_text(encoding="utf-8"))
        return from_profile_dict(d, s, f"profiles/{s}.toml")
    if hub.parse_id(s):
        return _load_json(hub.snapshot(s, weights=False) / "config.json", hub.model_name(s))
    raise InputError(
        f"unknown model {s!r}: not a profile, config.json, checkpoint folder or Hub id (org/name); see "
        "`granite profiles list`"
    )


# A config.json is a few kB; anything far larger is not one (and is not read into memory to find out).
MAX_CONFIG_BYTES = 16 * 2**20


def read_json_config(path: Path) -> Any:
    """The parsed JSON of a config file, or an InputError naming what is wrong with it."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise InputError(f"{path}: {size} bytes is too large for a config.json; pass a checkpoint folder, a "
                             "config.json or a profile name")
        text = path.read_bytes().decode("utf-8")
        return json.loads(text)
    except OSError as e:
        raise InputError(f"{path}: cannot read config ({e.strerror})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a JSON config (not UTF-8 text); pass a checkpoint folder, a config.json or "
                         "a profile name") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix the file or re-download "
                         "it") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to be a config") from None


def _load_json(path: Path, name: str) -> ModelConfig:
    return from_hf_dict(read_json_config(path), name=name, source=str(path))


def export_hf_config(cfg: ModelConfig, out_dir: Path, overwrite: bool = True) -> Path:
    """Write `config.json` for cfg into out_dir (atomically) and return its path. With
    overwrite=False an existing config.json is refused (InputError) rather than replaced."""
    import tempfile

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} is a file; give a folder to write config.json into")
    dst = out_dir / "config.json"
    if dst.is_symlink() or (dst.exists() and not dst.is_file()):
        raise InputError(f"{dst} is not a regular file; choose another folder")
    if dst.exists() and not overwrite:
        raise InputError(f"{dst} already exists; pass --force to replace it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"{out_dir}: a parent is a file, not a folder; choose a path inside a folder") from None
    fd, tmp = tempfile.mkstemp(prefix=".config.json.", suffix=".partial", dir=out_dir)
    try:
        os.fchmod(fd, file_mode())  # the user's umask, not mkstemp's private 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(to_hf_dict(cfg), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst
