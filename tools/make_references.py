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

Stable Diffusion 3 / 3.5 (tiny-sd3, tiny-sd35; StableDiffusion3Pipeline, FlowMatchEulerDiscreteScheduler),
the same three files per case, tensors named: tokens.prompt.input_ids / input_ids_2 / input_ids_3
(CLIP, CLIP 2, T5; the T5 ids only when T5 runs), the same with tokens.negative. under CFG;
prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds (as
encode_prompt returns them), latents.init (the pipeline's own draw from the seeded generator),
scheduler.timesteps, scheduler.sigmas, step{i}.transformer_input, step{i}.timestep,
step{i}.transformer_output (the whole CFG batch, [negative, positive]), step{i}.noise_pred (after
guidance, as passed to scheduler.step), step{i}.latents (after the step), latents.final (before the
VAE's scale and shift), vae.input (latents.final / scaling_factor + shift_factor), image ([N, H, W, 3] in
[0, 1]); plus each text encoder's outputs (text_encoder{,_2}.{prompt,negative}.penultimate_hidden_state
and .text_embeds, text_encoder_3.{prompt,negative}.last_hidden_state). Also refs/t5-tokenizer.json
(T5TokenizerFast ids on varied strings) and refs/t5-encoder.safetensors (T5EncoderModel hidden states).

FLUX.1 (tiny-flux-dev, tiny-flux-schnell): tools/make_references_flux.py, run at the end;
layerwise casting (cast-*): tools/make_references_cast.py, after it; VAE tiling and slicing:
tools/make_references_vae.py, last.
"""
import json
import os
import unicodedata
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

torch.set_num_threads(1)

from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline)

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
# RUNNER_REFS_OUT: record elsewhere (`make parity` re-records into a temporary folder).
OUT = Path(os.environ["RUNNER_REFS_OUT"]) if os.environ.get("RUNNER_REFS_OUT") else FIX / "refs"

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
        rec["image"] = torch.from_numpy(np.ascontiguousarray(np.stack(out.images))).to(torch.float32)  # [N, H, W, 3]: the whole batch
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
        img = load_file(OUT / f"{case}.safetensors")["image"][0]
        x = (img.permute(2, 0, 1)[None] * 2 - 1).contiguous()
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
        out[f"{name}.input"] = x
        out[f"{name}.mean"] = dist.mean.contiguous()
        out[f"{name}.logvar"] = dist.logvar.contiguous()
    save_file(out, OUT / "vae-encode.safetensors", metadata={"what": "AutoencoderKL.encode(image*2-1).latent_dist of the tiny VAEs"})


LONG_PROMPT = ("a highly detailed photograph of an ancient castle on a hill at sunset, dramatic clouds, golden hour "
               "lighting, volumetric fog, intricate stonework, ivy covered walls, a winding road, horses and carriages, "
               "medieval villagers in colorful clothes, banners waving in the wind, birds flying over the towers, a calm "
               "lake reflecting the sky, mountains in the distance, snow on the peaks, ultra realistic, 8k, sharp focus")

SD3_CASES = [
    # Every case: 1 image, the pipeline's own noise from Generator("cpu").manual_seed(seed).
    dict(case="sd3-cfg", pipeline="tiny-sd3", prompt="a photo of a cat", negative_prompt="", guidance_scale=7.0,
         steps=4, seed=0, width=64, height=64, max_sequence_length=256),
    dict(case="sd3-negative-nonsquare", pipeline="tiny-sd3", prompt="a red car parked on a quiet street",
         prompt_3="A red car, parked on a QUIET street at night; photorealistic, 35mm.",
         negative_prompt="blurry, low quality, watermark", guidance_scale=5.0, steps=4, seed=7, width=64, height=48,
         max_sequence_length=64),
    dict(case="sd3-no-t5", pipeline="tiny-sd3", text_encoder_3=False, prompt="a photo of a cat", negative_prompt="blurry",
         guidance_scale=7.0, steps=3, seed=1, width=64, height=64, max_sequence_length=256),
    dict(case="sd35-cfg", pipeline="tiny-sd35", prompt="a lighthouse on a rocky coast at dawn", negative_prompt="",
         guidance_scale=4.5, steps=4, seed=3, width=64, height=64, max_sequence_length=256),
    # Longer than 77 CLIP tokens and than max_sequence_length T5 tokens: both truncate.
    dict(case="sd3-long-prompt-msl16", pipeline="tiny-sd3", prompt=LONG_PROMPT, negative_prompt="blurry",
         guidance_scale=7.0, steps=2, seed=5, width=64, height=64, max_sequence_length=16),
    # guidance_scale 1: no CFG, no negative branch, a batch of 1 through the transformer.
    dict(case="sd35-noguidance", pipeline="tiny-sd35", prompt="A Photo of a CAT, on a mat!", guidance_scale=1.0,
         steps=3, seed=42, width=48, height=64, max_sequence_length=32),
]


def run_sd3_case(c):
    """StableDiffusion3Pipeline on the CPU in float32, recording the named tensors of the contract."""
    c = {"prompt_2": None, "prompt_3": None, "negative_prompt": None, "negative_prompt_2": None,
         "negative_prompt_3": None, "text_encoder_3": True, **c}
    name, seed, guidance = c["case"], c["seed"], c["guidance_scale"]
    extra = {} if c["text_encoder_3"] else dict(text_encoder_3=None, tokenizer_3=None)
    pipe = StableDiffusion3Pipeline.from_pretrained(FIX / c["pipeline"], dtype=torch.float32, **extra)
    pipe.set_progress_bar_config(disable=True)
    cfg = guidance > 1
    rec = {}

    # Text encoders: the ids they are given and what they return, prompt first, then the negative.
    enc_calls = {n: [] for n in ("text_encoder", "text_encoder_2", "text_encoder_3")}
    hooks = []
    for n, calls in enc_calls.items():
        m = getattr(pipe, n)
        if m is not None:
            hooks.append(m.register_forward_hook(lambda mod, args, out, calls=calls: calls.append((args[0], out))))

    orig_encode = pipe.encode_prompt

    def encode(*a, **k):
        out = orig_encode(*a, **k)
        pe, npe, ppe, nppe = out
        rec["prompt_embeds"], rec["pooled_prompt_embeds"] = f32(pe), f32(ppe)
        if cfg:
            rec["negative_prompt_embeds"], rec["negative_pooled_prompt_embeds"] = f32(npe), f32(nppe)
        return out
    pipe.encode_prompt = encode

    orig_prepare = pipe.prepare_latents

    def prepare(*a, **k):
        lat = orig_prepare(*a, **k)
        drawn = torch.randn(lat.shape, generator=torch.Generator("cpu").manual_seed(seed))
        assert torch.equal(lat, drawn), name  # the first draw of the seeded generator, unscaled
        rec["latents.init"] = f32(lat)
        return lat
    pipe.prepare_latents = prepare

    calls = []

    def transformer_hook(module, args, kwargs, output):
        calls.append((f32(kwargs["hidden_states"]), f32(kwargs["timestep"]), f32(output[0])))
    hooks.append(pipe.transformer.register_forward_hook(transformer_hook, with_kwargs=True))

    steps = []
    orig_step = pipe.scheduler.step

    def step(model_output, timestep, sample, *a, **k):
        out = orig_step(model_output, timestep, sample, *a, **k)
        steps.append((f32(model_output), f32(out[0] if isinstance(out, tuple) else out.prev_sample)))
        return out
    pipe.scheduler.step = step

    orig_decode = pipe.vae.decode

    def decode(z, *a, **k):
        rec["vae.input"] = f32(z)
        return orig_decode(z, *a, **k)
    pipe.vae.decode = decode

    kwargs = dict(prompt=c["prompt"], prompt_2=c["prompt_2"], prompt_3=c["prompt_3"], negative_prompt=c["negative_prompt"],
                  negative_prompt_2=c["negative_prompt_2"], negative_prompt_3=c["negative_prompt_3"],
                  guidance_scale=guidance, num_inference_steps=c["steps"], height=c["height"], width=c["width"],
                  max_sequence_length=c["max_sequence_length"], generator=torch.Generator("cpu").manual_seed(seed),
                  output_type="np")
    with torch.no_grad():
        out = pipe(**kwargs)
    for h in hooks:
        h.remove()

    # Token ids as the text encoders received them, checked against a plain tokenizer call.
    branches = ["prompt", "negative"] if cfg else ["prompt"]
    for n, suffix in (("text_encoder", ""), ("text_encoder_2", "_2"), ("text_encoder_3", "_3")):
        got = enc_calls[n]
        if getattr(pipe, n) is None:
            assert not got
            continue
        assert len(got) == len(branches), (name, n, len(got))
        for branch, (ids, o) in zip(branches, got):
            rec[f"tokens.{branch}.input_ids{suffix}"] = ids[0]
            if n == "text_encoder_3":
                rec[f"{n}.{branch}.last_hidden_state"] = f32(o[0][0])
            else:
                rec[f"{n}.{branch}.penultimate_hidden_state"] = f32(o.hidden_states[-2][0])
                rec[f"{n}.{branch}.text_embeds"] = f32(o.text_embeds[0])
    texts = {"": c["prompt"], "_2": c["prompt_2"] or c["prompt"], "_3": c["prompt_3"] or c["prompt"]}
    neg = c["negative_prompt"] or ""
    ntexts = {"": neg, "_2": c["negative_prompt_2"] or neg, "_3": c["negative_prompt_3"] or neg}
    for suffix, tok in (("", pipe.tokenizer), ("_2", pipe.tokenizer_2), ("_3", pipe.tokenizer_3)):
        if tok is None:
            continue
        n = c["max_sequence_length"] if suffix == "_3" else 77
        for branch, t in (("prompt", texts), ("negative", ntexts))[:len(branches)]:
            want = tok(t[suffix], padding="max_length", max_length=n, truncation=True, add_special_tokens=True).input_ids
            assert rec[f"tokens.{branch}.input_ids{suffix}"].tolist() == want, (name, branch, suffix)

    for i, ((x, t, y), (noise_pred, latents)) in enumerate(zip(calls, steps, strict=True)):
        rec[f"step{i}.transformer_input"] = x
        rec[f"step{i}.timestep"] = t
        rec[f"step{i}.transformer_output"] = y
        rec[f"step{i}.noise_pred"] = noise_pred
        rec[f"step{i}.latents"] = latents
    rec["latents.final"] = steps[-1][1]
    rec["scheduler.timesteps"] = f32(pipe.scheduler.timesteps)
    rec["scheduler.sigmas"] = f32(pipe.scheduler.sigmas)
    rec["image"] = torch.from_numpy(np.ascontiguousarray(np.stack(out.images))).to(torch.float32)  # [N, H, W, 3]: the whole batch
    pipe.numpy_to_pil(out.images)[0].save(OUT / f"{name}.png")

    tensors = {k: (v.to(torch.int64) if k.startswith("tokens.") else v).contiguous().clone() for k, v in rec.items()}
    save_file(tensors, OUT / f"{name}.safetensors", metadata={"case": name})
    config = dict(pipe.scheduler.config)
    config.pop("_use_default_values", None)
    meta = dict(c, scheduler=pipe.scheduler.__class__.__name__, scheduler_config=config, batch=1,
                do_classifier_free_guidance=cfg, transformer_calls=len(calls), vae_scale_factor=pipe.vae_scale_factor,
                latent_shape=list(rec["latents.init"].shape))
    (OUT / f"{name}.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return len(tensors)


T5_TEXTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "Hello, World! How are you?",
    "wow!!! really??? ... ok.",
    "it's a dog's life, isn't it? we'll see",
    "1234567890 3.14159 1,000,000 2nd 21st 100%",
    "version v2.1.0-beta_3 Mixed123abc456",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 fa\u00e7ade",
    unicodedata.normalize("NFD", "caf\u00e9 na\u00efve r\u00e9sum\u00e9 fa\u00e7ade"),
    "\u00c5ngstr\u00f6m \u00d8resund Stra\u00dfe \u00c9COLE",
    "\uff21\uff22\uff23\uff11\uff12\uff13 \ufb01 \ufb00 \u00bd x\u00b2 \u2460 \u2122",
    "\u6771\u4eac\u306e\u591c\u666f\u3001\u7f8e\u3057\u3044\u685c",
    "\u041f\u0440\u0438\u0432\u0435\u0442 \u041c\u0418\u0420",
    "emoji \U0001f600\U0001f3a8 ok \U0001f44d\U0001f3fd",
    "snow \u2603 check \u2713 arrow \u2192",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\r\nand  multiple     spaces",
    "non\u00a0breaking\u2003em space\u200bzero width",
    "a <extra_id_0> b </s> c <pad> d <unk>",
    "",
    " ",
    "\n\t",
    LONG_PROMPT,
]


def t5_tokenizer_refs():
    """transformers' T5TokenizerFast (tiny-sd3/tokenizer_3) as the SD3 pipeline calls it: padding to
    max_length, truncation, </s> appended; each text at several lengths, and at the exact fit and one
    token short of it."""
    from transformers import T5TokenizerFast
    tok = T5TokenizerFast.from_pretrained(FIX / "tiny-sd3" / "tokenizer_3")
    cases = []
    for text in T5_TEXTS:
        full = len(tok(text, add_special_tokens=True).input_ids)
        lengths = [16, 77, 256] + ([full, full - 1] if full > 1 else [])
        for n in dict.fromkeys(lengths):
            ids = tok(text, padding="max_length", max_length=n, truncation=True, add_special_tokens=True).input_ids
            cases.append({"text": text, "max_length": n, "ids": ids})
    doc = {"tokenizer": "tiny-sd3/tokenizer_3", "class": type(tok).__name__,
           "call": "tok(text, padding='max_length', max_length=max_length, truncation=True, add_special_tokens=True)",
           "cases": cases}
    (OUT / "t5-tokenizer.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    return len(cases)


def t5_encoder_refs():
    """T5EncoderModel (tiny-sd3/text_encoder_3, 2 shards) on two padded inputs of 256 tokens, no
    attention mask (as the SD3 pipeline runs it): every relative-position bucket is used."""
    from transformers import T5EncoderModel, T5TokenizerFast
    tok = T5TokenizerFast.from_pretrained(FIX / "tiny-sd3" / "tokenizer_3")
    model = T5EncoderModel.from_pretrained(FIX / "tiny-sd3" / "text_encoder_3", dtype=torch.float32).eval()
    ids = tok(["a photo of a cat", LONG_PROMPT], padding="max_length", max_length=256, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    tensors = {"input_ids": ids.to(torch.int64).contiguous(), "last_hidden_state": f32(out.last_hidden_state)}
    # hidden_states: the embeddings, the input of each further block, and (last) last_hidden_state.
    for i, h in enumerate(out.hidden_states):
        tensors[f"hidden_states.{i}"] = f32(h).clone()
    save_file(tensors, OUT / "t5-encoder.safetensors", metadata={"what": "T5EncoderModel of tiny-sd3/text_encoder_3"})


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        n = run_case(*case)
        print(f"{case[0]}: {n} tensors")
    vae_encode_refs()
    for case in SD3_CASES:
        n = run_sd3_case(case)
        print(f"{case['case']}: {n} tensors")
    print(f"t5-tokenizer: {t5_tokenizer_refs()} cases")
    t5_encoder_refs()
    # FLUX (tiny-flux-dev, tiny-flux-schnell): its own process, as make_fixtures runs the SD3 script.
    import subprocess
    import sys
    subprocess.run([sys.executable, "-B", str(Path(__file__).with_name("make_references_flux.py"))], check=True)
    # Layerwise casting (storage_dtype) on a SD 1.5 and a FLUX case: its own process, after the base cases.
    subprocess.run([sys.executable, "-B", str(Path(__file__).with_name("make_references_cast.py"))], check=True)
    # VAE tiling and slicing (decoder level and tiny-sd15 end to end): its own process too.
    subprocess.run([sys.executable, "-B", str(Path(__file__).with_name("make_references_vae.py"))], check=True)
    total = sum(f.stat().st_size for f in OUT.iterdir())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
