"""diffusers side of benches/flux_step.sh: one FluxTransformer2DModel forward per iteration on the same
weights and input shapes (wall time and the process's CPU time, as benches/flux_bench.rs).
  flux_step_py.py TRANSFORMER_DIR LATENT_SIZE TEXT_TOKENS ITERS [FILE.gguf]
With a .gguf file: `from_single_file(FILE, quantization_config=GGUFQuantizationConfig(compute_dtype=float32),
config=TRANSFORMER_DIR)`, diffusers' GGUFLinear (benches/gguf_step.sh)."""
import json
import os
import sys
import time

import torch
from diffusers import FluxTransformer2DModel

threads = int(os.environ.get("BENCH_THREADS", "1"))
torch.set_num_threads(threads)
path, size, tokens, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if len(sys.argv) > 5:
    from diffusers import GGUFQuantizationConfig

    model = FluxTransformer2DModel.from_single_file(sys.argv[5], quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), config=path,
                                                    torch_dtype=torch.float32, local_files_only=True).eval()
    assert any(type(m).__name__ == "GGUFLinear" for m in model.modules())
else:
    model = FluxTransformer2DModel.from_pretrained(path).eval()
c = model.config
torch.manual_seed(0)
side = size // 2
x = torch.randn(1, side * side, c.in_channels)
t = torch.full((1,), 0.5)
guidance = torch.full((1,), 3.5) if c.guidance_embeds else None
ctx = torch.randn(1, tokens, c.joint_attention_dim)
pooled = torch.randn(1, c.pooled_projection_dim)
txt_ids = torch.zeros(tokens, 3)
img_ids = torch.zeros(side, side, 3)
img_ids[..., 1] += torch.arange(side)[:, None]
img_ids[..., 2] += torch.arange(side)[None, :]
img_ids = img_ids.reshape(-1, 3)
kw = dict(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t, guidance=guidance, txt_ids=txt_ids,
          img_ids=img_ids, return_dict=False)
with torch.no_grad():
    model(**kw)  # warm-up
    wall, cpu = [], []
    for _ in range(iters):
        s, c0 = time.perf_counter(), time.process_time()
        model(**kw)
        wall.append(time.perf_counter() - s)
        cpu.append(time.process_time() - c0)


def stats(prefix, times):
    s = sorted(times)
    return {f"{prefix}median_s": round(s[len(s) // 2], 4), f"{prefix}min_s": round(s[0], 4), f"{prefix}times_s": [round(v, 4) for v in times]}


print(json.dumps({"impl": "diffusers", **stats("", wall), **stats("cpu_", cpu), "threads": threads}))
