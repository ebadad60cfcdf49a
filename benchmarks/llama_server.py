"""llama.cpp's server (llama-server) through the xllamacpp wheel, in this process, until it is killed.

    python benchmarks/llama_server.py MODEL.gguf --port 8080 [--slots 4] [--ctx-per-slot 4096] [--threads 2]
        [--ctx-size N] [--cache-type-k q8_0] [--cache-type-v q8_0] [--verbosity 4] [--load-only]

--ctx-size gives the whole context (llama-server's -c) instead of --ctx-per-slot x --slots; --load-only
exits once the model is loaded (with --verbosity 4 its log on stderr holds the KV-cache and
recurrent-state sizes, which tests/test_engines.py compares with memory-report's).

Used by the tests (tests/test_serve.py) and by reports/serve to serve GGUFs that `granite convert`
writes. Continuous batching over --slots slots, /metrics and /slots on. Prints "ready" on stdout once
the model is loaded and the port is listening.
"""

from __future__ import annotations

import argparse
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
    print("ready", flush=True)
    if a.load_only:
        return
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
