"""Hugging Face checkpoint tensors ↔ llama.cpp GGUF tensors and metadata for Granite 4.0.

Which llama.cpp architecture runs a model is its family's (granite_cli.arch): Granite 4.0 hybrids
are `granitehybrid`, its all-attention members `granite`.

Each HF tensor maps to one or two GGUF tensors through an exactly invertible transform, except
A = −exp(A_log): its f32 value cannot always give back the f32 A_log, so the writer also stores
the exact A_log values in `granite.a_log.N` metadata (ignored by llama.cpp); the reader uses them
when they agree with the `ssm_a` tensor and falls back to log(−A) for other producers' files.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Callable

import torch

from granite_cli.arch import get_arch
from granite_cli.checkpoint import gguf as G
from granite_cli.config import MAX_LAYERS, ModelConfig, from_hf_dict
from granite_cli.errors import InputError

HF_CONFIG_KEY = "granite.hf_config"        # the source config.json, verbatim
HF_DTYPES_KEY = "granite.hf_dtypes"        # {hf tensor name: dtype} of the source
A_LOG_KEY = "granite.a_log.{}"             # exact A_log of Mamba layer N


class Kind(enum.Enum):
    """How one GGUF tensor is cut from its Hugging Face tensor (and put back)."""

    SAME = "same"      # as it is
    CONV = "conv"      # [C, 1, K] -> [C, K]
    A = "a"            # A_log -> A = -exp(A_log), a column
    COL = "col"        # a vector as a column
    GROUPS = "groups"  # a vector as [groups, width / groups]
    PERM = "perm"      # q/k rows: rotary halves interleaved, per head
    LO = "lo"          # the first `arg` rows of a fused gate/up (the gate); rebuilt with its HI sibling
    HI = "hi"          # the rows after the first `arg` (the up)


@dataclass(frozen=True)
class Part:
    gguf: str
    kind: Kind
    arg: int = 0         # heads (PERM), groups (GROUPS), or split width (LO, HI)
    keep_f32: bool = False


@dataclass(frozen=True)
class HFTensor:
    hf: str
    parts: tuple[Part, ...]
    quantizable: bool    # a projection/expert matrix (never embeddings, norms, router, SSM scalars)


def gguf_arch(cfg: ModelConfig) -> str:
    """llama.cpp's architecture for the model; refuses what llama.cpp's graphs cannot represent."""
    arch = get_arch(cfg.architecture).gguf_arch(cfg)
    if arch is None:
        raise InputError(
            f"GGUF conversion supports Granite 4.0 (granitemoehybrid) checkpoints; this one is {cfg.architecture!r}. "
            "Convert it between safetensors dtypes instead, or use llama.cpp's converter for it"
        )
    if cfg.attention_bias or cfg.mamba_proj_bias or cfg.qk_norm:
        raise InputError("GGUF conversion: attention/projection biases and qk-norm have no tensor in llama.cpp's "
                         "Granite graphs")
    return arch


def _gate_up(gate: str, up: str, width: int) -> tuple[Part, Part]:
    """A fused [.., 2·width, d] gate/up weight as llama.cpp's separate gate and up tensors."""
    return Part(gate, Kind.LO, width), Part(up, Kind.HI, width)


def tensor_map(cfg: ModelConfig) -> list[HFTensor]:
    """Every HF tensor of the checkpoint, in checkpoint order, with its GGUF parts."""
    gguf_arch(cfg)  # refuses what llama.cpp cannot represent
    out = [HFTensor("model.embed_tokens.weight", (Part("token_embd.weight", Kind.SAME),), False)]
    for i, kind in enumerate(cfg.layer_types):
        c, b = f"model.layers.{i}.", f"blk.{i}."
        out.append(HFTensor(c + "input_layernorm.weight", (Part(b + "attn_norm.weight", Kind.SAME, keep_f32=True),),
                            False))
        if kind == "mamba":
            m = c + "mamba."
            out += [
                HFTensor(m + "in_proj.weight", (Part(b + "ssm_in.weight", Kind.SAME),), True),
                HFTensor(m + "conv1d.weight", (Part(b + "ssm_conv1d.weight", Kind.CONV, keep_f32=True),), False),
            ]
            if cfg.mamba_conv_bias:
                out.append(HFTensor(m + "conv1d.bias", (Part(b + "ssm_conv1d.bias", Kind.SAME, keep_f32=True),), False))
            out += [
                HFTensor(m + "dt_bias", (Part(b + "ssm_dt.bias", Kind.SAME, keep_f32=True),), False),
                HFTensor(m + "A_log", (Part(b + "ssm_a", Kind.A, keep_f32=True),), False),
                HFTensor(m + "D", (Part(b + "ssm_d", Kind.COL, keep_f32=True),), False),
                HFTensor(m + "norm.weight", (Part(b + "ssm_norm.weight", Kind.GROUPS, cfg.mamba_n_groups, True),),
                         False),
                HFTensor(m + "out_proj.weight", (Part(b + "ssm_out.weight", Kind.SAME),), True),
            ]
        else:
            a = c + "self_attn."
            out += [
                HFTensor(a + "q_proj.weight", (Part(b + "attn_q.weight", Kind.PERM, cfg.num_attention_heads),), True),
                HFTensor(a + "k_proj.weight", (Part(b + "attn_k.weight", Kind.PERM, cfg.num_key_value_heads),), True),
                HFTensor(a + "v_proj.weight", (Part(b + "attn_v.weight", Kind.SAME),), True),
                HFTensor(a + "o_proj.weight", (Part(b + "attn_output.weight", Kind.SAME),), True),
            ]
        out.append(HFTensor(c + "post_attention_layernorm.weight",
                            (Part(b + "ffn_norm.weight", Kind.SAME, keep_f32=True),), False))
        if cfg.num_local_experts:
            w = cfg.expert_width
            s = c + "block_sparse_moe."
            out += [
                HFTensor(s + "router.layer.weight", (Part(b + "ffn_gate_inp.weight", Kind.SAME, keep_f32=True),),
                         False),
                HFTensor(s + "input_linear.weight", _gate_up(b + "ffn_gate_exps.weight", b + "ffn_up_exps.weight", w),
                         True),
                HFTensor(s + "output_linear.weight", (Part(b + "ffn_down_exps.weight", Kind.SAME),), True),
            ]
        if cfg.mlp_width:
            w = cfg.mlp_width
            x = "_shexp" if cfg.num_local_experts else ""
            out += [
                HFTensor(c + "shared_mlp.input_linear.weight",
                         _gate_up(b + f"ffn_gate{x}.weight", b + f"ffn_up{x}.weight", w), True),
                HFTensor(c + "shared_mlp.output_linear.weight", (Part(b + f"ffn_down{x}.weight", Kind.SAME),), True),
            ]
    out.append(HFTensor("model.norm.weight", (Part("output_norm.weight", Kind.SAME, keep_f32=True),), False))
    if not cfg.tie_word_embeddings:
        out.append(HFTensor("lm_head.weight", (Part("output.weight", Kind.SAME),), False))
    return out


def _perm(x: torch.Tensor, heads: int, inverse: bool) -> torch.Tensor:
    # HF stores each head's rotary halves [x0..x(d/2-1) | y0..]; ggml's "normal" rope wants pairs interleaved.
    rows = x.shape[0]
    if inverse:
        return x.reshape(heads, rows // heads // 2, 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)
    return x.reshape(heads, 2, rows // heads // 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)


def _a_to_gguf(x: torch.Tensor) -> torch.Tensor:
    return (-torch.exp(x.to(torch.float64))).to(torch.float32).reshape(-1, 1)


def _a_from_gguf(x: torch.Tensor, a_log_exact: torch.Tensor | None) -> torch.Tensor:
    a = x.reshape(-1)
    if a_log_exact is not None and torch.equal((-torch.exp(a_log_exact.double())).float(), a.float()):
        return a_log_exact
    return torch.log(-a.to(torch.float64)).to(torch.float32)


# Kind -> the GGUF tensor (PyTorch order) from the whole HF tensor
_TO_GGUF: dict[Kind, Callable[[Part, torch.Tensor], torch.Tensor]] = {
    Kind.SAME: lambda p, x: x,
    Kind.CONV: lambda p, x: x[:, 0, :],
    Kind.A: lambda p, x: _a_to_gguf(x),
    Kind.COL: lambda p, x: x.reshape(-1, 1),
    Kind.GROUPS: lambda p, x: x.reshape(p.arg, -1),
    Kind.PERM: lambda p, x: _perm(x, p.arg, inverse=False),
    Kind.LO: lambda p, x: x[..., : p.arg, :],
    Kind.HI: lambda p, x: x[..., p.arg :, :],
}
# Kind of an HF tensor's first part -> the HF tensor from all its parts (HI only follows a LO)
_FROM_GGUF: dict[Kind, Callable[[Part, list[torch.Tensor], torch.Tensor | None], torch.Tensor]] = {
    Kind.SAME: lambda p, xs, a: xs[0],
    Kind.CONV: lambda p, xs, a: xs[0].unsqueeze(1),
    Kind.A: lambda p, xs, a: _a_from_gguf(xs[0], a),
    Kind.COL: lambda p, xs, a: xs[0].reshape(-1),
    Kind.GROUPS: lambda p, xs, a: xs[0].reshape(-1),
    Kind.PERM: lambda p, xs, a: _perm(xs[0], p.arg, inverse=True),
    Kind.LO: lambda p, xs, a: torch.cat(xs, dim=-2),
}


def to_gguf(part: Part, x: torch.Tensor) -> torch.Tensor:
    """The GGUF tensor (PyTorch order) for `part`, from the whole HF tensor `x`."""
    return _TO_GGUF[part.kind](part, x)


def from_gguf(t: HFTensor, parts: list[torch.Tensor], a_log_exact: torch.Tensor | None = None) -> torch.Tensor:
    """The HF tensor rebuilt from its GGUF parts (float tensors in PyTorch order); `a_log_exact` the
    A_log values stored beside an A part, used when they give back exactly its A."""
    return _FROM_GGUF[t.parts[0].kind](t.parts[0], parts, a_log_exact)


# ---------------------------------------------------------------- metadata

FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}


def metadata(cfg: ModelConfig, file_type: str, hf_config: dict, hf_dtypes: dict[str, str],
             a_logs: dict[int, list[float]], vocab_kvs: list[G.KV]) -> list[G.KV]:
    """The GGUF key/value pairs llama.cpp reads for this config (as its convert_hf_to_gguf.py writes them), plus our
    side keys."""
    arch = gguf_arch(cfg)
    p = arch + "."
    kv = [
        G.KV("general.architecture", G.STR, arch),
        G.KV("general.type", G.STR, "model"),
        G.KV("general.name", G.STR, cfg.name or "granite"),
        G.KV("general.file_type", G.U32, FILE_TYPE[file_type]),
        G.KV("general.quantization_version", G.U32, 2),
        G.KV(p + "block_count", G.U32, cfg.num_hidden_layers),
        # llama.cpp's converter and IBM write 2**20 when RoPE is off (no trained length limit)
        G.KV(p + "context_length", G.U32, cfg.max_position_embeddings if cfg.uses_rope else 2**20),
        G.KV(p + "embedding_length", G.U32, cfg.hidden_size),
        G.KV(p + "feed_forward_length", G.U32, cfg.expert_width if cfg.num_local_experts else cfg.mlp_width),
        G.KV(p + "attention.head_count", G.U32, cfg.num_attention_heads),
    ]
    if arch == "granitehybrid":
        kv.append(G.KV(p + "attention.head_count_kv", G.ARR,
                       [cfg.num_key_value_heads if t == "attention" else 0 for t in cfg.layer_types], G.U32))
    else:
        kv.append(G.KV(p + "attention.head_count_kv", G.U32, cfg.num_key_value_heads))
    kv += [
        G.KV(p + "attention.key_length", G.U32, cfg.head_dim),
        G.KV(p + "attention.value_length", G.U32, cfg.head_dim),
        G.KV(p + "attention.layer_norm_rms_epsilon", G.F32, cfg.rms_norm_eps),
        G.KV(p + "rope.freq_base", G.F32, cfg.rope_theta),
        G.KV(p + "rope.dimension_count", G.U32, cfg.head_dim),
        G.KV(p + "rope.scaling.finetuned", G.BOOL, cfg.uses_rope),  # llama.cpp's Granite RoPE switch
        G.KV(p + "vocab_size", G.U32, cfg.vocab_size),
        G.KV(p + "attention.scale", G.F32, cfg.softmax_scale),
        G.KV(p + "embedding_scale", G.F32, cfg.embedding_multiplier),
        G.KV(p + "residual_scale", G.F32, cfg.residual_multiplier),
        G.KV(p + "logit_scale", G.F32, cfg.logits_scaling),
    ]
    if cfg.num_local_experts:
        kv += [G.KV(p + "expert_count", G.U32, cfg.num_local_experts),
               G.KV(p + "expert_used_count", G.U32, cfg.num_experts_per_tok),
               G.KV(p + "expert_shared_feed_forward_length", G.U32, cfg.mlp_width)]
    if arch == "granitehybrid":
        kv += [G.KV(p + "ssm.conv_kernel", G.U32, cfg.mamba_d_conv),
               G.KV(p + "ssm.state_size", G.U32, cfg.mamba_d_state),
               G.KV(p + "ssm.group_count", G.U32, cfg.mamba_n_groups),
               G.KV(p + "ssm.inner_size", G.U32, cfg.d_inner),
               G.KV(p + "ssm.time_step_rank", G.U32, cfg.mamba_n_heads)]
    kv += vocab_kvs
    kv.append(G.KV(HF_CONFIG_KEY, G.STR, json.dumps(hf_config)))  # in its own key order, for GGUF -> HF
    kv.append(G.KV(HF_DTYPES_KEY, G.STR, json.dumps(hf_dtypes, sort_keys=True)))
    kv += [G.KV(A_LOG_KEY.format(i), G.ARR, v, G.F32) for i, v in sorted(a_logs.items())]
    return kv


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Meta:
    """Typed reads of one architecture's GGUF metadata: a missing required key, a value of the wrong
    type or out of range is an InputError naming the key."""

    _MISSING = object()

    def __init__(self, kv: dict, prefix: str, source: str) -> None:
        self.kv, self.p, self.source = kv, prefix, source

    def get(self, key: str, default=_MISSING):
        if self.p + key in self.kv:
            return self.kv[self.p + key]
        if default is self._MISSING:
            raise InputError(f"{self.source}: GGUF metadata lacks {self.p + key}; the file is incomplete or not a "
                             "Granite model")
        return default

    def _bad(self, key: str, want: str, v) -> InputError:
        return InputError(f"{self.source}: GGUF metadata {self.p + key} must be {want}, got {v!r:.40}; the file is "
                          "corrupt or was edited: re-convert it")

    def integer(self, key: str, default=_MISSING, lo: int = 1) -> int:
        v = self.get(key, default)
        if not _is_int(v) or not lo <= v < 2**31:
            raise self._bad(key, f"an integer >= {lo}", v)
        return v

    def number(self, key: str, default=_MISSING) -> float:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self._bad(key, "a number", v)
        return float(v)

    def flag(self, key: str, default=_MISSING) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise self._bad(key, "true or false", v)
        return v


def config_from_gguf(kv: dict, tensors: dict[str, G.TensorInfo], source: str) -> tuple[ModelConfig, dict]:
    """The model config of a GGUF file, and the HF config.json dict to write for it.

    Our own files carry the source config.json; it is used when it agrees with the standard keys
    (a disagreement is an error). Other producers' files are described from the standard keys."""
    arch = kv.get("general.architecture")
    if arch not in ("granitehybrid", "granite"):
        raise InputError(f"{source}: GGUF architecture {arch!r} is not supported; granite reads granitehybrid and "
                         "granite")
    md = _Meta(kv, arch + ".", source)
    n_layers = md.integer("block_count")
    if n_layers > MAX_LAYERS:
        raise InputError(f"{source}: GGUF metadata {arch}.block_count {n_layers} is more layers than any model has "
                         f"(at most {MAX_LAYERS}); the file is corrupt")
    hkv = md.get("attention.head_count_kv")
    hkv = list(hkv) if isinstance(hkv, list) else [md.integer("attention.head_count_kv", lo=0)] * n_layers
    if len(hkv) != n_layers:
        raise InputError(f"{source}: attention.head_count_kv has {len(hkv)} entries for {n_layers} layers")
    if not all(_is_int(h) and h >= 0 for h in hkv):
        raise InputError(f"{source}: GGUF metadata {arch}.attention.head_count_kv must hold integers >= 0")
    layer_types = ["mamba" if h == 0 else "attention" for h in hkv]
    n_exp = md.integer("expert_count", 0, lo=0)
    n_ff = md.integer("feed_forward_length", lo=0)
    shexp = md.integer("expert_shared_feed_forward_length", 0, lo=0)
    emb = tensors.get("token_embd.weight")
    if emb is None or len(emb.shape) != 2:
        raise InputError(f"{source}: GGUF has no two-dimensional token_embd.weight tensor")
    hidden = md.integer("embedding_length")
    heads = md.integer("attention.head_count")
    d = {
        "architectures": ["GraniteMoeHybridForCausalLM"], "model_type": "granitemoehybrid",
        "vocab_size": emb.shape[0], "hidden_size": hidden, "num_hidden_layers": n_layers,
        "layer_types": layer_types, "num_attention_heads": heads,
        "num_key_value_heads": max(hkv) if max(hkv) else heads,
        "intermediate_size": n_ff, "shared_intermediate_size": shexp if n_exp else n_ff,
        "num_local_experts": n_exp, "num_experts_per_tok": md.integer("expert_used_count", 0, lo=0),
        "rms_norm_eps": md.number("attention.layer_norm_rms_epsilon"),
        "rope_theta": md.number("rope.freq_base", 10000.0),
        "position_embedding_type": "rope" if md.flag("rope.scaling.finetuned", True) else "nope",
        "attention_multiplier": md.number("attention.scale", 1.0),
        "embedding_multiplier": md.number("embedding_scale", 1.0),
        "residual_multiplier": md.number("residual_scale", 1.0),
        "logits_scaling": md.number("logit_scale", 1.0),
        "tie_word_embeddings": "output.weight" not in tensors,
        "max_position_embeddings": md.integer("context_length", 4096),
        "attention_bias": False,
    }
    if "mamba" in layer_types:
        inner = md.integer("ssm.inner_size")
        nh = md.integer("ssm.time_step_rank")
        d.update({
            "mamba_n_heads": nh, "mamba_d_head": inner // nh, "mamba_n_groups": md.integer("ssm.group_count"),
            "mamba_d_state": md.integer("ssm.state_size"), "mamba_d_conv": md.integer("ssm.conv_kernel"),
            "mamba_expand": inner // hidden,
            "mamba_conv_bias": any(n.endswith("ssm_conv1d.bias") for n in tensors), "mamba_proj_bias": False,
        })
    ft = _Meta(kv, "general.", source).integer("file_type", 0, lo=0)
    d["torch_dtype"] = {0: "float32", 1: "float16", 32: "bfloat16"}.get(ft, "bfloat16")
    derived = from_hf_dict(dict(d), name=str(kv.get("general.name", "")), source=source)
    if HF_CONFIG_KEY in kv:
        try:
            own = json.loads(kv[HF_CONFIG_KEY])
        except (TypeError, ValueError, RecursionError):
            own = None
        if not isinstance(own, dict):
            raise InputError(f"{source}: corrupt {HF_CONFIG_KEY} metadata (not a JSON object); re-convert the file")
        cfg = from_hf_dict(dict(own), name=derived.name, source=f"{source} ({HF_CONFIG_KEY})")
        checks = ("vocab_size", "hidden_size", "num_hidden_layers", "layer_types", "num_attention_heads",
                  "num_local_experts", "num_experts_per_tok", "mamba_n_heads", "mamba_d_state", "mamba_n_groups",
                  "expert_width", "mlp_width", "tie_word_embeddings", "position_embedding_type")
        bad = [c for c in checks if getattr(cfg, c) != getattr(derived, c)
               and not (c.startswith("mamba_") and not cfg.mamba_layers)]
        if bad:
            raise InputError(f"{source}: GGUF metadata disagrees with its embedded config.json on {', '.join(bad)}; "
                             "the file was edited after conversion")
        return cfg, own
    return derived, d
