"""Secrets kept out of every output: stdout, stderr, rows files and reports.

A secret (an API key, a password in a URL, a Hub token) is registered once, where it enters the
program; `redact(text)` then replaces it wherever it appears, in any of the spellings it takes on
its way out (as typed, JSON-escaped, percent-encoded, and any run of 8 or more of its characters,
which is what a server's truncated echo of it leaves). Independently of registration, credentials
in URLs (`scheme://user:pass@`), `Bearer` tokens and `Authorization:` values are masked, so a key
a hostile server invents or echoes back in another form is masked too.

The sinks call it: the CLI's stdout and stderr writers, the rows file, the report writer. The
sources (server answers, error details) call it too, before anything is cut short, so a cut never
leaves part of a key behind.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any
from urllib.parse import quote, quote_plus

MASK = "***"
# A run of this many characters of a long secret is masked wherever it appears (a truncated echo).
_RUN = 8
_secrets: set[str] = set()
_runs: set[str] = set()

_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s/@'\"<>]*@")
_BEARER = re.compile(r"(?i)\b(bearer)(\s+|%20|\+)[^\s\"',;\\<>)\]}]+")
_AUTH = re.compile(r"(?i)(\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)(?:(?!bearer\b)[a-z]+\s+)?[^\s\"',;\\<>]+")


def register(secret: str | None) -> None:
    """Mask `secret` in everything redact() sees from now on."""
    if not secret:
        return
    forms = {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1], quote(secret, safe=""),
             quote_plus(secret)}
    _secrets.update(f for f in forms if f)
    if len(secret) >= 2 * _RUN:
        _runs.update(secret[i: i + _RUN] for i in range(len(secret) - _RUN + 1))


def register_environment() -> None:
    """The secrets granite may be handed through the environment (the API key, the Hub's token)."""
    for name in ("GRANITE_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        register(os.environ.get(name))


def redact(text: str) -> str:
    """`text` with every registered secret and every URL credential, Bearer token and Authorization
    value replaced by ***."""
    if not isinstance(text, str) or not text:
        return text
    for s in sorted(_secrets, key=len, reverse=True):
        if s in text:
            text = text.replace(s, MASK)
    if _runs and any(r in text for r in _runs):
        text = _mask_runs(text)
    if "://" in text:
        text = _URL_USERINFO.sub(lambda m: m.group(1) + MASK + "@", text)
    text = _BEARER.sub(lambda m: m.group(1) + " " + MASK, text)
    return _AUTH.sub(lambda m: m.group(1) + MASK, text)


def _mask_runs(text: str) -> str:
    hit = [False] * len(text)
    for i in range(len(text) - _RUN + 1):
        if text[i: i + _RUN] in _runs:
            for j in range(i, i + _RUN):
                hit[j] = True
    out, i = [], 0
    while i < len(text):
        if hit[i]:
            while i < len(text) and hit[i]:
                i += 1
            out.append(MASK)
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def scrub(obj: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings, numbers) with every string value redacted.
    Keys are granite's own names and are left alone: masking a short key that happens to be part of a
    field's name would break the record (the sources keep a server's own keys out of records)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(x) for x in obj]
    if isinstance(obj, tuple):
        return tuple(scrub(x) for x in obj)
    return obj


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str, limit: int = 200) -> str:
    """Text from outside (a server's answer) made safe to print: redacted first, then control
    characters (terminal escapes among them) replaced, then cut to `limit` characters."""
    text = _CONTROL.sub("?", redact(text)).replace("\n", " ").replace("\t", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"
