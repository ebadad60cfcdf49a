"""Build a model from a profile, config.json or checkpoint folder: random weights at real shapes,
or a Hugging Face safetensors checkpoint (single file or sharded with an index), read lazily.

Construction happens on the meta device; parameters are then allocated once, directly on the
target device and in the target dtype, and filled in place (no CPU materialisation first).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from granite_cli import hub
from granite_cli.checkpoint.dtypes import hf_name, parse_dtype
from granite_cli.checkpoint.names import checkpoint_entries
from granite_cli.checkpoint.random_weights import TILE, fill_random
from granite_cli.checkpoint.safetensors import shard_name, write_index, write_safetensors
from granite_cli.checkpoint.sources import HFSource
from granite_cli.config import ModelConfig, export_hf_config, load_config
from granite_cli.errors import InputError
from granite_cli.model.model import GraniteModel


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


@torch.no_grad()
def init_random(model: GraniteModel, seed: int = 0, std: float = 0.02) -> None:
    """Initialise in place by the reference scheme (see fill_random), one generator for the model."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    tile = (torch.randn(TILE, generator=g) * std).to(device=model.device, dtype=model.dtype)
    for name, p in model.named_parameters():
        fill_random(name, p, g, tile, std)


def _checkpoint_folder(spec) -> Path:
    p = Path(str(spec))
    if p.is_dir():
        return p
    if p.is_file() and p.name.endswith(".json"):
        return p.parent
    if hub.parse_id(str(spec)):
        return hub.snapshot(str(spec), weights=True)
    raise InputError(f"{spec}: weights='checkpoint' needs a checkpoint folder (config.json + safetensors) or a "
                     "Hub id; for a profile use weights='random'")


@torch.no_grad()
def load_weights(model: GraniteModel, folder: Path) -> None:
    """Fill the model's parameters from the checkpoint in `folder`: one loop over the name table,
    every name and shape checked by the source first (plain or compressed-tensors safetensors)."""
    src = HFSource(folder)
    params = dict(model.named_parameters())
    for e in checkpoint_entries(model.cfg):
        (params[e.param][e.index] if e.index else params[e.param]).copy_(src.view(e.ckpt))


def load_model(
    model: str | Path | ModelConfig,
    weights: str = "random",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    std: float = 0.02,
) -> GraniteModel:
    """A ready-to-run model.

    model: a profile name, a config.json path, a checkpoint folder, a Hub id, or a ModelConfig.
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
    export_hf_config(cfg.replace(torch_dtype=hf_name(model.dtype)), folder)
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
    wm = {}
    for i, s in enumerate(shards, 1):
        write_safetensors(folder / shard_name(i, len(shards)), s, meta)
        wm.update({k: shard_name(i, len(shards)) for k in s})
    if len(shards) > 1:
        write_index(folder, wm, sum(t.numel() * t.element_size() for s in shards for t in s.values()))
    return folder
