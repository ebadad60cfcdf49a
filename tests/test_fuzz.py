"""Property-based fuzzing of every parser a user's file or option reaches.

For malformed safetensors headers, shard indexes, config.json objects, GGUF headers and metadata,
and CLI values: the outcome is exit 0 (a valid input) or exit 2 with exactly one `error:` line on
stderr, no traceback, and nothing written. Parser-level properties run in-process (thousands of
cases a minute); a sample runs through the real CLI. Reading never allocates more than the file
holds plus a fixed overhead, whatever its header claims (tracemalloc for Python objects, the
project's live-tensor tracker for tensors).

Run: python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import tracemalloc
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from granite_cli.checkpoint import gguf as G
from granite_cli.config import from_hf_dict, load_config
from granite_cli.config.hf import to_hf_dict
from granite_cli.errors import InputError

# CI runs a fixed sample (derandomized: the same cases every run, about a minute in all);
# GRANITE_FUZZ_EXAMPLES=N runs N fresh random cases per parser test (a tenth of that through the CLI).
_N = int(os.environ.get("GRANITE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_N or 400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=not _N)
CLI = settings(max_examples=_N // 10 or 60, deadline=None, suppress_health_check=list(HealthCheck),
               derandomize=not _N)


def cli(*args, cwd: Path) -> tuple[int, str, str]:
    """The real entry point in-process: (exit code, stdout, stderr)."""
    from granite_cli.app import main

    out, err = io.StringIO(), io.StringIO()
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = ["granite", *map(str, args)]
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return code, out.getvalue(), err.getvalue()


def listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


def contract(code: int, err: str, ok_codes=(0, 2)) -> None:
    assert code in ok_codes, err
    assert "Traceback" not in err, err
    if code == 2:
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), err


# ------------------------------------------------------------------------------------ JSON values

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                          max_size=4), max_leaves=12)


@pytest.fixture(scope="module")
def hybrid_hf() -> dict:
    return to_hf_dict(load_config("tiny-hybrid"))


def _accepted_whole_or_refused(parse, d: dict, extra_keys: list[str], values, data, where: str) -> None:
    """Set one to three keys of `d` (or `extra_keys`) to drawn values, or remove them; `parse` must then
    raise a one-line InputError naming `where`, or give a config the core builds on the meta device."""
    import torch

    from granite_cli.model.loading import build_empty
    from granite_cli.params import count_params

    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(d) + extra_keys))
        if data.draw(st.booleans()):
            d[key] = data.draw(values)
        else:
            d.pop(key, None)
    try:
        cfg = parse(d)
    except InputError as e:
        assert str(e).startswith(f"{where}: ") and "\n" not in str(e)
        return
    assert count_params(cfg).total > 0
    build_empty(cfg, torch.float32, "meta")


@FUZZ
@given(data=st.data())
def test_config_json_is_accepted_whole_or_refused_with_input_error(hybrid_hf, data):
    """A config.json with any key set to any JSON value (or removed)."""
    _accepted_whole_or_refused(lambda d: from_hf_dict(d, "fuzz", "config.json"), dict(hybrid_hf),
                               ["time_step_limit", "rope_parameters", "attn_layer_indices"], json_value, data,
                               "config.json")


toml_value = st.one_of(st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.text(max_size=8),
                      st.lists(st.one_of(st.integers(-3, 8), st.text(max_size=9)), max_size=6),
                      st.dictionaries(st.text(max_size=6), st.one_of(st.integers(), st.text(max_size=4)), max_size=3))


@FUZZ
@given(data=st.data())
def test_profile_toml_is_accepted_whole_or_refused_with_input_error(data):
    """A profile (a user's own .toml) with any key set to any TOML value or removed."""
    import tomllib

    from granite_cli.config import from_profile_dict, profiles_dir

    d = tomllib.loads((profiles_dir() / "tiny-hybrid.toml").read_text())
    _accepted_whole_or_refused(lambda d: from_profile_dict(d, "fuzz", "p.toml"), d,
                               ["layer_types", "rope_scaling", "time_step_limit"], toml_value, data, "p.toml")


# ------------------------------------------------------------------------------------ safetensors

DT = ["F32", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F64", "Q4", 7, None]
entry = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(DT),
    "shape": st.one_of(st.lists(st.integers(-2, 5), max_size=3), json_value),
    "data_offsets": st.one_of(st.lists(st.integers(-4, 64), min_size=2, max_size=2), json_value)})
headers = st.one_of(st.dictionaries(st.text(max_size=6), st.one_of(entry, json_value), max_size=5), json_value)


def _write_st(path: Path, header, data: bytes, raw_len: int | None = None) -> None:
    hb = json.dumps(header).encode() if not isinstance(header, bytes) else header
    n = len(hb) if raw_len is None else raw_len
    path.write_bytes(struct.pack("<Q", n) + hb + data)


@FUZZ
@given(header=headers, data=st.binary(max_size=64))
def test_safetensors_reader_never_more_lenient_than_the_reference(tmp_path_factory, header, data):
    """Our reader raises InputError or accepts; when it accepts, the safetensors library accepts the
    same file and reports the same tensors with the same dtypes and shapes."""
    from safetensors import safe_open

    from granite_cli.checkpoint.safetensors import SafetensorsFile

    f = tmp_path_factory.mktemp("st") / "x.safetensors"
    _write_st(f, header, data)
    try:
        ours = SafetensorsFile(f)
    except InputError as e:
        assert "\n" not in str(e)
        return
    with safe_open(str(f), "pt") as ref:
        assert sorted(ref.keys()) == sorted(ours.keys())
        for k in ours.keys():
            assert list(ref.get_slice(k).get_shape()) == list(ours.shape(k))
            assert ref.get_tensor(k).dtype == ours.dtype(k)


@FUZZ
@given(n=st.integers(0, 2**64 - 1), body=st.binary(max_size=40))
def test_safetensors_header_length_is_checked_against_the_file(tmp_path_factory, n, body):
    from granite_cli.checkpoint.safetensors import SafetensorsFile

    f = tmp_path_factory.mktemp("st") / "x.safetensors"
    _write_st(f, body, b"", raw_len=n)
    try:
        SafetensorsFile(f)
    except InputError:
        pass


# ------------------------------------------------------------------------------------ GGUF

@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Path:
    from granite_cli.convert.run import ConvertOptions, convert

    d = tmp_path_factory.mktemp("g")
    convert(None, d / "m.gguf", ConvertOptions(from_profile="tiny-hybrid", verify=False))
    return d / "m.gguf"


@FUZZ
@given(data=st.data())
def test_gguf_mutations_are_read_or_refused_with_input_error(tmp_path_factory, small_gguf, data):
    """Bytes of the header overwritten, inserted or cut: the GGUF source opens (and then reads every
    tensor) or raises InputError; never another exception."""
    from granite_cli.checkpoint.sources import GGUFSource

    raw = bytearray(small_gguf.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["set", "u64", "cut", "insert"]))
        if not raw:
            break
        i = data.draw(st.integers(0, min(4096, len(raw)) - 1))  # the header and metadata
        if op == "set":
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "u64":
            raw[i : i + 8] = struct.pack("<Q", data.draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**60, 2**64 - 1])))
        elif op == "cut":
            raw = raw[: data.draw(st.integers(0, len(raw)))]
        else:
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    f = tmp_path_factory.mktemp("g") / "m.gguf"
    f.write_bytes(bytes(raw))
    try:
        src = GGUFSource(f)
        for n in src.names:
            src.get(n)
    except InputError as e:
        assert "\n" not in str(e)


gguf_value = st.one_of(st.integers(-2**40, 2**40), st.floats(width=32, allow_nan=True), st.text(max_size=8),
                       st.booleans(), st.lists(st.integers(-3, 3), max_size=6),
                       st.lists(st.text(max_size=3), max_size=3))


@FUZZ
@given(data=st.data())
def test_gguf_metadata_values_are_typed_and_ranged(tmp_path_factory, small_gguf, data):
    """Any metadata key of the file re-encoded with any value of any GGUF type: InputError or a
    source whose config the core can build."""
    from granite_cli.checkpoint.sources import GGUFSource

    d = tmp_path_factory.mktemp("g")
    f = G.GGUFFile(small_gguf)
    key = data.draw(st.sampled_from(sorted(k for k in f.kv if not k.startswith("tokenizer"))))
    value = data.draw(gguf_value)
    _rewrite(f, d / "bad.gguf", {key: value})
    try:
        src = GGUFSource(d / "bad.gguf")
    except InputError as e:
        assert "\n" not in str(e)
        return
    import torch

    from granite_cli.model.loading import build_empty

    build_empty(src.cfg, torch.float32, "meta")


def _rewrite(f: G.GGUFFile, dst: Path, change: dict) -> None:
    """f with its metadata re-encoded (types from the Python values) and `change` applied."""
    kv = {**f.kv, **change}
    w = G.GGUFWriter(dst, [G.KV.of(k, v) for k, v in kv.items()], list(f.tensors.values()))
    for n in f.tensors:
        w.write(n, f.raw(n))
    w.close()


# ------------------------------------------------------------------------------------ CLI, end to end

def _ckpt(tmp: Path) -> Path:
    from granite_cli.convert.run import ConvertOptions, convert

    convert(None, tmp / "ckpt", ConvertOptions(from_profile="tiny-hybrid", verify=False, shard_size="20KB"))
    return tmp / "ckpt"


@pytest.fixture(scope="module")
def sharded_ckpt(tmp_path_factory) -> Path:
    return _ckpt(tmp_path_factory.mktemp("c"))


@CLI
@given(wm=st.one_of(json_value, st.dictionaries(st.text(max_size=20), st.one_of(
    st.sampled_from(["../x.safetensors", "/etc/passwd", "a/b.safetensors", "model-00001-of-00040.safetensors",
                     "", ".", "model.safetensors"]), json_value), max_size=3)))
def test_cli_index_weight_map(tmp_path_factory, sharded_ckpt, wm):
    import shutil

    d = tmp_path_factory.mktemp("i")
    shutil.copytree(sharded_ckpt, d / "ckpt")
    (d / "ckpt" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    before = listing(d)
    code, out, err = cli("convert", "inspect", d / "ckpt", "-f", "json", cwd=d)
    contract(code, err, ok_codes=(2,))
    assert listing(d) == before


@CLI
@given(header=headers)
def test_cli_safetensors_header(tmp_path_factory, header):
    d = tmp_path_factory.mktemp("s")
    (d / "ckpt").mkdir()
    (d / "ckpt" / "config.json").write_text(json.dumps(to_hf_dict(load_config("tiny-hybrid"))))
    _write_st(d / "ckpt" / "model.safetensors", header, b"\0" * 16)
    before = listing(d)
    code, out, err = cli("convert", d / "ckpt", d / "out", cwd=d)
    contract(code, err, ok_codes=(2,))
    assert listing(d) == before


@CLI
@given(data=st.data())
def test_cli_config_json(tmp_path_factory, hybrid_hf, data):
    d = tmp_path_factory.mktemp("j")
    cfg = dict(hybrid_hf)
    key = data.draw(st.sampled_from(sorted(cfg)))
    cfg[key] = data.draw(json_value)
    raw = data.draw(st.one_of(st.just(json.dumps(cfg).encode()), st.binary(max_size=64)))
    (d / "config.json").write_bytes(raw)
    before = listing(d)
    code, out, err = cli("memory-report", "-m", d / "config.json", "--ctx", "1k", "--batch", "1", "-f", "json", cwd=d)
    contract(code, err)
    if code == 0:
        json.loads(out)
    assert listing(d) == before


size_text = st.one_of(st.text(max_size=12), st.from_regex(r"-?[0-9]{1,25}[kKmMgG]?(-[0-9]{1,8}[kK]?([*+][0-9]{1,7})?)?",
                                                           fullmatch=True))


@CLI
@given(ctx=size_text, batch=size_text,
       budget=st.one_of(size_text, st.from_regex(r"[0-9.e]{1,8}[GMK]i?B", fullmatch=True)))
def test_cli_memory_report_values(tmp_path_factory, ctx, batch, budget):
    d = tmp_path_factory.mktemp("m")
    code, out, err = cli("memory-report", "-m", "tiny-hybrid", "--ctx", ctx, "--batch", batch, "--budget", budget,
                         "-f", "json", cwd=d)
    contract(code, err, ok_codes=(0, 2, 3))
    assert list(d.iterdir()) == []


@CLI
@given(shard=st.one_of(size_text, st.from_regex(r"[0-9.e]{1,6}(GB|MB|KB|GiB)", fullmatch=True)),
       seed=st.one_of(st.integers(-2**70, 2**70), st.text(max_size=6)), dtype=st.text(max_size=6))
def test_cli_convert_values(tmp_path_factory, shard, seed, dtype):
    d = tmp_path_factory.mktemp("v")
    code, out, err = cli("convert", "--from-profile", "tiny-hybrid", d / "o", "--dry-run", "--shard-size", shard,
                         "--seed", seed, "--dtype", dtype, "-f", "json", cwd=d)
    contract(code, err)
    assert list(d.iterdir()) == []


# ------------------------------------------------------------------------------------ memory bounds

def _peak_reading(f: Path, reader) -> int:
    """Python-heap and tensor bytes allocated at the peak while reader(f) runs (InputError allowed)."""
    from granite_cli.memory.trace import LiveTensorBytes

    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        with LiveTensorBytes() as live:
            try:
                reader(f)
            except InputError:
                pass
        return tracemalloc.get_traced_memory()[1] + live.peak
    finally:
        tracemalloc.stop()


def _gguf_header(nt: int, kvs: list[bytes]) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, nt, len(kvs)) + b"".join(kvs)


def _kstr(s: str) -> bytes:
    return struct.pack("<Q", len(s)) + s.encode()


def _gguf_read_all(f: Path) -> None:
    g = G.GGUFFile(f)
    for n in g.tensors:
        g.tensor(n, copy=True)


def _st_read_all(f: Path) -> None:
    from granite_cli.checkpoint.safetensors import SafetensorsFile

    s = SafetensorsFile(f)
    for n in s.keys():
        s.read(n)


OVERHEAD = 2 * 2**20  # the fixed part: parser state, one metadata dict, small objects


@pytest.mark.parametrize("name,make", [
    ("tensor count 2^60", lambda: _gguf_header(2**60, []) + b"\0" * 2**20),
    ("metadata count 2^60", lambda: b"GGUF" + struct.pack("<IQQ", 3, 0, 2**60) + b"\0" * 2**20),
    ("key length 2^62", lambda: _gguf_header(0, [struct.pack("<Q", 2**62)]) + b"\0" * 2**20),
    ("string array of 2^61 items", lambda: _gguf_header(0, [_kstr("a") + struct.pack("<IIQ", G.ARR, G.STR, 2**61)])
     + b"\0" * 2**20),
    ("u8 array of 2^60 items", lambda: _gguf_header(0, [_kstr("a") + struct.pack("<IIQ", G.ARR, G.U8, 2**60)])
     + b"\0" * 2**20),
    ("a real 1 MiB u8 array", lambda: _gguf_header(0, [_kstr("a") + struct.pack("<IIQ", G.ARR, G.U8, 2**20)
                                                       + b"\x07" * 2**20])),
    ("131072 two-byte strings", lambda: _gguf_header(0, [_kstr("a") + struct.pack("<IIQ", G.ARR, G.STR, 2**17)
                                                         + _kstr("xy") * 2**17])),
    ("tensor of 2^40 x 2^20 floats",
     lambda: _gguf_header(1, [_kstr("t") + struct.pack("<I2QIQ", 2, 2**20, 2**40, 0, 0)]) + b"\0" * 2**20),
    ("tensor of 2^62 dims", lambda: _gguf_header(1, [_kstr("t") + struct.pack("<I", 2**31)]) + b"\0" * 2**20),
])
def test_reading_a_gguf_allocates_at_most_the_file_plus_a_fixed_overhead(tmp_path, name, make):
    f = tmp_path / "x.gguf"
    f.write_bytes(make())
    assert _peak_reading(f, _gguf_read_all) <= f.stat().st_size + OVERHEAD


@pytest.mark.parametrize("name,make", [
    ("header length 2^63", lambda: struct.pack("<Q", 2**63) + b"{}" + b"\0" * 2**20),
    ("tensor of 2^40 x 2^40", lambda: _st(b'{"t":{"dtype":"F32","shape":[1099511627776,1099511627776],'
                                          b'"data_offsets":[0,4]}}', 2**20)),
    ("offsets beyond the file", lambda: _st(b'{"t":{"dtype":"U8","shape":[1152921504606846976],'
                                            b'"data_offsets":[0,1152921504606846976]}}', 2**20)),
    ("one real 1 MiB tensor", lambda: _st(b'{"t":{"dtype":"U8","shape":[1048576],"data_offsets":[0,1048576]}}', 2**20)),
])
def test_reading_safetensors_allocates_at_most_the_file_plus_a_fixed_overhead(tmp_path, name, make):
    f = tmp_path / "x.safetensors"
    f.write_bytes(make())
    assert _peak_reading(f, _st_read_all) <= f.stat().st_size + OVERHEAD


def _st(header: bytes, data_len: int) -> bytes:
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + b"\x01" * data_len


# ------------------------------------------------------------------------------------ atheris findings

DATA = Path(__file__).parent / "data"


def test_atheris_finding_a_config_asking_for_8e15_layers_is_refused_before_any_table_is_built():
    from granite_cli.config import read_json_config

    with pytest.raises(InputError, match="at most"):
        from_hf_dict(read_json_config(DATA / "atheris-config-8e15-layers.json"), "x", "config.json")


def test_atheris_finding_gguf_tensor_shapes_that_disagree_with_the_metadata_are_refused():
    from granite_cli.checkpoint.sources import GGUFSource

    with pytest.raises(InputError, match="has shape .* the metadata implies"):
        GGUFSource(DATA / "atheris-gguf-shape-mismatch.bin")
