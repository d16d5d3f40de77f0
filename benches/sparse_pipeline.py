"""A real-size pipeline folder of sparse safetensors files (real headers from
tests/data/shapes/PIPE.json, data left as holes: zeros the kernel hands out without disk reads;
sharded components in the repository's own shards), tokenizers, scheduler and feature extractor
copied from the tiny fixture (the scheduler config from the shapes file where it has one); the
benches' stand-in for a downloaded model (scripts/bench-load.sh, benches/inspect_lock.sh,
benches/plan.sh, benches/front.sh).
  sparse_pipeline.py PIPE ROOT [DTYPE [VARIANT]]    PIPE sd15|sdxl|sd3-medium|sd35-large|flux-dev;
                                                     DTYPE F32 (default), F16, BF16;
                                                     VARIANT names the files model.VARIANT.safetensors
Writes ROOT/PIPE and prints its path."""
import json
import os
import shutil
import struct
import sys

pipe, root = sys.argv[1], sys.argv[2]
dtype = sys.argv[3] if len(sys.argv) > 3 else "F32"
variant = sys.argv[4] if len(sys.argv) > 4 else None
size = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
spec = json.load(open(os.path.join(here, f"tests/data/shapes/{pipe}.json")))
fixture = os.path.join(here, "tests/fixtures", {"sd15": "tiny-sd15", "sdxl": "tiny-sdxl", "sd3-medium": "tiny-sd3", "sd35-large": "tiny-sd35", "flux-dev": "tiny-flux-dev"}[pipe])
r = os.path.join(root, pipe)
os.makedirs(r)
json.dump(spec["model_index"], open(os.path.join(r, "model_index.json"), "w"))
for comp, c in spec["components"].items():
    d = os.path.join(r, comp)
    os.makedirs(d)
    json.dump(c["config"], open(os.path.join(d, "config.json"), "w"))
    stem = "diffusion_pytorch_model" if c["library"] == "diffusers" else "model"
    ext = (f".{variant}" if variant else "") + ".safetensors"
    weight_map = (c.get("shards") or {}).get("weight_map")
    files = {}  # file name -> (header, data size)
    for name, dt, shape in c["tensors"]:
        n = 1
        for s in shape:
            n *= s
        t = ("I64", 8) if dt == "I64" else (dtype, size)
        file = weight_map[name].replace(f"{stem}-", f"{stem}.{variant}-", 1) if weight_map and variant else weight_map[name] if weight_map else stem + ext
        hdr, off = files.setdefault(file, ({}, [0]))
        hdr[name] = {"dtype": t[0], "shape": shape, "data_offsets": [off[0], off[0] + n * t[1]]}
        off[0] += n * t[1]
    if weight_map:
        index = {"metadata": {"total_size": sum(o[0] for _, o in files.values())}, "weight_map": {n: f for f, (h, _) in files.items() for n in h}}
        json.dump(index, open(os.path.join(d, f"{stem}.safetensors.index" + (f".{variant}" if variant else "") + ".json"), "w"))
    for file, (hdr, off) in files.items():
        h = json.dumps(hdr).encode()
        h += b" " * ((8 - len(h) % 8) % 8)
        with open(os.path.join(d, file), "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h)
            f.truncate(8 + len(h) + off[0])
for sub in ["tokenizer", "tokenizer_2", "tokenizer_3", "feature_extractor", "scheduler"]:
    if sub in spec["model_index"] and os.path.isdir(os.path.join(fixture, sub)):
        shutil.copytree(os.path.join(fixture, sub), os.path.join(r, sub))
if "scheduler" in spec:
    json.dump(spec["scheduler"], open(os.path.join(r, "scheduler", "scheduler_config.json"), "w"))
print(r)
