#!/usr/bin/env python3
"""GPU comparison on a real-size SDXL base pipeline with random weights (scripts/gpu-sdxl.sh).

    python3 tools/gpu_sdxl_compare.py OUT_DIR [STEPS]

Builds the pipeline from tests/data/shapes/sdxl.json (real configs) on the GPU in fp16, saves it
with save_pretrained (tokenizers/scheduler from the tiny fixture), runs diffusers on it (seed 0,
1024x1024, guidance 5.0, Euler) and prints one JSON line: seconds per step, peak VRAM, and the
image as .npy for runner's output to be compared with.
"""
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def random_pipeline(folder, fixture, make_models, shards=None, dtype=torch.float16):
    """`folder` as a copy of the tiny fixture (tokenizers, scheduler) whose models are replaced by
    `make_models()`'s, built with random weights (fp16, or `dtype`) on the GPU from real configs and
    saved with save_pretrained (`shards`: component -> max_shard_size)."""
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(ROOT / "tests/fixtures" / fixture, folder, symlinks=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        models = {name: m.to(dtype) for name, m in make_models().items()}
    # Random init gives exploding activations; scale weights down so images stay finite in fp16.
    with torch.no_grad():
        for m in models.values():
            for p in m.parameters():
                p.mul_(0.5)
    for name, m in models.items():
        shutil.rmtree(folder / name)
        kw = {"max_shard_size": shards[name]} if shards and name in shards else {}
        m.save_pretrained(folder / name, safe_serialization=True, **kw)
    del models
    torch.cuda.empty_cache()
    return folder


def build_folder(folder):
    """The real-size SDXL folder with random fp16 weights (tokenizers/scheduler from the tiny fixture)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    spec = json.loads((ROOT / "tests/data/shapes/sdxl.json").read_text())["components"]
    return random_pipeline(folder, "tiny-sdxl", lambda: {
        "unet": UNet2DConditionModel.from_config(spec["unet"]["config"]),
        "vae": AutoencoderKL.from_config(spec["vae"]["config"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**spec["text_encoder"]["config"])),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder_2"]["config"])),
    })


def measure(pipe, steps, warmup_steps):
    """The SDXL job of the GPU scripts (seed 0, 1024x1024, guidance 5.0) after a short warm-up:
    the image (float HWC in [0, 1]) and the seconds it took; allocator peaks are reset first.
    `measure.reserved_before_reset` keeps the peak reserved from process start to the reset
    (load and warm-up): the figure runner's `run --json` allocator peak is compared with."""
    kw = dict(prompt="a cute dog running on the grass", negative_prompt="", guidance_scale=5.0, num_inference_steps=steps, height=1024, width=1024, output_type="np")
    pipe(**{**kw, "num_inference_steps": warmup_steps}, generator=torch.Generator("cpu").manual_seed(0))
    torch.cuda.synchronize()
    measure.reserved_before_reset = torch.cuda.max_memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    img = pipe(**kw, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    torch.cuda.synchronize()
    return img, time.perf_counter() - t


def main():
    out = Path(sys.argv[1])
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    from diffusers import StableDiffusionXLPipeline
    folder = build_folder(Path("/tmp/sdxl-random"))

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    img, total = measure(pipe, steps, warmup_steps=2)
    np.save(out / "diffusers-sdxl.npy", img)
    print(json.dumps({"impl": "diffusers", "steps": steps, "total_s": round(total, 3), "seconds_per_step_incl_decode": round(total / steps, 4),
                      "peak_vram_allocated": torch.cuda.max_memory_allocated(), "peak_vram_reserved": torch.cuda.max_memory_reserved(), "folder": str(folder)}), flush=True)


if __name__ == "__main__":
    main()
