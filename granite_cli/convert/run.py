"""A conversion, one tensor at a time: open the source, plan (convert.plan), write in the output's
format (convert.formats) to a temporary name beside DST, verify (convert.verify), and only then rename
it into place; any failure or interruption leaves no DST.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from granite_cli.checkpoint.random_weights import check_seed
from granite_cli.checkpoint.sources import ProfileSource, Source, open_source
from granite_cli.convert.layout import ConvertOptions, Plan
from granite_cli.convert.plan import disk_shortfall, plan
from granite_cli.convert.verify import verify
from granite_cli.errors import GraniteError, InputError
from granite_cli.fsutil import Staging, check_destination

__all__ = ["ConvertOptions", "convert", "disk_shortfall", "execute", "open_any", "plan"]


def execute(p: Plan, *, verify_output: bool = True, progress: Callable[[int, int, str], None] | None = None,
            status: Callable[[str], None] | None = None) -> dict:
    """Write, verify, rename. Returns the report (plan summary, timings, verification). The output
    is built in a staging folder beside DST (fsutil.Staging: one run per DST at a time; a killed
    run's leftovers removed by the next), so an error or interrupt leaves DST as it was."""
    t0 = time.perf_counter()
    with Staging(p.dst, status) as st:
        tmp = st.target
        try:
            p.fmt.make_target(tmp)
            p.fmt.write(p, tmp, progress)
            t_write = time.perf_counter() - t0
            ver = None
            if verify_output:
                if status:
                    status("verifying: inventory, metadata, every tensor, logits ...")
                ver = verify(p, tmp)
        except GraniteError as e:  # name DST, not the staging path that is gone once this returns
            raise type(e)(str(e).replace(str(tmp), str(p.dst))) from None
        try:
            st.commit(replace=(lambda d: check_destination(d, None, p.fmt.kind, force=True)) if p.force else None)
        except FileExistsError:
            raise InputError(f"{p.dst} appeared while this run wrote it (another program made it); nothing was "
                             "replaced: rerun with --force to replace it") from None
    rep = p.summary()
    rep.update({"seconds_write": round(t_write, 3), "seconds_total": round(time.perf_counter() - t0, 3),
                "verification": ver if ver is not None else "skipped (--no-verify)"})
    return rep


def open_any(src: str | None, o: ConvertOptions | None = None) -> Source:
    """SRC, or with o.from_profile random weights at a profile's shapes."""
    o = o or ConvertOptions()
    if o.from_profile:
        if src:
            raise InputError("give either SRC or --from-profile, not both")
        return ProfileSource(o.from_profile, o.dtype, check_seed(o.seed))
    if not src:
        raise InputError("missing SRC: a checkpoint folder or .gguf file (or --from-profile NAME)")
    return open_source(src)


def convert(src: str | Path | None, dst: str | Path, o: ConvertOptions | None = None) -> dict:
    """The whole conversion in one call (what `granite convert` runs): open, plan, write, verify, rename."""
    o = o or ConvertOptions()
    source = open_any(str(src) if src is not None else None, o)
    return execute(plan(source, dst, o), verify_output=o.verify)
