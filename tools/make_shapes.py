#!/usr/bin/env python3
"""Tensor names, shapes and dtypes of real pipelines' checkpoints (SD 1.5, SDXL base, SD3-medium,
SD3.5-large, FLUX.1-dev), from their configs (../shared/reference-configs) instantiated on the meta device: no
weights involved.

    .venv-fixtures/bin/python tools/make_shapes.py [REFERENCE_CONFIGS] [PIPELINE...]

Writes tests/data/shapes/{sd15,sdxl,sd3-medium,sd35-large,flux-dev}.json (only the PIPELINEs named,
when some are): model_index.json, and per component
its config and [name, dtype, shape] of every tensor its safetensors file holds. Tests turn these into
full-size sparse safetensors files (headers + holes) to plan and inspect real sizes. Also prints
accelerate's `compute_module_sizes` totals to compare with runner's byte counts.

What the files hold, beyond the state dict of the meta model:
- SD 1.5 / SDXL CLIP checkpoints (saved by transformers 4 before 4.31) also hold the int64
  `position_ids` buffers, which transformers 5 no longer persists; SD3's (saved in 2024) do not.
- T5EncoderModel: `shared.weight` only, not the tied `encoder.embed_tokens.weight`
  (`save_pretrained` drops tied weights).
- Sharded components carry `shards`: the tensor -> file map as the public repos ship them. T5-XXL
  (`text_encoder_3`, 2 shards) from the reference folder's shard_layout.json (the 5 GB layout of
  transformers 4, checked here against huggingface_hub's own splitter); the SD3.5-large transformer
  (2 shards, 9.99 + 6.31 GB) simulated as diffusers' `save_pretrained` writes it: state-dict order,
  bf16, `max_shard_size="10GB"` (its index total_size is the 16,292,561,536 bytes of the repo).
  FLUX.1-dev: T5-XXL (`text_encoder_2`) as SD3's, and the transformer in 3 shards from the reference
  folder's shard_layout.json (diffusers' 10 GB layout at bf16, equal to the repo's file sizes,
  checked here against huggingface_hub's splitter).
- `accelerate_module_size_fp32`: accelerate's count of the model (T5 with its embedding tied, as
  transformers loads it, so the tied weight counts once). For SD3 components also the 16-bit count,
  T5's fp16 count with `_keep_in_fp32_modules` (`wo`) in fp32 (what transformers holds in an fp16
  model), and for models with `_no_split_modules` the largest such unit at 16 bits.
"""
import json
import re
import sys
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import compute_module_sizes

ROOT = Path(__file__).resolve().parent.parent
REF = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "reference-configs"
OUT = ROOT / "tests" / "data" / "shapes"
DT = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64"}
DIFFUSERS_MODELS = ("UNet2DConditionModel", "AutoencoderKL", "SD3Transformer2DModel", "FluxTransformer2DModel")


def build(cls_name, cfg):
    import diffusers
    import transformers
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    with init_empty_weights():
        if cls_name == "StableDiffusionSafetyChecker":
            return StableDiffusionSafetyChecker(transformers.CLIPConfig(**cfg))
        if hasattr(diffusers, cls_name) and cls_name in DIFFUSERS_MODELS:
            cls = getattr(diffusers, cls_name)
            return cls.from_config(cfg)
        cls = getattr(transformers, cls_name)
        config_cls = cls.config_class
        return cls(config_cls(**cfg))


def sd_legacy():
    """SD 1.5 and SDXL base, exactly as before (the files are byte-identical)."""
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


def no_split_units(model, sizes):
    """(path, 16-bit bytes) of every `_no_split_modules` instance, outermost only."""
    classes = set(getattr(model, "_no_split_modules", None) or [])
    found = []
    for path, m in model.named_modules():
        if type(m).__name__ in classes and not any(path.startswith(p + ".") for p, _ in found):
            found.append((path, int(sizes[path])))
    return found


def shard_map(name, layout_dir, state_dict):
    """The tensor -> file map of a sharded component as its repo ships it, or None."""
    layout = layout_dir / "shard_layout.json"
    if name == "transformer" and layout.is_file():
        from huggingface_hub import split_torch_state_dict_into_shards
        simulated = json.loads(layout.read_text())["simulated"]
        (key, shipped), = simulated.items()
        shipped = shipped["weight_map"]
        half = {k: v.to(torch.bfloat16) for k, v in state_dict.items()}
        split = split_torch_state_dict_into_shards(half, filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB")
        assert split.tensor_to_filename == shipped, f"shard_layout.json ({key}) is diffusers' 10 GB layout"
        return {"max_shard_size": "10GB", "source": "shard_layout.json (simulated, equal to the repo's file sizes)", "weight_map": shipped}
    if (name, layout.is_file()) in (("text_encoder_3", True), ("text_encoder_2", True)):
        from huggingface_hub import split_torch_state_dict_into_shards
        shipped = json.loads(layout.read_text())["simulated"]["t5_xxl_bf16_max_shard_5GB"]["weight_map"]
        half = {k: v.to(torch.bfloat16) for k, v in state_dict.items()}
        split = split_torch_state_dict_into_shards(half, max_shard_size="5GB")
        assert split.tensor_to_filename == shipped, "shard_layout.json is transformers 4's 5 GB layout"
        return {"max_shard_size": "5GB", "source": "shard_layout.json (simulated, equal to the repo's file sizes)", "weight_map": shipped}
    if name == "transformer" and state_dict_bytes(state_dict) > 10 * 10**9:
        assert not layout.is_file(), "use the shipped layout"
        from huggingface_hub import split_torch_state_dict_into_shards
        half = {k: v.to(torch.bfloat16) for k, v in state_dict.items()}
        split = split_torch_state_dict_into_shards(half, filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB")
        return {"max_shard_size": "10GB", "source": "diffusers save_pretrained at bf16 (simulated)", "weight_map": dict(split.tensor_to_filename)}
    return None


def state_dict_bytes(sd):
    return sum(v.numel() * 2 for v in sd.values())


def sd3(pipe):
    import transformers
    mi = json.loads((REF / pipe / "model_index.json").read_text())
    comps = {}
    for name, entry in mi.items():
        folder = REF / pipe / name
        if not isinstance(entry, list) or entry[0] is None or not (folder / "config.json").is_file():
            continue
        cfg = json.loads((folder / "config.json").read_text())
        model = build(entry[1], cfg)
        sd = model.state_dict()
        if isinstance(model, transformers.T5EncoderModel):
            # The checkpoint holds `shared.weight`; the encoder's embedding is tied to it.
            del sd["encoder.embed_tokens.weight"]
            model.encoder.embed_tokens = model.shared
        tensors = [[k, DT[v.dtype], list(v.shape)] for k, v in sd.items()]
        sizes = compute_module_sizes(model)
        half = compute_module_sizes(model, dtype=torch.float16)
        c = {"class": entry[1], "library": entry[0], "config": cfg, "tensors": sorted(tensors),
             "accelerate_module_size_fp32": int(sizes[""]), "accelerate_module_size_16bit": int(half[""])}
        keep = getattr(model, "_keep_in_fp32_modules", None) or []
        if keep:
            pattern = re.compile(r"(^|\.)(" + "|".join(map(re.escape, keep)) + r")(\.|$)")
            special = {n: torch.float32 for n, _ in model.named_parameters() if pattern.search(n)}
            c["keep_in_fp32_modules"] = sorted(keep)
            c["accelerate_module_size_fp16_keep_in_fp32"] = int(compute_module_sizes(model, dtype=torch.float16, special_dtypes=special)[""])
        units = no_split_units(model, half)
        if units:
            c["no_split_modules"] = sorted(model._no_split_modules)
            c["no_split_units"] = len(units)
            c["largest_no_split_unit_16bit"] = list(max(units, key=lambda u: (u[1], u[0])))
        shards = shard_map(name, folder, sd)
        if shards:
            c["shards"] = shards
        comps[name] = c
        print(pipe, name, len(tensors), "tensors;", "accelerate size", c["accelerate_module_size_fp32"], "16-bit", c["accelerate_module_size_16bit"],
              "fp16 keep fp32", c.get("accelerate_module_size_fp16_keep_in_fp32"), "largest unit", c.get("largest_no_split_unit_16bit"),
              "shards", shards and sorted(set(shards["weight_map"].values())))
    scheduler = json.loads((REF / pipe / "scheduler" / "scheduler_config.json").read_text())
    doc = {"model_index": mi, "components": comps, "scheduler": scheduler}
    (OUT / f"{pipe}.json").write_text(json.dumps(doc, sort_keys=True) + "\n")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    only = sys.argv[2:]
    if not only or {"sd15", "sdxl"} & set(only):
        sd_legacy()
    for pipe in ("sd3-medium", "sd35-large", "flux-dev"):
        if not only or pipe in only:
            sd3(pipe)


if __name__ == "__main__":
    main()
