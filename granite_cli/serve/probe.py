"""What the probe learns of a running server before any case: what it serves, with what engine and
vocabulary, whether it takes token-id prompts (else text built to an exact length with its /tokenize),
and whether it still answers after a failed case.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from granite_cli.errors import GraniteError, InputError
from granite_cli.redact import printable
from granite_cli.serve.http import Endpoint, HTTPFailure, get, get_json, json_object, post_json


@dataclass
class Server:
    """What the probe learned of a running server."""

    endpoint: Endpoint
    name: str
    served_model: str
    engine: str | None = None
    version: str | None = None
    n_vocab: int | None = None
    n_ctx: int | None = None          # the longest prompt + output one request may have, where reported
    slots: int | None = None
    prompt_mode: str = "token_ids"    # or "text": built with the server's /tokenize to the requested length

    def fields(self) -> dict:
        return {"endpoint": self.endpoint.url, "engine": self.engine, "server_version": self.version,
                "served_model": self.served_model, "server_slots": self.slots, "prompt_mode": self.prompt_mode}


_UNREACHABLE = ("refused", "unknown_host", "timeout", "connection", "cut")
# GETs of the probe and the metrics wait at most this long (or the request timeout, when shorter)
GET_TIMEOUT = 10.0


def _pos_int(v, hi: int = 2**31 - 1) -> int | None:
    """A positive integer the server reports, or None for anything else (a string, a bool, a negative)."""
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 < v <= hi else None


def _text(v, limit: int = 200) -> str | None:
    """A name or version the server reports, printable, or None when it is not a string or number."""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        return None
    return printable(str(v), limit) or None


def probe(ep: Endpoint, timeout: float = 600.0, api: str = "completions") -> Server:
    """Ask the server what it serves; any failure here is the user's URL or server, one line, exit 2.
    `timeout` is the request timeout: the one-token completion may take that long, each GET at most
    GET_TIMEOUT seconds. With api="chat", the server must answer a one-token chat completion too."""
    where = f"--endpoint {ep.url}"
    quick = min(GET_TIMEOUT, timeout)
    try:
        status, body = get(ep, "/v1/models", quick)
    except HTTPFailure as e:
        hint = {"refused": "connection refused; is the server running, and on this port?",
                "unknown_host": "unknown host; check the URL", "timeout": f"no answer in {quick:g} s"}
        raise InputError(f"{where}: {hint.get(e.kind, e.kind + ' (' + e.detail[:80] + ')')}") from None
    models = json_object(body) if status == 200 else None
    if models is None:
        if status in (401, 403):
            raise InputError(f"{where}: the server refused the API key (HTTP {status}); give --api-key or set "
                             "GRANITE_API_KEY")
        raise InputError(f"{where}: GET /v1/models answered HTTP {status}, not a model list; is this an "
                         "OpenAI-compatible server (vLLM, SGLang, llama.cpp's llama-server, TGI)?")
    data = models.get("data")
    data = [m for m in data if isinstance(m, dict) and _text(m.get("id"))] if isinstance(data, list) else []
    if not data:
        raise InputError(f"{where}: the server lists no model under /v1/models (a list of objects with an id)")
    m = data[0]
    meta = m.get("meta") if isinstance(m.get("meta"), dict) else {}
    owner = _text(m.get("owned_by"), 60)
    served = str(m["id"]) if isinstance(m["id"], str) and m["id"].isprintable() and len(m["id"]) <= 512 else None
    if served is None:
        raise InputError(f"{where}: the server's model id is not a printable name of at most 512 characters")
    s = Server(ep, ep.name or printable(served, 200), served, engine={"llamacpp": "llama.cpp"}.get(owner, owner),
               n_vocab=_pos_int(meta.get("n_vocab")), n_ctx=_pos_int(m.get("max_model_len")) or _pos_int(meta.get(
                   "n_ctx")))
    props = _json_or_none(ep, "/props", quick)
    if props:
        s.version, s.slots = _text(props.get("build_info"), 100), _pos_int(props.get("total_slots"), 1 << 20)
        dgs = props.get("default_generation_settings")
        s.n_ctx = (_pos_int(dgs.get("n_ctx")) if isinstance(dgs, dict) else None) or s.n_ctx
    version = _json_or_none(ep, "/version", quick)
    if version and not s.version:
        s.version = _text(version.get("version"), 100)
    s.prompt_mode = _prompt_mode(s, timeout) if api == "completions" else _chat_mode(s, timeout)
    return s


def _chat_mode(s: Server, timeout: float) -> str:
    """"chat" where the server answers /v1/chat/completions (it applies its chat template); else refused."""
    try:
        status, _ = post_json(s.endpoint, "/v1/chat/completions", {
            "model": s.served_model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}, timeout)
    except HTTPFailure as e:
        raise InputError(f"--endpoint {s.endpoint.url}: a one-token chat completion failed ({e}); is the model "
                         "loaded?") from None
    if status != 200:
        raise InputError(f"--endpoint {s.endpoint.url}: /v1/chat/completions answered HTTP {status}; the server "
                         "has no chat endpoint or no chat template for its model (use --api completions)")
    return "chat"


def _prompt_mode(s: Server, timeout: float) -> str:
    """token_ids where the server takes a prompt of token ids (vLLM, SGLang, llama.cpp); else text of the
    requested length built with its /tokenize; else refused (exit 2)."""
    try:
        status, _ = post_json(s.endpoint, "/v1/completions", {"model": s.served_model, "prompt": [1, 2, 3, 4],
                                                               "max_tokens": 1}, timeout)
    except HTTPFailure as e:
        raise InputError(f"--endpoint {s.endpoint.url}: a one-token completion failed ({e}); is the model loaded?")
    if status == 200:
        return "token_ids"
    if count_tokens(s, "hello world") is not None:
        return "text"
    raise InputError(f"--endpoint {s.endpoint.url}: the server refused a token-id prompt (HTTP {status}) and has no "
                     "/tokenize to build text prompts of an exact length; granite bench needs one of the two")


def count_tokens(s: Server, text: str) -> int | None:
    """The server's token count of `text` (POST /tokenize, as llama.cpp and vLLM spell it), or None."""
    try:
        status, d = post_json(s.endpoint, "/tokenize", {"model": s.served_model, "content": text, "prompt": text,
                                                         "add_special": False, "add_special_tokens": False})
    except HTTPFailure:
        return None
    if status != 200 or d is None:
        return None
    if isinstance(d.get("tokens"), list):
        return len(d["tokens"])
    return _pos_int(d.get("count"))


def text_prompt(s: Server, n: int, rng: random.Random) -> str:
    """Text the server counts as `n` tokens where it can be built so (random lowercase words, then
    single letters to make up the count); the row records the server's own count either way."""
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7)))
             for _ in range(2 * n + 8)]
    per = max(0.2, (count_tokens(s, " ".join(words[:64])) or 64) / 64)
    k = max(1, min(len(words), int(n / per)))
    for _ in range(8):
        got = count_tokens(s, " ".join(words[:k])) or n
        if got == n or (got < n and k == len(words)):
            break
        k = max(1, min(len(words), k + (int((n - got) / per) or (1 if got < n else -1))))
    text = " ".join(words[:k])
    for _ in range(4):  # the last few tokens, a letter each
        got = count_tokens(s, text) or n
        if got >= n:
            break
        text += " a" * (n - got)
    return text


def _json_or_none(ep: Endpoint, path: str, timeout: float) -> dict | None:
    try:
        return get_json(ep, path, timeout)
    except HTTPFailure:
        return None


class ServerGone(GraniteError):
    """The server stopped answering mid-sweep (exit 1); the finished rows are kept."""


def still_there(server: Server, timeout: float = GET_TIMEOUT) -> bool:
    try:
        get(server.endpoint, "/v1/models", min(GET_TIMEOUT, timeout))
        return True
    except HTTPFailure as e:
        return e.kind not in _UNREACHABLE
