"""`granite profiles list | show | export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from granite_cli.commands.common import Format, FormatOpt, emit_rows, out, say

MODEL_HELP = "Profile name, config.json path, checkpoint folder or Hub id org/name[@rev]."
app = typer.Typer(help="List, show and export model profiles.", no_args_is_help=True)


@app.command("list")
def profiles_list(fmt: FormatOpt = Format.table) -> None:
    """Every profile: kind, layer counts, total and active parameters, context."""
    from granite_cli.params import human_count
    from granite_cli.profile_info import profile_rows

    rows = profile_rows()
    hc = lambda v: human_count(v) if isinstance(v, int) else str(v)  # noqa: E731
    emit_rows(
        rows,
        fmt,
        columns=["name", "kind", "architecture", "attention_layers", "mamba_layers", "experts", "params_total",
                 "params_active", "context"],
        headers={"attention_layers": "attn", "mamba_layers": "mamba", "params_total": "total",
                 "params_active": "active"},
        json_obj={"profiles": rows},
        formatters={"params_total": hc, "params_active": hc},
    )


@app.command("show")
def profiles_show(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    fmt: FormatOpt = Format.table,
) -> None:
    """One model's full configuration and its parameter groups."""
    from granite_cli.profile_info import profile_detail

    d = profile_detail(model)
    if fmt is Format.json:
        emit_rows([], fmt, json_obj=d)
        return
    rows = [{"field": k, "value": v} for k, v in d["config"].items()]
    rows += [{"field": f"params.{k}", "value": v} for k, v in d["params"]["groups"].items()]
    rows += [{"field": "params.total", "value": d["params"]["total"]},
             {"field": "params.active", "value": d["params"]["active"]}]
    emit_rows(rows, fmt, columns=["field", "value"], title=d["config"]["name"])


@app.command("export")
def profiles_export(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write config.json into (created if missing).")],
    force: Annotated[bool, typer.Option("--force", help="Replace a config.json already in the folder.")] = False,
) -> None:
    """Write a Hugging Face config.json that transformers' config class for the architecture loads."""
    from granite_cli.config import export_hf_config, load_config

    path = export_hf_config(load_config(model), out_dir, overwrite=force)
    say(f"wrote {path}")
    out(str(path))
