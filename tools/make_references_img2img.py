#!/usr/bin/env python3
"""Image-to-image and inpainting (issue 28): input images, and what PIL and diffusers make of them.

    .venv-fixtures/bin/python tools/make_references_img2img.py [images] [CASE...]

Writes tests/fixtures/images/:
  lanczos-in.png, lanczos-in-gray.png   random 8-bit RGB and L images (37x23), and PIL's
                                        `resize(size, LANCZOS)` of each to several sizes
                                        (lanczos-<w>x<h>.png, lanczos-gray-<w>x<h>.png): runner's
                                        resize must equal them byte for byte
  init-rgb-70x52.png, init-rgba-64x64.png, init-gray-64x40.png   inputs: smooth gradients with
                                        noise; RGB at a size SD img2img floors to 64x48, RGBA with a
                                        varying alpha (dropped, not composited), 8-bit grayscale
and per case tests/fixtures/refs/<case>.{safetensors,json}: diffusers 0.42.1's pipeline on the tiny
fixture with the base case's prompt, seed, steps, guidance and scheduler (its json, recorded by
make_references.py), the image read by `diffusers.utils.load_image`; tensors `image` and
`vae.input` (what the VAE decodes), the json adds `image`, `mask`, `unet`, `strength` (absent:
the default). tests/fixtures/tiny-sd15-inpaint-unet, tiny-sdxl-inpaint-unet: tiny 9-channel
inpainting UNets (random, from the fixtures' UNet configs).
"""
import json
import os

import torch

torch.set_num_threads(1)
import diffusers  # noqa: E402
from diffusers.utils import load_image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
IMAGES = FIX / "images"
OUT = Path(os.environ["RUNNER_REFS_OUT"]) if os.environ.get("RUNNER_REFS_OUT") else FIX / "refs"
SIZES = [(16, 8), (64, 40), (37, 23), (24, 23), (37, 64), (9, 5)]


def make_images():
    IMAGES.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(28)
    rgb = Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8), "RGB")
    gray = Image.fromarray(rng.integers(0, 256, (23, 37), dtype=np.uint8), "L")
    rgb.save(IMAGES / "lanczos-in.png")
    gray.save(IMAGES / "lanczos-in-gray.png")
    for w, h in SIZES:
        rgb.resize((w, h), resample=Image.LANCZOS).save(IMAGES / f"lanczos-{w}x{h}.png")
        gray.resize((w, h), resample=Image.LANCZOS).save(IMAGES / f"lanczos-gray-{w}x{h}.png")
    print(f"{IMAGES}: lanczos inputs and {2 * len(SIZES)} resized")
    for name, (w, h), mode in [("init-rgb-70x52.png", (70, 52), "RGB"), ("init-rgba-64x64.png", (64, 64), "RGBA"), ("init-gray-64x40.png", (64, 40), "L")]:
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255, (x * y) / (w * h) * 255], -1)
        px = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        arr = {"RGB": px[..., :3], "RGBA": px, "L": px[..., 0]}[mode]
        Image.fromarray(arr, mode).save(IMAGES / name)
    print(f"{IMAGES}: init images")


def make_tiled_input():
    """A 100x84 input (floored to 96x80 by SD img2img): over the tiny VAE's 64-pixel tile."""
    rng = np.random.default_rng(30)
    y, x = np.mgrid[0:84, 0:100]
    base = np.stack([x / 100 * 255, y / 84 * 255, (x + y) / 184 * 255], -1)
    Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8), "RGB").save(IMAGES / "init-rgb-100x84.png")


def make_inpaint_unet():
    """A tiny 9-channel inpainting UNet (latents, mask, masked image latents): tiny-sd15's UNet
    config with `in_channels = 9`, random weights from a seed."""
    for base, out in [("tiny-sd15", "tiny-sd15-inpaint-unet"), ("tiny-sdxl", "tiny-sdxl-inpaint-unet")]:
        if (FIX / out).exists() and base == "tiny-sd15":
            continue  # recorded: kept byte for byte
        cfg = json.loads((FIX / base / "unet" / "config.json").read_text())
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        cfg["in_channels"] = 9
        torch.manual_seed(9)
        unet = diffusers.UNet2DConditionModel(**cfg)
        unet.save_pretrained(FIX / out, safe_serialization=True)
    # A mask at another size than the image: a white (repaint) rectangle with ragged edges.
    rng = np.random.default_rng(29)
    y, x = np.mgrid[0:40, 0:50]
    inside = (x > 12) & (x < 38) & (y > 8) & (y < 30)
    m = np.where(inside, 230, 20) + rng.integers(-20, 20, inside.shape)
    if not (IMAGES / "mask-50x40.png").exists():
        Image.fromarray(np.clip(m, 0, 255).astype(np.uint8), "L").save(IMAGES / "mask-50x40.png")
    print(f"{FIX / 'tiny-sd15-inpaint-unet'}, {IMAGES / 'mask-50x40.png'}")


CASES = [
    dict(name="sd15-img2img", base="sd15-euler", image="init-rgb-70x52.png", strength=0.6),
    dict(name="sd15-img2img-rgba", base="sd15-pndm", image="init-rgba-64x64.png"),
    dict(name="sd15-img2img-gray", base="sd15-ddim", image="init-gray-64x40.png", strength=1.0),
    dict(name="sd15-img2img-one-step", base="sd15-dpmpp-2m", image="init-rgb-70x52.png", strength=0.3),
    dict(name="sd15-img2img-ancestral", base="sd15-euler-ancestral", image="init-rgba-64x64.png", strength=0.75),
    # `vae.enable_tiling()`: the 96x80 input encoded in 64-pixel tiles (`_tiled_encode`).
    dict(name="sd15-img2img-tiled", base="sd15-vae-tiling", image="init-rgb-100x84.png", strength=0.75),
    # StableDiffusionXLImg2ImgPipeline: the image at its own size, floored (70x52 -> 64x48).
    dict(name="sdxl-img2img", base="sdxl-euler", image="init-rgb-70x52.png", strength=0.6),
    dict(name="sdxl-img2img-default", base="sdxl-euler", image="init-rgba-64x64.png"),
    # StableDiffusionXLInpaintPipeline: the default strength 0.9999; the 4- and a 9-channel UNet.
    dict(name="sdxl-inpaint", base="sdxl-euler", image="init-rgb-70x52.png", mask="mask-50x40.png"),
    dict(name="sdxl-inpaint9", base="sdxl-euler", image="init-gray-64x40.png", mask="mask-50x40.png", strength=1.0, unet="tiny-sdxl-inpaint-unet"),
    # FluxImg2ImgPipeline: resized to the requested size; `get_timesteps` floors the skipped steps.
    dict(name="flux-img2img", base="flux-dev", image="init-rgb-70x52.png"),
    dict(name="flux-img2img-gray", base="flux-dev", image="init-gray-64x40.png", strength=0.9),
    # FluxInpaintPipeline: the kept part put back after each step at the next sigma.
    dict(name="flux-inpaint", base="flux-dev", image="init-rgb-70x52.png", mask="mask-50x40.png"),
    dict(name="flux-inpaint-full", base="flux-dev", image="init-rgba-64x64.png", mask="mask-50x40.png", strength=1.0),
    # StableDiffusion3Img2ImgPipeline: the same flow-matching rule, no packing.
    dict(name="sd35-img2img", base="sd35-cfg", image="init-rgb-70x52.png"),
    dict(name="sd35-inpaint", base="sd35-cfg", image="init-rgba-64x64.png", mask="mask-50x40.png", strength=0.8),
    # StableDiffusionInpaintPipeline: the image and mask resized to the requested 64x64.
    dict(name="sd15-inpaint", base="sd15-euler", image="init-rgb-70x52.png", mask="mask-50x40.png"),
    dict(name="sd15-inpaint-strength", base="sd15-ddim", image="init-rgba-64x64.png", mask="mask-50x40.png", strength=0.75),
    dict(name="sd15-inpaint9", base="sd15-pndm", image="init-rgb-70x52.png", mask="mask-50x40.png", unet="tiny-sd15-inpaint-unet"),
    dict(name="sd15-inpaint9-ancestral", base="sd15-euler-ancestral", image="init-gray-64x40.png", mask="mask-50x40.png", strength=0.6, unet="tiny-sd15-inpaint-unet"),
]


def run_case(c):
    meta = json.loads((OUT / f"{c['base']}.json").read_text())
    extra = {"unet": diffusers.UNet2DConditionModel.from_pretrained(FIX / c["unet"])} if "unet" in c else {}
    if meta["pipeline"] == "tiny-flux-dev":
        cls = diffusers.FluxInpaintPipeline if "mask" in c else diffusers.FluxImg2ImgPipeline
    elif meta["pipeline"] == "tiny-sd35":
        cls = diffusers.StableDiffusion3InpaintPipeline if "mask" in c else diffusers.StableDiffusion3Img2ImgPipeline
    elif meta["pipeline"] == "tiny-sdxl":
        cls = diffusers.StableDiffusionXLInpaintPipeline if "mask" in c else diffusers.StableDiffusionXLImg2ImgPipeline
    else:
        cls = diffusers.StableDiffusionInpaintPipeline if "mask" in c else diffusers.StableDiffusionImg2ImgPipeline
        extra["safety_checker"] = None
    pipe = cls.from_pretrained(FIX / meta["pipeline"], dtype=torch.float32, **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, meta["scheduler"]).from_config(meta["scheduler_config"])
    if meta.get("vae_tiling"):
        pipe.vae.enable_tiling()
    rec = {}
    orig = pipe.vae.decode

    def decode(z, *a, **k):
        rec["vae.input"] = z.detach().float().clone()
        return orig(z, *a, **k)
    pipe.vae.decode = decode
    kw = dict(prompt=meta["prompt"], negative_prompt=meta.get("negative_prompt"), image=load_image(str(IMAGES / c["image"])), guidance_scale=meta["guidance_scale"],
              num_inference_steps=meta["steps"], generator=torch.Generator("cpu").manual_seed(meta["seed"]), output_type="np")
    if "strength" in c:
        kw["strength"] = c["strength"]
    if "mask" in c or meta["pipeline"] in ("tiny-flux-dev", "tiny-sd35"):
        kw.update(height=meta["height"], width=meta["width"])
    if meta["pipeline"] == "tiny-sd35":
        kw.update(max_sequence_length=meta["max_sequence_length"])
    if "mask" in c:
        kw["mask_image"] = load_image(str(IMAGES / c["mask"]))
    if meta["pipeline"] == "tiny-flux-dev":
        kw.update(max_sequence_length=meta["max_sequence_length"])
        kw.pop("negative_prompt")
    with torch.no_grad():
        out = pipe(**kw)
    rec["image"] = torch.from_numpy(np.ascontiguousarray(np.stack(out.images))).to(torch.float32)
    save_file({k: v.contiguous() for k, v in rec.items()}, OUT / f"{c['name']}.safetensors", metadata={"case": c["name"]})
    meta.update(case=c["name"], base=c["base"], image=c["image"], mask=c.get("mask"), unet=c.get("unet"), strength=c.get("strength"), width=int(out.images.shape[2]), height=int(out.images.shape[1]))
    (OUT / f"{c['name']}.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(f"{c['name']}: recorded ({out.images.shape[2]}x{out.images.shape[1]})")


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or "images" in args:
        make_images()
    if not args or "inpaint" in args:
        make_inpaint_unet()
    if not args or "tiled" in args:
        make_tiled_input()
    for c in CASES:
        if not args or c["name"] in args:
            run_case(c)
