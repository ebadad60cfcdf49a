"""Coverage-guided fuzzing of the three checkpoint parsers with atheris (libFuzzer for Python).

    pip install atheris
    python scripts/fuzz_atheris.py TARGET --seconds 600 --work DIR   # TARGET: safetensors | gguf | config

Each input is a whole file: a safetensors file (opened, then every tensor read), a GGUF file
(opened as a conversion source: metadata, config, inventory, then every tensor), or a config.json
(parsed and built on the meta device). The contract is that bad input raises InputError (exit 2);
any other exception is a finding, saved by libFuzzer as crash-* in DIR. The seed corpus is the
files `granite convert` writes for the tiny profiles. Not part of CI: its results are in
reports/reliability/.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def seeds(corpus: Path, target: str) -> None:
    """Valid files of the target's format, written once into the corpus folder (in a child process:
    the parsers must first be imported under instrumentation, in this one)."""
    if os.fork():
        _, status = os.wait()
        assert status == 0, "writing the seed corpus failed"
        return
    from granite_cli.config import from_profile_dict
    from granite_cli.convert.run import convert
    from granite_cli.model.loading import load_model, save_checkpoint

    # models of a few kB, so that whole files fit libFuzzer's input size and mutate quickly
    micro = dict(architecture="granitemoehybrid", vocab_size=32, hidden_size=16, num_hidden_layers=3,
                 attention_layers=[1], num_attention_heads=2, num_key_value_heads=1, intermediate_size=8,
                 shared_intermediate_size=8, num_local_experts=2, num_experts_per_tok=1, mamba_n_heads=2,
                 mamba_d_head=16, mamba_n_groups=1, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2,
                 mamba_chunk_size=8, torch_dtype="float32")
    dense = dict(micro, attention_layers="all", num_local_experts=0, num_experts_per_tok=0)
    with tempfile.TemporaryDirectory() as td:
        t = Path(td)
        for name, d in (("micro-hybrid", micro), ("micro-dense", dense)):
            save_checkpoint(load_model(from_profile_dict(dict(d), name, "seed")), t / name)
            if target == "gguf":
                convert(t / name, t / f"{name}.gguf", verify=False)
                (corpus / f"seed-{name}.gguf").write_bytes((t / f"{name}.gguf").read_bytes())
            else:
                f = "model.safetensors" if target == "safetensors" else "config.json"
                (corpus / f"seed-{name}-{f}").write_bytes((t / name / f).read_bytes())
    os._exit(0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("target", choices=["safetensors", "gguf", "config"])
    ap.add_argument("--seconds", type=int, default=600)
    ap.add_argument("--work", type=Path, required=True)
    a, rest = ap.parse_known_args()
    corpus = a.work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        seeds(corpus, a.target)

    import atheris

    with atheris.instrument_imports(include=["granite_cli"]):
        import granite_cli.checkpoint.gguf
        import granite_cli.checkpoint.gguf_map  # noqa: F401
        import granite_cli.checkpoint.safetensors as sio
        import granite_cli.checkpoint.sources as sources
        import granite_cli.config as config
    import torch

    from granite_cli.errors import InputError
    from granite_cli.model.loading import build_empty

    scratch = Path(tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    f = scratch / ("x.gguf" if a.target == "gguf" else "x.safetensors" if a.target == "safetensors" else "config.json")

    def one(data: bytes) -> None:
        f.write_bytes(data)
        try:
            if a.target == "safetensors":
                st = sio.SafetensorsFile(f)
                for n in st.keys():
                    st.read(n)
            elif a.target == "gguf":
                src = sources.GGUFSource(f)
                for n in src.names:
                    src.get(n)
            else:
                cfg = config.from_hf_dict(config.read_json_config(f), "fuzz", str(f))
                build_empty(cfg, torch.float32, "meta")
        except InputError:
            pass

    atheris.Setup([sys.argv[0], str(corpus), f"-max_total_time={a.seconds}", f"-artifact_prefix={a.work}/",
                   "-print_final_stats=1", "-rss_limit_mb=4096", "-max_len=65536", *rest], one)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
