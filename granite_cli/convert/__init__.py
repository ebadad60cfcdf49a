"""Checkpoint conversion: safetensors and GGUF, dtypes and quantization, streamed and verified."""
