#!/usr/bin/env python3
"""Builds runner's tiny test pipelines with the real diffusers, from configs (no hub access).

    python3 -m venv .venv-fixtures
    .venv-fixtures/bin/pip install -r tools/requirements-fixtures.txt
    .venv-fixtures/bin/pip install --no-deps open_clip_torch==3.3.0   # ships CLIP's BPE vocabulary
    .venv-fixtures/bin/python tools/make_fixtures.py                  # writes tests/fixtures/

Outputs (committed; random weights, deterministic seeds):
  tests/fixtures/tiny-sd15/            StableDiffusionPipeline (CrossAttn/Down/Up blocks, conv
                                       proj, quick_gelu CLIP, safety checker, PNDM)
  tests/fixtures/tiny-sdxl/            StableDiffusionXLPipeline (3 levels, transformer_layers_per_block
                                       (1, 2, 3), linear proj, text_time, two encoders, Euler),
                                       with fp16 variants of unet, vae and text_encoder_2 only
                                       (text_encoder exercises the per-component variant fallback)
  tests/fixtures/tiny-sdxl-unet-sharded/  the SDXL UNet saved with a small max_shard_size
  tests/fixtures/tiny-sd3/, tiny-sd35/ StableDiffusion3Pipeline (SD3 and SD3.5 MMDiT-X transformers, T5,
                                       flow matching): built by tools/make_fixtures_sd3.py
                                       (needs sentencepiece + protobuf, in the requirements)
  tests/fixtures/tiny-flux-dev/, tiny-flux-schnell/  FluxPipeline (FLUX.1-dev and schnell style):
                                       built by tools/make_fixtures_flux.py, run last
  tests/fixtures/versions.json         the exact package versions used
"""
import gzip
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

torch.set_num_threads(1)

from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel,
                          CLIPTextModelWithProjection, CLIPTokenizer)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"

VOCAB_DIR = None
SCALED_LINEAR = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     steps_offset=1, timestep_spacing="leading")


def bytes_to_unicode():
    # CLIP's byte-level alphabet (openai/CLIP simple_tokenizer.py), MIT.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab(dst: Path):
    """vocab.json + merges.txt of the real CLIP BPE (49,408 ids), from open_clip's wheel."""
    spec = importlib.util.find_spec("open_clip")
    bpe = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return dst / "vocab.json", dst / "merges.txt"


def tokenizer(vocab_dir: Path, pad_token: str) -> CLIPTokenizer:
    v, m = vocab_dir / "vocab.json", vocab_dir / "merges.txt"
    return CLIPTokenizer(str(v), str(m), pad_token=pad_token, model_max_length=77)


def write_tokenizer(dst: Path, pad_token: str, shared: Path = None):
    """The tokenizer folder as the real SD 1.5 / SDXL repositories ship it: vocab.json +
    merges.txt + tokenizer_config.json + special_tokens_map.json (transformers 5 would write only
    tokenizer.json). `shared`: link vocab/merges to that folder's copies (keeps fixtures small)."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        if shared is None:
            shutil.copy(VOCAB_DIR / name, dst / name)
        else:
            os.symlink(os.path.relpath(shared / name, dst), dst / name)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
               "unk_token": "<|endoftext|>"}
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
              "tokenizer_class": "CLIPTokenizer", **special}
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (dst / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")


def text_config(hidden: int, act: str, projection_dim: int) -> CLIPTextConfig:
    # Real SD configs keep the legacy eos_token_id = 2, so pooling takes argmax(input_ids).
    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                          num_attention_heads=2, max_position_embeddings=77, hidden_act=act, projection_dim=projection_dim,
                          bos_token_id=0, eos_token_id=2, pad_token_id=1, layer_norm_eps=1e-5)


def vae(scaling_factor: float) -> AutoencoderKL:
    torch.manual_seed(3)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=scaling_factor,
                         force_upcast=True)


def sd15(vocab_dir: Path, dst: Path):
    torch.manual_seed(0)
    te = CLIPTextModel(text_config(8, "quick_gelu", 8)).eval()
    torch.manual_seed(1)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(16, 32), norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=8, attention_head_dim=4, use_linear_projection=False)
    torch.manual_seed(2)
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=77),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        image_size=32, patch_size=8),
                     projection_dim=16)
    checker = StableDiffusionSafetyChecker(cfg).eval()
    fe = CLIPImageProcessor(crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32})
    sched = PNDMScheduler(**SCALED_LINEAR, skip_prk_steps=True, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae(0.18215), text_encoder=te, tokenizer=tokenizer(vocab_dir, "<|endoftext|>"),
                                   unet=unet, scheduler=sched, safety_checker=checker, feature_extractor=fe,
                                   requires_safety_checker=True)
    pipe.save_pretrained(dst, safe_serialization=True)
    write_tokenizer(dst / "tokenizer", "<|endoftext|>")
    # Without torchvision transformers 5 records its PIL fallback class; real SD 1.5 repositories
    # name CLIPImageProcessor (which loads as the same fallback here).
    mi = json.loads((dst / "model_index.json").read_text())
    mi["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (dst / "model_index.json").write_text(json.dumps(mi, indent=2, sort_keys=True) + "\n")
    pc = json.loads((dst / "feature_extractor" / "preprocessor_config.json").read_text())
    pc["image_processor_type"] = "CLIPImageProcessor"
    (dst / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(pc, indent=2, sort_keys=True) + "\n")
    return pipe


def sdxl(vocab_dir: Path, dst: Path, sharded: Path):
    torch.manual_seed(10)
    te = CLIPTextModel(text_config(8, "quick_gelu", 8)).eval()
    torch.manual_seed(11)
    te2 = CLIPTextModelWithProjection(text_config(8, "gelu", 8)).eval()
    torch.manual_seed(12)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(8, 16, 16), norm_num_groups=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                transformer_layers_per_block=(1, 2, 3), attention_head_dim=(2, 2, 4),
                                cross_attention_dim=16, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 8)
    sched = EulerDiscreteScheduler(**SCALED_LINEAR, interpolation_type="linear", use_karras_sigmas=False)
    pipe = StableDiffusionXLPipeline(vae=vae(0.13025), text_encoder=te, text_encoder_2=te2,
                                     tokenizer=tokenizer(vocab_dir, "<|endoftext|>"), tokenizer_2=tokenizer(vocab_dir, "!"),
                                     unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(dst, safe_serialization=True)
    shared = OUT / "tiny-sd15" / "tokenizer"
    write_tokenizer(dst / "tokenizer", "<|endoftext|>", shared)
    write_tokenizer(dst / "tokenizer_2", "!", shared)
    # The sharded copy first: the fp16 round trip below rounds the in-memory weights.
    unet.save_pretrained(sharded, safe_serialization=True, max_shard_size="300KB")
    # fp16 variants of some components: weights only (saving rewrites config.json's dtype).
    for name in ("unet", "vae", "text_encoder_2"):
        model = getattr(pipe, name)
        with tempfile.TemporaryDirectory() as tmp:
            model.to(torch.float16).save_pretrained(tmp, variant="fp16", safe_serialization=True)
            model.to(torch.float32)
            for f in Path(tmp).iterdir():
                if ".fp16." in f.name:
                    shutil.copy(f, dst / name / f.name)
    return pipe


def check_loads():
    """The fixtures load in diffusers as saved (tokenizers from vocab.json + merges.txt)."""
    for name, cls in (("tiny-sd15", StableDiffusionPipeline), ("tiny-sdxl", StableDiffusionXLPipeline)):
        pipe = cls.from_pretrained(OUT / name)
        ids = pipe.tokenizer("a photo of a cat").input_ids
        assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], ids
    plain = StableDiffusionXLPipeline.from_pretrained(OUT / "tiny-sdxl")
    fp16 = StableDiffusionXLPipeline.from_pretrained(OUT / "tiny-sdxl", variant="fp16")
    w = lambda m: next(m.parameters()).detach()
    # fp16 files were read for the unet (values rounded) and the plain ones for text_encoder.
    assert torch.equal(w(fp16.unet), w(plain.unet).half().float()) and not torch.equal(w(fp16.unet), w(plain.unet))
    assert torch.equal(w(fp16.text_encoder), w(plain.text_encoder))
    assert fp16.tokenizer_2.pad_token == "!"
    sharded = UNet2DConditionModel.from_pretrained(OUT / "tiny-sdxl-unet-sharded").state_dict()
    single = UNet2DConditionModel.from_pretrained(OUT / "tiny-sdxl" / "unet").state_dict()
    assert all(torch.equal(sharded[k], single[k]) for k in single), "the sharded UNet equals the single file"


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for d in ("tiny-sd15", "tiny-sdxl", "tiny-sdxl-unet-sharded"):
        shutil.rmtree(OUT / d, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        global VOCAB_DIR
        vocab_dir = VOCAB_DIR = Path(tmp)
        clip_vocab(vocab_dir)
        sd15(vocab_dir, OUT / "tiny-sd15")
        sdxl(vocab_dir, OUT / "tiny-sdxl", OUT / "tiny-sdxl-unet-sharded")
    import diffusers, transformers, safetensors, sentencepiece, tokenizers
    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                "safetensors": safetensors.__version__, "python": sys.version.split()[0],
                # the T5 tokenizer of tiny-sd3 / tiny-sd35 (trained by sentencepiece, tokenizer.json by tokenizers)
                "sentencepiece": sentencepiece.__version__, "tokenizers": tokenizers.__version__}
    (OUT / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    check_loads()
    # A process of its own (it imports helpers from this file; no import cycle, no __pycache__).
    import subprocess
    subprocess.run([sys.executable, "-B", str(Path(__file__).with_name("make_fixtures_sd3.py"))], check=True)
    subprocess.run([sys.executable, "-B", str(Path(__file__).with_name("make_fixtures_flux.py"))], check=True)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
