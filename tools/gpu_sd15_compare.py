#!/usr/bin/env python3
"""GPU comparison on a real-size SD 1.5 pipeline with random weights (run by scripts/gpu-sd15.sh).

    python3 tools/gpu_sd15_compare.py OUT_DIR [STEPS]

Builds the pipeline from tests/data/shapes/sd15.json (real configs) on the GPU in fp16, saves it
with save_pretrained (tokenizer/scheduler/feature extractor from the tiny fixture), runs diffusers
on it (seed 0, 512x512, guidance 7.5, PNDM) and prints one JSON line: seconds per step, peak VRAM,
and the image as .npy for runner's output to be compared with.
"""
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def main():
    out = Path(sys.argv[1])
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    spec = json.loads((ROOT / "tests/data/shapes/sd15.json").read_text())["components"]
    folder = Path("/tmp/sd15-random")
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(ROOT / "tests/fixtures/tiny-sd15", folder, symlinks=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel.from_config(spec["unet"]["config"]).half()
        vae = AutoencoderKL.from_config(spec["vae"]["config"]).half()
        te = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"]["config"])).half()
    # Random init gives exploding activations; scale weights down so images stay finite in fp16.
    with torch.no_grad():
        for m in (unet, vae, te):
            for p in m.parameters():
                p.mul_(0.5)
    for name, m in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        shutil.rmtree(folder / name)
        m.save_pretrained(folder / name, safe_serialization=True)
    for f in ("safety_checker",):
        shutil.rmtree(folder / f, ignore_errors=True)
    mi = json.loads((folder / "model_index.json").read_text())
    mi["safety_checker"] = [None, None]
    mi["requires_safety_checker"] = False
    (folder / "model_index.json").write_text(json.dumps(mi))
    del unet, vae, te
    torch.cuda.empty_cache()

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16, safety_checker=None).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a photo of a cat", negative_prompt="", guidance_scale=7.5, num_inference_steps=steps, height=512, width=512, output_type="np")
    pipe(**{**kw, "num_inference_steps": 2}, generator=torch.Generator("cpu").manual_seed(0))  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    img = pipe(**kw, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    torch.cuda.synchronize()
    total = time.perf_counter() - t
    np.save(out / "diffusers-sd15.npy", img)
    print(json.dumps({"impl": "diffusers", "steps": steps, "total_s": round(total, 3), "seconds_per_step": round(total / (steps + 1), 4),
                      "peak_vram": torch.cuda.max_memory_allocated(), "folder": str(folder)}), flush=True)


if __name__ == "__main__":
    main()
