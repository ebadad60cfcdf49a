"""The benchmark heap policy (granite_cli.hostmem), each case in a fresh process: it is process-wide."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, torch
from granite_cli import hostmem
from granite_cli.measure import PeakMemory, rss_bytes
out = {"policy": hostmem.retain_freed_memory()}
base = rss_bytes()
x = torch.ones(100_000_000)  # 400 MB
del x
out["kept_after_free"] = rss_bytes() - base
with PeakMemory("cpu") as pm:  # re-uses the freed 400 MB: its RSS increase must show all the same
    y = torch.ones(50_000_000)  # 200 MB
    del y
out["block_delta"] = pm.delta
hostmem.release_free_memory()
out["kept_after_release"] = rss_bytes() - base
print(json.dumps(out))
"""


def _run(env_extra):
    env = {**os.environ, **env_extra}
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True,
                       stdin=subprocess.DEVNULL, timeout=300)
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc policy")
def test_retain_keeps_freed_memory_and_release_returns_it():
    r = _run({"GRANITE_HOST_MALLOC": "retain"})
    if r["policy"] != "glibc-retain":
        pytest.skip("not glibc")
    mb = 2**20
    assert r["kept_after_free"] > 300 * mb  # freed, but kept for reuse
    assert r["kept_after_release"] < 50 * mb  # malloc_trim handed it back
    # PeakMemory releases before its baseline, so a block that re-uses freed memory still shows its growth
    assert r["block_delta"] > 150 * mb


def test_opt_out_leaves_the_system_allocator():
    r = _run({"GRANITE_HOST_MALLOC": "system"})
    assert r["policy"] == "system"
    assert r["kept_after_free"] < 50 * 2**20  # glibc unmapped the big block on free, as usual
    assert r["block_delta"] > 150 * 2**20
