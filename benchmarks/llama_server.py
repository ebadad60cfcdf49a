"""llama.cpp's server (llama-server) through the xllamacpp wheel, in this process, until it is killed.

    python benchmarks/llama_server.py MODEL.gguf --port 8080 [--slots 4] [--ctx-per-slot 4096] [--threads 2]

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
    a = ap.parse_args()
    import xllamacpp as xlc

    p = xlc.CommonParams()
    p.model.path = a.model
    p.hostnames = ["127.0.0.1"]
    p.port = a.port
    p.n_parallel = a.slots
    p.n_ctx = a.ctx_per_slot * a.slots  # llama-server splits the context evenly over its slots
    p.cont_batching = True
    p.endpoint_metrics = True
    p.endpoint_slots = True
    p.cpuparams.n_threads = a.threads
    p.cpuparams_batch.n_threads = a.threads
    server = xlc.Server(p)  # noqa: F841 -- it serves while referenced
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
