"""The third hostile pass: nobody else's code runs in granite, no server text runs in the report, no
output destroys another, and impossible numbers are never measurements.

Each case checks what a user would: the exit code, one stderr line, no traceback, nothing lost, no
secret, no live link, and (for the kernel cache) that a planted library's constructor never ran.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from granite_cli.html import _SCRIPT, _inline, markdown_to_html
from granite_cli.ops import native
from granite_cli.render import md_code, md_text
from tests.conftest import one_error
from tests.hostile_server import good_tokens, send_events, send_json
from tests.test_hostile import KEY, RUN, clean, granite, sweep

needs_cc = pytest.mark.skipif(native._compiler() is None, reason="no C compiler")


# ---- 1 and 7: the kernel cache runs nothing granite did not build -----------------------------------

PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *p = getenv("GRANITE_PLANTED_MARK");
    if (p) { FILE *f = fopen(p, "w"); if (f) { fputs("the planted library ran", f); fclose(f); } }
}
int not_the_kernel(void) { return 1; }
"""


@pytest.fixture(scope="module")
def planted_library(tmp_path_factory) -> bytes:
    """A shared library that is not the kernel: its constructor writes the file $GRANITE_PLANTED_MARK."""
    if native._compiler() is None:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("planted")
    (d / "p.c").write_text(PLANTED_C)
    subprocess.run([native._compiler(), "-shared", "-fPIC", str(d / "p.c"), "-o", str(d / "p.so")], check=True,
                   stdin=subprocess.DEVNULL, timeout=120)
    return (d / "p.so").read_bytes()


def _kernel_path(cache: Path, monkeypatch) -> Path:
    """Where a granite run with GRANITE_CACHE_DIR=cache looks for its kernel."""
    monkeypatch.setenv("GRANITE_CACHE_DIR", str(cache))
    return native.library_path(native._compiler())


def _plant(path: Path, data: bytes, digest: bool = True, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    if digest:  # the worst case: whoever planted it knows how granite records its builds
        native.digest_path(path).write_text(hashlib.sha256(data).hexdigest() + "\n")
        os.chmod(native.digest_path(path), mode)


DECODE = ["bench", "-m", "tiny-hybrid", "--ctx", "=32", "--batch", "1", "--phase", "decode", "--gen", "2", "--reps",
          "1", "--warmup", "0", "-f", "json"]


def _decode_in_a_new_process(cache: Path, mark: Path) -> dict:
    """A decode case run as a user runs it; asserts the planted constructor never ran; returns the row."""
    r = granite(*DECODE, env={"GRANITE_CACHE_DIR": str(cache), "GRANITE_PLANTED_MARK": str(mark)}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not mark.exists(), "the planted library's constructor ran inside granite"
    (row,) = json.loads(r.stdout)["rows"]
    assert row["status"] == "ok"
    return row


def _shared_folder(tmp_path, monkeypatch, data):
    cache = tmp_path / "shared"
    cache.mkdir(mode=0o777)
    os.chmod(cache, 0o777)  # a cache folder everyone may write, as a shared one is
    lib = _kernel_path(cache, monkeypatch)
    lib.parent.mkdir(mode=0o777)
    os.chmod(lib.parent, 0o777)
    _plant(lib, data)
    return cache, lib, "writable by other users"


def _other_users_file(tmp_path, monkeypatch, data):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another uid")
    cache = tmp_path / "cache"
    lib = _kernel_path(cache, monkeypatch)
    _plant(lib, data)
    for p in (lib, native.digest_path(lib)):
        os.chown(p, 4242, 4242)
    return cache, lib, "belongs to uid 4242"


def _symbolic_link(tmp_path, monkeypatch, data):
    cache = tmp_path / "cache"
    lib = _kernel_path(cache, monkeypatch)
    elsewhere = tmp_path / "elsewhere.so"
    elsewhere.write_bytes(data)
    lib.parent.mkdir(parents=True)
    lib.symlink_to(elsewhere)
    native.digest_path(lib).write_text(hashlib.sha256(data).hexdigest())
    return cache, lib, "not trusted"


def _world_writable_file(tmp_path, monkeypatch, data):
    cache = tmp_path / "cache"
    lib = _kernel_path(cache, monkeypatch)
    _plant(lib, data, mode=0o666)
    return cache, lib, "writable by other users (mode 0666)"


def _unrecorded_file(tmp_path, monkeypatch, data):
    cache = tmp_path / "cache"
    lib = _kernel_path(cache, monkeypatch)
    _plant(lib, data, digest=False)  # the user's own file, of granite's name, but not one granite built
    return cache, lib, "not a library granite recorded"


@needs_cc
@pytest.mark.parametrize("plant", [_shared_folder, _other_users_file, _symbolic_link, _world_writable_file,
                                   _unrecorded_file])
def test_a_planted_library_is_never_loaded_and_decode_still_runs_natively(plant, planted_library, tmp_path,
                                                                         monkeypatch):
    cache, lib, why = plant(tmp_path, monkeypatch, planted_library)
    before = os.lstat(lib)
    row = _decode_in_a_new_process(cache, tmp_path / "mark")
    assert row["decode_mode"] == "native", row["decode_note"]
    assert "privately for this run" in row["decode_note"] and why in row["decode_note"], row["decode_note"]
    after = os.lstat(lib)  # what granite did not write, it leaves as it was
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)


@needs_cc
def test_a_recorded_library_without_the_kernels_symbols_falls_back(planted_library, tmp_path, monkeypatch):
    """Even a library that passes every check (this user's, recorded) but is not the kernel only costs a
    private build: no decode case errors."""
    cache = tmp_path / "cache"
    lib = _kernel_path(cache, monkeypatch)
    _plant(lib, planted_library)
    os.chmod(cache, 0o700)
    os.chmod(lib.parent, 0o700)
    r = granite(*DECODE, env={"GRANITE_CACHE_DIR": str(cache)}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads(r.stdout)["rows"]
    assert row["decode_mode"] == "native" and "not a loadable decode kernel" in row["decode_note"]


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """The kernel module as in a new process, with its cache in an empty private folder."""
    monkeypatch.setenv("GRANITE_CACHE_DIR", str(tmp_path / "cache"))
    for name, value in (("_lib", None), ("_error", None), ("build_note", None)):
        monkeypatch.setattr(native, name, value)
    return tmp_path / "cache"


@needs_cc
def test_the_cache_is_made_private_and_its_build_recorded(fresh, monkeypatch):
    assert native.load() is not None
    lib = native.library_path(native._compiler())
    assert {p.name for p in lib.parent.iterdir()} == {lib.name, native.digest_path(lib).name, ".build.lock"}
    assert native.digest_path(lib).read_text().strip() == hashlib.sha256(lib.read_bytes()).hexdigest()
    for folder in (fresh, lib.parent):
        assert os.stat(folder).st_mode & 0o777 == 0o700
    assert os.stat(lib).st_mode & 0o022 == 0
    assert native.status() == f"built: {lib}"
    # one byte changed after the build: not granite's library any more, never loaded, never replaced
    data = bytearray(lib.read_bytes())
    data[-1] ^= 1
    lib.write_bytes(bytes(data))
    monkeypatch.setattr(native, "_lib", None)
    assert native.will_build() and "SHA-256 differs" in native.status()
    assert native.load() is not None and "privately for this run" in native.build_note
    assert lib.read_bytes() == bytes(data)


@needs_cc
def test_a_cache_folder_others_can_write_is_named_before_the_build(fresh, monkeypatch):
    fresh.mkdir(mode=0o777)
    os.chmod(fresh, 0o777)
    assert native.status().startswith("built privately for each run") and "mode 0777" in native.status()
    assert native.build_plan().startswith("building the CPU decode kernel privately for this run")
    assert native.load() is not None
    assert not (fresh / "kernels").exists()  # nothing is written where others could swap it


def test_folder_checks_cover_every_level(tmp_path):
    root = tmp_path / "root"
    (root / "kernels").mkdir(parents=True)
    os.chmod(root, 0o700)
    os.chmod(root / "kernels", 0o700)
    assert native.folder_problem(root / "kernels", root) is None
    os.chmod(root / "kernels", 0o775)
    assert "writable by other users" in native.folder_problem(root / "kernels", root)
    os.chmod(root / "kernels", 0o700)
    open_above = tmp_path / "open"
    open_above.mkdir()
    os.chmod(open_above, 0o777)  # a folder above the root that anyone may rename things in
    (open_above / "root" / "kernels").mkdir(parents=True, mode=0o700)
    os.chmod(open_above / "root", 0o700)
    assert "above the cache is writable" in native.folder_problem(open_above / "root" / "kernels",
                                                                   open_above / "root")
    os.chmod(open_above, 0o1777)  # sticky, as /tmp: nobody else can rename our folder
    assert native.folder_problem(open_above / "root" / "kernels", open_above / "root") is None
    link = tmp_path / "link"
    link.symlink_to(root)
    assert "symbolic link" in native.folder_problem(link / "kernels", link)


# ---- 2: no server text runs or links in report.html -------------------------------------------------

HOSTILE_TEXT = [
    "[click](javascript:alert(1))",
    "[a](JaVaScRiPt:alert(document.cookie))",
    "[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "![img](javascript:alert(1))",
    "x` [a](javascript:alert(1)) `y",
    "`` `[a](javascript:alert(1))` ``",
    "```\n[a](javascript:alert(1))",
    "\\[a](javascript:alert(1))",
    "**[b](javascript:alert(1))**",
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "<javascript:alert(1)>",
    "<a href=\"javascript:alert(1)\">x</a>",
    "[a](https://evil.example/phish)",
    "| a | [b](javascript:alert(1)) |",
    "x\n# heading\n- [a](javascript:alert(1))",
    "&lt;script&gt;",
]


class _Page(HTMLParser):
    """Every tag, attribute and script of a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self.text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        (self.scripts if self._in_script else self.text).append(data)


def assert_inert(page: str) -> _Page:
    """The page links to nothing, runs nothing but granite's own sorting script, and fetches nothing."""
    p = _Page()
    p.feed(page)
    assert not [t for t, _ in p.tags if t in ("a", "iframe", "object", "embed", "form", "base", "meta") and
                not (t == "meta" and set(_) <= {"charset", "name", "content"})], p.tags
    for tag, attrs in p.tags:
        for name, value in attrs.items():
            assert not name.lower().startswith("on"), (tag, name)
            assert name != "href", (tag, attrs)
            if name == "src":
                assert tag == "img" and value.startswith("data:image/png;base64,"), (tag, value[:80])
            assert "javascript:" not in (value or "").lower(), (tag, name, value)
    assert [s.strip() for s in p.scripts] == [_SCRIPT.strip()]
    return p


@pytest.mark.parametrize("text", HOSTILE_TEXT)
def test_hostile_text_renders_as_text_in_every_position(text, tmp_path):
    flat = " ".join(text.split("\n"))
    md = "\n".join([f"# report {md_text(text)}", "", f"- served: {md_code(text)}, by {md_text(text)}", "",
                    "| model | cpu |", "|---|---|", f"| {md_text(text)} | x |", "",
                    f"paragraph {md_text(text)}"])
    page = assert_inert(markdown_to_html(md, tmp_path, "t"))
    body = "".join(page.text)
    assert body.count(flat) == 5, body  # the heading, both bullet values, the table cell and the paragraph
    assert html.escape(flat) in markdown_to_html(md, tmp_path, "t")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60))
def test_escaped_text_comes_back_as_itself(text):
    """md_text and md_code are exact: whatever the text (line breaks made spaces), the page shows it and
    makes no markup of it."""
    flat = re.sub(r"[\r\n\x0b\x0c\x85\u2028\u2029]+", " ", text)
    shown = _inline(md_text(text), Path("."))
    assert "<" not in shown and html.unescape(shown) == flat
    code = _inline(md_code(text), Path("."))
    if flat:
        assert code.startswith("<code>") and code.endswith("</code>") and html.unescape(code[6:-7]) == flat
        assert "<" not in code[6:-7]


def test_report_of_a_hostile_server_and_dataset_has_no_live_link(server, tmp_path):
    evil = "[x](javascript:alert(1))` [y](data:text/html,z) `"
    srv = server({
        "/v1/models": lambda h, b: send_json(h, {"data": [{"id": "m [a](javascript:alert(1)) `b`", "owned_by": evil}]}),
        "/version": lambda h, b: send_json(h, {"version": evil}),
        "/props": lambda h, b: send_json(h, {"build_info": evil, "total_slots": 1}),
    })
    data = tmp_path / "[d](javascript:alert(1)).jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"hello number {i}"}) for i in range(4)) + "\n")
    r = granite("bench", "--endpoint", f"h={srv.url}", "--api-key", KEY, "--ctx", "64", "--batch", "1", "--gen", "4",
                "--requests", "2", "--warmup", "0", "--dataset", data, "--out", tmp_path / "rep", "-f", "json")
    clean(r, 0)
    page = (tmp_path / "rep" / "report.html").read_text()
    text = "".join(assert_inert(page).text)
    assert "m [a](javascript:alert(1)) `b`" in text and "[d](javascript:alert(1)).jsonl" in text


# ---- 3: one run's outputs never write over each other or over an input ------------------------------

def _collisions(tmp: Path) -> list[tuple[list, str]]:
    rep, rows = tmp / "rep", tmp / "rows.jsonl"
    base = tmp / "base.jsonl"
    data = tmp / "data.jsonl"
    hard = tmp / "hardlink.jsonl"
    return [
        (["--out", rep, "--requests-out", rep / "rows.jsonl"], "--requests-out"),
        (["--out", rep, "--requests-out", rep / "requests.jsonl"], "inside --out"),
        (["--jsonl", rows, "--requests-out", rows], "same file"),
        (["--jsonl", rows, "--requests-out", tmp / "." / "rows.jsonl"], "same file"),
        (["--jsonl", rows, "--requests-out", hard], "same file"),
        (["--jsonl", base, "--baseline", base], "--baseline"),
        (["--requests-out", base, "--baseline", base], "--baseline"),
        (["--requests-out", data, "--dataset", data], None),
        (["--out", rep, "--jsonl", rep / "other.jsonl"], "inside --out"),
        (["--out", rep, "--jsonl", rep / "rows.jsonl"], "inside --out"),
    ]


def test_every_output_collision_is_refused_before_any_request(server, tmp_path):
    calls = []
    srv = server({"/v1/models": lambda h, b: (calls.append(1), send_json(h, {"data": [{"id": "m"}]}))})
    rows = tmp_path / "rows.jsonl"
    first = granite("bench", "--endpoint", f"h={srv.url}", *RUN, "--jsonl", rows, "-f", "json")
    clean(first, 0)
    os.link(rows, tmp_path / "hardlink.jsonl")
    shutil.copy(rows, tmp_path / "base.jsonl")
    (tmp_path / "data.jsonl").write_text(json.dumps({"prompt": "hello"}) + "\n")
    kept = {p: p.read_bytes() for p in (rows, tmp_path / "base.jsonl", tmp_path / "data.jsonl")}
    calls.clear()
    for args, words in _collisions(tmp_path):
        r = granite("bench", "--endpoint", f"h={srv.url}", *RUN, *args, "-f", "json")
        one_error(r, 2, *([words] if words else []))
        assert r.stdout == "", (args, r.stdout)
    assert calls == [], "a server was asked before the outputs were checked"
    for p, b in kept.items():
        assert p.read_bytes() == b, f"{p} changed"
    assert not (tmp_path / "rep").exists()


# ---- 4: a URL's user name is not the key ------------------------------------------------------------

@pytest.mark.parametrize("user", ["token", "model", "api", "prompt_tokens", "u"])
def test_a_url_user_name_is_masked_in_urls_only_and_never_breaks_a_record(server, tmp_path, user):
    srv = server({})
    port = srv.url.rsplit(":", 1)[1]
    rows = tmp_path / "rows.jsonl"
    r = granite("bench", "--endpoint", f"h=http://{user}:{KEY}@127.0.0.1:{port}", *RUN, "--jsonl", rows, "-f", "json",
                "--out", tmp_path / "rep")
    (row,) = clean(r, 0, rows)
    out = json.loads(r.stdout)
    assert out["rows"][0]["model"] == "h" and "prompt_tokens_measured" in out["rows"][0]
    assert row["api"] == "completions" and row["requests_ok"] == 2 and "***" not in json.dumps(row)
    assert f"Bearer {KEY}" in srv.auth  # the password is the key
    for f in (tmp_path / "rep").iterdir():
        assert KEY.encode() not in f.read_bytes()


def test_a_lone_user_name_is_the_key_and_masked_everywhere(server, tmp_path):
    srv = server({"/version": lambda h, b: send_json(h, {"version": "echo " + KEY})})
    port = srv.url.rsplit(":", 1)[1]
    r = granite("bench", "--endpoint", f"h=http://{KEY}@127.0.0.1:{port}", *RUN, "-f", "json")
    clean(r, 0)
    assert f"Bearer {KEY}" in srv.auth and "echo ***" in r.stdout


def test_masking_never_touches_our_own_keys(monkeypatch):
    from granite_cli import redact

    monkeypatch.setattr(redact, "_secrets", set())
    monkeypatch.setattr(redact, "_runs", set())
    redact.register("tokens")
    rec = {"prompt_tokens": 3, "cached_tokens": "all tokens"}
    assert redact.scrub(rec) == {"prompt_tokens": 3, "cached_tokens": "all ***"}


# ---- 5: a large dataset under --duration is taken lazily --------------------------------------------

def test_a_100k_row_dataset_under_duration_tokenizes_only_what_it_sends(server, tmp_path):
    calls = {"tokenize": 0}

    def tokenize(h, b):
        calls["tokenize"] += 1
        send_json(h, {"tokens": list(range(len(str(b.get("content", "")).split())))})

    srv = server({"/tokenize": tokenize})
    data = tmp_path / "big.jsonl"
    with open(data, "w") as f:
        for i in range(100_000):
            f.write(json.dumps({"prompt": f"prompt number {i} with a few words"}) + "\n")
    t0 = time.monotonic()
    r = granite("bench", "--endpoint", f"h={srv.url}", "--ctx", "64", "--batch", "1", "--gen", "2", "--warmup", "0",
                "--duration", "2", "--dataset", data, "-f", "json", timeout=120)
    clean(r, 0)
    (row,) = json.loads(r.stdout)["rows"]
    assert row["status"] == "ok" and row["requests_ok"] >= 1
    assert calls["tokenize"] < 2_000, calls  # one per prompt sent, and the probe's; not one per row
    assert time.monotonic() - t0 < 110


# ---- 6: impossible numbers are error rows or dropped sources, never measurements --------------------

def _answer(usage, text="x", chunks=None):
    def route(h, body):
        if not body.get("stream"):
            return send_json(h, {"choices": [{"text": "x", "finish_reason": "length"}],
                                 "usage": {"prompt_tokens": 4, "completion_tokens": 1}})
        n = body.get("max_tokens") or 4
        evs = [{"choices": [{"text": text, "index": 0, "finish_reason": None}]}
               for _ in range(n - 1 if chunks is None else chunks)]
        evs.append({"choices": [{"text": "" if chunks == 0 else text, "index": 0, "finish_reason": "stop"}],
                    "usage": usage})
        send_events(h, evs if chunks != 0 else evs[-1:])
    return route


@pytest.mark.parametrize("name,route,kind", [
    ("cached beyond the prompt, prompt_tokens left out",
     _answer({"completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 99_999}}), "bad_usage"),
    ("llama.cpp's cache_n beyond the prompt", None, "ok"),
    ("no token at all", _answer({"completion_tokens": 0}, chunks=0), "no_output"),
    ("no chunk and no usage", _answer(None, chunks=0), "no_output"),
    ("zero tokens reported beside chunks", _answer({"prompt_tokens": 16, "completion_tokens": 0}), "no_output"),
])
def test_impossible_answers_are_error_rows_of_their_kind(server, tmp_path, name, route, kind):
    if route is None:  # timings.cache_n beyond the prompt: the count is left out, the request is fine
        def route(h, body):
            if not body.get("stream"):
                return send_json(h, {"choices": [{"text": "x", "finish_reason": "length"}],
                                     "usage": {"prompt_tokens": 4, "completion_tokens": 1}})
            evs = good_tokens(h, body)
            del evs[-1]["usage"]
            evs[-1]["timings"] = {"cache_n": 10**6, "prompt_n": 3}
            send_events(h, evs)
    srv = server({"/v1/completions": route})
    r, rows = sweep(srv, tmp_path)
    stored = clean(r, 0 if kind == "ok" else 1, rows)
    (row,) = stored
    if kind == "ok":
        assert row["status"] == "ok" and row["cached_prompt_tokens"] is None
    else:
        assert row["status"] == "error" and row["errors"] == {kind: 2}, row
        assert row["requests_ok"] == 0 and row["tokens_per_s"] is None


def _send_text(h, body: str) -> None:
    """A Prometheus page."""
    h.send_response(200)
    h.send_header("Content-Type", "text/plain")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body.encode())


def test_impossible_prefix_counters_are_dropped_with_a_note(server, tmp_path):
    n = {"k": 0}

    def metrics(h, b):
        n["k"] += 1
        _send_text(h, f"vllm:prefix_cache_queries_total 100\nvllm:prefix_cache_hits_total {100 + 50 * n['k']}\n"
                      "vllm:num_requests_running 1\n")

    srv = server({"/metrics": metrics})
    r, rows = sweep(srv, tmp_path)
    (row,) = clean(r, 0, rows)
    assert row["server_prefix_hits"] is None and row["server_prefix_queries"] is None
    assert "impossible" in row["server_metrics"] and "prefix_cache_hits_total" in row["server_metrics"]


def test_negative_dcgm_power_is_dropped_with_a_note(server, tmp_path):
    def dcgm(h, b):
        _send_text(h, 'DCGM_FI_DEV_POWER_USAGE{gpu="0"} -250\nDCGM_FI_DEV_GPU_UTIL{gpu="0"} 50\n')

    srv = server({"/metrics": dcgm})
    r, rows = sweep(srv, tmp_path, "--dcgm", srv.url)
    (row,) = clean(r, 0, rows)
    assert row["energy_j"] is None and row["power_w_mean"] is None
    assert "not a GPU's power" in (row["energy_source"] or ""), row["energy_source"]


# ---- 8 and 9: options an engine would ignore, and messages that name the option ----------------------

@pytest.mark.parametrize("engine", ["llama.cpp", "none"])
@pytest.mark.parametrize("flag,value", [("--gpu-util", "0.8"), ("--kv-budget", "40GiB"), ("--max-num-seqs", "64"),
                                        ("--max-num-batched-tokens", "4096"), ("--block-size", "32"),
                                        ("--prefix-caching", None)])
def test_vllm_settings_under_another_engine_are_refused(engine, flag, value):
    r = granite("memory-report", "-m", "granite-4.0-h-tiny", "--engine", engine, flag, *([value] if value else []))
    one_error(r, 2, flag, "vLLM setting", f"--engine {engine}")


@pytest.mark.parametrize("args,words", [
    (["memory-report", "--kv-budget", "100GiB"], ["--kv-budget", "more than the GPU's 79.65 GiB"]),
    (["memory-report", "--kv-budget", "30GiB", "--gpu", "l4"], ["--kv-budget", "more than the GPU's"]),
    (["memory-report", "--budget", "10XB"], ["bad --budget '10XB'"]),
    (["memory-report", "--kv-budget", "lots"], ["bad --kv-budget 'lots'"]),
    (["memory-report", "--gpu", "10XB"], ["unknown --gpu '10XB'"]),
    (["convert", "--from-profile", "tiny-hybrid", "OUT", "--shard-size", "1QB"], ["bad --shard-size '1QB'"]),
    (["bench", "--endpoint", "http://127.0.0.1:1", "--rate", ""], ["bad --rate ''"]),
    (["bench", "--endpoint", "http://127.0.0.1:1", "--dcgm", ""], ["--dcgm ''"]),
])
def test_bad_values_name_their_option(args, words, tmp_path):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    one_error(granite(*args), 2, *words)
    assert not (tmp_path / "out").exists()


def test_a_kv_budget_sizes_only_its_own_gpu():
    r = granite("memory-report", "-m", "granite-4.0-h-tiny", "--kv-budget", "40GiB", "--ctx", "32k", "-f", "json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert {c["gpu"] for c in rep["capacity"]} == {"h100-80gb"}


def test_layer_types_longer_than_the_model_are_refused_with_the_right_count(tmp_path):
    cfg = {"model_type": "qwen3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_hidden_layers": 4,
           "max_position_embeddings": 64, "use_sliding_window": True, "sliding_window": 16,
           "layer_types": ["sliding_attention"] * 6}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    one_error(granite("memory-report", "-m", tmp_path / "config.json"), 2,
              "layer_types has 6 entries for num_hidden_layers 4")
    cfg["layer_types"] = ["full_attention", "full_attention", "sliding_attention", "full_attention"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    one_error(granite("memory-report", "-m", tmp_path / "config.json"), 2, "on 1 layer(s) (from layer 2)")


def test_an_unknown_key_is_warned_once_naming_the_users_file(tmp_path):
    src = tmp_path / "src"
    r = granite("convert", "--from-profile", "tiny-hybrid", src, "--no-verify")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((src / "config.json").read_text())
    cfg["my_extra_key"] = 1
    (src / "config.json").write_text(json.dumps(cfg))
    for dst in (tmp_path / "out", tmp_path / "out.gguf"):
        r = granite("convert", src, dst)
        assert r.returncode == 0, r.stderr
        warns = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
        assert len(warns) == 1 and "my_extra_key" in warns[0] and str(src) in warns[0], r.stderr
        assert ".partial" not in r.stderr


# ---- the suite itself: a server that must exit does --------------------------------------------------

def test_llama_server_load_only_exits_with_stdin_from_dev_null(tmp_path):
    pytest.importorskip("xllamacpp")
    gguf = tmp_path / "m.gguf"
    r = granite("convert", "--from-profile", "tiny-hybrid", gguf, "--no-verify")
    assert r.returncode == 0, r.stderr
    import socket

    root = Path(__file__).resolve().parent.parent
    for _ in range(3):  # three starts in a row: the hang showed 2 of 3 times
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, str(root / "benchmarks" / "llama_server.py"), str(gguf), "--port",
                            str(port), "--load-only", "--threads", "1"], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and p.stdout.strip() == "ready", p.stderr[-2000:]
        assert time.monotonic() - t0 < 100
