"""One server case measured by granite and by NVIDIA's AIPerf, alternately, against the same llama.cpp
server: what each reports for TTFT, TPOT (AIPerf's "inter_token_latency"), end to end and output
tokens/s, beside llama.cpp's own per-request timings, and what each client costs in CPU.

    python benchmarks/serve_peers.py --aiperf /path/to/venv/bin/aiperf [--model cpu-dense] [--ctx 512]
        [--gen 32] [--requests 16] [--rounds 2] [--out reports/serve/peers]

AIPerf is installed in a separate environment (`python -m venv peers && peers/bin/pip install aiperf`); it
is never a dependency of granite. Both clients get the same workload: one session (concurrency 1),
prompts of exactly --ctx tokens (AIPerf's synthetic text, tokenized by the model folder's own
tokenizer, which the server also uses), --gen output tokens forced with ignore_eos and min_tokens,
server-reported token counts, a new connection per request; one untimed request warms the server before
either client runs. The server's own figures come from its /metrics counters around each run.
Writes OUT/peers.md and each run's raw output.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_cpu import granite, start  # noqa: E402


def _server_counters(url: str) -> dict[str, float]:
    from granite_cli.serve.metrics import parse

    with __import__("urllib.request").request.urlopen(url + "/metrics") as r:
        return parse(r.read().decode())


def _server_view(before: dict, after: dict, requests: int) -> dict:
    """llama.cpp's own account of the run from its /metrics counters: mean prompt time per request and
    time per generated token."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    toks = d.get("llamacpp:tokens_predicted_total") or 0
    return {"server prompt mean ms": d.get("llamacpp:prompt_seconds_total", 0.0) / requests * 1e3,
            "server per-token ms": d.get("llamacpp:tokens_predicted_seconds_total", 0.0) / toks * 1e3 if toks else None}


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_granite(url: str, a, out: Path) -> dict:
    c0, t0 = _cpu_children(), time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "granite_cli", "bench", "--endpoint", f"server={url}", "--ctx",
                        str(a.ctx), "--batch", "1", "--gen", str(a.gen), "--requests", str(a.requests), "--warmup", "0",
                        "--no-energy", "--requests-out", str(out.with_suffix(".requests.jsonl")), "-f", "json"],
                       capture_output=True, text=True, check=True)
    wall, cpu = time.perf_counter() - t0, _cpu_children() - c0
    out.write_text(p.stdout)
    r = json.loads(p.stdout)["rows"][0]
    return {"TTFT mean ms": r["ttft_ms_mean"], "TPOT mean ms": r["tpot_ms_mean"], "e2e mean ms": r["e2e_ms_mean"],
            "output tok/s": r["output_tokens_per_s"], "requests ok": r["requests_ok"], "client CPU s": cpu,
            "client wall s": wall}


def run_aiperf(url: str, model_id: str, tokenizer: Path, a, out: Path) -> dict:
    c0, t0 = _cpu_children(), time.perf_counter()
    subprocess.run([a.aiperf, "profile", "--model", model_id, "--url", url, "--endpoint-type", "completions",
                    "--streaming", "--tokenizer", str(tokenizer), "--synthetic-input-tokens-mean", str(a.ctx),
                    "--synthetic-input-tokens-stddev", "0", "--output-tokens-mean", str(a.gen),
                    "--output-tokens-stddev", "0", "--extra-inputs", "ignore_eos:true", "--extra-inputs",
                    f"min_tokens:{a.gen}", "--use-server-token-count", "--connection-reuse-strategy", "never",
                    "--concurrency", "1", "--request-count", str(a.requests),
                    "--artifact-dir", str(out), "--no-auto-plot"],
                   capture_output=True, text=True, check=True)
    wall, cpu = time.perf_counter() - t0, _cpu_children() - c0
    d = json.loads((out / "profile_export_aiperf.json").read_text())

    def mean(k):
        return (d.get(k) or {}).get("avg")

    return {"TTFT mean ms": mean("time_to_first_token"), "TPOT mean ms": mean("inter_token_latency"),
            "e2e mean ms": mean("request_latency"), "output tok/s": (d.get("output_token_throughput") or {}).get("avg"),
            "requests ok": (d.get("request_count") or {}).get("avg"), "client CPU s": cpu, "client wall s": wall,
            "errors": (d.get("error_request_count") or {}).get("avg")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--aiperf", required=True)
    ap.add_argument("--model", default="cpu-dense")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="server threads (leave the client a core)")
    ap.add_argument("--out", type=Path, default=Path("reports/serve/peers"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="granite-peers-"))
    granite("convert", "--from-profile", a.model, str(work / "model"), "--no-verify", "-f", "json")
    granite("convert", str(work / "model"), str(work / "model.gguf"), "--no-verify", "-f", "json")
    proc, url = start(work / "model.gguf", 1, a.ctx + a.gen + 64, a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        with __import__("urllib.request").request.urlopen(url + "/v1/models") as r:
            model_id = json.loads(r.read())["data"][0]["id"]
        granite("bench", "--endpoint", f"warm={url}", "--ctx", str(a.ctx), "--gen", str(a.gen), "--requests", "1",
                "--warmup", "0", "--no-energy", "-f", "json")  # the server's first-request costs, before either client
        for k in range(1, a.rounds + 1):
            for who, fn in (("granite", lambda: run_granite(url, a, a.out / f"granite-{k}.json")),
                            ("AIPerf", lambda: run_aiperf(url, model_id, work / "model", a, a.out / f"aiperf-{k}"))):
                before = _server_counters(url)
                got = fn()
                results.append((who, k, {**got, **_server_view(before, _server_counters(url), a.requests)}))
    finally:
        proc.kill()
        proc.wait()
    keys = ["TTFT mean ms", "server prompt mean ms", "TPOT mean ms", "server per-token ms", "e2e mean ms",
            "output tok/s", "requests ok", "client CPU s", "client wall s"]
    lines = ["| client | round | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for who, k, r in results:
        lines.append(f"| {who} | {k} | " + " | ".join("" if r.get(x) is None else f"{r[x]:,.1f}" for x in keys) + " |")
    (a.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
