"""One decoder model for every architecture: Granite 4.0 (hybrid and dense), Granite 3.x, Llama,
Qwen3 and Qwen3-MoE. The architectures differ only in the config (mixer per layer, RoPE or NoPE,
q/k norm, multipliers, MoE routing and shared expert) and in the checkpoint name map (names.py).

Shapes: b batch, t new tokens, d hidden, v vocab. `model(ids [b, t], cache=None) → logits [b, t, v]`
(or [b, 1, v] with logits="last"). With a cache the call continues from `cache.pos`: a prefill,
a chunk of a longer prefill, or a decode step of one or several tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from granite_cli.config import ModelConfig
from granite_cli.model.cache import AttentionCache, Cache, MambaCache
from granite_cli.ops import basic, dispatch, ssd
from granite_cli.ops.attention import attend


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return basic.rms_norm(x, self.weight, self.eps)


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer: in_proj → split z | xBC | dt → causal conv + SiLU → SSD → gated RMSNorm → out_proj."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.mamba_n_heads
        self.in_proj = nn.Linear(cfg.hidden_size, cfg.in_proj_dim, bias=cfg.mamba_proj_bias)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.mamba_d_conv, groups=cfg.conv_dim,
                                bias=cfg.mamba_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(h))
        self.A_log = nn.Parameter(torch.zeros(h))
        self.D = nn.Parameter(torch.ones(h))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(cfg.d_inner))
        self.out_proj = nn.Linear(cfg.d_inner, cfg.hidden_size, bias=cfg.mamba_proj_bias)

    def forward(self, u: torch.Tensor, state: MambaCache | None, fresh: bool) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = u.shape
        d_in, h, g = cfg.d_inner, cfg.mamba_n_heads, cfg.mamba_n_groups
        zxbcdt = basic.linear(u, self.in_proj.weight, self.in_proj.bias)  # [b, t, 2·d_in + 2·g·n + h]
        z, xbc, dt = zxbcdt.split([d_in, cfg.conv_dim, h], dim=-1)
        A = -torch.exp(self.A_log.float())  # [h]
        lo, hi = cfg.time_step_limit
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if lo > 0.0 or hi != float("inf"):
            dt = dt.clamp(lo, hi)

        K = dispatch.kernels(u.device)
        y = self._scan(K, xbc, dt, A, state, fresh)  # [b, t, d_in] fp32; the conv output is freed on return
        v = K.gated_rms_norm(y, z, self.norm.weight, cfg.rms_norm_eps, d_in // g)
        return basic.linear(v.to(u.dtype), self.out_proj.weight, self.out_proj.bias)

    def _scan(self, K, xbc: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, state: MambaCache | None,
              fresh: bool) -> torch.Tensor:
        """Conv + SSD (one decode step, or a block from the cache's state); updates the cache."""
        cfg = self.cfg
        b, t, _ = xbc.shape
        d_in, h, p, g, n = cfg.d_inner, cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_n_groups, cfg.mamba_d_state
        if state is not None and not fresh and t == 1:
            xbc1 = K.causal_conv1d_step(xbc[:, 0], self.conv1d.weight, self.conv1d.bias, state.conv)  # [b, conv]
            x, B, C = xbc1.split([d_in, g * n, g * n], dim=-1)
            y = K.ssd_step(state.ssm, x.view(b, h, p), dt[:, 0], A, B.view(b, g, n), C.view(b, g, n), self.D)
            return y.view(b, 1, d_in)
        conv_in = None if (state is None or fresh) else state.conv
        xbc, new_conv = K.causal_conv1d(xbc, self.conv1d.weight, self.conv1d.bias, conv_in)
        x, B, C = xbc.split([d_in, g * n, g * n], dim=-1)
        init = None if (state is None or fresh) else state.ssm
        y, final = K.ssd_chunked(
            x.reshape(b, t, h, p), dt, A, B.reshape(b, t, g, n), C.reshape(b, t, g, n),
            ssd.chunk_for(cfg.mamba_chunk_size, xbc.device), self.D, init, block_tokens=cfg.mamba_chunk_size
        )
        if state is not None:
            state.conv.copy_(new_conv)
            state.ssm.copy_(final)
        return y.view(b, t, d_in)


class Attention(nn.Module):
    """Grouped-query attention; NoPE or RoPE; optional per-head q/k RMSNorm (Qwen3)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(d, cfg.num_attention_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, d, bias=bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, u: torch.Tensor, kv: AttentionCache | None, pos: int, rope) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = u.shape
        hd = cfg.head_dim
        q = basic.linear(u, self.q_proj.weight, self.q_proj.bias).view(b, t, cfg.num_attention_heads, hd)
        k = basic.linear(u, self.k_proj.weight, self.k_proj.bias).view(b, t, cfg.num_key_value_heads, hd)
        v = basic.linear(u, self.v_proj.weight, self.v_proj.bias).view(b, t, cfg.num_key_value_heads, hd)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, t, hd]
        if rope is not None:
            cos, sin = rope
            q, k = basic.apply_rope(q, cos, sin), basic.apply_rope(k, cos, sin)
        if kv is not None:
            kv.k[:, :, pos : pos + t] = k
            kv.v[:, :, pos : pos + t] = v
            k, v = kv.k[:, :, : pos + t], kv.v[:, :, : pos + t]
        o = attend(q, k, v, cfg.softmax_scale)  # [b, heads, t, hd]
        return basic.linear(o.transpose(1, 2).reshape(b, t, -1), self.o_proj.weight, self.o_proj.bias)


class MLP(nn.Module):
    """SwiGLU MLP with fused gate|up rows: w_in [2·width, d] (gate first), w_out [d, width]."""

    def __init__(self, d: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.w_in = nn.Linear(d, 2 * width, bias=False)
        self.w_out = nn.Linear(width, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = basic.linear(x, self.w_in.weight)
        return basic.linear(F.silu(h[..., : self.width]).mul_(h[..., self.width :]), self.w_out.weight)


class MoE(nn.Module):
    """Routed experts: router [E, d]; w_in [E, 2I, d] (gate rows first); w_out [E, d, I]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e, d, i = cfg.num_local_experts, cfg.hidden_size, cfg.expert_width
        self.k = cfg.num_experts_per_tok
        self.routing = cfg.routing
        self.router = nn.Linear(d, e, bias=False)
        self.w_in = nn.Parameter(torch.empty(e, 2 * i, d))
        self.w_out = nn.Parameter(torch.empty(e, d, i))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, ids = basic.route(basic.linear(flat, self.router.weight), self.k, self.routing)
        return dispatch.kernels(x.device).moe_experts(flat, self.w_in, self.w_out, weights, ids).view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.rho = cfg.residual_multiplier
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mixer = Mamba2Mixer(cfg) if kind == "mamba" else Attention(cfg)
        self.moe = MoE(cfg) if cfg.num_local_experts else None
        self.mlp = MLP(cfg.hidden_size, cfg.mlp_width) if cfg.mlp_width else None

    def forward(self, h: torch.Tensor, layer_cache, pos: int, rope) -> torch.Tensor:
        u = self.norm1(h)
        if self.kind == "mamba":
            m = self.mixer(u, layer_cache, fresh=pos == 0)
        else:
            m = self.mixer(u, layer_cache, pos, rope)
        # m and f below are fresh outputs: scaled and summed in place, bit-identical to h + m·ρ
        h = m.mul_(self.rho).add_(h) if self.rho != 1.0 else m.add_(h)
        u = self.norm2(h)
        if self.moe is not None:
            f = self.moe(u)
            if self.mlp is not None:
                f = f.add_(self.mlp(u))
        else:
            f = self.mlp(u)
        return f.mul_(self.rho).add_(h) if self.rho != 1.0 else f.add_(h)


class _Embedding(nn.Embedding):
    """nn.Embedding without its default init. The model is only ever built on the meta device and
    then loaded or filled (loading.build_empty), so an init is wasted; and normal_ on a meta tensor
    runs through torch._refs, whose first call imports torch._dynamo: 2 s of every command's
    start-up on our CPU."""

    def reset_parameters(self) -> None:
        pass


class GraniteModel(nn.Module):
    """The causal LM. Parameters: embed, layers[i].{norm1, mixer, norm2, moe, mlp}, norm, lm_head (untied)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = _Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, t) for t in cfg.layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        rope = cfg.uses_rope
        self._inv_freq = basic.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict) if rope else None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def rope_inv_freq(self) -> torch.Tensor | None:
        """RoPE's inverse frequencies [head_dim/2] (fp32), or None for a NoPE model."""
        return self._inv_freq

    def allocate_cache(
        self, batch_size: int, max_len: int, dtype: torch.dtype | None = None, state_dtype: torch.dtype = torch.float32
    ) -> Cache:
        """Preallocate KV (attention layers only) and conv/SSM state (Mamba layers) for max_len tokens."""
        return Cache(self.cfg, batch_size, max_len, dtype or self.dtype, state_dtype, self.device)

    def hidden_states(self, ids: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        b, t = ids.shape
        pos = 0
        if cache is not None:
            if cache.batch_size != b:
                raise ValueError(f"cache batch size {cache.batch_size} does not match input batch {b}")
            cache.reserve(t)
            pos = cache.pos
        h = self.embed(ids)
        if self.cfg.embedding_multiplier != 1.0:
            h = h.mul_(self.cfg.embedding_multiplier)  # the lookup is a fresh tensor
        rope = None
        if self._inv_freq is not None:
            if self._inv_freq.device != h.device:  # moved once (a host copy inside a CUDA graph capture fails)
                self._inv_freq = self._inv_freq.to(h.device)
            rope = basic.rope_cos_sin(self._inv_freq, pos, t, h.dtype, h.device)
        for i, layer in enumerate(self.layers):
            h = layer(h, cache.layers[i] if cache is not None else None, pos, rope)
        if cache is not None:
            cache.pos = pos + t
        return self.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        w = self.embed.weight if self.lm_head is None else self.lm_head.weight
        out = basic.linear(h, w)
        return out / self.cfg.logits_scaling if self.cfg.logits_scaling != 1.0 else out

    def forward(self, ids: torch.Tensor, cache: Cache | None = None, logits: str = "all") -> torch.Tensor:
        h = self.hidden_states(ids, cache)
        if logits == "last":
            h = h[:, -1:]
        return self.logits(h)

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding with a preallocated cache; returns [b, max_new_tokens] new token ids."""
        cache = self.allocate_cache(ids.shape[0], ids.shape[1] + max_new_tokens)
        nxt = self(ids, cache, logits="last").argmax(-1)
        out = [nxt]
        for _ in range(max_new_tokens - 1):
            nxt = self(nxt, cache, logits="last").argmax(-1)
            out.append(nxt)
        return torch.cat(out, dim=1)
