"""reports/serve: cpu-hybrid against cpu-dense served by llama.cpp's server on this CPU, beside the same
sweep run in-process by granite's own core.

    python benchmarks/serve_cpu.py [--out reports/serve] [--ctx 512-8k*2] [--batch 1,2,4] [--gen 32]
        [--requests N] [--turns N]

1. `granite convert --from-profile` writes both models as GGUFs (random weights at the real shapes,
   with the synthetic vocabulary that makes them servable);
2. two llama.cpp servers (benchmarks/llama_server.py, 4 slots each) start on free ports; the sweep
   runs them one after the other, so only one computes at a time;
3. `granite bench --endpoint cpu-hybrid=URL --endpoint cpu-dense=URL` writes OUT/endpoints/;
4. the servers stop, and `granite bench -m cpu-hybrid -m cpu-dense` over the same contexts and batches
   writes OUT/in-process/ (batch = sequences in one forward there, concurrent sessions here).

With --turns N only the servers run, as N-turn sessions, into OUT/multi-turn/.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from granite_cli.sizes import parse_list

HERE = Path(__file__).resolve().parent


def granite(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "granite_cli", *args], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(gguf: Path, slots: int, ctx_per_slot: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    p = subprocess.Popen([sys.executable, str(HERE / "llama_server.py"), str(gguf), "--port", str(port), "--slots",
                          str(slots), "--ctx-per-slot", str(ctx_per_slot), "--threads", str(threads)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return p, url
        except OSError:
            time.sleep(0.2)
    p.kill()
    raise SystemExit(f"llama.cpp's server for {gguf} did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("reports/serve"))
    ap.add_argument("--ctx", default="512-8k*2")
    ap.add_argument("--batch", default="1,2,4")
    ap.add_argument("--gen", default="32")
    ap.add_argument("--requests", help="requests per server case (default: granite's)")
    ap.add_argument("--reps", default="1", help="timed repetitions of the in-process sweep")
    ap.add_argument("--turns", type=int, default=0,
                    help="instead: multi-turn sessions of this many turns, the servers only, into OUT/multi-turn")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="granite-serve-"))
    models = ("cpu-hybrid", "cpu-dense")
    for m in models:
        granite("convert", "--from-profile", m, str(work / f"{m}.gguf"), "-f", "json")
    top = max(parse_list(a.ctx, "context")) * max(1, a.turns)
    servers = [start(work / f"{m}.gguf", 4, top + int(a.gen) * max(1, a.turns) + 64, a.threads) for m in models]
    requests = ["--requests", a.requests] if a.requests else []
    turns = ["--turns", str(a.turns)] if a.turns else []
    try:
        granite("bench", *[f"--endpoint={m}={url}" for m, (_, url) in zip(models, servers)], "--ctx", a.ctx,
                "--batch", a.batch, "--gen", a.gen, *requests, *turns, "--warmup", "1", "--out",
                str(a.out / ("multi-turn" if a.turns else "endpoints")), "-f", "md")
    finally:
        for p, _ in servers:
            p.kill()
            p.wait()
    if not a.turns:
        granite("bench", "-m", models[0], "-m", models[1], "--ctx", a.ctx, "--batch", a.batch, "--gen", a.gen,
                "--reps", a.reps, "--warmup", "0", "--out", str(a.out / "in-process"), "-f", "md")


if __name__ == "__main__":
    main()
