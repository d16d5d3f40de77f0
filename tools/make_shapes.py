#!/usr/bin/env python3
"""Tensor names, shapes and dtypes of the real SD 1.5 and SDXL base checkpoints, from their
configs (../shared/reference-configs) instantiated on the meta device: no weights involved.

    .venv-fixtures/bin/python tools/make_shapes.py [REFERENCE_CONFIGS]

Writes tests/data/shapes/{sd15,sdxl}.json: model_index.json, and per component its config and
[name, dtype, shape] of every tensor its safetensors file holds (the state dict, plus the
`position_ids` buffers that real CLIP checkpoints saved by transformers 4 carry). Tests turn
these into full-size sparse safetensors files (headers + holes) to plan and inspect real sizes.
Also prints accelerate's `compute_module_sizes` totals to compare with runner's byte counts.
"""
import json
import sys
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import compute_module_sizes

ROOT = Path(__file__).resolve().parent.parent
REF = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "reference-configs"
OUT = ROOT / "tests" / "data" / "shapes"
DT = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64"}


def build(cls_name, cfg):
    import diffusers
    import transformers
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    with init_empty_weights():
        if cls_name == "StableDiffusionSafetyChecker":
            return StableDiffusionSafetyChecker(transformers.CLIPConfig(**cfg))
        if hasattr(diffusers, cls_name) and cls_name in ("UNet2DConditionModel", "AutoencoderKL"):
            cls = getattr(diffusers, cls_name)
            return cls.from_config(cfg)
        cls = getattr(transformers, cls_name)
        config_cls = cls.config_class
        return cls(config_cls(**cfg))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for pipe in ("sd15", "sdxl"):
        mi = json.loads((REF / pipe / "model_index.json").read_text())
        comps = {}
        for name, entry in mi.items():
            if not isinstance(entry, list) or entry[0] is None or not (REF / pipe / name / "config.json").is_file():
                continue
            cfg = json.loads((REF / pipe / name / "config.json").read_text())
            model = build(entry[1], cfg)
            sd = model.state_dict()
            tensors = [[k, DT[v.dtype], list(v.shape)] for k, v in sd.items()]
            # Real CLIP checkpoints (saved by transformers 4) also hold the position_ids buffers,
            # which transformers 5 no longer persists.
            for k, b in model.named_buffers():
                if k.endswith("position_ids") and k not in sd:
                    tensors.append([k, "I64", list(b.shape)])
            sizes = compute_module_sizes(model)
            comps[name] = {"class": entry[1], "library": entry[0], "config": cfg, "tensors": sorted(tensors),
                           "accelerate_module_size_fp32": int(sizes[""])}
            print(pipe, name, len(tensors), "tensors;", "accelerate size", int(sizes[""]))
        (OUT / f"{pipe}.json").write_text(json.dumps({"model_index": mi, "components": comps}, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
