"""An OpenAI-compatible server as a bench subject: where it is, how to ask it, and one streamed
completion timed on the client's monotonic clock.

Standard library only (http.client), so the client's own cost per request stays small and measurable:
one connection per request, the server-sent events read line by line, each chunk stamped with
time.perf_counter() as its line arrives.

A server is not trusted. Every request has a whole-request deadline (a watchdog closes its socket when
it passes, so a server dripping a byte at a time cannot hold a request past it); answers are read up
to a size cap; every field read from an answer is checked for its type and range, and anything else is
an HTTPFailure of a named kind, never an exception of the client's. What a server says is redacted and
stripped of control characters before it reaches a row or a message.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

from granite_cli.errors import InputError
from granite_cli.redact import printable, redact, register

# Larger answers are not what was asked for: a model list, a metrics page, one server-sent event.
MAX_BODY = 16 * 2**20
MAX_LINE = 2**20
# usage counts above this are not counts of one request's tokens
MAX_COUNT = 2**31 - 1
TEMPLATE_TOKENS = 1024  # a chat template's or BOS's tokens per message, beyond one per byte of text


@dataclass(frozen=True)
class Endpoint:
    name: str                 # the subject's name in rows and verdicts
    url: str                  # base URL without credentials or a trailing /v1
    api_key: str | None = field(default=None, repr=False)

    @property
    def host(self) -> tuple[str, int, bool]:
        u = urlsplit(self.url)
        tls = u.scheme == "https"
        return u.hostname or "", u.port or (443 if tls else 80), tls

    @property
    def prefix(self) -> str:
        return urlsplit(self.url).path.rstrip("/")

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        host, port, tls = self.host
        cls = http.client.HTTPSConnection if tls else http.client.HTTPConnection
        return cls(host, port, timeout=timeout)

    def headers(self, body: bool = False) -> dict[str, str]:
        h = {"Accept": "application/json, text/event-stream"}
        if body:
            h["Content-Type"] = "application/json"
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h


def parse_endpoint(text: str, api_key: str | None = None, flag: str = "--endpoint") -> Endpoint:
    """`URL` or `NAME=URL`; credentials in the URL move to the Authorization header and out of every
    row, name and message; a trailing /v1 is dropped (paths are added per request)."""
    register(api_key)
    name, _, url = text.partition("=") if "=" in text.split("://", 1)[0] else ("", "", text)
    try:
        u = urlsplit(url.strip())
        password, username = u.password, u.username
    except ValueError:
        raise InputError(f"{flag} {redact(text)!r}: not a URL; give e.g. http://127.0.0.1:8080") from None
    # Masked everywhere before any message can quote it: the key (the password, or a lone user name without
    # --api-key). Other user names only inside URLs: masking "model" everywhere would mangle every record.
    key = password or (username if not api_key else None)
    if key:
        register(key)
        register(unquote(key))
    shown = redact(text)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise InputError(f"{flag} {shown!r}: not an http(s) URL; give e.g. http://127.0.0.1:8080" +
                         (" or NAME=http://host:port" if flag == "--endpoint" else ""))
    try:
        u.port
    except ValueError:
        raise InputError(f"{flag} {shown!r}: bad port; give e.g. http://127.0.0.1:8080") from None
    if not api_key and key:
        api_key = unquote(key)  # the password, or a lone user name
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname  # an IPv6 address keeps its brackets
    netloc = host + (f":{u.port}" if u.port else "")
    path = u.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return Endpoint(printable(name.strip(), 100), urlunsplit((u.scheme, netloc, path, "", "")), api_key or None)


class HTTPFailure(Exception):
    """A request that did not complete, or an answer that is not what the API promises; `kind` is how
    it failed, for the row's error counts; `detail` is printable and redacted."""

    def __init__(self, kind: str, detail: str = "") -> None:
        detail = printable(detail) if detail else ""
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.detail = kind, detail


def _classify(e: BaseException) -> HTTPFailure:
    if isinstance(e, HTTPFailure):
        return e
    if isinstance(e, (socket.timeout, TimeoutError)):
        return HTTPFailure("timeout", str(e))
    if isinstance(e, ConnectionRefusedError):
        return HTTPFailure("refused", str(e))
    if isinstance(e, socket.gaierror):
        return HTTPFailure("unknown_host", str(e))
    if isinstance(e, (ConnectionError, http.client.IncompleteRead, http.client.RemoteDisconnected)):
        return HTTPFailure("cut", str(e) or type(e).__name__)
    if isinstance(e, (http.client.HTTPException, OSError)):
        return HTTPFailure("connection", str(e) or type(e).__name__)
    if isinstance(e, (ValueError, UnicodeDecodeError, RecursionError)):
        return HTTPFailure("bad_response", str(e))
    raise e


class _Request:
    """One request's connection under a whole-request deadline: when `timeout` seconds have passed, a
    watchdog shuts the socket down, so a blocked connect, send or read returns at once, and every
    failure from then on is reported as the timeout it is."""

    def __init__(self, ep: Endpoint, timeout: float) -> None:
        self.timeout = timeout
        self.conn = ep.connection(timeout)
        self.sock: socket.socket | None = None  # kept: http.client lets go of it once a response is read to close
        self.fired = False
        self._timer = threading.Timer(timeout, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        sock = self.sock or self.conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "_Request":
        self._timer.start()
        try:
            self.conn.connect()
            self.sock = self.conn.sock
        except Exception as e:  # noqa: BLE001
            self.__exit__(None, None, None)
            raise self.failure(e) from None
        if self.fired:  # the deadline passed while connecting, before the socket could be shut
            self.__exit__(None, None, None)
            raise self.failure(TimeoutError())
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        self.conn.close()
        if self.sock is not None:
            self.sock.close()

    def check(self) -> None:
        """Raise the timeout if the deadline passed: an answer read to its end then is cut short."""
        if self.fired:
            raise TimeoutError()

    def failure(self, e: BaseException) -> HTTPFailure:
        if self.fired:
            return HTTPFailure("timeout", f"not finished in {self.timeout:g} s")
        return _classify(e)


def _read_body(r: http.client.HTTPResponse) -> bytes:
    raw = r.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise HTTPFailure("too_large", f"an answer over {MAX_BODY >> 20} MiB")
    return raw


def get(ep: Endpoint, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """(status, body) of a GET; HTTPFailure when there is no answer in `timeout` seconds."""
    with _Request(ep, timeout) as q:
        try:
            q.conn.request("GET", ep.prefix + path, headers=ep.headers())
            r = q.conn.getresponse()
            body = _read_body(r)
            q.check()
            return r.status, body
        except Exception as e:  # noqa: BLE001 -- every transport failure becomes a counted kind
            raise q.failure(e) from None


def json_value(body: bytes):
    """The JSON a body holds, or None (also for nesting too deep to parse)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def json_object(body: bytes) -> dict | None:
    """The JSON object a body holds, or None."""
    d = json_value(body)
    return d if isinstance(d, dict) else None


def get_json(ep: Endpoint, path: str, timeout: float = 10.0) -> dict | None:
    """The JSON object a GET answers with, or None for a non-200 or non-JSON answer."""
    status, body = get(ep, path, timeout)
    return json_object(body) if status == 200 else None


def post_json(ep: Endpoint, path: str, body: dict, timeout: float = 30.0) -> tuple[int, dict | None]:
    """(status, the JSON object answered or None) of a POST; HTTPFailure when there is no answer."""
    with _Request(ep, timeout) as q:
        try:
            q.conn.request("POST", ep.prefix + path, body=json.dumps(body).encode(), headers=ep.headers(body=True))
            r = q.conn.getresponse()
            raw = _read_body(r)
            q.check()
        except Exception as e:  # noqa: BLE001
            raise q.failure(e) from None
    return r.status, json_object(raw)


@dataclass
class Timed:
    """One streamed completion as the client saw it (perf_counter seconds)."""

    sent: float
    chunks: list[float]            # arrival of each chunk that carried a token (text, possibly empty)
    done: float                    # the last byte of the response
    finish_reason: str | None
    prompt_tokens: int | None      # from the response's usage, when the server reports it
    completion_tokens: int | None
    cached_tokens: int | None      # prompt tokens the server reused (usage, else llama.cpp's timings.cache_n)
    server_timings: dict | None = None  # llama.cpp's own: prompt_ms, predicted_per_token_ms, ...
    text: str = ""                 # the answer, as the next turn of a conversation sends it back

    @property
    def ttft(self) -> float | None:
        return self.chunks[0] - self.sent if self.chunks else None

    @property
    def e2e(self) -> float:
        return self.done - self.sent

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens or len(self.chunks)

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (end to end − TTFT) / (tokens − 1), what vLLM calls TPOT
        and AIPerf and GuideLLM call ITL."""
        n = self.output_tokens
        return (self.done - self.chunks[0]) / (n - 1) if self.chunks and n > 1 else None

    @property
    def gaps(self) -> list[float]:
        """The gaps between streamed chunks: what vLLM calls ITL."""
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])]


def _bad(what: str) -> HTTPFailure:
    return HTTPFailure("bad_response", what)


# Where each API puts a streamed token's text: /v1/completions in choices[].text, /v1/chat/completions in
# choices[].delta.content (reasoning models stream reasoning_content first).
APIS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def _choice_text(c: dict, api: str) -> str | None:
    """The text a streamed choice carries (None: it carries none), its type checked."""
    if api == "chat":
        d = c.get("delta")
        if d is None:
            return None
        if not isinstance(d, dict):
            raise _bad(f"choices[].delta is {type(d).__name__}, not an object")
        for key in ("content", "reasoning_content"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise _bad(f"choices[].delta.{key} is {type(d[key]).__name__}, not a string")
        if d.get("content") is None and d.get("reasoning_content") is None:
            return None
        return (d.get("reasoning_content") or "") + (d.get("content") or "")
    t = c.get("text")
    if t is not None and not isinstance(t, str):
        raise _bad(f"choices[].text is {type(t).__name__}, not a string")
    return t


def _event(data: bytes) -> dict:
    """One server-sent event's JSON object, its fields of the types the API gives them."""
    ev = json_value(data)
    if not isinstance(ev, dict):
        raise _bad("an event that is not a JSON object: " + data[:80].decode("utf-8", "replace"))
    if "error" in ev:
        err = ev["error"]
        msg = err.get("message") if isinstance(err, dict) else err
        raise HTTPFailure("server_error", str(msg if isinstance(msg, (str, int, float)) else json.dumps(err))[:2000])
    choices = ev.get("choices")
    if choices is not None and not isinstance(choices, list):
        raise _bad(f"choices is {type(choices).__name__}, not a list")
    for c in choices or []:
        if not isinstance(c, dict):
            raise _bad(f"a choice is {type(c).__name__}, not an object")
        if c.get("finish_reason") is not None and not isinstance(c["finish_reason"], str):
            raise _bad(f"finish_reason is {type(c['finish_reason']).__name__}, not a string")
    if ev.get("usage") is not None and not isinstance(ev["usage"], dict):
        raise _bad(f"usage is {type(ev['usage']).__name__}, not an object")
    return ev


def _count(d: dict, key: str, where: str = "usage") -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_COUNT:
        raise HTTPFailure("bad_usage", f"{where}.{key} = {json.dumps(v)[:40]}, not a count of tokens")
    return v


def _usage(u: dict, max_tokens: int | None) -> tuple[int | None, int | None, int | None]:
    """(prompt, completion, cached) tokens from a usage object; impossible numbers are a bad_usage."""
    prompt, completion = _count(u, "prompt_tokens"), _count(u, "completion_tokens")
    details = u.get("prompt_tokens_details")
    if details is not None and not isinstance(details, dict):
        raise HTTPFailure("bad_usage", f"usage.prompt_tokens_details is {type(details).__name__}, not an object")
    cached = _count(details or {}, "cached_tokens", "usage.prompt_tokens_details")
    if cached is not None and prompt is not None and cached > prompt:
        raise HTTPFailure("bad_usage", f"{cached} cached prompt tokens of {prompt}")
    if completion is not None and max_tokens is not None and completion > max_tokens:
        raise HTTPFailure("bad_usage", f"completion_tokens {completion} > max_tokens {max_tokens}")
    return prompt, completion, cached


# llama.cpp's timing names (prompt_ms, cache_n, ...): no other text of a server's becomes a key of our records.
_TIMING_KEY = re.compile(r"^(?:prompt|predicted|cache|draft)(?:_[a-z]{1,24}){0,4}$")


def _timings(t) -> dict | None:
    """llama.cpp's own timings: the finite, non-negative numbers among them (an optional extra; anything
    else is left out)."""
    if not isinstance(t, dict):
        return None
    out = {k: float(v) for k, v in t.items() if isinstance(k, str) and _TIMING_KEY.match(k)
           and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0}
    return out or None


def prompt_bound(body: dict) -> int | None:
    """The most prompt tokens a request can hold: its token ids; for text, a token per UTF-8 byte plus a
    chat template's."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    if isinstance(prompt, str):
        return len(prompt.encode("utf-8")) + TEMPLATE_TOKENS
    msgs = body.get("messages") if isinstance(body.get("messages"), list) else None
    return None if msgs is None else TEMPLATE_TOKENS * (1 + len(msgs)) + sum(
        len(str(m.get("content", "")).encode("utf-8")) for m in msgs if isinstance(m, dict))


def stream_completion(ep: Endpoint, body: dict, timeout: float, api: str = "completions") -> Timed:
    """POST /v1/completions (or, with api="chat", /v1/chat/completions) with stream=true; raise HTTPFailure
    for an HTTP error, a request not finished within `timeout` seconds, a stream that ends before its
    finish_reason and [DONE], or an answer that breaks the API (types, impossible counts, more tokens than
    asked)."""
    payload = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode()
    max_tokens = body.get("max_tokens")
    most = (4 * max_tokens + 64) if isinstance(max_tokens, int) else None
    chunks: list[float] = []
    text: list[str] = []
    finish = usage = timings = None
    events = 0
    with _Request(ep, timeout) as q:
        sent = time.perf_counter()
        try:
            q.conn.request("POST", ep.prefix + APIS[api], body=payload, headers=ep.headers(body=True))
            r = q.conn.getresponse()
            if r.status != 200:
                raise HTTPFailure(f"http_{r.status}", r.read(4096).decode("utf-8", "replace").strip())
            finished = False
            while True:
                line = r.readline(MAX_LINE + 1)
                if not line:
                    break
                if len(line) > MAX_LINE:
                    raise _bad(f"an event line over {MAX_LINE >> 20} MiB")
                now = time.perf_counter()
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    finished = True
                    break
                ev = _event(data)
                events += 1
                for c in ev.get("choices") or []:
                    t = _choice_text(c, api)
                    # a token's chunk: text (empty while a character's bytes are incomplete); llama.cpp's closing
                    # chunk carries only the finish reason
                    if t is not None and (t or not c.get("finish_reason")):
                        chunks.append(now)
                        text.append(t)
                    finish = c.get("finish_reason") or finish
                if most is not None and len(chunks) > most:
                    raise _bad(f"more than {most} token chunks for max_tokens {max_tokens}")
                usage = ev.get("usage") or usage
                timings = ev.get("timings") or timings
            if not events:
                raise _bad("HTTP 200 without a server-sent event stream")
            if not finished or finish is None:
                raise HTTPFailure("cut", f"stream ended after {len(chunks)} token(s) without "
                                         f"{'a finish reason' if finish is None else '[DONE]'}")
        except Exception as e:  # noqa: BLE001
            raise q.failure(e) from None
    done = time.perf_counter()
    prompt, completion, cached, own = _counts(body, usage, timings, len(chunks), finish)
    return Timed(sent, chunks, done, finish, prompt, completion, cached, own, "".join(text))


def _counts(body: dict, usage: dict | None, timings, chunks: int, finish: str | None):
    """(prompt, completion, cached tokens, llama.cpp's timings) of an answer; HTTPFailure for more cached
    tokens than the prompt can hold (prompt_tokens or not) and for no token at all (nothing to measure)."""
    max_tokens = body.get("max_tokens")
    prompt, completion, cached = _usage(usage or {}, max_tokens if isinstance(max_tokens, int) else None)
    bound = prompt if prompt is not None else prompt_bound(body)
    if cached is not None and bound is not None and cached > bound:
        raise HTTPFailure("bad_usage", f"{cached} cached prompt tokens for a prompt of at most {bound}")
    own = _timings(timings)
    if cached is None and own and "cache_n" in own and (bound is None or own["cache_n"] <= bound):
        cached = int(own["cache_n"])
    if completion == 0 or (not chunks and completion is None):
        raise HTTPFailure("no_output", f"the server answered no token for max_tokens {max_tokens} "
                                       f"(finish_reason {finish!r})")
    return prompt, completion, cached, own
