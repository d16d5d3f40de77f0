#!/usr/bin/env python3
"""LoRA adapters on the tiny fixtures (issue 27): random adapter files in each format runner reads,
and diffusers' images with them fused.

    .venv-fixtures/bin/python tools/make_references_lora.py

Writes tests/fixtures/loras/:
  sd15-peft.safetensors    diffusers/PEFT (`StableDiffusionPipeline.save_lora_weights`, with its
                           `lora_adapter_metadata`): rank 4, lora_alpha 8, on the UNet's attention,
                           feed-forward, proj_in/out, time_emb_proj and resnet convs (3x3 included),
                           and the text encoder's q/k/v/out_proj and fc1/fc2 (rank 4, alpha 4)
  sd15-kohya.safetensors   kohya names (`lora_unet_…`, `lora_te_…`, `.lora_down/.lora_up`, `.alpha` = 2
                           at rank 4, so alpha / rank = 0.5), written from another random PEFT adapter
and per case tests/fixtures/refs/lora-<name>.{safetensors,json}: the base case's inputs (its json,
recorded by make_references.py) run with the adapters loaded by `load_lora_weights`, weighted by
`set_adapters(names, weights)` and merged by `fuse_lora(adapter_names=names)` in name order (runner's
order); tensors `image` and `vae.input`, the json adds `adapters` {name: {file, scale}}.
"""
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

torch.set_num_threads(1)

import diffusers  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
LORAS = FIX / "loras"
OUT = Path(os.environ["RUNNER_REFS_OUT"]) if os.environ.get("RUNNER_REFS_OUT") else FIX / "refs"

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "time_emb_proj", "conv1", "conv2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2", "norm1.linear"]
FLUX_TARGETS = SD3_TARGETS + ["proj_mlp", "proj_out", "norm.linear", "ff_context.net.0.proj", "ff_context.net.2"]


def random_adapter(model, cfg, seed):
    """Adds a PEFT adapter whose A and B are both random (B scaled down so the change is visible
    but the image not destroyed); returns its state dict as diffusers saves it."""
    torch.manual_seed(seed)
    model.add_adapter(cfg, adapter_name="tmp")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.copy_(torch.randn_like(p) * 0.3)
            elif "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.05)
    sd = get_peft_model_state_dict(model, adapter_name="tmp")
    (model.delete_adapters if hasattr(model, "delete_adapters") else model.delete_adapter)("tmp")
    return sd


def sgm_name(module, lpb):
    """A diffusers UNet module path in the original (sgm) block names, the inverse of diffusers'
    `_maybe_map_sgm_blocks_to_diffusers` + `_convert_unet_lora_key`."""
    p = module.split(".")
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
    def inner(rest):
        return ".".join(resnet.get(rest[0], rest[0]) if i == 0 else x for i, x in enumerate(rest)) if rest else ""
    if p[0] == "down_blocks":
        b, kind, j = int(p[1]), p[2], int(p[3])
        return f"input_blocks.{1 + b * (lpb + 1) + j}.{0 if kind == 'resnets' else 1}." + inner(p[4:])
    if p[0] == "up_blocks":
        b, kind, j = int(p[1]), p[2], int(p[3])
        return f"output_blocks.{b * (lpb + 1) + j}.{0 if kind == 'resnets' else 1}." + inner(p[4:])
    if p[0] == "mid_block":
        i = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(p[1], p[2])]
        return f"middle_block.{i}." + inner(p[3:])
    raise ValueError(module)


def make_loras():
    LORAS.mkdir(parents=True, exist_ok=True)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(FIX / "tiny-sd15", safety_checker=None, dtype=torch.float32)
    unet_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights=False)
    te_cfg = LoraConfig(r=4, lora_alpha=4, target_modules=TE_TARGETS, init_lora_weights=False)
    unet_sd = random_adapter(pipe.unet, unet_cfg, 1)
    te_sd = random_adapter(pipe.text_encoder, te_cfg, 2)
    diffusers.StableDiffusionPipeline.save_lora_weights(LORAS, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd, weight_name="sd15-peft.safetensors",
                                                       unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=te_cfg.to_dict())
    # kohya: another random adapter, its keys renamed as sd-scripts writes them, alpha 2 at rank 4.
    k_unet = random_adapter(pipe.unet, LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS, init_lora_weights=False), 3)
    k_te = random_adapter(pipe.text_encoder, LoraConfig(r=4, lora_alpha=4, target_modules=TE_TARGETS, init_lora_weights=False), 4)
    kohya = {}
    # sd-scripts names CLIP's modules from transformers 4's `text_model.` root.
    for prefix, sd in [("lora_unet_", k_unet), ("lora_te_text_model_", k_te)]:
        for k, v in sd.items():
            module, side = k.rsplit(".lora_", 1)
            flat = prefix + module.replace(".", "_")
            kohya[f"{flat}.lora_{'down' if side.startswith('A') else 'up'}.weight"] = v.contiguous()
            kohya[f"{flat}.alpha"] = torch.tensor(2.0)
    save_file(kohya, LORAS / "sd15-kohya.safetensors")
    print(f"{LORAS}: sd15-peft ({len(unet_sd) + len(te_sd)} keys), sd15-kohya ({len(kohya)} keys)")
    # SDXL: the UNet and both CLIPs; SD3.5: the transformer and both CLIPs; FLUX: the transformer and
    # CLIP (diffusers' LoRA targets there), each diffusers/PEFT with metadata, rank 4, alpha 8.
    for fixture, cls, denoiser, targets, encoders in [
        ("tiny-sdxl", diffusers.StableDiffusionXLPipeline, "unet", UNET_TARGETS, ["text_encoder", "text_encoder_2"]),
        ("tiny-sd35", diffusers.StableDiffusion3Pipeline, "transformer", SD3_TARGETS, ["text_encoder", "text_encoder_2"]),
        ("tiny-flux-dev", diffusers.FluxPipeline, "transformer", FLUX_TARGETS, ["text_encoder"]),
    ]:
        pipe = cls.from_pretrained(FIX / fixture, dtype=torch.float32)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        kw = {f"{denoiser}_lora_layers": random_adapter(getattr(pipe, denoiser), cfg, 5), f"{denoiser}_lora_adapter_metadata": cfg.to_dict()}
        for i, enc in enumerate(encoders):
            ecfg = LoraConfig(r=4, lora_alpha=8, target_modules=TE_TARGETS, init_lora_weights=False)
            kw[f"{enc}_lora_layers"] = random_adapter(getattr(pipe, enc), ecfg, 6 + i)
            kw[f"{enc}_lora_adapter_metadata"] = ecfg.to_dict()
        name = fixture.removeprefix("tiny-").replace("-dev", "")
        cls.save_lora_weights(LORAS, weight_name=f"{name}-peft.safetensors", **kw)
        print(f"{LORAS}/{name}-peft.safetensors")
        if fixture == "tiny-sdxl":
            # kohya's SDXL layout: the UNet in the original (sgm) block names, the CLIPs as lora_te1_/lora_te2_.
            lpb = pipe.unet.config.layers_per_block
            k_unet = random_adapter(pipe.unet, LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS, init_lora_weights=False), 8)
            kohya = {}
            # UNet only: diffusers 0.42.1 with transformers 5 fails on a kohya SDXL file's text-encoder
            # keys (`get_peft_kwargs`: IndexError on an empty rank dict); lora_te_ pairs are covered
            # by the SD 1.5 kohya file.
            parts = [("lora_unet_", k_unet, lambda m: sgm_name(m, lpb))]
            for prefix, sd, rename in parts:
                for k, v in sd.items():
                    module, side = k.rsplit(".lora_", 1)
                    flat = prefix + rename(module).replace(".", "_")
                    kohya[f"{flat}.lora_{'down' if side.startswith('A') else 'up'}.weight"] = v.contiguous()
                    kohya[f"{flat}.alpha"] = torch.tensor(3.0)
            save_file(kohya, LORAS / "sdxl-kohya.safetensors")
            print(f"{LORAS}/sdxl-kohya.safetensors ({len(kohya)} keys)")


def fill_kohya_text_encoder(pipe, path, adapter):
    """diffusers 0.42.1 with transformers 5 creates a kohya file's text-encoder adapter but loads
    none of its weights (transformers' load report lists every `lora_A/B.<adapter>` as MISSING, left
    at PEFT's init: B = 0, no effect): a silently dropped LoRA. The weights are put where diffusers'
    own conversion names them (`lora_te_text_model_<module>` is CLIP's `<module>`), so the reference
    is what diffusers computes once they are loaded."""
    from safetensors.torch import load_file
    sd = load_file(path)
    done = 0
    with torch.no_grad():
        for k, v in sd.items():
            prefix = next((p for p in ("lora_te_", "lora_te1_", "lora_te2_") if k.startswith(p)), None)
            if prefix is None or not k.endswith(".lora_down.weight"):
                continue
            enc = pipe.text_encoder_2 if prefix == "lora_te2_" else pipe.text_encoder
            flat = {name.replace(".", "_"): m for name, m in enc.named_modules()}
            base = k[len(prefix):-len(".lora_down.weight")]
            m = flat.get(base) or flat.get(base.removeprefix("text_model_"))
            assert m is not None and adapter in m.lora_A, k
            assert float(m.scaling[adapter]) == float(sd[k.replace(".lora_down.weight", ".alpha")]) / v.shape[0], (k, m.scaling)
            m.lora_A[adapter].weight.copy_(v)
            m.lora_B[adapter].weight.copy_(sd[k.replace("lora_down", "lora_up")])
            done += 1
    if done == 0:
        return
    print(f"{adapter}: {done} text-encoder pairs loaded by hand (diffusers left them at init)")


CASES = [
    dict(name="sd15-two", base="sd15-euler", adapters={"kohya": ("sd15-kohya.safetensors", 0.7), "style": ("sd15-peft.safetensors", 0.8)}),
    dict(name="sd15-peft", base="sd15-euler", adapters={"style": ("sd15-peft.safetensors", 1.0)}),
    dict(name="sdxl-peft", base="sdxl-euler", adapters={"style": ("sdxl-peft.safetensors", 0.9)}),
    dict(name="sdxl-kohya", base="sdxl-euler", adapters={"kohya": ("sdxl-kohya.safetensors", 1.0)}),
    dict(name="sd35-peft", base="sd35-cfg", adapters={"style": ("sd35-peft.safetensors", 0.9)}),
    dict(name="flux-peft", base="flux-dev", adapters={"style": ("flux-peft.safetensors", 0.9)}),
    # Live (`fuse = false`): PEFT's layers run the branch beside the base layer; `run_scales` are
    # set_adapters weights other than the adapters' own (runner: `run.adapter_scales`).
    dict(name="sd15-two-live", base="sd15-euler", fuse=False, adapters={"kohya": ("sd15-kohya.safetensors", 0.7), "style": ("sd15-peft.safetensors", 0.8)}),
    dict(name="sd15-two-live-scales", base="sd15-euler", fuse=False, run_scales={"kohya": 0.3, "style": 1.2},
         adapters={"kohya": ("sd15-kohya.safetensors", 0.7), "style": ("sd15-peft.safetensors", 0.8)}),
    dict(name="flux-peft-live", base="flux-dev", fuse=False, adapters={"style": ("flux-peft.safetensors", 0.9)}),
]
PIPELINES = {
    "tiny-sd15": (diffusers.StableDiffusionPipeline, ["unet", "text_encoder"]),
    "tiny-sdxl": (diffusers.StableDiffusionXLPipeline, ["unet", "text_encoder", "text_encoder_2"]),
    "tiny-sd35": (diffusers.StableDiffusion3Pipeline, ["transformer", "text_encoder", "text_encoder_2"]),
    "tiny-flux-dev": (diffusers.FluxPipeline, ["transformer", "text_encoder"]),
}


def run_case(c):
    meta = json.loads((OUT / f"{c['base']}.json").read_text())
    name = f"lora-{c['name']}"
    cls, components = PIPELINES[meta["pipeline"]]
    extra = {"safety_checker": None} if meta["pipeline"] == "tiny-sd15" else {}
    pipe = cls.from_pretrained(FIX / meta["pipeline"], dtype=torch.float32, **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, meta["scheduler"]).from_config(meta["scheduler_config"])
    names = sorted(c["adapters"])
    for n in names:
        pipe.load_lora_weights(LORAS, weight_name=c["adapters"][n][0], adapter_name=n)
    for n in names:
        if "kohya" in c["adapters"][n][0]:
            fill_kohya_text_encoder(pipe, LORAS / c["adapters"][n][0], n)
    scales = c.get("run_scales") or {n: c["adapters"][n][1] for n in names}
    pipe.set_adapters(names, [scales[n] for n in names])
    if c.get("fuse", True):
        pipe.fuse_lora(components=components, adapter_names=names)
    rec = {}
    orig_decode = pipe.vae.decode

    def decode(z, *a, **k):
        rec["vae.input"] = z.detach().float().clone()
        return orig_decode(z, *a, **k)
    pipe.vae.decode = decode
    kwargs = dict(prompt=meta["prompt"], negative_prompt=meta.get("negative_prompt"), guidance_scale=meta["guidance_scale"],
                  num_inference_steps=meta["steps"], height=meta["height"], width=meta["width"],
                  generator=torch.Generator("cpu").manual_seed(meta["seed"]), output_type="np")
    if meta["pipeline"] == "tiny-flux-dev":
        kwargs.update(max_sequence_length=meta["max_sequence_length"])
        kwargs.pop("negative_prompt")
    if meta["pipeline"] == "tiny-sd35":
        kwargs.update(max_sequence_length=meta["max_sequence_length"])
    with torch.no_grad():
        out = pipe(**kwargs)
    rec["image"] = torch.from_numpy(np.ascontiguousarray(np.stack(out.images))).to(torch.float32)
    save_file({k: v.contiguous() for k, v in rec.items()}, OUT / f"{name}.safetensors", metadata={"case": name})
    meta.update(case=name, base=c["base"], adapters={n: {"file": f, "scale": s} for n, (f, s) in c["adapters"].items()}, fuse=c.get("fuse", True),
                run_scales=c.get("run_scales"))
    (OUT / f"{name}.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return name


if __name__ == "__main__":
    make_loras()
    for c in CASES:
        print(f"{run_case(c)}: recorded")
