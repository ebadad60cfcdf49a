"""GPUs by name, with the memory their driver reports: nvidia-smi's total, which is also what CUDA's
`cudaMemGetInfo` and so vLLM's `--gpu-memory-utilization` take a fraction of. An "80GB" H100 reports
81,559 MiB (79.6 GiB), not 80e9 bytes (74.5 GiB): sizing with the marketing figure undercounts
sessions by about 7%. Sources are in docs/engines.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from granite_cli.errors import InputError

MiB = 2**20


@dataclass(frozen=True)
class GPU:
    name: str
    label: str
    total_bytes: int


GPUS = {g.name: g for g in (
    GPU("h100-80gb", "NVIDIA H100 80GB", 81559 * MiB),
    GPU("h100-nvl", "NVIDIA H100 NVL 94GB", 99_961_274_368),
    GPU("h200", "NVIDIA H200 141GB", 143771 * MiB),
    GPU("a100-80gb", "NVIDIA A100 80GB", 81920 * MiB),
    GPU("a100-40gb", "NVIDIA A100 40GB", 40960 * MiB),
    GPU("l40s", "NVIDIA L40S 48GB", 46068 * MiB),
    GPU("l4", "NVIDIA L4 24GB", 23034 * MiB),
    GPU("a10", "NVIDIA A10 24GB", 23028 * MiB),
    GPU("t4", "NVIDIA T4 16GB", 15360 * MiB),
    GPU("rtx-4090", "NVIDIA GeForce RTX 4090 24GB", 24564 * MiB),
)}
DEFAULT_GPU = "h100-80gb"
# The GPUs the default report's capacity table covers, smallest first.
REPORT_GPUS = ("l4", "l40s", "h100-80gb", "h200")


def parse_gpu(text: str) -> GPU:
    """A preset name (`h100-80gb`, `h200`, ...) or a size (`80GiB`, `24GB`) → GPU."""
    from granite_cli.render import parse_bytes

    key = text.strip().lower()
    if key in GPUS:
        return GPUS[key]
    try:
        n = int(parse_bytes(text))
    except InputError:
        raise InputError(f"unknown --gpu {text!r}: give a size such as 80GiB, or one of {', '.join(GPUS)}") from None
    return GPU(text.strip(), text.strip(), n)
