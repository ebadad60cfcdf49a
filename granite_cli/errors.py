"""The error types the core raises, each tied to one exit code of the CLI contract.

0 ok, 1 runtime failure, 2 bad usage or input, 3 a check or budget failed. The CLI turns a
GraniteError into one line on stderr (no traceback unless GRANITE_DEBUG=1) and its exit code.
"""

from __future__ import annotations


class GraniteError(Exception):
    """Base class: a failure with a one-line message that names the problem and the fix."""

    exit_code = 1


class InputError(GraniteError):
    """Bad usage or input: an unknown model, a malformed profile, an impossible geometry."""

    exit_code = 2


class CheckFailed(GraniteError):
    """The work ran, but a check, budget or regression gate did not pass."""

    exit_code = 3


class GraniteWarning(UserWarning):
    """Something the user should know that does not stop the work (a config key granite does not
    read); the CLI prints it as one `warning:` line on stderr."""
