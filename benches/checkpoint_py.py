"""Python side of benches/checkpoint.sh: safetensors + torch on the same files."""
import json
import resource
import sys
import time

import torch
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)


def report(what, nbytes, secs, **extra):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"impl": "python", "what": what, "bytes": nbytes, "seconds": round(secs, 4),
                      "gbps": round(nbytes / secs / 1e9, 3), "max_rss": rss, **extra}))


mode, path = sys.argv[1], sys.argv[2]
t = time.perf_counter()
def touch(sd):
    # load_file's tensors can be lazily mapped: read one byte per page so that they are ready,
    # as runner's loads are (MAP_POPULATE).
    return sum(int(v.view(-1).view(torch.uint8)[::4096].sum()) for v in sd.values())


if mode in ("load", "load-to-f32"):
    sd = load_file(path)
    if mode == "load-to-f32":
        sd = {k: v.float() for k, v in sd.items()}
    touch(sd)
    report("load-touch" + ("-to-f32" if mode == "load-to-f32" else ""), sum(v.numel() * v.element_size() for v in sd.values()), time.perf_counter() - t)
elif mode == "shard":
    # What diffusers' save_pretrained does: huggingface_hub's split + safetensors save_file.
    from huggingface_hub import split_torch_state_dict_into_shards
    out, size = sys.argv[3], sys.argv[4]
    sd = load_file(path)
    split = split_torch_state_dict_into_shards(sd, max_shard_size=size, filename_pattern="diffusion_pytorch_model{suffix}.safetensors")
    import os
    os.makedirs(out, exist_ok=True)
    for fname, names in split.filename_to_tensors.items():
        save_file({n: sd[n] for n in names}, os.path.join(out, fname), metadata={"format": "pt"})
    report("shard", sum(v.numel() * v.element_size() for v in sd.values()), time.perf_counter() - t, files=len(split.filename_to_tensors))
