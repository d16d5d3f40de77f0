"""diffusers side of benches/unet_step.sh and benches/casting.sh: one UNet forward per iteration on the
same weights (wall time and the process's CPU time, as benches/unet_bench.rs).
  unet_step_py.py UNET_DIR LATENT_SIZE BATCH ITERS"""
import json
import os
import sys
import time

import torch
from diffusers import UNet2DConditionModel

threads = int(os.environ.get("BENCH_THREADS", "1"))
torch.set_num_threads(threads)
path, size, batch, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
unet = UNet2DConditionModel.from_pretrained(path).eval()
# BENCH_STORAGE=fp8-e4m3|fp8-e5m2|fp16|bf16: layerwise casting over fp32 compute (as benches/*_bench.rs).
storage = os.environ.get("BENCH_STORAGE")
if storage:
    unet.enable_layerwise_casting(storage_dtype={"fp8-e4m3": torch.float8_e4m3fn, "fp8-e5m2": torch.float8_e5m2, "fp16": torch.float16, "bf16": torch.bfloat16}[storage], compute_dtype=torch.float32)
c = unet.config
torch.manual_seed(0)
x = torch.randn(batch, c.in_channels, size, size)
ctx = torch.randn(batch, 77, c.cross_attention_dim)
kw = {}
if c.addition_embed_type == "text_time":
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.tensor([[size * 8.0, size * 8.0, 0, 0, size * 8.0, size * 8.0]] * batch)}
t = torch.tensor([500.0] * batch)
with torch.no_grad():
    unet(x, t, encoder_hidden_states=ctx, **kw)  # warm-up
    wall, cpu = [], []
    for _ in range(iters):
        s, c0 = time.perf_counter(), time.process_time()
        unet(x, t, encoder_hidden_states=ctx, **kw)
        wall.append(time.perf_counter() - s)
        cpu.append(time.process_time() - c0)


def stats(prefix, times):
    s = sorted(times)
    return {f"{prefix}median_s": round(s[len(s) // 2], 4), f"{prefix}min_s": round(s[0], 4), f"{prefix}times_s": [round(v, 4) for v in times]}


print(json.dumps({"impl": "diffusers", **stats("", wall), **stats("cpu_", cpu), "threads": threads}))
