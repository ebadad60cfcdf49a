"""Llama 3.x: RoPE (with Llama-3 frequency scaling), grouped-query attention, a SwiGLU MLP."""

from __future__ import annotations

from granite_cli.arch.base import Arch


class Llama(Arch):
    name = "llama"
    hf_class = "LlamaForCausalLM"


ARCH = Llama()
