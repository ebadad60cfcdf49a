"""`granite convert` (placeholder until the convert issue lands)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Convert checkpoints between formats and dtypes (safetensors, GGUF).", no_args_is_help=True)


@app.command("inspect")
def inspect() -> None:
    """Summarise a checkpoint."""
    from granite_cli.errors import GraniteError

    raise GraniteError("granite convert is not implemented yet")
