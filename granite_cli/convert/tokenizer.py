"""A Hugging Face `tokenizer.json` (byte-level BPE) as GGUF `tokenizer.ggml.*` metadata.

Tokens are listed by id up to the model's vocabulary size; ids the tokenizer does not use become
`[PAD<id>]` entries of type UNUSED (as llama.cpp's converter does), special added tokens are CONTROL,
other added tokens USER_DEFINED. The pre-tokenizer name is recognised from the split regex when it
is one llama.cpp knows; otherwise "default" (llama.cpp's GPT-2 style splitting) with a note.
Without a tokenizer the GGUF declares no vocabulary (`tokenizer.ggml.model = "none"`): llama.cpp then
loads `vocab_size` anonymous tokens, which is all a benchmark needs (token ids in, logits out).
"""

from __future__ import annotations

import json
from pathlib import Path

from granite_cli.checkpoint import gguf as G
from granite_cli.errors import InputError

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
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


def vocab_kvs(tokenizer_dir: Path | None, vocab_size: int, hf_config: dict) -> tuple[list[G.KV], list[str]]:
    """(metadata, notes) for the GGUF's vocabulary."""
    if tokenizer_dir is None:
        return [G.KV("tokenizer.ggml.model", G.STR, "none")], ["no tokenizer.json: the GGUF declares no vocabulary"]
    path = tokenizer_dir / "tokenizer.json"
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path}: not a readable tokenizer.json; fix or remove it (without one the GGUF has no "
                         "vocabulary)") from None
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        return ([G.KV("tokenizer.ggml.model", G.STR, "none")],
                [f"tokenizer type {model.get('type')!r} is not carried (only byte-level BPE); the GGUF declares no "
                 "vocabulary"])
    tokens: list[str | None] = [None] * vocab_size
    types = [UNUSED] * vocab_size
    for tok, i in (model.get("vocab") or {}).items():
        if i >= vocab_size:
            raise InputError(f"{path}: token id {i} is outside the model's vocabulary ({vocab_size}); wrong tokenizer?")
        tokens[i], types[i] = tok, NORMAL
    for a in tj.get("added_tokens") or []:
        i = a["id"]
        if i >= vocab_size:
            raise InputError(f"{path}: added token id {i} is outside the model's vocabulary ({vocab_size})")
        tokens[i], types[i] = a["content"], CONTROL if a.get("special") else USER_DEFINED
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre, note = _pre_name(tj.get("pre_tokenizer"))
    kv = [G.KV("tokenizer.ggml.model", G.STR, "gpt2"), G.KV("tokenizer.ggml.pre", G.STR, pre),
          G.KV("tokenizer.ggml.tokens", G.ARR, tokens, G.STR), G.KV("tokenizer.ggml.token_type", G.ARR, types, G.I32),
          G.KV("tokenizer.ggml.merges", G.ARR, merges, G.STR)]
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        v = hf_config.get(key)
        if isinstance(v, list):
            v = v[0] if v else None
        if isinstance(v, int) and 0 <= v < vocab_size:
            kv.append(G.KV(f"tokenizer.ggml.{name}_token_id", G.U32, v))
    tc = tokenizer_dir / "tokenizer_config.json"
    if tc.is_file():
        try:
            add_bos = json.loads(tc.read_text(encoding="utf-8")).get("add_bos_token")
        except (OSError, json.JSONDecodeError):
            add_bos = None
        if isinstance(add_bos, bool):
            kv.append(G.KV("tokenizer.ggml.add_bos_token", G.BOOL, add_bos))
    return kv, [note] if note else []
