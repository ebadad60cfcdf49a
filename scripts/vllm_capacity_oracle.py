"""What vLLM's own code computes for granite's profiles: the oracle tests/test_engines.py checks
memory-report's vLLM model against (tests/data/vllm-0.33-capacity.json).

vLLM is not a dependency of granite; run this in an environment that can import vLLM's Python code
(no GPU is needed: only its configuration and KV-cache planning functions run), e.g.

    pip download vllm==0.33.0 --no-deps && unzip vllm-*.whl 'vllm/*'      # its sources
    python -m venv venv && venv/bin/pip install torch cbor2 msgspec pydantic ...  # what its imports need
    for m in granite-4.0-h-small granite-4.0-h-tiny granite-4.0-h-micro granite-4.0-micro granite-4.0-h-1b; do
        granite profiles export $m cfg/$m; done
    PYTHONPATH=. venv/bin/python scripts/vllm_capacity_oracle.py cfg/*/config.json > oracle.json

For each config.json, TP 1 and 2, max_model_len 4k/32k/128k, prefix caching off and on, with 40 GiB
of KV memory: vLLM's Platform._align_hybrid_block_size sets the attention block size (FLASH_ATTN's
rule: multiples of 16), GraniteMoeHybridForCausalLM gives the Mamba state's shapes and dtypes,
get_kv_cache_groups / get_kv_cache_config_from_groups lay out the blocks, and
get_max_concurrency_for_kv_cache_config gives the concurrency vLLM logs. The configuration objects
are stand-ins holding only the fields those functions read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from types import SimpleNamespace as NS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--available", type=int, default=40 * 2**30, help="KV cache memory in bytes")
    a = ap.parse_args()
    argv, sys.argv = sys.argv, sys.argv[:1]  # vLLM parses sys.argv at import in places
    import torch
    import vllm.config.vllm as vllm_config_mod
    import vllm.model_executor.layers.mamba.abstract as mamba_abstract
    import vllm.platforms.interface as platform
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.granitemoehybrid import GraniteMoeHybridForCausalLM as Model
    from vllm.v1.attention.backend import MultipleOf
    from vllm.v1.core import kv_cache_planning as planning
    from vllm.v1.core import kv_cache_utils as utils
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec
    from vllm.v1.kv_cache_layout import KVCacheLayout
    sys.argv = argv

    class FlashAttn:  # the FLASH_ATTN backend's block rule: any multiple of 16
        @staticmethod
        def get_supported_kernel_block_sizes():
            return [MultipleOf(16)]

        @staticmethod
        def customize_spec(spec):
            return spec

        @staticmethod
        def get_name():
            return "FLASH_ATTN"

    # stand-ins for what needs a running engine: no current config, no model instance, one backend
    vllm_config_mod.set_current_vllm_config = lambda c: contextlib.nullcontext()
    platform.set_current_vllm_config = vllm_config_mod.set_current_vllm_config
    mamba_abstract.get_mamba_prefill_checkpoint_alignment = lambda c: 1  # what MambaMixer2 declares
    ModelRegistry.resolve_model_cls = lambda arch, model_config=None: (Model, arch)
    platform.Platform._find_non_ssm_backends = classmethod(lambda cls, c: [FlashAttn])

    def config(hf: dict, tp: int, tokens: int, prefix: bool):
        h = NS(**hf)
        kv_heads = max(1, h.num_key_value_heads // tp)
        head = getattr(h, "head_dim", None) or h.hidden_size // h.num_attention_heads
        cache = NS(cache_dtype="auto", mamba_cache_mode="align" if prefix else "none", block_size=16,
                   user_specified_block_size=False, mamba_block_size=None, mamba_page_size_padded=None,
                   mamba_cache_dtype="auto", mamba_ssm_cache_dtype="auto", kv_cache_dtype_skip_layers=None,
                   num_gpu_blocks_override=None, prefix_cache_retention_interval=None,
                   get_resolved_kv_cache_layout=lambda: KVCacheLayout.LBNHC, enable_prefix_caching=prefix)
        model = NS(dtype=torch.bfloat16, use_mla=False, architecture="GraniteMoeHybridForCausalLM", hf_config=h,
                   get_num_kv_heads=lambda p: kv_heads, get_head_size=lambda: head, max_model_len=tokens,
                   is_hybrid=any(t == "mamba" for t in h.layer_types), model_impl="auto")
        return NS(cache_config=cache, model_config=model, num_speculative_tokens=0, speculative_config=None,
                  parallel_config=NS(tensor_parallel_size=tp, decode_context_parallel_size=1,
                                     prefill_context_parallel_size=1),
                  scheduler_config=NS(disable_hybrid_kv_cache_manager=False, max_num_batched_tokens=8192),
                  attention_config=NS(hisparse_config=None), device_config=NS(device_type="cuda"))

    def run(hf: dict, tp: int, tokens: int, prefix: bool) -> dict:
        c = config(hf, tp, tokens, prefix)
        if c.model_config.is_hybrid:
            platform.Platform._align_hybrid_block_size(c, FlashAttn)
        block = c.cache_config.block_size
        specs = {}
        for i, t in enumerate(hf["layer_types"]):
            if t == "mamba":
                specs[f"layers.{i}"] = MambaSpec(
                    shapes=Model.get_mamba_state_shape_from_config(c),
                    dtypes=Model.get_mamba_state_dtype_from_config(c), block_size=block,
                    page_size_padded=c.cache_config.mamba_page_size_padded,
                    mamba_cache_mode=c.cache_config.mamba_cache_mode, num_prefill_checkpoint_blocks=int(prefix))
            else:
                specs[f"layers.{i}"] = FullAttentionSpec(block_size=block, num_kv_heads=c.model_config.get_num_kv_heads(
                    None), head_size=c.model_config.get_head_size(), dtype=torch.bfloat16)
        groups = planning.get_kv_cache_groups(c, specs)
        kv = planning.get_kv_cache_config_from_groups(c, groups, a.available)
        conc = utils.get_max_concurrency_for_kv_cache_config(c, kv)
        page = groups[0].kv_cache_spec.page_size_bytes
        per = sum(-(-g.kv_cache_spec.max_memory_usage_bytes(c) // g.kv_cache_spec.page_size_bytes) for g in groups)
        size = max(len(g.layer_names) for g in groups)
        return {"block": block, "page": page, "groups": len(groups), "group_size": size, "num_blocks": kv.num_blocks,
                "blocks_per_request": per, "per_request_bytes": per * page * size, "max_concurrency": conc,
                "kv_cache_tokens": int(conc * tokens)}

    out = []
    for path in a.configs:
        with open(path) as f:
            hf = json.load(f)
        for tp in (1, 2):
            for tokens in (4096, 32768, 131072):
                for prefix in (False, True):
                    out.append({"config": path, "tp": tp, "L": tokens, "prefix": prefix, **run(hf, tp, tokens, prefix)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
