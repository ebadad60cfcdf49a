"""`granite bench` (placeholder until the bench issue lands)."""

from __future__ import annotations


def bench() -> None:
    """Sweep context and batch: prefill and decode throughput, latency and memory."""
    from granite_cli.errors import GraniteError

    raise GraniteError("granite bench is not implemented yet")
