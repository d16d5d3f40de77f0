#!/usr/bin/env python3
"""Records diffusers' SD 1.5 safety checking on the tiny fixture, for runner's parity tests.

    .venv-fixtures/bin/python tools/make_safety_refs.py      # after tools/make_references.py

Mirrors `StableDiffusionPipeline.run_safety_checker` on numpy images (diffusers 0.42.1): the
decoded [B, H, W, 3] float image in [0, 1] goes through `numpy_to_pil`, the pipeline's
`feature_extractor` (transformers 5.24's `CLIPImageProcessorPil` here, as there is no
torchvision) and `StableDiffusionSafetyChecker.forward`.

Writes tests/fixtures/refs/safety.safetensors with, per case `<c>`:
  <c>.resized          uint8 [B, h, w, 3]  the processor's PIL resize (before the center crop)
  <c>.pixel_values     f32 [1, 3, 32, 32]   `feature_extractor(pil, return_tensors="pt")` of the
                                            first image (none for the flagged cases: file size)
  <c>.pooled           f32 [B, hidden]      vision tower pooler_output
  <c>.image_embeds     f32 [B, proj]        visual_projection(pooled)
  <c>.special_cos_dist f32 [B, 3], <c>.cos_dist f32 [B, 17]
  <c>.special_scores   f32 [B, 3], <c>.concept_scores f32 [B, 17]   (rounded as forward does)
  <c>.has_nsfw         uint8 [B]
and tests/fixtures/refs/safety.json describing how each case's input is made (the Rust test
rebuilds it: `image` tensors of the sd15 references, `hash_u64` noise or `pattern_image`), the flags, and
the edited safety-checker parameters of the `flagged` cases: `flagged.{concept_embeds,
special_care_embeds,concept_embeds_weights,special_care_embeds_weights}`, and for `all-flagged`
the same with `all-flagged.concept_embeds_weights` = -1.5.

Also records the real SD 1.5 `preprocessor_config.json` (size 224, legacy integer sizes) on three
hash-pattern images of 512 x 512, 768 x 512 and 200 x 300 (upscaled): a checksum of the resized uint8 image, some of
its rows, and checksums/rows of `pixel_values` (full tensors would be too large to commit); and
`PIL.Image.resize` itself with each of its five convolution filters on a 23 x 37 hash-pattern
image (`pil_resize.<FILTER>.<h>x<w>`).
"""
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)

from diffusers import StableDiffusionPipeline
from PIL import Image
from transformers import CLIPImageProcessor

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
# RUNNER_REFS_OUT: record elsewhere (`make parity` re-records into a temporary folder).
OUT = Path(os.environ["RUNNER_REFS_OUT"]) if os.environ.get("RUNNER_REFS_OUT") else FIX / "refs"

# feature_extractor/preprocessor_config.json of the SD 1.5 repositories (legacy integer sizes,
# no rescale keys: class defaults).
SD15_PREPROCESSOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}


def hash_u64(n: int, seed: int) -> np.ndarray:
    """A splitmix-style hash of (index + seed * 2^32), vectorised (uint64 wraps)."""
    with np.errstate(over="ignore"):
        h = np.arange(n, dtype=np.uint64) + np.uint64(seed << 32)
        h = h * np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(29)
        h = h * np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(32)
    return h


def noise_image(h, w, seed):
    """Floats k / 2^24 (exact in f32) in [0, 1): the Rust test computes the same."""
    v = (hash_u64(h * w * 3, seed) >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)
    return v.reshape(h, w, 3)


def pattern_image(name, h, w):
    """Two simple, distinct images (f32 arithmetic the Rust test repeats)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if name == "gradient":
        return np.stack([xx / np.float32(w - 1), yy / np.float32(h - 1), (xx + yy) / np.float32(w + h - 2)], -1)
    if name == "square":
        img = np.full((h, w, 3), 0.5, np.float32)
        img[h // 4:h * 5 // 8, w // 3:w * 4 // 5] = np.array([1.0, 0.1, 0.2], np.float32)
        return img
    raise ValueError(name)


def make_images(h, w, sources):
    out = []
    for s in sources:
        if "noise" in s:
            out.append(noise_image(h, w, s["noise"]))
        elif "pattern" in s:
            out.append(pattern_image(s["pattern"], h, w))
        else:
            out.append(load_file(OUT / f"{s['refs']}.safetensors")["image"][0].numpy())
        assert out[-1].shape == (h, w, 3), (s, out[-1].shape)
    return np.stack(out).astype(np.float32)


def noise_u8(h, w, seed):
    return (hash_u64(h * w * 3, seed) >> np.uint64(56)).astype(np.uint8).reshape(h, w, 3)


def checksum_u8(a: np.ndarray) -> int:
    """sum(v_i * (i * 2654435761 mod 4093 + 1)) over the flat (row-major) array."""
    i = np.arange(a.size, dtype=np.int64)
    w = (i * 2654435761) % 4093 + 1
    return int((a.reshape(-1).astype(np.int64) * w).sum())


def forward_details(sc, clip_input):
    """`StableDiffusionSafetyChecker.forward`'s numbers, step by step (same code)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance
    with torch.no_grad():
        pooled = sc.vision_model(clip_input)[1]
        image_embeds = sc.visual_projection(pooled)
        special_cos_dist = cosine_distance(image_embeds, sc.special_care_embeds).cpu().float().numpy()
        cos_dist = cosine_distance(image_embeds, sc.concept_embeds).cpu().float().numpy()
    special_scores, concept_scores, flags = [], [], []
    for i in range(image_embeds.shape[0]):
        adjustment = 0.0
        ss, cs, bad = [], [], []
        for k in range(len(special_cos_dist[0])):
            s = round(special_cos_dist[i][k] - sc.special_care_embeds_weights[k].item() + adjustment, 3)
            ss.append(s)
            if s > 0:
                adjustment = 0.01
        for k in range(len(cos_dist[0])):
            s = round(cos_dist[i][k] - sc.concept_embeds_weights[k].item() + adjustment, 3)
            cs.append(s)
            if s > 0:
                bad.append(k)
        special_scores.append(np.array(ss, dtype=np.float32))
        concept_scores.append(np.array(cs, dtype=np.float32))
        flags.append(len(bad) > 0)
    return dict(pooled=pooled.float(), image_embeds=image_embeds.float(), special_cos_dist=torch.from_numpy(special_cos_dist),
                cos_dist=torch.from_numpy(cos_dist), special_scores=torch.from_numpy(np.stack(special_scores)),
                concept_scores=torch.from_numpy(np.stack(concept_scores))), flags


def run_case(pipe, name, h, w, sources, rec, meta, keep_pixel_values=True):
    images = make_images(h, w, sources)
    fe, sc = pipe.feature_extractor, pipe.safety_checker
    pils = pipe.image_processor.numpy_to_pil(images)
    # The processor's own resize on its own input format (CHW uint8), as `_preprocess` calls it.
    resized = []
    for p in pils:
        chw = fe.process_image(p, do_convert_rgb=fe.do_convert_rgb)
        r = fe.resize(image=chw, size=fe.size, resample=fe.resample)
        resized.append(np.moveaxis(r, 0, -1))
    pixel_values = fe(pils, return_tensors="pt").pixel_values
    details, flags = forward_details(sc, pixel_values)
    # The pipeline's own call (numpy branch: `numpy_to_pil` + feature_extractor + forward).
    out_images, has_nsfw = pipe.run_safety_checker(images.copy(), "cpu", torch.float32)
    assert list(has_nsfw) == flags, (name, has_nsfw, flags)
    for i, f in enumerate(flags):
        if f:
            assert not out_images[i].any(), name
        else:
            assert np.array_equal(out_images[i], images[i]), name
    rec[f"{name}.resized"] = torch.from_numpy(np.stack(resized))
    if keep_pixel_values:  # (the first image only, and none for the flagged cases, to keep the file
        # small: the tower outputs of every image check them too)
        rec[f"{name}.pixel_values"] = pixel_values[:1].float()
    for k, v in details.items():
        rec[f"{name}.{k}"] = v
    rec[f"{name}.has_nsfw"] = torch.tensor(flags, dtype=torch.uint8)
    meta["cases"].append(dict(name=name, height=h, width=w, images=sources, has_nsfw=flags))
    return images, details


def orthogonal_direction(emb, i):
    """A unit vector with positive cosine to emb[i] and zero cosine to every other row."""
    e = torch.nn.functional.normalize(emb.double(), dim=1)
    others = torch.cat([e[:i], e[i + 1:]])
    q, _ = torch.linalg.qr(others.t())
    v = e[i] - q @ (q.t() @ e[i])
    return (v / v.norm()).float()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(FIX / "tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.feature_extractor).__name__ == "CLIPImageProcessorPil", type(pipe.feature_extractor)
    rec = {}
    meta = {"hash": "splitmix-style hash of index + (seed << 32) (hash_u64); f32 noise = (h >> 40) / 2^24; u8 noise = h >> 56",
            "cases": []}

    # Decoded images of the committed pipeline references.
    run_case(pipe, "decoded", 64, 64, [{"refs": c} for c in ["sd15-ddim", "sd15-euler", "sd15-pndm"]], rec, meta)
    # Random content and patterns at other sizes (upscaled, identity resize, odd ratios).
    for name, h, w, sources in [("64x64", 64, 64, [{"noise": 1}, {"pattern": "gradient"}]),
                                ("96x64", 96, 64, [{"noise": 2}]),
                                ("40x72", 40, 72, [{"noise": 3}, {"pattern": "square"}]),
                                ("20x28", 20, 28, [{"noise": 4}]),
                                ("32x50", 32, 50, [{"noise": 5}]),
                                ("50x33", 50, 33, [{"noise": 6}]),
                                ("31x200", 31, 200, [{"noise": 7}])]:
        run_case(pipe, name, h, w, sources, rec, meta)

    # Flagged: edited embeddings and thresholds (in memory: a temporary copy of the checker's
    # parameters; the Rust test writes the same `flagged.*` tensors into a checkpoint copy).
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance
    sc = pipe.safety_checker
    sources = [{"noise": 11}, {"pattern": "gradient"}, {"pattern": "square"}, {"refs": "sd15-ddim"}]
    imgs = make_images(64, 64, sources)
    pv = pipe.feature_extractor(pipe.image_processor.numpy_to_pil(imgs), return_tensors="pt").pixel_values
    with torch.no_grad():
        emb = sc.visual_projection(sc.vision_model(pv)[1])
        g = torch.Generator().manual_seed(5)
        concept = torch.randn(17, emb.shape[1], generator=g)
        special = torch.randn(3, emb.shape[1], generator=g)
        cw = 0.6 + 0.3 * torch.rand(17, generator=g)
        sw = 0.6 + 0.3 * torch.rand(3, generator=g)
        v0, v1, v3 = (orthogonal_direction(emb, i) for i in (0, 1, 3))
        p = cosine_distance(emb, torch.stack([v0, v1, v3]))
        p0, p1, p3 = p[0, 0].item(), p[1, 1].item(), p[3, 2].item()
        concept[4], special[1], special[2], concept[9], concept[12] = v0, v1, v1, v1, v3
        cw[4] = p0 / 2            # image 0 flagged on concept 4
        sw[1] = p1 / 2            # image 1: a special-care hit -> adjustment 0.01
        sw[2] = p1 + 0.004        # image 1, special 2: -0.004 + 0.01 = 0.006
        cw[9] = p1 + 0.005        # image 1, concept 9: -0.005 + 0.01 = 0.005 -> flagged
        cw[12] = p3 - 0.0003      # image 3, concept 12: 0.0003 rounds to 0.0 -> not flagged
        for k, v in [("concept_embeds", concept), ("special_care_embeds", special),
                     ("concept_embeds_weights", cw), ("special_care_embeds_weights", sw)]:
            getattr(sc, k).copy_(v)
    _, d = run_case(pipe, "flagged", 64, 64, sources, rec, meta, keep_pixel_values=False)
    assert meta["cases"][-1]["has_nsfw"] == [True, True, False, False], meta["cases"][-1]
    cs, ss = d["concept_scores"], d["special_scores"]
    assert cs[1, 9].item() == np.float32(0.005) and ss[1, 2].item() == np.float32(0.006), (cs[1], ss[1])
    assert cs[3, 12].item() == 0.0 and (cs[2] < 0).all() and (ss[[0, 2, 3]] < 0).all(), (cs, ss)
    for k in ["concept_embeds", "special_care_embeds", "concept_embeds_weights", "special_care_embeds_weights"]:
        rec[f"flagged.{k}"] = getattr(sc, k).detach().float().clone()
    # Every image flagged, and images of another size: thresholds below every cosine.
    with torch.no_grad():
        sc.concept_embeds_weights.fill_(-1.5)
    run_case(pipe, "all-flagged", 40, 72, [{"noise": 12}, {"noise": 13}], rec, meta, keep_pixel_values=False)
    assert meta["cases"][-1]["has_nsfw"] == [True, True]
    rec["all-flagged.concept_embeds_weights"] = sc.concept_embeds_weights.detach().float().clone()

    # The real SD 1.5 processor config on full-size images (checksums and rows only).
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "preprocessor_config.json").write_text(json.dumps(SD15_PREPROCESSOR))
        fe = CLIPImageProcessor.from_pretrained(d)
    meta["sd15_preprocessor"] = SD15_PREPROCESSOR
    meta["sd15_cases"] = []
    for name, h, w, seed in [("sd15-512x512", 512, 512, 21), ("sd15-768x512", 768, 512, 22), ("sd15-200x300", 200, 300, 23)]:
        u8 = noise_u8(h, w, seed)
        # The float image whose numpy_to_pil gives back u8 exactly.
        f = u8.astype(np.float32) / np.float32(255)
        pil = pipe.image_processor.numpy_to_pil(f[None])[0]
        assert np.array_equal(np.array(pil), u8)
        chw = fe.process_image(pil, do_convert_rgb=True)
        resized = np.moveaxis(fe.resize(image=chw, size=fe.size, resample=fe.resample), 0, -1)
        pv = fe(pil, return_tensors="pt").pixel_values[0].numpy()
        rows = [0, resized.shape[0] // 2, resized.shape[0] - 1]
        rec[f"{name}.resized_rows"] = torch.from_numpy(resized[rows].copy())
        rec[f"{name}.pixel_values_rows"] = torch.from_numpy(pv[:, [0, 111, 223], :].copy())
        meta["sd15_cases"].append(dict(name=name, height=h, width=w, seed=seed, resized_shape=list(resized.shape),
                                       resized_rows=rows, resized_checksum=checksum_u8(resized),
                                       pixel_values_sum=float(pv.astype(np.float64).sum()),
                                       pixel_values_sq_sum=float((pv.astype(np.float64) ** 2).sum())))

    # PIL.Image.resize itself with every filter ImagingResample implements, on a small image.
    src = noise_u8(23, 37, 31)
    meta["pil_resize"] = dict(height=23, width=37, seed=31, sizes=[[7, 9], [23, 50], [40, 11], [5, 37]],
                              filters={"LANCZOS": 1, "BILINEAR": 2, "BICUBIC": 3, "BOX": 4, "HAMMING": 5})
    for fname, f in meta["pil_resize"]["filters"].items():
        for h, w in meta["pil_resize"]["sizes"]:
            out = np.array(Image.fromarray(src).resize((w, h), resample=f))
            rec[f"pil_resize.{fname}.{h}x{w}"] = torch.from_numpy(out)

    tensors = {k: v.contiguous().clone() for k, v in rec.items()}
    save_file(tensors, OUT / "safety.safetensors", metadata={"tool": "tools/make_safety_refs.py"})
    (OUT / "safety.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{len(tensors)} tensors, {(OUT / 'safety.safetensors').stat().st_size} bytes")


if __name__ == "__main__":
    main()
