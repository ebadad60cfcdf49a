"""`granite env`."""

from __future__ import annotations

from granite_cli.commands.common import Format, FormatOpt, emit_rows


def env(fmt: FormatOpt = Format.table) -> None:
    """Python, torch, triton, CUDA and GPU (NVML), CPU model, threads, resolved kernel implementation."""
    from granite_cli.env import environment

    e = environment()
    if fmt is Format.json:
        emit_rows([], fmt, json_obj=e)
        return
    g = e.pop("gpu")
    rows = [{"item": k, "value": v} for k, v in e.items()]
    if g.get("available"):
        rows += [{"item": f"gpu{x['index']}",
                  "value": f"{x['name']} ({x['memory_bytes'] / 2**30:.1f} GiB)"} for x in g["gpus"]]
        rows.append({"item": "nvidia_driver", "value": g.get("driver")})
    else:
        rows.append({"item": "gpu", "value": f"none ({g.get('reason')})"})
    emit_rows(rows, fmt, columns=["item", "value"])
