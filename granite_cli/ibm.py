"""IBM's published claims about Granite 4.0, as numbers (their sources are in docs/sources.md)."""

from __future__ import annotations

# "70-80% less memory than comparable Transformers at long context and many concurrent sessions":
# the claim holds where the hybrid needs at most 1 - MEMORY_REDUCTION of its comparable's memory.
MEMORY_REDUCTION = 0.70
MEMORY_RATIO = 1 - MEMORY_REDUCTION
