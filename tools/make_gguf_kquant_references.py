#!/usr/bin/env python3
"""K-quant and IQ4 GGUF transformers against diffusers 0.42.1 (issue 26). The tiny fixtures' rows
(24, 32 wide) hold no 256-element K-quant block, so two small transformers of their own, 256 wide
(2 heads x 128), are defined here; their GGUF files hold random blocks (small finite fp16 scales)
of Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL and IQ4_XS, one type per original tensor in turn, written
by a runner test from a seed (no binary fixture is committed; the sha256 ties the files to these
references).

    .venv-fixtures/bin/python tools/make_gguf_kquant_references.py configs
        tests/fixtures/gguf/kquant-flux/transformer/config.json, tensors.json (diffusers' names and shapes)
        tests/fixtures/gguf/kquant-sd35/transformer/config.json, tensors.json
    RUNNER_GGUF_KQUANT_OUT=/tmp/kq cargo test --test main gguf_run::kquant
        writes kquant-{flux,sd35}-{original,diffusers}.gguf there (the test fails on the sha256
        until the references exist; the files are written first)
    .venv-fixtures/bin/python tools/make_gguf_kquant_references.py refs /tmp/kq
        tests/fixtures/refs/gguf-kquant.safetensors   <fixture>.<input>, <fixture>-<keys>.output
        tests/fixtures/refs/gguf-kquant.json          the files' sha256

diffusers loads each with `from_single_file(..., quantization_config=GGUFQuantizationConfig(
compute_dtype=float32), config=<folder>, subfolder="transformer")` (GGUFLinear layers; FLUX's
converter with the 256 width instead of its hard-coded 3072, as tools/make_gguf_references.py).
"""
import hashlib
import json
import os
import sys

import torch
from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig, SD3Transformer2DModel
from safetensors.torch import save_file

from diffusers.loaders import single_file_model as sfm
from diffusers.loaders import single_file_utils as sfu

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def flux_converter(inner_dim):
    """diffusers' FLUX converter with `inner_dim` for its hard-coded 3072 (as tools/make_gguf_references.py)."""
    import inspect

    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in src
    ns = dict(vars(sfu))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), ns)
    return ns["convert_flux_transformer_checkpoint_to_diffusers"]

FIXTURES = {
    "kquant-flux": (FluxTransformer2DModel, dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=2,
                                                 joint_attention_dim=256, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[16, 56, 56])),
    "kquant-sd35": (SD3Transformer2DModel, dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=128, num_attention_heads=2,
                                                joint_attention_dim=256, caption_projection_dim=256, pooled_projection_dim=32, out_channels=16,
                                                pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")),
}


def folder(fx):
    return os.path.join(here, "tests/fixtures/gguf", fx)


def configs():
    for fx, (cls, cfg) in FIXTURES.items():
        with torch.device("meta"):
            m = cls(**cfg)
        d = os.path.join(folder(fx), "transformer")
        os.makedirs(d, exist_ok=True)
        m.save_config(d)
        shapes = {k: list(v.shape) for k, v in m.state_dict().items()}
        json.dump(shapes, open(os.path.join(d, "tensors.json"), "w"), indent=1, sort_keys=True)
        print(f"{d}: {len(shapes)} tensors, {sum(torch.Size(s).numel() for s in shapes.values())} parameters")


def refs(kq_dir):
    g = torch.Generator().manual_seed(26)

    def rand(*s):
        return torch.randn(*s, generator=g)

    inputs = {
        "kquant-flux": {
            "hidden_states": rand(2, 12, 64),
            "encoder_hidden_states": rand(2, 7, 256),
            "pooled_projections": rand(2, 32),
            "timestep": torch.tensor([0.9, 0.35]),
            "guidance": torch.tensor([3.5, 3.5]),
            "img_ids": torch.stack([torch.zeros(12), torch.arange(12).div(4, rounding_mode="floor").float(), (torch.arange(12) % 4).float()], 1),
            "txt_ids": torch.zeros(7, 3),
        },
        "kquant-sd35": {
            "hidden_states": rand(2, 16, 8, 8),
            "encoder_hidden_states": rand(2, 7, 256),
            "pooled_projections": rand(2, 32),
            "timestep": torch.tensor([900.0, 350.0]),
        },
    }
    tensors = {f"{fx}.{k}": v for fx, d in inputs.items() for k, v in d.items()}
    files = {}
    sfm.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]["checkpoint_mapping_fn"] = flux_converter(256)
    for fx, (cls, _) in FIXTURES.items():
        for keys in ["original", "diffusers"]:
            name = f"{fx}-{keys}.gguf"
            path = os.path.join(kq_dir, name)
            m = cls.from_single_file(path, quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), config=folder(fx), subfolder="transformer",
                                     torch_dtype=torch.float32, local_files_only=True)
            kinds = {type(x).__name__ for x in m.modules()}
            assert "GGUFLinear" in kinds, (name, kinds)
            with torch.no_grad():
                out = m(**inputs[fx], return_dict=False)[0]
            assert torch.isfinite(out).all(), name
            tensors[f"{fx}-{keys}.output"] = out.contiguous()
            files[name] = hashlib.sha256(open(path, "rb").read()).hexdigest()
            print(f"{name}: output {tuple(out.shape)}, max |out| {out.abs().max().item():.4g}")
    save_file(tensors, os.path.join(here, "tests/fixtures/refs/gguf-kquant.safetensors"))
    json.dump({"files": files}, open(os.path.join(here, "tests/fixtures/refs/gguf-kquant.json"), "w"), indent=1, sort_keys=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["configs"]:
        configs()
    elif sys.argv[1:2] == ["refs"] and len(sys.argv) == 3:
        refs(sys.argv[2])
    else:
        sys.exit(__doc__)
