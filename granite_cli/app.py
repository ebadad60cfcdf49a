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
app.command("inspect")(convert.inspect)
app.add_typer(profiles.app, name="profiles")
app.command("env")(env.env)


def _version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    pass


def main() -> None:
    from granite_cli.errors import GraniteError

    debug = os.environ.get("GRANITE_DEBUG") == "1"
    try:
        code = app(standalone_mode=False)  # usage errors come back here, to be said in one line
    except GraniteError as e:
        if debug:
            raise
        sys.stderr.write(f"error: {e}\n")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except typer.Abort:  # Ctrl-C while Typer itself was reading input
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except Exception as e:  # an unexpected failure: one line, exit 1, traceback on request
        if _is_usage_error(e):
            msg = str(e.format_message())
            # a bare `granite` or command group prints its help (exit 2, as Typer does); anything else is one line
            sys.stderr.write(msg if msg.startswith("Usage:") else f"error: {_usage_line(e)}\n")
            sys.exit(e.exit_code)
        if debug:
            raise
        sys.stderr.write(f"error: {type(e).__name__}: {e} (set GRANITE_DEBUG=1 for the traceback)\n")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _is_usage_error(e: Exception) -> bool:
    """Typer's own usage errors (a bad option value, an unknown option): they carry an exit code and
    a message; matched by that shape, since Typer exports no public class for them."""
    return isinstance(getattr(e, "exit_code", None), int) and callable(getattr(e, "format_message", None))


def _usage_line(e: Exception) -> str:
    msg = " ".join(str(e.format_message()).split())
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        root = ctx
        while getattr(root, "parent", None) is not None:
            root = root.parent
        msg += f" (see `granite{ctx.command_path[len(root.command_path):]} --help`)"
    return msg
