"""CPU measurements that know when the machine was busy: the contention figures of a window, the
threads `--threads auto` picks, rows flagged and left out of fits and verdicts, and a real busy
process beside a real sweep (asserting the flags and warnings it must produce, never a time)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from granite_cli.bench.analysis import analyse, regressions
from granite_cli.bench.contention import (
    CONTENDED_CORES,
    CpuClock,
    CpuWindow,
    auto_threads,
    busy_elsewhere,
    usable_cpus,
)
from granite_cli.bench.row import ModelRow
from granite_cli.bench.spec import parse_threads
from granite_cli.errors import InputError
from tests.conftest import granite, one_error


def _clock(wall, own, busy, steal=0.0, total=None, pressure=0.0):
    return CpuClock(wall, own, busy, steal, total if total is not None else 2 * wall, pressure)


def test_a_window_counts_what_others_used():
    w = CpuWindow.between(_clock(0, 0, 0), _clock(1.0, 1.0, 2.0, pressure=0.5), threads=1)
    assert w.cpu_others_cores == pytest.approx(1.0) and w.cpu_share == pytest.approx(1.0)
    assert w.cpu_pressure_pct == pytest.approx(50.0) and w.cpu_steal_pct == 0
    assert w.contended_beyond(0) and not w.contended_beyond(1)  # one core left free: the neighbour had it
    quiet = CpuWindow.between(_clock(0, 0, 0), _clock(1.0, 2.0, 2.02), threads=2)
    assert quiet.cpu_others_cores == pytest.approx(0.02) and not quiet.contended_beyond(0)
    short = CpuWindow.between(_clock(0, 0, 0), _clock(0.01, 0.0, 0.02, pressure=0.0001), threads=1)
    assert short.cpu_others_cores is None and not short.contended_beyond(0)  # ticks too coarse: pressure 1%
    waited = CpuWindow.between(_clock(0, 0, 0), _clock(0.01, 0.0, 0.02, pressure=0.005), threads=1)
    assert waited.cpu_pressure_pct == pytest.approx(50.0) and waited.contended_beyond(0)
    stolen = CpuWindow.between(_clock(0, 0, 0, 0, 0), _clock(1.0, 1.0, 1.0, steal=0.2, total=2.0), threads=2)
    assert stolen.cpu_steal_pct == pytest.approx(10.0) and stolen.contended_beyond(5)
    unknown = CpuWindow.between(CpuClock(0, 0), CpuClock(1.0, 1.0), threads=1)
    assert unknown.cpu_others_cores is None and unknown.cpu_share == pytest.approx(1.0)
    assert not unknown.contended_beyond(0)


def test_auto_threads_are_the_cpus_others_leave_free():
    assert auto_threads(1.0, 2) == 1 and auto_threads(0.1, 2) == 2 and auto_threads(3.7, 4) == 1
    assert auto_threads(None, 4) == 4 and auto_threads(0.6, 8) == 7
    assert parse_threads("auto") == "auto" and parse_threads(" 3 ") == 3 and parse_threads(2) == 2
    for bad in ("0", "-1", "x", "1.5", True, "5000"):
        with pytest.raises(InputError, match="--threads"):
            parse_threads(bad)
    one_error(granite("bench", "-m", "tiny-hybrid", "--threads", "0"), 2, "bad --threads '0'")


def _row(ctx, s, contended=False, phase="prefill", model="m"):
    return ModelRow(model=model, kind="hybrid", dtype="fp32", device="cpu", batch=1, ctx=ctx, phase=phase,
                    median_s=s, latency_ms=s * 1e3, tokens_per_s=ctx / s, samples_s=[s], contended=contended,
                    cpu_others_cores=1.0 if contended else 0.01, contended_retries=2 if contended else 0)


def test_contended_rows_are_left_out_of_fits_and_verdicts():
    rows = [_row(c, c / 512) for c in (512, 1024, 2048, 4096)] + [_row(8192, 400.0, contended=True)]
    a = analyse(rows)
    (fit,) = [f for f in a.fits if f.part == "total"]
    assert fit.doubling == pytest.approx(2.0, rel=0.01)  # linear, as the uncontended rows are
    note = [v for v in a.verdicts if "contended" in v]
    assert len(note) == 1 and "1 case(s)" in note[0] and "m b1 ctx 8192 prefill" in note[0]
    assert "1.0 cores busy elsewhere" in note[0]
    only = analyse([_row(c, 1.0, contended=True) for c in (512, 1024, 2048, 4096)])
    assert not only.fits and any("4 case(s)" in v for v in only.verdicts)  # withheld, saying why
    base = [_row(c, c / 512) for c in (512, 1024)]
    slow = [_row(512, 10.0, contended=True), _row(1024, 2 * 1024 / 512)]
    assert regressions(slow, base, 0.1) == ["m b1 ctx 1024 prefill: 256.0 tok/s vs baseline 512.0 (-50.0%)"]


def test_a_quiet_moment_is_measured_as_quiet_and_a_busy_one_as_busy():
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        busy = busy_elsewhere(0.5)
    finally:
        hog.kill()
        hog.wait(30)
    if busy is None:
        pytest.skip("no /proc/stat here")
    assert busy >= 0.7  # one busy loop keeps about a core busy (as the kernel counts it)


@pytest.fixture
def hog():
    """One busy loop on a CPU beside the test, as a CI job or a compile would be (on a machine otherwise
    quiet: what the tests expect of one neighbour does not hold beside two)."""
    already = busy_elsewhere(0.5)
    if already is not None and already >= CONTENDED_CORES:
        pytest.skip(f"the machine is already busy ({already:.1f} cores elsewhere); these need one known neighbour")
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
    time.sleep(0.5)
    yield p
    p.kill()
    p.wait(30)


# a case whose timed window is long enough (well over contention.MIN_WINDOW_S) to be judged
CASE = ["bench", "-m", "cpu-hybrid", "--ctx", "=2k", "--batch", "1", "--phase", "prefill", "--reps", "3", "--warmup",
        "0", "--guard", "depth", "-f", "json"]


def test_beside_a_busy_process_fixed_threads_are_flagged_retried_and_left_out(hog):
    if usable_cpus() < 2:
        pytest.skip("one CPU: a busy neighbour leaves nothing to measure")
    r = granite(*CASE, "--threads", str(usable_cpus()))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cores busy elsewhere before the sweep" in r.stderr and f"--threads {usable_cpus()} competes" in r.stderr
    (row,) = json.loads(r.stdout)["rows"]
    assert row["contended"] is True and row["contended_retries"] == 2 and row["cpu_others_cores"] >= CONTENDED_CORES
    assert row["threads"] == usable_cpus()
    assert any("left out of the fits and verdicts" in ln for ln in r.stderr.splitlines() if ln.startswith("warning:"))


def test_beside_a_busy_process_auto_threads_take_the_free_cpus(hog):
    if usable_cpus() < 2:
        pytest.skip("one CPU: a busy neighbour leaves nothing to measure")
    r = granite(*CASE)
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads(r.stdout)["rows"]
    assert row["threads"] == usable_cpus() - 1
    assert f"granite uses the {usable_cpus() - 1} thread(s) left free" in r.stderr
    assert row["contended"] is False and row["cpu_others_cores"] is not None
