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

/// What the working-memory estimate needs of a component's config (read from the typed configs
/// preflight parsed; the planner itself holds no model code).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dims {
    /// `block_out_channels[0]`, and whether the first down block has cross-attention.
    UNet {
        c0: u64,
        attention_first: bool,
    },
    /// `block_out_channels[0]` and `force_upcast`.
    Vae {
        c0: u64,
        force_upcast: bool,
    },
    /// A CLIP text encoder (77 tokens) or the safety checker's vision tower (257 tokens).
    Clip {
        hidden: u64,
        intermediate: u64,
        layers: u64,
        tokens: u64,
        guided: bool,
    },
    None,
}

/// Working memory of one component for a job (bytes).
pub fn working_bytes(dims: &Dims, dtype: Dtype, shape: &RunShape) -> u64 {
    const MB: u64 = 1_000_000;
    let e = dtype.size_bytes();
    let b = shape.batch * if shape.guidance { 2 } else { 1 };
    let n_latent = (shape.width / 8) * (shape.height / 8);
    match *dims {
        Dims::UNet { c0, attention_first } => {
            let x = b * n_latent * c0 * e;
            if attention_first {
                20 * x + 72 * MB
            } else {
                17 * x + 16 * MB
            }
        }
        Dims::Vae { c0, force_upcast } => {
            let e = if force_upcast && dtype != Dtype::Fp32 { 4 } else { e };
            10 * shape.batch * shape.width * shape.height * c0 * e
        }
        Dims::Clip { hidden, intermediate, layers, tokens, guided } => {
            let b = if guided { b } else { shape.batch };
            b * tokens * e * ((layers + 1) * hidden + 4 * hidden + intermediate) * 5 / 4
        }
        Dims::None => 0,
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
        let unet = Dims::UNet { c0: 320, attention_first: false };
        let s = RunShape { width: 1024, height: 1024, batch: 1, guidance: true };
        let x = 2 * 16384 * 320 * 2;
        let w = working_bytes(&unet, Dtype::Fp16, &s);
        assert_eq!(w, 17 * x + 16_000_000);
        let no_cfg = working_bytes(&unet, Dtype::Fp16, &RunShape { guidance: false, ..s });
        assert_eq!(no_cfg, 17 * x / 2 + 16_000_000, "CFG doubles the UNet batch");
        let vae = Dims::Vae { c0: 128, force_upcast: true };
        assert_eq!(working_bytes(&vae, Dtype::Fp16, &s), 10 * 1024 * 1024 * 128 * 4, "force_upcast decodes in fp32");
        assert_eq!(device_weight_bytes(Offload::Group, 100, 5, 20), 40);
        assert_eq!(device_weight_bytes(Offload::Sequential, 100, 5, 20), 5);
        assert_eq!(device_weight_bytes(Offload::Model, 100, 5, 20), 100);
    }
}
