#!/usr/bin/env python3
"""Records diffusers' AutoencoderKL tiling and slicing (`enable_tiling` / `enable_slicing`; the
pipelines' `enable_vae_tiling` / `enable_vae_slicing` of earlier diffusers called them) on the tiny VAEs, for runner's parity tests.

    .venv-fixtures/bin/python tools/make_references.py       # all references, this script included
    .venv-fixtures/bin/python tools/make_references_vae.py   # only these

refs/vae-tiling.safetensors, decoder level: `vae.decode(z)` of random latents `z` whose sides are not
multiples of the tile (tiny VAEs: sample_size 64, 4 levels, so 8-latent tiles with a stride of 6):
- `<vae>.z` [1, C, 12, 10], `<vae>.tiled` (tiling on), `<vae>.untiled` (tiling off), for tiny-sd15 (4
  channels, post_quant_conv) and tiny-sd3 (16 channels, no quant convs);
- `sd15.batch.z` [2, 4, 12, 10], `sd15.batch.sliced` (slicing on), `sd15.batch.sliced_tiled` (both).

Pipeline cases (tests/pipeline.rs), refs/<case>.{safetensors,json,png}, tensors named like
`runner run --dump`: tiny-sd15 at 96x80 (latents 12x10) with `pipe.enable_vae_tiling()`, one image,
and a batch of 2 with tiling and slicing. The json's `vae_tiling` / `vae_slicing` say which.
"""
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

torch.set_num_threads(1)

from diffusers import AutoencoderKL, StableDiffusionPipeline

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
# RUNNER_REFS_OUT: record elsewhere (`make parity` re-records into a temporary folder).
OUT = Path(os.environ["RUNNER_REFS_OUT"]) if os.environ.get("RUNNER_REFS_OUT") else FIX / "refs"

CASES = [
    dict(case="sd15-vae-tiling", pipeline="tiny-sd15", prompt="a photo of a cat", negative_prompt="blurry",
         guidance_scale=7.5, steps=3, batch=1, seed=0, width=80, height=96, vae_tiling=True, vae_slicing=False),
    dict(case="sd15-vae-tiling-slicing-batch2", pipeline="tiny-sd15", prompt="a lighthouse at dawn",
         negative_prompt=None, guidance_scale=1.0, steps=2, batch=2, seed=3, width=96, height=80, vae_tiling=True,
         vae_slicing=True),
]


def f32(t):
    return t.detach().to(torch.float32).contiguous().cpu()


def decoder_refs():
    out = {}
    g = torch.Generator("cpu").manual_seed(0)
    for key, name in (("sd15", "tiny-sd15"), ("sd3", "tiny-sd3")):
        vae = AutoencoderKL.from_pretrained(FIX / name / "vae").eval()
        assert vae.tile_latent_min_size == 8 and vae.tile_sample_min_size == 64, name
        z = torch.randn(1, vae.config.latent_channels, 12, 10, generator=g)
        with torch.no_grad():
            out[f"{key}.untiled"] = f32(vae.decode(z).sample)
            vae.enable_tiling()
            out[f"{key}.tiled"] = f32(vae.decode(z).sample)
        out[f"{key}.z"] = z
        if key == "sd15":
            zb = torch.randn(2, 4, 12, 10, generator=g)
            with torch.no_grad():
                vae.disable_tiling()
                vae.enable_slicing()
                out["sd15.batch.sliced"] = f32(vae.decode(zb).sample)
                vae.enable_tiling()
                out["sd15.batch.sliced_tiled"] = f32(vae.decode(zb).sample)
            out["sd15.batch.z"] = zb
    save_file(out, OUT / "vae-tiling.safetensors", metadata={"what": "AutoencoderKL.decode with enable_tiling / enable_slicing"})
    d = (out["sd15.tiled"] - out["sd15.untiled"]).abs().max().item()
    print(f"vae-tiling: {len(out)} tensors (sd15 tiled vs untiled: max |diff| {d:.3f})")


def run_case(c):
    name = c["case"]
    pipe = StableDiffusionPipeline.from_pretrained(FIX / c["pipeline"])
    pipe.set_progress_bar_config(disable=True)
    if c["vae_tiling"]:
        pipe.vae.enable_tiling()  # diffusers 0.42 has no pipeline-level enable_vae_tiling any more
    if c["vae_slicing"]:
        pipe.vae.enable_slicing()
    rec = {}
    tok = pipe.tokenizer

    def ids(text):
        return torch.tensor(tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids)
    rec["tokens.prompt.input_ids"] = ids(c["prompt"])
    if c["negative_prompt"] is not None:
        rec["tokens.negative.input_ids"] = ids(c["negative_prompt"])
    calls = []

    def unet_hook(module, args, kwargs, output):
        calls.append((args[0] if args else kwargs["sample"], output[0] if isinstance(output, tuple) else output.sample))
    h = pipe.unet.register_forward_hook(unet_hook, with_kwargs=True)

    def on_step(p, i, t, kw):
        rec[f"step{i}.latents"] = f32(kw["latents"])
        return kw
    guidance = c["guidance_scale"]
    kwargs = dict(prompt=c["prompt"], negative_prompt=c["negative_prompt"], guidance_scale=guidance,
                  num_inference_steps=c["steps"], num_images_per_prompt=c["batch"], height=c["height"],
                  width=c["width"], generator=torch.Generator("cpu").manual_seed(c["seed"]), callback_on_step_end=on_step,
                  output_type="latent")
    with torch.no_grad():
        latents = pipe(**kwargs).images
        h.remove()
        rec["latents.final"] = f32(latents)
        for i, (x, u) in enumerate(calls):
            rec[f"step{i}.unet_input"] = f32(x)
            rec[f"step{i}.unet_output"] = f32(u)
        kwargs.update(output_type="np", generator=torch.Generator("cpu").manual_seed(c["seed"]), callback_on_step_end=None)
        out = pipe(**kwargs)
        rec["image"] = torch.from_numpy(np.ascontiguousarray(np.stack(out.images))).to(torch.float32)  # [N, H, W, 3]: the whole batch
        pipe.numpy_to_pil(out.images)[0].save(OUT / f"{name}.png")
    tensors = {k: (v.to(torch.int64) if k.startswith("tokens.") else v).contiguous().clone() for k, v in rec.items()}
    save_file(tensors, OUT / f"{name}.safetensors", metadata={"case": name})
    config = dict(pipe.scheduler.config)
    config.pop("_use_default_values", None)
    meta = dict(c, scheduler=pipe.scheduler.__class__.__name__, scheduler_config=config, unet_calls=len(calls),
                nsfw_content_detected=getattr(out, "nsfw_content_detected", None))
    (OUT / f"{name}.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return len(tensors)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    decoder_refs()
    for c in CASES:
        print(f"{c['case']}: {run_case(c)} tensors")


if __name__ == "__main__":
    main()
