#!/usr/bin/env python3
"""Builds runner's tiny FLUX.1 test pipelines with the real diffusers (no hub access).

    .venv-fixtures/bin/python tools/make_fixtures.py         # all fixtures, this script included (last)
    .venv-fixtures/bin/python tools/make_fixtures_flux.py    # only these two (after tiny-sd3)

Outputs (committed; random weights, deterministic seeds):
  tests/fixtures/tiny-flux-dev/      FluxPipeline as black-forest-labs/FLUX.1-dev ships it:
                                     FluxTransformer2DModel (2 double-stream + 2 single-stream blocks,
                                     2 heads x 16, axes_dims_rope (4, 6, 6), guidance_embeds) saved in 2
                                     shards + diffusion_pytorch_model.safetensors.index.json; a CLIPTextModel
                                     (width 8, no projection: the pooled output is the pooler's); tiny-sd3's
                                     T5 (2 shards + index) and T5 tokenizer as text_encoder_2 / tokenizer_2;
                                     tiny-sd3's 16-channel VAE weights with FLUX's scaling 0.3611 and shift
                                     0.1159; FlowMatchEulerDiscreteScheduler with dynamic shifting (dev's config).
  tests/fixtures/tiny-flux-schnell/  the schnell variant: no guidance embedding, 1 double + 3 single blocks,
                                     the scheduler with shift 1.0 and no dynamic shifting.

Files byte-identical to tiny-sd3's (T5 shards, tokenizer files, VAE weights) or to tiny-flux-dev's are
relative symlinks to them, as the SD3.5 fixture links to SD3's. model_index.json names only the
components the real repositories have (no image_encoder / feature_extractor entries).
"""
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

torch.set_num_threads(1)

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import text_config, write_tokenizer  # noqa: E402
from make_fixtures_sd3 import link_duplicates, perturb_norms, save_sharded  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"
SD3 = OUT / "tiny-sd3"
CLIP_TOKENIZER = OUT / "tiny-sd15" / "tokenizer"

CLIP = dict(hidden=8, act="quick_gelu")
TRANSFORMER = dict(patch_size=1, in_channels=64, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                   pooled_projection_dim=CLIP["hidden"], axes_dims_rope=(4, 6, 6))
DEV = dict(num_layers=2, num_single_layers=2, guidance_embeds=True)
SCHNELL = dict(num_layers=1, num_single_layers=3, guidance_embeds=False)
# black-forest-labs/FLUX.1-dev and FLUX.1-schnell scheduler_config.json
SCHED = dict(num_train_timesteps=1000, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
SCHED_DEV = dict(SCHED, shift=3.0, use_dynamic_shifting=True)
SCHED_SCHNELL = dict(SCHED, shift=1.0, use_dynamic_shifting=False)


def clip() -> CLIPTextModel:
    torch.manual_seed(40)
    return perturb_norms(CLIPTextModel(text_config(CLIP["hidden"], CLIP["act"], CLIP["hidden"])).eval(), 40)


def transformer(seed: int, extra: dict) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return perturb_norms(FluxTransformer2DModel(**TRANSFORMER, **extra).eval(), seed)


def pipeline(dst: Path, te, te2, vae, tr, sched: dict):
    tok = CLIPTokenizer(str(CLIP_TOKENIZER / "vocab.json"), str(CLIP_TOKENIZER / "merges.txt"),
                        pad_token="<|endoftext|>", model_max_length=77)
    tok2 = T5TokenizerFast.from_pretrained(SD3 / "tokenizer_3")
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**sched), vae=vae, text_encoder=te, tokenizer=tok,
                        text_encoder_2=te2, tokenizer_2=tok2, transformer=tr)
    shutil.rmtree(dst, ignore_errors=True)
    pipe.save_pretrained(dst, safe_serialization=True)
    write_tokenizer(dst / "tokenizer", "<|endoftext|>", CLIP_TOKENIZER)
    shutil.rmtree(dst / "tokenizer_2")
    shutil.copytree(SD3 / "tokenizer_3", dst / "tokenizer_2", symlinks=True)
    save_sharded(te2, dst / "text_encoder_2", "100KB")
    save_sharded(tr, dst / "transformer", "350KB")
    mi = json.loads((dst / "model_index.json").read_text())
    for k in ("image_encoder", "feature_extractor"):
        mi.pop(k, None)
    mi["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    (dst / "model_index.json").write_text(json.dumps(mi, indent=2, sort_keys=True) + "\n")


def check_loads():
    dev = FluxPipeline.from_pretrained(OUT / "tiny-flux-dev")
    schnell = FluxPipeline.from_pretrained(OUT / "tiny-flux-schnell")
    for pipe in (dev, schnell):
        assert pipe.vae_scale_factor == 8 and pipe.vae.config.scaling_factor == 0.3611
        ids = pipe.tokenizer("a photo of a cat").input_ids
        assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], ids
        assert pipe.text_encoder.config.hidden_size == pipe.transformer.config.pooled_projection_dim
    assert dev.transformer.config.guidance_embeds and not schnell.transformer.config.guidance_embeds
    assert dev.scheduler.config.use_dynamic_shifting and not schnell.scheduler.config.use_dynamic_shifting
    shards = sorted(p.name for p in (OUT / "tiny-flux-dev" / "transformer").glob("*.safetensors"))
    assert len(shards) == 2, shards
    sd3_t5 = T5EncoderModel.from_pretrained(SD3 / "text_encoder_3").state_dict()
    assert all(torch.equal(sd3_t5[k], v) for k, v in dev.text_encoder_2.state_dict().items())


def main():
    assert (SD3 / "tokenizer_3" / "tokenizer.json").is_file(), "run tools/make_fixtures_sd3.py first"
    te = clip()
    te2 = T5EncoderModel.from_pretrained(SD3 / "text_encoder_3", dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(SD3 / "vae", scaling_factor=0.3611, shift_factor=0.1159).eval()
    pipeline(OUT / "tiny-flux-dev", te, te2, vae, transformer(30, DEV), SCHED_DEV)
    pipeline(OUT / "tiny-flux-schnell", te, te2, vae, transformer(31, SCHNELL), SCHED_SCHNELL)
    for name in ("tiny-flux-dev", "tiny-flux-schnell"):
        link_duplicates(OUT / name / "text_encoder_2", SD3 / "text_encoder_3")
        link_duplicates(OUT / name / "tokenizer_2", SD3 / "tokenizer_3", min_size=0)
        link_duplicates(OUT / name / "tokenizer", OUT / "tiny-sd3" / "tokenizer", min_size=0)
        link_duplicates(OUT / name / "vae", SD3 / "vae")
    link_duplicates(OUT / "tiny-flux-schnell", OUT / "tiny-flux-dev")
    check_loads()
    for name in ("tiny-flux-dev", "tiny-flux-schnell"):
        files = [f for f in (OUT / name).rglob("*") if f.is_file() and not f.is_symlink()]
        print(f"wrote {OUT / name} ({sum(f.stat().st_size for f in files) / 1e6:.2f} MB, symlinks not counted)")


if __name__ == "__main__":
    main()
