"""Routed-expert decisions recorded during a real run and handed back, in the same order, during an
allocation replay of it (memory.trace.AllocationReplay), whose tensors hold no values to route by:
how bench measures a MoE prefill's working set without running it twice."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class _Tape:
    log: list | None = None
    replay: Iterator | None = None


def routed(decide):
    """`decide()`'s routing, or the next recorded one during a replay; recorded when a record is on."""
    if _Tape.replay is not None:
        return next(_Tape.replay)
    out = decide()
    if _Tape.log is not None:
        _Tape.log.append(out)
    return out


@contextmanager
def record_routing(log: list):
    """Append to `log` the routing of every routed-expert call in the block, in order."""
    _Tape.log = log
    try:
        yield log
    finally:
        _Tape.log = None


@contextmanager
def replay_routing(log: list):
    """Routed-expert calls in the block take their routing from `log` (a record_routing of the same run)."""
    _Tape.replay = iter(log)
    try:
        yield
    finally:
        _Tape.replay = None
