"""Measurement primitives shared by bench and memory-report: timers and peak-memory counters.

Every memory number names its source: `rss` (process resident set, from /proc/self/status VmHWM,
reset per phase through /proc/self/clear_refs), `cuda_allocated` / `cuda_reserved` (the caching
allocator's peaks), `nvml_used` (device-wide, from NVML).
"""

from __future__ import annotations

import time

import torch

from granite_cli.hostmem import release_free_memory


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    kb = _status_kb("VmRSS")
    return kb * 1024 if kb is not None else None


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark for this process (Linux ≥ 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    kb = _status_kb("VmHWM")
    return kb * 1024 if kb is not None else None


class PeakMemory:
    """Peak memory over a block: `with PeakMemory(device) as pm: ...; pm.peak, pm.delta, pm.source`."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak: int | None = None
        self.before: int | None = None
        self.source = "cuda_allocated" if self.device.type == "cuda" else "rss"
        self.reserved: int | None = None
        self.nvml_used: int | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            release_free_memory()  # retained free heap (hostmem) must not hide this block's growth
            self._resettable = reset_peak_rss()
            self.before = rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.reserved = torch.cuda.max_memory_reserved(self.device)
            self.nvml_used = nvml_used_bytes(self.device.index if self.device.index is not None
                                             else torch.cuda.current_device())
        elif self._resettable:
            self.peak = peak_rss_bytes()
        # else: the high-water mark covers the whole process, not this block: report nothing

    @property
    def delta(self) -> int | None:
        if self.peak is None or self.before is None:
            return None
        return max(0, self.peak - self.before)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def nvml_used_bytes(index: int) -> int | None:
    """Device-wide memory in use (every process, the CUDA context included) from NVML, or None
    without it. The caching allocator keeps what it reserved, so after a phase this is at least
    that phase's reserved peak plus the context."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - NVML missing or refusing: the counter is simply absent
        return None


class Stopwatch:
    """Elapsed seconds of a block: CUDA events on a GPU (the stream's own clock, no host jitter),
    perf_counter on a CPU. `with Stopwatch(dev) as sw: ...; sw.seconds`."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> "Stopwatch":
        if self.cuda:
            self._a = torch.cuda.Event(enable_timing=True)
            self._b = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            self._a.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._b.record()
            torch.cuda.synchronize(self.device)
            self.seconds = self._a.elapsed_time(self._b) / 1e3
        else:
            self.seconds = time.perf_counter() - self._t0

