#!/usr/bin/env python3
"""Measures diffusers' peak working (activation) memory on CUDA, to check runner's estimates
(src/plan/memory.rs). Real-size SD 1.5 / SDXL components with random weights, built from
tests/data/shapes/*.json configs directly on the GPU, fp16 unless stated.

    python3 tools/measure_working_memory.py            # on a CUDA machine, prints JSON lines
    python3 tools/measure_working_memory.py --dry-run  # CPU, tiny fixture configs: code path only

Each line: component, shape, measured = max_memory_allocated - memory_allocated before the
forward pass (weights and inputs excluded), and runner's estimate with the same formula; both in
MB and runner's error (estimate / measured - 1), the columns of BENCHMARKS.md's table.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def estimate(kind, cfg, e, b_eff, batch, w, h):
    # Mirrors src/plan/memory.rs working_bytes.
    n = (w // 8) * (h // 8)
    if kind == "unet":
        x = b_eff * n * cfg.get("block_out_channels", [320])[0] * e
        first = (cfg.get("down_block_types") or [""])[0]
        return 20 * x + 72_000_000 if first.startswith("CrossAttn") else 17 * x + 16_000_000
    if kind == "vae":
        return 10 * batch * w * h * cfg.get("block_out_channels", [128])[0] * e
    if kind == "clip":
        hid = cfg.get("hidden_size", 768)
        inter = cfg.get("intermediate_size", 4 * hid)
        layers = cfg.get("num_hidden_layers", 12)
        return b_eff * 77 * e * ((layers + 1) * hid + 4 * hid + inter) * 5 // 4
    return 0


def measure(fn, device):
    if device != "cuda":
        with torch.no_grad():
            fn()
        return 0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    device = "cpu" if a.dry_run else "cuda"
    shapes = {p: json.loads((ROOT / "tests/data/shapes" / f"{p}.json").read_text())["components"] for p in ("sd15", "sdxl")}
    if a.dry_run:
        tiny = ROOT / "tests/fixtures"
        for p, d in (("sd15", "tiny-sd15"), ("sdxl", "tiny-sdxl")):
            for c in ("unet", "vae", "text_encoder"):
                shapes[p][c]["config"] = json.loads((tiny / d / c / "config.json").read_text())
            if p == "sdxl":
                shapes[p]["text_encoder_2"]["config"] = json.loads((tiny / d / "text_encoder_2" / "config.json").read_text())
    torch.manual_seed(0)

    def out(**kw):
        # The table's columns: MB (1e6 bytes) and runner's error against the measurement.
        if kw.get("measured"):
            kw.update(measured_mb=round(kw["measured"] / 1e6, 1), estimate_mb=round(kw["estimate"] / 1e6, 1), error=f"{(kw['estimate'] / kw['measured'] - 1) * 100:+.0f}%")
        print(json.dumps(kw), flush=True)

    cases_unet = [("sd15", 512, 2), ("sd15", 768, 2), ("sd15", 512, 4), ("sdxl", 1024, 2), ("sdxl", 768, 2)]
    cases_vae = [("sd15", 512, 1, torch.float16), ("sd15", 512, 1, torch.float32), ("sdxl", 1024, 1, torch.float16), ("sdxl", 1024, 1, torch.float32)]
    if a.dry_run:
        cases_unet = [(p, 64, b) for p, _, b in cases_unet[::3]]
        cases_vae = [(p, 64, b, d) for p, _, b, d in cases_vae[::2]]
    dt = torch.float16 if device == "cuda" else torch.float32
    e = 2 if dt == torch.float16 else 4
    for pipe in ("sd15", "sdxl"):
        cfg = shapes[pipe]["unet"]["config"]
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(cfg).to(dt).eval()
        for p, size, b in [c for c in cases_unet if c[0] == pipe]:
            lat = torch.randn(b, cfg["in_channels"], size // 8, size // 8, device=device, dtype=dt)
            enc = torch.randn(b, 77, cfg["cross_attention_dim"], device=device, dtype=dt)
            kw = {}
            if cfg.get("addition_embed_type") == "text_time":
                pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
                kw["added_cond_kwargs"] = {"text_embeds": torch.randn(b, pooled, device=device, dtype=dt),
                                           "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * b, device=device, dtype=dt)}
            t = torch.tensor([500] * b, device=device)
            m = measure(lambda: unet(lat, t, encoder_hidden_states=enc, **kw), device)
            out(component=f"{pipe}.unet", size=size, batch_eff=b, measured=m, estimate=estimate("unet", cfg, e, b, b, size, size))
        del unet
        if device == "cuda":
            torch.cuda.empty_cache()
        vcfg = shapes[pipe]["vae"]["config"]
        for p, size, b, vdt in [c for c in cases_vae if c[0] == pipe]:
            vdt = vdt if device == "cuda" else torch.float32
            with torch.device(device):
                vae = AutoencoderKL.from_config(vcfg).to(vdt).eval()
            z = torch.randn(b, vcfg["latent_channels"], size // 8, size // 8, device=device, dtype=vdt)
            m = measure(lambda: vae.decode(z), device)
            ve = 2 if vdt == torch.float16 else 4
            out(component=f"{pipe}.vae.decode", size=size, batch=b, dtype=str(vdt), measured=m, estimate=estimate("vae", vcfg, ve, b, b, size, size))
            del vae
            if device == "cuda":
                torch.cuda.empty_cache()
        for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if name not in shapes[pipe]:
                continue
            tcfg = shapes[pipe][name]["config"]
            with torch.device(device):
                te = cls(CLIPTextConfig(**tcfg)).to(dt).eval()
            ids = torch.randint(0, 49407, (2, 77), device=device)
            m = measure(lambda: te(ids, output_hidden_states=True), device)
            out(component=f"{pipe}.{name}", batch_eff=2, measured=m, estimate=estimate("clip", tcfg, e, 2, 1, 0, 0))
            del te
    if device == "cuda":
        out(device=torch.cuda.get_device_name(0), torch=torch.__version__)


if __name__ == "__main__":
    sys.exit(main())
