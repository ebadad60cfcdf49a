"""A conversion, one tensor at a time: open the source, plan (convert.plan), write in the output's
format (convert.formats) to a temporary name beside DST, verify (convert.verify), and only then rename
it into place; any failure or interruption leaves no DST.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from granite_cli.checkpoint.init import check_seed
from granite_cli.checkpoint.sources import ProfileSource, Source, open_source
from granite_cli.convert.plan import Plan, disk_shortfall, plan
from granite_cli.convert.verify import verify
from granite_cli.errors import GraniteError, InputError
from granite_cli.fsutil import Staging, check_destination

__all__ = ["convert", "disk_shortfall", "execute", "open_any", "plan"]


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


def open_any(src: str | None, from_profile: str | None, dtype: str | None, seed: int = 0) -> Source:
    if from_profile:
        if src:
            raise InputError("give either SRC or --from-profile, not both")
        return ProfileSource(from_profile, dtype, check_seed(seed))
    if not src:
        raise InputError("missing SRC: a checkpoint folder or .gguf file (or --from-profile NAME)")
    return open_source(src)


def convert(src: str | Path | None, dst: str | Path, *, from_profile: str | None = None, dtype: str | None = None,
            quant: str | None = None, keep: tuple[str, ...] = (), shard_size: str = "5GB", force: bool = False,
            verify: bool = True, seed: int = 0, no_vocab: bool = False) -> dict:
    """The whole conversion in one call (what `granite convert` runs): open, plan, write, verify, rename."""
    source = open_any(str(src) if src is not None else None, from_profile, dtype, seed)
    p = plan(source, dst, dtype=dtype, quant_method=quant, keep=keep, shard_size=shard_size, force=force,
             no_vocab=no_vocab)
    return execute(p, verify_output=verify)
