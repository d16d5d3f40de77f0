"""diffusers side of benches/sd3_pipeline.sh and benches/flux_pipeline.sh: a flow-matching pipeline
(StableDiffusion3Pipeline or FluxPipeline) on a folder, 64x64, 28 steps, GUIDANCE, seed 0, fp32. One
warm-up call (its end, counted from the process's start, is the whole-process figure, comparable with a
`runner run` process), then ITERS timed calls in-process. BREAKDOWN=1 also times the timed calls'
parts (the transformer's calls, encode_prompt, vae.decode, scheduler.step) and reports their mean
per call as breakdown_s.
  pipeline_py.py CLASS GUIDANCE FOLDER ITERS MAX_SEQUENCE_LENGTH OUT_PNG"""
import json
import os
import sys
import time

import torch
import diffusers


def process_age_s():
    """Seconds since the process started (/proc, as runner's `timings.startup_s`)."""
    start_ticks = float(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
    uptime = float(open("/proc/uptime").read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


threads = int(os.environ.get("BENCH_THREADS", "1"))
torch.set_num_threads(threads)
cls, guidance = getattr(diffusers, sys.argv[1]), float(sys.argv[2])
folder, iters, msl, out = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
s = time.perf_counter()
pipe = cls.from_pretrained(folder)  # fp32, as stored
pipe.set_progress_bar_config(disable=True)
load_s = time.perf_counter() - s


def call():
    g = torch.Generator("cpu").manual_seed(0)
    return pipe("a photo of a cat", num_inference_steps=28, guidance_scale=guidance, height=64, width=64, max_sequence_length=msl, generator=g).images[0]


s = time.perf_counter()
call().save(out)
first_s = time.perf_counter() - s
whole_s, whole_cpu_s = process_age_s(), time.process_time()
spent = {}
if os.environ.get("BREAKDOWN"):
    def timing(name, fn):
        def timed(*a, **k):
            s = time.perf_counter()
            r = fn(*a, **k)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - s
            return r
        return timed
    pipe.transformer.forward = timing("transformer calls", pipe.transformer.forward)
    pipe.encode_prompt = timing("prompt encoding", pipe.encode_prompt)
    pipe.vae.decode = timing("vae decode", pipe.vae.decode)
    pipe.scheduler.step = timing("scheduler steps", pipe.scheduler.step)
times = []
for _ in range(iters):
    s = time.perf_counter()
    call()
    times.append(time.perf_counter() - s)
order = [round(v, 4) for v in times]
times.sort()
print(json.dumps({"impl": "diffusers", "load_s": round(load_s, 4), "first_call_s": round(first_s, 4), "process_to_image_s": round(whole_s, 4), "process_to_image_cpu_s": round(whole_cpu_s, 4),
                  "median_s": round(times[len(times) // 2], 4), "min_s": round(times[0], 4), "times_s": order, "threads": threads,
                  **({"breakdown_s": {k: round(v / iters, 4) for k, v in spent.items()}} if spent else {})}))
