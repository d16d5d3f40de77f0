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
//!   `force_upcast` applies to a half-precision pipeline (SD, SDXL; SD3 never upcasts, whatever
//!   its VAE config says, so the plan does not count it there). With `components.vae.tiling`
//!   and an image larger than the tile (`T` = the config's `sample_size`), the tile's instead:
//!   `10 * batch * T^2 * C0 * e`, plus every decoded tile (`rows * cols * batch * 3 * T^2 * e`,
//!   kept for blending) and the image (`batch * 3 * H * W * e`); with `slicing`, `batch` is 1
//!   there and the decoded images (`batch * 3 * H * W * e`) are added;
//! - text encoders: `1.25 * b * 77 * e * ((L + 1) * hidden + 4 * hidden + intermediate)`: every
//!   layer's hidden states are kept (for clip-skip and the penultimate layer) plus one layer's
//!   transients;
//! - safety checker: the same for its vision tower (257 tokens).
//!
//! The constants are fitted to diffusers' peaks measured on an H200 (torch 2.11, SDPA, fp16 and
//! fp32; tools/measure_working_memory.py via scripts/gpu-check.sh): every estimate lies
//! between +0% and +17% above the measured peak (see BENCHMARKS.md).
//!
//! SD3's and FLUX's transformers and the T5 encoder (below, [`sd3_transformer_bytes`],
//! [`flux_transformer_bytes`], [`t5_bytes`]) are counted from first principles instead: the
//! tensors alive at the peak of one block's forward pass as diffusers and transformers write it,
//! times 5/4 for the caching allocator. They are **not yet fitted to GPU measurements**.

use serde::Serialize;

use crate::manifest::{Dtype, Offload};

/// diffusers' default `max_sequence_length` for SD3's T5 tokens (FLUX's is 512: see
/// [`crate::manifest::PipelineKind::default_max_sequence_length`]).
pub const DEFAULT_MAX_SEQUENCE_LENGTH: u64 = 256;

/// The shape of the job, for working-memory estimates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RunShape {
    pub width: u64,
    pub height: u64,
    pub batch: u64,
    /// Classifier-free guidance: a negative prompt encoded too, and (UNet, SD3) the denoiser's
    /// batch doubled. FLUX: true CFG, whose second pass runs after the first, batch unchanged.
    pub guidance: bool,
    /// SD3, FLUX: the T5 tokens (`run.max_sequence_length`, diffusers' default 256 for SD3, 512
    /// for FLUX); SD3's transformer sees 77 CLIP tokens plus these, FLUX's these alone.
    pub max_sequence_length: u64,
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
    /// `block_out_channels[0]`, `force_upcast`, the tile when `components.vae.tiling` is on
    /// (see [`VaeTile`]), and `components.vae.slicing`.
    Vae {
        c0: u64,
        force_upcast: bool,
        tile: Option<VaeTile>,
        slicing: bool,
    },
    /// A CLIP text encoder (77 tokens) or the safety checker's vision tower (257 tokens).
    Clip {
        hidden: u64,
        intermediate: u64,
        layers: u64,
        tokens: u64,
        guided: bool,
    },
    /// SD3's MMDiT (`SD3Transformer2DModel`): `hidden` = heads x head_dim, the patch size, and
    /// the text states' width (`joint_attention_dim`).
    Sd3Transformer {
        hidden: u64,
        patch: u64,
        joint: u64,
    },
    /// FLUX's transformer (`FluxTransformer2DModel`): `hidden` = heads x head_dim, `head_dim`
    /// (the rotary embedding's width) and the T5 states' width (`joint_attention_dim`).
    FluxTransformer {
        hidden: u64,
        head_dim: u64,
        joint: u64,
    },
    /// A T5 encoder (`T5EncoderModel`): `d_model`, `d_ff`, heads x `d_kv`.
    T5 {
        d_model: u64,
        d_ff: u64,
        heads: u64,
        d_kv: u64,
    },
    None,
}

/// diffusers' VAE tile (`enable_tiling`): `sample` pixels (the config's `sample_size`) from
/// `latent` latents, tiles `3/4` of a tile apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaeTile {
    pub sample: u64,
    pub latent: u64,
}

impl VaeTile {
    /// Tiles along an image side of `pixels` (diffusers' `range(0, latent_side, stride)`), or
    /// None when the whole latent fits one tile (diffusers' `_decode` then decodes it whole).
    fn grid(&self, width: u64, height: u64) -> Option<(u64, u64)> {
        let (lw, lh) = (width * self.latent / self.sample, height * self.latent / self.sample);
        let stride = (self.latent * 3 / 4).max(1);
        (lw > self.latent || lh > self.latent).then(|| (lh.div_ceil(stride), lw.div_ceil(stride)))
    }
}

/// CLIP tokens the SD3 transformer sees before the T5 tokens.
pub const CLIP_TOKENS: u64 = 77;

/// SD3's transformer (`SD3Transformer2DModel`, diffusers' `JointTransformerBlock` with
/// `JointAttnProcessor2_0`, SDPA): `b` images (x2 under guidance), `ni = (H/8/p) x (W/8/p)`
/// image tokens, `nt = 77 + max_sequence_length` text tokens, `n = ni + nt`, `d` = heads x
/// head_dim, `e` bytes per element. In units of `b x d x e`, one block holds at its peak
/// - in the attention: its inputs (`n`, still held by the caller), the AdaLN-modulated norms
///   (`n`), q, k, v concatenated over both streams (`3n`), the text stream's own projections
///   (`3 nt`, still referenced), the attention output laid back out (`n`) and the two output
///   projections (`n`): `7n + 3nt`. SDPA's fused kernels keep no `n x n` scores;
/// - in the image stream's MLP: the inputs (`n`), the gated attention output, the updated
///   residual and its modulated norm (`3 ni`), the 4x projection and its GELU (`8 ni`), and the
///   text stream's attention output and norm (`2 nt`): `12 ni + 3 nt`;
///
/// plus, across the whole loop, the prompt embeddings (`b x nt x joint`) and the AdaLN
/// modulation vectors (`6 d` per stream and image). Times 5/4 for the caching allocator; not
/// yet fitted to GPU measurements.
pub fn sd3_transformer_bytes(hidden: u64, patch: u64, joint: u64, e: u64, shape: &RunShape) -> u64 {
    let b = shape.batch * if shape.guidance { 2 } else { 1 };
    let p = patch.max(1);
    let ni = (shape.height / 8 / p) * (shape.width / 8 / p);
    let nt = CLIP_TOKENS + shape.max_sequence_length;
    let n = ni + nt;
    let block = hidden * (3 * nt + (7 * n).max(12 * ni));
    let around = nt * joint + 12 * hidden;
    b * e * (block + around) * 5 / 4
}

/// FLUX's transformer (`FluxTransformer2DModel`: 19 `FluxTransformerBlock`s, then 38
/// `FluxSingleTransformerBlock`s over the joint sequence; `FluxAttnProcessor`, SDPA). `b` =
/// batch images: true CFG runs the negative prompt as a second pass of the same batch, after the
/// first, so it adds no activations. `ni = (H/16) x (W/16)` image tokens (2x2 packed latent
/// patches), `nt = max_sequence_length` T5 tokens (CLIP gives only the pooled vector), `n = ni +
/// nt`, `d` = heads x head_dim, `e` bytes per element. The rotary embedding (diffusers'
/// `apply_rotary_emb`, on q and k over the joint sequence) computes in fp32: while it rotates
/// one of them it holds its rotated copy and output (`2n` at `e`) and two fp32 products (`2n`
/// at 4 bytes): `R = n d (2e + 8)` bytes. In units of `b x d x e`, a block holds at its peak
/// - double block, attention: its inputs (`n`, held by the caller), the modulated norms (`n`),
///   q, k, v concatenated over both streams (`3n`) and the text stream's own (`3 nt`, still
///   referenced), plus `R` (the SDPA and output phase after it, `7n + 3nt` as SD3's, is less);
/// - double block, image MLP: as SD3's, `12 ni + 3 nt` (MLP ratio 4: the projection and its GELU);
/// - single block: the caller's streams and their concatenation (`2n`), the modulated norm
///   (`n`), the MLP branch (`4n`), q, k, v (`3n`) plus `R`; then at `proj_out` the attention
///   output (`n`), the concatenation of it and the MLP (`5n`), the projection and its gated
///   product (`2n`): `15n` with the above, less the q, k, v freed;
///
/// plus, across the loop, the T5 states (`nt x joint`), the AdaLN vectors (`12 d`) and the
/// rotary tables (cos and sin, `n x head_dim` in fp32). Times 5/4 for the caching allocator;
/// not yet fitted to GPU measurements.
pub fn flux_transformer_bytes(hidden: u64, head_dim: u64, joint: u64, e: u64, shape: &RunShape) -> u64 {
    let b = shape.batch;
    let ni = (shape.height / 16) * (shape.width / 16);
    let nt = shape.max_sequence_length;
    let n = ni + nt;
    let rotary = n * hidden * (2 * e + 8);
    let double = (hidden * e * (5 * n + 3 * nt) + rotary).max(hidden * e * (12 * ni + 3 * nt));
    let single = (hidden * e * 10 * n + rotary).max(hidden * e * 15 * n);
    let around = e * (nt * joint + 12 * hidden) + 2 * n * head_dim * 4;
    b * (double.max(single) + around) * 5 / 4
}

/// The T5 encoder (transformers' `T5EncoderModel`, eager attention; SD3's `text_encoder_3`,
/// FLUX's `text_encoder_2`): `L` =
/// max_sequence_length tokens, `b` prompts (x2 under guidance: diffusers encodes the negative
/// prompt in a second pass, so this also covers the first pass's output held meanwhile),
/// `inner` = heads x d_kv. Per prompt, one block holds at its peak the larger of
/// - the attention: input and norm (`2 d_model`), q, k, v and the context (`4 inner`) per
///   token, and the scores with their softmax (`2 x heads x L x L`);
/// - the gated-GELU feed-forward: input and norm (`2 d_model`), `wi_0`'s output, two of
///   `gelu_new`'s temporaries, its output and `wi_1`'s output (`5 d_ff`) per token; in an fp16
///   model also the product cast to fp32 for the fp32 `wo` and `wo`'s fp32 output;
///
/// plus the encoder's output (`L x d_model`) and the relative position bias shared by the
/// layers (`heads x L x L`). Times 5/4; not yet fitted to GPU measurements.
pub fn t5_bytes(d_model: u64, d_ff: u64, heads: u64, d_kv: u64, dtype: Dtype, shape: &RunShape) -> u64 {
    let e = dtype.size_bytes();
    let b = shape.batch * if shape.guidance { 2 } else { 1 };
    let l = shape.max_sequence_length;
    let attention = l * e * (2 * d_model + 4 * heads * d_kv) + 2 * heads * l * l * e;
    let ff = l * e * (2 * d_model + 5 * d_ff);
    // `_keep_in_fp32_modules`: `wo` stays fp32 in an fp16 model and its input is cast up.
    let ff_fp32_wo = if dtype == Dtype::Fp16 { l * (e * (2 * d_model + 3 * d_ff) + 4 * (d_ff + d_model)) } else { 0 };
    let per_prompt = attention.max(ff).max(ff_fp32_wo) + l * d_model * e;
    (b * per_prompt + heads * l * l * e) * 5 / 4
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
        Dims::Vae { c0, force_upcast, tile, slicing } => {
            let e = if force_upcast && dtype != Dtype::Fp32 { 4 } else { e };
            // Slicing decodes one sample at a time; the decoded images accumulate (3 channels).
            let b = if slicing { 1 } else { shape.batch };
            let images = if slicing { shape.batch * shape.width * shape.height * 3 * e } else { 0 };
            match tile.and_then(|t| t.grid(shape.width, shape.height).map(|g| (t, g))) {
                // Tiled: one tile's activations at a time, every decoded tile kept for blending,
                // and the image they are concatenated into.
                Some((t, (rows, cols))) => {
                    let tile_px = t.sample * t.sample;
                    10 * b * tile_px * c0 * e + rows * cols * b * tile_px * 3 * e + b * shape.width * shape.height * 3 * e + images
                }
                None => 10 * b * shape.width * shape.height * c0 * e + images,
            }
        }
        Dims::Clip { hidden, intermediate, layers, tokens, guided } => {
            let b = if guided { b } else { shape.batch };
            b * tokens * e * ((layers + 1) * hidden + 4 * hidden + intermediate) * 5 / 4
        }
        Dims::Sd3Transformer { hidden, patch, joint } => sd3_transformer_bytes(hidden, patch, joint, e, shape),
        Dims::FluxTransformer { hidden, head_dim, joint } => flux_transformer_bytes(hidden, head_dim, joint, e, shape),
        Dims::T5 { d_model, d_ff, heads, d_kv } => t5_bytes(d_model, d_ff, heads, d_kv, dtype, shape),
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
        let s = RunShape { width: 1024, height: 1024, batch: 1, guidance: true, max_sequence_length: 256 };
        let x = 2 * 16384 * 320 * 2;
        let w = working_bytes(&unet, Dtype::Fp16, &s);
        assert_eq!(w, 17 * x + 16_000_000);
        let no_cfg = working_bytes(&unet, Dtype::Fp16, &RunShape { guidance: false, ..s });
        assert_eq!(no_cfg, 17 * x / 2 + 16_000_000, "CFG doubles the UNet batch");
        let vae = Dims::Vae { c0: 128, force_upcast: true, tile: None, slicing: false };
        assert_eq!(working_bytes(&vae, Dtype::Fp16, &s), 10 * 1024 * 1024 * 128 * 4, "force_upcast decodes in fp32");
        assert_eq!(device_weight_bytes(Offload::Group, 100, 5, 20), 40);
        assert_eq!(device_weight_bytes(Offload::Sequential, 100, 5, 20), 5);
        assert_eq!(device_weight_bytes(Offload::Model, 100, 5, 20), 100);
    }

    #[test]
    fn sd3_working_memory() {
        // SD3-medium at 1024x1024 in fp16 with guidance: 4096 image tokens, 77 + 256 text tokens;
        // the MLP phase (12 x 4096 + 3 x 333 units) beats the attention (7 x 4429 + 3 x 333).
        let s = RunShape { width: 1024, height: 1024, batch: 1, guidance: true, max_sequence_length: 256 };
        let dims = Dims::Sd3Transformer { hidden: 1536, patch: 2, joint: 4096 };
        let units = 12 * 4096 + 3 * 333;
        let want = 2 * 2 * (1536 * units + 333 * 4096 + 12 * 1536) * 5 / 4;
        assert_eq!(working_bytes(&dims, Dtype::Fp16, &s), want);
        assert!((300_000_000..500_000_000).contains(&want), "{want}");
        // Linear in the batch, doubled by guidance; more T5 tokens, more memory.
        assert_eq!(working_bytes(&dims, Dtype::Fp16, &RunShape { guidance: false, ..s }) * 2, want);
        assert!(working_bytes(&dims, Dtype::Fp16, &RunShape { max_sequence_length: 512, ..s }) > want);
        assert_eq!(working_bytes(&dims, Dtype::Fp32, &s), 2 * want);
        // At a tiny size the attention phase dominates: 16 image tokens, 77 + 4 text tokens.
        let tiny = RunShape { width: 64, height: 64, batch: 1, guidance: false, max_sequence_length: 4 };
        let n = 16 + 81;
        assert_eq!(working_bytes(&Dims::Sd3Transformer { hidden: 32, patch: 2, joint: 24 }, Dtype::Fp32, &tiny), 4 * (32 * (3 * 81 + 7 * n) + 81 * 24 + 12 * 32) * 5 / 4);

        // T5-XXL, 256 tokens, guided: fp16 counts the fp32 `wo` path, bf16 does not.
        let t5 = Dims::T5 { d_model: 4096, d_ff: 10240, heads: 64, d_kv: 64 };
        let fp16 = working_bytes(&t5, Dtype::Fp16, &s);
        let bf16 = working_bytes(&t5, Dtype::Bf16, &s);
        assert!(fp16 > bf16 && fp16 < 200_000_000, "{fp16} {bf16}");
        let l = 256;
        let per_prompt = l * (2 * (2 * 4096 + 3 * 10240) + 4 * (10240 + 4096)) + l * 4096 * 2;
        assert_eq!(fp16, (2 * per_prompt + 64 * l * l * 2) * 5 / 4);

        // FLUX.1-dev at 1024x1024 in bf16: 4096 image tokens + 512 T5 tokens; the single
        // block's rotary phase (10n at e + n d (2e + 8)) beats its proj_out phase (15n) and the
        // double block; true CFG (`guidance`) is a second pass, not a larger batch.
        let flux = Dims::FluxTransformer { hidden: 3072, head_dim: 128, joint: 4096 };
        let fs = RunShape { max_sequence_length: 512, guidance: false, ..s };
        let n = 4096 + 512;
        let want = (3072 * 2 * 10 * n + n * 3072 * (2 * 2 + 8) + 2 * (512 * 4096 + 12 * 3072) + 2 * n * 128 * 4) * 5 / 4;
        assert_eq!(working_bytes(&flux, Dtype::Bf16, &fs), want);
        assert!((500_000_000..700_000_000).contains(&want), "{want}");
        assert_eq!(working_bytes(&flux, Dtype::Bf16, &RunShape { guidance: true, ..fs }), want, "true CFG: two passes of batch 1");
        assert_eq!(working_bytes(&flux, Dtype::Bf16, &RunShape { batch: 2, ..fs }), 2 * want);
        assert!(working_bytes(&flux, Dtype::Bf16, &RunShape { max_sequence_length: 256, ..fs }) < want);
        // In fp32 the rotary products are no wider than the rest: the proj_out phase (15n) leads.
        let fp32 = working_bytes(&flux, Dtype::Fp32, &fs);
        assert_eq!(fp32, (3072 * 4 * 15 * n + 4 * (512 * 4096 + 12 * 3072) + 2 * n * 128 * 4) * 5 / 4);

        // SD3's VAE is never upcast: the pipeline passes force_upcast = false.
        let vae = Dims::Vae { c0: 128, force_upcast: false, tile: None, slicing: false };
        assert_eq!(working_bytes(&vae, Dtype::Fp16, &s), 10 * 1024 * 1024 * 128 * 2);
    }
}
