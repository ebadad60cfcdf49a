"""llama.cpp's server (llama-server) through the xllamacpp wheel, in this process, until it is killed.

    python benchmarks/llama_server.py MODEL.gguf --port 8080 [--slots 4] [--ctx-per-slot 4096] [--threads 2]
        [--ctx-size N] [--cache-type-k q8_0] [--cache-type-v q8_0] [--verbosity 4] [--load-only]

--ctx-size gives the whole context (llama-server's -c) instead of --ctx-per-slot x --slots; --load-only
exits once the server answers /health (with --verbosity 4 its log on stderr holds the KV-cache and
recurrent-state sizes, which tests/test_engines.py compares with memory-report's), without running
the server's destructor, which can wait forever for a main loop that has not started yet.

Used by the tests (tests/test_serve.py) and by reports/serve to serve GGUFs that `granite convert`
writes. Continuous batching over --slots slots, /metrics and /slots on. Prints "ready" on stdout once
the server answers /health (the model loaded, the port listening); exits 1 if it does not within 300 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--ctx-per-slot", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx-size", type=int)
    ap.add_argument("--cache-type-k")
    ap.add_argument("--cache-type-v")
    ap.add_argument("--verbosity", type=int)
    ap.add_argument("--load-only", action="store_true")
    a = ap.parse_args()
    import xllamacpp as xlc

    p = xlc.CommonParams()
    p.model.path = a.model
    p.hostnames = ["127.0.0.1"]
    p.port = a.port
    p.n_parallel = a.slots
    p.n_ctx = a.ctx_size or a.ctx_per_slot * a.slots  # llama-server splits the context evenly over its slots
    p.cont_batching = True
    p.endpoint_metrics = True
    p.endpoint_slots = True
    p.cpuparams.n_threads = a.threads
    p.cpuparams_batch.n_threads = a.threads
    for name, t in (("cache_type_k", a.cache_type_k), ("cache_type_v", a.cache_type_v)):
        if t:
            setattr(p, name, getattr(xlc.ggml_type, "GGML_TYPE_" + t.upper()))
    if a.verbosity is not None:
        p.verbosity = a.verbosity
    server = xlc.Server(p)  # noqa: F841 -- it serves while referenced
    if not _healthy(a.port, READY_WITHIN_S):
        _leave(1, f"llama.cpp's server did not answer /health within {READY_WITHIN_S} s")
    print("ready", flush=True)
    if a.load_only:
        # Leave without running the server's destructor: it can wait forever for a main loop that has
        # not started. The OS frees what the process holds.
        _leave(0)
    while True:
        time.sleep(3600)


READY_WITHIN_S = 300


def _healthy(port: int, within_s: float) -> bool:
    """Whether the server answers /health with 200 (model loaded, port listening) within `within_s`."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    return False


def _leave(code: int, why: str | None = None) -> None:
    if why:
        print(why, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
