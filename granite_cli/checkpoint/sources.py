"""Checkpoints as streams of tensors in the Hugging Face layout ("canonical" names and shapes).

Every source (an HF folder, a GGUF file, a profile with random weights) answers `names`, `shape`,
`dtype` and `get(name)`; `get` builds one tensor on demand from the mapped file, so a conversion
holds one tensor (and its output) at a time whatever the model size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from granite_cli import hub
from granite_cli.checkpoint import gguf as G
from granite_cli.checkpoint import gguf_map as mapping
from granite_cli.checkpoint import quant
from granite_cli.checkpoint.dtypes import BY_GGML, hf_name, parse_dtype
from granite_cli.checkpoint.names import IGNORED_CKPT_SUFFIXES, checkpoint_entries
from granite_cli.checkpoint.random_weights import TILE, fill_random
from granite_cli.checkpoint.safetensors import SafetensorsFile, checkpoint_files
from granite_cli.config import ModelConfig, load_config, read_json_config, to_hf_dict
from granite_cli.errors import InputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "tokenizer.model", "added_tokens.json")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint name → shape, from the name table."""
    return {e.ckpt: e.shape for e in checkpoint_entries(cfg)}


class Source:
    cfg: ModelConfig
    hf_config: dict
    kind: str
    path: Path
    names: list[str]
    tokenizer_dir: Path | None = None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def get(self, name: str, cast: bool = True) -> torch.Tensor:
        """The tensor in HF layout; cast=False keeps a dequantised tensor in float32."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def files(self) -> list[Path]:
        """The files the tensors are read from."""
        return []

    def storage(self) -> dict[str, int]:
        """How many stored tensors have each storage type (as the file names it)."""
        return {}

    def _check_inventory(self, have: list[str], where: str) -> None:
        """Every tensor the config implies is present with its shape; nothing unknown is present."""
        want = expected_shapes(self.cfg)
        hs = set(have)
        missing = [n for n in want if n not in hs]
        extra = [n for n in have if n not in want and not n.endswith(IGNORED_CKPT_SUFFIXES)
                 and not (n == "lm_head.weight" and self.cfg.tie_word_embeddings)]
        if missing:
            raise InputError(f"{where}: checkpoint is missing {len(missing)} tensor(s) the config needs, "
                             f"e.g. {', '.join(missing[:3])}")
        if extra:
            raise InputError(f"{where}: checkpoint has {len(extra)} unexpected tensor(s) the config does not "
                             f"explain, e.g. {', '.join(extra[:3])} (wrong config.json?)")
        bad = [f"{n} {list(self._shapes[n])} (expected {list(s)})"
               for n, s in want.items() if tuple(self._shapes[n]) != s]
        if bad:
            raise InputError(f"{where}: {len(bad)} tensor(s) have the wrong shape and do not match config.json, "
                             f"e.g. {'; '.join(bad[:2])}")
        self.names = list(want)


class HFSource(Source):
    kind = "safetensors"

    def __init__(self, folder: Path, name: str | None = None) -> None:
        self.path = Path(folder)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise InputError(f"{self.path}: no config.json; SRC must be a Hugging Face checkpoint folder or a .gguf "
                             "file")
        self.hf_config = read_json_config(cfg_path)
        self.cfg = load_config(self.path)
        if name:
            self.cfg = self.cfg.replace(name=name)
        self.quant = quant.compressed_layout(self.hf_config)
        self._where = checkpoint_files(self.path)
        self._files: dict[Path, SafetensorsFile] = {}
        base = parse_dtype(self.cfg.torch_dtype)
        self._shapes, self._dtypes, self._nbytes = {}, {}, 0
        have = []
        for n, f in self._where.items():
            sf = self._file(f)
            self._nbytes += math.prod(sf.shape(n)) * sf.dtype(n).itemsize
            if n.endswith(quant.QUANT_SUFFIXES):
                if n.endswith(".weight_packed"):
                    w = n[: -len("_packed")]
                    shp = tuple(int(x) for x in self._raw(w + "_shape").tolist())
                    self._shapes[w], self._dtypes[w] = shp, base
                    have.append(w)
                continue
            self._shapes[n] = sf.shape(n)
            self._dtypes[n] = base if sf.dtype(n) in (torch.float8_e4m3fn, torch.int8) else sf.dtype(n)
            have.append(n)
        self._have = set(self._where)
        self._check_inventory(have, str(self.path))
        if (self.path / "tokenizer.json").is_file():
            self.tokenizer_dir = self.path

    @property
    def files(self) -> list[Path]:
        return sorted(set(self._where.values()))

    def storage(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.files:
            sf = self._file(f)
            for n in sf.keys():
                k = str(sf.dtype(n)).replace("torch.", "")
                out[k] = out.get(k, 0) + 1
        return out

    def _file(self, f: Path) -> SafetensorsFile:
        if f not in self._files:
            self._files[f] = SafetensorsFile(f)
        return self._files[f]

    def _raw(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise InputError(f"{self.path}: {name} is missing")
        return self._file(self._where[name]).read(name)

    def get(self, name: str, cast: bool = True) -> torch.Tensor:
        if self.quant:
            w = quant.dequantize(self._raw, name, self._have)
            if w is not None:
                return w.to(self._dtypes[name]) if cast else w
        return self._raw(name)

    def view(self, name: str) -> torch.Tensor:
        """The tensor to copy from at once: a zero-copy view of the mapped file where it is stored as
        is (loading then reads each byte once), else as get() makes it."""
        quantized = self.quant and name[: -len(".weight")] + ".weight_scale" in self._have
        if quantized or name not in self._where:
            return self.get(name)
        return self._file(self._where[name]).tensor(name)


class GGUFSource(Source):
    kind = "gguf"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.f = G.GGUFFile(self.path)
        self.cfg, self.hf_config = mapping.config_from_gguf(self.f.kv, self.f.tensors, str(self.path))
        self.tmap = {t.hf: t for t in mapping.tensor_map(self.cfg)}
        want = {p.gguf for t in self.tmap.values() for p in t.parts}
        extra = [n for n in self.f.tensors if n not in want and not n.startswith("rope_freqs")]
        missing = [n for n in want if n not in self.f.tensors]
        if missing:
            raise InputError(f"{self.path}: GGUF is missing {len(missing)} tensor(s), e.g. "
                             f"{', '.join(sorted(missing)[:3])}")
        if extra:
            raise InputError(f"{self.path}: GGUF has {len(extra)} tensor(s) granite does not know, e.g. "
                             f"{', '.join(extra[:3])}")
        try:
            recorded = json.loads(self.f.kv.get(mapping.HF_DTYPES_KEY, "{}"))
        except (TypeError, ValueError, RecursionError):
            recorded = None
        if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
            raise InputError(f"{self.path}: corrupt {mapping.HF_DTYPES_KEY} metadata (not an object of dtype names); "
                             "re-convert the file")
        base = parse_dtype(self.cfg.torch_dtype)
        self._check_shapes()
        self._shapes, self._dtypes = {}, {}
        for name, t in self.tmap.items():
            parts = [self._part(p.gguf) for p in t.parts]
            a = t.parts[0].kind is mapping.Kind.A
            self._shapes[name] = (parts[0].shape[0],) if a else tuple(mapping.from_gguf(t, parts).shape)
            if name in recorded:
                self._dtypes[name] = parse_dtype(recorded[name])
            elif t.parts[0].keep_f32:
                self._dtypes[name] = base
            else:
                self._dtypes[name] = BY_GGML.get(self.f.tensors[t.parts[0].gguf].gtype, base)
        self._nbytes = sum(ti.nbytes for ti in self.f.tensors.values())
        self._check_inventory(list(self.tmap), str(self.path))

    def vocab_metadata(self) -> list[G.KV]:
        """The file's `tokenizer.*` metadata with its types, to carry into another GGUF; [] when it declares
        no vocabulary."""
        if self.f.kv.get("tokenizer.ggml.model", "none") == "none":
            return []
        return [G.KV(k, self.f.kv_types[k][0], v, self.f.kv_types[k][1])
                for k, v in self.f.kv.items() if k.startswith("tokenizer.")]

    @property
    def files(self) -> list[Path]:
        return [self.path]

    def storage(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for ti in self.f.tensors.values():
            k = G.type_name(ti.gtype)
            out[k] = out.get(k, 0) + 1
        return out

    def _check_shapes(self) -> None:
        """Every GGUF tensor has the shape the config implies, so rebuilding the HF tensors cannot fail."""
        want = expected_shapes(self.cfg)
        for t in self.tmap.values():
            for p in t.parts:
                exp = tuple(mapping.to_gguf(p, torch.empty(want[t.hf], device="meta")).shape)
                got = tuple(self.f.tensors[p.gguf].shape)
                if got != exp:
                    raise InputError(f"{self.path}: GGUF tensor {p.gguf} has shape {list(got)}, the metadata implies "
                                     f"{list(exp)}; the file is corrupt or was edited: re-convert it")

    def _part(self, gname: str) -> torch.Tensor:
        return torch.empty(self.f.tensors[gname].shape, device="meta")  # shape only, reads nothing

    def get(self, name: str, cast: bool = True) -> torch.Tensor:
        t = self.tmap[name]
        parts = [self.f.tensor(p.gguf, copy=True) for p in t.parts]
        exact = None
        if t.parts[0].kind is mapping.Kind.A:
            i = int(name.split(".")[2])
            vals = self.f.kv.get(mapping.A_LOG_KEY.format(i))
            if (isinstance(vals, list) and len(vals) == parts[0].numel()
                    and all(isinstance(v, float) for v in vals)):
                exact = torch.tensor(vals, dtype=torch.float32)
        x = mapping.from_gguf(t, parts, exact)
        return x.to(self._dtypes[name]) if cast else x


class ProfileSource(Source):
    """Random weights at a profile's real shapes, made one tensor at a time by the core's init rules
    (granite_cli.model.loading.fill_random); each tensor has its own seed, so any order gives the same values."""

    kind = "profile"

    def __init__(self, name: str, dtype: str | None, seed: int = 0, std: float = 0.02) -> None:
        self.cfg = load_config(name)
        dt = parse_dtype(dtype, self.cfg.torch_dtype)
        self.cfg = self.cfg.replace(torch_dtype=hf_name(dt))
        self.hf_config = to_hf_dict(self.cfg)
        self.path = Path(name)
        self._shapes = expected_shapes(self.cfg)
        self._dtypes = {n: dt for n in self._shapes}
        self.names = list(self._shapes)
        self._index = {n: i for i, n in enumerate(self.names)}
        self._nbytes = 0
        self.seed, self.std = seed, std
        self._tile = torch.randn(TILE, generator=torch.Generator().manual_seed(seed)) * std

    def get(self, name: str, cast: bool = True) -> torch.Tensor:
        out = torch.empty(self._shapes[name], dtype=self._dtypes[name])
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self._index[name]) % 2**64)
        fill_random(name, out, g, self._tile, self.std)
        return out


def open_source(src: str | Path) -> Source:
    p = Path(str(src))
    if p.is_dir():
        return HFSource(p)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return GGUFSource(p)
    if p.is_file():
        raise InputError(f"{src}: SRC must be a Hugging Face checkpoint folder or a .gguf file")
    if hub.parse_id(str(src)):
        return HFSource(hub.snapshot(str(src), weights=True), name=hub.model_name(str(src)))
    raise InputError(f"{src}: no such file or folder, nor a Hub id org/name (for random weights at a profile's "
                     "shapes use --from-profile NAME)")
