//! What a component needs on its device while the pipeline runs: resident weights (by offload
//! mode) and working (activation) memory.
//!
//! Resident weights by offload mode (diffusers' hooks):
//! - `none`: all its weights, for the whole run;
//! - `model`: all its weights, but only while it runs (`enable_model_cpu_offload`: one model at
//!   a time on the device; the host holds every offloaded model);
//! - `sequential`: the largest leaf module (`enable_sequential_cpu_offload` streams leaves);
//! - `group`: twice the largest block group (the running group and the prefetched next one).
//!
//! Working memory (not counted with `--weights-only`, which is diffusers' weights-only view) is
//! an estimate of the activations the component's forward pass holds at its peak, with
//! `b` = batch x 2 when classifier-free guidance runs (guidance > 1), `N` = latent pixels
//! (H/8 x W/8), `e` = bytes per element of the compute dtype, `x = b * N * C0 * e`
//! (C0 = `block_out_channels[0]`, the full-resolution feature maps that dominate):
//! - UNet: `20 x + 72 MB` when the first level has cross-attention (SD 1.5), else
//!   `17 x + 16 MB` (SDXL): the skip connections kept for the up path, the largest block's
//!   transient tensors, and attention through SDPA (linear in N);
//! - VAE decode: `10 * batch * H * W * C0 * e` at full image resolution, in fp32 when
//!   `force_upcast` applies to a half-precision pipeline;
//! - text encoders: `1.25 * b * 77 * e * ((L + 1) * hidden + 4 * hidden + intermediate)`: every
//!   layer's hidden states are kept (for clip-skip and the penultimate layer) plus one layer's
//!   transients;
//! - safety checker: the same for its vision tower (257 tokens).
//!
//! The constants are fitted to diffusers' peaks measured on an H200 (torch 2.11, SDPA, fp16 and
//! fp32; tools/measure_working_memory.py via scripts/gpu-check.sh): every estimate lies
//! between +0% and +17% above the measured peak (see BENCHMARKS.md).

use serde::Serialize;

use crate::manifest::{Dtype, Offload};

/// The shape of the job, for working-memory estimates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RunShape {
    pub width: u64,
    pub height: u64,
    pub batch: u64,
    pub guidance: bool,
}

fn f(cfg: &serde_json::Value, key: &str) -> Option<u64> {
    cfg.get(key).and_then(|v| v.as_u64())
}

fn first_channels(cfg: &serde_json::Value) -> Option<u64> {
    cfg.get("block_out_channels").and_then(|v| v.get(0)).and_then(|v| v.as_u64())
}

/// Working memory of one component for a job (bytes).
pub fn working_bytes(class: &str, config: &serde_json::Value, dtype: Dtype, shape: &RunShape) -> u64 {
    const MB: u64 = 1_000_000;
    let e = dtype.size_bytes();
    let b = shape.batch * if shape.guidance { 2 } else { 1 };
    let n_latent = (shape.width / 8) * (shape.height / 8);
    let clip = |cfg: &serde_json::Value, b: u64, tokens: u64| {
        let hidden = f(cfg, "hidden_size").unwrap_or(768);
        let inter = f(cfg, "intermediate_size").unwrap_or(4 * hidden);
        let layers = f(cfg, "num_hidden_layers").unwrap_or(12);
        b * tokens * e * ((layers + 1) * hidden + 4 * hidden + inter) * 5 / 4
    };
    match class {
        "UNet2DConditionModel" => {
            let c0 = first_channels(config).unwrap_or(320);
            let x = b * n_latent * c0 * e;
            let attention_first = config.get("down_block_types").and_then(|v| v.get(0)).and_then(|v| v.as_str()).is_some_and(|s| s.starts_with("CrossAttn"));
            if attention_first {
                20 * x + 72 * MB
            } else {
                17 * x + 16 * MB
            }
        }
        "AutoencoderKL" => {
            let c0 = first_channels(config).unwrap_or(128);
            let force_upcast = config.get("force_upcast").and_then(|v| v.as_bool()).unwrap_or(true);
            let e = if force_upcast && dtype != Dtype::Fp32 { 4 } else { e };
            10 * shape.batch * shape.width * shape.height * c0 * e
        }
        c if c.starts_with("CLIPTextModel") => clip(config, b, 77),
        "StableDiffusionSafetyChecker" => clip(&config.get("vision_config").cloned().unwrap_or_default(), shape.batch, 257),
        _ => 0,
    }
}

/// Bytes of a component's weights on its device at its peak, by offload mode.
pub fn device_weight_bytes(offload: Offload, bytes: u64, largest_leaf: u64, largest_group: u64) -> u64 {
    match offload {
        Offload::None | Offload::Model => bytes,
        Offload::Sequential => largest_leaf.min(bytes),
        Offload::Group => (2 * largest_group).min(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_memory_scales() {
        let unet = serde_json::json!({"block_out_channels": [320, 640, 1280], "in_channels": 4, "down_block_types": ["DownBlock2D"]});
        let s = RunShape { width: 1024, height: 1024, batch: 1, guidance: true };
        let x = 2 * 16384 * 320 * 2;
        let w = working_bytes("UNet2DConditionModel", &unet, Dtype::Fp16, &s);
        assert_eq!(w, 17 * x + 16_000_000);
        let no_cfg = working_bytes("UNet2DConditionModel", &unet, Dtype::Fp16, &RunShape { guidance: false, ..s });
        assert_eq!(no_cfg, 17 * x / 2 + 16_000_000, "CFG doubles the UNet batch");
        let vae = serde_json::json!({"block_out_channels": [128, 256, 512, 512], "force_upcast": true});
        assert_eq!(working_bytes("AutoencoderKL", &vae, Dtype::Fp16, &s), 10 * 1024 * 1024 * 128 * 4, "force_upcast decodes in fp32");
        assert_eq!(device_weight_bytes(Offload::Group, 100, 5, 20), 40);
        assert_eq!(device_weight_bytes(Offload::Sequential, 100, 5, 20), 5);
        assert_eq!(device_weight_bytes(Offload::Model, 100, 5, 20), 100);
    }
}
