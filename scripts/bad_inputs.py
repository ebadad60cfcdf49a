"""Run `granite` against a corpus of bad inputs, faults and dangerous requests; tabulate what it did.

Each case builds its inputs in a fresh temporary folder, runs the real CLI in a subprocess and
records the exit code, the last stderr line, whether a traceback was printed, and (for the
data-loss cases) whether every file the user owned before the run is still there, unchanged.

    python scripts/bad_inputs.py [--out reports/reliability/bad-inputs.md] [--only PREFIX]

The expectation column is the project's contract: exit 2 for bad input, nothing of the user's lost.
It uses only the CLI and the project's own writers, so the same script runs on any revision.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def granite(*args, cwd, timeout=300):
    env = {**os.environ, "GRANITE_DEBUG": ""}
    if os.environ.get("BAD_INPUTS_TREE"):  # another checkout of the project (its commands/ and profiles/ linked in)
        env["PYTHONPATH"] = os.environ["BAD_INPUTS_TREE"]
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "granite_cli", *map(str, args)], capture_output=True, text=True,
                           cwd=cwd, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"rc": "timeout", "stderr": "", "secs": timeout}
    return {"rc": r.returncode, "stderr": r.stderr, "secs": time.perf_counter() - t0}


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (symlinks not followed) → sha256 of its bytes, or the link's target."""
    out = {}
    for dp, dns, fns in os.walk(root):
        for f in fns + [d for d in dns if os.path.islink(os.path.join(dp, d))]:
            p = Path(dp) / f
            key = str(p.relative_to(root))
            out[key] = "link:" + os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# --------------------------------------------------------------------------------- input makers

def ckpt(tmp: Path, name="ckpt", profile="tiny-hybrid", extra=()) -> Path:
    d = tmp / name
    r = granite("convert", "--from-profile", profile, d, "--no-verify", *extra, cwd=tmp)
    assert r["rc"] == 0, r["stderr"]
    return d


def gguf_file(tmp: Path, name="m.gguf") -> Path:
    d = tmp / name
    r = granite("convert", "--from-profile", "tiny-hybrid", d, "--no-verify", cwd=tmp)
    assert r["rc"] == 0, r["stderr"]
    return d


def config_with(tmp: Path, **changes) -> Path:
    d = ckpt(tmp)
    cj = json.loads((d / "config.json").read_text())
    cj.update(changes)
    (d / "config.json").write_text(json.dumps(cj))
    return d


def rewrite_gguf(src: Path, dst: Path, kv_change=None, shape_change=None) -> Path:
    """Copy a GGUF, re-encoding its metadata with changes (value types inferred from Python types)."""
    sys.path.insert(0, str(ROOT))
    from granite_cli.checkpoint import gguf as G

    f = G.GGUFFile(src)
    kv = dict(f.kv)
    kv.update(kv_change or {})

    kvs = [G.KV.of(k, v) for k, v in kv.items() if k != "general.alignment"]
    if "general.alignment" in kv:
        kvs.append(G.KV("general.alignment", G.U32, kv["general.alignment"]))
    infos = []
    for n, ti in f.tensors.items():
        shape = (shape_change or {}).get(n, ti.shape)
        infos.append(G.TensorInfo(n, tuple(shape), ti.gtype))
    w = G.GGUFWriter(dst, kvs, infos)
    for info, (n, ti) in zip(infos, f.tensors.items()):
        raw = f.raw(n)
        w._f.write(bytes(raw[: info.nbytes].numpy().tobytes()))
        w._f.write(b"\0" * (-info.nbytes % 32))
        w._next += 1
    w.close()
    return dst


def gguf_with(tmp: Path, shape_change=None, **kv) -> Path:
    return rewrite_gguf(gguf_file(tmp), tmp / "bad.gguf", kv, shape_change)


def st_header(tmp: Path, header, data=b"") -> Path:
    d = ckpt(tmp)
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    return d


def overlapping_offsets(tmp: Path) -> Path:
    d = ckpt(tmp)
    raw = (d / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    h = json.loads(raw[8 : 8 + n])
    names = [k for k in h if k != "__metadata__"]
    a = next(k for k in names if h[k]["shape"] == [64] and "norm" in k)  # two same-size tensors
    b = next(k for k in names if k != a and h[k]["shape"] == [64] and "norm" in k)
    h[b]["data_offsets"] = h[a]["data_offsets"]
    hb = json.dumps(h).encode()
    hb += b" " * (-len(hb) % 8)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])
    return d


def sharded(tmp: Path) -> Path:
    return ckpt(tmp, extra=("--shard-size", "20KB"))


def index_with(tmp: Path, fn) -> Path:
    d = sharded(tmp)
    ij = d / "model.safetensors.index.json"
    idx = json.loads(ij.read_text())
    fn(idx)
    ij.write_text(json.dumps(idx))
    return d


def _move_one(idx):
    wm = idx["weight_map"]
    names = sorted(set(wm.values()))
    k = next(iter(wm))
    wm[k] = next(n for n in names if n != wm[k])


def _escape(idx):
    k = next(iter(idx["weight_map"]))
    idx["weight_map"][k] = "../outside.safetensors"


# --------------------------------------------------------------------------------- the corpus
# (id, what, setup(tmp) -> (argv, watched folder or None), expected exit code)

def _user_report_dir(tmp):
    d = tmp / "reports"
    (d / "notes").mkdir(parents=True)
    (d / "notes.md").write_text("my notes\n")
    (d / "notes" / "a.txt").write_text("keep me\n")
    return d


CASES = [
    # ---- data loss
    ("loss-memory-out", "memory-report --out DIR holding the user's files",
     lambda t: (["memory-report", "-m", "tiny-hybrid", "--ctx", "1k", "--batch", "1", "-f", "json",
                 "--out", _user_report_dir(t)], t / "reports"), 2),
    ("loss-bench-out", "bench --out DIR holding the user's files",
     lambda t: (["bench", "-m", "tiny-hybrid", "--ctx", "32", "--batch", "1", "--gen", "2", "--reps", "1",
                 "--warmup", "0", "-f", "json", "--out", _user_report_dir(t)], t / "reports"), 2),
    ("loss-bench-jsonl", "bench --jsonl FILE that is the user's own file",
     lambda t: ((t / "data.jsonl").write_text("{\"my\": \"data\"}\n"),
                ["bench", "-m", "tiny-hybrid", "--ctx", "32", "--batch", "1", "--gen", "2", "--reps", "1",
                 "--warmup", "0", "-f", "json", "--jsonl", t / "data.jsonl"], t)[1:], 2),
    ("loss-src-in-dst", "convert parent/src parent --force",
     lambda t: (["convert", ckpt(t, "parent/src"), t / "parent", "--force"], t / "parent"), 2),
    ("loss-dst-has-user-files", "convert ckpt out --force, out holds notes and a sub-folder",
     lambda t: (ckpt(t), (t / "out" / "sub").mkdir(parents=True), (t / "out" / "notes.md").write_text("n\n"),
                ["convert", t / "ckpt", t / "out", "--force"], t / "out")[3:], 2),
    ("loss-force-over-file", "convert ckpt FILE --force (DST a user's file)",
     lambda t: (ckpt(t), (t / "file.txt").write_text("mine\n"),
                ["convert", t / "ckpt", t / "file.txt", "--force"], t)[2:], 2),
    ("loss-force-symlink", "convert ckpt LINK.gguf --force (DST a symlink to a user's file)",
     lambda t: (ckpt(t), (t / "precious.bin").write_text("mine\n"), os.symlink(t / "precious.bin", t / "x.gguf"),
                ["convert", t / "ckpt", t / "x.gguf", "--force"], t)[3:], 2),
    ("loss-force-dir-symlink", "convert ckpt LINK --force (DST a symlink to a user's folder)",
     lambda t: (ckpt(t), (t / "mine").mkdir(), (t / "mine" / "a.txt").write_text("mine\n"),
                os.symlink(t / "mine", t / "lnk"), ["convert", t / "ckpt", t / "lnk", "--force"], t)[4:], 2),
    ("loss-convert-dot", "convert ckpt . --force (the working folder)",
     lambda t: (ckpt(t), (t / "notes.md").write_text("n\n"), ["convert", t / "ckpt", ".", "--force"], t)[2:], 2),
    ("loss-export-file", "profiles export onto an existing file",
     lambda t: ((t / "f.txt").write_text("mine\n"), ["profiles", "export", "tiny-hybrid", t / "f.txt"], t)[1:], 2),
    ("loss-export-config", "profiles export into a folder with the user's config.json",
     lambda t: ((t / "d").mkdir(), (t / "d" / "config.json").write_text("{\"mine\": 1}\n"),
                ["profiles", "export", "tiny-hybrid", t / "d"], t)[2:], 2),
    # ---- config.json
    *[(f"config-{k}" + ("-2" if (k, v) == ("time_step_limit", [1, "a"]) else ""),
       f"config.json {k}: {json.dumps(v)}",
       (lambda k, v: lambda t: (["convert", "inspect", config_with(t, **{k: v})], None))(k, v), 2)
      for k, v in [("hidden_size", "64"), ("num_attention_heads", 0), ("rms_norm_eps", "tiny"),
                   ("time_step_limit", [0.5]), ("shared_intermediate_size", -1), ("tie_word_embeddings", "no"),
                   ("max_position_embeddings", "big"), ("vocab_size", 1.5), ("mamba_d_conv", 0),
                   ("layer_types", "mamba"), ("embedding_multiplier", None), ("rope_theta", -1),
                   ("num_experts_per_tok", True), ("attention_multiplier", "x"), ("time_step_limit", [1, "a"]),
                   ("rope_scaling", [1]), ("torch_dtype", 5), ("mamba_n_groups", 3)]],
    ("config-not-utf8", "config.json that is not UTF-8",
     lambda t: (ckpt(t), (t / "ckpt" / "config.json").write_bytes(b"{\"model_type\": \"\xff\xfe\"}"),
                ["convert", "inspect", t / "ckpt"], None)[2:], 2),
    ("config-not-object", "config.json that is a JSON list",
     lambda t: (ckpt(t), (t / "ckpt" / "config.json").write_text("[1, 2]"),
                ["convert", "inspect", t / "ckpt"], None)[2:], 2),
    ("config-model-arg", "memory-report -m with a config.json of wrong types",
     lambda t: (["memory-report", "-m", config_with(t, num_key_value_heads="2") / "config.json"], None), 2),
    # ---- GGUF
    ("gguf-time-step-rank-0", "GGUF ssm.time_step_rank = 0",
     lambda t: (["convert", "inspect", gguf_with(t, **{"granitehybrid.ssm.time_step_rank": 0})], None), 2),
    ("gguf-head-count-0", "GGUF attention.head_count = 0",
     lambda t: (["convert", "inspect", gguf_with(t, **{"granitehybrid.attention.head_count": 0})], None), 2),
    ("gguf-alignment-0", "GGUF general.alignment = 0",
     lambda t: (["convert", "inspect", gguf_with(t, **{"general.alignment": 0})], None), 2),
    ("gguf-block-count-str", "GGUF block_count stored as a string",
     lambda t: (["convert", "inspect", gguf_with(t, **{"granitehybrid.block_count": "5"})], None), 2),
    ("gguf-hf-config-not-object", "GGUF granite.hf_config not an object",
     lambda t: (["convert", "inspect", gguf_with(t, **{"granite.hf_config": "[1, 2]"})], None), 2),
    ("gguf-hf-config-bad-type", "GGUF granite.hf_config with a wrong type inside",
     lambda t: (["convert", "inspect", gguf_with(t, **{"granite.hf_config": json.dumps(
         {**json.loads(gguf_file_kv(t)), "rms_norm_eps": "tiny"})})], None), 2),
    ("gguf-zero-dim", "GGUF tensor with a zero dimension",
     lambda t: (["convert", "inspect", gguf_with(t, shape_change={"output_norm.weight": (0,)})], None), 2),
    ("gguf-zero-dim-embd", "GGUF token_embd.weight with a zero dimension",
     lambda t: (["convert", "inspect", gguf_with(t, shape_change={"token_embd.weight": (0, 64)})], None), 2),
    ("gguf-ssm-inner-0", "GGUF ssm.inner_size = 0",
     lambda t: (["convert", "inspect", gguf_with(t, **{"granitehybrid.ssm.inner_size": 0})], None), 2),
    ("gguf-head-count-kv-str", "GGUF attention.head_count_kv a list of strings",
     lambda t: (["convert", "inspect", gguf_with(t, **{"granitehybrid.attention.head_count_kv": ["a"] * 5})],
                None), 2),
    ("gguf-eps-str", "GGUF layer_norm_rms_epsilon a string",
     lambda t: (["convert", "inspect", gguf_with(t, **{"granitehybrid.attention.layer_norm_rms_epsilon": "x"})],
                None), 2),
    ("gguf-tensor-count-huge", "GGUF header claiming 2^60 tensors",
     lambda t: (gguf_file(t), (t / "h.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**60, 0) + b"\0" * 64),
                ["convert", "inspect", t / "h.gguf"], None)[2:], 2),
    ("gguf-string-huge", "GGUF key string longer than the file",
     lambda t: ((t / "h.gguf").write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**62) + b"\0" * 64),
                ["convert", "inspect", t / "h.gguf"], None)[1:], 2),
    # ---- safetensors and indexes
    ("st-header-list", "safetensors header valid JSON but a list",
     lambda t: (["convert", "inspect", st_header(t, [1, 2])], None), 2),
    ("st-entry-not-object", "safetensors header entry not an object",
     lambda t: (["convert", "inspect", st_header(t, {"a": 5})], None), 2),
    ("st-metadata-not-object", "safetensors __metadata__ a list",
     lambda t: (["convert", "inspect", st_header(t, {"__metadata__": [1]})], None), 2),
    ("st-overlap", "safetensors overlapping data_offsets",
     lambda t: (["convert", overlapping_offsets(t), t / "out"], None), 2),
    ("st-negative-shape", "safetensors negative shape",
     lambda t: (["convert", "inspect", st_header(t, {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}})],
                None), 2),
    ("index-weight-map-list", "index weight_map not an object",
     lambda t: (["convert", "inspect", index_with(t, lambda i: i.update(weight_map=[1]))], None), 2),
    ("index-wrong-shard", "index maps a tensor to a shard that lacks it",
     lambda t: (["convert", index_with(t, _move_one), t / "out"], None), 2),
    ("index-escape", "index shard name leaving the folder (../)",
     lambda t: ((t / "outside.safetensors").write_bytes(b"x"),
                ["convert", "inspect", index_with(t, _escape)], None)[1:], 2),
    ("index-absolute", "index shard name an absolute path",
     lambda t: (["convert", "inspect", index_with(t, lambda i: i["weight_map"].update(
         {next(iter(i["weight_map"])): "/etc/passwd"}))], None), 2),
    # ---- CLI values and paths
    ("cli-shard-size-inf", "convert --shard-size 1e999",
     lambda t: (["convert", "--from-profile", "tiny-hybrid", t / "o", "--shard-size", "1e999"], None), 2),
    ("cli-shard-size-0", "convert --shard-size 0",
     lambda t: (["convert", "--from-profile", "tiny-hybrid", t / "o", "--shard-size", "0"], None), 2),
    ("cli-seed-huge", "convert --seed beyond 64 bits",
     lambda t: (["convert", "--from-profile", "tiny-hybrid", t / "o", "--seed", str(2**70)], None), 2),
    ("cli-seed-negative", "bench --seed -1",
     lambda t: (["bench", "-m", "tiny-hybrid", "--ctx", "32", "--batch", "1", "--seed", "-1", "--phase", "prefill",
                 "--reps", "1", "--warmup", "0"], None), 2),
    ("cli-dst-parent-file", "convert DST whose parent is a file",
     lambda t: ((t / "f").write_text("x"), ["convert", "--from-profile", "tiny-hybrid", t / "f" / "o"], t)[1:], 2),
    ("cli-gguf-parent-file", "convert DST.gguf whose parent is a file",
     lambda t: ((t / "f").write_text("x"), ["convert", "--from-profile", "tiny-hybrid", t / "f" / "o.gguf"], t)[1:],
     2),
    ("cli-model-binary", "a model argument that is a binary file",
     lambda t: ((t / "m.bin").write_bytes(bytes(range(256)) * 4), ["memory-report", "-m", t / "m.bin"], None)[1:], 2),
    ("cli-model-binary-bench", "bench -m a binary file",
     lambda t: ((t / "m.bin").write_bytes(bytes(range(256)) * 4), ["bench", "-m", t / "m.bin"], None)[1:], 2),
    ("cli-bench-ctx-huge", "bench --ctx 999999999999",
     lambda t: (["bench", "-m", "tiny-hybrid", "--ctx", "999999999999", "--batch", "1"], None), 2),
    ("cli-bench-batch-huge", "bench --batch 10^12",
     lambda t: (["bench", "-m", "tiny-hybrid", "--ctx", "32", "--batch", "1000000000000"], None), 2),
    ("cli-memory-ctx-million", "memory-report --ctx 1-1000000+1",
     lambda t: (["memory-report", "-m", "tiny-hybrid", "--ctx", "1-1000000+1", "-f", "json"], None), 2),
    ("cli-memory-ctx-huge", "memory-report --ctx 1e30",
     lambda t: (["memory-report", "-m", "tiny-hybrid", "--ctx", "1e30"], None), 2),
    ("cli-memory-budget-bad", "memory-report --budget lots",
     lambda t: (["memory-report", "-m", "tiny-hybrid", "--budget", "lots"], None), 2),
    ("cli-bench-sweep-bad", "bench --sweep with a wrong-typed field",
     lambda t: ((t / "s.toml").write_text("reps = \"three\"\n"), ["bench", "--sweep", t / "s.toml"], None)[1:], 2),
    ("cli-bench-baseline-binary", "bench --baseline a binary file",
     lambda t: ((t / "b.bin").write_bytes(b"\xff\xfe\x00" * 10),
                ["bench", "-m", "tiny-hybrid", "--ctx", "32", "--batch", "1", "--reps", "1", "--warmup", "0",
                 "--phase", "prefill", "--baseline", t / "b.bin"], None)[1:], 2),
    ("cli-convert-src-is-dst-child", "convert ckpt ckpt/sub (DST inside SRC)",
     lambda t: (ckpt(t), ["convert", t / "ckpt", t / "ckpt" / "sub"], t / "ckpt")[1:], 0),
]


def gguf_file_kv(t: Path) -> str:
    sys.path.insert(0, str(ROOT))
    from granite_cli.checkpoint import gguf as G

    return G.GGUFFile(gguf_file(t, "kv.gguf")).kv["granite.hf_config"]


def run_case(case) -> dict:
    cid, what, setup, want = case
    with tempfile.TemporaryDirectory() as td:
        t = Path(td)
        try:
            argv, watched = setup(t)
        except Exception as e:  # noqa: BLE001 -- the corpus itself failed: say so rather than hide the case
            return {"id": cid, "what": what, "rc": "setup failed", "line": f"{type(e).__name__}: {e}", "want": want}
        before = snapshot(watched) if watched else None
        r = granite(*argv, cwd=t)
        lines = [x for x in r["stderr"].splitlines() if x.strip()]
        err = [x for x in lines if x.startswith("error:")]
        lost = None
        if before is not None:
            after = snapshot(watched) if watched.exists() else {}
            lost = sorted(k for k, v in before.items() if after.get(k) != v)
        return {"id": cid, "what": what, "rc": r["rc"], "want": want, "traceback": "Traceback" in r["stderr"],
                "line": (err[-1] if err else (lines[-1] if lines else "")), "error_lines": len(err),
                "lost": lost, "secs": round(r["secs"], 1)}


def _lost(r: dict) -> str:
    return ", ".join(r["lost"]) if r.get("lost") else ("none" if r.get("lost") is not None else "")


def _msg(line: str) -> str:
    """The message without the run's temporary folder, and table-safe."""
    import re

    return re.sub(r"/tmp/tmp[\w]+/", "", line).replace("|", "\\|")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only", default="")
    ap.add_argument("--compare", type=Path, help="an earlier run's .json: the table shows both, before and after")
    a = ap.parse_args()
    res = []
    for c in CASES:
        if not c[0].startswith(a.only):
            continue
        r = run_case(c)
        res.append(r)
        ok = r["rc"] == r["want"] and not r.get("traceback") and not r.get("lost")
        lost = ("LOST " + ",".join(r["lost"])) if r.get("lost") else ""
        print(f"{'ok ' if ok else 'BAD'} {r['id']:32s} rc={r['rc']} {lost} {r['line'][:150]}", file=sys.stderr)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        old = {r["id"]: r for r in json.loads(a.compare.read_text())} if a.compare else {}
        if old:
            lines = ["| case | input | before: exit | before: files lost | before: message | after: exit | "
                     "after: message |", "|---|---|---|---|---|---|---|"]
        else:
            lines = ["| case | input | exit | files lost | message |", "|---|---|---|---|---|"]
        for r in res:
            cells = [r["id"], r["what"].replace("|", "/")]
            if old:
                b = old.get(r["id"], {"rc": "", "line": "", "lost": None})
                cells += [str(b["rc"]), _lost(b), _msg(b["line"])]
                cells += [str(r["rc"]) + (" (lost: " + _lost(r) + ")" if r.get("lost") else ""), _msg(r["line"])]
            else:
                cells += [str(r["rc"]), _lost(r), _msg(r["line"])]
            lines.append("| " + " | ".join(cells) + " |")
        a.out.write_text("\n".join(lines) + "\n")
        a.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    bad = [r for r in res if r["rc"] != r["want"] or r.get("traceback") or r.get("lost")]
    print(f"{len(res) - len(bad)}/{len(res)} cases as the contract wants", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
