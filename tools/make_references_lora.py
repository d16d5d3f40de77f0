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
  flux-kohya.safetensors   kohya sd-scripts FLUX names (bf16, `lora_unet_double_blocks_N_img_attn_qkv`,
                           `single_blocks_N_linear1`, the embedders, the final layer, `lora_te1_` CLIP
                           pairs; alphas 1-3 at rank 4, one pair at rank 8)
  flux-kohya-comfy.safetensors  the same tensors under ComfyUI's names (`diffusion_model.double_blocks.0
                           .img_attn.qkv.lora_down.weight`, `text_encoders.clip_l.transformer.…`)
  flux-xlabs.safetensors   XLabs FLUX names (`double_blocks.N.processor.qkv_lora1.down.weight`…)
  sd15-kohya-ranks.safetensors  kohya SD 1.5 UNet pairs at ranks 4 and 8, no alphas
  sdxl-kohya-te.safetensors     kohya SDXL text-encoder pairs (`lora_te1_`, `lora_te2_`), alpha 2 at rank 4
(`make_more_loras`; `tools/make_references_lora.py --more CASE...` writes these and records only the
named cases). diffusers' kohya FLUX converter hard-codes FLUX.1's widths (`dims=[3072, 3072, 3072,
12288]` for `linear1`): it is run with the tiny transformer's widths put in their place, and the
embedders' and final layer's pairs it names without `transformer.` (which diffusers 0.42.1 then drops
silently) are given the prefix, so that the reference applies every pair of the file, as runner does.
And per case tests/fixtures/refs/lora-<name>.{safetensors,json}: the base case's inputs (its json,
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
            # UNet only (its text-encoder pairs are sdxl-kohya-te.safetensors, written by make_more_loras).
            parts = [("lora_unet_", k_unet, lambda m: sgm_name(m, lpb))]
            for prefix, sd, rename in parts:
                for k, v in sd.items():
                    module, side = k.rsplit(".lora_", 1)
                    flat = prefix + rename(module).replace(".", "_")
                    kohya[f"{flat}.lora_{'down' if side.startswith('A') else 'up'}.weight"] = v.contiguous()
                    kohya[f"{flat}.alpha"] = torch.tensor(3.0)
            save_file(kohya, LORAS / "sdxl-kohya.safetensors")
            print(f"{LORAS}/sdxl-kohya.safetensors ({len(kohya)} keys)")


def kohya_flux_modules(t):
    """The tiny FLUX transformer's LoRA targets in BFL's (original) dotted names: (name, in, out)."""
    out = []
    lin = lambda m: (m.in_features, m.out_features)
    for i, b in enumerate(t.transformer_blocks):
        inner = b.attn.to_q.out_features
        out += [(f"double_blocks.{i}.img_attn.qkv", b.attn.to_q.in_features, 3 * inner), (f"double_blocks.{i}.img_attn.proj", *lin(b.attn.to_out[0])),
                (f"double_blocks.{i}.img_mlp.0", *lin(b.ff.net[0].proj)), (f"double_blocks.{i}.img_mlp.2", *lin(b.ff.net[2])),
                (f"double_blocks.{i}.img_mod.lin", *lin(b.norm1.linear)),
                (f"double_blocks.{i}.txt_attn.qkv", b.attn.add_q_proj.in_features, 3 * inner), (f"double_blocks.{i}.txt_attn.proj", *lin(b.attn.to_add_out)),
                (f"double_blocks.{i}.txt_mlp.0", *lin(b.ff_context.net[0].proj)), (f"double_blocks.{i}.txt_mlp.2", *lin(b.ff_context.net[2])),
                (f"double_blocks.{i}.txt_mod.lin", *lin(b.norm1_context.linear))]
    for i, b in enumerate(t.single_transformer_blocks):
        out += [(f"single_blocks.{i}.linear1", b.attn.to_q.in_features, 3 * b.attn.to_q.out_features + b.proj_mlp.out_features),
                (f"single_blocks.{i}.linear2", *lin(b.proj_out)), (f"single_blocks.{i}.modulation.lin", *lin(b.norm.linear))]
    tte = t.time_text_embed
    out += [("img_in", *lin(t.x_embedder)), ("txt_in", *lin(t.context_embedder)),
            ("time_in.in_layer", *lin(tte.timestep_embedder.linear_1)), ("time_in.out_layer", *lin(tte.timestep_embedder.linear_2)),
            ("vector_in.in_layer", *lin(tte.text_embedder.linear_1)), ("vector_in.out_layer", *lin(tte.text_embedder.linear_2)),
            ("guidance_in.in_layer", *lin(tte.guidance_embedder.linear_1)), ("guidance_in.out_layer", *lin(tte.guidance_embedder.linear_2)),
            ("final_layer.linear", *lin(t.proj_out)), ("final_layer.adaLN_modulation.1", *lin(t.norm_out.linear))]
    return out


def make_more_loras():
    """kohya FLUX (sd-scripts and ComfyUI names), XLabs FLUX, and a kohya SD 1.5 file of mixed ranks
    without alphas."""
    pipe = diffusers.FluxPipeline.from_pretrained(FIX / "tiny-flux-dev", dtype=torch.float32)
    g = torch.Generator().manual_seed(11)
    rnd = lambda *shape, s: (torch.randn(*shape, generator=g) * s)
    sd_scripts, comfy = {}, {}
    for j, (name, fin, fout) in enumerate(kohya_flux_modules(pipe.transformer)):
        r = 8 if name == "double_blocks.1.img_mlp.0" else 4
        alpha = 2.0 if name.endswith("qkv") else 3.0 if name.endswith("linear1") else 16.0 if name.startswith("final_layer") else 1.0
        down, up = rnd(r, fin, s=0.3).to(torch.bfloat16), rnd(fout, r, s=0.05).to(torch.bfloat16)
        a = torch.tensor(alpha, dtype=torch.float32 if j % 5 == 0 else torch.bfloat16)
        for sd, key in [(sd_scripts, "lora_unet_" + name.replace(".", "_")), (comfy, "diffusion_model." + name)]:
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"], sd[f"{key}.alpha"] = down, up, a
    te = pipe.text_encoder
    for i, layer in enumerate(getattr(te, "text_model", te).encoder.layers):
        for mod, m in [("self_attn.q_proj", layer.self_attn.q_proj), ("self_attn.k_proj", layer.self_attn.k_proj), ("self_attn.v_proj", layer.self_attn.v_proj),
                       ("self_attn.out_proj", layer.self_attn.out_proj), ("mlp.fc1", layer.mlp.fc1), ("mlp.fc2", layer.mlp.fc2)]:
            name = f"text_model.encoder.layers.{i}.{mod}"
            down, up = rnd(4, m.in_features, s=0.3).to(torch.bfloat16), rnd(m.out_features, 4, s=0.05).to(torch.bfloat16)
            for sd, key in [(sd_scripts, "lora_te1_" + name.replace(".", "_")), (comfy, "text_encoders.clip_l.transformer." + name)]:
                sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"], sd[f"{key}.alpha"] = down, up, torch.tensor(2.0, dtype=torch.bfloat16)
    save_file(sd_scripts, LORAS / "flux-kohya.safetensors")
    save_file(comfy, LORAS / "flux-kohya-comfy.safetensors")
    xlabs = {}
    t = pipe.transformer
    for i, b in enumerate(t.transformer_blocks):
        inner, dim = b.attn.to_q.out_features, b.attn.to_q.in_features
        for n, fin, fout in [("qkv_lora1", dim, 3 * inner), ("proj_lora1", inner, b.attn.to_out[0].out_features), ("qkv_lora2", dim, 3 * inner), ("proj_lora2", inner, b.attn.to_add_out.out_features)]:
            xlabs[f"double_blocks.{i}.processor.{n}.down.weight"], xlabs[f"double_blocks.{i}.processor.{n}.up.weight"] = rnd(4, fin, s=0.3), rnd(fout, 4, s=0.05)
    for i, b in enumerate(t.single_transformer_blocks):
        inner, dim = b.attn.to_q.out_features, b.attn.to_q.in_features
        for n, fin, fout in [("qkv_lora", dim, 3 * inner), ("proj_lora", b.proj_out.in_features, b.proj_out.out_features)]:
            xlabs[f"single_blocks.{i}.processor.{n}.down.weight"], xlabs[f"single_blocks.{i}.processor.{n}.up.weight"] = rnd(4, fin, s=0.3), rnd(fout, 4, s=0.05)
    save_file(xlabs, LORAS / "flux-xlabs.safetensors")
    sd15 = diffusers.StableDiffusionPipeline.from_pretrained(FIX / "tiny-sd15", safety_checker=None, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=4, rank_pattern={"to_q": 8, "conv1": 8}, target_modules=UNET_TARGETS, init_lora_weights=False)
    kohya = {}
    for k, v in random_adapter(sd15.unet, cfg, 12).items():
        module, side = k.rsplit(".lora_", 1)
        kohya[f"lora_unet_{module.replace('.', '_')}.lora_{'down' if side.startswith('A') else 'up'}.weight"] = v.contiguous()
    save_file(kohya, LORAS / "sd15-kohya-ranks.safetensors")
    # kohya SDXL text-encoder pairs: `lora_te1_` (CLIP-L) and `lora_te2_` (CLIP-G), in sd-scripts'
    # transformers-4 names (`lora_te1_text_model_encoder_layers_0_self_attn_q_proj`), alpha 2 at rank 4.
    sdxl = diffusers.StableDiffusionXLPipeline.from_pretrained(FIX / "tiny-sdxl", dtype=torch.float32)
    te = {}
    for prefix, enc, seed in [("lora_te1_", sdxl.text_encoder, 20), ("lora_te2_", sdxl.text_encoder_2, 21)]:
        for k, v in random_adapter(enc, LoraConfig(r=4, lora_alpha=4, target_modules=TE_TARGETS, init_lora_weights=False), seed).items():
            module, side = k.rsplit(".lora_", 1)
            flat = prefix + ("" if module.startswith("text_model.") else "text_model_") + module.replace(".", "_")
            te[f"{flat}.lora_{'down' if side.startswith('A') else 'up'}.weight"] = v.contiguous()
            te[f"{flat}.alpha"] = torch.tensor(2.0)
    save_file(te, LORAS / "sdxl-kohya-te.safetensors")
    print(f"{LORAS}: flux-kohya ({len(sd_scripts)} keys), flux-kohya-comfy, flux-xlabs ({len(xlabs)} keys), sd15-kohya-ranks ({len(kohya)} keys)")


def patch_kohya_flux_widths(transformer):
    """diffusers' `_convert_kohya_flux_lora_to_diffusers` with FLUX.1's `linear1` widths replaced by
    the tiny transformer's (the only hard-coded size it uses)."""
    import inspect
    import textwrap
    from diffusers.loaders import lora_conversion_utils as lcu, lora_pipeline
    b = transformer.single_transformer_blocks[0]
    inner, mlp = b.attn.to_q.out_features, b.proj_mlp.out_features
    src = textwrap.dedent(inspect.getsource(lcu._convert_kohya_flux_lora_to_diffusers))
    assert "dims=[3072, 3072, 3072, 12288]" in src
    src = src.replace("dims=[3072, 3072, 3072, 12288]", f"dims=[{inner}, {inner}, {inner}, {mlp}]")
    ns = dict(vars(lcu))
    exec(compile(src, lcu.__file__, "exec"), ns)
    convert = ns["_convert_kohya_flux_lora_to_diffusers"]

    def converted(state_dict):
        # diffusers 0.42.1 names the embedders' and the final layer's pairs without the
        # `transformer.` prefix (`x_embedder.lora_A.weight`, `norm_out.linear…`), so that
        # `load_lora_adapter(prefix="transformer")` silently drops them; given the prefix they load.
        out = convert(state_dict)
        return {k if k.startswith(("transformer.", "text_encoder.")) else f"transformer.{k}": v for k, v in out.items()}
    lora_pipeline._convert_kohya_flux_lora_to_diffusers = converted


def fill_kohya_text_encoder(pipe, path, adapter, baked=False):
    """Checks that diffusers loaded a kohya file's text-encoder pairs (with peft 0.21 and transformers
    5 it created the adapter but left every pair at init: B = 0, no effect, a silently dropped LoRA)
    and, for any it left at init, puts the weights where diffusers' own conversion names them
    (`lora_te_text_model_<module>` is CLIP's `<module>`), so the reference is what diffusers
    computes once they are loaded."""
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
            up = sd[k.replace("lora_down", "lora_up")]
            alpha = float(sd[k.replace(".lora_down.weight", ".alpha")])
            if baked:
                # kohya FLUX: alpha / rank baked into A and B as `_convert_kohya_flux_lora_to_diffusers`
                # does for text-encoder pairs; loaded at scaling 1.
                if m.lora_B[adapter].weight.abs().max() > 0:
                    continue
                scale_down, scale_up = alpha / v.shape[0], 1.0
                while scale_down * 2 < scale_up:
                    scale_down *= 2
                    scale_up /= 2
                v, up = v * scale_down, up * scale_up
                assert float(m.scaling[adapter]) == 1.0, (k, m.scaling)
            else:
                assert float(m.scaling[adapter]) == alpha / v.shape[0], (k, m.scaling)
                if m.lora_B[adapter].weight.abs().max() > 0:
                    assert torch.equal(m.lora_B[adapter].weight, up.float()) and torch.equal(m.lora_A[adapter].weight, v.float()), k
                    continue
            m.lora_A[adapter].weight.copy_(v)
            m.lora_B[adapter].weight.copy_(up)
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
MORE_CASES = [
    dict(name="flux-kohya", base="flux-dev", adapters={"kohya": ("flux-kohya.safetensors", 0.8)}),
    dict(name="flux-kohya-live", base="flux-dev", fuse=False, adapters={"kohya": ("flux-kohya.safetensors", 0.8)}),
    dict(name="flux-xlabs", base="flux-dev", adapters={"xlabs": ("flux-xlabs.safetensors", 1.0)}),
    dict(name="sd15-kohya-ranks", base="sd15-euler", adapters={"ranks": ("sd15-kohya-ranks.safetensors", 1.0)}),
    dict(name="sdxl-kohya-te", base="sdxl-euler", adapters={"kohya": ("sdxl-kohya.safetensors", 1.0), "te": ("sdxl-kohya-te.safetensors", 0.7)}),
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
    if meta["pipeline"] == "tiny-flux-dev":
        patch_kohya_flux_widths(pipe.transformer)
    pipe.scheduler = getattr(diffusers, meta["scheduler"]).from_config(meta["scheduler_config"])
    names = sorted(c["adapters"])
    for n in names:
        pipe.load_lora_weights(LORAS, weight_name=c["adapters"][n][0], adapter_name=n)
    for n in names:
        if "kohya" in c["adapters"][n][0]:
            fill_kohya_text_encoder(pipe, LORAS / c["adapters"][n][0], n, baked=meta["pipeline"] == "tiny-flux-dev")
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
    import sys
    if sys.argv[1:2] == ["--more"]:
        make_more_loras()
        wanted = set(sys.argv[2:])
        for c in CASES + MORE_CASES:
            if c["name"] in wanted:
                print(f"{run_case(c)}: recorded")
    else:
        make_loras()
        make_more_loras()
        for c in CASES + MORE_CASES:
            print(f"{run_case(c)}: recorded")
