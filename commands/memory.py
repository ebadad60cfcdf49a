"""`granite memory-report` (placeholder until the memory-report issue lands)."""

from __future__ import annotations


def memory_report() -> None:
    """Weights, KV cache, Mamba state and activations per model: predicted, traced and measured."""
    from granite_cli.errors import GraniteError

    raise GraniteError("granite memory-report is not implemented yet")
