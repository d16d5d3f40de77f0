"""The mid-size random-weight models of the CPU step benches, built with diffusers from the real
configs scaled down (seed 0) and saved as safetensors:
  make_mid.py sdxl-unet DIR    SDXL-shaped UNet: block_out_channels 160/320/640, transformer depth 1/2/4
                               (benches/unet_step.sh, benches/casting.sh)
  make_mid.py sd3 DIR          SD3 medium's transformer: 8 layers, 12 heads x 64, joint_attention_dim 1024
                               (benches/sd3_step.sh, benches/casting.sh)
  make_mid.py flux DIR         FLUX.1-dev's transformer: 4 double + 8 single blocks, 12 heads x 64
                               (benches/flux_step.sh)
Prints the parameter count and the file size."""
import json
import os
import sys

import torch

kind, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
if kind == "sdxl-unet":
    from diffusers import UNet2DConditionModel
    cfg = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "../tests/data/shapes/sdxl.json")))["components"]["unet"]["config"]
    cfg.update(block_out_channels=[160, 320, 640], transformer_layers_per_block=[1, 2, 4], attention_head_dim=[5, 10, 20], cross_attention_dim=1024,
               projection_class_embeddings_input_dim=6 * 256 + 640)
    model = UNet2DConditionModel.from_config(cfg)
elif kind == "sd3":
    from diffusers import SD3Transformer2DModel
    # SD3 medium's transformer config (stabilityai/stable-diffusion-3-medium-diffusers), scaled down.
    model = SD3Transformer2DModel.from_config(dict(sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=8, attention_head_dim=64, num_attention_heads=12,
                                                   joint_attention_dim=1024, caption_projection_dim=768, pooled_projection_dim=1024, pos_embed_max_size=96))
elif kind == "flux":
    from diffusers import FluxTransformer2DModel
    # FLUX.1-dev's transformer config (black-forest-labs/FLUX.1-dev), scaled down.
    model = FluxTransformer2DModel.from_config(dict(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=64, num_attention_heads=12,
                                                    joint_attention_dim=1024, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(8, 28, 28)))
else:
    raise SystemExit(f"unknown model {kind}")
model.save_pretrained(out, safe_serialization=True)
files = [os.path.join(out, f) for f in os.listdir(out) if f.endswith(".safetensors")]
print(f"{kind}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {sum(map(os.path.getsize, files)) / 1e6:.0f} MB of fp32 safetensors in {out}")
