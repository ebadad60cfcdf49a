"""A small OpenAI-compatible server that misbehaves on purpose, for the fault cases of
`granite bench --endpoint`: HTTP 500s, streams cut mid-way, answers slower than the timeout, and a
server that stops after a number of requests. It also plays the parts a test needs a server to play
exactly: a prefix cache with the usage and the /metrics counters of vLLM or SGLang, prefill time per
uncached prompt token, a chat endpoint, one request at a time. The happy path is tested against
llama.cpp's real server (tests/test_serve.py), never this."""

from __future__ import annotations

import contextlib
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
            model = {"id": "fake-model", "owned_by": "fake"}
            if fake.max_model_len:
                model["max_model_len"] = fake.max_model_len
            self._send(200, {"object": "list", "data": [model]})
        elif self.path == "/metrics" and fake.metrics:
            b = fake.metrics_text().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(b)))
            self.end_headers()
            self.wfile.write(b)
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):
        fake = self.server.fake
        fake.auth.add(self.headers.get("Authorization"))
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n))
        chat = self.path == "/v1/chat/completions"
        if chat and not fake.chat:
            return self._send(404, {"error": {"message": "no chat template"}})
        fake.paths.append(self.path)
        prompt = body.get("prompt")
        if chat:  # the "template": each message's words, with two words of role markup
            prompt = " ".join(f"<{m['role']}> {m['content']}" for m in body["messages"]) + " <assistant>"
            fake.bodies.append(body)
        if self.path == "/tokenize":
            return self._send(200, {"tokens": list(range(len(body["content"].split())))})
        if fake.text_only and isinstance(prompt, list):
            return self._send(400, {"error": {"message": "prompt must be a string"}})
        tokens = prompt.split() if isinstance(prompt, str) else list(prompt)
        n_prompt = len(tokens)
        if not body.get("stream"):  # the probe's one-token completion; not counted as a request
            return self._send(200, {"choices": [{"text": "x", "finish_reason": "length"}],
                                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": 1}})
        with fake.lock:
            k = fake.count
            fake.count += 1
        with fake.busy:  # one request at a time where the fake is so made
            return self._stream(fake, k, body, chat, tokens)

    def _stream(self, fake, k, body, chat, tokens):
        n_prompt = len(tokens)
        cached = fake.lookup(tokens)
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
        time.sleep(fake.prefill_s * (n_prompt - (cached or 0)))
        gen = body.get("max_tokens", 4)
        for i in range(gen):
            if mode == "cut" and i == gen // 2:
                self.close_connection = True
                return
            if i:
                time.sleep(fake.token_s)
            last = i == gen - 1
            choice = {"delta": {"content": "x"}} if chat else {"text": "x"}
            ev = {"choices": [{**choice, "index": 0, "finish_reason": "length" if last else None}]}
            if last:
                ev["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": gen}
                if cached is not None:
                    ev["usage"]["prompt_tokens_details"] = {"cached_tokens": cached}
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
                 text_only: bool = False, cache: bool = False, metrics: str | None = None, chat: bool = True,
                 prefill_s: float = 0.0, token_s: float = 0.0, serial: bool = False,
                 max_model_len: int | None = None) -> None:
        """text_only: refuse token-id prompts (HTTP 400); /tokenize counts one token per word. cache: a prefix
        cache (usage reports cached_tokens: the longest prefix shared with an earlier prompt); metrics
        "vllm" or "sglang": /metrics with that engine's prefix-cache counters; prefill_s per uncached
        prompt token and token_s per output token after the first; serial: one request at a time."""
        self.mode, self.stop_after, self.slow_s, self.text_only = mode, stop_after, slow_s, text_only
        self.cache, self.metrics, self.chat, self.prefill_s, self.token_s = cache, metrics, chat, prefill_s, token_s
        self.max_model_len = max_model_len
        self.seen: list[list] = []
        self.hits = self.queries = 0
        self.paths: list[str] = []
        self.bodies: list[dict] = []
        self.busy = threading.Lock() if serial else contextlib.nullcontext()
        self.count = 0
        self.auth: set[str | None] = set()  # the Authorization headers requests carried
        self.lock = threading.Lock()
        self.httpd = _Quiet(("127.0.0.1", 0), _Handler)
        self.httpd.fake = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def lookup(self, tokens: list) -> int | None:
        """With a cache: the longest prefix of `tokens` an earlier prompt had (then remembered); else None."""
        if not self.cache:
            return None
        with self.lock:
            best = 0
            for old in self.seen:
                n = 0
                for a, b in zip(old, tokens):
                    if a != b:
                        break
                    n += 1
                best = max(best, n)
            self.seen.append(list(tokens))
            self.hits += best
            self.queries += len(tokens)
        return best

    def metrics_text(self) -> str:
        if self.metrics == "vllm":
            return (f'vllm:prefix_cache_queries_total{{model_name="m",engine="0"}} {self.queries}.0\n'
                    f'vllm:prefix_cache_hits_total{{model_name="m",engine="0"}} {self.hits}.0\n'
                    f'vllm:num_requests_running{{model_name="m"}} 0\n')
        return (f'sglang:prompt_tokens_total{{model_name="m"}} {self.queries}.0\n'
                f'sglang:cached_tokens_total{{model_name="m",cache_source="device"}} {self.hits}.0\n'
                f'sglang:cached_tokens_total{{model_name="m",cache_source="host"}} 0.0\n')

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
