"""accelerate's side of benches/plan.sh: `infer_auto_device_map` on the module tree benches/plan_bench.rs
plans (N parameters of 1,000 fp16 bytes named down_blocks.{i/1000}.resnets.{(i/10)%100}.conv{i%10}.weight,
on the meta device), over 3 GPUs of a third, a third and a half of the total, REPS times.
  plan_accelerate.py N REPS     prints one JSON line (min / median / max ms)"""
import json
import logging
import sys
import time

import accelerate
import torch
from accelerate import infer_auto_device_map
from torch import nn

logging.disable(logging.WARNING)  # "Device 2 is not available": there are no GPUs here, only budgets
n, reps = int(sys.argv[1]), int(sys.argv[2])
blocks = {}
with torch.device("meta"):
    for i in range(n):
        conv = nn.Module()
        conv.weight = nn.Parameter(torch.empty(500, dtype=torch.float16))
        setattr(blocks.setdefault((i // 1000, (i // 10) % 100), nn.Module()), f"conv{i % 10}", conv)
model = nn.Module()
model.down_blocks = nn.ModuleList()
for b in sorted({b for b, _ in blocks}):
    block = nn.Module()
    block.resnets = nn.ModuleList([m for (bb, _), m in sorted(blocks.items()) if bb == b])
    model.down_blocks.append(block)
total = n * 1000
ms = []
for _ in range(reps):
    t = time.perf_counter()
    device_map = infer_auto_device_map(model, max_memory={0: total // 3, 1: total // 3, 2: total // 2})
    ms.append((time.perf_counter() - t) * 1e3)
s = sorted(ms)
print(json.dumps({"impl": "accelerate", "version": accelerate.__version__, "modules": n, "reps": reps, "infer_min_ms": round(s[0], 2), "infer_median_ms": round(s[len(s) // 2], 2),
                  "infer_max_ms": round(s[-1], 2), "device_map_entries": len(device_map)}))
