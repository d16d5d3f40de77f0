#!/usr/bin/env python3
"""Records diffusers' own outputs on the tiny fixtures, for runner's parity tests.

    .venv-fixtures/bin/python tools/make_references.py      # after tools/make_fixtures.py

Writes tests/fixtures/refs/<case>.safetensors (f32/i64 tensors named like `runner run --dump`:
latents.init, tokens.prompt.input_ids, tokens.negative.input_ids, prompt_embeds,
negative_prompt_embeds, scheduler.timesteps, scheduler.sigmas, step{i}.unet_output,
step{i}.noise_pred, step{i}.latents, latents.final, image; SDXL adds tokens.*.input_ids_2,
pooled_prompt_embeds, negative_pooled_prompt_embeds, unet.added_cond.time_ids,
unet.added_cond.text_embeds; plus text encoder hidden states, alphas_cumprod and the VAE decode
of latents.final before the safety checker), <case>.json (the inputs and scheduler config) and
<case>.png (the image as diffusers' PIL output saves it).
"""
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

torch.set_num_threads(1)

from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline)

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "refs"

SCHEDULERS = {
    "pndm": (PNDMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp-2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp-2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
}

CASES = [
    # name, pipeline, scheduler, prompt, negative, guidance, steps, batch, seed
    ("sd15-pndm", "tiny-sd15", "pndm", "a photo of a cat", "blurry", 7.5, 4, 1, 0),
    ("sd15-euler", "tiny-sd15", "euler", "a photo of a cat", "blurry", 7.5, 4, 1, 0),
    ("sd15-euler-ancestral", "tiny-sd15", "euler-ancestral", "a photo of a cat", "blurry", 7.5, 4, 1, 0),
    ("sd15-ddim", "tiny-sd15", "ddim", "a photo of a cat", "blurry", 7.5, 4, 1, 0),
    ("sd15-dpmpp-2m", "tiny-sd15", "dpmpp-2m", "a photo of a cat", "blurry", 7.5, 4, 1, 0),
    ("sd15-dpmpp-2m-karras", "tiny-sd15", "dpmpp-2m-karras", "a photo of a cat", "blurry", 7.5, 4, 1, 0),
    ("sd15-pndm-noguidance-batch2", "tiny-sd15", "pndm", "A Photo of a CAT, on a mat!", None, 1.0, 3, 2, 42),
    ("sdxl-euler", "tiny-sdxl", None, "a cute dog running on the grass", "blurry", 5.0, 4, 1, 0),
    ("sdxl-euler-noneg", "tiny-sdxl", None, "a cute dog running on the grass", None, 5.0, 4, 1, 0),
]


def f32(t):
    return t.detach().to(torch.float32).contiguous().cpu()


def run_case(name, pipeline, sched_name, prompt, negative, guidance, steps, batch, seed):
    xl = pipeline == "tiny-sdxl"
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    pipe = cls.from_pretrained(FIX / pipeline)
    pipe.set_progress_bar_config(disable=True)
    if sched_name:
        sc, extra = SCHEDULERS[sched_name]
        pipe.scheduler = sc.from_config(pipe.scheduler.config, **extra)
    rec = {}
    size = 64

    # Tokens, as the pipeline tokenizes them.
    def ids(tok, text):
        return torch.tensor(tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids)
    rec["tokens.prompt.input_ids"] = ids(pipe.tokenizer, prompt)
    if negative is not None:
        rec["tokens.negative.input_ids"] = ids(pipe.tokenizer, negative)
    if xl:
        rec["tokens.prompt.input_ids_2"] = ids(pipe.tokenizer_2, prompt)
        if negative is not None:
            rec["tokens.negative.input_ids_2"] = ids(pipe.tokenizer_2, negative)

    # Text encoder internals for the prompt.
    with torch.no_grad():
        out = pipe.text_encoder(rec["tokens.prompt.input_ids"][None], output_hidden_states=True)
        for i, h in enumerate(out.hidden_states):
            rec[f"text_encoder.hidden_states.{i}"] = f32(h[0])
        rec["text_encoder.last_hidden_state"] = f32(out.last_hidden_state[0])
        rec["text_encoder.pooler_output"] = f32(out.pooler_output[0])
        if xl:
            out2 = pipe.text_encoder_2(rec["tokens.prompt.input_ids_2"][None], output_hidden_states=True)
            for i, h in enumerate(out2.hidden_states):
                rec[f"text_encoder_2.hidden_states.{i}"] = f32(h[0])
            rec["text_encoder_2.text_embeds"] = f32(out2.text_embeds[0])

    # Hooks: initial latents, UNet calls, latents after each step.
    orig_prepare = pipe.prepare_latents

    def prepare(*a, **k):
        lat = orig_prepare(*a, **k)
        # The pipeline's draw is the first randn of a CPU generator seeded with `seed`, scaled
        # by init_noise_sigma: record the unscaled draw exactly, and check that claim.
        drawn = torch.randn(lat.shape, generator=torch.Generator("cpu").manual_seed(seed))
        assert torch.equal(lat, drawn * pipe.scheduler.init_noise_sigma), name
        rec["latents.init_scaled"] = f32(lat)
        rec["latents.init"] = f32(drawn)
        return lat
    pipe.prepare_latents = prepare
    calls = []

    def unet_hook(module, args, kwargs, output):
        kw = dict(kwargs)
        names = ["sample", "timestep", "encoder_hidden_states"]
        kw.update({n: v for n, v in zip(names, args)})
        calls.append((kw, output))
    h = pipe.unet.register_forward_hook(unet_hook, with_kwargs=True)

    def on_step(p, i, t, kw):
        rec[f"step{i}.latents"] = f32(kw["latents"])
        return kw

    kwargs = dict(prompt=prompt, negative_prompt=negative, guidance_scale=guidance, num_inference_steps=steps,
                  num_images_per_prompt=batch, height=size, width=size,
                  generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=on_step, output_type="latent")
    with torch.no_grad():
        latents = pipe(**kwargs).images
        h.remove()
        rec["latents.final"] = f32(latents)
        rec["scheduler.timesteps"] = pipe.scheduler.timesteps.to(torch.float32)
        if hasattr(pipe.scheduler, "sigmas"):
            rec["scheduler.sigmas"] = f32(torch.as_tensor(pipe.scheduler.sigmas))
        rec["scheduler.alphas_cumprod"] = f32(pipe.scheduler.alphas_cumprod)
        for i, (kw, output) in enumerate(calls):
            u = output[0] if isinstance(output, tuple) else output.sample
            rec[f"step{i}.unet_input"] = f32(kw["sample"])
            rec[f"step{i}.unet_output"] = f32(u)
            rec[f"step{i}.timestep"] = torch.tensor([float(kw["timestep"])])
            if guidance > 1:
                un, te = u.chunk(2)
                rec[f"step{i}.noise_pred"] = f32(un + guidance * (te - un))
            else:
                rec[f"step{i}.noise_pred"] = f32(u)
            if xl:
                ac = kw["added_cond_kwargs"]
                if i == 0:
                    rec["unet.added_cond.time_ids"] = f32(ac["time_ids"])
                    rec["unet.added_cond.text_embeds"] = f32(ac["text_embeds"])
                    rec["unet.encoder_hidden_states"] = f32(kw["encoder_hidden_states"])
            elif i == 0:
                rec["unet.encoder_hidden_states"] = f32(kw["encoder_hidden_states"])
        # Prompt embeddings exactly as the pipeline built them.
        enc = kw["encoder_hidden_states"]
        if guidance > 1:
            neg, pos = enc.chunk(2)
            rec["negative_prompt_embeds"], rec["prompt_embeds"] = f32(neg), f32(pos)
        else:
            rec["prompt_embeds"] = f32(enc)
        if xl:
            te_ = calls[0][0]["added_cond_kwargs"]["text_embeds"]
            if guidance > 1:
                rec["negative_pooled_prompt_embeds"], rec["pooled_prompt_embeds"] = f32(te_.chunk(2)[0]), f32(te_.chunk(2)[1])
            else:
                rec["pooled_prompt_embeds"] = f32(te_)

        # VAE decode of the final latents (before any safety checker), then the full pipeline image.
        vae = pipe.vae
        dec = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        rec["vae.image"] = f32((dec / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1))
        kwargs.update(output_type="np", generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=None)
        out = pipe(**kwargs)
        rec["image"] = torch.from_numpy(np.ascontiguousarray(out.images[0])).to(torch.float32)
        nsfw = getattr(out, "nsfw_content_detected", None)
        pipe.numpy_to_pil(out.images)[0].save(OUT / f"{name}.png")

    tensors = {k: (v.to(torch.int64) if k.startswith("tokens.") else v).contiguous().clone() for k, v in rec.items()}
    save_file(tensors, OUT / f"{name}.safetensors", metadata={"case": name})
    config = dict(pipe.scheduler.config)
    config.pop("_use_default_values", None)  # a set upstream: its order varies between runs
    meta = dict(case=name, pipeline=pipeline, scheduler=pipe.scheduler.__class__.__name__,
                scheduler_config=config, prompt=prompt, negative_prompt=negative,
                guidance_scale=guidance, steps=steps, batch=batch, seed=seed, width=size, height=size,
                unet_calls=len(calls), nsfw_content_detected=nsfw)
    (OUT / f"{name}.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return len(tensors)


def vae_encode_refs():
    """AutoencoderKL.encode(image * 2 - 1).latent_dist (mean, logvar) of each tiny VAE, on the
    recorded image of a case: references for runner's VAE encoder (image-to-image)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file
    out = {}
    for name, case in (("tiny-sd15", "sd15-pndm"), ("tiny-sdxl", "sdxl-euler")):
        vae = AutoencoderKL.from_pretrained(FIX / name / "vae").eval()
        img = load_file(OUT / f"{case}.safetensors")["image"]
        x = (img.permute(2, 0, 1)[None] * 2 - 1).contiguous()
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
        out[f"{name}.input"] = x
        out[f"{name}.mean"] = dist.mean.contiguous()
        out[f"{name}.logvar"] = dist.logvar.contiguous()
    save_file(out, OUT / "vae-encode.safetensors", metadata={"what": "AutoencoderKL.encode(image*2-1).latent_dist of the tiny VAEs"})


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        n = run_case(*case)
        print(f"{case[0]}: {n} tensors")
    vae_encode_refs()
    total = sum(f.stat().st_size for f in OUT.iterdir())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
