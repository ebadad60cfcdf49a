"""`granite bench --endpoint` against llama.cpp's real server (the xllamacpp wheel, started here on a
free port and stopped after), serving GGUFs that `granite convert` writes; and the fault cases against a
small fake server that fails on purpose.

Run: python -m pytest -q tests/test_serve.py
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import one_error
from tests.fake_server import FakeServer

ROOT = Path(__file__).resolve().parents[1]


def granite(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "granite_cli", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    def __init__(self, gguf: Path, slots: int = 4, ctx_per_slot: int = 1024) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "llama_server.py"), str(gguf),
                                      "--port", str(self.port), "--slots", str(slots), "--ctx-per-slot",
                                      str(ctx_per_slot), "--threads", "1"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("llama.cpp's server did not come up")

    def complete(self, body: dict) -> dict:
        req = urllib.request.Request(self.url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(60)


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    for name in ("tiny-hybrid", "tiny-dense"):
        r = granite("convert", "--from-profile", name, str(d / f"{name}.gguf"), "--no-verify", "-f", "json")
        assert r.returncode == 0, r.stderr
    return d


@pytest.fixture(scope="module")
def servers(ggufs):
    pytest.importorskip("xllamacpp")
    started = []
    try:
        for name in ("tiny-hybrid", "tiny-dense"):
            started.append(LlamaServer(ggufs / f"{name}.gguf"))
        yield started
    finally:
        for s in started:
            s.stop()


def test_a_converted_random_gguf_generates_in_the_real_server(servers):
    out = servers[0].complete({"prompt": "hello", "max_tokens": 32, "ignore_eos": True, "temperature": 0})
    assert out["usage"]["completion_tokens"] == 32
    assert out["usage"]["prompt_tokens"] == 5  # 5 ASCII characters, 5 byte tokens


def test_endpoint_sweep_exact_prompts_real_concurrency_and_metrics(servers, tmp_path):
    h, d = servers
    r = granite("bench", "--endpoint", f"tiny-hybrid={h.url}", "--endpoint", f"tiny-dense={d.url}",
                "--ctx", "37,300", "--batch", "1,4", "--gen", "6", "--requests", "8", "--warmup", "0",
                "--out", str(tmp_path / "rep"), "-f", "json")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    rows = res["rows"]
    assert len(rows) == 8 and {x["phase"] for x in rows} == {"serve"}
    for x in rows:
        assert x["status"] == "ok" and x["errors"] is None, x
        # the server's own usage confirms every prompt had exactly the requested length
        assert x["prompt_tokens_measured"] == [x["ctx"], x["ctx"]] and x["prompt_tokens_exact"] is True
        assert x["output_tokens_min"] == 6 and x["output_tokens"] == 6 * 8 and x["requests"] == 8
        assert x["engine"] == "llama.cpp" and x["server_slots"] == 4
        assert x["server_metrics"].startswith("/metrics")
        assert x["server_kv_cache_source"] == "/slots" and 0 <= x["server_kv_cache_usage_max"] <= 1
        assert x["ttft_ms_p50"] > 0 and x["itl_ms_p50"] > 0 and x["e2e_ms_p50"] >= x["ttft_ms_p50"]
        assert x["kind"] == ("hybrid" if x["model"] == "tiny-hybrid" else "dense")
        assert x["endpoint"] in (h.url, d.url)
    # four sessions really ran at once: four requests in flight together
    assert all(x["max_in_flight"] == x["batch"] for x in rows)
    v = "\n".join(res["verdicts"])
    assert "tiny-hybrid c1 time to first token:" in v
    assert "tiny-hybrid vs tiny-dense c4 prompt 300: time to first token" in v
    assert {(x["batch"], x["ctx"]) for x in res["serve_ratios"]} == {(1, 37), (1, 300), (4, 37), (4, 300)}
    assert "saturates at concurrency" in v or "still growing at concurrency" in v
    assert (tmp_path / "rep" / "report.md").is_file()
    stored = [json.loads(x) for x in (tmp_path / "rep" / "rows.jsonl").read_text().splitlines()]
    assert len(stored) == 8


def test_shared_prefix_is_served_from_the_cache(servers):
    # the dense model: llama.cpp cannot roll a recurrent state back to a partial prefix, so its hybrid
    # recomputes the whole prompt (cached_prompt_tokens 0), which is what this option exists to show
    r = granite("bench", "--endpoint", servers[1].url, "--ctx", "200", "--batch", "1", "--gen", "2", "--requests", "3",
                "--warmup", "0", "--shared-prefix", "150", "-f", "json")
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(r.stdout)["rows"][0]
    assert row["shared_prefix"] == 150
    # the same slot holds the previous request's tokens: the shared part of later prompts is not recomputed
    assert row["cached_prompt_tokens"] >= 150


@pytest.fixture(scope="module")
def cpu_servers(tmp_path_factory):
    """llama.cpp's server on GGUFs of cpu-hybrid and cpu-dense (the profiles' real layer mix), one slot each."""
    pytest.importorskip("xllamacpp")
    d = tmp_path_factory.mktemp("cpu-serve")
    started = []
    try:
        for name in ("cpu-hybrid", "cpu-dense"):
            r = granite("convert", "--from-profile", name, str(d / f"{name}.gguf"), "--dtype", "bf16", "--no-verify",
                        "-f", "json")
            assert r.returncode == 0, r.stderr
            started.append(LlamaServer(d / f"{name}.gguf", slots=1, ctx_per_slot=1024))
        yield started
    finally:
        for s in started:
            s.stop()


def test_multi_turn_sessions_reuse_as_the_server_reports(cpu_servers, tmp_path):
    h, d = cpu_servers
    out = tmp_path / "req.jsonl"
    r = granite("bench", "--endpoint", f"cpu-hybrid={h.url}", "--endpoint", f"cpu-dense={d.url}", "--ctx", "120",
                "--batch", "1", "--gen", "8", "--turns", "3", "--warmup", "0", "--requests-out", str(out), "-f", "json")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    rows = {x["model"]: x for x in res["rows"]}
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    for name, row in rows.items():
        assert row["requests_ok"] == 3 and row["turn_prompt_tokens"] == [120, 248, 376], row
        assert row["turn_reusable_tokens"] == [0, 120, 248]
        mine = [x for x in recs if x["model"] == name]
        # the row's reuse is the server's own per-request report, summed
        assert row["cached_prompt_tokens"] == sum(x["cached_tokens"] for x in mine)
        assert [x["cached_tokens"] for x in sorted(mine, key=lambda x: x["turn"])] == row["turn_cached_tokens"]
    dense = rows["cpu-dense"]
    assert dense["turn_cached_tokens"][0] == 0 and dense["prefix_reuse"] >= 0.95  # the whole history, every turn
    v = "\n".join(res["verdicts"])
    assert "cpu-dense c1 3 turns of 120-token messages" in v and "it prefills only the new tokens" in v
    hyb = rows["cpu-hybrid"]
    said = ("prefills only the new tokens" if hyb["prefix_reuse"] >= 0.5 else
            "re-processes the whole history" if hyb["prefix_reuse"] <= 0.05 else "re-processes part of the history")
    assert "cpu-hybrid c1 3 turns of 120-token messages" in v and said in v
    assert "cpu-hybrid vs cpu-dense c1 prompt 120 [turns=3]" in v and "TTFT by turn" in v


def test_unreachable_endpoint_is_one_line_exit_2():
    port = _free_port()
    one_error(granite("bench", "--endpoint", f"http://127.0.0.1:{port}", "--ctx", "32"), 2, "connection refused")
    one_error(granite("bench", "--endpoint", "ftp://x", "--ctx", "32"), 2, "not an http(s) URL")


def test_api_key_is_sent_and_never_printed(tmp_path):
    fake = FakeServer()
    try:
        r = granite("bench", "--endpoint", f"f={fake.url}", "--api-key", "s3cret-token", "--ctx", "8", "--batch",
                    "1", "--gen", "2", "--requests", "1", "--jsonl", str(tmp_path / "r.jsonl"), "-f", "json")
    finally:
        fake.stop()
    assert r.returncode == 0, r.stderr
    assert fake.auth == {"Bearer s3cret-token"}
    assert "s3cret" not in r.stdout + r.stderr + (tmp_path / "r.jsonl").read_text()


def test_failed_requests_are_counted_by_kind(tmp_path):
    modes = {0: "500", 1: "cut", 2: "slow"}
    fake = FakeServer(mode=lambda n: modes.get(n % 4, "ok"), slow_s=3.0)
    try:
        r = granite("bench", "--endpoint", f"f={fake.url}", "--ctx", "8", "--batch", "1", "--gen", "4", "--requests",
                    "4", "--warmup", "0", "--request-timeout", "1", "-f", "json")
    finally:
        fake.stop()
    assert r.returncode == 0, r.stderr  # one request in four succeeded: the case has a row, not a failure
    row = json.loads(r.stdout)["rows"][0]
    assert row["errors"] == {"http_500": 1, "cut": 1, "timeout": 1}
    assert row["requests_ok"] == 1 and row["status"] == "ok"
    assert "3 request(s) failed" in "\n".join(json.loads(r.stdout)["verdicts"])


def test_a_case_where_every_request_fails_exits_1_with_its_row(tmp_path):
    fake = FakeServer(mode=lambda n: "500")
    try:
        r = granite("bench", "--endpoint", f"f={fake.url}", "--ctx", "8", "--batch", "2", "--gen", "2", "--requests",
                    "2", "--warmup", "0", "--jsonl", str(tmp_path / "r.jsonl"), "-f", "json")
    finally:
        fake.stop()
    one_error(r, 1, "errored")
    row = json.loads((tmp_path / "r.jsonl").read_text())
    assert row["status"] == "error" and row["errors"] == {"http_500": 2}


def test_a_server_that_dies_mid_sweep_ends_it_with_the_finished_rows_kept(tmp_path):
    fake = FakeServer(stop_after=2)
    try:
        r = granite("bench", "--endpoint", f"f={fake.url}", "--ctx", "8,16,32", "--batch", "1", "--gen", "2",
                    "--requests", "2", "--warmup", "0", "--jsonl", str(tmp_path / "r.jsonl"), "-f", "json")
    finally:
        fake.stop()
    one_error(r, 1, "stopped answering")
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert rows[0]["ctx"] == 8 and rows[0]["status"] == "ok"
    assert rows[-1]["status"] == "error" and len(rows) == 2


def test_synthetic_vocabulary_is_a_real_byte_level_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    gguf = pytest.importorskip("gguf")
    r = granite("convert", "--from-profile", "cpu-hybrid", str(tmp_path / "h"), "--no-verify", "-f", "json")
    assert r.returncode == 0 and "synthetic byte-level vocabulary" in r.stderr
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "h" / "tokenizer.json"))
    text = "Granite 4.0, hybrid!"
    ids = tok.encode(text).ids
    assert len(ids) == len(text) and tok.decode(ids) == text
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["eos_token_id"] == cfg["bos_token_id"] == cfg["pad_token_id"] == 1023
    assert tok.id_to_token(300) is not None  # every id decodes to text (a server streams nothing for an empty one)
    assert tok.id_to_token(1023) == "<|end_of_text|>"
    # the folder's tokenizer is carried into the GGUF, and a GGUF's vocabulary into the next GGUF
    assert granite("convert", str(tmp_path / "h"), str(tmp_path / "h.gguf"), "--no-verify").returncode == 0
    assert granite("convert", str(tmp_path / "h.gguf"), str(tmp_path / "h2.gguf"), "--no-verify").returncode == 0
    # and back to a folder: the config.json the GGUF carries comes back byte for byte, special ids included
    assert granite("convert", str(tmp_path / "h.gguf"), str(tmp_path / "back"), "--no-verify").returncode == 0
    assert (tmp_path / "back" / "config.json").read_bytes() == (tmp_path / "h" / "config.json").read_bytes()
    a, b = gguf.GGUFReader(str(tmp_path / "h.gguf")), gguf.GGUFReader(str(tmp_path / "h2.gguf"))
    assert a.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert a.fields["tokenizer.ggml.tokens"].contents() == b.fields["tokenizer.ggml.tokens"].contents()
    assert a.fields["tokenizer.ggml.eos_token_id"].contents() == 1023
    r = granite("convert", "--from-profile", "tiny-hybrid", str(tmp_path / "n.gguf"), "--no-vocab", "--no-verify")
    assert r.returncode == 0
    assert gguf.GGUFReader(str(tmp_path / "n.gguf")).fields["tokenizer.ggml.model"].contents() == "none"


def test_a_server_without_token_id_prompts_gets_text_of_the_exact_length():
    fake = FakeServer(text_only=True)
    try:
        r = granite("bench", "--endpoint", f"f={fake.url}", "--ctx", "50,300", "--batch", "2", "--gen", "3",
                    "--requests", "2", "--warmup", "0", "-f", "json")
    finally:
        fake.stop()
    assert r.returncode == 0, r.stderr
    for row in json.loads(r.stdout)["rows"]:
        assert row["prompt_mode"] == "text" and row["status"] == "ok"
        assert row["prompt_tokens_measured"] == [row["ctx"], row["ctx"]] and row["prompt_tokens_exact"] is True


def test_ctrl_c_keeps_the_finished_rows(tmp_path):
    import signal

    fake = FakeServer(mode=lambda n: "ok" if n < 2 else "slow", slow_s=30.0)
    rows = tmp_path / "r.jsonl"
    try:
        p = subprocess.Popen([sys.executable, "-m", "granite_cli", "bench", "--endpoint", f"f={fake.url}", "--ctx",
                              "8,16,32", "--batch", "1", "--gen", "2", "--requests", "2", "--warmup", "0",
                              "--jsonl", str(rows)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             # a test run started in the background inherits SIGINT ignored, and Python keeps it so
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), stdin=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and not (rows.exists() and rows.read_text().strip()):
            time.sleep(0.1)
        time.sleep(0.5)  # the second case is now waiting on its slow request
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        fake.stop()
    assert p.returncode == 130 and "Traceback" not in err, err
    kept = [json.loads(x) for x in rows.read_text().splitlines()]
    assert len(kept) == 1 and kept[0]["ctx"] == 8 and kept[0]["status"] == "ok"


def test_open_loop_rate_and_slo_verdicts():
    fake = FakeServer()
    try:
        r = granite("bench", "--endpoint", f"f={fake.url}", "--ctx", "8,16", "--batch", "1,2", "--gen", "3",
                    "--requests", "12", "--warmup", "0", "--slo-ttft", "5000", "--slo-itl", "1000", "-f", "json")
        o = granite("bench", "--endpoint", f"f={fake.url}", "--ctx", "8", "--batch", "3", "--gen", "3", "--requests",
                    "6", "--warmup", "0", "--rate", "20", "-f", "json")
    finally:
        fake.stop()
    assert r.returncode == 0, r.stderr
    v = "\n".join(json.loads(r.stdout)["verdicts"])
    assert "f prompt 8: 2 session(s) per server within TTFT p90 <= 5000 ms and ITL p90 <= 1000 ms" in v
    assert o.returncode == 0, o.stderr
    row = json.loads(o.stdout)["rows"][0]
    assert row["rate_rps"] == 20 and row["requests_ok"] == 6 and row["requests"] == 6


def test_prometheus_gauges_and_the_ttft_histogram_of_vllm():
    from granite_cli.serve.http import parse_endpoint
    from granite_cli.serve.metrics import Sampler, parse

    def text(running, waiting, kv, n, total):
        return (f'# HELP vllm:num_requests_running x\nvllm:num_requests_running{{model_name="m"}} {running}\n'
                f'vllm:num_requests_waiting{{model_name="m"}} {waiting}\nvllm:kv_cache_usage_perc{{model_name="m"}} '
                f'{kv}\nvllm:time_to_first_token_seconds_count{{model_name="m"}} {n}\n'
                f'vllm:time_to_first_token_seconds_sum{{model_name="m"}} {total}\n'
                f'vllm:time_to_first_token_seconds_bucket{{le="0.1",model_name="m"}} 1.0e+00\n')

    s = Sampler(parse_endpoint("http://127.0.0.1:9"))  # never started: the samples are given
    s.samples = [parse(text(0, 0, 0.0, 10, 2.0)), parse(text(4, 2, 0.5, 12, 2.5)), parse(text(1, 0, 0.25, 14, 3.0))]
    got = s.summary()
    assert got["server_running_max"] == 4 and got["server_waiting_max"] == 2 and got["server_kv_cache_usage_max"] == 0.5
    assert got["server_ttft_mean_ms"] == pytest.approx(250.0)  # (3.0 - 2.0) s over 14 - 10 requests
    assert got["server_busy_slots_per_decode_max"] is None


def test_endpoint_arguments():
    from granite_cli.serve.http import parse_endpoint

    e = parse_endpoint("h=http://user:s3cret@127.0.0.1:8000/v1/")
    assert (e.name, e.url, e.api_key) == ("h", "http://127.0.0.1:8000", "s3cret")
    assert "s3cret" not in repr(e)
    e = parse_endpoint("https://gw.example/vllm/h-tiny?x=1", api_key="k")
    assert (e.name, e.url, e.api_key, e.prefix) == ("", "https://gw.example/vllm/h-tiny", "k", "/vllm/h-tiny")
    assert parse_endpoint("d=http://[::1]:8081").host == ("::1", 8081, False)
    assert parse_endpoint("d=http://[::1]:8081").url == "http://[::1]:8081"


def test_llama_cpp_kv_use_comes_from_its_slots(monkeypatch):
    from granite_cli.serve import metrics
    from granite_cli.serve.http import parse_endpoint

    slots = [{"id": 0, "n_ctx": 1000, "is_processing": True, "n_prompt_tokens_processed": 300,
              "n_prompt_tokens_cache": 100, "next_token": [{"n_decoded": 20}]},
             {"id": 1, "n_ctx": 1000, "is_processing": False, "n_prompt_tokens_processed": 999}]
    monkeypatch.setattr(metrics, "get", lambda ep, path, timeout=5.0: (200, json.dumps(slots).encode()))
    assert metrics.slots_usage(parse_endpoint("http://127.0.0.1:9")) == pytest.approx(420 / 2000)
    s = metrics.Sampler(parse_endpoint("http://127.0.0.1:9"))
    s.slots = [0.1, 0.21, 0.05]
    got = s.summary()
    assert got["server_kv_cache_usage_max"] == 0.21 and got["server_kv_cache_source"] == "/slots"
