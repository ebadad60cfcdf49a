"""Checkpoints: the only code that reads or writes weights.

- names: the declarative table from checkpoint tensor names to the core's parameters (and shapes).
- safetensors, gguf: the two containers, read lazily and written streaming.
- gguf_map: Hugging Face tensors and config <-> llama.cpp's GGUF tensors and metadata (Granite 4.0).
- quant: compressed-tensors fp8/int8 layouts and GGUF Q8_0.
- sources: a checkpoint as a stream of tensors in the Hugging Face layout, whatever holds it (a
  folder, a GGUF file, random weights at a profile's shapes), with one inventory check.
- dtypes: the one table of dtype names.
It imports config (and arch) and nothing above it.
"""
