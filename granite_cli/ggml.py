"""The GGUF container's and ggml's constants, named once (no torch): the file's magic and version,
its metadata value types, and every ggml tensor type's block layout. checkpoint.gguf reads and
writes files with them; memory-report sizes GGUF weights and llama.cpp's caches with them.
"""

from __future__ import annotations

MAGIC = b"GGUF"
VERSION = 3                 # what granite writes; it reads 2 and 3
READ_VERSIONS = (2, 3)
ALIGN = 32                  # general.alignment when a file does not say

# Metadata value types.
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
INTEGER_TYPES = (U8, I8, U16, I16, U32, I32, U64, I64)
NUMBER_TYPES = (*INTEGER_TYPES, F32, F64)

# ggml tensor types by id: (name, elements per block, bytes per block).
GGML_F32, GGML_F16, GGML_Q8_0, GGML_BF16 = 0, 1, 8, 30
GGML_LAYOUT = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
BY_NAME = {name.lower(): (blk, size) for name, blk, size in GGML_LAYOUT.values()}
# Q8_0: blocks of 32 values along the innermost dimension, an f16 scale then 32 int8.
Q8_0_BLOCK, Q8_0_BLOCK_BYTES = GGML_LAYOUT[GGML_Q8_0][1:]


def bytes_per_value(name: str) -> float:
    """A type's average bytes per value, its block scales included (q8_0: 34/32)."""
    blk, size = BY_NAME[name.lower()]
    return size / blk
