"""The `granite` entry point: the Typer root and the exit-code contract.

Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input, 3 a check or budget failed.
A GraniteError becomes one line on stderr; GRANITE_DEBUG=1 shows the traceback instead.
Heavy imports (torch) happen inside commands, never at import time, so `granite --help` is fast.
"""

from __future__ import annotations

import os
import sys

import typer

from granite_cli import __version__
from granite_cli.commands import bench, convert, env, memory, profiles

app = typer.Typer(
    name="granite",
    help="Benchmark, size and convert IBM Granite 4.0 hybrid Mamba-2/Transformer models.\n\n"
    "Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input, 3 a check or budget failed.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)
app.command("bench")(bench.bench)
app.command("memory-report")(memory.memory_report)
app.command("convert")(convert.convert)
app.add_typer(profiles.app, name="profiles")
app.command("env")(env.env)


def _version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    pass


def main() -> None:
    from granite_cli.errors import GraniteError

    debug = os.environ.get("GRANITE_DEBUG") == "1"
    try:
        app()
    except GraniteError as e:
        if debug:
            raise
        sys.stderr.write(f"error: {e}\n")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except Exception as e:  # an unexpected failure: one line, exit 1, traceback on request
        if debug:
            raise
        sys.stderr.write(f"error: {type(e).__name__}: {e} (set GRANITE_DEBUG=1 for the traceback)\n")
        sys.exit(1)
