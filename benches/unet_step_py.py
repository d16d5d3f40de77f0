"""diffusers side of benches/unet_step.sh: one UNet forward per iteration on the same weights."""
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
    unet(x, t, encoder_hidden_states=ctx, **kw)
    times = []
    for _ in range(iters):
        s = time.perf_counter()
        unet(x, t, encoder_hidden_states=ctx, **kw)
        times.append(time.perf_counter() - s)
times.sort()
print(json.dumps({"impl": "diffusers", "median_s": round(times[len(times) // 2], 4), "min_s": round(times[0], 4), "threads": threads}))
