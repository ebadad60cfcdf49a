"""What is sent to a server in one case and how: a case is (prompt tokens, concurrent sessions, output
tokens, requests per session). Closed loop: each session sends its next request when its previous one
has finished. Open loop (`rate`): sessions x requests arrive as a Poisson process at `rate` per second,
whatever is still running. Prompts are random token ids of exactly the requested length, each
request's own from its first token (a server answers a repeated prompt from its cache), unless
`shared_prefix` leading tokens are meant to be shared.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

from granite_cli.errors import InputError
from granite_cli.serve.http import HTTPFailure, stream_completion
from granite_cli.serve.metrics import Sampler
from granite_cli.serve.probe import GET_TIMEOUT, Server, text_prompt
from granite_cli.serve.stats import RequestLog, summarize

# Token ids valid in every vocabulary a server is likely to hold, for a server that does not say its size
FALLBACK_VOCAB = 256


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
    log = RequestLog()
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
