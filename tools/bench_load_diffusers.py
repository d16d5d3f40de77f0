#!/usr/bin/env python3
"""diffusers' side of scripts/bench-load.sh: load the same real-size SD 1.5 or SDXL folder with
`from_pretrained` and start the job `runner run` runs (1 step at 64x64).

    .venv-fixtures/bin/python tools/bench_load_diffusers.py FOLDER fp32|fp16

Prints one JSON line: load_s (from_pretrained), to_first_step_s (from process start, libraries
imported, to the first UNet call), load_touched_s (load_s plus reading every parameter once, as
runner's first step does; the text encoders' pages were already read by the prompt encoding, so
this slightly favours diffusers). It stops at the first UNet call: diffusers' fp16 UNet on a CPU
takes minutes a step, which is not a loading figure. Peak RSS and wall time are measured by the
caller (a lower bound of a whole run's).
"""
import json
import os
import sys
import time

t_import = time.perf_counter()
import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402


def process_age_s():
    """Seconds since the process started (/proc, as runner's `timings.startup_s`)."""
    start_ticks = float(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
    uptime = float(open("/proc/uptime").read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


class FirstStep(Exception):
    pass


torch.set_num_threads(2)
folder, dtype = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
kw = dict(safety_checker=None, requires_safety_checker=False) if os.path.isdir(os.path.join(folder, "feature_extractor")) else {}
pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32 if dtype == "fp32" else torch.float16, **kw)
load_s = time.perf_counter() - t0
first = {}


def hook(module, args):
    first["age"] = process_age_s()
    raise FirstStep


pipe.unet.register_forward_pre_hook(hook)
try:
    pipe("a cat", num_inference_steps=1, height=64, width=64, generator=torch.Generator("cpu").manual_seed(0))
except FirstStep:
    pass
t1 = time.perf_counter()
with torch.no_grad():
    for m in [pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None), pipe.vae]:
        for p in m.parameters() if m is not None else []:
            p.sum()
touch_s = time.perf_counter() - t1
print(json.dumps({"load_s": round(load_s, 2), "to_first_step_s": round(first["age"], 2), "load_touched_s": round(load_s + touch_s, 2)}))
