"""Context and batch sizes as users type them: `512`, `4k` (4096), `128k`, `1m`; lists `1k,4k,128k`;
ranges `first-last*mult` (geometric) or `first-last+step` (arithmetic), e.g. `1k-128k*2`, `512-4k+512`.
Shared by bench's sweep and memory-report."""

from __future__ import annotations

import re

from granite_cli.errors import InputError

_SIZE = re.compile(r"^(\d+)([kKmM]?)$")
# A context or batch beyond 2^40 describes no machine, and past it sizes multiplied together overflow int64.
MAX_SIZE = 2**40
# More values than a sweep or a report can use; a range that would give more is refused before it is expanded.
MAX_VALUES = 1000


def parse_size(s: str, what: str = "size") -> int:
    m = _SIZE.match(s.strip())
    if not m:
        raise InputError(f"bad {what} {s!r}: use an integer with an optional k or m suffix, e.g. 4k")
    n = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    if n <= 0:
        raise InputError(f"bad {what} {s!r}: must be positive")
    if n > MAX_SIZE:
        raise InputError(f"bad {what} {s[:40]!r}: at most {MAX_SIZE} (1m = 1048576)")
    return n



def parse_list(spec: str, what: str = "size") -> list[int]:
    """`1k,4k`, `1k-128k*2`, `512-4k+512` (and mixtures) → sorted unique positive integers."""
    if spec is None or not str(spec).strip():
        raise InputError(f"empty {what} list")
    out: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        m = re.match(r"^([^-*+]+)-([^-*+]+)(?:([*+])(\d+))?$", part)
        if m:
            lo, hi = parse_size(m.group(1), what), parse_size(m.group(2), what)
            op, step = m.group(3) or "*", int(m.group(4) or 2)
            if hi < lo:
                raise InputError(f"bad {what} range {part!r}: the end is below the start")
            if (op == "*" and step < 2) or (op == "+" and step < 1):
                raise InputError(f"bad {what} range {part!r}: the step must grow (*2 or more, +1 or more)")
            count = (hi - lo) // step + 1 if op == "+" else len(_geometric(lo, hi, step))
            if count + len(out) > MAX_VALUES:
                raise InputError(f"bad {what} range {part!r}: {count} values, more than the {MAX_VALUES} a list may "
                                 f"hold; use a larger step or a geometric range such as 1k-128k*2")
            v = lo
            while v <= hi:
                out.append(v)
                v = v * step if op == "*" else v + step
        else:
            out.append(parse_size(part, what))
        if len(out) > MAX_VALUES:
            raise InputError(f"bad {what} list: more than {MAX_VALUES} values")
    return sorted(set(out))


def _geometric(lo: int, hi: int, mult: int) -> list[int]:
    out, v = [], lo
    while v <= hi:  # at most log2(MAX_SIZE) steps
        out.append(v)
        v *= mult
    return out


def parse_rates(spec: str) -> list[float]:
    """`2`, `0.5,1,2,4` → sorted unique request rates per second (positive, finite)."""
    out: list[float] = []
    for part in str(spec).split(","):
        try:
            v = float(part.strip())
        except ValueError:
            raise InputError(f"bad --rate {part.strip()!r}: give requests per second, e.g. 2 or 0.5,1,2,4") from None
        if not (v > 0 and v < float("inf")):
            raise InputError("--rate must be positive numbers of requests per second")
        out.append(v)
    if len(out) > MAX_VALUES:
        raise InputError(f"bad --rate list: more than {MAX_VALUES} values")
    return sorted(set(out))
