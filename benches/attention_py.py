"""The CPU attention kernel both sides run (torch's scaled_dot_product_attention, fp32, one thread) at
the tiny fixtures' shapes, [batch, heads, tokens, head_dim]: the tiny SD3 transformer ([2, 2, 349, 16]:
CFG batch, 16 image + 333 text tokens) and the tiny FLUX one ([1, 2, 528, 16]: 16 image + 512 text
tokens). ms per call, median (min - max) of REPS calls after a warm-up.
  .venv-fixtures/bin/python benches/attention_py.py [REPS]     (REPS default 200)"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
for label, shape in (("tiny SD3", (2, 2, 349, 16)), ("tiny FLUX", (1, 2, 528, 16))):
    q, k, v = (torch.randn(shape) for _ in range(3))
    F.scaled_dot_product_attention(q, k, v)
    ms = []
    for _ in range(reps):
        s = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v)
        ms.append((time.perf_counter() - s) * 1e3)
    print(f"{label} {list(shape)}: {statistics.median(ms):.3f} ms per call ({min(ms):.3f} - {max(ms):.3f}), torch {torch.__version__}, 1 thread")
