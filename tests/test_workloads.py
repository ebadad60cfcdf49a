"""Server workloads against the fake server, which plays each part exactly: multi-turn sessions and their
verdicts, chat requests, dataset files, goodput arithmetic, rate sweeps and their knee, prefix-cache
counters in vLLM's and SGLang's names, fresh prompts per run, per-request records, confidence intervals,
the percentiles the samples support, and energy from a fake NVML and a fake DCGM exporter.
(tests/test_serve.py runs the multi-turn acceptance against llama.cpp's real server.)
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tests.conftest import granite, one_error
from tests.fake_server import FakeServer


def _json(r):
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.fixture
def fake():
    made = []

    def make(**kw):
        made.append(FakeServer(**kw))
        return made[-1]

    yield make
    for f in made:
        f.stop()


BASE = ["--gen", "4", "--warmup", "0"]


# ---------------------------------------------------------------------------------------------- multi-turn


def test_multi_turn_with_a_prefix_cache_prefills_only_the_new_tokens(fake):
    f = fake(cache=True, prefill_s=0.002)
    res = _json(granite("bench", "--endpoint", f"dense={f.url}", "--ctx", "40", "--batch", "1", "--turns", "3",
                        *BASE, "-f", "json"))
    row = res["rows"][0]
    assert row["workload"] == "turns=3" and row["turns"] == 3 and row["requests"] == 3
    # token-id history: the prompt, a stand-in for the 4-token answer, then the next 40-token message
    assert row["turn_prompt_tokens"] == [40, 84, 128]
    assert row["turn_reusable_tokens"] == [0, 40, 84]
    assert row["turn_cached_tokens"] == [0, 40, 84]  # the fake's cache holds exactly what was sent before
    assert row["prefix_reuse"] == 1.0 and row["unexpected_reuse_tokens"] == 0
    v = "\n".join(res["verdicts"])
    assert "dense c1 3 turns of 40-token messages" in v and "it prefills only the new tokens of each turn" in v


def test_multi_turn_without_reuse_is_a_re_prefill_of_the_history(fake):
    g = fake(prefill_s=0.002)  # no prefix cache at all: usage says nothing of cached tokens
    h = fake(cache=True, prefill_s=0.002)
    h.lookup = lambda tokens: 0  # reports a cache that never hits
    res = _json(granite("bench", "--endpoint", f"silent={g.url}", "--endpoint", f"missing={h.url}", "--ctx", "200",
                        "--batch", "1", "--turns", "3", *BASE, "-f", "json"))
    v = "\n".join(res["verdicts"])
    assert "missing c1 3 turns" in v and "reused 0% of the history it could" in v
    assert "it re-processes the whole history every turn" in v
    assert "silent c1 3 turns" in v and "TTFT grows with the whole history, a re-prefill" in v
    silent = next(r for r in res["rows"] if r["model"] == "silent")
    assert silent["prefix_reuse"] is None and silent["turn_ttft_ms_p50"][2] > 2 * silent["turn_ttft_ms_p50"][0]


def test_multi_turn_chat_sends_the_history_as_messages(fake):
    f = fake(cache=True)
    res = _json(granite("bench", "--endpoint", f"c={f.url}", "--api", "chat", "--ctx", "30", "--batch", "2",
                        "--turns", "2", "--think-time", "0.05", *BASE, "-f", "json"))
    row = res["rows"][0]
    assert row["api"] == "chat" and row["workload"] == "turns=2,chat" and row["requests"] == 4
    assert set(f.paths) - {"/tokenize"} == {"/v1/chat/completions"}  # text built to length with /tokenize
    second = [b for b in f.bodies if len(b["messages"]) == 3]
    assert len(second) == 2
    for b in second:  # user, the server's own answer, the next user message
        assert [m["role"] for m in b["messages"]] == ["user", "assistant", "user"]
        assert b["messages"][1]["content"] == "xxxx"
    assert row["prompt_tokens_exact"] is None and row["turn_cached_tokens"][1] > 0


def test_turns_refuse_what_they_cannot_mean(fake):
    f = fake()
    one_error(granite("bench", "--endpoint", f.url, "--ctx", "8", "--turns", "2", "--rate", "2"), 2, "--turns")
    one_error(granite("bench", "--endpoint", f.url, "--ctx", "8", "--think-time", "1"), 2, "--think-time")
    one_error(granite("bench", "-m", "tiny-hybrid", "--ctx", "8", "--turns", "2"), 2, "--turns is for --endpoint")
    one_error(granite("bench", "--endpoint", f.url, "--ctx", "8", "--reps", "3"), 2, "--requests")
    one_error(granite("bench", "--endpoint", f.url, "--ctx", "8", "--dtype", "bf16"), 2, "--dtype", "in-process")
    g = fake(chat=False)
    one_error(granite("bench", "--endpoint", g.url, "--ctx", "8", "--api", "chat"), 2, "no chat endpoint")
    assert f.count == 0 and g.count == 0


def test_a_sweep_that_fits_no_server_context_is_refused_up_front(fake):
    f = fake(max_model_len=100)
    one_error(granite("bench", "--endpoint", f.url, "--ctx", "64", "--gen", "8", "--turns", "2"), 2,
               "exceeds the server's 100 tokens")
    res = _json(granite("bench", "--endpoint", f.url, "--ctx", "16,200", "--requests", "2", *BASE, "-f", "json"))
    assert [r["status"] for r in res["rows"]] == ["ok", "skipped"]


# ---------------------------------------------------------------------------------------------- prompts


def test_each_run_sends_fresh_prompts_and_a_repeated_seed_is_flagged(fake):
    f = fake(cache=True)
    args = ["--endpoint", f"c={f.url}", "--ctx", "64", "--batch", "1", "--requests", "3", *BASE, "-f", "json"]
    a, b = _json(granite("bench", *args)), _json(granite("bench", *args))
    assert a["rows"][0]["prompt_seed"] != b["rows"][0]["prompt_seed"]
    assert b["rows"][0]["cached_prompt_tokens"] <= 3 * 4 and b["rows"][0]["unexpected_reuse_tokens"] == 0
    seed = a["rows"][0]["prompt_seed"]
    c = _json(granite("bench", *args, "--seed", seed))
    assert c["rows"][0]["prompt_seed"] == seed and c["rows"][0]["unexpected_reuse_tokens"] > 0
    assert "the server reused" in "\n".join(c["verdicts"]) and "measured the cache" in "\n".join(c["verdicts"])


def test_shared_prefix_reuse_is_judged_against_what_was_shared(fake):
    f = fake(cache=True)
    row = _json(granite("bench", "--endpoint", f"c={f.url}", "--ctx", "50", "--batch", "1", "--requests", "4",
                        "--shared-prefix", "30", *BASE, "-f", "json"))["rows"][0]
    assert row["reusable_prompt_tokens"] == 90 and row["prefix_reuse"] == 1.0 and row["workload"] == "prefix=30"
    g = fake(cache=True)
    g.lookup = lambda tokens: 0
    res = _json(granite("bench", "--endpoint", f"n={g.url}", "--ctx", "50", "--batch", "1", "--requests", "4",
                        "--shared-prefix", "30", *BASE, "-f", "json"))
    assert "reports prompt caching but reused 0 of 90 shared-prefix tokens" in "\n".join(res["verdicts"])


def test_a_dataset_of_every_shape_supplies_the_prompts(fake, tmp_path):
    d = tmp_path / "d.jsonl"
    d.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "one two three"},
        {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "alpha beta"},
                      {"role": "assistant", "content": "x"}, {"role": "user", "content": [{"type": "text",
                                                                                            "text": "gamma"}]}]},
        {"conversations": [{"from": "human", "value": "delta epsilon zeta eta"}, {"from": "gpt", "value": "y"}]},
        {"prompt": " ".join(["long"] * 500)},  # longer than --ctx: left out
    ]))
    f = fake()
    res = _json(granite("bench", "--endpoint", f"c={f.url}", "--ctx", "100", "--requests", "6", "--dataset", d,
                        *BASE, "-f", "json"))
    row = res["rows"][0]
    assert row["dataset"].startswith("d.jsonl@") and row["workload"].startswith("dataset=d.jsonl@")
    lo, hi = row["prompt_tokens_measured"]
    assert 2 <= lo and hi <= 4 and row["requests_ok"] == 6
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"nothing": 1}\n')
    one_error(granite("bench", "--endpoint", f.url, "--ctx", "100", "--dataset", bad), 2, "line 2")
    bad.write_text("not json")
    one_error(granite("bench", "--endpoint", f.url, "--ctx", "100", "--dataset", bad), 2, "not JSONL")
    one_error(granite("bench", "--endpoint", f.url, "--ctx", "1", "--dataset", d), 2, "fits in 1 tokens")


def test_length_distributions_draw_around_ctx(fake):
    f = fake()
    row = _json(granite("bench", "--endpoint", f"c={f.url}", "--ctx", "100", "--requests", "30", "--lengths",
                        "uniform", *BASE, "-f", "json"))["rows"][0]
    lo, hi = row["prompt_tokens_measured"]
    assert 50 <= lo < hi <= 150 and row["prompt_tokens_exact"] is None and row["workload"] == "lengths=uniform"


# ---------------------------------------------------------------------------------------------- statistics


def _timed(ttft, n, tpot, sent=0.0):
    from granite_cli.serve.http import Timed

    chunks = [sent + ttft + i * tpot for i in range(n)]
    return Timed(sent, chunks, chunks[-1], "length", 10, n, None)


def test_goodput_counts_the_requests_meeting_every_slo():
    from granite_cli.serve.stats import Request, RequestLog, Slo, summarize
    from granite_cli.serve.workload import Workload

    log = RequestLog()
    specs = [(0.1, 0.01), (0.2, 0.01), (0.5, 0.01), (0.1, 0.05), (0.1, 0.02)]  # (ttft, tpot) in s
    for i, (ttft, tpot) in enumerate(specs):
        log.add(Request(i, timed=_timed(ttft, 11, tpot)))
    from granite_cli.serve.http import HTTPFailure

    log.add(Request(5, error=HTTPFailure("http_500", "x")))
    slo = Slo(ttft_ms=300, tpot_ms=30, percentile=50)
    row = summarize(log, Workload(ctx=10, concurrency=1, gen=11), [2.0], slo)
    # met: 1st, 2nd and 5th; the 3rd misses TTFT, the 4th TPOT, the failed one meets nothing
    assert row["slo_attained"] == pytest.approx(3 / 6) and row["goodput_rps"] == pytest.approx(1.5)
    assert row["slo_percentiles"]["ttft_ms_p50"] == pytest.approx(100.0)
    assert row["tpot_ms_p50"] == pytest.approx(10.0) and row["itl_ms_p50"] == pytest.approx(10.0)


def test_percentiles_need_the_samples_to_support_them():
    from granite_cli.serve.stats import dist, min_samples

    assert [min_samples(p) for p in (50, 90, 95, 99)] == [1, 10, 20, 100]
    few = dist([0.1] * 9, "x")
    assert few["x_p50"] == pytest.approx(100.0) and few["x_p90"] is None and few["x_std"] == 0.0
    one = dist([0.2], "x")
    assert one["x_mean"] == pytest.approx(200.0) and one["x_std"] is None and one["x_p50"] == pytest.approx(200.0)
    ten = dist([i / 10 for i in range(1, 11)], "x")
    assert ten["x_p90"] == pytest.approx(910.0) and ten["x_p95"] is None and ten["x_p99"] is None


def test_tpot_is_per_request_and_itl_the_chunk_gap():
    t = _timed(0.5, 5, 0.1)
    t.done = t.chunks[-1] + 0.2  # the last byte arrives 200 ms after the last token's chunk
    assert t.tpot == pytest.approx((t.done - t.chunks[0]) / 4) and t.gaps == pytest.approx([0.1] * 4)


def test_runs_give_confidence_intervals(fake):
    f = fake(token_s=0.002)
    row = _json(granite("bench", "--endpoint", f"c={f.url}", "--ctx", "16", "--requests", "4", "--runs", "3",
                        *BASE, "-f", "json"))["rows"][0]
    assert row["runs"] == 3 and row["requests"] == 12
    for k in ("ttft_ms_p50_ci95", "tpot_ms_p50_ci95", "output_tokens_per_s_ci95"):
        lo, hi = row[k]
        assert lo <= hi, k
    from granite_cli.serve.stats import ci95

    assert ci95([1.0]) is None and ci95([1.0, 3.0]) == pytest.approx([2 - 12.706, 2 + 12.706])


def test_duplicate_rows_count_once_in_the_analysis():
    from granite_cli.bench.analysis import analyse
    from granite_cli.bench.row import Row

    rows = [Row.from_dict({"model": "s", "batch": 1, "ctx": c, "phase": "serve", "status": "ok", "dtype": "server",
                           "device": "endpoint", "ttft_ms_p50": c / 10, "itl_ms_p50": 5.0}) for c in (100, 200, 400)]
    res = analyse(rows + rows[:2])
    assert "2 row(s) repeat a case" in res.verdicts[0]
    assert not any("1.00x over 1x depth" in v for v in res.verdicts)
    assert "s c1 inter-token latency (chunk gap): 5.0 ms after a 100-token prompt -> 5.0 ms after 400" in \
        "\n".join(res.verdicts)


# ---------------------------------------------------------------------------------------------- rates, SLOs


def test_a_rate_sweep_finds_the_knee_and_the_best_goodput(fake):
    f = fake(serial=True, prefill_s=0.0, token_s=0.015)  # one at a time, ~50 ms each: ~20 requests/s at most
    res = _json(granite("bench", "--endpoint", f"s={f.url}", "--ctx", "8", "--rate", "3,100", "--requests", "12",
                        "--slo-ttft", "200", "--slo-percentile", "50", *BASE, "-f", "json"))
    rows = {r["rate_rps"]: r for r in res["rows"]}
    assert set(rows) == {3, 100} and all(r["batch"] == 12 and r["requests"] == 12 for r in rows.values())
    assert rows[100]["requests_per_s"] < 0.5 * 100 and rows[100]["offered_rps"] > 30
    v = "\n".join(res["verdicts"])
    assert "s prompt 8 (at most 12 in flight): requests/s served of offered" in v
    assert "knee at 3 req/s" in v and "best goodput" in v
    assert rows[3]["slo_attained"] == 1.0 and rows[100]["slo_attained"] < 1.0


def test_closed_loop_slos_at_their_percentile(fake):
    f = fake()
    res = _json(granite("bench", "--endpoint", f"f={f.url}", "--ctx", "8", "--batch", "1,2", "--requests", "12",
                        "--slo-ttft", "5000", "--slo-tpot", "1000", *BASE, "-f", "json"))
    v = "\n".join(res["verdicts"])
    assert "f prompt 8: 2 session(s) per server within TTFT p90 <= 5000 ms and TPOT p90 <= 1000 ms" in v
    assert "best goodput" in v
    few = _json(granite("bench", "--endpoint", f"f={f.url}", "--ctx", "8", "--batch", "1", "--requests", "4",
                        "--slo-ttft", "5000", *BASE, "-f", "json"))
    assert "too few requests for a p90; give --requests" in "\n".join(few["verdicts"])


# ---------------------------------------------------------------------------------------------- counters, records


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_prefix_cache_counters_in_each_engines_names(fake, engine):
    f = fake(cache=True, metrics=engine)
    res = _json(granite("bench", "--endpoint", f"c={f.url}", "--ctx", "40", "--turns", "2", *BASE, "-f", "json"))
    row = res["rows"][0]
    assert row["server_prefix_queries"] == 40 + 84 and row["server_prefix_hits"] == 40
    want = "vllm:prefix_cache_hits_total" if engine == "vllm" else "sglang:cached_tokens_total"
    assert row["server_prefix_source"] == want
    assert f"prefix-cache counters ({want}): 40 of 124 prompt tokens hit (32%)" in "\n".join(res["verdicts"])


def test_prefix_counters_that_fall_are_not_a_negative_count():
    from granite_cli.serve.metrics import prefix_counters

    a = {"llamacpp:prompt_tokens_cached_total": 50.0, "llamacpp:prompt_tokens_total": 100.0}
    b = {"llamacpp:prompt_tokens_cached_total": 80.0, "llamacpp:prompt_tokens_total": 130.0}
    got = prefix_counters([a, b])
    assert (got["server_prefix_hits"], got["server_prefix_queries"]) == (30.0, 60.0)  # processed + cached
    assert prefix_counters([b, a])["server_prefix_hits"] is None


def test_per_request_records_and_their_file(fake, tmp_path):
    f = fake()
    out = tmp_path / "req.jsonl"
    _json(granite("bench", "--endpoint", f"c={f.url}", "--ctx", "8,16", "--requests", "3", "--requests-out", out,
                  *BASE, "-f", "json"))
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 6 and {r["ctx"] for r in recs} == {8, 16}
    for r in recs:
        assert r["ttft_ms"] > 0 and r["e2e_ms"] >= r["ttft_ms"] and r["output_tokens"] == 4 and len(r["itl_ms"]) == 3
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes\n")
    one_error(granite("bench", "--endpoint", f.url, "--ctx", "8", "--requests-out", mine), 2, "did not write")
    assert mine.read_text() == "my notes\n"


def test_chat_answers_that_break_the_api_are_error_rows():
    from granite_cli.serve.http import HTTPFailure, _choice_text

    with pytest.raises(HTTPFailure, match="delta is list"):
        _choice_text({"delta": []}, "chat")
    with pytest.raises(HTTPFailure, match="delta.content is int"):
        _choice_text({"delta": {"content": 3}}, "chat")
    assert _choice_text({"delta": {"role": "assistant"}}, "chat") is None
    assert _choice_text({"delta": {"reasoning_content": "r", "content": "c"}}, "chat") == "rc"


# ---------------------------------------------------------------------------------------------- energy


class FakeNvml:
    """pynvml's calls granite makes, for two GPUs: power in mW, an energy counter in mJ that grows 300 J/s
    per GPU on the fake clock (or none), utilisation, memory, SM clock."""

    NVML_CLOCK_SM = 1

    def __init__(self, counter=True, fail_after=None):
        self.counter, self.fail_after, self.calls = counter, fail_after, 0
        self.clock = 0.0

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetPowerUsage(self, h):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("GPU is lost")
        return 300_000  # 300 W

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.counter:
            raise RuntimeError("NVMLError_NotSupported")
        import time

        return int(time.perf_counter() * 300_000)  # mJ: 300 J per second

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=50 + 10 * h)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=(1 + h) << 30)

    def nvmlDeviceGetClockInfo(self, h, kind):
        return 1980


def _meter(nvml):
    from granite_cli.energy import NvmlSource, PowerMeter

    return PowerMeter(NvmlSource(nvml))


def test_energy_from_the_driver_counter_and_from_power_samples():
    import time

    for counter in (True, False):
        m = _meter(FakeNvml(counter=counter)).start()
        time.sleep(0.35)
        got = m.stop()
        span = got["energy_j"] / got["power_w_mean"]
        # two GPUs at 300 W each: 600 W over the span, either way of counting
        assert got["power_w_mean"] == pytest.approx(600, rel=0.05) and 0.3 < span < 0.6
        assert got["energy_source"] == ("nvml energy counter" if counter else "nvml power samples")
        assert got["gpu_util_pct_mean"] == 55 and got["gpu_mem_used_max_bytes"] == 3 << 30
        assert got["sm_clock_mhz_mean"] == 1980 and got["power_w_max"] == 600


def test_a_gpu_lost_mid_case_stops_the_meter_not_the_case():
    import time

    m = _meter(FakeNvml(fail_after=6)).start()
    time.sleep(0.4)
    got = m.stop()
    assert "stopped early (RuntimeError: GPU is lost)" in got["energy_source"] and got["energy_j"] > 0


def test_a_server_case_gets_joules_per_token(fake):
    from granite_cli.serve.http import parse_endpoint
    from granite_cli.serve.probe import probe
    from granite_cli.serve.workload import Workload, run_case

    f = fake(token_s=0.02)
    server = probe(parse_endpoint(f.url))
    res = run_case(server, Workload(ctx=20, concurrency=2, gen=8, requests=4), meter=_meter(FakeNvml()))
    e = res.fields
    assert e["energy_j"] > 0 and e["energy_source"] == "nvml energy counter"
    assert e["j_per_output_token"] == pytest.approx(e["energy_j"] / 32)
    assert e["j_per_prompt_token"] == pytest.approx(e["energy_j"] / 80)


def test_dcgm_exporter_metrics(fake):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from granite_cli.energy import DcgmSource, PowerMeter

    state = {"mj": 1_000_000}

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            state["mj"] += 50_000
            lines = []
            for g in (0, 1):
                lines += [f'DCGM_FI_DEV_POWER_USAGE{{gpu="{g}",UUID="GPU-{g}"}} 250.5',
                          f'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{gpu="{g}"}} {state["mj"]}',
                          f'DCGM_FI_DEV_GPU_UTIL{{gpu="{g}"}} {40 + 20 * g}', f'DCGM_FI_DEV_FB_USED{{gpu="{g}"}} 1024',
                          f'DCGM_FI_DEV_SM_CLOCK{{gpu="{g}"}} 1800']
            b = ("\n".join(lines) + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(b)))
            self.end_headers()
            self.wfile.write(b)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        m = PowerMeter(DcgmSource(f"http://127.0.0.1:{srv.server_address[1]}/metrics")).start()
        import time

        time.sleep(0.6)
        got = m.stop()
    finally:
        srv.shutdown()
    assert got["energy_source"] == "dcgm energy counter" and got["power_w_max"] == 501.0
    assert got["gpu_util_pct_mean"] == 50 and got["gpu_mem_used_max_bytes"] == 2048 << 20
    assert got["energy_j"] > 0


@pytest.mark.gpu
def test_nvml_reads_the_real_gpu():
    from granite_cli.energy import NvmlSource, PowerMeter, load_nvml

    nvml = load_nvml()
    if nvml is None:
        pytest.skip("no NVML on this machine")
    import time

    m = PowerMeter(NvmlSource(nvml)).start()
    time.sleep(0.5)
    got = m.stop()
    assert got["energy_j"] > 0 and got["power_w_mean"] > 10


def test_no_case_finds_another_cases_prompts_in_the_cache(fake):
    f = fake(cache=True)
    res = _json(granite("bench", "--endpoint", f"c={f.url}", "--ctx", "64", "--batch", "1,2", "--turns", "2",
                        *BASE, "-f", "json"))
    for row in res["rows"]:  # turn 1 of every conversation is new to the server
        assert row["turn_cached_tokens"][0] <= 2 and row["unexpected_reuse_tokens"] == 0, row
