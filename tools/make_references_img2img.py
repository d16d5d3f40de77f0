#!/usr/bin/env python3
"""Image-to-image and inpainting (issue 28): input images, and what PIL and diffusers make of them.

    .venv-fixtures/bin/python tools/make_references_img2img.py [images] [CASE...]

Writes tests/fixtures/images/:
  lanczos-in.png, lanczos-in-gray.png   random 8-bit RGB and L images (37x23), and PIL's
                                        `resize(size, LANCZOS)` of each to several sizes
                                        (lanczos-<w>x<h>.png, lanczos-gray-<w>x<h>.png): runner's
                                        resize must equal them byte for byte
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "tests" / "fixtures" / "images"
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


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or "images" in args:
        make_images()
