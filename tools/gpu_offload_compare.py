#!/usr/bin/env python3
"""diffusers' offload modes on the real-size random SDXL folder (scripts/gpu-check.sh).

    python3 tools/gpu_offload_compare.py build FOLDER
    python3 tools/gpu_offload_compare.py run MODE FOLDER OUT STEPS

MODE is none (`.to("cuda")`), model (`enable_model_cpu_offload`), sequential
(`enable_sequential_cpu_offload`) or group (`enable_group_offload`, block level, one block per
group, side stream: diffusers' prefetching form). One mode per process, so hooks and allocator
peaks do not carry over. Prints one JSON line (time, allocator peaks) and saves the image as
OUT/diffusers-MODE.npy for runner's to be compared with.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main():
    from gpu_sdxl_compare import build_folder, measure
    if sys.argv[1] == "build":
        build_folder(Path(sys.argv[2]))
        return
    mode, folder, out, steps = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5])
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    cuda = torch.device("cuda")
    if mode == "none":
        pipe.to(cuda)
    elif mode == "model":
        pipe.enable_model_cpu_offload()
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload()
    elif mode == "group":
        pipe.enable_group_offload(onload_device=cuda, offload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1, use_stream=True)
    else:
        raise SystemExit(f"unknown mode {mode}")
    img, total = measure(pipe, steps, warmup_steps=1)
    np.save(out / f"diffusers-{mode}.npy", img)
    print(json.dumps({"impl": "diffusers", "mode": mode, "steps": steps, "total_s": round(total, 3),
                      "peak_vram_allocated": torch.cuda.max_memory_allocated(), "peak_vram_reserved": torch.cuda.max_memory_reserved(),
                      # since the process started (load, warm-up, run): runner's allocator peak is this
                      "peak_vram_reserved_process": max(measure.reserved_before_reset, torch.cuda.max_memory_reserved())}), flush=True)


if __name__ == "__main__":
    main()
