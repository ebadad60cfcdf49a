"""What every command shares: the output sink and the option aliases. CLI layer only."""

from __future__ import annotations

import enum
import sys
from typing import Annotated, Any, Sequence

import typer

from granite_cli import render
from granite_cli.redact import redact, scrub


class Format(str, enum.Enum):
    table = "table"
    json = "json"
    csv = "csv"
    md = "md"


FormatOpt = Annotated[
    Format,
    typer.Option("--format", "-f", help="Output format: table (for people), json, csv or md. Data goes to stdout."),
]


def out(text: str) -> None:
    """Data to stdout (secrets masked: granite_cli.redact)."""
    _data(redact(text))


def _data(text: str) -> None:
    """Rendered rows to stdout. Their values are redacted already (scrub); redacting the text again
    would mask granite's own keys and headers where a short key happens to spell them."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def say(msg: str) -> None:
    """Messages and progress to stderr, so stdout stays parseable (secrets masked)."""
    sys.stderr.write(redact(msg) + "\n")
    sys.stderr.flush()


def emit_rows(
    rows: Sequence[dict],
    fmt: Format,
    *,
    columns: Sequence[str] | None = None,
    headers: dict[str, str] | None = None,
    json_obj: Any = None,
    title: str | None = None,
    formatters: dict[str, Any] | None = None,
) -> None:
    """Render rows in the chosen format. json prints `json_obj` (default: the rows list). Every string
    is redacted before it is rendered (a JSON-escaped secret would not match the text afterwards)."""
    rows, json_obj = scrub(list(rows)), scrub(json_obj)
    if fmt is Format.json:
        _data(render.to_json(json_obj if json_obj is not None else list(rows)))
    elif fmt is Format.csv:
        _data(render.to_csv(rows, columns))
    elif fmt is Format.md:  # for people: the table's formatting; csv stays raw for machines
        f = formatters or {}
        shown = [{k: (f[k](v) if k in f else v) for k, v in r.items()} for r in rows]
        _data(render.to_markdown(shown, columns, headers))
    else:
        _rich_table(rows, columns, headers or {}, title, formatters or {})


def _rich_table(rows, columns, headers, title, formatters) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    cols = render.columns_of(rows, columns)
    t = Table(title=title, show_lines=False, header_style="bold")
    for c in cols:
        t.add_column(headers.get(c, c), overflow="fold")
    for r in rows:  # cells as Text: a name holding [brackets] is shown as typed, never read as Rich markup
        t.add_row(*[Text(str(formatters[c](r.get(c)) if c in formatters else render.cell(r.get(c)))) for c in cols])
    # Off a terminal Rich would wrap at 80 columns; keep rows whole for pipes and logs.
    Console(file=sys.stdout, soft_wrap=False, width=None if sys.stdout.isatty() else 200).print(t)
