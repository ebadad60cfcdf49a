"""Re-render committed `granite bench` report folders from their rows, with the current analysis.

    python scripts/rerender_bench.py DIR [DIR ...]

Rows written before the total-peak fields existed get them where the rows hold the figure: on a GPU
the allocator's peak (`peak_bytes`, source cuda_allocated) is the total peak; every row gets
memory-report's prediction from its model's config. A CPU row from before has no tracked total (the
tracker did not run), so its measured ratio stays n/a until the sweep is rerun. A folder that an
earlier granite wrote without a manifest gets one listing the report files it holds (README.md and
other notes stay the user's), so the new report is written in place beside them.

Rows from before the roofline fields get their FLOPs, bytes and achieved rates from their own median
time (the FLOP and byte models need only the case); the fractions of the machine's ceilings need the
probes of the machine that ran them, so those stay blank until the sweep is rerun.
"""

from __future__ import annotations

import fnmatch
import json
import re
import sys
from pathlib import Path

import torch

from granite_cli.bench.analysis import analyse
from granite_cli.bench.estimate import predicted_total
from granite_cli.bench.report import REPORT_FILES, write_report
from granite_cli.bench.roofline import rates, work
from granite_cli.bench.row import Row
from granite_cli.checkpoint.dtypes import parse_dtype
from granite_cli.config import load_config
from granite_cli.fsutil import MANIFEST, _sha256, _write_manifest
from granite_cli.params import count_params


def upgrade(r: dict) -> dict:
    if r.get("phase") == "serve":  # a server's row: nothing of ours to predict
        return r
    if r.get("status") not in ("ok", "invalid"):
        return r
    cfg = load_config(r["model"])
    if r.get("work_flops") is None and r.get("median_s"):
        flops, moved = work(cfg, r["phase"], r["batch"], r["ctx"], r.get("gen") or 16, r.get("ubatch"),
                            parse_dtype(r["dtype"]).itemsize, r.get("device") or "cpu")
        r = {**r, **rates(flops, moved, r["median_s"], None)}
    if r.get("predicted_total_bytes") is not None:
        return r
    weights = count_params(cfg).total * parse_dtype(r["dtype"]).itemsize
    tokens = 1 if r["phase"] == "decode" else min(r["ctx"], r.get("ubatch") or 4096)
    gen = r.get("gen") or 16
    r = {**r, "weights_bytes": r.get("weights_bytes", weights),
         "predicted_total_bytes": int(predicted_total(cfg, r["dtype"], r["batch"], r["ctx"] + gen, tokens, weights))}
    if r.get("memory_source") == "cuda_allocated" and r.get("peak_bytes"):
        r.update(peak_total_bytes=r["peak_bytes"], peak_total_source="cuda_allocated")
    return r


def main(dirs: list[str]) -> int:
    for d in map(Path, dirs):
        rows = [Row.from_dict(upgrade(json.loads(x))) for x in (d / "rows.jsonl").read_text().splitlines() if x.strip()]
        text = (d / "report.md").read_text()
        m = re.search(r"^- sweep: `(.*)`$", text, re.M)
        spec = json.loads(m.group(1)) if m else {}
        w = re.search(r"^- wall time: (\d+) s$", text, re.M)
        if not (d / MANIFEST).exists():  # written by granite before manifests existed
            ours = [p.name for p in d.iterdir()
                    if p.is_file() and any(fnmatch.fnmatch(p.name, g) for g in REPORT_FILES)]
            _write_manifest(d, {n: _sha256(d / n) for n in ours})
        write_report(d, rows, analyse(rows), spec, float(w.group(1)) if w else None)
        print(f"{d}: {len(rows)} rows re-rendered", file=sys.stderr)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[1:]))
