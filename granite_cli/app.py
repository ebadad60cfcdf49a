"""The `granite` entry point: the Typer root and the exit-code contract.

Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input, 3 a check or budget failed.
A GraniteError becomes one line on stderr; GRANITE_DEBUG=1 shows the traceback instead.
Heavy imports (torch) happen inside commands, never at import time, so `granite --help` is fast.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import warnings

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
class _Stopped(Exception):
    """A KeyboardInterrupt (Ctrl-C, or SIGTERM as _Terminated) carried out of a command past Typer,
    which would turn it into a bare exit 130 and lose what the command said it kept."""


def _carried(fn):
    @functools.wraps(fn)  # Typer reads the options from the wrapped signature
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as e:
            raise _Stopped(e) from None
    return run


app.command("bench")(_carried(bench.bench))
app.command("memory-report")(_carried(memory.memory_report))
app.command("convert")(_carried(convert.convert))
app.command("inspect")(_carried(convert.inspect))
app.add_typer(profiles.app, name="profiles")
app.command("env")(_carried(env.env))


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


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so it unwinds as Ctrl-C does (temporary output removed,
    finished rows kept and counted) and exits 143."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise _Terminated()


def _streams() -> None:
    """Standard streams that cannot break a run: text that the terminal's encoding cannot show is
    escaped instead of raising, and a closed stderr is a sink."""
    for s in (sys.stdout, sys.stderr):
        if s is not None and (getattr(s, "encoding", "") or "").lower().replace("-", "") != "utf8":
            try:
                s.reconfigure(errors="backslashreplace")
            except (AttributeError, ValueError):
                pass
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    from granite_cli.redact import redact

    sys.stderr.write(f"warning: {redact(str(message))}\n")


def main() -> None:
    from granite_cli.errors import GraniteError, GraniteWarning
    from granite_cli.redact import redact, register_environment

    debug = os.environ.get("GRANITE_DEBUG") == "1"
    _streams()
    register_environment()
    if sys.stdout is None:
        sys.stderr.write("error: standard output is closed; granite writes its data there: redirect it "
                         "(> FILE, or > /dev/null to discard it)\n")
        sys.exit(2)
    signal.signal(signal.SIGTERM, _on_sigterm)
    warnings.simplefilter("default", GraniteWarning)
    warnings.showwarning = _warning_line
    try:
        code = app(standalone_mode=False)  # usage errors come back here, to be said in one line
        sys.stdout.flush()
    except GraniteError as e:
        if debug:
            raise
        sys.stderr.write(f"error: {redact(str(e))}\n")
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, _Stopped) as e:  # the work may say what it kept, as the interrupt's argument
        e = e.args[0] if isinstance(e, _Stopped) else e
        kept = f"; {redact(str(e.args[0]))}" if e.args else ""
        term = isinstance(e, _Terminated)
        sys.stderr.write(f"interrupted{' (SIGTERM)' if term else ''}{kept}\n")
        sys.exit(143 if term else 130)
    except typer.Abort:  # Ctrl-C while Typer itself was reading input
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except BrokenPipeError:  # the reader of stdout went away (`| head`): say so once, leave quietly
        _quiet_stdout()
        sys.stderr.write("error: standard output was closed by its reader before all data was written\n")
        sys.exit(1)
    except Exception as e:  # an unexpected failure: one line, exit 1, traceback on request
        if _is_usage_error(e):
            msg = str(e.format_message())
            # a bare `granite` or command group prints its help (exit 2, as Typer does); anything else is one line
            sys.stderr.write(msg if msg.startswith("Usage:") else f"error: {redact(_usage_line(e))}\n")
            sys.exit(e.exit_code)
        if debug:
            raise
        sys.stderr.write(f"error: {type(e).__name__}: {redact(str(e))} (set GRANITE_DEBUG=1 for the traceback)\n")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's own flush at exit does not fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


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
