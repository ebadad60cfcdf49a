"""Inference cache, allocated once: KV for attention layers only, conv + SSM state for Mamba layers.

Attention layer: k, v [batch, kv_heads, max_len, head_dim] in the KV dtype, written in place.
Mamba layer: conv [batch, conv_dim, d_conv - 1] (the previous inputs, in the model dtype) and
ssm [batch, heads, head_dim, d_state] (fp32 by default). All sequences of a batch share one position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from granite_cli.config import ModelConfig
from granite_cli.errors import InputError


@dataclass
class AttentionCache:
    k: torch.Tensor
    v: torch.Tensor


@dataclass
class MambaCache:
    conv: torch.Tensor
    ssm: torch.Tensor


class Cache:
    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype,
        state_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size <= 0 or max_len <= 0:
            raise InputError(f"cache needs a positive batch size and length, got {batch_size} x {max_len}")
        self.cfg = cfg
        self.batch_size = batch_size
        self.max_len = max_len
        self.pos = 0
        self.layers: list[AttentionCache | MambaCache] = []
        for t in cfg.layer_types:
            if t == "attention":
                shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
                self.layers.append(AttentionCache(torch.zeros(shape, dtype=dtype, device=device),
                                                  torch.zeros(shape, dtype=dtype, device=device)))
            else:
                self.layers.append(MambaCache(
                    torch.zeros(batch_size, cfg.conv_dim, cfg.mamba_d_conv - 1, dtype=dtype, device=device),
                    torch.zeros(batch_size, cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_d_state,
                                dtype=state_dtype, device=device),
                ))

    def reserve(self, n: int) -> None:
        if self.pos + n > self.max_len:
            raise InputError(
                f"cache holds {self.max_len} tokens; {self.pos} used, {n} more requested; allocate a longer cache"
            )

    def reset(self) -> None:
        self.pos = 0
        for layer in self.layers:
            if isinstance(layer, MambaCache):
                layer.conv.zero_()
                layer.ssm.zero_()

    def snapshot(self) -> dict:
        """A copy of the state at the current position (KV up to pos only)."""
        snap = []
        for layer in self.layers:
            if isinstance(layer, AttentionCache):
                snap.append((layer.k[:, :, : self.pos].clone(), layer.v[:, :, : self.pos].clone()))
            else:
                snap.append((layer.conv.clone(), layer.ssm.clone()))
        return {"pos": self.pos, "layers": snap}

    def restore(self, snap: dict) -> None:
        """Return to a snapshot in place (no reallocation)."""
        self.pos = snap["pos"]
        for layer, (a, b) in zip(self.layers, snap["layers"]):
            if isinstance(layer, AttentionCache):
                layer.k[:, :, : self.pos].copy_(a)
                layer.v[:, :, : self.pos].copy_(b)
            else:
                layer.conv.copy_(a)
                layer.ssm.copy_(b)

    def mark(self) -> dict:
        """A cheap return point at the current position: the Mamba states only (constant in context).
        KV needs no copy: a continuation writes only past pos, so rewinding is moving pos back."""
        return {"pos": self.pos, "mamba": [(x.conv.clone(), x.ssm.clone()) for x in self.layers
                                           if isinstance(x, MambaCache)]}

    def rewind(self, mark: dict) -> None:
        """Back to a mark() taken at an earlier position, with the KV before it untouched since."""
        self.pos = mark["pos"]
        for layer, (conv, ssm) in zip((x for x in self.layers if isinstance(x, MambaCache)), mark["mamba"]):
            layer.conv.copy_(conv)
            layer.ssm.copy_(ssm)

    def nbytes(self) -> dict[str, int]:
        """Allocated bytes by kind: attention KV, Mamba conv state, Mamba SSM state."""
        out = {"attention_kv": 0, "mamba_conv": 0, "mamba_ssm": 0}
        for layer in self.layers:
            if isinstance(layer, AttentionCache):
                out["attention_kv"] += layer.k.nbytes + layer.v.nbytes
            else:
                out["mamba_conv"] += layer.conv.nbytes
                out["mamba_ssm"] += layer.ssm.nbytes
        out["total"] = sum(out.values())
        return out
