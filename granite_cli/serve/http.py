"""An OpenAI-compatible server as a bench subject: where it is, how to ask it, and one streamed
completion timed on the client's monotonic clock.

Standard library only (http.client), so the client's own cost per request stays small and measurable:
one connection per request, the server-sent events read line by line, each chunk stamped with
time.perf_counter() as its line arrives.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from granite_cli.errors import InputError


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


def parse_endpoint(text: str, api_key: str | None = None) -> Endpoint:
    """`URL` or `NAME=URL`; credentials in the URL move to the Authorization header and out of every
    row, name and message; a trailing /v1 is dropped (paths are added per request)."""
    name, _, url = text.partition("=") if "=" in text.split("://", 1)[0] else ("", "", text)
    u = urlsplit(url.strip())
    if u.scheme not in ("http", "https") or not u.hostname:
        raise InputError(f"--endpoint {_redact(text)!r}: not an http(s) URL; give e.g. http://127.0.0.1:8080 or "
                         "NAME=http://host:port")
    try:
        u.port
    except ValueError:
        raise InputError(f"--endpoint {_redact(text)!r}: bad port; give e.g. http://127.0.0.1:8080") from None
    if u.password and not api_key:
        api_key = u.password
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname  # an IPv6 address keeps its brackets
    netloc = host + (f":{u.port}" if u.port else "")
    path = u.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return Endpoint(name.strip(), urlunsplit((u.scheme, netloc, path, "", "")), api_key or None)


def _redact(text: str) -> str:
    u = urlsplit(text.split("=", 1)[-1] if "=" in text.split("://", 1)[0] else text)
    return text.replace(u.password, "***") if u.password else text


class HTTPFailure(Exception):
    """A request that did not complete; `kind` is how it failed, for the row's error counts."""

    def __init__(self, kind: str, detail: str = "") -> None:
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
    if isinstance(e, (ValueError, UnicodeDecodeError)):
        return HTTPFailure("bad_response", str(e)[:200])
    raise e


def get(ep: Endpoint, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """(status, body) of a GET; HTTPFailure when there is no answer."""
    conn = ep.connection(timeout)
    try:
        conn.request("GET", ep.prefix + path, headers=ep.headers())
        r = conn.getresponse()
        return r.status, r.read()
    except Exception as e:  # noqa: BLE001 -- every transport failure becomes a counted kind
        raise _classify(e) from None
    finally:
        conn.close()


def json_object(body: bytes) -> dict | None:
    """The JSON object a body holds, or None."""
    try:
        d = json.loads(body)
    except ValueError:
        return None
    return d if isinstance(d, dict) else None


def get_json(ep: Endpoint, path: str, timeout: float = 10.0) -> dict | None:
    """The JSON object a GET answers with, or None for a non-200 or non-JSON answer."""
    status, body = get(ep, path, timeout)
    return json_object(body) if status == 200 else None


def post_json(ep: Endpoint, path: str, body: dict, timeout: float = 30.0) -> tuple[int, dict | None]:
    """(status, the JSON object answered or None) of a POST; HTTPFailure when there is no answer."""
    conn = ep.connection(timeout)
    try:
        conn.request("POST", ep.prefix + path, body=json.dumps(body).encode(), headers=ep.headers(body=True))
        r = conn.getresponse()
        raw = r.read()
    except Exception as e:  # noqa: BLE001
        raise _classify(e) from None
    finally:
        conn.close()
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
    cached_tokens: int | None
    server_timings: dict | None = None  # llama.cpp's own: prompt_ms, predicted_per_token_ms, ...


def stream_completion(ep: Endpoint, body: dict, timeout: float) -> Timed:
    """POST /v1/completions with stream=true; raise HTTPFailure for an HTTP error, a timeout (no byte
    for `timeout` seconds), or a stream that ends before its finish_reason and [DONE]."""
    payload = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode()
    conn = ep.connection(timeout)
    sent = time.perf_counter()
    chunks: list[float] = []
    finish = usage = timings = None
    try:
        conn.request("POST", ep.prefix + "/v1/completions", body=payload, headers=ep.headers(body=True))
        r = conn.getresponse()
        if r.status != 200:
            raise HTTPFailure(f"http_{r.status}", r.read(300).decode("utf-8", "replace").strip())
        finished = False
        while True:
            line = r.readline()
            if not line:
                break
            now = time.perf_counter()
            if now - sent > timeout:
                raise HTTPFailure("timeout", f"not finished in {timeout:g} s")
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                finished = True
                break
            ev = json.loads(data)
            if "error" in ev:
                raise HTTPFailure("server_error", json.dumps(ev["error"])[:200])
            for c in ev.get("choices") or []:
                # a token's chunk: text (empty while a character's bytes are incomplete); llama.cpp's closing
                # chunk carries only the finish reason
                if "text" in c and (c["text"] or not c.get("finish_reason")):
                    chunks.append(now)
                finish = c.get("finish_reason") or finish
            usage = ev.get("usage") or usage
            timings = ev.get("timings") or timings
        if not finished or finish is None:
            raise HTTPFailure("cut", f"stream ended after {len(chunks)} token(s) without "
                                     f"{'a finish reason' if finish is None else '[DONE]'}")
    except Exception as e:  # noqa: BLE001
        raise _classify(e) from None
    finally:
        conn.close()
    u = usage or {}
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
    return Timed(sent, chunks, time.perf_counter(), finish, u.get("prompt_tokens"), u.get("completion_tokens"),
                 cached, timings if isinstance(timings, dict) else None)
