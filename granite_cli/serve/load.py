"""What is sent to a server and what a case measures.

A case is (prompt tokens, concurrent sessions, output tokens, requests per session). Closed loop: each
session sends its next request when its previous one has finished. Open loop (`rate`): sessions x
requests arrive as a Poisson process at `rate` per second, whatever is still running. Prompts are
random token ids of exactly the requested length, each request's own from its first token (a server
answers a repeated prompt from its cache), unless `shared_prefix` leading tokens are meant to be shared.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from granite_cli.errors import GraniteError, InputError
from granite_cli.redact import printable
from granite_cli.serve.http import (
    Endpoint,
    HTTPFailure,
    Timed,
    get,
    get_json,
    json_object,
    post_json,
    stream_completion,
)
from granite_cli.serve.metrics import Sampler

# Token ids valid in every vocabulary a server is likely to hold, for a server that does not say its size
FALLBACK_VOCAB = 256


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


def probe(ep: Endpoint, timeout: float = 600.0) -> Server:
    """Ask the server what it serves; any failure here is the user's URL or server, one line, exit 2.
    `timeout` is the request timeout: the one-token completion may take that long, each GET at most
    GET_TIMEOUT seconds."""
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
    s.prompt_mode = _prompt_mode(s, timeout)
    return s


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


@dataclass
class Workload:
    ctx: int
    concurrency: int
    gen: int
    reps: int = 1                    # requests per session (closed loop)
    shared_prefix: int = 0
    rate: float | None = None        # open loop: requests per second
    timeout: float = 600.0
    seed: int = 0

    @property
    def requests(self) -> int:
        return self.concurrency * self.reps


def prompts(w: Workload, vocab: int, salt: str) -> list[list[int]]:
    """One prompt per request, `w.ctx` token ids each; the first `w.shared_prefix` shared by all."""
    if w.shared_prefix > w.ctx:
        raise InputError(f"--shared-prefix {w.shared_prefix} is longer than the prompt ({w.ctx} tokens)")
    rng = random.Random(f"{w.seed}/{salt}/{w.ctx}/{w.concurrency}")
    prefix = [rng.randrange(vocab) for _ in range(w.shared_prefix)]
    return [prefix + [rng.randrange(vocab) for _ in range(w.ctx - w.shared_prefix)] for _ in range(w.requests)]


@dataclass
class _Log:
    done: list[Timed] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    first_error: str | None = None
    cpu_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, t: Timed | None, e: HTTPFailure | None, cpu: float) -> None:
        with self.lock:
            self.cpu_s += cpu
            if t is not None:
                self.done.append(t)
            else:
                self.errors[e.kind] = self.errors.get(e.kind, 0) + 1
                self.first_error = self.first_error or str(e)[:200]


def run_case(server: Server, w: Workload) -> dict:
    """Send the case's requests and return its row fields: latency percentiles, throughput, errors by
    kind, the server's own metrics, and the client's own cost."""
    vocab = server.n_vocab or FALLBACK_VOCAB
    if server.prompt_mode == "text":
        rng = random.Random(f"{w.seed}/{server.name}/{w.ctx}/{w.concurrency}")
        shared = text_prompt(server, w.shared_prefix, rng) + " " if w.shared_prefix else ""
        ps = [shared + text_prompt(server, w.ctx - w.shared_prefix, rng) for _ in range(w.requests)]
    else:
        ps = prompts(w, vocab, server.name)
    # Sampled, not greedy: a random-weight model's greedy output tends to repeat one token, and a server
    # streams no chunk while a repeated byte token leaves its text incomplete UTF-8. Seeded per request.
    body = {"model": server.served_model, "max_tokens": w.gen, "min_tokens": w.gen, "ignore_eos": True,
            "temperature": 1.0}
    log = _Log()
    seeds = iter(range(10**6))

    def one(prompt: list[int] | str) -> None:
        c0 = time.thread_time()
        req = {**body, "prompt": prompt, "seed": w.seed * 10**6 + next(seeds)}
        try:
            t, e = stream_completion(server.endpoint, req, w.timeout), None
        except HTTPFailure as err:
            t, e = None, err
        except Exception as err:  # noqa: BLE001 -- a worker never dies with a traceback; the row names it
            t, e = None, HTTPFailure("client_error", f"{type(err).__name__}: {err}")
        log.add(t, e, time.thread_time() - c0)

    def session(mine: list) -> None:
        for p in mine:
            one(p)

    sampler = Sampler(server.endpoint, timeout=min(GET_TIMEOUT / 2, w.timeout)).start()
    t0 = time.perf_counter()
    if w.rate:
        gaps = random.Random(f"{w.seed}/arrivals").expovariate
        threads = []
        for p in ps:
            threads.append(threading.Thread(target=one, args=(p,), daemon=True))
            threads[-1].start()
            time.sleep(gaps(w.rate))
    else:
        threads = [threading.Thread(target=session, args=(ps[i:: w.concurrency],), daemon=True)
                   for i in range(w.concurrency)]
        for t in threads:
            t.start()
    for t in threads:
        t.join()
    row = summarize(log, w, t0)
    row["client_row_ms"] = (time.perf_counter() - max([t0] + [d.done for d in log.done])) * 1e3
    row.update(sampler.stop())
    if server.prompt_mode == "token_ids":
        row["token_ids_from"] = f"0..{vocab - 1}" + ("" if server.n_vocab else " (the server does not say its size)")
    return row


def _pct(xs: list[float], name: str) -> dict:
    if not xs:
        return {f"{name}_p50": None, f"{name}_p90": None, f"{name}_p99": None}
    a = np.asarray(xs) * 1e3
    return {f"{name}_p50": float(np.percentile(a, 50)), f"{name}_p90": float(np.percentile(a, 90)),
            f"{name}_p99": float(np.percentile(a, 99))}


def summarize(log: _Log, w: Workload, t0: float) -> dict:
    ok = [d for d in log.done if d.chunks]
    ends = [d.done for d in log.done]
    wall = (max(ends) - t0) if ends else None
    ttft = [d.chunks[0] - d.sent for d in ok]
    itl = [b - a for d in ok for a, b in zip(d.chunks, d.chunks[1:])]
    tpot = [(d.chunks[-1] - d.chunks[0]) / (n - 1) for d in ok if (n := d.completion_tokens or len(d.chunks)) > 1]
    out_tokens = sum(d.completion_tokens or len(d.chunks) for d in log.done)
    prompt_tokens = [d.prompt_tokens for d in log.done if d.prompt_tokens is not None]
    spans = sorted([(d.sent, 1) for d in log.done] + [(d.done, -1) for d in log.done], key=lambda x: (x[0], x[1]))
    live = peak = 0
    for _, step in spans:
        live += step
        peak = max(peak, live)
    n_err = sum(log.errors.values())
    row = {
        "requests": w.requests, "requests_ok": len(log.done), "errors": dict(log.errors) or None,
        "error": (f"{n_err} of {w.requests} request(s) failed: {log.first_error}" if n_err else None),
        "status": "ok" if log.done else "error", "wall_s": wall,
        "prompt_tokens_measured": (min(prompt_tokens), max(prompt_tokens)) if prompt_tokens else None,
        "prompt_tokens_exact": (all(p == w.ctx for p in prompt_tokens) if prompt_tokens else None),
        "output_tokens": out_tokens,
        "output_tokens_min": min((d.completion_tokens or len(d.chunks) for d in log.done), default=None),
        "cached_prompt_tokens": sum(d.cached_tokens or 0 for d in log.done) if log.done else None,
        **_pct(ttft, "ttft_ms"), **_pct(itl, "itl_ms"), **_pct(tpot, "tpot_ms"),
        **_pct([d.done - d.sent for d in log.done], "e2e_ms"),
        "output_tokens_per_s": out_tokens / wall if wall else None,
        "total_tokens_per_s": (out_tokens + sum(prompt_tokens or [w.ctx * len(log.done)])) / wall if wall else None,
        "requests_per_s": len(log.done) / wall if wall else None,
        "max_in_flight": peak,
        # tokens the server streamed no chunk of their own for (empty text, or a character's bytes not yet
        # complete): ITL is then over chunks, and a first token without text delays the measured TTFT
        "tokens_without_chunk": sum(max(0, (d.completion_tokens or 0) - len(d.chunks)) for d in log.done),
        **_server_timings(log.done),
        "client_cpu_ms_per_request": log.cpu_s / max(1, w.requests) * 1e3,
        "rate_rps": w.rate, "shared_prefix": w.shared_prefix or None,
    }
    row["tokens_per_s"] = row["output_tokens_per_s"]
    row["median_s"] = row["ttft_ms_p50"] / 1e3 if row["ttft_ms_p50"] is not None else None
    row["latency_ms"] = row["tpot_ms_p50"]
    return row


def _server_timings(done: list[Timed]) -> dict:
    """llama.cpp's own timings, where it reports them: its prompt processing and per-token decode time,
    the engine-side counterparts of TTFT and TPOT (the difference is the HTTP path and the client)."""
    ts = [d.server_timings for d in done if d.server_timings]  # finite, non-negative numbers (serve.http)
    return {**_pct([t["prompt_ms"] / 1e3 for t in ts if "prompt_ms" in t], "server_prompt_ms"),
            **_pct([t["predicted_per_token_ms"] / 1e3 for t in ts if "predicted_per_token_ms" in t],
                   "server_tpot_ms")}


class ServerGone(GraniteError):
    """The server stopped answering mid-sweep (exit 1); the finished rows are kept."""


def still_there(server: Server, timeout: float = GET_TIMEOUT) -> bool:
    try:
        get(server.endpoint, "/v1/models", min(GET_TIMEOUT, timeout))
        return True
    except HTTPFailure as e:
        return e.kind not in _UNREACHABLE
