"""diffusers side of benches/sd3_step.sh and benches/casting.sh: one SD3Transformer2DModel forward per iteration on the same weights
(wall time and the process's CPU time, as benches/sd3_bench.rs).
  sd3_step_py.py TRANSFORMER_DIR LATENT_SIZE BATCH TEXT_TOKENS ITERS"""
import json
import os
import sys
import time

import torch
from diffusers import SD3Transformer2DModel

threads = int(os.environ.get("BENCH_THREADS", "1"))
torch.set_num_threads(threads)
path, size, batch, tokens, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model = SD3Transformer2DModel.from_pretrained(path).eval()
# BENCH_STORAGE=fp8-e4m3|fp8-e5m2|fp16|bf16: layerwise casting over fp32 compute (as benches/*_bench.rs).
storage = os.environ.get("BENCH_STORAGE")
if storage:
    model.enable_layerwise_casting(storage_dtype={"fp8-e4m3": torch.float8_e4m3fn, "fp8-e5m2": torch.float8_e5m2, "fp16": torch.float16, "bf16": torch.bfloat16}[storage], compute_dtype=torch.float32)
c = model.config
torch.manual_seed(0)
x = torch.randn(batch, c.in_channels, size, size)
t = torch.full((batch,), 500.0)
ctx = torch.randn(batch, tokens, c.joint_attention_dim)
pooled = torch.randn(batch, c.pooled_projection_dim)
with torch.no_grad():
    model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled, return_dict=False)  # warm-up
    wall, cpu = [], []
    for _ in range(iters):
        s, c = time.perf_counter(), time.process_time()
        model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled, return_dict=False)
        wall.append(time.perf_counter() - s)
        cpu.append(time.process_time() - c)


def stats(prefix, times):
    s = sorted(times)
    return {f"{prefix}median_s": round(s[len(s) // 2], 4), f"{prefix}min_s": round(s[0], 4), f"{prefix}times_s": [round(v, 4) for v in times]}


print(json.dumps({"impl": "diffusers", **stats("", wall), **stats("cpu_", cpu), "threads": threads}))
