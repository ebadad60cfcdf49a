"""A small OpenAI-compatible server that misbehaves on purpose, for the fault cases of
`granite bench --endpoint`: HTTP 500s, streams cut mid-way, answers slower than the timeout, and a
server that stops after a number of requests. The happy path is tested against llama.cpp's real
server (tests/test_serve.py), never this."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _send(self, code, obj):
        b = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)

    def do_GET(self):
        fake = self.server.fake
        fake.auth.add(self.headers.get("Authorization"))
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "fake-model", "owned_by": "fake"}]})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):
        fake = self.server.fake
        fake.auth.add(self.headers.get("Authorization"))
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n))
        prompt = body.get("prompt")
        if self.path == "/tokenize" and fake.text_only:
            return self._send(200, {"tokens": list(range(len(body["content"].split())))})
        if fake.text_only and isinstance(prompt, list):
            return self._send(400, {"error": {"message": "prompt must be a string"}})
        n_prompt = len(prompt.split()) if isinstance(prompt, str) else len(prompt)
        if not body.get("stream"):  # the probe's one-token completion; not counted as a request
            return self._send(200, {"choices": [{"text": "x", "finish_reason": "length"}],
                                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": 1}})
        with fake.lock:
            k = fake.count
            fake.count += 1
        if fake.stop_after is not None and k >= fake.stop_after:
            threading.Thread(target=fake.stop, daemon=True).start()
            self.close_connection = True
            return
        mode = fake.mode(k)
        if mode == "500":
            return self._send(500, {"error": {"message": "injected failure"}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if mode == "slow":
            time.sleep(fake.slow_s)
        gen = body.get("max_tokens", 4)
        for i in range(gen):
            if mode == "cut" and i == gen // 2:
                self.close_connection = True
                return
            last = i == gen - 1
            ev = {"choices": [{"text": "x", "index": 0, "finish_reason": "length" if last else None}]}
            if last:
                ev["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": gen}
            self.wfile.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that timed out or was interrupted closes mid-stream, which is the point


class FakeServer:
    """mode(n) → what request n (from 0) gets: "ok", "500", "cut", "slow"; `stop_after` requests, the
    server closes its socket (as a crashed server)."""

    def __init__(self, mode=lambda n: "ok", stop_after: int | None = None, slow_s: float = 3.0,
                 text_only: bool = False) -> None:
        """text_only: refuse token-id prompts (HTTP 400) and offer /tokenize, one token per word."""
        self.mode, self.stop_after, self.slow_s, self.text_only = mode, stop_after, slow_s, text_only
        self.count = 0
        self.auth: set[str | None] = set()  # the Authorization headers requests carried
        self.lock = threading.Lock()
        self.httpd = _Quiet(("127.0.0.1", 0), _Handler)
        self.httpd.fake = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
