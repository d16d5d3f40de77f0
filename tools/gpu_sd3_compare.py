#!/usr/bin/env python3
"""GPU comparison on a real-size SD3-medium pipeline with random weights (scripts/gpu-sd3.sh).

    python3 tools/gpu_sd3_compare.py build FOLDER
    python3 tools/gpu_sd3_compare.py run FOLDER OUT STEPS [MODE]

`build` makes the folder from tests/data/shapes/sd3-medium.json (the real configs) on the GPU in
fp16 and saves it with save_pretrained: the T5 in shards with an index, as the repo ships it;
tokenizers and scheduler from the tiny fixture (the tiny T5 vocabulary's ids are valid rows of
T5-XXL's embedding). `run` times diffusers' StableDiffusion3Pipeline on it (seed 0, 1024x1024,
guidance 7.0, max_sequence_length 256) after a 1-step warm-up, MODE `none` (`.to("cuda")`) or
`t5-group` (T5 under `enable_group_offload`, block level, side stream; the rest on the GPU), and
prints one JSON line: seconds per step, allocator peaks (also since process start, the figure
runner's `run --json` allocator peak is compared with); the image goes to OUT/diffusers-MODE.npy.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))


def build_folder(folder):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    from gpu_sdxl_compare import random_pipeline
    spec = json.loads((ROOT / "tests/data/shapes/sd3-medium.json").read_text())["components"]
    return random_pipeline(folder, "tiny-sd3", lambda: {
        "transformer": SD3Transformer2DModel.from_config(spec["transformer"]["config"]),
        "vae": AutoencoderKL.from_config(spec["vae"]["config"]),
        "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder"]["config"])),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder_2"]["config"])),
        "text_encoder_3": T5EncoderModel(T5Config(**spec["text_encoder_3"]["config"])),
    }, shards={"text_encoder_3": "5GB"})


def main():
    if sys.argv[1] == "build":
        build_folder(Path(sys.argv[2]))
        return
    folder, out, steps = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    mode = sys.argv[5] if len(sys.argv) > 5 else "none"
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, torch_dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    cuda = torch.device("cuda")
    if mode == "none":
        pipe.to(cuda)
    elif mode == "t5-group":
        for name in ("text_encoder", "text_encoder_2", "transformer", "vae"):
            getattr(pipe, name).to(cuda)
        pipe.text_encoder_3.enable_group_offload(onload_device=cuda, offload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1, use_stream=True)
    else:
        raise SystemExit(f"unknown mode {mode}")
    kw = dict(prompt="a cute dog running on the grass", negative_prompt="", guidance_scale=7.0, height=1024, width=1024, max_sequence_length=256, output_type="np")
    pipe(**kw, num_inference_steps=1, generator=torch.Generator("cpu").manual_seed(0))
    torch.cuda.synchronize()
    before = torch.cuda.max_memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    img = pipe(**kw, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    torch.cuda.synchronize()
    total = time.perf_counter() - t
    np.save(out / f"diffusers-{mode}.npy", img)
    print(json.dumps({"impl": "diffusers", "mode": mode, "steps": steps, "total_s": round(total, 3), "seconds_per_step_incl_encode_decode": round(total / steps, 4),
                      "peak_vram_allocated": torch.cuda.max_memory_allocated(), "peak_vram_reserved": torch.cuda.max_memory_reserved(),
                      "peak_vram_reserved_process": max(before, torch.cuda.max_memory_reserved())}), flush=True)


if __name__ == "__main__":
    main()
