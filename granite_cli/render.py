"""Rows → text for the machine formats (json, csv, md). Knows nothing about what the rows mean.

The human table (Rich) lives in the CLI layer; the core never imports Rich.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from typing import Any, Sequence

from granite_cli.errors import InputError


def json_safe(v: Any) -> Any:
    """NaN and infinities become null so every JSON document we print parses with json.loads."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def to_json(obj: Any) -> str:
    return json.dumps(json_safe(obj), indent=2, allow_nan=False)


def columns_of(rows: Sequence[dict], columns: Sequence[str] | None = None) -> list[str]:
    if columns:
        return list(columns)
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    return cols


def cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return " ".join(cell(x) for x in v)
    return str(v)


def number_text(v: float | None) -> str:
    """A measurement for people to read: thousands separated, no scientific notation, about three
    significant digits below 10 (0.00123, 4.56, 78.9, 1,190,980)."""
    if v is None or isinstance(v, float) and math.isnan(v):
        return ""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    decimals = max(2, 2 - math.floor(math.log10(a)))
    return f"{v:.{decimals}f}"


def percent_text(v: float | None) -> str:
    """A fraction as a percentage (0.334 -> 33.4%)."""
    return "" if v is None or isinstance(v, float) and math.isnan(v) else f"{v * 100:.1f}%"


def to_csv(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    cols = columns_of(rows, columns)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([cell(r.get(c)) for c in cols])
    return buf.getvalue()


# What makes markdown out of text: code spans, emphasis, links and images, raw HTML and autolinks, table
# cells. Escaped, a server's or a file's text stays text in report.md and report.html.
_MD_META = re.compile(r"([\\`*\[\]<>|])")
_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x85\u2028\u2029]+")


def md_text(v: Any) -> str:
    """Any value as markdown that renders as exactly its text, on one line: the metacharacters that
    could open a code span, emphasis, a link, an image, HTML or a table cell are backslash-escaped."""
    return _MD_META.sub(r"\\\1", _LINE_BREAKS.sub(" ", cell(v)))


def md_code(v: Any) -> str:
    """Any value as one markdown code span, whatever backticks it holds: fenced by one more backtick
    than its longest run (CommonMark), padded where it starts or ends with one or with spaces; empty
    text is no span. Not for table cells (to_markdown's cells are md_text)."""
    text = _LINE_BREAKS.sub(" ", cell(v))
    if not text:
        return ""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    # a reader strips one space from each end of a span that has both (and is not all spaces)
    edge = text[0] == "`" or text[-1] == "`" or (text[0] == " " and text[-1] == " " and text.strip())
    pad = " " if edge else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def to_markdown(rows: Sequence[dict], columns: Sequence[str] | None = None,
                headers: dict[str, str] | None = None) -> str:
    """A markdown table; every cell and heading is text (md_text), never markup."""
    cols = columns_of(rows, columns)
    headers = headers or {}
    lines = ["| " + " | ".join(md_text(headers.get(c, c)) for c in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(md_text(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(s: str, flag: str | None = None) -> float:
    """`10GiB`, `10GB` (decimal), `512MiB`, `80G` (binary), `1e10` → bytes. `flag`: the option the size
    was given to, which an error names."""
    what = f"bad {flag}" if flag else "bad size"
    m = re.match(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*$", str(s))
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(f"{what} {str(s)[:40]!r}: use a number with a unit such as 10GiB, 24GB or 512MiB")
    v = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if v <= 0:
        raise InputError(f"{what} {s!r}: must be positive")
    if not v < 2**63:
        raise InputError(f"{what} {s[:40]!r}: too large (at most 2^63 bytes)")
    return v
