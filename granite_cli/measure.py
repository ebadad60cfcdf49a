"""Measurement primitives shared by bench and memory-report: timers and peak-memory counters.

Every memory number names its source: `rss` (process resident set, from /proc/self/status VmHWM,
reset per phase through /proc/self/clear_refs), `cuda_allocated` / `cuda_reserved` (the caching
allocator's peaks), `nvml_used` (device-wide, from NVML).
"""

from __future__ import annotations

import torch


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

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            self._resettable = reset_peak_rss()
            self.before = rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.reserved = torch.cuda.max_memory_reserved(self.device)
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

