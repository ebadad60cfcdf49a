"""Decode steps through the CPU decode kernel (granite_cli.ops.native): the default on a CPU.

`NativeDecoder(model, cache)` is `model(ids [b, 1], cache, logits="last")` for that cache: one call
into the kernel per step, reading the model's weights and writing the cache's KV and Mamba states
in place (the same tensors, so snapshot/restore/rewind keep working). The eager model stays the
reference; the kernel agrees with it to float rounding (tests/test_native_decode.py).

`unsupported(model, cache)` says why a model or cache cannot take this path (a GPU, a dtype other
than fp32 or bf16, an SSM state not in fp32, more than 64 sequences); the callers then run eager.
"""

from __future__ import annotations

import ctypes

import torch

from granite_cli.arch.base import Routing
from granite_cli.ops import native

# the kernel's array indices (decode_cpu.c's G_*, F_*, L_* enums, in order)
G_NAMES = ["d", "vocab", "nlayers", "wdt", "kvdt", "convdt", "embed", "lmhead", "norm", "din", "convdim", "nh",
           "hp", "ng", "ns", "kconv", "qh", "kvh", "hd", "maxlen", "e", "topk", "i", "shared", "routing", "rope"]
F_NAMES = ["eps", "rho", "emb", "logit", "scale", "dtlo", "dthi"]
L_NAMES = ["kind", "norm1", "norm2", "inproj", "convw", "convb", "dtbias", "a", "d", "gnorm", "outproj", "convst",
           "ssmst", "wq", "wk", "wv", "wo", "kc", "vc", "router", "ewin", "ewout", "swin", "swout", "bq", "bk", "bv",
           "bo", "qnorm", "knorm", "inb", "outb"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
ROUTING = {Routing.TOPK_SOFTMAX: 0, Routing.SOFTMAX_TOPK: 1, Routing.SOFTMAX_TOPK_NORM: 2}
MAX_BATCH = 64


def unsupported(model, cache=None) -> str | None:
    """None when the kernel computes this model's (and cache's) decode step, else why not."""
    cfg = model.cfg
    if model.device.type != "cpu":
        return "the decode kernel is for CPU tensors"
    if model.dtype not in DTYPES:
        return f"the decode kernel reads fp32 or bf16 weights, not {model.dtype}"
    has_mamba = "mamba" in cfg.layer_types
    why = [w for c, w in ((has_mamba and cfg.mamba_d_conv < 2, "convolution shorter than 2 taps"),
                          ((cfg.num_experts_per_tok or 0) > 16, "more than 16 experts per token"),
                          (cfg.num_attention_heads > 64 * cfg.num_key_value_heads,
                           "more than 64 query heads per KV head")) if c]
    if why:
        return f"the decode kernel has no {why[0]} (this model has)"
    if cache is not None:
        if cache.batch_size > MAX_BATCH:
            return f"the decode kernel takes at most {MAX_BATCH} sequences"
        for layer in cache.layers:
            if hasattr(layer, "ssm") and layer.ssm.dtype != torch.float32:
                return "the decode kernel keeps the SSM state in fp32"
            if any(t.dtype != model.dtype for t in vars(layer).values()
                   if isinstance(t, torch.Tensor) and t is not getattr(layer, "ssm", None)):
                return "the decode kernel wants the cache in the weights' dtype"
    return None


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().contiguous()


class NativeDecoder:
    """One decode step per call through the kernel, bound to one model and one cache."""

    def __init__(self, model, cache) -> None:
        why = unsupported(model, cache)
        if why:
            raise ValueError(why)
        lib = native.load()
        if lib is None:
            raise RuntimeError(native.why())
        if [lib.granite_abi(i) for i in range(3)] != [len(G_NAMES), len(F_NAMES), len(L_NAMES)]:
            raise RuntimeError("the decode kernel's tables do not match granite_cli.model.native_decode's")
        self.lib, self.model, self.cache = lib, model, cache
        cfg, dt = model.cfg, model.dtype
        keep = []  # fp32 copies of the small parameters, alive as long as the decoder

        def ptr(t: torch.Tensor | None, f32: bool = False) -> int:
            if t is None:
                return 0
            t = _f32(t) if f32 else t.detach()
            if not t.is_contiguous():
                raise ValueError("the decode kernel reads contiguous weights and caches")
            keep.append(t)
            return t.data_ptr()

        attn = next((layer for layer in cache.layers if hasattr(layer, "k")), None)
        conv = next((layer.conv for layer in cache.layers if hasattr(layer, "conv")), None)
        head = model.embed.weight if model.lm_head is None else model.lm_head.weight
        moe0 = next((la.moe for la in model.layers if la.moe is not None), None)
        g = {"d": cfg.hidden_size, "vocab": cfg.vocab_size, "nlayers": cfg.num_hidden_layers, "wdt": DTYPES[dt],
             "kvdt": DTYPES[attn.k.dtype] if attn is not None else 0,
             "convdt": DTYPES[conv.dtype] if conv is not None else 0,
             "embed": ptr(model.embed.weight), "lmhead": ptr(head), "norm": ptr(model.norm.weight, True),
             "maxlen": cache.max_len, "e": cfg.num_local_experts or 0, "topk": cfg.num_experts_per_tok or 0,
             "i": cfg.expert_width if cfg.num_local_experts else 0, "shared": cfg.mlp_width or 0,
             "routing": ROUTING[moe0.routing] if moe0 is not None else 0,
             "rope": ptr(model.rope_inv_freq, True) if model.rope_inv_freq is not None else 0}
        if "mamba" in cfg.layer_types:
            g.update(din=cfg.d_inner, convdim=cfg.conv_dim, nh=cfg.mamba_n_heads, hp=cfg.mamba_d_head,
                     ng=cfg.mamba_n_groups, ns=cfg.mamba_d_state, kconv=cfg.mamba_d_conv)
        if "attention" in cfg.layer_types:
            g.update(qh=cfg.num_attention_heads, kvh=cfg.num_key_value_heads, hd=cfg.head_dim)
        lo, hi = cfg.time_step_limit
        f = {"eps": cfg.rms_norm_eps, "rho": cfg.residual_multiplier, "emb": cfg.embedding_multiplier,
             "logit": cfg.logits_scaling, "scale": cfg.softmax_scale if attn is not None else 1.0,
             "dtlo": lo, "dthi": hi}
        rows = []
        for layer, lc in zip(model.layers, cache.layers):
            s = dict.fromkeys(L_NAMES, 0)
            s.update(norm1=ptr(layer.norm1.weight, True), norm2=ptr(layer.norm2.weight, True))
            mx = layer.mixer
            if layer.kind == "mamba":
                s.update(kind=0, inproj=ptr(mx.in_proj.weight),
                         convw=ptr(mx.conv1d.weight.reshape(cfg.conv_dim, -1), True), convb=ptr(mx.conv1d.bias, True),
                         dtbias=ptr(mx.dt_bias, True),
                         a=ptr(-torch.exp(mx.A_log.detach().float())), d=ptr(mx.D, True),
                         gnorm=ptr(mx.norm.weight, True), outproj=ptr(mx.out_proj.weight), convst=ptr(lc.conv),
                         ssmst=ptr(lc.ssm), inb=ptr(mx.in_proj.bias, True), outb=ptr(mx.out_proj.bias, True))
            else:
                s.update(kind=1, wq=ptr(mx.q_proj.weight), wk=ptr(mx.k_proj.weight), wv=ptr(mx.v_proj.weight),
                         wo=ptr(mx.o_proj.weight), kc=ptr(lc.k), vc=ptr(lc.v), bq=ptr(mx.q_proj.bias, True),
                         bk=ptr(mx.k_proj.bias, True), bv=ptr(mx.v_proj.bias, True), bo=ptr(mx.o_proj.bias, True))
                if cfg.qk_norm:
                    s.update(qnorm=ptr(mx.q_norm.weight, True), knorm=ptr(mx.k_norm.weight, True))
            if layer.moe is not None:
                s.update(router=ptr(layer.moe.router.weight), ewin=ptr(layer.moe.w_in), ewout=ptr(layer.moe.w_out))
            if layer.mlp is not None:
                s.update(swin=ptr(layer.mlp.w_in.weight), swout=ptr(layer.mlp.w_out.weight))
            rows.extend(s[n] for n in L_NAMES)
        self._keep = keep
        self.G = torch.tensor([int(g.get(n, 0)) for n in G_NAMES], dtype=torch.int64)
        self.F = torch.tensor([float(f[n]) for n in F_NAMES], dtype=torch.float64)
        self.L = torch.tensor(rows, dtype=torch.int64)
        b = cache.batch_size
        n = lib.granite_step_work(ctypes.c_void_p(self.G.data_ptr()), b)
        self.work = torch.empty(n, dtype=torch.float32)
        self._args = (ctypes.c_void_p(self.G.data_ptr()), ctypes.c_void_p(self.F.data_ptr()),
                      ctypes.c_void_p(self.L.data_ptr()), b)
        self._work = ctypes.c_void_p(self.work.data_ptr())

    def __call__(self, ids: torch.Tensor, cache=None, logits: str = "last") -> torch.Tensor:
        """Logits [b, 1, vocab] (the model's dtype) of one new token per sequence, ids [b, 1]."""
        cache = self.cache if cache is None else cache
        if cache is not self.cache:
            raise ValueError("this decoder is bound to another cache")
        b = cache.batch_size
        if ids.shape != (b, 1):
            raise ValueError(f"the decode kernel takes ids of shape [{b}, 1], got {list(ids.shape)}")
        cache.reserve(1)
        ids = ids.to(torch.int64).contiguous()
        out = torch.empty(b, 1, self.model.cfg.vocab_size, dtype=torch.float32)
        rc = self.lib.granite_step(*self._args, ctypes.c_void_p(ids.data_ptr()), cache.pos, self._work,
                                   ctypes.c_void_p(out.data_ptr()))
        if rc == -2:
            raise IndexError(f"a token id is outside the vocabulary (0..{self.model.cfg.vocab_size - 1})")
        if rc != 0:
            raise RuntimeError("the decode kernel refused the step (batch or top-k beyond its tables)")
        cache.pos += 1
        return out if self.model.dtype == torch.float32 else out.to(self.model.dtype)
