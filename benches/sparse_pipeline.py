"""A real-size SD 1.5 or SDXL pipeline folder of sparse safetensors files (real headers from
tests/data/shapes/PIPE.json, data left as holes: zeros the kernel hands out without disk reads),
tokenizers, scheduler and feature extractor copied from the tiny fixture; the benches' stand-in for a
downloaded model (scripts/bench-load.sh, benches/inspect_lock.sh, benches/plan.sh).
  sparse_pipeline.py PIPE ROOT [DTYPE [VARIANT]]    PIPE sd15|sdxl; DTYPE F32 (default), F16, BF16;
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
fixture = os.path.join(here, "tests/fixtures", {"sd15": "tiny-sd15", "sdxl": "tiny-sdxl"}[pipe])
r = os.path.join(root, pipe)
os.makedirs(r)
json.dump(spec["model_index"], open(os.path.join(r, "model_index.json"), "w"))
for comp, c in spec["components"].items():
    d = os.path.join(r, comp)
    os.makedirs(d)
    json.dump(c["config"], open(os.path.join(d, "config.json"), "w"))
    hdr, off = {}, 0
    for name, dt, shape in c["tensors"]:
        n = 1
        for s in shape:
            n *= s
        t = ("I64", 8) if dt == "I64" else (dtype, size)
        hdr[name] = {"dtype": t[0], "shape": shape, "data_offsets": [off, off + n * t[1]]}
        off += n * t[1]
    h = json.dumps(hdr).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    stem = "diffusion_pytorch_model" if c["library"] == "diffusers" else "model"
    with open(os.path.join(d, stem + (f".{variant}" if variant else "") + ".safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        f.truncate(8 + len(h) + off)
for sub in ["tokenizer", "tokenizer_2", "feature_extractor", "scheduler"]:
    if os.path.isdir(os.path.join(fixture, sub)):
        shutil.copytree(os.path.join(fixture, sub), os.path.join(r, sub))
print(r)
