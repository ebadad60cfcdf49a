"""The output formats of a conversion, one class each: which --quant methods it takes, what tensors
it writes for a source, how many bytes, how each output tensor is made from its canonical tensor, how
the output is written (streamed, one canonical tensor at a time, to a temporary name), and how it is
opened again for verification.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Callable

import torch

from granite_cli.checkpoint import gguf as G
from granite_cli.checkpoint import gguf_map as mapping
from granite_cli.checkpoint import quant
from granite_cli.checkpoint.dtypes import BY_TORCH, hf_name, short_name
from granite_cli.checkpoint.safetensors import SafetensorsWriter, TensorSpec, shard_name, write_index
from granite_cli.checkpoint.sources import TOKENIZER_FILES, GGUFSource, HFSource, Source
from granite_cli.config import to_hf_dict
from granite_cli.convert.layout import STORE, Out, Plan
from granite_cli.convert.tokenizer import (
    Vocab,
    check_gguf_vocab,
    read_vocab,
    synthetic_vocab,
    vocab_kvs,
    write_vocab,
)
from granite_cli.errors import InputError
from granite_cli.fsutil import dir_mode

Progress = Callable[[int, int, str], None] | None


class Format:
    name = ""
    kind = ""           # what fsutil calls the destination: "hf" (a folder) or "gguf" (a file)
    quants: tuple[str, ...] = ()
    sharded = False

    def quant_method(self, requested: str | None) -> str | None:
        qm = (requested or "").lower() or None
        if qm not in (None, "fp8", "int8", "q8_0"):
            raise InputError(f"unknown --quant {requested!r}; use fp8, int8 (safetensors) or q8_0 (GGUF)")
        if qm and qm not in self.quants:
            raise InputError(self.wrong_quant(qm))
        return qm

    def wrong_quant(self, qm: str) -> str:
        raise NotImplementedError

    def architecture(self, cfg) -> str:
        return cfg.architecture

    def outs(self, source: Source, hf_dtype: dict, method: dict, qm: str | None, keep: tuple[str, ...],
             notes: list[str]) -> list[Out]:
        raise NotImplementedError

    def vocab(self, source: Source, no_vocab: bool) -> Vocab | None:
        """The vocabulary the output is written with beyond the source's own tokenizer files."""
        return None

    def bytes_out(self, p: Plan) -> int:
        raise NotImplementedError

    def products(self, p: Plan, src_name: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output tensor made from canonical tensor `src_name` (value `x`)."""
        raise NotImplementedError

    def make_target(self, path: Path) -> None:
        """Ready `path` (inside the staging folder) for write(): a folder for a folder format."""

    def write(self, p: Plan, tmp: Path, progress: Progress) -> None:
        raise NotImplementedError

    def open_output(self, path: Path) -> Source:
        raise NotImplementedError


def stream(p: Plan, progress: Progress):
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
            made = p.fmt.products(p, cur, p.source.get(cur))
        yield o, made.pop(o.name)
    if progress and cur is not None:
        progress(total, total, cur)


def hf_config_out(p: Plan) -> dict:
    """The config.json of the output: the source's (a folder's config.json, the one a granite GGUF
    carries verbatim, else the profile's), with the output's dtype and, for fp8/int8, the
    compressed-tensors quantization_config."""
    d = dict(p.source.hf_config) if p.source.kind in ("safetensors", "gguf") else to_hf_dict(p.source.cfg)
    d.pop("quantization_config", None)
    dts = {p.hf_dtype[n] for n in p.source.names}
    d["torch_dtype"] = hf_name(p.hf_dtype.get("model.embed_tokens.weight", next(iter(dts))))
    if "dtype" in d:
        d["dtype"] = d["torch_dtype"]
    if p.vocab is not None and p.vocab.synthetic:  # the ids the synthetic tokenizer gives its special tokens
        for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
            if name in p.vocab.special:
                d[key] = p.vocab.special[name]
    if p.quant in ("fp8", "int8"):
        kept = sorted({o.name[: -len(".weight")] for o in p.outs if o.store in ("f32", "f16", "bf16")
                       and len(o.shape) == 2 and o.name.endswith(".weight") and "norm" not in o.name
                       and "embed_tokens" not in o.name})
        d["quantization_config"] = quant.compressed_tensors_config(p.quant, kept)
    return d


class SafetensorsFormat(Format):
    """A Hugging Face folder: config.json, safetensors shards (an index when more than one), the
    source's tokenizer files; fp8/int8 as compressed-tensors, per output channel."""

    name, kind, quants, sharded = "safetensors", "hf", ("fp8", "int8"), True

    def wrong_quant(self, qm: str) -> str:
        return "--quant q8_0 is a GGUF format; give DST a .gguf name, or use --quant fp8/int8 for safetensors"

    def vocab(self, source: Source, no_vocab: bool) -> Vocab | None:
        """Random weights get a synthetic tokenizer (so the folder converts to a servable GGUF); a folder's own
        tokenizer files are copied as they are."""
        return None if no_vocab or source.kind != "profile" else synthetic_vocab(source.cfg.vocab_size,
                                                                                  source.hf_config)

    def outs(self, source, hf_dtype, method, qm, keep, notes) -> list[Out]:
        """The safetensors tensors: each canonical tensor as is, or its compressed-tensors fp8/int8 parts."""
        outs = []
        for n in source.names:
            shape = source.shape(n)
            if not (qm and quant.quantizable(n, shape, keep)):
                outs.append(Out(n, n, shape, short_name(hf_dtype[n])))
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


    def bytes_out(self, p: Plan) -> int:
        return sum(o.nbytes for o in p.outs) + 4096 * len(p.shards) + 64 * len(p.outs) + (2**20 if p.vocab else 0)

    def products(self, p: Plan, src_name: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
        m = p.method[src_name]
        if m == "exact":
            return {src_name: x.to(p.hf_dtype[src_name])}
        base = src_name[: -len(".weight")]
        if m == "fp8":
            q, s = quant.quantize_fp8(x)
            return {src_name: q, base + ".weight_scale": s}
        packed, shape, s = quant.quantize_int8(x)
        return {base + ".weight_packed": packed, base + ".weight_shape": shape, base + ".weight_scale": s}

    def make_target(self, path: Path) -> None:
        path.mkdir(mode=dir_mode())

    def write(self, p: Plan, tmp: Path, progress: Progress) -> None:
        items = stream(p, progress)
        meta = {"format": "pt", "producer": "granite convert"}
        n = len(p.shards)
        wm = {}
        for i, outs in enumerate(p.shards, 1):
            w = SafetensorsWriter(tmp / shard_name(i, n), [TensorSpec(o.name, STORE[o.store], o.shape) for o in outs],
                                  meta)
            try:
                for o in outs:
                    oo, t = next(items)
                    w.write(oo.name, t)
            except BaseException:
                w.abort()
                raise
            w.close()
            wm.update({o.name: shard_name(i, n) for o in outs})
        if n > 1:
            write_index(tmp, wm, sum(o.nbytes for o in p.outs))
        (tmp / "config.json").write_text(json.dumps(hf_config_out(p), indent=2) + "\n", encoding="utf-8")
        if p.source.kind == "safetensors":
            for f in TOKENIZER_FILES:
                s = Path(p.source.path) / f
                if s.is_file():
                    shutil.copyfile(s, tmp / f)
        if p.vocab is not None:
            write_vocab(p.vocab, tmp)

    def open_output(self, path: Path) -> Source:
        return HFSource(path)


class GGUFFormat(Format):
    """A llama.cpp GGUF file: granitehybrid or granite, tensors in llama.cpp's layout, the source
    config.json and exact A_log values alongside; Q8_0 where asked and the width allows."""

    name = kind = "gguf"
    quants = ("q8_0",)

    def wrong_quant(self, qm: str) -> str:
        return f"--quant {qm} writes compressed-tensors safetensors; for GGUF use --quant q8_0"

    def vocab(self, source: Source, no_vocab: bool) -> Vocab | None:
        """The source's vocabulary (its tokenizer.json, or a GGUF's own metadata); without one, a synthetic
        byte-level vocabulary, since llama.cpp's servers abort on a model that declares none."""
        if source.tokenizer_dir is not None:
            return read_vocab(source.tokenizer_dir)
        if isinstance(source, GGUFSource) and (kvs := source.vocab_metadata()):
            check_gguf_vocab(kvs, source.cfg.vocab_size, str(source.path))
            return Vocab({}, None, str(source.path), gguf=kvs)
        return None if no_vocab else synthetic_vocab(source.cfg.vocab_size, source.hf_config)

    def architecture(self, cfg) -> str:
        return mapping.gguf_arch(cfg)

    def outs(self, source, hf_dtype, method, qm, keep, notes) -> list[Out]:
        """The GGUF tensors, each canonical tensor's parts in llama.cpp's layout; Q8_0 where asked and possible."""
        outs = []
        for t in mapping.tensor_map(source.cfg):
            hi = short_name(hf_dtype[t.hf])
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


    def bytes_out(self, p: Plan) -> int:
        n = sum(o.nbytes + 32 for o in p.outs) + 64 * len(p.outs) + 2**16
        if p.vocab is not None:
            n += (p.source.tokenizer_dir / "tokenizer.json").stat().st_size if p.source.tokenizer_dir else 2**20
        return n

    def products(self, p: Plan, src_name: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
        res = {}
        for o in p.by_src[src_name]:
            y = mapping.to_gguf(o.part, x)
            res[o.name] = G.quantize_q8_0_pieces(y) if o.store == "q8_0" else y.to(STORE[o.store])
        return res

    def write(self, p: Plan, tmp: Path, progress: Progress) -> None:
        ggml = {"q8_0": G.GGML_Q8_0, **{d.short: d.ggml for d in BY_TORCH.values() if d.ggml is not None}}
        w = G.GGUFWriter(tmp, self._kvs(p), [G.TensorInfo(o.name, o.shape, ggml[o.store]) for o in p.outs])
        try:
            for o, t in stream(p, progress):
                w.write(o.name, t)
        except BaseException:
            w.abort()  # keep the original error (an interrupt stays an interrupt)
            raise
        w.close()

    def _kvs(self, p: Plan) -> list[G.KV]:
        cfg = p.source.cfg
        vk, notes = vocab_kvs(p.vocab, cfg.vocab_size, p.source.hf_config)
        p.notes += notes
        stores = {o.store for o in p.outs if o.part and not o.part.keep_f32}
        ft = "q8_0" if "q8_0" in stores else short_name(p.hf_dtype["model.embed_tokens.weight"])
        hf_dtypes = {n: hf_name(d) for n, d in p.hf_dtype.items()}
        a_logs = {}
        for i in cfg.mamba_layers:
            a = p.source.get(f"model.layers.{i}.mamba.A_log").to(p.hf_dtype[f"model.layers.{i}.mamba.A_log"])
            a_logs[i] = a.to(torch.float32).tolist()
        return mapping.metadata(cfg, ft, hf_config_out(p), hf_dtypes, a_logs, vk)

    def open_output(self, path: Path) -> Source:
        return GGUFSource(path)


def format_for(dst: Path) -> Format:
    """The output format a destination's name asks for: a .gguf file (in any case: m.GGUF too), else a
    safetensors folder."""
    return GGUFFormat() if Path(dst).suffix.lower() == ".gguf" else SafetensorsFormat()
