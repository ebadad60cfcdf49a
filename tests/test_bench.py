"""granite bench: spec parsing, the scaling fit, rows, resume, failure rows, and a CLI smoke run.

Run: python -m pytest -q tests/test_bench.py
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from granite_cli.bench import runner as runner_mod
from granite_cli.bench.analysis import analyse, check_claims, regressions
from granite_cli.bench.fit import describe, fit_scaling
from granite_cli.bench.row import Row
from granite_cli.bench.rows import JsonlStore, finished_keys
from granite_cli.bench.runner import Runner
from granite_cli.bench.spec import SweepSpec, load_sweep_file, run_defaults
from granite_cli.errors import InputError
from granite_cli.sizes import parse_list, parse_size


def test_sizes_lists_and_ranges():
    assert parse_size("4k") == 4096 and parse_size("128K") == 131072 and parse_size("1m") == 2**20
    assert parse_list("1k,4k,128k") == [1024, 4096, 131072]
    assert parse_list("1k-128k*2") == [1024 * 2**i for i in range(8)]
    assert parse_list("512-2k+512") == [512, 1024, 1536, 2048]
    assert parse_list("1,4,1-8*2") == [1, 2, 4, 8]


@pytest.mark.parametrize("bad", ["12x", "-4", "0", "4k-1k", "1k-4k*1", "", "1k--2k"])
def test_bad_sizes_are_input_errors(bad):
    with pytest.raises(InputError):
        parse_list(bad)


def test_sweep_file(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text('models = ["tiny-hybrid"]\nctx = "64-256*2"\nbatch = [1, 2]\nreps = 2\n')
    d = load_sweep_file(p)
    assert d["ctx"] == [64, 128, 256] and d["batch"] == [1, 2] and d["reps"] == 2
    p.write_text("contexts = [1]\n")
    with pytest.raises(InputError, match="unknown key 'contexts'"):
        load_sweep_file(p)


def test_run_defaults_quick_only_where_time_demands_it():
    assert run_defaults(gpu=False, default_sweep=True, max_ctx=8192) == {"reps": 1, "warmup": 0}
    assert run_defaults(gpu=False, default_sweep=False, max_ctx=8192) == {"reps": 3, "warmup": 1}
    assert run_defaults(gpu=False, default_sweep=False, max_ctx=32768) == {"reps": 1, "warmup": 0}
    assert run_defaults(gpu=True, default_sweep=True, max_ctx=32768) == {"reps": 3, "warmup": 1}


def test_fit_quadratic_and_linear_series():
    n = [1024 * 2**i for i in range(6)]
    q = fit_scaling(n, [3e-9 * x * x for x in n])
    assert q.doubling == pytest.approx(4.0) and all(s == pytest.approx(2.0) for s in q.slopes)
    assert "quadratic (doubling 4.0x)" in describe("attention layers", q)
    lin = fit_scaling(n, [2e-5 * x for x in n])
    assert lin.doubling == pytest.approx(2.0) and all(s == pytest.approx(1.0) for s in lin.slopes)
    assert "linear (doubling 2.0x)" in describe("Mamba layers", lin)
    mixed = fit_scaling(n, [0.01 + 1e-5 * x + 1e-10 * x * x for x in n])
    assert mixed.a == pytest.approx(0.01, rel=1e-3) and mixed.c == pytest.approx(1e-10, rel=1e-3)


def _spec(**kw):
    base = dict(models=["tiny-hybrid"], ctx=[32, 64], batch=[1], gen=2, reps=1, warmup=1, dtype="fp32", device="cpu")
    base.update(kw)
    return SweepSpec(**base)


def test_runner_rows_schema_and_jsonl_round_trip(tmp_path):
    store = JsonlStore(tmp_path / "rows.jsonl")
    rows = []
    Runner(_spec(), lambda r: (rows.append(r), store.append(r))).run()
    assert [(r.ctx, r.phase) for r in rows] == [(32, "prefill"), (32, "decode"), (64, "prefill"), (64, "decode")]
    for r in rows:
        assert r.status == "ok" and r.valid and r.schema_version == 1
        assert r.tokens_per_s > 0 and r.latency_ms > 0 and len(r.samples_s) == 1
        assert r.kernel_impl == "torch" and r.torch == torch.__version__
    assert set(rows[0].attribution_s) == {"mamba", "attention", "moe_mlp", "rest"}
    assert rows[0].tokens_per_s == pytest.approx(32 / rows[0].median_s)
    # CPU decode runs the decode kernel where a C compiler can build it (CUDA graphs are a GPU path),
    # and has no GPU memory counters; a note only says that this process built the kernel
    from granite_cli.ops import native

    mode = "eager" if native._compiler() is None else "native"
    assert [r.decode_mode for r in rows if r.phase == "decode"] == [mode, mode]
    assert all((r.decode_note is None or r.decode_note.startswith("built the CPU decode kernel"))
               and r.nvml_used_bytes is None for r in rows)
    back = store.read()
    assert [(r.ctx, r.phase,
             r.tokens_per_s) for r in back] == [(r.ctx, r.phase, r.tokens_per_s) for r in rows]


def test_cpu_attribution_without_warmup():
    rows = []
    Runner(_spec(ctx=[32], warmup=0, reps=2, phases=["prefill"]), rows.append).run()
    (r,) = rows
    assert set(r.attribution_s) == {"mamba", "attention", "moe_mlp", "rest"} and len(r.samples_s) == 2
    assert r.attribution_s["mamba"] > 0 and sum(r.attribution_s.values()) <= max(r.samples_s) * 1.01


def test_resume_skips_finished_cases(tmp_path):
    store = JsonlStore(tmp_path / "rows.jsonl")
    Runner(_spec(ctx=[32]), store.append).run()
    with open(store.path, "a") as f:
        f.write('{"model": "tiny-hybrid", "cut-off li')  # an interrupted write
    kept = store.read()
    assert len(kept) == 2
    new = []
    Runner(_spec(ctx=[32, 64]), new.append, done=finished_keys(kept)).run()
    assert [(r.ctx, r.phase) for r in new] == [(64, "prefill"), (64, "decode")]


def test_shared_prefix_prefill_continues_the_smaller_case_on_the_same_tokens(monkeypatch):
    real = runner_mod.Runner._prefill_once
    real_ready = runner_mod.Runner._prefill_ready
    runs = []  # (context, position the pieces start from, the first tokens)
    starts = []  # the shared prefix each prefill was readied from

    def ready(self, cache, start):
        starts.append(start)
        return real_ready(self, cache, start)

    def spy(self, model, cache, ids):
        if replaying:  # the allocation replay of the pieces just timed: its tensors hold no values to check
            return real(self, model, cache, ids)
        runs.append((ids.shape[1], cache.pos, ids[0, :8].tolist()))
        if cache.pos:  # a continuation starts exactly where the smaller case ended
            snap = starts[-1]["snap"]
            assert starts[-1]["ctx"] == cache.pos
            for k, layer in enumerate(cache.layers):
                a = snap["layers"][k][0]
                got = layer.k[:, :, : cache.pos] if hasattr(layer, "k") else layer.conv
                assert torch.equal(got, a)
        return real(self, model, cache, ids)

    replaying = []
    real_replay = runner_mod.Runner._replayed_prefill

    def replay(self, *a):
        replaying.append(1)
        try:
            return real_replay(self, *a)
        finally:
            replaying.clear()

    monkeypatch.setattr(runner_mod.Runner, "_prefill_once", spy)
    monkeypatch.setattr(runner_mod.Runner, "_prefill_ready", ready)
    monkeypatch.setattr(runner_mod.Runner, "_replayed_prefill", replay)
    rows = []
    Runner(_spec(ctx=[32, 64, 80, 96], ubatch=32, reps=2, warmup=1, phases=["prefill"]), rows.append).run()
    by = {r.ctx: r for r in rows}
    # 64 continues from 32; 80 is not a whole number of pieces, so 96 continues from 64, and 80 from 64
    assert [by[c].prefill_from for c in (32, 64, 80, 96)] == [None, 32, 64, 64]
    assert {(c, pos) for c, pos, _ in runs} == {(32, 0), (64, 32), (80, 64), (96, 64)}
    assert len({tuple(t) for _, _, t in runs}) == 1  # one token stream: every case reads its prefix
    for c in (64, 80, 96):  # each sample is the prefix's time plus the continuation's
        base = by[by[c].prefill_from].samples_s
        assert all(x > y for x, y in zip(by[c].samples_s, base)) and len(by[c].samples_s) == 2
        assert by[c].tokens_per_s == pytest.approx(c / by[c].median_s)
    runs.clear()
    rows.clear()
    Runner(_spec(ctx=[32, 64], ubatch=32, phases=["prefill"], share_prefill=False), rows.append).run()
    assert [r.prefill_from for r in rows] == [None, None] and {pos for _, pos, _ in runs} == {0}


@pytest.mark.parametrize("share", [True, False])
def test_a_shared_case_is_skipped_only_for_its_own_time(share):
    rows = []
    r = Runner(_spec(ctx=[32, 64], ubatch=32, phases=["prefill"], max_case_seconds=20.0, share_prefill=share),
               rows.append)
    r.predicted_seconds = lambda prev, c: 0.5 * c  # 64 tokens: 32 s from empty, 16 s after the 32 prefix
    r.run()
    assert [row.status for row in rows] == ["ok", "ok" if share else "skipped"]


def test_estimate_counts_a_shared_prefix_once():
    from granite_cli.bench.estimate import estimate_seconds

    kw = dict(models=["cpu-hybrid"], ctx=[4096, 8192], batch=[1], reps=1, warmup=0, dtype="fp32", device="cpu")
    shared, fresh = estimate_seconds(SweepSpec(**kw),
                                     100.0), estimate_seconds(SweepSpec(**kw, share_prefill=False), 100.0)
    assert shared < fresh * 0.8  # the 8k case does not pay for its first 4k again


def test_oom_becomes_a_row_and_the_sweep_goes_on(monkeypatch):
    real = runner_mod.Runner._prefill_once

    def flaky(self, model, cache, ids):
        if ids.shape[1] == 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(self, model, cache, ids)

    monkeypatch.setattr(runner_mod.Runner, "_prefill_once", flaky)
    rows = []
    Runner(_spec(ctx=[32, 64, 128]), rows.append).run()
    status = {(r.ctx, r.phase): r.status for r in rows}
    assert status[(64, "prefill")] == "oom" and status[(64, "decode")] == "oom"
    assert status[(128, "prefill")] == "ok" and status[(32, "decode")] == "ok"


def test_compiled_decode_mode_is_untimed_first_then_timed_and_falls_back_with_the_reason(monkeypatch):
    # The plumbing only (tests/test_compiled.py checks the compiled step itself): a stand-in step
    # counts its calls; the first pass is untimed and the cache is restored before the timed ones.
    from granite_cli.model import compiled

    calls = []

    def fake(model):  # stands in for the compiled forward: the model itself, recording each step's position
        def fwd(ids, cache, logits="all"):
            calls.append(cache.pos)
            return model(ids, cache, logits=logits)
        return fwd

    monkeypatch.setattr(compiled, "compiled_forward", fake)
    rows = []
    Runner(_spec(ctx=[32], phases=["decode"], compile=True, warmup=0, reps=2), rows.append).run()
    (r,) = rows
    assert r.decode_mode == "compiled" and "first pass" in r.decode_note and len(r.samples_s) == 2
    assert calls == [32, 33] * 3  # untimed compile pass + 2 timed reps, each from the snapshot at depth 32

    def broken(model):
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(compiled, "compiled_forward", broken)
    rows = []
    Runner(_spec(ctx=[32], phases=["decode"], compile=True), rows.append).run()
    (r,) = rows
    assert r.status == "ok" and r.decode_mode == "eager" and "inductor exploded" in r.decode_note


def test_predicted_slow_case_is_skipped():
    spec = _spec(ctx=[32, 64, 512], max_case_seconds=20.0, phases=["prefill"])
    r = Runner(spec, lambda row: None)
    # prefill times of ctx/10 s: the fit predicts 51.2 s per run at 512, two runs (warmup + rep)
    assert r.predicted_seconds([(32, 3.2), (64, 6.4)], 512) == pytest.approx(102.4, rel=1e-6)
    assert r.predicted_seconds([(32, 3.2)], 512) == 0.0
    rows = []
    r = Runner(spec, rows.append)
    r.predicted_seconds = lambda prev, c: 1e6 if c == 512 else 0.0
    r.run()
    st = {row.ctx: row for row in rows}
    assert st[512].status == "skipped" and "predicted 1000000 s" in st[512].error
    assert st[32].status == st[64].status == "ok"


def _row(model, kind, ctx, t, phase="prefill", batch=1, att=None, **more):
    return Row.from_dict({"model": model, "kind": kind, "ctx": ctx, "batch": batch, "phase": phase, "status": "ok",
                          "median_s": t, "tokens_per_s": batch * ctx / t if phase == "prefill" else batch / t,
                          "latency_ms": t * 1e3, "attribution_s": att, "peak_delta_bytes": ctx * 10,
                          "cache_bytes": ctx, "dtype": "fp32", "device": "cpu", **more})


def test_analysis_verdicts_claims_and_regressions():
    n = [1024, 2048, 4096, 8192]
    rows = [_row("h", "hybrid", c, 1e-4 * c, att={"mamba": 8e-5 * c, "attention": 1e-9 * c * c}) for c in n]
    rows += [_row("d", "dense", c, 1e-4 * c + 2e-8 * c * c) for c in n]
    res = analyse(rows)
    text = "\n".join(res.verdicts)
    assert "h b1 Mamba layers: linear (doubling 2.0x)" in text
    assert "h b1 attention layers: quadratic (doubling 4.0x)" in text
    assert any(r.ctx == 8192 and r.prefill_speed > 1 for r in res.ratios)
    assert check_claims(rows, res) == []
    slow = [dataclasses.replace(r, tokens_per_s=r.tokens_per_s * 0.8) for r in rows]
    assert len(regressions(slow, rows, 0.10)) == len(rows)
    assert regressions(slow, rows, 0.25) == []


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "granite_cli", "bench", *args], capture_output=True, text=True,
                          cwd=cwd, stdin=subprocess.DEVNULL, timeout=900)


def test_cli_smoke_on_tiny_profiles(tmp_path):
    r = _cli("-m", "tiny-hybrid", "-m", "tiny-dense", "--ctx", "32,64", "--batch", "1,2", "--gen", "2", "--reps", "1",
             "--format", "json", "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert len(d["rows"]) == 2 * 2 * 2 * 2
    for row in d["rows"]:
        for k in ("model", "ctx", "batch", "phase", "status", "tokens_per_s", "latency_ms", "peak_bytes"):
            assert k in row
    assert d["verdicts"]
    for f in ("report.md", "rows.jsonl", "prefill_time.png", "decode_tps.png", "memory.png", "attribution.png"):
        assert (tmp_path / "rep" / f).exists(), f
    assert "expected about" in r.stderr
    # the same rows as a baseline: no regression; --check on tiny models is allowed to go either way
    base = tmp_path / "base.json"
    base.write_text(r.stdout)
    r2 = _cli("-m", "tiny-hybrid", "--ctx", "32", "--gen", "2", "--reps", "1", "--baseline", str(base),
              "--fail-on-regression", "99%", "--format", "csv")
    assert r2.returncode == 0 and r2.stdout.startswith("model,batch,ctx")


@pytest.mark.parametrize("args,msg", [(["--ctx", "12x"], "bad context '12x'"), (["--batch", "-1"], "bad batch"),
                                      (["-m", "nope"], "unknown model 'nope'"), (["--reps", "0"], "--reps must be"),
                                      (["--fail-on-regression", "5%"], "needs --baseline"),
                                      (["--device", "tpu"], "--device must be")])
def test_cli_bad_input_exits_2(args, msg):
    r = _cli(*args, "--ctx" if "--ctx" not in args else "--gen", "64" if "--ctx" not in args else "2")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------ memory verdicts

def test_memory_verdict_is_the_total_peak_ratio_tracked_and_predicted():
    """At 4k tokens the hybrid's cache is half the dense twin's: the verdict's memory ratio is the ratio of
    the tracked totals (weights + cache + working set), below 1, and within 5% of memory-report's."""
    rows = []
    spec = _spec(models=["tiny-hybrid", "tiny-dense"], ctx=[4096], ubatch=512, gen=2, reps=1, warmup=0)
    Runner(spec, rows.append).run()
    by = {(r.model, r.phase): r for r in rows}
    assert all(r.peak_total_source == "tracked" and r.status == "ok" for r in rows)
    (ratio,) = analyse(rows).ratios
    for phase in ("prefill", "decode"):
        h, d = by[("tiny-hybrid", phase)], by[("tiny-dense", phase)]
        tracked = h.peak_total_bytes / d.peak_total_bytes
        predicted = h.predicted_total_bytes / d.predicted_total_bytes
        assert getattr(ratio, f"{phase}_total_memory") == pytest.approx(tracked, rel=1e-12) and tracked < 1
        assert getattr(ratio, f"{phase}_total_predicted") == pytest.approx(predicted, rel=1e-12)
        assert abs(tracked / predicted - 1) < 0.05
        # the tracked total holds the weights and the cache, which an increase over the baseline leaves out
        assert h.peak_total_bytes > h.weights_bytes + h.cache_bytes
    verdict = next(v for v in analyse(rows).verdicts if " vs " in v)
    assert f"prefill {ratio.prefill_total_memory:.2f}x, decode {ratio.decode_total_memory:.2f}x" in verdict


def test_memory_headline_never_uses_the_increase_over_the_baseline():
    def row(model, kind, phase, total, delta):
        return _row(model, kind, 4096, 1.0, phase=phase, peak_total_bytes=total, predicted_total_bytes=total,
                    peak_total_source="tracked", peak_delta_bytes=delta)

    # the hybrid's increase over its baseline is 3x the dense one's, its total half: the headline says 0.50x
    rows = [row("h", "hybrid", p, 1_000 * 2**20, 300 * 2**20) for p in ("prefill", "decode")]
    rows += [row("d", "dense", p, 2_000 * 2**20, 100 * 2**20) for p in ("prefill", "decode")]
    res = analyse(rows)
    (v,) = [v for v in res.verdicts if " vs " in v]
    assert "peak memory (tracked: weights + cache + working set) prefill 0.50x, decode 0.50x" in v
    assert "3.00x" not in v and "increase" not in v
    assert res.ratios[0].prefill_increase_memory == pytest.approx(3.0)  # kept, as a secondary figure


def test_one_precedence_rule_flag_over_sweep_file_over_default(tmp_path):
    from granite_cli.bench.spec import FLAG_FIELDS, resolve_spec

    f = tmp_path / "s.toml"
    f.write_text('models = ["tiny-hybrid"]\nctx = "32,64"\ndevice = "cuda"\ndtype = "bf16"\nreps = 5\n'
                 'share_prefill = false\nmax_case_seconds = 60\nphases = ["prefill"]\n')
    none = dict.fromkeys(FLAG_FIELDS)
    # every field the file can set loses to its flag: --device cpu is no longer ignored
    s = resolve_spec({**none, "device": "cpu", "reps": 2, "share_prefill": True, "phases": "decode"}, f, False)
    assert (s.device, s.reps, s.share_prefill, s.phases) == ("cpu", 2, True, ["decode"])
    assert (s.models, s.ctx, s.dtype, s.max_case_seconds) == (["tiny-hybrid"], [32, 64], "bf16", 60)
    # the file over the defaults; defaults where neither speaks
    s = resolve_spec({**none, "device": "cpu"}, f, False)
    assert (s.reps, s.share_prefill, s.batch, s.gen, s.guard) == (5, False, [1], 16, "depth")
    s = resolve_spec(none, None, False)
    assert (s.models, s.batch, s.reps, s.warmup, s.max_case_seconds) == (["cpu-hybrid", "cpu-dense"], [1, 4], 1, 0,
                                                                         1800.0)
    with pytest.raises(InputError, match="no CUDA device"):
        resolve_spec(none, f, False)  # the file's cuda, with no flag to overrule it


def test_a_row_reads_and_writes_the_rows_file_object_unchanged():
    from granite_cli.bench.row import ModelRow, ServeRow

    # an older file's row: a key this schema dropped, and none of the newer fields
    old = {"model": "cpu-hybrid", "kind": "hybrid", "dtype": "bf16", "device": "cpu", "batch": 2, "ctx": 512,
           "phase": "prefill", "status": "ok", "tokens_per_s": 812.5, "legacy_field": [1, 2]}
    row = Row.from_dict(old)
    assert isinstance(row, ModelRow) and row.tokens_per_s == 812.5 and row.extra == {"legacy_field": [1, 2]}
    back = row.to_dict()
    assert {k: back[k] for k in old} == old                 # every key read is written back as read
    assert back["schema_version"] == 1 and back["peak_bytes"] is None
    assert Row.from_dict(json.loads(json.dumps(back))).to_dict() == back
    serve = Row.from_dict({"model": "m", "phase": "serve", "status": "ok", "ttft_ms_p50": 12.0})
    assert isinstance(serve, ServeRow) and serve.ttft_ms_p50 == 12.0 and serve.key[5:] == ("serve", "")


def test_a_builder_cannot_set_a_field_the_row_does_not_have():
    row = Row.from_dict({"model": "m", "phase": "decode", "status": "ok"})
    row.update(tokens_per_s=3.0, peak_bytes=7)
    assert (row.tokens_per_s, row.peak_bytes) == (3.0, 7)
    with pytest.raises(KeyError, match="ModelRow has no field tokens_per_sec"):
        row.update(tokens_per_s=4.0, tokens_per_sec=4.0)
    assert row.tokens_per_s == 3.0   # nothing set when one name is wrong


def test_table_columns_come_from_the_fields():
    from granite_cli.bench.row import ModelRow, ServeRow, columns, formats, headers

    for kind in (ModelRow, ServeRow):
        names = {f.name for f in dataclasses.fields(kind)}
        for where in ("table", "report"):
            cols = columns(kind, where)
            assert cols and set(cols) <= names and set(cols) <= set(headers())
    assert columns(ModelRow)[:4] == ["model", "batch", "ctx", "phase"]
    assert "ttft_ms_p50" in columns(ServeRow) and "ttft_ms_p50" not in columns(ModelRow)
    assert formats()["ttft_ms_p50"] == "num"
