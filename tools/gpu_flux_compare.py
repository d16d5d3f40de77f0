#!/usr/bin/env python3
"""GPU comparison on a real-size FLUX.1-dev pipeline with random weights (scripts/gpu-flux.sh).

    python3 tools/gpu_flux_compare.py build FOLDER
    python3 tools/gpu_flux_compare.py run FOLDER OUT STEPS MODE

`build` makes the folder from tests/data/shapes/flux-dev.json (the real configs) on the GPU in bf16
and saves it with save_pretrained: the transformer in shards (10 GB, as the repo's 3) and T5 in 2,
each with an index; tokenizers and scheduler from tiny-flux-dev (the tiny T5 vocabulary's ids are
valid rows of T5-XXL's embedding, the tiny CLIP's of CLIP-L's). `run` times diffusers' FluxPipeline
on it (seed 0, 1024x1024, guidance 3.5, max_sequence_length 512) after a 1-step warm-up, MODE:
  none        pipe.to("cuda")
  model       enable_model_cpu_offload()
  group       the transformer under enable_group_offload (block_level, 1 block per group, side
              stream), T5 under the same; CLIP and the VAE on the GPU
  sequential  enable_sequential_cpu_offload()
  group-fp8   `group` with the transformer's weights stored in float8_e4m3fn between layer calls
              (enable_layerwise_casting(storage_dtype=float8_e4m3fn, compute_dtype=bfloat16), issue 16)
  gguf-TYPE   the transformer from FOLDER/transformer-TYPE.gguf (`runner quantize`, original names:
              city96's layout) by from_single_file(quantization_config=GGUFQuantizationConfig(
              compute_dtype=bfloat16), config=FOLDER), GGUFLinear layers; everything on the GPU (issue 26)
and prints one JSON line: seconds per step (the whole call / steps, and the transformer's own time
from a forward pre/post hook pair), allocator peaks (also since process start, the figure runner's
`run --json` allocator peak is compared with); the image goes to OUT/diffusers-MODE.npy.
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
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    from gpu_sdxl_compare import random_pipeline
    spec = json.loads((ROOT / "tests/data/shapes/flux-dev.json").read_text())["components"]
    return random_pipeline(folder, "tiny-flux-dev", lambda: {
        "transformer": FluxTransformer2DModel.from_config(spec["transformer"]["config"]),
        "vae": AutoencoderKL.from_config(spec["vae"]["config"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**spec["text_encoder"]["config"])),
        "text_encoder_2": T5EncoderModel(T5Config(**spec["text_encoder_2"]["config"])),
    }, shards={"transformer": "10GB", "text_encoder_2": "5GB"}, dtype=torch.bfloat16)


def main():
    if sys.argv[1] == "build":
        build_folder(Path(sys.argv[2]))
        return
    folder, out, steps, mode = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    from diffusers import FluxPipeline
    extra = {}
    if mode.startswith("gguf-"):
        from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig
        extra["transformer"] = FluxTransformer2DModel.from_single_file(str(folder / f"transformer-{mode[5:]}.gguf"), config=str(folder), subfolder="transformer",
                                                                       quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16),
                                                                       torch_dtype=torch.bfloat16, local_files_only=True)
    pipe = FluxPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16, **extra)
    pipe.set_progress_bar_config(disable=True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    if mode == "none" or mode.startswith("gguf-"):
        pipe.to(cuda)
    elif mode == "model":
        pipe.enable_model_cpu_offload()
    elif mode in ("group", "group-fp8"):
        if mode == "group-fp8":
            pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
        for name in ("text_encoder", "vae"):
            getattr(pipe, name).to(cuda)
        for name in ("transformer", "text_encoder_2"):
            getattr(pipe, name).enable_group_offload(onload_device=cuda, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1, use_stream=True)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload()
    else:
        raise SystemExit(f"unknown mode {mode}")
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: (torch.cuda.synchronize(), calls.append([time.perf_counter()])))
    pipe.transformer.register_forward_hook(lambda *a: (torch.cuda.synchronize(), calls[-1].append(time.perf_counter())))
    kw = dict(prompt="A cat holding a sign that says hello world", guidance_scale=3.5, height=1024, width=1024, max_sequence_length=512, output_type="np")
    pipe(**kw, num_inference_steps=1, generator=torch.Generator("cpu").manual_seed(0))
    torch.cuda.synchronize()
    before = torch.cuda.max_memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    calls.clear()
    t = time.perf_counter()
    img = pipe(**kw, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    torch.cuda.synchronize()
    total = time.perf_counter() - t
    np.save(out / f"diffusers-{mode}.npy", img)
    per_call = sorted(b - a for a, b in calls)
    print(json.dumps({"impl": "diffusers", "mode": mode, "steps": steps, "total_s": round(total, 3), "seconds_per_step_incl_encode_decode": round(total / steps, 4),
                      "transformer_call_median_s": round(per_call[len(per_call) // 2], 4),
                      "peak_vram_allocated": torch.cuda.max_memory_allocated(), "peak_vram_reserved": torch.cuda.max_memory_reserved(),
                      "peak_vram_reserved_process": max(before, torch.cuda.max_memory_reserved())}), flush=True)


if __name__ == "__main__":
    main()
