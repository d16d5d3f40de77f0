#!/usr/bin/env python3
"""Records diffusers' own scheduler schedules and steps for configurations the pipeline references
(tools/make_references.py) do not cover: spacings, steps_offset, v_prediction, Karras sigmas,
solver orders, zero-terminal-SNR rescaling, flow-matching shifts (static, and dynamic with the
pipeline's `mu`), ... for runner's scheduler tests.

    .venv-fixtures/bin/python tools/make_scheduler_refs.py

LMSDiscreteScheduler needs scipy, which the fixtures environment does not pin: its cases are
recorded only where scipy imports (e.g. `PYTHONPATH=<dir with scipy> .venv-fixtures/bin/python ...`),
and kept from the existing file otherwise.

Writes tests/fixtures/refs/schedulers.json: {"diffusers": version, "cases": [...]}, each case with
the config runner builds from (`config`, and `kind` when built as `X.from_config(config)`), `steps`,
diffusers' `timesteps`, `sigmas` (or null), `init_noise_sigma`, `alphas_cumprod` at `ac_index`
(flow matching has neither: 1.0 and none, as its pipelines draw the latents unscaled), `mu` (passed
to `set_timesteps` when not null),
and a replay of the pipeline loop on a [1, 4, 2, 2] sample: `seed` (the CPU generator that draws
the initial latents and any scheduler noise), `latents_init` (the unscaled draw), per step the
scaled model input, the model output fed to `step` (drawn from a second generator) and the sample
`step` returns. float32 values are written with 9 significant digits (read them back as float32).
"""
import inspect
import json
import os
from pathlib import Path

import torch

torch.set_num_threads(1)

import diffusers
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler)

ROOT = Path(__file__).resolve().parent.parent
# RUNNER_REFS_OUT: record elsewhere (`make parity` re-records into a temporary folder).
OUT = (Path(os.environ["RUNNER_REFS_OUT"]) if os.environ.get("RUNNER_REFS_OUT") else ROOT / "tests" / "fixtures" / "refs") / "schedulers.json"

try:
    import scipy  # noqa: F401
    from diffusers import LMSDiscreteScheduler
except ImportError:
    LMSDiscreteScheduler = None

# Stable Diffusion 1.5's scheduler_config.json (the tiny fixture's).
SD = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
}
# runner kind -> (class name, extra from_config kwargs), as runner's `build` applies them.
KINDS = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "flow-match-euler": ("FlowMatchEulerDiscreteScheduler", {}),
}


def sd(cls, **kw):
    return {**SD, "_class_name": cls, **kw}


FLOW = "FlowMatchEulerDiscreteScheduler"
# Stable Diffusion 3 / 3.5's scheduler_config.json (the tiny fixtures').
SD3 = {
    "_class_name": FLOW, "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 4096,
    "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0, "shift_terminal": None, "stochastic_sampling": False,
    "time_shift_type": "exponential", "use_beta_sigmas": False, "use_dynamic_shifting": False,
    "use_exponential_sigmas": False, "use_karras_sigmas": False,
}
# FLUX.1's (resolution-dependent shifting: the pipeline passes `mu`).
FLUX = {"_class_name": FLOW, "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
        "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}


def flow(**kw):
    return {**SD3, **kw}


def calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    # diffusers' pipeline_stable_diffusion_3.calculate_shift
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


PNDM, DDIM, EULER, EULER_A, DPM, LMS = ("PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                                        "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                                        "LMSDiscreteScheduler")
ZSNR = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")

# name, config, kind (None: build from the config's own class), steps
CASES = [
    ("pndm-sd15-4", SD, None, 4),
    ("pndm-sd15-1", SD, None, 1),
    ("pndm-sd15-2", SD, None, 2),
    ("pndm-sd15-7", SD, None, 7),
    ("pndm-linspace-6", sd(PNDM, timestep_spacing="linspace"), None, 6),
    ("pndm-trailing-6", sd(PNDM, timestep_spacing="trailing"), None, 6),
    ("pndm-trailing-3", sd(PNDM, timestep_spacing="trailing"), None, 3),
    ("pndm-vpred-alpha-one-5", sd(PNDM, prediction_type="v_prediction", set_alpha_to_one=True), None, 5),
    ("pndm-linear-offset0-10", sd(PNDM, beta_schedule="linear", beta_start=0.0001, beta_end=0.02, steps_offset=0), None, 10),
    ("pndm-cosine-5", sd(PNDM, beta_schedule="squaredcos_cap_v2"), None, 5),
    ("ddim-kind-4", SD, "ddim", 4),
    ("ddim-noclip-10", sd(DDIM, clip_sample=False), None, 10),
    ("ddim-zsnr-6", sd(DDIM, clip_sample=False, **ZSNR), None, 6),
    ("ddim-linspace-clip-5", sd(DDIM, timestep_spacing="linspace", clip_sample=True, clip_sample_range=1.5), None, 5),
    ("ddim-defaults-8", {"_class_name": DDIM}, None, 8),
    ("ddim-alpha-one-vpred-3", sd(DDIM, set_alpha_to_one=True, prediction_type="v_prediction", clip_sample=False), None, 3),
    ("euler-kind-4", SD, "euler", 4),
    ("euler-linspace-7", sd(EULER, timestep_spacing="linspace"), None, 7),
    ("euler-trailing-vpred-5", sd(EULER, timestep_spacing="trailing", prediction_type="v_prediction"), None, 5),
    ("euler-karras-6", sd(EULER, use_karras_sigmas=True), None, 6),
    ("euler-karras-minmax-5", sd(EULER, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0, timestep_spacing="linspace"), None, 5),
    ("euler-final-sigma-min-4", sd(EULER, final_sigmas_type="sigma_min"), None, 4),
    ("euler-zsnr-5", sd(EULER, **ZSNR), None, 5),
    ("euler-continuous-vpred-4", sd(EULER, timestep_type="continuous", prediction_type="v_prediction"), None, 4),
    ("euler-cosine-linspace-5", sd(EULER, beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace"), None, 5),
    ("euler-defaults-10", {"_class_name": EULER}, None, 10),
    ("euler-a-kind-4", SD, "euler-ancestral", 4),
    ("euler-a-linspace-6", sd(EULER_A, timestep_spacing="linspace"), None, 6),
    ("euler-a-trailing-vpred-5", sd(EULER_A, timestep_spacing="trailing", prediction_type="v_prediction"), None, 5),
    ("euler-a-zsnr-4", sd(EULER_A, **ZSNR), None, 4),
    ("dpm-kind-4", SD, "dpmpp-2m", 4),
    ("dpm-karras-kind-10", SD, "dpmpp-2m-karras", 10),
    ("dpm-linspace-8", sd(DPM, timestep_spacing="linspace"), None, 8),
    ("dpm-trailing-6", sd(DPM, timestep_spacing="trailing"), None, 6),
    ("dpm-order3-12", sd(DPM, solver_order=3), None, 12),
    ("dpm-order3-20", sd(DPM, solver_order=3), None, 20),
    ("dpm-heun-6", sd(DPM, solver_type="heun"), None, 6),
    ("dpm-dpmsolver-sigma-min-6", sd(DPM, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), None, 6),
    ("dpm-dpmsolver-heun-order3-16", sd(DPM, algorithm_type="dpmsolver", solver_type="heun", solver_order=3,
                                        final_sigmas_type="sigma_min"), None, 16),
    # (without sigma_max, cosine Karras timesteps start 998, 998, ... and diffusers' loop runs past its sigmas)
    ("dpm-karras-cosine-vpred-7", sd(DPM, use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2", sigma_max=80.0,
                                     prediction_type="v_prediction"), None, 7),
    ("dpm-lambda-clipped-no-lof-5", sd(DPM, lambda_min_clipped=-5.1, timestep_spacing="linspace", lower_order_final=False), None, 5),
    ("dpm-euler-at-final-18", sd(DPM, euler_at_final=True, final_sigmas_type="sigma_min", lower_order_final=False), None, 18),
    ("dpm-order1-3", sd(DPM, solver_order=1), None, 3),
    ("dpm-zsnr-6", sd(DPM, **ZSNR), None, 6),
    ("dpm-from-euler-karras-5", sd(EULER, sigma_min=0.05, sigma_max=8.0), "dpmpp-2m-karras", 5),
    ("euler-trained-betas-50-5", sd(EULER, num_train_timesteps=50, trained_betas=[0.001 + 0.004 * i for i in range(50)]), None, 5),
    ("ddim-trained-betas-50-5", sd(DDIM, num_train_timesteps=50, trained_betas=[0.001 + 0.004 * i for i in range(50)],
                                   clip_sample=False), None, 5),
    # keys listed in _use_default_values take the class default (here Euler's "linspace")
    ("euler-use-default-values-5", sd(EULER, _use_default_values=["timestep_spacing"]), None, 5),
    ("lms-kind-4", SD, "lms", 4),
    ("lms-linspace-8", sd(LMS, timestep_spacing="linspace"), None, 8),
    ("lms-karras-6", sd(LMS, use_karras_sigmas=True), None, 6),
    ("lms-trailing-vpred-5", sd(LMS, timestep_spacing="trailing", prediction_type="v_prediction"), None, 5),
    ("flow-sd3-1", SD3, None, 1),
    ("flow-sd3-2", SD3, None, 2),
    ("flow-sd3-4", SD3, None, 4),
    ("flow-sd3-7", SD3, None, 7),
    ("flow-sd3-28", SD3, None, 28),
    ("flow-sd3-50", SD3, None, 50),
    ("flow-kind-4", SD3, "flow-match-euler", 4),
    ("flow-defaults-6", {"_class_name": FLOW}, None, 6),
    # a shift float32 cannot hold: __init__ shifts in float32, set_timesteps in float64
    ("flow-shift-1.7-9", flow(shift=1.7), None, 9),
    ("flow-n500-shift-2.5-13", flow(num_train_timesteps=500, shift=2.5), None, 13),
    ("flow-use-default-values-5", flow(_use_default_values=["shift"]), None, 5),
]

# name, config, kind, steps, mu (StableDiffusion3Pipeline / FluxPipeline: calculate_shift(image_seq_len))
FLOW_MU_CASES = [
    ("flow-dynamic-1024px-28", FLUX, None, 28, calculate_shift(4096)),
    ("flow-dynamic-512px-4", FLUX, None, 4, calculate_shift(1024)),
    ("flow-dynamic-768x512-9", FLUX, None, 9, calculate_shift(1536)),
    ("flow-dynamic-linear-6", {**FLUX, "time_shift_type": "linear"}, None, 6, calculate_shift(1024)),
    ("flow-dynamic-linear-mu-2-5", {**FLUX, "time_shift_type": "linear"}, None, 5, 2.0),
    # mu is ignored without use_dynamic_shifting
    ("flow-sd3-mu-ignored-4", SD3, None, 4, 0.9),
]


def floats(t):
    # 9 significant digits identify a float32 (to 0.03 ulp, so parsing to a double and rounding
    # to float32 gives it back), at half the length of the exact double.
    return [float(f"{x:.9g}") for x in torch.as_tensor(t).detach().to(torch.float32).flatten().tolist()]


def build(config, kind, steps, mu=None):
    if kind:
        name, extra = KINDS[kind]
    else:
        name, extra = config["_class_name"], {}
    cls = getattr(diffusers, name)
    sched = cls.from_config(dict(config), **extra)
    sched.set_timesteps(steps, **({} if mu is None else {"mu": mu}))
    return sched


def record(name, config, kind, steps, seed, mu=None):
    sched = build(config, kind, steps, mu)
    # Flow matching has no alphas_cumprod, init_noise_sigma nor scale_model_input.
    is_flow = not hasattr(sched, "alphas_cumprod")
    n = 0 if is_flow else len(sched.alphas_cumprod)
    ac_index = [] if is_flow else sorted(set(list(range(0, n, 37)) + [1, n - 2, n - 1]))
    case = dict(name=name, config=config, kind=kind, steps=steps, class_name=type(sched).__name__,
                timesteps=floats(sched.timesteps),
                sigmas=floats(sched.sigmas) if hasattr(sched, "sigmas") else None,
                init_noise_sigma=1.0 if is_flow else floats(sched.init_noise_sigma)[0],
                ac_index=ac_index, alphas_cumprod=[] if is_flow else floats(sched.alphas_cumprod[ac_index]), seed=seed)
    if mu is not None:
        case["mu"] = mu

    # The pipeline loop (StableDiffusionPipeline.__call__), with a stand-in model.
    gen = torch.Generator("cpu").manual_seed(seed)
    model_gen = torch.Generator("cpu").manual_seed(seed + 1)
    shape = (1, 4, 2, 2)
    drawn = torch.randn(shape, generator=gen)
    latents = drawn * case["init_noise_sigma"]
    params = set(inspect.signature(sched.step).parameters)
    extra = {k: v for k, v in (("eta", 0.0), ("generator", gen)) if k in params}
    steps_rec = []
    for t in sched.timesteps:
        x = latents if is_flow else sched.scale_model_input(latents, t)
        eps = 0.8 * x + 0.3 * torch.randn(shape, generator=model_gen)
        latents = sched.step(eps, t, latents, **extra, return_dict=False)[0]
        steps_rec.append(dict(input=floats(x), model_output=floats(eps), latents=floats(latents)))
    case.update(latents_init=floats(drawn), steps_replay=steps_rec)
    return case


def main():
    old = {}
    if OUT.exists():
        old = {c["name"]: c for c in json.loads(OUT.read_text())["cases"]}
    cases = []
    for seed, (name, config, kind, steps) in enumerate(CASES):
        is_lms = (kind == "lms") or config.get("_class_name") == LMS and kind is None
        if is_lms and LMSDiscreteScheduler is None:
            if name in old:
                cases.append(old[name])
                print(f"{name}: kept (no scipy)")
            else:
                print(f"{name}: skipped (no scipy)")
            continue
        cases.append(record(name, config, kind, steps, seed))
    for seed, (name, config, kind, steps, mu) in enumerate(FLOW_MU_CASES, start=len(CASES)):
        cases.append(record(name, config, kind, steps, seed, mu))
    # One case a line: reviewable diffs, a fraction of the indented size.
    body = ",\n".join(json.dumps(c, separators=(",", ":")) for c in cases)
    OUT.write_text(f'{{"diffusers": {json.dumps(diffusers.__version__)}, "cases": [\n{body}\n]}}\n')
    print(f"wrote {OUT}: {len(cases)} cases ({OUT.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
