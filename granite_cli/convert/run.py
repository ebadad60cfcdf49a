"""Plan, write and verify a conversion, one tensor at a time.

plan():    what will be written (names, shapes, storage types, bytes), the memory and disk it needs;
           refuses up front (exit 2) when DST exists without force or the disk is too small
           (check_disk=False, for a dry run, reports the shortfall in the summary instead).
execute(): streams every tensor from the source to a temporary name beside DST, verifies the
           result, and only then renames it into place; any failure or interruption leaves no DST.
verify():  inventory (via re-opening the output, which checks every tensor the config implies),
           metadata (the output's config equals the source's), numbers (each tensor against the
           source: exact, or within the quantization's bound), and logits (our core, layer by layer,
           on the source and on the output: max difference reported).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from granite_cli.checkpoint import gguf as G
from granite_cli.checkpoint import gguf_map as mapping
from granite_cli.checkpoint import quant
from granite_cli.checkpoint.sources import (
    TOKENIZER_FILES,
    TORCH_DTYPE_NAMES,
    GGUFSource,
    HFSource,
    ProfileSource,
    Source,
)
from granite_cli.convert.tokenizer import vocab_kvs
from granite_cli.errors import CheckFailed, InputError
from granite_cli.fsutil import check_destination, partial_dir, replace_checkpoint, temp_file_beside
from granite_cli.model.loading import check_seed, parse_dtype
from granite_cli.render import parse_bytes

STORE_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_GG = {"f32": G.GGML_F32, "f16": G.GGML_F16, "bf16": G.GGML_BF16, "q8_0": G.GGML_Q8_0}
_STORE_OF = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


@dataclass
class Out:
    name: str                 # output tensor name
    src: str                  # canonical source tensor
    shape: tuple[int, ...]    # PyTorch order
    store: str                # f32 f16 bf16 q8_0 | fp8 | int8 | scale | shape
    part: mapping.Part | None = None

    @property
    def nbytes(self) -> int:
        n = math.prod(self.shape)
        return {"q8_0": n // 32 * 34, "fp8": n, "int8": 4 * n, "scale": 4 * n, "shape": 8 * n}.get(
            self.store, n * (STORE_DTYPES[self.store].itemsize if self.store in STORE_DTYPES else 0))


@dataclass
class Plan:
    source: Source
    dst: Path
    fmt: str                       # hf | gguf
    outs: list[Out]
    hf_dtype: dict[str, torch.dtype]  # dtype of each canonical tensor as the output represents it
    method: dict[str, str]         # canonical name → exact | fp8 | int8 | q8_0
    shards: list[list[Out]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    quant: str | None = None
    bytes_out: int = 0

    @property
    def by_src(self) -> dict[str, list[Out]]:
        if not hasattr(self, "_by_src"):
            self._by_src: dict[str, list[Out]] = {}
            for o in self.outs:
                self._by_src.setdefault(o.src, []).append(o)
        return self._by_src

    @property
    def memory_needed(self) -> int:
        """Peak working set of the write: the largest (source tensor + its outputs) plus piece temporaries."""
        per = {}
        for o in self.outs:
            per[o.src] = per.get(o.src, 0) + o.nbytes
        src = {n: math.prod(self.source.shape(n)) * self.source.dtype(n).itemsize for n in self.source.names}
        return max(src[n] + per.get(n, 0) for n in self.source.names) + 64 * 2**20

    def tensor_plan(self) -> list[dict]:
        """One row per output tensor: name, source tensor, shape, storage type, bytes."""
        return [{"name": o.name, "source": o.src, "shape": list(o.shape), "storage": o.store, "bytes": o.nbytes}
                for o in self.outs]

    def summary(self) -> dict:
        by_store: dict[str, int] = {}
        for o in self.outs:
            by_store[o.store] = by_store.get(o.store, 0) + 1
        free = shutil.disk_usage(_existing_parent(self.dst)).free
        return {
            "source": str(self.source.path), "source_format": self.source.kind, "destination": str(self.dst),
            "format": "gguf" if self.fmt == "gguf" else "safetensors", "model": self.source.cfg.name,
            "architecture": mapping.gguf_arch(self.source.cfg) if self.fmt == "gguf" else self.source.cfg.architecture,
            "tensors_in": len(self.source.names), "tensors_out": len(self.outs), "storage": by_store,
            "quant": self.quant, "shards": max(1, len(self.shards)),
            "bytes_in": self.source.nbytes, "bytes_out": self.bytes_out,
            "memory_needed_bytes": self.memory_needed,
            "disk_needed_bytes": self.bytes_out, "disk_free_bytes": free, "disk_enough": free >= self.bytes_out,
            "notes": self.notes,
        }


def _existing_parent(p: Path) -> Path:
    p = p.resolve().parent
    while not p.exists():
        p = p.parent
    return p


def plan(source: Source, dst: str | Path, *, dtype: str | None = None, quant_method: str | None = None,
         keep: tuple[str, ...] = (), shard_size: str = "5GB", force: bool = False,
         check_disk: bool = True) -> Plan:
    dst = Path(os.path.abspath(dst))  # "." and ".." get a name, and a parent to write the temporary beside
    fmt = "gguf" if dst.suffix == ".gguf" else "hf"
    check_destination(dst, None if source.kind == "profile" else Path(source.path), fmt, force)
    qm = _quant_method(quant_method, fmt)
    want = parse_dtype(dtype) if dtype else None
    hf_dtype = {n: want or source.dtype(n) for n in source.names}
    method = {n: "exact" for n in source.names}
    notes: list[str] = []
    if fmt == "gguf":
        outs = _gguf_outs(source, hf_dtype, method, qm, keep, notes)
    else:
        outs = _hf_outs(source, hf_dtype, method, qm, keep)
    p = Plan(source, dst, fmt, outs, hf_dtype, method, notes=notes, quant=qm)
    if fmt == "hf":
        p.shards = _shards(outs, int(parse_bytes(shard_size)))
        p.bytes_out = sum(o.nbytes for o in outs) + 4096 * len(p.shards) + 64 * len(outs)
    else:
        p.bytes_out = sum(o.nbytes + 32 for o in outs) + 64 * len(outs) + 2**16
        if source.tokenizer_dir is not None:
            p.bytes_out += (source.tokenizer_dir / "tokenizer.json").stat().st_size
    if check_disk and (short := disk_shortfall(p)):
        raise InputError(short)
    return p


def _quant_method(quant_method: str | None, fmt: str) -> str | None:
    qm = (quant_method or "").lower() or None
    if qm not in (None, "fp8", "int8", "q8_0"):
        raise InputError(f"unknown --quant {quant_method!r}; use fp8, int8 (safetensors) or q8_0 (GGUF)")
    if qm == "q8_0" and fmt != "gguf":
        raise InputError("--quant q8_0 is a GGUF format; give DST a .gguf name, or use --quant fp8/int8 for "
                         "safetensors")
    if qm in ("fp8", "int8") and fmt == "gguf":
        raise InputError(f"--quant {qm} writes compressed-tensors safetensors; for GGUF use --quant q8_0")
    return qm


def _gguf_outs(source: Source, hf_dtype: dict, method: dict, qm: str | None, keep: tuple[str, ...],
               notes: list[str]) -> list[Out]:
    """The GGUF tensors, each canonical tensor's parts in llama.cpp's layout; Q8_0 where asked and possible."""
    outs = []
    for t in mapping.tensor_map(source.cfg):
        hi = _STORE_OF[hf_dtype[t.hf]]
        q = qm == "q8_0" and t.quantizable and quant.quantizable(t.hf, source.shape(t.hf), keep)
        for p in t.parts:
            shape = tuple(mapping.to_gguf(p, torch.empty(source.shape(t.hf), device="meta")).shape)
            if p.keep_f32:
                store = "f32"
            elif q and shape[-1] % 32 == 0:
                store = "q8_0"
                method[t.hf] = "q8_0"
            else:
                store = hi
                if q:
                    notes.append(f"{p.gguf}: width {shape[-1]} is not a multiple of 32, kept {hi}")
            outs.append(Out(p.gguf, t.hf, shape, store, p))
    return outs


def _hf_outs(source: Source, hf_dtype: dict, method: dict, qm: str | None, keep: tuple[str, ...]) -> list[Out]:
    """The safetensors tensors: each canonical tensor as is, or its compressed-tensors fp8/int8 parts."""
    outs = []
    for n in source.names:
        shape = source.shape(n)
        if not (qm and quant.quantizable(n, shape, keep)):
            outs.append(Out(n, n, shape, _STORE_OF[hf_dtype[n]]))
            continue
        method[n] = qm
        base = n[: -len(".weight")]
        if qm == "fp8":
            outs += [Out(n, n, shape, "fp8"), Out(base + ".weight_scale", n, (*shape[:-1], 1), "scale")]
            continue
        if shape[-1] % 4:
            raise InputError(f"{n}: input width {shape[-1]} is not a multiple of 4, which int8 packing "
                             f"needs; add --keep-high-precision '{n}' or use --quant fp8")
        outs += [Out(base + ".weight_packed", n, (*shape[:-1], shape[-1] // 4), "int8"),
                 Out(base + ".weight_shape", n, (len(shape),), "shape"),
                 Out(base + ".weight_scale", n, (*shape[:-1], 1), "scale")]
    return outs


def _shards(outs: list[Out], limit: int) -> list[list[Out]]:
    """Consecutive shards of at most `limit` bytes; a canonical tensor's parts never straddle two."""
    shards: list[list[Out]] = [[]]
    size = 0
    for o in outs:
        if shards[-1] and size + o.nbytes > limit and o.src != shards[-1][-1].src:
            shards.append([])
            size = 0
        shards[-1].append(o)
        size += o.nbytes
    return shards


def disk_shortfall(p: Plan) -> str | None:
    """The one-line reason the output will not fit on DST's disk, or None when it fits."""
    where = _existing_parent(p.dst)
    free = shutil.disk_usage(where).free
    if p.bytes_out <= free:
        return None
    return (f"too little disk at {where}: the output needs {_gb(p.bytes_out)}, {_gb(free)} is free; "
            f"free some space or choose another DST")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


# ------------------------------------------------------------------------------------------ write

def _products(p: Plan, src_name: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every output tensor made from canonical tensor `src_name` (value `x`)."""
    if p.fmt == "gguf":
        res = {}
        for o in p.by_src[src_name]:
            y = mapping.to_gguf(o.part, x)
            res[o.name] = G.quantize_q8_0_pieces(y) if o.store == "q8_0" else y.to(STORE_DTYPES[o.store])
        return res
    m = p.method[src_name]
    if m == "exact":
        return {src_name: x.to(p.hf_dtype[src_name])}
    base = src_name[: -len(".weight")]
    if m == "fp8":
        q, s = quant.quantize_fp8(x)
        return {src_name: q, base + ".weight_scale": s}
    packed, shape, s = quant.quantize_int8(x)
    return {base + ".weight_packed": packed, base + ".weight_shape": shape, base + ".weight_scale": s}


_ST_STORE = {"f32": "F32", "f16": "F16", "bf16": "BF16", "fp8": "F8_E4M3", "int8": "I32", "scale": "F32",
             "shape": "I64"}


def _stream(p: Plan, progress: Callable[[int, int, str], None] | None):
    """Yield (out, tensor) in output order, each canonical tensor read once."""
    total = sum(math.prod(p.source.shape(n)) for n in p.source.names)
    done = 0
    cur, made = None, {}
    for o in p.outs:
        if o.src != cur:
            if cur is not None:
                done += math.prod(p.source.shape(cur))
                if progress:
                    progress(done, total, cur)
            cur = o.src
            made = _products(p, cur, p.source.get(cur))
        yield o, made.pop(o.name)
    if progress and cur is not None:
        progress(total, total, cur)


def _write_shard(path: Path, outs: list[Out], items, metadata: dict[str, str]) -> None:
    header: dict = {"__metadata__": metadata}
    off = 0
    for o in outs:
        header[o.name] = {"dtype": _ST_STORE[o.store], "shape": list(o.shape), "data_offsets": [off, off + o.nbytes]}
        off += o.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for o in outs:
            oo, t = next(items)
            assert oo is o
            raw = G.tensor_bytes(t)
            if raw.nbytes != o.nbytes:
                raise RuntimeError(f"{o.name}: produced {raw.nbytes} bytes, planned {o.nbytes}")
            f.write(raw)
        f.flush()
        os.fsync(f.fileno())


def _hf_config_out(p: Plan) -> dict:
    d = dict(p.source.hf_config) if p.source.kind == "safetensors" else p.source.cfg.to_hf_dict()
    d.pop("quantization_config", None)
    dts = {p.hf_dtype[n] for n in p.source.names}
    main = p.hf_dtype.get("model.embed_tokens.weight", next(iter(dts)))
    d["torch_dtype"] = TORCH_DTYPE_NAMES[main]
    if "dtype" in d:
        d["dtype"] = d["torch_dtype"]
    if p.quant in ("fp8", "int8"):
        kept = sorted({o.name[: -len(".weight")] for o in p.outs if o.store in STORE_DTYPES and len(o.shape) == 2
                       and o.name.endswith(".weight") and "norm" not in o.name and "embed_tokens" not in o.name})
        d["quantization_config"] = quant.compressed_tensors_config(p.quant, kept)
    return d


def _write_hf(p: Plan, tmp: Path, progress) -> None:
    items = _stream(p, progress)
    meta = {"format": "pt", "producer": "granite convert"}
    n = len(p.shards)
    wm = {}
    for i, outs in enumerate(p.shards, 1):
        fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        _write_shard(tmp / fname, outs, items, meta)
        wm.update({o.name: fname for o in outs})
    if n > 1:
        total = sum(o.nbytes for o in p.outs)
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(_hf_config_out(p), indent=2) + "\n")
    if p.source.kind == "safetensors":
        for f in TOKENIZER_FILES:
            s = Path(p.source.path) / f
            if s.is_file():
                shutil.copyfile(s, tmp / f)


def _gguf_kvs(p: Plan) -> list[G.KV]:
    cfg = p.source.cfg
    vk, notes = vocab_kvs(p.source.tokenizer_dir, cfg.vocab_size, p.source.hf_config)
    p.notes += notes
    stores = {o.store for o in p.outs if o.part and not o.part.keep_f32}
    ft = "q8_0" if "q8_0" in stores else _STORE_OF[p.hf_dtype["model.embed_tokens.weight"]]
    hf_cfg = _hf_config_out(p)
    hf_dtypes = {n: TORCH_DTYPE_NAMES[d] for n, d in p.hf_dtype.items()}
    a_logs = {}
    for i in cfg.mamba_layers:
        a = p.source.get(f"model.layers.{i}.mamba.A_log").to(p.hf_dtype[f"model.layers.{i}.mamba.A_log"])
        a_logs[i] = a.to(torch.float32).tolist()
    return mapping.metadata(cfg, ft, hf_cfg, hf_dtypes, a_logs, vk)


def _write_gguf(p: Plan, tmp: Path, progress) -> None:
    infos = [G.TensorInfo(o.name, o.shape, _GG[o.store]) for o in p.outs]
    w = G.GGUFWriter(tmp, _gguf_kvs(p), infos)
    try:
        for o, t in _stream(p, progress):
            w.write(o.name, t)
    except BaseException:
        w.abort()  # keep the original error (an interrupt stays an interrupt)
        raise
    w.close()


# ------------------------------------------------------------------------------------------ verify

def _open_output(p: Plan, path: Path) -> Source:
    return GGUFSource(path) if p.fmt == "gguf" else HFSource(path)


def verify(p: Plan, path: Path, logits: bool = True) -> dict:
    """Check the written output at `path` against the source; raise CheckFailed on any mismatch.

    One pass: each tensor is read once from the source and once from the output, compared, and (for
    the logits check) placed in a float32 copy of its decoder layer; the layer runs and is dropped."""
    out = _open_output(p, path)  # re-parses metadata/config and checks the full tensor inventory
    src = p.source
    res: dict = {"inventory": _inventory(out), "metadata": "ok"}
    for f in ("architecture", "vocab_size", "hidden_size", "num_hidden_layers", "layer_types", "num_attention_heads",
              "num_key_value_heads", "head_dim", "expert_width", "mlp_width", "num_local_experts",
              "num_experts_per_tok", "mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state",
              "mamba_d_conv", "position_embedding_type", "tie_word_embeddings", "embedding_multiplier",
              "attention_multiplier", "residual_multiplier", "logits_scaling", "rms_norm_eps", "rope_theta"):
        a, b = getattr(out.cfg, f), getattr(src.cfg, f)
        if a != b and not (isinstance(a, float) and math.isclose(a, b, rel_tol=1e-6)):
            raise CheckFailed(f"verify: output config {f} = {a!r}, source has {b!r}")
    stats = {"exact": 0, "quantized": 0, "worst_error_over_bound": 0.0}
    seen: set[str] = set()

    def check(n: str) -> list[torch.Tensor]:
        want = src.get(n)
        m = p.method[n]
        if n in seen:  # fetched again (the tied output head): already checked
            if m == "exact" and p.hf_dtype[n] == want.dtype:
                return [want, want]
            return [want, out.get(n) if m == "exact" else out.get(n, cast=False)]
        seen.add(n)
        if m == "exact":
            got = out.get(n)
            exp = want.to(p.hf_dtype[n])
            if got.dtype != exp.dtype or got.shape != exp.shape or not _bits_equal(got, exp):
                diff = (got.float() - exp.float()).abs().max().item() if got.shape == exp.shape else float("nan")
                raise CheckFailed(f"verify: {n} differs from the source after conversion (max |diff| {diff:.3g})")
            stats["exact"] += 1
            # equal values: hand the same tensor to both sides, so while every weight so far is
            # identical the two forwards are one (and the output copy is freed at once)
            return [want, want] if exp is want else [want, got]
        got = out.get(n, cast=False)  # dequantised, float32: what a loader computes with
        r = 0.0
        for g, w in zip(G.row_chunks(got, 1 << 18), G.row_chunks(want, 1 << 18)):
            w = w.to(torch.float32)
            r = max(r, ((g.to(torch.float32) - w).abs() / quant.error_bound(w, m)).max().item())
        if not r <= 1.0:
            raise CheckFailed(f"verify: {n} is off by {r:.2f}x the {m} rounding bound")
        stats["worst_error_over_bound"] = max(stats["worst_error_over_bound"], round(r, 4))
        stats["quantized"] += 1
        return [want, got]

    if logits:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, src.cfg.vocab_size, (1, PROMPT_LEN), generator=g)
        la, lb = streamed_logits(src.cfg, check, ids, 2)
        res["logits"] = {"prompt_tokens": PROMPT_LEN, "max_abs_diff": float((la - lb).abs().max()),
                         "logit_scale": float(la.abs().max()),
                         "argmax_agreement": float((la.argmax(-1) == lb.argmax(-1)).float().mean())}
    else:
        for n in src.names:
            check(n)
    res["tensors"] = stats
    return res


def _inventory(out: Source) -> dict:
    cfg = out.cfg
    inv = {}
    for kind in ("mamba", "attention"):
        layers = [i for i, t in enumerate(cfg.layer_types) if t == kind]
        if layers:
            per = {len([n for n in out.names if n.startswith(f"model.layers.{i}.")]) for i in layers}
            inv[kind] = {"layers": len(layers), "tensors_per_layer": sorted(per)}
    if cfg.num_local_experts:
        inv["experts_per_layer"] = cfg.num_local_experts
    inv["total_tensors"] = len(out.names)
    return inv


PROMPT_LEN = 12


@torch.no_grad()
def streamed_logits(cfg, fetch: Callable[[str], list[torch.Tensor]], ids: torch.Tensor,
                    n: int = 1) -> list[torch.Tensor]:
    """Our core's float32 logits for `ids` under n weight sets, one decoder layer at a time.

    fetch(name) returns that checkpoint tensor from each of the n sources (and may check them);
    each name is fetched exactly once, so verification reads every tensor once per source."""
    from granite_cli.checkpoint.names import checkpoint_entries
    from granite_cli.model.loading import build_empty
    from granite_cli.ops import basic

    models = [build_empty(cfg, torch.float32, "meta") for _ in range(n)]
    entries = checkpoint_entries(cfg)
    emb = fetch("model.embed_tokens.weight")
    hs = [e[ids].to(torch.float32) * cfg.embedding_multiplier for e in _dedup(emb)]
    hs = hs * n if len(hs) == 1 else hs
    del emb
    rope = None
    if cfg.uses_rope:
        inv = basic.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
        rope = basic.rope_cos_sin(inv, 0, ids.shape[1], torch.float32, torch.device("cpu"))
    # One materialised layer per (layer kind, source), reloaded for every layer of that kind: no fresh
    # allocation (and page faults) per layer, and the working set is one layer per source. While the
    # sources hand out the very same tensors (a lossless conversion) and the hidden states are one,
    # the layer runs once for all.
    built: dict[str, list] = {}
    for i, kind in enumerate(cfg.layer_types):
        pre = f"layers.{i}."
        got = [(e, fetch(e.ckpt)) for e in entries if e.param.startswith(pre)]
        one = all(h is hs[0] for h in hs) and all(len(_dedup(ts)) == 1 for _, ts in got)
        slots = built.setdefault(kind, [None] * n)
        for j in range(1 if one else n):
            if slots[j] is None:
                slots[j] = models[j].layers[i].to_empty(device="cpu")
        layers = slots[: 1 if one else n]
        params = [dict(layer.named_parameters()) for layer in layers]
        for e, ts in got:
            key = e.param[len(pre):]
            for ps, x in zip(params, ts):
                (ps[key][e.index] if e.index else ps[key]).copy_(x)
        del got
        hs = [layer(h, None, 0, rope) for layer, h in zip(layers, hs)]
        hs = hs * n if one else hs
    del built
    norms = fetch("model.norm.weight")
    # fetched again rather than held through the walk: the peak stays at one layer per source
    heads = fetch("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight")
    out = []
    if all(h is hs[0] for h in hs) and len(_dedup(heads)) == 1 and len(_dedup(norms)) == 1:
        models, hs, heads, norms = models[:1], hs[:1], heads[:1], norms[:1]
    for m, h, w, nw in zip(models, hs, heads, norms):
        m.norm.to_empty(device="cpu")
        m.norm.weight.copy_(nw)
        h = m.norm(h)
        lg = torch.cat([h @ w[j : j + 8192].to(torch.float32).T for j in range(0, w.shape[0], 8192)], dim=-1)
        out.append(lg / cfg.logits_scaling if cfg.logits_scaling != 1.0 else lg)
    return out * n if len(out) == 1 else out


_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaNs and signed zeros included, which torch.equal on floats is not)."""
    it = _INT[a.element_size()]
    return torch.equal(a.contiguous().view(it), b.contiguous().view(it))


def _dedup(ts: list) -> list:
    """The distinct tensor objects of ts, in order."""
    out: list = []
    for t in ts:
        if not any(t is u for u in out):
            out.append(t)
    return out


# ------------------------------------------------------------------------------------------ run

def execute(p: Plan, *, verify_output: bool = True, progress: Callable[[int, int, str], None] | None = None,
            status: Callable[[str], None] | None = None) -> dict:
    """Write, verify, rename. Returns the report (plan summary, timings, verification)."""
    t0 = time.perf_counter()
    dst = p.dst
    tmp = temp_file_beside(dst) if p.fmt == "gguf" else partial_dir(dst)
    try:
        if p.fmt == "gguf":
            _write_gguf(p, tmp, progress)
        else:
            _write_hf(p, tmp, progress)
        t_write = time.perf_counter() - t0
        ver = None
        if verify_output:
            if status:
                status("verifying: inventory, metadata, every tensor, logits ...")
            ver = verify(p, tmp)
        replace_checkpoint(tmp, dst, p.fmt)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    rep = p.summary()
    rep.update({"seconds_write": round(t_write, 3), "seconds_total": round(time.perf_counter() - t0, 3),
                "verification": ver if ver is not None else "skipped (--no-verify)"})
    return rep


def open_any(src: str | None, from_profile: str | None, dtype: str | None, seed: int = 0) -> Source:
    from granite_cli.checkpoint.sources import open_source

    if from_profile:
        if src:
            raise InputError("give either SRC or --from-profile, not both")
        return ProfileSource(from_profile, dtype, check_seed(seed))
    if not src:
        raise InputError("missing SRC: a checkpoint folder or .gguf file (or --from-profile NAME)")
    return open_source(src)


def convert(src: str | Path | None, dst: str | Path, *, from_profile: str | None = None, dtype: str | None = None,
            quant: str | None = None, keep: tuple[str, ...] = (), shard_size: str = "5GB", force: bool = False,
            verify: bool = True, seed: int = 0) -> dict:
    """The whole conversion in one call (what `granite convert` runs): open, plan, write, verify, rename."""
    source = open_any(str(src) if src is not None else None, from_profile, dtype, seed)
    p = plan(source, dst, dtype=dtype, quant_method=quant, keep=keep, shard_size=shard_size, force=force)
    return execute(p, verify_output=verify)
