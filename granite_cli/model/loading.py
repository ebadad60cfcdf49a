"""Build a model from a profile, config.json or checkpoint folder: random weights at real shapes,
or a Hugging Face safetensors checkpoint (single file or sharded with an index), read lazily.

Construction happens on the meta device; parameters are then allocated once, directly on the
target device and in the target dtype, and filled in place (no CPU materialisation first).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from granite_cli.checkpoint.names import IGNORED_CKPT_SUFFIXES, checkpoint_entries
from granite_cli.checkpoint.safetensors import SafetensorsFile, write_safetensors
from granite_cli.config import ModelConfig, export_hf_config, load_config, read_json_config
from granite_cli.errors import InputError
from granite_cli.model.model import GraniteModel

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16,
}


def parse_dtype(d: str | torch.dtype | None, default: str = "float32") -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    key = (d or default).lower()
    if key not in _DTYPES:
        raise InputError(f"unknown dtype {d!r}; use fp32, bf16 or fp16")
    return _DTYPES[key]


def check_seed(seed: int) -> int:
    """A seed torch's generators take: 0 to 2^64-1 (an InputError otherwise)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise InputError(f"--seed must be an integer between 0 and 2^64-1, got {seed!r:.40}")
    return seed


def build_empty(cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu") -> GraniteModel:
    """Parameters allocated (uninitialised) on `device` in `dtype`; `device='meta'` allocates nothing."""
    with torch.device("meta"):
        model = GraniteModel(cfg).to(dtype)
    if torch.device(device).type != "meta":
        # torch.empty per parameter, not Module.to_empty: its empty_like of a meta tensor runs through
        # torch._refs, which imports sympy on first use (0.5-1 s of every command's start-up here)
        for mod in model.modules():
            for name, p in mod._parameters.items():
                if p is not None:
                    mod._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                                         requires_grad=False)
    model.requires_grad_(False)
    return model.eval()


# A prime-length block of random values, tiled with a per-tensor random offset: large tensors get
# distinct, well-spread values at memory speed (normal_ on billions of elements takes minutes on a CPU).
_TILE = 1_000_003


@torch.no_grad()
def fill_random(name: str, p: torch.Tensor, g: torch.Generator, tile: torch.Tensor, std: float = 0.02) -> None:
    """Fill one tensor in place by the reference init rules for its name (a parameter or checkpoint
    name): norms and D = 1, A_log = log(1..H), dt_bias = softplus⁻¹ of dt log-uniform in [1e-3, 1e-1],
    biases 0, weights normal(0, std); tensors above the tile's size copy the tile from a random offset."""
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name and leaf == "weight":
        p.fill_(1.0)
    elif leaf == "A_log":
        p.copy_(torch.log(torch.arange(1, p.numel() + 1, dtype=torch.float32)).view(p.shape))
    elif leaf == "D":
        p.fill_(1.0)
    elif leaf == "dt_bias":
        dt = torch.exp(torch.rand(p.numel(), generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        p.copy_((dt + torch.log(-torch.expm1(-dt))).view(p.shape))
    elif leaf == "bias":
        p.zero_()
    elif p.numel() <= _TILE:
        p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))
    else:
        flat = p.view(-1)
        off = int(torch.randint(0, _TILE, (1,), generator=g))
        done = 0
        while done < flat.numel():
            n = min(_TILE - off, flat.numel() - done)
            flat[done : done + n].copy_(tile[off : off + n])
            done += n
            off = 0


@torch.no_grad()
def init_random(model: GraniteModel, seed: int = 0, std: float = 0.02) -> None:
    """Initialise in place by the reference scheme (see fill_random), one generator for the model."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    tile = (torch.randn(_TILE, generator=g) * std).to(device=model.device, dtype=model.dtype)
    for name, p in model.named_parameters():
        fill_random(name, p, g, tile, std)


def _checkpoint_folder(spec) -> Path:
    p = Path(str(spec))
    if p.is_dir():
        return p
    if p.is_file() and p.name.endswith(".json"):
        return p.parent
    raise InputError(f"{spec}: weights='checkpoint' needs a checkpoint folder (config.json + safetensors); "
                     "for a profile use weights='random'")


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Map tensor name → safetensors file, from model.safetensors.index.json or the lone file."""
    idx = folder / "model.safetensors.index.json"
    if idx.is_file():
        d = read_json_config(idx)
        wm = d.get("weight_map") if isinstance(d, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise InputError(f"{idx}: not a valid safetensors index (weight_map must be an object of shard file names)")
        out = {}
        for fname in sorted(set(wm.values())):
            # an index names files in its own folder; a path could make a conversion read anything
            if fname in ("", ".", "..") or "/" in fname or "\\" in fname or not fname.endswith(".safetensors"):
                raise InputError(f"{idx}: shard name {fname[:80]!r} is not a .safetensors file name in the "
                                 "checkpoint folder; fix the index")
            if not (folder / fname).is_file():
                raise InputError(f"{idx}: shard {fname} is named in the index but missing from {folder}")
            have = set(SafetensorsFile(folder / fname).keys())
            lacking = sorted(n for n, f in wm.items() if f == fname and n not in have)
            if lacking:
                raise InputError(f"{idx}: maps {len(lacking)} tensor(s) to {fname}, which lacks them, e.g. "
                                 f"{lacking[0]}; fix the index or re-download the shard")
        for name, fname in wm.items():
            out[name] = folder / fname
        return out
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder}: no .safetensors files and no model.safetensors.index.json")
    out = {}
    for f in files:
        for name in SafetensorsFile(f).keys():
            out[name] = f
    return out


@torch.no_grad()
def load_weights(model: GraniteModel, folder: Path) -> None:
    """Fill the model's parameters from the checkpoint in `folder`, checking every name and shape."""
    cfg = model.cfg
    raw = read_json_config(folder / "config.json") if (folder / "config.json").is_file() else {}
    if raw.get("quantization_config"):  # compressed-tensors FP8/INT8: dequantised by the converter's reader
        from granite_cli.checkpoint.sources import HFSource

        src = HFSource(folder)
        params = dict(model.named_parameters())
        for e in checkpoint_entries(cfg):
            (params[e.param][e.index] if e.index else params[e.param]).copy_(src.get(e.ckpt))
        return
    where = checkpoint_files(folder)
    entries = checkpoint_entries(cfg)
    params = dict(model.named_parameters())
    expected = {e.ckpt for e in entries}
    missing = [e.ckpt for e in entries if e.ckpt not in where]
    extra = [k for k in where if k not in expected and not k.endswith(IGNORED_CKPT_SUFFIXES)
             and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing:
        raise InputError(f"{folder}: checkpoint is missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
    if extra:
        raise InputError(f"{folder}: checkpoint has {len(extra)} unexpected tensor(s), e.g. {', '.join(extra[:3])}")
    files: dict[Path, SafetensorsFile] = {}
    bad = []
    for e in entries:
        f = files.setdefault(where[e.ckpt], SafetensorsFile(where[e.ckpt]))
        dst = params[e.param][e.index] if e.index else params[e.param]
        if tuple(f.shape(e.ckpt)) != tuple(dst.shape):
            bad.append(f"{e.ckpt} {list(f.shape(e.ckpt))} (expected {list(dst.shape)})")
            continue
        dst.copy_(f.tensor(e.ckpt))
    if bad:
        raise InputError(f"{folder}: {len(bad)} tensor(s) have the wrong shape for config.json, e.g. "
                         f"{'; '.join(bad[:3])}")


def load_model(
    model: str | Path | ModelConfig,
    weights: str = "random",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    std: float = 0.02,
) -> GraniteModel:
    """A ready-to-run model.

    model: a profile name, a config.json path, a checkpoint folder, or a ModelConfig.
    weights: "random" (real shapes, random values; no files needed) or "checkpoint".
    dtype: fp32 / bf16 / fp16 (default: the config's torch_dtype). device: any torch device, or "meta".
    """
    cfg = load_config(model)
    dt = parse_dtype(dtype, cfg.torch_dtype)
    if weights not in ("random", "checkpoint"):
        raise InputError(f"weights must be 'random' or 'checkpoint', got {weights!r}")
    m = build_empty(cfg, dt, device)
    if torch.device(device).type == "meta":
        return m
    if weights == "random":
        init_random(m, seed, std)
    else:
        load_weights(m, _checkpoint_folder(model))
    return m


@torch.no_grad()
def save_checkpoint(model: GraniteModel, folder: str | Path, shard_bytes: int | None = None) -> Path:
    """Write config.json + safetensors (sharded with an index when shard_bytes is given) in the
    Hugging Face layout of the model's architecture."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    dtname = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[model.dtype]
    export_hf_config(cfg.replace(torch_dtype=dtname), folder)
    params = dict(model.named_parameters())
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for e in checkpoint_entries(cfg):
        t = params[e.param][e.index] if e.index else params[e.param]
        nb = t.numel() * t.element_size()
        if shard_bytes and shards[-1] and size + nb > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][e.ckpt] = t
        size += nb
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", shards[0], meta)
    else:
        n = len(shards)
        wm = {}
        for i, s in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            write_safetensors(folder / fname, s, meta)
            wm.update({k: fname for k in s})
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2) + "\n"
        )
    return folder
