"""A Hugging Face `tokenizer.json` (byte-level BPE) as GGUF `tokenizer.ggml.*` metadata.

Tokens are listed by id up to the model's vocabulary size; ids the tokenizer does not use become
`[PAD<id>]` entries of type UNUSED (as llama.cpp's converter does), special added tokens are CONTROL,
other added tokens USER_DEFINED. The pre-tokenizer name is recognised from the split regex when it
is one llama.cpp knows; otherwise "default" (llama.cpp's GPT-2 style splitting) with a note.
Without a tokenizer the converter writes a synthetic byte-level vocabulary (`synthetic_vocab`), because
llama.cpp's servers abort on the first generated token of a model that declares none; `--no-vocab`
still writes `tokenizer.ggml.model = "none"` (loadable, not servable).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from granite_cli.checkpoint import gguf as G
from granite_cli.errors import InputError

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# llama.cpp's token types run from UNDEFINED (0) to BYTE (6); its tokenizer models by name.
TOKEN_TYPES = range(0, 7)
GGUF_TOKENIZERS = ("llama", "gpt2", "bert", "t5", "rwkv", "plamo2", "none", "no_vocab")
_LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def _pre_name(pre: dict | None) -> tuple[str, str | None]:
    if not pre:
        return "default", "tokenizer.json has no pre-tokenizer; llama.cpp will use its default splitting"
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for s in steps:
        if s.get("type") == "Split":
            pat = (s.get("pattern") or {}).get("Regex")
            if pat == _LLAMA3_SPLIT:
                return "llama-bpe", None
            return "default", "unrecognised pre-tokenizer regex; llama.cpp will use its default splitting"
    if any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps):
        return "gpt-2", None
    return "default", "unrecognised pre-tokenizer; llama.cpp will use its default splitting"


@dataclass
class Vocab:
    """A tokenizer as the converter carries it: `tokenizer.json` (and `tokenizer_config.json`) content,
    where it came from, and the bos/eos/pad ids a synthetic one fixes itself."""

    tokenizer: dict
    config: dict | None
    origin: str                                   # the path it was read from, or "synthetic"
    special: dict[str, int] = field(default_factory=dict)
    gguf: list[G.KV] | None = None                # a GGUF source's own tokenizer metadata, carried as is

    @property
    def synthetic(self) -> bool:
        return self.origin == SYNTHETIC


SYNTHETIC = "synthetic"


def read_vocab(tokenizer_dir: Path) -> Vocab:
    path = tokenizer_dir / "tokenizer.json"
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(tj, dict):
            raise ValueError("not an object")
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        raise InputError(f"{path}: not a readable tokenizer.json; fix or remove it (without one the GGUF gets a "
                         "synthetic vocabulary)") from None
    tc = None
    if (tokenizer_dir / "tokenizer_config.json").is_file():
        try:
            tc = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            tc = None
    return Vocab(tj, tc if isinstance(tc, dict) else None, str(path))


def byte_symbols() -> list[str]:
    """The printable character byte-level BPE writes for each byte 0..255 (GPT-2's reversible mapping:
    printable Latin-1 bytes stand for themselves, the rest are shifted past 255)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _fillers(bytes_: list[str], n: int) -> list[str]:
    """The 256 byte tokens, then distinct multi-letter tokens (aa, ab, ..., aaa, ...) up to `n`. No merge
    makes the longer ones, so text still encodes a byte per token; but every id a random model may
    generate decodes to text, so a server streams a chunk for each (it sends none for an unused id)."""
    out = bytes_[:n]
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    width = 2
    while len(out) < n:
        for k in range(len(letters) ** width):
            if len(out) == n:
                break
            word = ""
            for _ in range(width):
                k, r = divmod(k, len(letters))
                word = letters[r] + word
            out.append(word)
        width += 1
    return out


def synthetic_vocab(vocab_size: int, hf_config: dict) -> Vocab:
    """A byte-level BPE vocabulary for random-weight models: 256 byte tokens and no merges (so N ASCII
    characters are exactly N tokens), `<|end_of_text|>` as bos, eos and pad at the config's ids or else the
    last id, every other id a multi-letter token. It exists so llama.cpp's servers, which
    abort on a model without a vocabulary, can serve the checkpoint; the text it produces is random."""
    special: dict[str, int] = {}
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        v = hf_config.get(key)
        v = v[0] if isinstance(v, list) and v else v
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab_size:
            special[name] = v
    if not special and vocab_size >= 257:
        # one special token: a random model's greedy output often repeats one id, and a server streams
        # nothing for a control token's empty text, but ignore_eos keeps the end token from being chosen
        special = {"bos": vocab_size - 1, "eos": vocab_size - 1, "padding": vocab_size - 1}
    taken = set(special.values())
    ids = [i for i in range(vocab_size) if i not in taken]
    vocab = dict(zip(_fillers(byte_symbols(), len(ids)), ids))
    # Granite's own names; a bos with an id of its own (not eos's) is a begin token
    names = {"eos": "<|end_of_text|>", "padding": "<|pad|>",
             "bos": "<|end_of_text|>" if special.get("bos") == special.get("eos") else "<|begin_of_text|>"}
    content: dict[int, str] = {}
    for k in ("eos", "bos", "padding"):
        if k in special:
            content.setdefault(special[k], names[k])
    vocab.update({c: i for i, c in content.items()})  # tokenizers keeps an added token's id only if the model has it
    added = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, c in sorted(content.items())]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
          "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                    "vocab": vocab, "merges": []}}
    tc = {"add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
          "model_max_length": int(hf_config.get("max_position_embeddings") or 2**20)}
    for k, key in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token")):
        if k in special:
            tc[key] = content[special[k]]
    return Vocab(tj, tc, SYNTHETIC, special)


SYNTHETIC_NOTE = ("the source has no tokenizer: the output carries a synthetic byte-level vocabulary (256 byte tokens, "
                  "no merges; the text is random bytes) so llama.cpp's servers can serve it; --no-vocab writes none")


def write_vocab(v: Vocab, folder: Path) -> None:
    (folder / "tokenizer.json").write_text(json.dumps(v.tokenizer, ensure_ascii=False, indent=1) + "\n",
                                           encoding="utf-8")
    if v.config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(v.config, indent=2) + "\n", encoding="utf-8")


def check_gguf_vocab(kvs: list[G.KV], n_vocab: int, where: str) -> None:
    """Refuse (InputError) a GGUF vocabulary whose parts disagree with each other or with the model,
    before it is carried into a new file that llama.cpp would reject or misread: the token list
    (UTF-8, unique, one per embedding row), its types, its scores, its merges (two known tokens each,
    split at the first space after the first character, as llama.cpp splits them) and the special
    token ids."""
    kv = {k.key: k for k in kvs}
    try:
        model = kv.get("tokenizer.ggml.model")
        if model is None or model.vtype != G.STR or model.value not in GGUF_TOKENIZERS:
            raise ValueError(f"tokenizer.ggml.model is {getattr(model, 'value', None)!r:.40}, not a tokenizer "
                             "llama.cpp knows")
        if model.value in ("none", "no_vocab"):
            return
        tokens = _gguf_tokens(kv.get("tokenizer.ggml.tokens"), n_vocab)
        _check_per_token(kv, len(tokens))
        _check_merges(kv.get("tokenizer.ggml.merges"), set(tokens))
        for k in kvs:
            if k.key.startswith("tokenizer.ggml.") and k.key.endswith("_token_id") and (
                    k.vtype not in G.INTEGER_TYPES or not 0 <= k.value < n_vocab):
                raise ValueError(f"{k.key} = {k.value!r:.20} is not a token id below {n_vocab}")
    except ValueError as e:
        raise InputError(f"{where}: its vocabulary is corrupt ({e}); it is not carried into the output: fix the "
                         "file, or convert from the Hugging Face folder") from None


def _gguf_tokens(toks: G.KV | None, n_vocab: int) -> list[str]:
    if toks is None or toks.vtype != G.ARR or toks.atype != G.STR:
        raise ValueError("tokenizer.ggml.tokens is missing or not a list of strings")
    try:
        tokens = list(toks.value.decoded("strict") if isinstance(toks.value, G.GGUFStrings) else toks.value)
    except UnicodeDecodeError:
        raise ValueError("a token is not UTF-8 text") from None
    if len(tokens) != n_vocab:
        raise ValueError(f"{len(tokens)} tokens for a model with {n_vocab} embedding rows")
    seen: set[str] = set()
    for t in tokens:
        if t in seen:
            raise ValueError(f"the token {t[:30]!r} is listed twice")
        seen.add(t)
    return tokens


def _check_per_token(kv: dict[str, G.KV], n: int) -> None:
    for key, what, ok in (("tokenizer.ggml.token_type", "type", lambda x: int(x) in TOKEN_TYPES),
                          ("tokenizer.ggml.scores", "score", lambda x: math.isfinite(float(x)))):
        k = kv.get(key)
        if k is None:
            continue
        if k.vtype != G.ARR or k.atype not in G.NUMBER_TYPES or len(k.value) != n:
            raise ValueError(f"{key} holds {len(k.value) if k.vtype == G.ARR else 'no list of'} numbers for {n} "
                             "tokens")
        if not all(ok(x) for x in k.value):
            raise ValueError(f"a token's {what} in {key} is out of range")


def _check_merges(merges: G.KV | None, known: set[str]) -> None:
    if merges is None:
        return
    if merges.vtype != G.ARR or merges.atype != G.STR:
        raise ValueError("tokenizer.ggml.merges is not a list of strings")
    for m in merges.value:
        pos = m.find(" ", 1)
        if pos < 0 or m[:pos] not in known or m[pos + 1:] not in known:
            raise ValueError(f"the merge {m[:40]!r} is not two tokens of the list")


def _bpe_lists(tj: dict, model: dict, vocab_size: int, path: str) -> tuple[list[str], list[int], list[str]]:
    """The token list (by id), token types and merges of a byte-level BPE tokenizer.json."""
    tokens: list[str | None] = [None] * vocab_size
    types = [UNUSED] * vocab_size

    def place(tok, i, kind: int, what: str) -> None:
        if not isinstance(tok, str) or isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"{what} {str(tok)[:30]!r}: {str(i)[:20]} is not a token id")
        if i >= vocab_size:
            raise InputError(f"{path}: {what} id {i} is outside the model's vocabulary ({vocab_size}); wrong "
                             "tokenizer?")
        tokens[i], types[i] = tok, kind

    for tok, i in (model.get("vocab") or {}).items():
        place(tok, i, NORMAL, "token")
    for a in tj.get("added_tokens") or []:
        place(a["content"], a["id"], CONTROL if a.get("special") else USER_DEFINED, "added token")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not all(isinstance(m, str) for m in merges):
        raise ValueError("a merge is not text")
    return [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)], types, merges


def vocab_kvs(v: Vocab | None, vocab_size: int, hf_config: dict) -> tuple[list[G.KV], list[str]]:
    """(metadata, notes) for the GGUF's vocabulary; None declares none (not servable by llama.cpp)."""
    if v is None:
        return [G.KV("tokenizer.ggml.model", G.STR, "none")], ["--no-vocab: the GGUF declares no vocabulary; "
                                                               "llama.cpp can load it but not serve it"]
    if v.gguf is not None:
        return v.gguf, []
    tj, path = v.tokenizer, v.origin
    model = tj.get("model") or {}
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else type(model).__name__
        return ([G.KV("tokenizer.ggml.model", G.STR, "none")],
                [f"tokenizer type {str(kind)[:40]!r} is not carried (only byte-level BPE); the GGUF declares no "
                 "vocabulary"])
    try:
        tokens, types, merges = _bpe_lists(tj, model, vocab_size, path)
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise InputError(f"{path}: not a tokenizer.json granite can read ({type(e).__name__}: {str(e)[:80]}); fix it, "
                         "or remove it for a synthetic vocabulary") from None
    pre, note = _pre_name(tj.get("pre_tokenizer"))
    kv = [G.KV("tokenizer.ggml.model", G.STR, "gpt2"), G.KV("tokenizer.ggml.pre", G.STR, pre),
          G.KV("tokenizer.ggml.tokens", G.ARR, tokens, G.STR), G.KV("tokenizer.ggml.token_type", G.ARR, types, G.I32),
          G.KV("tokenizer.ggml.merges", G.ARR, merges, G.STR)]
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        val = v.special.get(name, hf_config.get(key))
        if isinstance(val, list):
            val = val[0] if val else None
        if isinstance(val, int) and 0 <= val < vocab_size:
            kv.append(G.KV(f"tokenizer.ggml.{name}_token_id", G.U32, val))
    add_bos = (v.config or {}).get("add_bos_token")
    if isinstance(add_bos, bool):
        kv.append(G.KV("tokenizer.ggml.add_bos_token", G.BOOL, add_bos))
    return kv, [note] if note else []
