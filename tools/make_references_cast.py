#!/usr/bin/env python3
"""Records diffusers' pipelines with layerwise casting (`enable_layerwise_casting(storage_dtype,
compute_dtype=torch.float32)`) on the tiny fixtures, for runner's `storage_dtype` parity tests.

    .venv-fixtures/bin/python tools/make_references.py        # all references, this script included (last)
    .venv-fixtures/bin/python tools/make_references_cast.py   # only these

Per case, tests/fixtures/refs/cast-<base>.{safetensors,json}: the base case's inputs (its json, recorded by
make_references.py / make_references_flux.py) run again with some components cast; the json adds
`storage_dtype` ({component: "fp8-e4m3" | ...}) and `base`; the tensors are `image` ([N, H, W, 3] in [0, 1])
and `vae.input` (what the VAE decodes: SD's latents / scaling_factor, FLUX's unpacked, scaled and shifted).
"""
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

torch.set_num_threads(1)

import diffusers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
# RUNNER_REFS_OUT: record elsewhere (`make parity` re-records into a temporary folder).
OUT = Path(os.environ["RUNNER_REFS_OUT"]) if os.environ.get("RUNNER_REFS_OUT") else FIX / "refs"

DTYPES = {"fp8-e4m3": torch.float8_e4m3fn, "fp8-e5m2": torch.float8_e5m2, "fp16": torch.float16, "bf16": torch.bfloat16}

CASES = [
    # A UNet pipeline: UNet and VAE cast.
    dict(base="sd15-euler", storage_dtype={"unet": "fp8-e4m3", "vae": "fp8-e4m3"}),
    # A transformer pipeline: the transformer cast.
    dict(base="flux-dev", storage_dtype={"transformer": "fp8-e4m3"}),
]


def run_case(c):
    meta = json.loads((OUT / f"{c['base']}.json").read_text())
    name = f"cast-{c['base']}"
    cls = {"tiny-sd15": diffusers.StableDiffusionPipeline, "tiny-flux-dev": diffusers.FluxPipeline}[meta["pipeline"]]
    pipe = cls.from_pretrained(FIX / meta["pipeline"], dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, meta["scheduler"]).from_config(meta["scheduler_config"])
    for comp, s in c["storage_dtype"].items():
        getattr(pipe, comp).enable_layerwise_casting(storage_dtype=DTYPES[s], compute_dtype=torch.float32)
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
    with torch.no_grad():
        out = pipe(**kwargs)
    rec["image"] = torch.from_numpy(np.ascontiguousarray(np.stack(out.images))).to(torch.float32)  # [N, H, W, 3]: the whole batch
    save_file({k: v.contiguous() for k, v in rec.items()}, OUT / f"{name}.safetensors", metadata={"case": name})
    meta.update(case=name, base=c["base"], storage_dtype=c["storage_dtype"])
    (OUT / f"{name}.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return name


if __name__ == "__main__":
    for c in CASES:
        print(f"{run_case(c)}: recorded")
