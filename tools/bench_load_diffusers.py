#!/usr/bin/env python3
"""diffusers' side of scripts/bench-load.sh: load the same real-size SD 1.5 folder with
`StableDiffusionPipeline.from_pretrained` and run 1 step at 64x64, as `runner run` does.

    .venv-fixtures/bin/python tools/bench_load_diffusers.py FOLDER fp32|fp16

Prints one JSON line: load_s (from_pretrained), load_touched_s (plus reading every parameter
once, as runner's first step does), total_s. Peak RSS and wall time are measured by the caller.
"""
import json
import sys
import time

import torch
from diffusers import StableDiffusionPipeline

torch.set_num_threads(2)
folder, dtype = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32 if dtype == "fp32" else torch.float16, safety_checker=None, requires_safety_checker=False)
load_s = time.perf_counter() - t0
with torch.no_grad():
    for m in (pipe.unet, pipe.text_encoder, pipe.vae):
        for p in m.parameters():
            p.sum()
load_touched_s = time.perf_counter() - t0
pipe("a cat", num_inference_steps=1, height=64, width=64, generator=torch.Generator("cpu").manual_seed(0))
print(json.dumps({"load_s": round(load_s, 2), "load_touched_s": round(load_touched_s, 2), "total_s": round(time.perf_counter() - t0, 2)}))
