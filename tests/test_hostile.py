"""`granite bench --endpoint` against a server that misbehaves in every way we could think of, and the
local inputs that came with the second reliability pass. For every case: the exit code, at most one
`error:` line on stderr and no traceback (a worker thread's included), the API key absent from stdout,
stderr and the rows file, and the rows file made of whole rows.

Run: python -m pytest -q tests/test_hostile.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hostile_server import HostileServer, drip, good_tokens, send_events, send_json

KEY = "sk-Zq8rW0123456789abcdefSECRETkey"
RUN = ["--ctx", "16", "--batch", "1", "--gen", "4", "--requests", "2", "--warmup", "0", "--request-timeout", "3"]


def granite(*args, env=None, timeout=120, **kw):
    e = {**os.environ, "GRANITE_DEBUG": "", **(env or {})}
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run([sys.executable, "-m", "granite_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=e, **kw)


def clean(r, code: int, rows: Path | None = None) -> list[dict]:
    """The contract every case holds; returns the rows stored."""
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "Exception in thread" not in r.stderr, r.stderr[-3000:]
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) <= 1, r.stderr
    assert "\x1b" not in r.stderr and "\x1b" not in r.stdout
    out = []
    if rows is not None and rows.exists():
        data = rows.read_bytes()
        assert KEY.encode() not in data and KEY[:16].encode() not in data
        assert data == b"" or data.endswith(b"\n")
        out = [json.loads(line) for line in data.decode().splitlines()]
    for text in (r.stdout, r.stderr):
        assert KEY not in text and KEY[8:24] not in text
    return out


def sweep(srv: HostileServer, tmp: Path, *extra, key: str = KEY, env=None, timeout=120):
    rows = tmp / "rows.jsonl"
    r = granite("bench", "--endpoint", f"h={srv.url}", "--api-key", key, *RUN, *extra, "-f", "json", "--jsonl", rows,
                env=env, timeout=timeout)
    return r, rows


def _quote_key(h, body):
    return h.headers.get("Authorization") or ""


def _stream(events_of):
    """A /v1/completions route: the probe's one-token answer, then `events_of(handler, body)` streamed."""
    def route(h, body):
        if not body.get("stream"):
            return send_json(h, {"choices": [{"text": "x", "finish_reason": "length"}],
                                 "usage": {"prompt_tokens": 4, "completion_tokens": 1}})
        evs = events_of(h, body)
        if callable(evs):
            return evs()
        send_events(h, evs)
    return route


def _last_usage(**usage):
    def events(h, body):
        evs = good_tokens(h, body)
        evs[-1]["usage"] = usage
        return evs
    return events


# (name, events the stream sends, the error kind its rows must count)
BAD_STREAMS = [
    ("event is a list", lambda h, b: [[1, 2, 3]], "bad_response"),
    ("choices is a string", lambda h, b: [{"choices": "x"}], "bad_response"),
    ("choice is a number", lambda h, b: [{"choices": [7]}], "bad_response"),
    ("text is a number", lambda h, b: [{"choices": [{"text": 5, "finish_reason": "length"}]}], "bad_response"),
    ("finish_reason is a list", lambda h, b: [{"choices": [{"text": "x", "finish_reason": ["x"]}]}], "bad_response"),
    ("usage is a list", lambda h, b: good_tokens(h, b)[:-1] + [{"choices": [{"text": "x", "finish_reason": "length"}],
                                                              "usage": [1]}], "bad_response"),
    ("deep nesting", lambda h, b: [b"[" * 200_000 + b"]" * 200_000], "bad_response"),
    ("not JSON", lambda h, b: [b"{oops"], "bad_response"),
    ("string counts", _last_usage(prompt_tokens="16", completion_tokens="4"), "bad_usage"),
    ("negative completion tokens", _last_usage(prompt_tokens=16, completion_tokens=-7), "bad_usage"),
    ("bool count", _last_usage(prompt_tokens=True, completion_tokens=4), "bad_usage"),
    ("more tokens than asked", _last_usage(prompt_tokens=16, completion_tokens=4000), "bad_usage"),
    ("more cached than prompt", _last_usage(prompt_tokens=16, completion_tokens=4,
                                            prompt_tokens_details={"cached_tokens": 99}), "bad_usage"),
    ("details a string", _last_usage(prompt_tokens=16, completion_tokens=4, prompt_tokens_details="x"), "bad_usage"),
    ("endless chunks", lambda h, b: [{"choices": [{"text": "x", "finish_reason": None}]}] * 500, "bad_response"),
    ("error event quoting the key", lambda h, b: [{"error": {"message": "bad auth: " + _quote_key(h, b)}}],
     "server_error"),
    ("error event a list", lambda h, b: [{"error": ["Authorization: " + _quote_key(h, b)]}], "server_error"),
    ("no events at all", lambda h, b: (lambda: send_json(h, b"<html>" + _quote_key(h, b).encode())),
     "bad_response"),
    ("HTTP 500 quoting the key", lambda h, b: (lambda: send_json(h, {"detail": _quote_key(h, b)}, 500)), "http_500"),
    ("line over a MiB", lambda h, b: [b"x" * (3 * 2**20)], "bad_response"),
]


@pytest.mark.parametrize("name,events,kind", BAD_STREAMS, ids=[c[0] for c in BAD_STREAMS])
def test_malformed_stream_is_an_error_row_of_its_kind(server, tmp_path, name, events, kind):
    srv = server({"/v1/completions": _stream(events)})
    r, rows = sweep(srv, tmp_path)
    stored = clean(r, 1, rows)
    assert "case(s) errored" in r.stderr
    (row,) = stored
    assert row["status"] == "error" and row["errors"] == {kind: 2}, row["errors"]
    assert row["error"] and row["error"] != "None"
    assert f"Bearer {KEY}" in srv.auth  # the key was sent, and kept out of everything above


def _chat(events_of):
    """A /v1/chat/completions route: the probe's one-token answer, then `events_of(handler, body)` streamed."""
    def route(h, body):
        if not body.get("stream"):
            return send_json(h, {"choices": [{"message": {"role": "assistant", "content": "x"},
                                              "finish_reason": "length"}], "usage": {"prompt_tokens": 4}})
        send_events(h, events_of(h, body))
    return route


def _chat_good(n=4):
    return ([{"choices": [{"delta": {"content": "x"}, "index": 0, "finish_reason": None}]} for _ in range(n - 1)] +
            [{"choices": [{"delta": {"content": "x"}, "index": 0, "finish_reason": "length"}],
              "usage": {"prompt_tokens": 8, "completion_tokens": n}}])


BAD_CHAT = [
    ("delta is a list", lambda h, b: [{"choices": [{"delta": ["x"], "finish_reason": "length"}]}], "bad_response"),
    ("content is a number", lambda h, b: [{"choices": [{"delta": {"content": 7}, "finish_reason": "length"}]}],
     "bad_response"),
    ("reasoning is an object", lambda h, b: [{"choices": [{"delta": {"reasoning_content": {}}}]}], "bad_response"),
    ("cached more than the prompt", lambda h, b: _chat_good()[:-1] + [
        {"choices": [{"delta": {"content": "x"}, "finish_reason": "length"}],
         "usage": {"prompt_tokens": 8, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 9}}}],
     "bad_usage"),
    ("no finish reason", lambda h, b: _chat_good()[:-1], "cut"),
]


@pytest.mark.parametrize("name,events,kind", BAD_CHAT, ids=[c[0] for c in BAD_CHAT])
def test_malformed_chat_stream_is_an_error_row_of_its_kind(server, tmp_path, name, events, kind):
    srv = server({"/v1/chat/completions": _chat(events)})
    r, rows = sweep(srv, tmp_path, "--api", "chat", "--turns", "2")
    (row,) = clean(r, 1, rows)
    # a failed turn ends its conversation: the second turn would resend a broken history
    assert row["status"] == "error" and row["errors"] == {kind: 1} and row["requests"] == 1


def test_a_good_chat_stream_has_its_turns(server, tmp_path):
    srv = server({"/v1/chat/completions": _chat(lambda h, b: _chat_good())})
    r, rows = sweep(srv, tmp_path, "--api", "chat", "--turns", "2")
    (row,) = clean(r, 0, rows)
    assert row["requests_ok"] == 2 and row["turn_prompt_tokens"] == [8, 8] and row["api"] == "chat"


def test_half_bad_case_keeps_its_good_requests(server, tmp_path):
    n = {"k": 0}

    def events(h, body):
        n["k"] += 1
        return good_tokens(h, body) if n["k"] % 2 else [{"choices": "oops"}]

    srv = server({"/v1/completions": _stream(events)})
    r, rows = sweep(srv, tmp_path)
    (row,) = clean(r, 0, rows)
    assert row["status"] == "ok" and row["requests_ok"] == 1 and row["errors"] == {"bad_response": 1}
    assert row["output_tokens"] == 4 and row["output_tokens_per_s"] > 0


def test_dripping_server_is_cut_at_the_request_deadline(server, tmp_path):
    srv = server({"/v1/completions": _stream(lambda h, b: (lambda: drip(h, 0.05)))})
    t0 = time.monotonic()
    r, rows = sweep(srv, tmp_path, "--request-timeout", "1", timeout=60)
    took = time.monotonic() - t0
    (row,) = clean(r, 1, rows)
    assert row["errors"] == {"timeout": 2}
    assert took < 40  # two 1-second deadlines, not the drip's 500 s


def test_probe_honours_the_request_timeout(server, tmp_path):
    srv = server({"/v1/models": lambda h, b: drip(h, 0.05)})
    r, _ = sweep(srv, tmp_path, "--request-timeout", "1", timeout=60)
    clean(r, 2)
    assert "no answer in 1 s" in r.stderr

    srv2 = server({"/v1/completions": lambda h, b: drip(h, 0.05)})  # the probe's one-token completion hangs
    r, _ = sweep(srv2, tmp_path, "--request-timeout", "1", timeout=60)
    clean(r, 2)
    assert "timeout" in r.stderr


BAD_MODEL_LISTS = [
    ("a list", [1, 2]),
    ("data a string", {"data": "hostile"}),
    ("id an object", {"data": [{"id": {"a": 1}}]}),
    ("deep nesting", b"{\"data\": " + b"[" * 100_000 + b"]" * 100_000 + b"}"),
]


@pytest.mark.parametrize("name,body", BAD_MODEL_LISTS, ids=[c[0] for c in BAD_MODEL_LISTS])
def test_malformed_model_list_is_one_line_exit_2(server, tmp_path, name, body):
    srv = server({"/v1/models": lambda h, b: send_json(h, body)})
    r, rows = sweep(srv, tmp_path)
    clean(r, 2, rows)
    assert "--endpoint" in r.stderr
    assert not rows.exists()  # refused before the rows file was made


def test_malformed_optional_metadata_is_ignored_or_dropped_with_a_note(server, tmp_path):
    srv = server({
        "/v1/models": lambda h, b: send_json(h, {"data": [{"id": "hostile-[bold]model[/]", "owned_by": ["x"],
                                                           "max_model_len": "lots", "meta": {"n_vocab": -3}}]}),
        "/props": lambda h, b: send_json(h, {"build_info": {"x": 1}, "total_slots": "4",
                                             "default_generation_settings": [1]}),
        "/version": lambda h, b: send_json(h, [1]),
        "/slots": lambda h, b: send_json(h, [{"n_ctx": "4096", "is_processing": True}]),
        "/metrics": lambda h, b: send_json(h, b"vllm:num_requests_running NaN\ngarbage{{{\n" + b"x" * 100),
    })
    r, rows = sweep(srv, tmp_path)
    (row,) = clean(r, 0, rows)
    assert row["status"] == "ok" and row["requests_ok"] == 2
    assert row["engine"] is None and row["server_slots"] is None and row["token_ids_from"].startswith("0..255")
    assert "dropped /slots" in row["server_metrics"]
    assert row["served_model"] == "hostile-[bold]model[/]"
    r = granite("bench", "--endpoint", srv.url, *RUN, "-f", "table")  # a name that is not Rich markup
    clean(r, 0)
    assert "hostile-[bold]model[/]" in r.stdout


def test_model_id_with_control_characters_is_refused(server, tmp_path):
    srv = server({"/v1/models": lambda h, b: send_json(h, {"data": [{"id": "evil\x1b[2J\x1b[31m"}]})})
    r, rows = sweep(srv, tmp_path)
    clean(r, 2, rows)
    assert "not a printable name" in r.stderr


def test_huge_metrics_page_is_dropped_not_fatal(server, tmp_path):
    srv = server({"/metrics": lambda h, b: send_json(h, b"a 1\n" * (5 * 2**20))})
    r, rows = sweep(srv, tmp_path)
    (row,) = clean(r, 0, rows)
    assert "dropped /metrics" in row["server_metrics"]


def test_key_in_model_id_and_version_is_masked(server, tmp_path):
    srv = server({"/v1/models": lambda h, b: send_json(h, {"data": [{"id": "m-" + KEY, "owned_by": KEY}]}),
                  "/version": lambda h, b: send_json(h, {"version": "v " + _quote_key(h, b)})})
    r, rows = sweep(srv, tmp_path, "--out", tmp_path / "rep")
    clean(r, 0, rows)
    for f in (tmp_path / "rep").iterdir():
        assert KEY.encode() not in f.read_bytes(), f


def test_mistyped_endpoint_never_prints_the_password():
    r = granite("bench", "--endpoint", f"h==http://u:{KEY}@127.0.0.1:1", *RUN)
    clean(r, 2)
    assert "not an http(s) URL" in r.stderr and "***" in r.stderr
    r = granite("bench", "--endpoint", f"http://u:{KEY}@127.0.0.1:1", *RUN)  # nothing listens on port 1
    clean(r, 2)


def test_server_dying_mid_sweep_keeps_whole_rows(server, tmp_path):
    n = {"k": 0}

    def route(h, body):
        if not body.get("stream"):
            return send_json(h, {"choices": [{"text": "x", "finish_reason": "length"}]})
        n["k"] += 1
        if n["k"] > 2:
            threading_stop(srv)
            h.close_connection = True
            return
        send_events(h, good_tokens(h, body))

    srv = server({"/v1/completions": route})
    r, rows = sweep(srv, tmp_path, "--ctx", "16,32")
    stored = clean(r, 1, rows)
    assert [row["ctx"] for row in stored] == [16, 32] and stored[1]["status"] == "error"
    assert "stopped answering" in r.stderr


def threading_stop(srv):
    import threading

    threading.Thread(target=srv.stop, daemon=True).start()


# ---------------------------------------------------------------------------------------- local input

BAD_GATES = ["nan", "-10%", "100%", "1000%", "10", "inf", "-0.5", "abc"]


@pytest.mark.parametrize("gate", BAD_GATES)
def test_regression_gates_that_cannot_fire_are_refused(tmp_path, gate):
    base = tmp_path / "base.jsonl"
    base.write_text(json.dumps({"model": "tiny-hybrid", "dtype": "fp32", "device": "cpu", "batch": 1, "ctx": 32,
                                "phase": "prefill", "status": "ok", "tokens_per_s": 10.0, "median_s": 3.2,
                                "latency_ms": 3200.0}) + "\n")
    r = granite("bench", "-m", "tiny-hybrid", "--ctx", "32", "--baseline", base, "--fail-on-regression", gate)
    clean(r, 2)
    assert "--fail-on-regression" in r.stderr


@pytest.mark.parametrize("flag,value", [
    ("--rate", "1e-9"), ("--rate", "inf"), ("--request-timeout", "inf"), ("--request-timeout", "nan"),
    ("--slo-ttft", "nan"), ("--requests", "100000000"), ("--turns", "0"), ("--rate", "1,x"), ("--runs", "1000"),
    ("--slo-percentile", "100"), ("--api", "embeddings"), ("--lengths", "zipf"), ("--reps", "3")])
def test_absurd_server_options_are_refused_before_any_request(server, tmp_path, flag, value):
    srv = server({})
    r = granite("bench", "--endpoint", srv.url, "--ctx", "16", flag, value)
    clean(r, 2)
    assert srv.auth == set()  # refused before the server was asked anything


def test_absurd_sweep_file_is_refused_up_front(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text("reps = 1000000000\n")
    r = granite("bench", "-m", "tiny-hybrid", "--ctx", "32", "--sweep", f)
    clean(r, 2)
    assert "--reps" in r.stderr
    f.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    clean(granite("bench", "-m", "tiny-hybrid", "--sweep", f), 2)


@pytest.mark.parametrize("row,why", [
    ({"batch": "1"}, "batch"), ({"tokens_per_s": "fast"}, "tokens_per_s"), ({"ctx": -5}, "ctx"),
    ({"attribution_s": [1]}, "attribution_s"), ({"schema_version": 99}, "schema_version"),
])
def test_bad_baseline_rows_are_refused_before_any_work(tmp_path, row, why):
    base = tmp_path / "base.jsonl"
    good = {"model": "tiny-hybrid", "dtype": "fp32", "device": "cpu", "batch": 1, "ctx": 32, "phase": "prefill",
            "status": "ok", "tokens_per_s": 10.0, "median_s": 3.2, "latency_ms": 3200.0}
    base.write_text(json.dumps({**good, **row}) + "\n")
    r = granite("bench", "-m", "tiny-hybrid", "--ctx", "32", "--baseline", base, "--fail-on-regression", "10%")
    clean(r, 2)
    assert why in r.stderr and "expected about" not in r.stderr


def test_resume_of_rows_of_an_older_schema_is_refused_up_front(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"schema_version": 1, "model": "tiny-hybrid", "batch": 1, "ctx": 32,
                                "phase": "prefill", "status": "ok", "tokens_per_s": 3.0}) + "\n")
    r = granite("bench", "-m", "tiny-hybrid", "--ctx", "32", "--jsonl", rows, "--resume")
    clean(r, 2)
    assert "cannot be resumed" in r.stderr and "expected about" not in r.stderr


BENCH = ["bench", "-m", "tiny-hybrid", "--batch", "1", "--gen", "2", "--reps", "1", "--warmup", "0", "-f", "json"]


def test_resume_after_cut_lines_leaves_whole_rows(tmp_path):
    rows = tmp_path / "rows.jsonl"
    clean(granite(*BENCH, "--ctx", "=32", "--jsonl", rows), 0, rows)
    for ctx in ("32,64", "32,64,128"):
        with open(rows, "ab") as f:
            f.write(b'{"schema_version": 1, "model": "tiny-hyb')  # a row cut by a kill
        r = granite(*BENCH, "--ctx", ctx, "--jsonl", rows, "--resume")
        stored = clean(r, 0, rows)
        assert all(set(x) >= {"model", "ctx", "phase"} for x in stored)
    assert sorted({x["ctx"] for x in stored}) == [32, 64, 128] and len(stored) == 6


def test_rows_past_a_file_size_limit_are_an_error_and_whole(tmp_path):
    import resource

    rows = tmp_path / "rows.jsonl"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))  # about two rows

    r = subprocess.run([sys.executable, "-m", "granite_cli", *BENCH, "--ctx", "32,64,128", "--jsonl", str(rows)],
                       capture_output=True, text=True, preexec_fn=limit, timeout=120, stdin=subprocess.DEVNULL)
    stored = clean(r, 1, rows)
    assert "cannot store a row" in r.stderr and "--resume" in r.stderr
    assert 1 <= len(stored) < 6 and rows.stat().st_size <= 6000
    assert len(json.loads(r.stdout)["rows"]) > len(stored)  # the rows not stored still reach stdout


def test_unwritable_rows_store_is_an_error_not_a_silent_loss(tmp_path, monkeypatch):
    import errno

    from granite_cli.bench.row import Row
    from granite_cli.bench.rows import JsonlStore, RowsNotStored

    def row(n):
        return Row.from_dict({"model": "m", "dtype": "fp32", "device": "cpu", "batch": 1, "ctx": n, "phase": "prefill",
                              "status": "ok"})

    store = JsonlStore(tmp_path / "rows.jsonl")
    store.open(resume=False)
    store.append(row(1))
    real = os.write

    def half(fd, data):  # writes part of the row, then the disk is read-only
        real(fd, bytes(data[:5]))
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "write", half)
    with pytest.raises(RowsNotStored, match="Read-only file system"):
        store.append(row(2))
    monkeypatch.undo()
    assert [json.loads(line)["ctx"] for line in store.path.read_text().splitlines()] == [1]


def test_sigterm_keeps_rows_and_says_so(tmp_path):
    rows = tmp_path / "rows.jsonl"
    p = subprocess.Popen([sys.executable, "-m", "granite_cli", *BENCH, "--ctx", "32,64,128,256,512,1k,2k,4k",
                          "--jsonl", str(rows)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not rows.exists() or rows.read_text().count("\n") < 2):
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "interrupted (SIGTERM);" in err and "row(s) kept" in err and "Traceback" not in err
    assert all(json.loads(line) for line in rows.read_text().splitlines())


def test_closed_stdout_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "granite_cli", "profiles", "list"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, pass_fds=(), close_fds=True,
                       preexec_fn=lambda: os.close(1), stdin=subprocess.DEVNULL, timeout=120)
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "standard output is closed" in r.stderr
    assert "Traceback" not in r.stderr


def test_ascii_stdout_with_a_non_ascii_model_name(tmp_path):
    d = tmp_path / "модель"
    assert granite("convert", "--from-profile", "tiny-hybrid", d, "--no-verify").returncode == 0
    for fmt in ("table", "md", "csv", "json"):
        r = granite("memory-report", "-m", d, "--ctx", "1k", "--batch", "1", "-f", fmt,
                    env={"PYTHONIOENCODING": "ascii", "PYTHONUTF8": "0", "LC_ALL": "C"})
        clean(r, 0)
        assert "\\u" in r.stdout or "\\U" in r.stdout or "\\x" in r.stdout or "\\u043c" in r.stdout


# ---------------------------------------------------------------------------------------- files

def test_force_never_replaces_a_folder_of_tokenizer_files(tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (dst / f).write_text("{\"mine\": true}")
    r = granite("convert", "--from-profile", "tiny-hybrid", dst, "--force", "--no-verify")
    clean(r, 2)
    assert "no config.json and no weights" in r.stderr
    assert sorted(p.name for p in dst.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                     "tokenizer_config.json"]
    assert all(p.read_text() == "{\"mine\": true}" for p in dst.iterdir())


def test_two_converts_into_one_dst_refuse_the_second(tmp_path):
    dst = tmp_path / "h350m"
    first = subprocess.Popen([sys.executable, "-m", "granite_cli", "convert", "--from-profile", "granite-4.0-h-350m",
                              "--dtype", "bf16", dst], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(tmp_path.glob(".h350m.*.granite-lock")):
        time.sleep(0.02)
    assert first.poll() is None, "the first conversion ended before the second could start"
    second = granite("convert", "--from-profile", "tiny-hybrid", dst, "--no-verify")
    clean(second, 2)
    assert "another granite run is writing" in second.stderr and "pid" in second.stderr
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert json.loads((dst / "config.json").read_text())["num_hidden_layers"] > 4  # the first one's, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h350m"]  # no lock, no staging left


def test_outputs_get_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        r = granite("convert", "--from-profile", "tiny-hybrid", tmp_path / "ck", "--no-verify")
        r2 = granite("convert", "--from-profile", "tiny-hybrid", tmp_path / "m.gguf", "--no-verify")
        r3 = granite("memory-report", "-m", "tiny-hybrid", "--ctx", "1k", "--batch", "1", "--out", tmp_path / "rep")
    finally:
        os.umask(old)
    for x in (r, r2, r3):
        clean(x, 0)
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o755 and (tmp_path / "rep").stat().st_mode & 0o777 == 0o755
    for f in [*(tmp_path / "ck").iterdir(), *(tmp_path / "rep").iterdir(), tmp_path / "m.gguf"]:
        assert f.stat().st_mode & 0o777 == 0o644, f


def test_long_names_fit_and_too_long_names_are_refused_up_front(tmp_path):
    ok = tmp_path / ("n" * 250)
    clean(granite("convert", "--from-profile", "tiny-hybrid", ok, "--no-verify"), 0)
    assert (ok / "config.json").is_file()
    long = tmp_path / ("n" * 300)
    r = granite("convert", "--from-profile", "tiny-hybrid", long, "--no-verify")
    clean(r, 2)
    assert "longer than a file name may be" in r.stderr and "Traceback" not in r.stderr
    r = granite("bench", "-m", "tiny-hybrid", "--ctx", "32", "--jsonl", tmp_path / ("j" * 300))
    clean(r, 2)
    assert "expected about" not in r.stderr


def test_gguf_suffix_in_any_case_writes_a_gguf(tmp_path):
    clean(granite("convert", "--from-profile", "tiny-hybrid", tmp_path / "m.GGUF", "--no-verify"), 0)
    assert (tmp_path / "m.GGUF").read_bytes()[:4] == b"GGUF"
    clean(granite("inspect", tmp_path / "m.GGUF"), 0)


def test_hub_revision_cannot_leave_the_cache(tmp_path):
    for rev in ("../../../x", "/etc", "main/../../x", "a\\b"):
        r = granite("memory-report", "-m", f"org/name@{rev}", env={"HF_HUB_OFFLINE": "1",
                                                                    "HF_HUB_CACHE": str(tmp_path / "hub")})
        clean(r, 2)
        assert "revision" in r.stderr


def _rewrite_gguf(src: Path, dst: Path, **change) -> Path:
    """A copy of GGUF src with metadata keys replaced (value, or (value type, value, element type)) or
    removed (None); keys given as tokenizer__ggml__tokens for tokenizer.ggml.tokens."""
    from granite_cli.checkpoint import gguf as G

    f = G.GGUFFile(src)
    kvs, change = [], {k.replace("__", "."): v for k, v in change.items()}
    for k, v in f.kv.items():
        vt, at = f.kv_types[k]
        if k in change:
            if change[k] is None:
                continue
            v = change[k]
            if isinstance(v, tuple):
                vt, v, at = v
        kvs.append(G.KV(k, vt, list(v) if vt == G.ARR else v, at))
    kvs += [G.KV(k, *v) if isinstance(v, tuple) else G.KV(k, G.STR, v) for k, v in change.items()
            if k not in f.kv and v is not None]
    w = G.GGUFWriter(dst, kvs, list(f.tensors.values()))
    for n in f.tensors:
        w.write(n, f.raw(n))
    w.close()
    return dst


@pytest.fixture(scope="module")
def vocab_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("voc")
    r = granite("convert", "--from-profile", "tiny-hybrid", d / "m.gguf", "--no-verify")
    assert r.returncode == 0, r.stderr
    return d / "m.gguf"


def _tokens(path):
    from granite_cli.checkpoint import gguf as G

    return list(G.GGUFFile(path).kv["tokenizer.ggml.tokens"])


BAD_VOCABS = {
    "a token short": lambda t: {"tokenizer__ggml__tokens": t[:-1]},
    "a token twice": lambda t: {"tokenizer__ggml__tokens": t[:5] + [t[6]] + t[6:]},
    "a type out of range": lambda t: {"tokenizer__ggml__token_type": [1] * (len(t) - 1) + [99]},
    "types short": lambda t: {"tokenizer__ggml__token_type": [1] * 3},
    "a score NaN": lambda t: {"tokenizer__ggml__scores": (9, [0.0] * (len(t) - 1) + [float("nan")], 6)},
    "a merge of unknown tokens": lambda t: {"tokenizer__ggml__merges": (9, [f"{t[70]} {t[71]}", "zz~ q~q"], 8)},
    "a merge with no space": lambda t: {"tokenizer__ggml__merges": (9, ["abc"], 8)},
    "eos beyond the vocabulary": lambda t: {"tokenizer__ggml__eos_token_id": (4, len(t) + 5, None)},
    "an unknown tokenizer": lambda t: {"tokenizer__ggml__model": "sentencepiece-ish"},
    "tokens of numbers": lambda t: {"tokenizer__ggml__tokens": (9, list(range(len(t))), 4)},
}


@pytest.mark.parametrize("case", list(BAD_VOCABS))
def test_corrupt_gguf_vocabulary_is_not_carried(vocab_gguf, tmp_path, case):
    bad = _rewrite_gguf(vocab_gguf, tmp_path / "bad.gguf", **BAD_VOCABS[case](_tokens(vocab_gguf)))
    r = granite("convert", bad, tmp_path / "out.gguf")
    clean(r, 2)
    assert "vocabulary is corrupt" in r.stderr and not (tmp_path / "out.gguf").exists()


def test_consistent_gguf_vocabulary_with_merges_is_carried(vocab_gguf, tmp_path):
    t = _tokens(vocab_gguf)
    merged = _rewrite_gguf(vocab_gguf, tmp_path / "ok.gguf", tokenizer__ggml__merges=(9, [f"{t[70]} {t[71]}"], 8))
    clean(granite("convert", merged, tmp_path / "out.gguf"), 0)
    assert _tokens(tmp_path / "out.gguf") == t


# ---------------------------------------------------------------------------------------- configs

def _saved(cls, tmp: Path, **kw) -> Path:
    d = tmp / cls.__name__
    cls(**kw).save_pretrained(d)
    return d / "config.json"


SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)


def test_configs_saved_by_current_transformers_load_with_extra_keys_warned(tmp_path):
    transformers = pytest.importorskip("transformers")
    kinds = {"Qwen3Config": dict(head_dim=16), "Qwen3MoeConfig": dict(moe_intermediate_size=32, num_experts=4,
                                                                     num_experts_per_tok=2),
             "LlamaConfig": {}, "GraniteConfig": {},
             "GraniteMoeHybridConfig": dict(layer_types=["mamba", "attention", "mamba", "mamba"], mamba_n_heads=4,
                                            mamba_d_head=32, mamba_d_state=16, num_local_experts=4,
                                            num_experts_per_tok=2, shared_intermediate_size=32)}
    for name, kw in kinds.items():
        cj = _saved(getattr(transformers, name), tmp_path, **SMALL, **kw)
        d = json.loads(cj.read_text())
        d["my_finetuner_run_id"] = "abc"  # a key a fine-tuning tool adds
        cj.write_text(json.dumps(d))
        r = granite("profiles", "show", cj, "-f", "json")
        clean(r, 0)
        assert "warning:" in r.stderr and "'my_finetuner_run_id'" in r.stderr, (name, r.stderr)
        assert r.stderr.count("warning:") == 1, (name, r.stderr)  # nothing else transformers writes is unknown


def test_sliding_window_configs_are_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    for cls, kw in ((transformers.Qwen3Config, dict(head_dim=16, max_window_layers=2)),
                    (transformers.Qwen3MoeConfig, dict(moe_intermediate_size=32, num_experts=4,
                                                       num_experts_per_tok=2))):
        cj = _saved(cls, tmp_path, **SMALL, **kw, use_sliding_window=True, sliding_window=64,
                    max_position_embeddings=4096)
        r = granite("memory-report", "-m", cj, "--ctx", "1k", "--batch", "1")
        clean(r, 2)
        assert "use_sliding_window" in r.stderr and "logits would be wrong" in r.stderr
        # off, or a window the model never reaches: loads
        d = json.loads(cj.read_text())
        d["sliding_window"] = 4096
        cj.write_text(json.dumps(d))
        clean(granite("memory-report", "-m", cj, "--ctx", "1k", "--batch", "1"), 0)


def test_misspelt_key_gets_a_did_you_mean_and_inspect_lists_it(tmp_path):
    d = tmp_path / "ck"
    assert granite("convert", "--from-profile", "tiny-dense", d, "--no-verify").returncode == 0
    cfg = json.loads((d / "config.json").read_text())
    cfg["rms_norm_epsilon"] = 1e-5
    (d / "config.json").write_text(json.dumps(cfg))
    r = granite("inspect", d, "-f", "json")
    clean(r, 0)
    assert "did you mean 'rms_norm_eps'?" in r.stderr
    assert json.loads(r.stdout)["config_keys_ignored"] == "rms_norm_epsilon"
    cfg["hidden_act"] = "gelu"
    (d / "config.json").write_text(json.dumps(cfg))
    r = granite("inspect", d)
    clean(r, 2)
    assert "hidden_act" in r.stderr
