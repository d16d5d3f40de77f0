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
//! (H/8 x W/8), `e` = bytes per element of the compute dtype:
//! - UNet: `b * N * C0 * e * 40` + `b * N * 4 * e` (C0 = `block_out_channels[0]`: the
//!   full-resolution feature maps that dominate; 40 covers the skip connections kept for the up
//!   path plus the transient tensors of the largest block; attention runs through SDPA, linear in N);
//! - VAE decode: `batch * H * W * C0 * e * 6` (C0 = `block_out_channels[0]`, the last decoder
//!   level, at full image resolution; in fp32 when `force_upcast` applies to a half pipeline);
//! - text encoders: `b * 77 * (4 * hidden + intermediate) * e * 2`;
//! - safety checker: `batch * 257 * (4 * hidden + intermediate) * e * 2` (CLIP ViT-L/14).
//!
//! The constants were fitted against diffusers' measured peaks (see BENCHMARKS.md).

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
    let e = dtype.size_bytes();
    let b = shape.batch * if shape.guidance { 2 } else { 1 };
    let n_latent = (shape.width / 8) * (shape.height / 8);
    match class {
        "UNet2DConditionModel" => {
            let c0 = first_channels(config).unwrap_or(320);
            let cin = f(config, "in_channels").unwrap_or(4);
            b * n_latent * c0 * e * 40 + b * n_latent * cin * e * 4
        }
        "AutoencoderKL" => {
            let c0 = first_channels(config).unwrap_or(128);
            let force_upcast = config.get("force_upcast").and_then(|v| v.as_bool()).unwrap_or(true);
            let e = if force_upcast && dtype != Dtype::Fp32 { 4 } else { e };
            shape.batch * shape.width * shape.height * c0 * e * 6
        }
        c if c.starts_with("CLIPTextModel") => {
            let hidden = f(config, "hidden_size").unwrap_or(768);
            let inter = f(config, "intermediate_size").unwrap_or(4 * hidden);
            b * 77 * (4 * hidden + inter) * e * 2
        }
        "StableDiffusionSafetyChecker" => {
            let v = config.get("vision_config").cloned().unwrap_or_default();
            let hidden = f(&v, "hidden_size").unwrap_or(1024);
            let inter = f(&v, "intermediate_size").unwrap_or(4 * hidden);
            shape.batch * 257 * (4 * hidden + inter) * e * 2
        }
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
        let unet = serde_json::json!({"block_out_channels": [320, 640, 1280], "in_channels": 4});
        let s = RunShape { width: 1024, height: 1024, batch: 1, guidance: true };
        let w = working_bytes("UNet2DConditionModel", &unet, Dtype::Fp16, &s);
        assert_eq!(w, 2 * 16384 * 320 * 2 * 40 + 2 * 16384 * 4 * 2 * 4);
        let no_cfg = working_bytes("UNet2DConditionModel", &unet, Dtype::Fp16, &RunShape { guidance: false, ..s });
        assert_eq!(no_cfg * 2, w, "CFG doubles the UNet batch");
        let vae = serde_json::json!({"block_out_channels": [128, 256, 512, 512], "force_upcast": true});
        assert_eq!(working_bytes("AutoencoderKL", &vae, Dtype::Fp16, &s), 1024 * 1024 * 128 * 4 * 6, "force_upcast decodes in fp32");
        assert_eq!(device_weight_bytes(Offload::Group, 100, 5, 20), 40);
        assert_eq!(device_weight_bytes(Offload::Sequential, 100, 5, 20), 5);
        assert_eq!(device_weight_bytes(Offload::Model, 100, 5, 20), 100);
    }
}
