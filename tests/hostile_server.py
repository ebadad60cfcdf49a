"""An OpenAI-compatible server that answers any path with whatever a test tells it to: wrong JSON
types, deep nesting, huge bodies, bytes dripped with no newline, the request's own Authorization
header quoted back. Every route defaults to a well-behaved answer, so a test overrides only the one it
attacks. Used by tests/test_hostile.py."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Route = Callable[["Handler", dict], None]


def send_json(h: "Handler", obj, code: int = 200) -> None:
    b = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    h.send_response(code)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(b)))
    h.end_headers()
    h.wfile.write(b)


def send_events(h: "Handler", events: list, done: bool = True) -> None:
    """A server-sent event stream: each event a dict (JSON-encoded) or raw bytes after `data: `."""
    h.send_response(200)
    h.send_header("Content-Type", "text/event-stream")
    h.end_headers()
    for ev in events:
        h.wfile.write(b"data: " + (ev if isinstance(ev, bytes) else json.dumps(ev).encode()) + b"\n\n")
        h.wfile.flush()
    if done:
        h.wfile.write(b"data: [DONE]\n\n")
    h.close_connection = True


def drip(h: "Handler", every: float = 0.2, payload: bytes = b"x", stop: threading.Event | None = None) -> None:
    """Headers, then one byte every `every` seconds and never a newline, until the client goes away."""
    h.send_response(200)
    h.send_header("Content-Type", "text/event-stream")
    h.end_headers()
    h.wfile.flush()
    try:
        for _ in range(10_000):
            if stop is not None and stop.is_set():
                break
            h.wfile.write(payload)
            h.wfile.flush()
            time.sleep(every)
    except OSError:
        pass
    h.close_connection = True


def good_tokens(h: "Handler", body: dict) -> list[dict]:
    """The events of a well-behaved completion of body's max_tokens tokens."""
    n = body.get("max_tokens") or 4
    prompt = body.get("prompt")
    n_prompt = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
    evs = [{"choices": [{"text": "x", "index": 0, "finish_reason": None}]} for _ in range(n - 1)]
    evs.append({"choices": [{"text": "x", "index": 0, "finish_reason": "length"}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n}})
    return evs


def _models(h, body):
    send_json(h, {"object": "list", "data": [{"id": "hostile-model", "owned_by": "hostile"}]})


def _completions(h, body):
    if not body.get("stream"):  # the probe's one-token completion
        return send_json(h, {"choices": [{"text": "x", "finish_reason": "length"}],
                             "usage": {"prompt_tokens": 4, "completion_tokens": 1}})
    send_events(h, good_tokens(h, body))


def _not_found(h, body):
    send_json(h, {"error": "not found"}, 404)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _route(self, body: dict) -> None:
        srv = self.server.hostile
        srv.auth.add(self.headers.get("Authorization"))
        path = self.path.split("?")[0]
        fn = srv.routes.get(path) or {"/v1/models": _models, "/v1/completions": _completions}.get(path, _not_found)
        try:
            fn(self, body)
        except OSError:
            pass  # the client gave up (a timeout), which is the point

    def do_GET(self):
        self._route({})

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        self._route(body if isinstance(body, dict) else {})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass


class HostileServer:
    """routes: path → fn(handler, request body); unlisted paths behave (or answer 404)."""

    def __init__(self, routes: dict[str, Route] | None = None) -> None:
        self.routes = dict(routes or {})
        self.auth: set[str | None] = set()
        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.hostile = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
