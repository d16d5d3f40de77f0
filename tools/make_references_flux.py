#!/usr/bin/env python3
"""Records diffusers' FluxPipeline outputs on tiny-flux-dev / tiny-flux-schnell, for runner's parity tests.

    .venv-fixtures/bin/python tools/make_references.py        # all references, this script included (last)
    .venv-fixtures/bin/python tools/make_references_flux.py   # only these

Per case, tests/fixtures/refs/<case>.{safetensors,json,png}; tensors named like `runner run --dump`:
tokens.prompt.input_ids (CLIP), tokens.prompt.input_ids_2 (T5), prompt_embeds (T5 states),
pooled_prompt_embeds (CLIP's pooler output), text_ids, latent_image_ids, latents.init (packed, as the
pipeline holds it), scheduler.timesteps, scheduler.sigmas, step{i}.transformer_input, step{i}.timestep
(as the transformer receives it: t rounded to the latents' dtype, / 1000), step{i}.guidance (dev),
step{i}.transformer_output (the conditional pass), step{i}.noise_pred (after true CFG, as passed to
scheduler.step), step{i}.latents (packed), latents.final (packed, before unpacking), vae.input (unpacked,
/ scaling_factor + shift_factor), image ([N, H, W, 3] in [0, 1]). With true CFG also tokens.negative.*,
negative_prompt_embeds, negative_pooled_prompt_embeds, step{i}.negative_transformer_output.

Also refs/flux-transformer.safetensors: FluxTransformer2DModel alone (dev and schnell) on random inputs of
batch 2 with non-zero text ids, for the model's unit test.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

torch.set_num_threads(1)

from diffusers import FluxPipeline, FluxTransformer2DModel

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
# RUNNER_REFS_OUT: record elsewhere (`make parity` re-records into a temporary folder).
OUT = Path(os.environ["RUNNER_REFS_OUT"]) if os.environ.get("RUNNER_REFS_OUT") else FIX / "refs"

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_references import LONG_PROMPT  # noqa: E402

CASES = [
    # Every case: 1 image, the pipeline's own noise from Generator("cpu").manual_seed(seed).
    dict(case="flux-dev", pipeline="tiny-flux-dev", prompt="a photo of a cat", guidance_scale=3.5, steps=4, seed=0,
         width=64, height=64, max_sequence_length=512),
    dict(case="flux-schnell-nonsquare", pipeline="tiny-flux-schnell", prompt="a red car parked on a quiet street",
         prompt_2="A red car, parked on a QUIET street at night; photorealistic, 35mm.", guidance_scale=0.0, steps=4,
         seed=7, width=64, height=48, max_sequence_length=256),
    dict(case="flux-dev-true-cfg", pipeline="tiny-flux-dev", prompt="a lighthouse on a rocky coast at dawn",
         negative_prompt="blurry, low quality", true_cfg_scale=4.0, guidance_scale=3.5, steps=3, seed=3, width=48,
         height=64, max_sequence_length=64),
    # Longer than 77 CLIP tokens and than max_sequence_length T5 tokens: both truncate.
    dict(case="flux-dev-long-prompt-msl16", pipeline="tiny-flux-dev", prompt=LONG_PROMPT, guidance_scale=5.0, steps=2,
         seed=5, width=64, height=64, max_sequence_length=16),
]


def f32(t):
    return t.detach().to(torch.float32).contiguous().cpu()


def run_case(c):
    c = {"prompt_2": None, "negative_prompt": None, "negative_prompt_2": None, "true_cfg_scale": 1.0, **c}
    name, seed = c["case"], c["seed"]
    pipe = FluxPipeline.from_pretrained(FIX / c["pipeline"], dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    true_cfg = c["true_cfg_scale"] > 1 and c["negative_prompt"] is not None
    rec = {}

    enc_calls = {n: [] for n in ("text_encoder", "text_encoder_2")}
    hooks = [getattr(pipe, n).register_forward_hook(lambda mod, args, out, calls=calls: calls.append(args[0]))
             for n, calls in enc_calls.items()]

    orig_encode = pipe.encode_prompt
    encodes = []

    def encode(*a, **k):
        out = orig_encode(*a, **k)
        encodes.append(out)
        return out
    pipe.encode_prompt = encode

    orig_prepare = pipe.prepare_latents

    def prepare(batch, channels, height, width, *a, **k):
        lat, ids = orig_prepare(batch, channels, height, width, *a, **k)
        h, w = 2 * (height // 16), 2 * (width // 16)
        drawn = torch.randn((batch, channels, h, w), generator=torch.Generator("cpu").manual_seed(seed))
        assert torch.equal(lat, pipe._pack_latents(drawn, batch, channels, h, w)), name
        rec["latents.init"], rec["latent_image_ids"] = f32(lat), f32(ids)
        return lat, ids
    pipe.prepare_latents = prepare

    calls = []

    def transformer_hook(module, args, kwargs, output):
        g = kwargs.get("guidance")
        calls.append((f32(kwargs["hidden_states"]), f32(kwargs["timestep"]), None if g is None else f32(g), f32(output[0])))
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

    kwargs = dict(prompt=c["prompt"], prompt_2=c["prompt_2"], negative_prompt=c["negative_prompt"],
                  negative_prompt_2=c["negative_prompt_2"], true_cfg_scale=c["true_cfg_scale"],
                  guidance_scale=c["guidance_scale"], num_inference_steps=c["steps"], height=c["height"],
                  width=c["width"], max_sequence_length=c["max_sequence_length"],
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    with torch.no_grad():
        out = pipe(**kwargs)
    for h in hooks:
        h.remove()

    branches = ["prompt", "negative"] if true_cfg else ["prompt"]
    assert len(encodes) == len(branches), (name, len(encodes))
    for branch, (pe, ppe, text_ids) in zip(branches, encodes):
        prefix = "" if branch == "prompt" else "negative_"
        rec[f"{prefix}prompt_embeds"], rec[f"{prefix}pooled_prompt_embeds"] = f32(pe), f32(ppe)
        if branch == "prompt":
            rec["text_ids"] = f32(text_ids)
    for n, suffix in (("text_encoder", ""), ("text_encoder_2", "_2")):
        got = enc_calls[n]
        assert len(got) == len(branches), (name, n, len(got))
        for branch, ids in zip(branches, got):
            rec[f"tokens.{branch}.input_ids{suffix}"] = ids[0]
    texts = {"": c["prompt"], "_2": c["prompt_2"] or c["prompt"]}
    neg = c["negative_prompt"] or ""
    ntexts = {"": neg, "_2": c["negative_prompt_2"] or neg}
    for suffix, tok in (("", pipe.tokenizer), ("_2", pipe.tokenizer_2)):
        n = c["max_sequence_length"] if suffix == "_2" else 77
        for branch, t in (("prompt", texts), ("negative", ntexts))[:len(branches)]:
            want = tok(t[suffix], padding="max_length", max_length=n, truncation=True, add_special_tokens=True).input_ids
            assert rec[f"tokens.{branch}.input_ids{suffix}"].tolist() == want, (name, branch, suffix)

    per_step = 2 if true_cfg else 1
    assert len(calls) == per_step * len(steps), (name, len(calls), len(steps))
    for i, (noise_pred, latents) in enumerate(steps):
        x, t, g, y = calls[per_step * i]
        rec[f"step{i}.transformer_input"] = x
        rec[f"step{i}.timestep"] = t
        if g is not None:
            rec[f"step{i}.guidance"] = g
        rec[f"step{i}.transformer_output"] = y
        if true_cfg:
            rec[f"step{i}.negative_transformer_output"] = calls[per_step * i + 1][3]
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
    meta = dict(c, scheduler=pipe.scheduler.__class__.__name__, scheduler_config=config, batch=1, true_cfg=true_cfg,
                transformer_calls=len(calls), vae_scale_factor=pipe.vae_scale_factor,
                latent_shape=list(rec["latents.init"].shape),
                guidance_embeds=bool(pipe.transformer.config.guidance_embeds))
    (OUT / f"{name}.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return len(tensors)


def transformer_refs():
    """The transformer alone: batch 2, a 3x4 image grid, 7 text tokens with non-zero ids (the pipeline's
    are zeros; the rotary embedding must not rely on that), two timesteps and guidance values."""
    tensors = {}
    for name in ("tiny-flux-dev", "tiny-flux-schnell"):
        model = FluxTransformer2DModel.from_pretrained(FIX / name / "transformer", dtype=torch.float32).eval()
        cfg = model.config
        g = torch.Generator().manual_seed(11)
        hidden = torch.randn(2, 12, cfg.in_channels, generator=g)
        context = torch.randn(2, 7, cfg.joint_attention_dim, generator=g)
        pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g)
        timestep = torch.tensor([0.25, 0.875])
        guidance = torch.tensor([3.5, 1.0]) if cfg.guidance_embeds else None
        txt_ids = torch.stack([torch.arange(7.0), torch.arange(7.0) * 0.5, -torch.arange(7.0)], -1)
        img_ids = torch.zeros(3, 4, 3)
        img_ids[..., 1] += torch.arange(3.0)[:, None]
        img_ids[..., 2] += torch.arange(4.0)[None, :]
        img_ids = img_ids.reshape(12, 3)
        with torch.no_grad():
            out = model(hidden_states=hidden, encoder_hidden_states=context, pooled_projections=pooled,
                        timestep=timestep, guidance=guidance, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        p = name.removeprefix("tiny-")
        tensors.update({f"{p}.hidden_states": hidden, f"{p}.encoder_hidden_states": context,
                        f"{p}.pooled_projections": pooled, f"{p}.timestep": timestep, f"{p}.txt_ids": txt_ids,
                        f"{p}.img_ids": img_ids, f"{p}.output": f32(out)})
        if guidance is not None:
            tensors[f"{p}.guidance"] = guidance
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "flux-transformer.safetensors",
              metadata={"what": "FluxTransformer2DModel of tiny-flux-dev and tiny-flux-schnell"})


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        print(f"{case['case']}: {run_case(case)} tensors")
    transformer_refs()


if __name__ == "__main__":
    main()
