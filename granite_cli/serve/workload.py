"""What is sent to a server in one case and how.

A case is a prompt length (`ctx`), a concurrency, output tokens, and a request budget (a count, a
duration, or both: whichever ends first). Closed loop: `concurrency` sessions each send their next
request when the previous one has finished. Open loop (`rate`): requests arrive as a Poisson process
at `rate` per second whatever is still running, at most `concurrency` in flight (vLLM's
--max-concurrency; a request waiting for a slot is sent when one frees, and its TTFT counts from then).

A session may hold a multi-turn conversation (`turns`): each turn sends the whole history (every earlier
prompt and answer) and a new user message of `ctx` tokens, so the prompt grows turn by turn, and the
history is what a server's prefix cache can reuse. With `think_time` a session waits that long between
an answer and its next turn.

Prompts are random token ids of exactly the requested length by default (the server's /tokenize
builds text of that length where it takes no ids), drawn from `seed`: a fresh seed per run keeps a
server from answering a rerun from its cache. `lengths` draws each prompt's length around `ctx`
instead; `dataset` takes real user turns. In token-id mode a conversation's history carries the
answer as stand-in ids of the answer's length (a client sends text back, which the server tokenizes
anew, so an answer's own tokens are not what it reuses either way); in text and chat modes it carries
the answer's text.
"""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass

from granite_cli.errors import InputError
from granite_cli.serve.dataset import Dataset
from granite_cli.serve.http import HTTPFailure, stream_completion
from granite_cli.serve.metrics import Sampler
from granite_cli.serve.probe import GET_TIMEOUT, Server, count_tokens, text_prompt
from granite_cli.serve.stats import Request, RequestLog, Slo, run_intervals, summarize

# Token ids valid in every vocabulary a server is likely to hold, for a server that does not say its size
FALLBACK_VOCAB = 256
LENGTHS = ("exact", "uniform", "lognormal")
# lognormal lengths: this sigma of log-length, the mean at ctx, clipped to [1, LOGNORMAL_CAP x ctx]
LOGNORMAL_SIGMA, LOGNORMAL_CAP = 0.5, 4


@dataclass
class Workload:
    ctx: int
    concurrency: int                  # closed loop: sessions; open loop: the most requests in flight
    gen: int
    requests: int | None = None       # per run; None: until `duration` ends
    duration: float | None = None     # seconds of sending per run
    shared_prefix: int = 0
    rate: float | None = None         # open loop: requests per second
    turns: int = 1
    think_time: float = 0.0
    api: str = "completions"
    lengths: str = "exact"
    dataset: Dataset | None = None
    timeout: float = 600.0
    seed: int = 0

    @property
    def conversations(self) -> int | None:
        return None if self.requests is None else math.ceil(self.requests / self.turns)


def _length(w: Workload, rng: random.Random) -> int:
    if w.lengths == "uniform":
        return rng.randint(max(1, w.ctx // 2), max(1, w.ctx * 3 // 2))
    if w.lengths == "lognormal":
        mu = math.log(w.ctx) - LOGNORMAL_SIGMA ** 2 / 2  # the mean of the lognormal is then ctx
        return max(1, min(LOGNORMAL_CAP * w.ctx, round(rng.lognormvariate(mu, LOGNORMAL_SIGMA))))
    return w.ctx


def text_prompts(server: Server, w: Workload) -> bool:
    """Whether the case sends text: chat, a dataset, or a server that takes no token ids."""
    return w.api == "chat" or w.dataset is not None or server.prompt_mode == "text"


class Prompts:
    """The user message of each (conversation, turn), built once and the same whatever thread asks first:
    token ids, or text where the server takes no ids, the API is chat, or the prompts come from a dataset."""

    def __init__(self, server: Server, w: Workload, salt: str) -> None:
        self.server, self.w, self.salt = server, w, salt
        self.text = text_prompts(server, w)
        self.vocab = server.n_vocab or FALLBACK_VOCAB
        self._cache: dict[tuple[int, int], list[int] | str] = {}
        self._lock = threading.Lock()
        self._order: list[int] | None = None
        if w.dataset:
            self._shuffled = list(range(len(w.dataset.conversations)))
            random.Random(f"{w.seed}/{salt}/dataset").shuffle(self._shuffled)
            self._order, self._scanned = [], 0
            if self._fitting(0) is None:
                raise InputError(f"--dataset {w.dataset.name}: no conversation's first prompt fits in {w.ctx} "
                                 "tokens; give a larger --ctx")
        prefix_rng = random.Random(f"{w.seed}/{salt}/prefix")
        if not w.shared_prefix:
            self.prefix: list[int] | str = "" if self.text else []
        elif self.text:
            self.prefix = text_prompt(server, w.shared_prefix, prefix_rng) + " "
        else:
            self.prefix = [prefix_rng.randrange(self.vocab) for _ in range(w.shared_prefix)]

    def _fitting(self, conv: int) -> int | None:
        """The dataset conversation that workload conversation `conv` sends: the conv-th, in a seeded order,
        of those whose first turn fits in ctx tokens (the server's count where it has /tokenize, else a
        quarter of the characters), wrapping around once the file is exhausted; None when none fits.
        Found lazily: a 100k-row file under --duration costs a /tokenize call per conversation sent, not
        one per row before the first request."""
        order, convs = self._order, self.w.dataset.conversations
        while len(order) <= conv and self._scanned < len(self._shuffled):
            i = self._shuffled[self._scanned]
            self._scanned += 1
            first = convs[i][0]
            if (count_tokens(self.server, first) or math.ceil(len(first) / 4)) <= self.w.ctx:
                order.append(i)
        if not order:
            return None
        return order[conv % len(order)]

    def message(self, conv: int, turn: int) -> list[int] | str:
        key = (conv, turn)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        rng = random.Random(f"{self.w.seed}/{self.salt}/{conv}/{turn}")
        if self._order is not None:
            with self._lock:  # the scan is shared: every thread sees one order
                pick = self._fitting(conv)
            turns = self.w.dataset.conversations[pick]
            msg: list[int] | str = turns[(turn - 1) % len(turns)]
        else:
            n = _length(self.w, rng) - (self.w.shared_prefix if turn == 1 else 0)
            if self.text:
                msg = text_prompt(self.server, max(1, n), rng)
            else:
                msg = [rng.randrange(self.vocab) for _ in range(max(1, n))]
            if turn == 1 and self.w.shared_prefix:
                msg = self.prefix + msg
        with self._lock:
            self._cache.setdefault(key, msg)
        return msg

    def stand_in(self, conv: int, turn: int, n: int) -> list[int]:
        """Token ids standing in for an answer of n tokens in a token-id history."""
        rng = random.Random(f"{self.w.seed}/{self.salt}/{conv}/{turn}/answer")
        return [rng.randrange(self.vocab) for _ in range(n)]


class Conversation:
    """One session's history: what the next turn sends, and how many of its tokens an earlier request sent
    identically (the previous turn's whole prompt)."""

    def __init__(self, prompts: Prompts, conv: int) -> None:
        self.p, self.conv = prompts, conv
        self.messages: list[dict] = []       # chat
        self.ids: list[int] = []             # completions with token ids
        self.text = ""                       # completions with text
        self.prev_prompt_tokens: int | None = 0

    def request(self, turn: int) -> tuple[dict, int | None]:
        msg = self.p.message(self.conv, turn)
        if self.p.w.api == "chat":
            body: dict = {"messages": self.messages + [{"role": "user", "content": msg}]}
        elif self.p.text:
            body = {"prompt": (self.text + "\n" + msg) if self.text else msg}
        else:
            body = {"prompt": self.ids + msg}
        if turn == 1:  # a shared prefix is reusable from the second conversation on (the first computes it)
            return body, self.p.w.shared_prefix if self.conv > 0 else 0
        return body, self.prev_prompt_tokens

    def answered(self, turn: int, body: dict, t) -> None:
        """Extend the history with the turn's prompt and its answer."""
        if self.p.w.api == "chat":
            self.messages = body["messages"] + [{"role": "assistant", "content": t.text}]
            self.prev_prompt_tokens = t.prompt_tokens
        elif self.p.text:
            self.text = body["prompt"] + t.text
            self.prev_prompt_tokens = t.prompt_tokens
        else:
            self.ids = body["prompt"] + self.p.stand_in(self.conv, turn, t.output_tokens)
            self.prev_prompt_tokens = len(body["prompt"])


class _Budget:
    """Which conversation a session starts next, until the count or the duration runs out."""

    def __init__(self, w: Workload, t0: float) -> None:
        self.left, self.deadline = w.conversations, (t0 + w.duration) if w.duration else None
        self.next = 0
        self.lock = threading.Lock()

    def open(self) -> bool:
        return self.deadline is None or time.perf_counter() < self.deadline

    def take(self) -> int | None:
        with self.lock:
            if (self.left is not None and self.next >= self.left) or not self.open():
                return None
            self.next += 1
            return self.next - 1


def prebuild(prompts: Prompts, w: Workload) -> None:
    """Build the messages before the clock starts where their number is known (text prompts cost the
    server's /tokenize calls, which must not pace a closed loop)."""
    if w.conversations is not None:
        for c in range(w.conversations):
            for t in range(1, w.turns + 1):
                prompts.message(c, t)


def run(server: Server, w: Workload, run_index: int, log: RequestLog) -> tuple[float, float]:
    """Send one run of the case's requests into `log` (open loop: their arrival times into log.arrivals);
    returns (t0, wall seconds from t0 to the last answer)."""
    # Every case and run its own prompts: a server must not find one case's prompts cached from another's.
    prompts = Prompts(server, w, f"{server.name}/{w.ctx}/{w.concurrency}/{w.rate}/{w.turns}/{w.api}/{run_index}")
    prebuild(prompts, w)
    # Sampled, not greedy: a random-weight model's greedy output tends to repeat one token, and a server
    # streams no chunk while a repeated byte token leaves its text incomplete UTF-8. Seeded per request.
    base = {"model": server.served_model, "max_tokens": w.gen, "min_tokens": w.gen, "ignore_eos": True,
            "temperature": 1.0}
    counter = iter(range(10**9))
    counter_lock = threading.Lock()

    def send(session: int, conv: Conversation, turn: int) -> object:
        body, reusable = conv.request(turn)
        with counter_lock:
            idx = next(counter)
        c0 = time.thread_time()
        req = {**base, **body, "seed": (w.seed * 7919 + run_index * 10**6 + idx) % (2**31)}
        t = e = None
        try:
            t = stream_completion(server.endpoint, req, w.timeout, w.api)
        except HTTPFailure as err:
            e = err
        except Exception as err:  # noqa: BLE001 -- a worker never dies with a traceback; the row names it
            e = HTTPFailure("client_error", f"{type(err).__name__}: {err}")
        log.add(Request(idx, session, conv.conv, turn, run_index, reusable, t, e, time.thread_time() - c0))
        if t is not None:
            conv.answered(turn, body, t)
        return t

    t0 = time.perf_counter()
    budget = _Budget(w, t0)
    if w.rate:
        threads = _open_loop(w, run_index, budget, prompts, send, log.arrivals)
    else:
        def session(i: int) -> None:
            while (c := budget.take()) is not None:
                conv = Conversation(prompts, c)
                for turn in range(1, w.turns + 1):
                    if turn > 1 and not budget.open():
                        return
                    if send(i, conv, turn) is None:
                        break  # a failed turn ends its conversation: the next would resend a broken history
                    if w.think_time and turn < w.turns:
                        time.sleep(w.think_time)

        threads = [threading.Thread(target=session, args=(i,), daemon=True) for i in range(w.concurrency)]
        for th in threads:
            th.start()
    for th in threads:
        th.join()
    ends = [r.timed.done for r in log.records if r.run == run_index and r.timed is not None]
    return t0, (max(ends) - t0) if ends else 0.0


def _open_loop(w: Workload, run_index: int, budget: _Budget, prompts: Prompts, send,
               arrivals: list[float]) -> list[threading.Thread]:
    """Poisson arrivals at w.rate, each a one-turn conversation, at most w.concurrency in flight."""
    gaps = random.Random(f"{w.seed}/{run_index}/arrivals").expovariate
    slots = threading.Semaphore(w.concurrency)
    threads = []

    def one(c: int) -> None:
        with slots:
            send(0, Conversation(prompts, c), 1)

    while (c := budget.take()) is not None:
        arrivals.append(time.perf_counter())
        threads.append(threading.Thread(target=one, args=(c,), daemon=True))
        threads[-1].start()
        time.sleep(gaps(w.rate))
    return threads


@dataclass
class CaseResult:
    """A case's row fields, and its requests (for --requests-out) with each run's start."""

    fields: dict
    log: RequestLog
    starts: dict[int, float]


def run_case(server: Server, w: Workload, runs: int = 1, slo: Slo | None = None, meter=None) -> CaseResult:
    """Run the case `runs` times (fresh prompts each) and return its row fields: latency distributions,
    throughput, errors by kind, prompt reuse, SLO attainment, the server's own metrics, the GPU's energy
    where `meter` reads it (an object with start() and stop() -> fields), and the client's own cost."""
    log, walls, starts, per_run = RequestLog(), [], {}, []
    sampler = Sampler(server.endpoint, timeout=min(GET_TIMEOUT / 2, w.timeout)).start()
    meter = meter.start() if meter is not None else None
    for k in range(runs):
        one = RequestLog()
        starts[k], wall = run(server, w, k, one)
        walls.append(wall)
        log.records += one.records
        log.arrivals += one.arrivals
        if runs > 1:
            per_run.append(summarize(one, w, [wall]))
    last = max([t for t in starts.values()] + [r.timed.done for r in log.records if r.timed is not None])
    fields = summarize(log, w, walls, slo)
    fields.update(run_intervals(per_run))
    fields["client_row_ms"] = (time.perf_counter() - last) * 1e3
    fields.update(sampler.stop())
    if meter is not None:
        fields.update(meter.stop())
        prompt = sum(r.timed.prompt_tokens or 0 for r in log.records if r.timed is not None)
        fields.update(per_token(fields, prompt, fields["output_tokens"]))
    if not text_prompts(server, w):
        vocab = server.n_vocab or FALLBACK_VOCAB
        fields["token_ids_from"] = f"0..{vocab - 1}" + ("" if server.n_vocab else " (the server does not say its size)")
    return CaseResult(fields, log, starts)


def per_token(fields: dict, prompt_tokens: int | None, output_tokens: int | None) -> dict:
    """Joules per prompt token and per output token: the case's whole energy over each count (a server
    does both at once, so neither is the other's share)."""
    e = fields.get("energy_j")
    return {"j_per_prompt_token": e / prompt_tokens if e is not None and prompt_tokens else None,
            "j_per_output_token": e / output_tokens if e is not None and output_tokens else None}
