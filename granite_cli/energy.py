"""GPU power, energy and telemetry over a stretch of work: NVML (pynvml, from nvidia-ml-py) sampled on a
thread where a GPU is visible to granite, or a DCGM exporter's `/metrics` for a server's host.

Energy is the driver's own counter where every GPU has one (NVML's total energy since the driver
loaded, DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION; Volta and later), its change from start to stop; else
the power samples integrated (trapezoids). The rows turn it into joules per token.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from granite_cli.redact import printable

# NVML answers in ms-scale calls; DCGM's exporter refreshes its fields about once a second.
NVML_EVERY, DCGM_EVERY = 0.1, 0.5
# Several times any GPU board's rated power: a reading outside 0..this is not a measurement.
MAX_GPU_WATTS = 5000.0
MIB = 1 << 20


@dataclass
class Reading:
    """One sample over all the meter's GPUs: summed power (W), energy counter (mJ, None where a GPU has
    none), mean utilisation (%), summed memory used (bytes), mean SM clock (MHz)."""

    t: float
    power_w: float | None
    energy_mj: float | None
    util_pct: float | None = None
    mem_used: float | None = None
    sm_clock_mhz: float | None = None


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _sum(xs: list[float | None]) -> float | None:
    return None if not xs or any(x is None for x in xs) else float(sum(xs))


def load_nvml():
    """pynvml, initialised, or None where there is no NVML (no driver, no GPU, not installed)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 -- no NVML here, for whatever reason: no energy figures
        return None


def nvml_index(nvml, uuid: str, fallback: int) -> int:
    """NVML's index of the GPU whose UUID torch reports (CUDA_VISIBLE_DEVICES renumbers torch's devices
    but not NVML's); `fallback` where none matches."""
    want = uuid.lower().removeprefix("gpu-")
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            got = nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))
            got = got.decode() if isinstance(got, bytes) else str(got)
            if got.lower().removeprefix("gpu-") == want:
                return i
    except Exception:  # noqa: BLE001 -- an NVML without UUIDs: the index torch uses
        pass
    return fallback


class NvmlSource:
    """Every GPU NVML sees (or those at `indices`)."""

    kind = "nvml"
    every = NVML_EVERY

    def __init__(self, nvml, indices: list[int] | None = None) -> None:
        self.nvml = nvml
        n = nvml.nvmlDeviceGetCount()
        self.indices = list(range(n)) if indices is None else [i for i in indices if 0 <= i < n]
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in self.indices]

    def _try(self, fn, *a):
        try:
            return fn(*a)
        except Exception:  # noqa: BLE001 -- a field this GPU does not support (NVMLError_NotSupported)
            return None

    def read(self) -> Reading:
        n = self.nvml
        power = [n.nvmlDeviceGetPowerUsage(h) for h in self.handles]  # mW; failing, the meter stops (a lost GPU)
        energy = [self._try(n.nvmlDeviceGetTotalEnergyConsumption, h) for h in self.handles]  # mJ
        util = [u.gpu for h in self.handles if (u := self._try(n.nvmlDeviceGetUtilizationRates, h)) is not None]
        mem = [m.used for h in self.handles if (m := self._try(n.nvmlDeviceGetMemoryInfo, h)) is not None]
        clock = [c for h in self.handles if (c := self._try(n.nvmlDeviceGetClockInfo, h, n.NVML_CLOCK_SM)) is not None]
        p = _sum(power)
        return Reading(time.perf_counter(), p / 1e3 if p is not None else None, _sum(energy), _mean(util),
                       float(sum(mem)) if mem else None, _mean(clock))


class DcgmSource:
    """A DCGM exporter's /metrics (e.g. http://gpu-host:9400/metrics), all the GPUs it lists."""

    kind = "dcgm"
    every = DCGM_EVERY

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        from granite_cli.serve.http import parse_endpoint

        self.ep = parse_endpoint(url.removesuffix("/metrics"), flag="--dcgm")
        self.timeout = timeout

    def read(self) -> Reading | None:
        from granite_cli.serve.http import HTTPFailure, get

        try:
            status, body = get(self.ep, "/metrics", self.timeout)
        except HTTPFailure:
            return None
        if status != 200:
            return None
        series = parse_series(body.decode("utf-8", "replace"))
        power = series.get("DCGM_FI_DEV_POWER_USAGE")
        if not power:
            return None
        if any(not 0 <= w <= MAX_GPU_WATTS for w in power):  # the meter then drops the source, with this note
            bad = next(w for w in power if not 0 <= w <= MAX_GPU_WATTS)
            raise ValueError(f"DCGM_FI_DEV_POWER_USAGE = {bad:g} W, not a GPU's power")
        energy = series.get("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION")
        mem = series.get("DCGM_FI_DEV_FB_USED")  # MiB
        return Reading(time.perf_counter(), sum(power),
                       sum(energy) if energy and len(energy) == len(power) else None,
                       _mean(series.get("DCGM_FI_DEV_GPU_UTIL", [])), sum(mem) * MIB if mem else None,
                       _mean(series.get("DCGM_FI_DEV_SM_CLOCK", [])))


def parse_series(text: str) -> dict[str, list[float]]:
    """Prometheus text → {name: [value of each label set]} (finite values only)."""
    from granite_cli.serve.metrics import sample_lines

    out: dict[str, list[float]] = {}
    for name, value in sample_lines(text):
        out.setdefault(name, []).append(value)
    return out


@dataclass
class PowerMeter:
    """Samples a source on a thread between start() and stop(); stop() gives the row's energy fields."""

    source: object
    readings: list[Reading] = field(default_factory=list)
    dropped: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> None:
        try:
            r = self.source.read()
        except Exception as e:  # noqa: BLE001 -- telemetry never ends a case; the row says it stopped
            self.dropped = f"{type(e).__name__}: {printable(str(e), 80)}"
            self._stop.set()
            return
        if r is not None:
            self.readings.append(r)

    def _loop(self) -> None:
        while not self._stop.wait(self.source.every):
            self._sample()

    def start(self) -> "PowerMeter":
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.dropped is None:
            self._sample()
        return self.summary()

    def summary(self) -> dict:
        rs = [r for r in self.readings if r.power_w is not None]
        out = {"energy_j": None, "power_w_mean": None, "power_w_max": None, "gpu_util_pct_mean": None,
               "gpu_mem_used_max_bytes": None, "sm_clock_mhz_mean": None,
               "energy_source": None if not rs else self.source.kind}
        if len(rs) < 2:
            if self.dropped:
                out["energy_source"] = f"none ({self.dropped})"
            return out
        first, last = rs[0], rs[-1]
        if first.energy_mj is not None and last.energy_mj is not None and last.energy_mj >= first.energy_mj:
            energy = (last.energy_mj - first.energy_mj) / 1e3
            out["energy_source"] += " energy counter"
        else:
            energy = sum((b.t - a.t) * (a.power_w + b.power_w) / 2 for a, b in zip(rs, rs[1:]))
            out["energy_source"] += " power samples"
        if self.dropped:
            out["energy_source"] += f"; stopped early ({self.dropped})"
        span = last.t - first.t
        out.update(energy_j=energy, power_w_mean=energy / span if span > 0 else None,
                   power_w_max=max(r.power_w for r in rs),
                   gpu_util_pct_mean=_mean([r.util_pct for r in rs if r.util_pct is not None]),
                   gpu_mem_used_max_bytes=max((r.mem_used for r in rs if r.mem_used is not None), default=None),
                   sm_clock_mhz_mean=_mean([r.sm_clock_mhz for r in rs if r.sm_clock_mhz is not None]))
        return out

