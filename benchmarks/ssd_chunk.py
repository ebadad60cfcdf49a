"""SSD chunked scan alone at the cpu-hybrid shape (H 16, P 64, N 128, G 1, 4096 tokens), by chunk size.

    python benchmarks/ssd_chunk.py 256 128 64 32
"""

import sys
import time

import torch
import torch.nn.functional as F

from granite_cli.ops.ssd import ssd_chunked

torch.set_num_threads(2)
b, t, h, p, g, n = 1, 4096, 16, 64, 1, 128
x = torch.randn(b, t, h, p)
dt = F.softplus(torch.randn(b, t, h) - 2)
A = -torch.exp(torch.randn(h))
B, C, D = torch.randn(b, t, g, n), torch.randn(b, t, g, n), torch.randn(h)
for q in [int(a) for a in sys.argv[1:]] or [256, 128, 64]:
    ssd_chunked(x, dt, A, B, C, q, D)
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        ssd_chunked(x, dt, A, B, C, q, D)
        ts.append(time.perf_counter() - t0)
    flops = t * (h * (2 * q * p + 4 * n * p) + g * 2 * q * n)
    print(f"chunk {q}: {min(ts) * 1e3:.1f} ms ({flops / min(ts) / 1e9:.1f} GFLOP/s nominal)")
