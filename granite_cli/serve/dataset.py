"""Real prompts for `granite bench --endpoint --dataset FILE`: a JSONL file (or a JSON array) of
conversations in the shapes serving benchmarks share, each reduced to its user turns in order:

    {"prompt": "..."}  or  {"text": "..."}                                 one turn
    {"messages": [{"role": "user", "content": "..."}, ...]}                OpenAI messages
    {"conversations": [{"from": "human", "value": "..."}, ...]}           ShareGPT

The assistant turns are dropped: a multi-turn session sends the server's own answers back as the
history, so what the server reuses is what it produced. Message content may be a string or a list of
{"type": "text", "text": ...} parts (their text joined).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from granite_cli.errors import InputError

# A dataset over this is not a prompt file; one prompt over this many characters is not a prompt.
MAX_BYTES = 1 << 30
MAX_PROMPT_CHARS = 1 << 22
_USER = {"user", "human"}


@dataclass(frozen=True)
class Dataset:
    name: str                        # the file's name, as rows record it
    sha256: str                      # of its bytes, so a row says exactly which file it measured
    conversations: tuple[tuple[str, ...], ...]

    @property
    def label(self) -> str:
        return f"{self.name}@{self.sha256[:12]}"


def _content(v, where: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(p, dict) for p in v):
        texts = [p.get("text") for p in v if p.get("type", "text") == "text"]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise InputError(f"{where}: a message's content is neither text nor a list of text parts")


def _user_turns(entry, where: str) -> tuple[str, ...]:
    if not isinstance(entry, dict):
        raise InputError(f"{where}: not a JSON object")
    for key in ("prompt", "text"):
        if isinstance(entry.get(key), str):
            return (entry[key],)
    for key, role, text in (("messages", "role", "content"), ("conversations", "from", "value")):
        msgs = entry.get(key)
        if msgs is None:
            continue
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise InputError(f"{where}: {key} is not a list of objects")
        return tuple(_content(m.get(text), where) for m in msgs if str(m.get(role, "")).lower() in _USER)
    raise InputError(f"{where}: no prompt, text, messages or conversations (the shapes --dataset reads)")


def load(path: Path) -> Dataset:
    """The dataset's conversations (those with at least one non-empty user turn); InputError, one line,
    for a file that is not one."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise InputError(f"--dataset {path}: over {MAX_BYTES >> 30} GiB; give a smaller file")
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"--dataset {path}: cannot read it ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"--dataset {path}: not UTF-8 text (JSONL or JSON expected)") from None
    entries: list[tuple[object, str]] = []
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            whole = json.loads(text)
            entries = [(e, f"--dataset {path}: entry {i}") for i, e in enumerate(whole, 1)]
        else:
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    entries.append((json.loads(line), f"--dataset {path}: line {i}"))
    except (ValueError, RecursionError) as e:
        raise InputError(f"--dataset {path}: not JSONL or a JSON array ({str(e)[:80]})") from None
    convs = []
    for entry, where in entries:
        turns = tuple(t for t in _user_turns(entry, where) if t.strip())
        if any(len(t) > MAX_PROMPT_CHARS for t in turns):
            raise InputError(f"{where}: a prompt over {MAX_PROMPT_CHARS:,} characters")
        if turns:
            convs.append(turns)
    if not convs:
        raise InputError(f"--dataset {path}: no conversation with a user turn")
    return Dataset(path.name, hashlib.sha256(data).hexdigest(), tuple(convs))
