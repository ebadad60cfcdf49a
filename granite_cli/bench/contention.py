"""Whether a CPU measurement had the machine to itself.

A timing taken while another process used the CPU is not this machine's figure: on 2 cores one busy
loop beside a 2-thread bench cut decode to 0.20-0.45x its quiet tokens/s. So each timed window
reads, at its start and end,
- this process's CPU time (all its threads; `time.process_time`, nanosecond clock),
- the machine's busy and stolen CPU time from /proc/stat (every core, in clock ticks),
- the kernel's CPU pressure from /proc/pressure/cpu (PSI: microseconds in which some runnable task
  waited for a CPU), where the kernel exposes it,
and says what the window shared: `cpu_share` (own CPU over wall x threads: how much of the cores it
asked for it got), `cpu_others_cores` (cores busy with other processes, on average), `cpu_steal_pct`
(a hypervisor's share) and `cpu_pressure_pct`. A window is contended when other processes kept at
least CONTENDED_CORES more busy than the cores the measured work left free, or the hypervisor stole at
least CONTENDED_STEAL of it: a neighbour on a core the work does not use takes nothing from it.

/proc/stat counts in clock ticks (10 ms), so a window shorter than MIN_WINDOW_S cannot say how busy
others were to a useful precision: its others figure is None, and it is judged by the pressure
instead (CONTENDED_PRESSURE of its time with a task waiting for a CPU), which the kernel counts in
microseconds. Without /proc (not Linux) every figure but cpu_share is None and nothing is flagged.

Measured on the 2-core VM (reports/core-cpu/contention.md): quiet, others 0.00-0.02 cores and pressure
0.4% with 1 or 2 threads of matmuls; beside one busy loop, others 0.99 cores and pressure 0.07% with
1 thread (each on its own core), others 0.64 cores, pressure 50% and cpu_share 0.68 with 2 threads.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

# Cores other processes kept busy beyond those left free, the hypervisor's share of the time, and (for
# windows too short for /proc/stat's ticks) the share of time some task waited for a CPU, from which a
# window is contended: each far from a quiet machine's (0.02 cores, 0.5% steal, 0.4% pressure measured)
# and from one busy loop's on the work's cores (0.64-0.99 cores, 50% pressure).
CONTENDED_CORES = 0.25
CONTENDED_STEAL = 0.05
CONTENDED_PRESSURE = 0.10
MIN_WINDOW_S = 0.25
# A case measured while contended is measured again, at most this many times.
RETRIES = 2
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class CpuClock:
    """One reading of the clocks a window is judged by (None where the kernel does not expose one)."""

    wall: float
    own: float
    busy: float | None = None     # seconds of CPU time every core spent on anything but idle and iowait
    steal: float | None = None
    total: float | None = None    # seconds of CPU time of every core, idle included
    pressure: float | None = None  # PSI cpu "some" total, seconds

    @classmethod
    def now(cls) -> "CpuClock":
        busy = steal = total = pressure = None
        try:
            with open("/proc/stat", "rb") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            # user nice system idle iowait irq softirq steal (guest time is inside user already)
            idle = v[3] + (v[4] if len(v) > 4 else 0)
            total = sum(v[:8]) / _TICK
            steal = (v[7] if len(v) > 7 else 0) / _TICK
            busy = total - idle / _TICK - steal
        except (OSError, ValueError, IndexError):
            pass
        try:
            with open("/proc/pressure/cpu", "rb") as f:
                some = f.readline().split()
            pressure = int(some[-1].split(b"=")[1]) / 1e6
        except (OSError, ValueError, IndexError):
            pass
        return cls(time.perf_counter(), time.process_time(), busy, steal, total, pressure)


@dataclass(frozen=True)
class CpuWindow:
    """What a timed stretch shared the CPU with; the row part of its figures is fields()."""

    wall_s: float
    cpu_share: float | None
    cpu_others_cores: float | None
    cpu_steal_pct: float | None
    cpu_pressure_pct: float | None

    @classmethod
    def between(cls, a: CpuClock, b: CpuClock, threads: int) -> "CpuWindow":
        wall = max(b.wall - a.wall, 1e-9)
        own = max(0.0, b.own - a.own)
        others = steal = pressure = None
        if a.busy is not None and b.busy is not None and wall >= MIN_WINDOW_S:
            others = max(0.0, (b.busy - a.busy) - own) / wall
        if a.total is not None and b.total is not None and b.total > a.total:
            steal = max(0.0, (b.steal - a.steal) / (b.total - a.total)) * 100
        if a.pressure is not None and b.pressure is not None:
            pressure = min(100.0, max(0.0, (b.pressure - a.pressure) / wall * 100))
        return cls(wall, own / (wall * max(1, threads)), others, steal, pressure)

    def contended_beyond(self, free_cores: float = 0.0) -> bool:
        """Whether other processes kept busy at least CONTENDED_CORES more than the `free_cores` the
        measured work left them (a window too short to count that: whether tasks waited for a CPU at
        least CONTENDED_PRESSURE of the time), or the hypervisor stole at least CONTENDED_STEAL of it."""
        if (self.cpu_steal_pct or 0.0) >= CONTENDED_STEAL * 100:
            return True
        if self.cpu_others_cores is not None:
            return self.cpu_others_cores >= max(0.0, free_cores) + CONTENDED_CORES
        return (self.cpu_pressure_pct or 0.0) >= CONTENDED_PRESSURE * 100

    def fields(self) -> dict:
        """The row's figures of the window."""
        return {"cpu_share": self.cpu_share, "cpu_others_cores": self.cpu_others_cores,
                "cpu_steal_pct": self.cpu_steal_pct, "cpu_pressure_pct": self.cpu_pressure_pct}


class Watch:
    """`with Watch(threads) as w: ...` then w.window: what the block shared the CPU with."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.window: CpuWindow | None = None

    def __enter__(self) -> "Watch":
        self._a = CpuClock.now()
        return self

    def __exit__(self, *exc) -> None:
        self.window = CpuWindow.between(self._a, CpuClock.now(), self.threads)


def busy_elsewhere(seconds: float = 0.5) -> float | None:
    """Cores other processes keep busy right now: the machine's busy time over `seconds` while this
    process sleeps (None without /proc/stat)."""
    a = CpuClock.now()
    time.sleep(seconds)
    b = CpuClock.now()
    if a.busy is None or b.busy is None:
        return None
    return max(0.0, (b.busy - a.busy) - (b.own - a.own)) / max(b.wall - a.wall, 1e-9)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity), or the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_threads(others: float | None, cpus: int | None = None) -> int:
    """Threads for `--threads auto`: the CPUs left free by what others keep busy (at least one), so a
    busy machine gives a slower but true figure instead of threads that wait on each other's cores."""
    cpus = cpus or usable_cpus()
    if others is None:
        return cpus
    return max(1, min(cpus, cpus - round(others)))
