"""Prefill time by layer type (Mamba mixers, attention, MoE/MLP, the rest): forward hooks around each
layer's parts, used in one run of a case only (on CUDA they synchronise, which a timed run must not)."""

from __future__ import annotations

import time

from granite_cli.measure import sync


class Attribution:
    """Forward hooks timing each layer type; synchronises on CUDA (used in one run of a case only)."""

    def __init__(self, model, device) -> None:
        self.device = device
        self.times = {"mamba": 0.0, "attention": 0.0, "moe_mlp": 0.0}
        self.started: dict[int, float] = {}
        self.handles = []
        for layer in model.layers:
            self._hook(layer.mixer, "mamba" if layer.kind == "mamba" else "attention")
            for sub in (layer.moe, layer.mlp):
                if sub is not None:
                    self._hook(sub, "moe_mlp")

    def _hook(self, mod, key) -> None:
        def pre(_m, _a):
            sync(self.device)
            self.started[id(_m)] = time.perf_counter()

        def post(_m, _a, _o):
            sync(self.device)
            self.times[key] += time.perf_counter() - self.started.pop(id(_m))

        self.handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]

    def close(self, total: float) -> dict:
        for h in self.handles:
            h.remove()
        out = dict(self.times)
        out["rest"] = max(0.0, total - sum(self.times.values()))
        return out
