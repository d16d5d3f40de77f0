#!/usr/bin/env python3
"""Builds runner's tiny Stable Diffusion 3 / 3.5 test pipelines with the real diffusers (no hub access).

    .venv-fixtures/bin/python tools/make_fixtures.py        # all fixtures, this script included
    .venv-fixtures/bin/python tools/make_fixtures_sd3.py    # only these two (after tiny-sd15, tiny-sdxl)

Outputs (committed; random weights, deterministic seeds):
  tests/fixtures/tiny-sd3/    StableDiffusion3Pipeline: SD3Transformer2DModel (2 joint blocks, the last
                              context_pre_only; pos_embed_max_size 24 > the 4x4 / 4x3 patch grids, so
                              the sincos table is cropped), two CLIPTextModelWithProjection of different
                              widths (4, quick_gelu, projection 4->6; and tiny-sdxl's text_encoder_2: 8,
                              gelu, 8->8, linked), a 2-layer gated-gelu T5EncoderModel (d_model 24 > the
                              12 CLIP channels) saved in 2 shards + index, a 16-channel
                              AutoencoderKL without quant convs (scale factor 8, scaling 1.5305, shift
                              0.0609), FlowMatchEulerDiscreteScheduler (shift 3.0), CLIP tokenizers as SD3
                              ships them (tokenizer pads with <|endoftext|>, tokenizer_2 with "!") and a
                              T5 tokenizer (SentencePiece unigram, 1000 pieces + 100 sentinels).
  tests/fixtures/tiny-sd35/   the SD3.5 (MMDiT-X) variant: 3 blocks, qk_norm "rms_norm", dual attention in
                              block 0, the transformer in 2 shards + diffusion_pytorch_model.safetensors
                              .index.json. Every other file that is byte-identical to tiny-sd3's is a
                              relative symlink to it (as tiny-sdxl's tokenizers link to tiny-sd15's).

Every affine norm built here (CLIP and T5 layer norms, the VAE's group norms, the SD3.5 q/k RMSNorms)
gets random weights and biases instead of the default ones and zeros, so that the references see
them (tiny-sdxl's text_encoder_2, reused, keeps its defaults).

The T5 tokenizer is trained here, offline, on Debian's licence texts (/usr/share/common-licenses):
the trainer is deterministic with one thread, and the script checks the corpus' sha256 so that a
different OS cannot silently produce a different spiece.model. The model proto stores no paths
(the trainer reads from an iterator and writes to memory).
"""
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

torch.set_num_threads(1)

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

sys.dont_write_bytecode = True  # no tools/__pycache__ from the import below
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import text_config, write_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"
CLIP_TOKENIZER = OUT / "tiny-sd15" / "tokenizer"  # vocab.json + merges.txt (the real CLIP BPE)

LICENCES = ["Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.3", "GPL-2", "GPL-3", "LGPL-2.1", "MPL-2.0"]
CORPUS_SHA256 = "4e94ae5fcfd407531aa7a988b3ecd5be3d0012b2530900e1d093c4d012497c1f"  # Debian 12's texts
T5_PIECES = 1000

# Widths: CLIP-L / CLIP-bigG stand-ins of different widths (a 49,408-token embedding costs
# 49408 * 4 bytes per channel, so they stay very narrow); their concatenated penultimate states
# (4 + 8 = 12) are zero-padded to T5's d_model (24), which context_embedder maps to 32.
# text_encoder_2 is tiny-sdxl's text_encoder_2 (gelu, width 8, projection 8), linked, not copied.
CLIP1 = dict(hidden=4, act="quick_gelu", proj=6)
CLIP2_FROM = OUT / "tiny-sdxl" / "text_encoder_2"
CLIP2_PROJ = 8
T5 = dict(d_model=24, d_ff=40, d_kv=8, num_heads=4, num_layers=2)
TRANSFORMER = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=T5["d_model"], caption_projection_dim=2 * 16,
                   pooled_projection_dim=CLIP1["proj"] + CLIP2_PROJ, pos_embed_max_size=24)
SD3 = dict(num_layers=2)
SD35 = dict(num_layers=3, qk_norm="rms_norm", dual_attention_layers=(0,))
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # stabilityai/stable-diffusion-3-medium-diffusers


def corpus() -> list:
    text = "".join((Path("/usr/share/common-licenses") / n).read_text(encoding="utf-8") for n in LICENCES)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest != CORPUS_SHA256:
        raise SystemExit(f"the licence corpus differs from the one the committed T5 tokenizer was trained on "
                         f"(sha256 {digest}, expected {CORPUS_SHA256}): spiece.model would change")
    return [line for line in text.splitlines() if line.strip()]


def spiece_model() -> bytes:
    """A T5-style SentencePiece unigram model: <pad>=0, </s>=1, <unk>=2, no <s>, nmt_nfkc."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=buf, model_type="unigram",
                                   vocab_size=T5_PIECES, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
                                   normalization_rule_name="nmt_nfkc", character_coverage=1.0, num_threads=1,
                                   minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    # Nothing machine-specific: no input file, no model prefix.
    assert not proto.trainer_spec.input and not proto.trainer_spec.model_prefix
    return proto.SerializeToString()


def write_t5_tokenizer(dst: Path, model: bytes) -> T5Tokenizer:
    """tokenizer_3 as the real SD3 repositories ship it: spiece.model + tokenizer.json +
    tokenizer_config.json + special_tokens_map.json. tokenizer.json and tokenizer_config.json are
    what transformers' T5Tokenizer (= T5TokenizerFast) writes, saved before any call (a call with
    padding/truncation would be recorded in tokenizer.json)."""
    shutil.rmtree(dst, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(model)
        tok = T5Tokenizer.from_pretrained(tmp, extra_ids=100, model_max_length=512)
    tok.save_pretrained(dst)
    (dst / "spiece.model").write_bytes(model)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    for k in ("is_local", "local_files_only"):  # how it was loaded, not what it is
        config.pop(k, None)
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    plain = lambda s: {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    special = {"additional_special_tokens": [f"<extra_id_{i}>" for i in range(100)], "eos_token": plain("</s>"),
               "pad_token": plain("<pad>"), "unk_token": plain("<unk>")}
    (dst / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")
    assert len(tok) == T5_PIECES + 100 and (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    return tok


def perturb_norms(model: torch.nn.Module, seed: int):
    """Default init leaves every norm's weight at 1 and bias at 0, so a port that skipped them or
    swapped two of them (norm_q / norm_added_q, a T5 layer_norm) would still match: draw them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if "Norm" not in type(m).__name__:
                continue
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(w, torch.nn.Parameter) and w.ndim == 1:
                w.copy_(1 + 0.2 * torch.randn(w.shape, generator=g))
            if isinstance(b, torch.nn.Parameter) and b.ndim == 1:
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


def clip(seed: int, hidden: int, act: str, proj: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    return perturb_norms(CLIPTextModelWithProjection(text_config(hidden, act, proj)).eval(), seed)


def t5_encoder(vocab: int) -> T5EncoderModel:
    torch.manual_seed(22)
    # As the real T5 v1.1 configs: the embedding rounded up past the tokenizer (32128 vs 32100).
    cfg = T5Config(vocab_size=(vocab + 127) // 128 * 128, feed_forward_proj="gated-gelu",
                   relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                   dropout_rate=0.0, tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
                   eos_token_id=1, **T5)
    return perturb_norms(T5EncoderModel(cfg).eval(), 22)


def vae() -> AutoencoderKL:
    torch.manual_seed(23)
    return perturb_norms(AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=1.5305,
                         shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True), 23)


def transformer(seed: int, extra: dict) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return perturb_norms(SD3Transformer2DModel(**TRANSFORMER, **extra).eval(), seed)


def save_sharded(model, dst: Path, max_shard_size: str):
    """Replaces a component's single weights file by shards + index, as save_pretrained writes them."""
    for f in dst.glob("*.safetensors"):
        f.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        names = sorted(os.listdir(tmp))
        assert any(n.endswith(".index.json") for n in names) and sum(n.endswith(".safetensors") for n in names) >= 2, names
        for n in names:
            if n.endswith(".safetensors") or n.endswith(".index.json"):
                shutil.copy(Path(tmp) / n, dst / n)


def pipeline(dst: Path, spiece: bytes, tok3: T5Tokenizer, te, te2, te3, vae_, tr, shard_transformer: bool):
    sched = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    tok = CLIPTokenizer(str(CLIP_TOKENIZER / "vocab.json"), str(CLIP_TOKENIZER / "merges.txt"),
                        pad_token="<|endoftext|>", model_max_length=77)
    tok2 = CLIPTokenizer(str(CLIP_TOKENIZER / "vocab.json"), str(CLIP_TOKENIZER / "merges.txt"),
                         pad_token="!", model_max_length=77)
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=sched, vae=vae_, text_encoder=te, tokenizer=tok,
                                    text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3)
    shutil.rmtree(dst, ignore_errors=True)
    pipe.save_pretrained(dst, safe_serialization=True)
    write_tokenizer(dst / "tokenizer", "<|endoftext|>", CLIP_TOKENIZER)
    write_tokenizer(dst / "tokenizer_2", "!", CLIP_TOKENIZER)
    write_t5_tokenizer(dst / "tokenizer_3", spiece)
    save_sharded(te3, dst / "text_encoder_3", "100KB")
    if shard_transformer:
        save_sharded(tr, dst / "transformer", "300KB")
    # transformers 5 has one T5 tokenizer class; the real repositories name the fast one.
    mi = json.loads((dst / "model_index.json").read_text())
    mi["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
    (dst / "model_index.json").write_text(json.dumps(mi, indent=2, sort_keys=True) + "\n")
    return pipe


def link_duplicates(dst: Path, src: Path, min_size: int = 4096):
    """Replaces each file of dst that is byte-identical to the same path under src (and not tiny)
    by a relative symlink to it."""
    for f in sorted(dst.rglob("*")):
        other = src / f.relative_to(dst)
        if f.is_file() and not f.is_symlink() and other.is_file() and f.stat().st_size >= min_size \
                and f.read_bytes() == other.read_bytes():
            target = os.path.relpath(other.resolve(), f.parent)
            f.unlink()
            os.symlink(target, f)


def check_loads():
    for name in ("tiny-sd3", "tiny-sd35"):
        pipe = StableDiffusion3Pipeline.from_pretrained(OUT / name)
        assert pipe.vae_scale_factor == 8 and pipe.tokenizer_2.pad_token == "!"
        assert type(pipe.tokenizer_3).__name__ == "T5Tokenizer", type(pipe.tokenizer_3)
        ids = pipe.tokenizer("a photo of a cat").input_ids
        assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], ids
        ids3 = pipe.tokenizer_3("a photo of a cat").input_ids
        assert ids3[-1] == 1 and 0 not in ids3, ids3
    a = StableDiffusion3Pipeline.from_pretrained(OUT / "tiny-sd3")
    b = StableDiffusion3Pipeline.from_pretrained(OUT / "tiny-sd35")
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    t = b.transformer
    assert t.config.qk_norm == "rms_norm" and list(t.config.dual_attention_layers) == [0]
    assert t.transformer_blocks[0].attn2 is not None and t.transformer_blocks[-1].context_pre_only
    assert a.transformer.transformer_blocks[-1].context_pre_only


def main():
    assert (CLIP_TOKENIZER / "vocab.json").is_file() and CLIP2_FROM.is_dir(), "run tools/make_fixtures.py first"
    spiece = spiece_model()
    with tempfile.TemporaryDirectory() as tmp:
        tok3 = write_t5_tokenizer(Path(tmp) / "t5", spiece)
    te = clip(20, **CLIP1)
    te2 = CLIPTextModelWithProjection.from_pretrained(CLIP2_FROM, dtype=torch.float32).eval()
    assert te2.config.projection_dim == CLIP2_PROJ and te2.config.hidden_size == 8
    te3 = t5_encoder(len(tok3))
    vae_ = vae()
    pipeline(OUT / "tiny-sd3", spiece, tok3, te, te2, te3, vae_, transformer(24, SD3), shard_transformer=False)
    pipeline(OUT / "tiny-sd35", spiece, tok3, te, te2, te3, vae_, transformer(25, SD35), shard_transformer=True)
    link_duplicates(OUT / "tiny-sd3" / "text_encoder_2", CLIP2_FROM)
    assert (OUT / "tiny-sd3" / "text_encoder_2" / "model.safetensors").is_symlink()
    link_duplicates(OUT / "tiny-sd35", OUT / "tiny-sd3")
    check_loads()
    for name in ("tiny-sd3", "tiny-sd35"):
        files = [f for f in (OUT / name).rglob("*") if f.is_file() and not f.is_symlink()]
        print(f"wrote {OUT / name} ({sum(f.stat().st_size for f in files) / 1e6:.2f} MB, symlinks not counted)")


if __name__ == "__main__":
    main()
