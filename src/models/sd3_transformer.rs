//! diffusers `SD3Transformer2DModel` (models/transformers/transformer_sd3.py of diffusers 0.42.1):
//! the MMDiT of Stable Diffusion 3 and, with `qk_norm = "rms_norm"` and `dual_attention_layers`
//! (MMDiT-X), of SD 3.5. Variables sit at the checkpoint's key paths (`pos_embed.proj.weight`,
//! `transformer_blocks.{i}.attn.to_q.weight`, ...), so a sharded checkpoint loads unchanged.
//!
//! What diffusers does and this follows: latents are cut into `patch_size` patches by a strided
//! convolution (`PatchEmbed`) plus a position table cropped from the centre of the
//! `pos_embed_max_size`² grid — the table is the checkpoint's `pos_embed.pos_embed` buffer, not
//! recomputed; the timestep's 256-channel sinusoid (cos first) goes through an MLP and is added to
//! the projected pooled text embeddings (`temb`); the text states are projected by
//! `context_embedder` and run beside the image tokens through the `JointTransformerBlock`s, the
//! last of which (`context_pre_only`) drops them; `norm_out` and `proj_out` then unpatchify.

use tch::nn::{self, Init, VarStore};
use tch::{Device, Kind, Tensor};

use crate::arch::config::ConfigError;
pub use crate::arch::sd3::{QkNorm, SD3Transformer2DConfig};
use crate::checkpoint::layout::Checkpoint;
use crate::checkpoint::load::Mapped;
use crate::models::hooks::{path_of, scoped};
use crate::models::mmdit_blocks::{AdaLayerNormContinuous, CombinedTimestepTextProjEmbeddings, JointTransformerBlock, Linear};
use crate::models::resnet::on;
use crate::models::weights::{build_from_checkpoint, param, WeightsError};

const MODEL: &str = "SD3Transformer2DModel";

#[derive(Debug, thiserror::Error)]
pub enum Sd3Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// Inputs the transformer cannot take (shapes, sizes beyond the position table).
    #[error("SD3Transformer2DModel: {0}")]
    Input(String),
    #[error("SD3Transformer2DModel: libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// diffusers `PatchEmbed(..., pos_embed_max_size)`: `proj` (a conv with kernel and stride
/// `patch_size`) to [B, h*w, D] tokens, plus the centre crop of the stored position grid.
struct PatchEmbed {
    proj_weight: Tensor,
    proj_bias: Tensor,
    /// `pos_embed.pos_embed`, [1, max², D].
    pos_embed: Tensor,
    patch_size: i64,
    max_size: i64,
    path: String,
    proj_path: String,
}

impl PatchEmbed {
    fn new(p: nn::Path, c: &SD3Transformer2DConfig) -> PatchEmbed {
        let (d, k) = (c.inner_dim(), c.patch_size);
        let proj = &p / "proj";
        PatchEmbed {
            proj_weight: param(&proj, "weight", &[d, c.in_channels, k, k], Init::Const(0.)),
            proj_bias: param(&proj, "bias", &[d], Init::Const(0.)),
            pos_embed: param(&p, "pos_embed", &[1, c.pos_embed_max_size * c.pos_embed_max_size, d], Init::Const(0.)),
            patch_size: k,
            max_size: c.pos_embed_max_size,
            path: path_of(&p),
            proj_path: path_of(&proj),
        }
    }

    /// `latent` [B, C, H, W] with H and W multiples of the patch size and at most
    /// `pos_embed_max_size` patches (checked by the caller).
    fn forward(&self, latent: &Tensor) -> Result<Tensor, tch::TchError> {
        scoped(&self.path, || {
            let (_, _, height, width) = latent.size4()?;
            let (h, w) = (height / self.patch_size, width / self.patch_size);
            let k = self.patch_size;
            let x = scoped(&self.proj_path, || latent.f_conv2d(&self.proj_weight, Some(&self.proj_bias), [k, k], [0, 0], [1, 1], 1))?;
            let x = x.f_flatten(2, -1)?.f_transpose(1, 2)?;
            // cropped_pos_embed: the centre h x w of the max x max grid (top/left rounded down).
            let (top, left) = ((self.max_size - h) / 2, (self.max_size - w) / 2);
            let d = self.pos_embed.size()[2];
            let pos = self.pos_embed.f_reshape([1, self.max_size, self.max_size, d])?.f_narrow(1, top, h)?.f_narrow(2, left, w)?.f_reshape([1, -1, d])?;
            x.f_add(&pos)?.f_to_kind(x.kind())?.f_contiguous()
        })
    }
}

/// diffusers `SD3Transformer2DModel`.
pub struct SD3Transformer2DModel {
    pub config: SD3Transformer2DConfig,
    vs: VarStore,
    mapped: Mapped,
    pos_embed: PatchEmbed,
    time_text_embed: CombinedTimestepTextProjEmbeddings,
    context_embedder: Linear,
    transformer_blocks: Vec<JointTransformerBlock>,
    norm_out: AdaLayerNormContinuous,
    proj_out: Linear,
}

impl SD3Transformer2DModel {
    /// Builds the model from `ck`, strictly (every parameter and the `pos_embed.pos_embed`
    /// buffer present with its shape, nothing else); floats at `kind`.
    pub fn load(config: &SD3Transformer2DConfig, ck: &Checkpoint, device: Device, kind: Kind) -> Result<Self, Sd3Error> {
        let c = config;
        let d = c.inner_dim();
        let vs = VarStore::new(device);
        let (parts, mapped) = build_from_checkpoint(&vs, ck, MODEL, kind, |root| {
            let pos_embed = PatchEmbed::new(&root / "pos_embed", c);
            let time_text_embed = CombinedTimestepTextProjEmbeddings::new(&root / "time_text_embed", d, c.pooled_projection_dim, false);
            let context_embedder = Linear::new(&root / "context_embedder", c.joint_attention_dim, c.caption_projection_dim);
            let blocks = (0..c.num_layers)
                .map(|i| {
                    let last = i == c.num_layers - 1;
                    let dual = c.dual_attention_layers.contains(&i);
                    JointTransformerBlock::new(&root / "transformer_blocks" / i, d, c.num_attention_heads, c.attention_head_dim, last, c.qk_norm == Some(QkNorm::RmsNorm), dual)
                })
                .collect::<Vec<_>>();
            let norm_out = AdaLayerNormContinuous::new(&root / "norm_out", d, d);
            let proj_out = Linear::new(&root / "proj_out", d, c.patch_size * c.patch_size * c.out_channels);
            (pos_embed, time_text_embed, context_embedder, blocks, norm_out, proj_out)
        })?;
        let (pos_embed, time_text_embed, context_embedder, transformer_blocks, norm_out, proj_out) = parts;
        Ok(SD3Transformer2DModel { config: c.clone(), vs, mapped, pos_embed, time_text_embed, context_embedder, transformer_blocks, norm_out, proj_out })
    }

    /// The variables (the executor moves and accounts them).
    pub fn varstore(&self) -> &VarStore {
        &self.vs
    }

    /// The mapped checkpoint files its same-dtype CPU parameters view.
    pub fn mapped(&self) -> &Mapped {
        &self.mapped
    }

    /// The model's prediction [B, out_channels, H, W] for `hidden_states` [B, in_channels, H, W]
    /// (latents; H and W multiples of `patch_size`, at most `pos_embed_max_size` patches),
    /// `timestep` [B] (float: the flow-matching timesteps are fractional; a single value is
    /// broadcast), `encoder_hidden_states` [B, T, joint_attention_dim] and `pooled_projections`
    /// [B, pooled_projection_dim]. Inputs go to the model's device and float dtype.
    pub fn forward(&self, hidden_states: &Tensor, timestep: &Tensor, encoder_hidden_states: &Tensor, pooled_projections: &Tensor) -> Result<Tensor, Sd3Error> {
        let c = &self.config;
        let input = |msg: String| Sd3Error::Input(msg);
        let (b, channels, height, width) = hidden_states.size4().map_err(|_| input(format!("hidden_states must be [B, C, H, W], got {:?}", hidden_states.size())))?;
        if channels != c.in_channels {
            return Err(input(format!("hidden_states has {channels} channels, the config's `in_channels` is {}", c.in_channels)));
        }
        let p = c.patch_size;
        if height % p != 0 || width % p != 0 {
            return Err(input(format!("latent height and width ({height}x{width}) must be multiples of `patch_size` {p}")));
        }
        // diffusers' cropped_pos_embed raises the same.
        for (name, n) in [("Height", height / p), ("Width", width / p)] {
            if n > c.pos_embed_max_size {
                return Err(input(format!("{name} ({n} patches) cannot be greater than `pos_embed_max_size`: {}", c.pos_embed_max_size)));
            }
        }
        match encoder_hidden_states.size().as_slice() {
            &[eb, _, dim] if eb == b && dim == c.joint_attention_dim => {}
            s => return Err(input(format!("encoder_hidden_states must be [{b}, T, {}] (`joint_attention_dim`), got {s:?}", c.joint_attention_dim))),
        }
        match pooled_projections.size().as_slice() {
            &[pb, dim] if pb == b && dim == c.pooled_projection_dim => {}
            s => return Err(input(format!("pooled_projections must be [{b}, {}] (`pooled_projection_dim`), got {s:?}", c.pooled_projection_dim))),
        }
        match timestep.size().as_slice() {
            &[n] if n == b || n == 1 => {}
            s => return Err(input(format!("timestep must be [{b}] (one per sample), got {s:?}"))),
        }

        let w = &self.pos_embed.proj_weight;
        let (device, kind) = (w.device(), w.kind());
        let to_model = |t: &Tensor| t.f_to_device(device)?.f_to_kind(kind);
        let mut hidden = self.pos_embed.forward(&to_model(hidden_states)?)?;
        let temb = self.time_text_embed.forward(&timestep.f_to_device(device)?, None, &to_model(pooled_projections)?)?;
        let mut context = self.context_embedder.forward(&on(&to_model(encoder_hidden_states)?, &self.context_embedder.weight))?;
        for block in &self.transformer_blocks {
            let (ctx, h) = block.forward(&hidden, &context, &temb)?;
            hidden = h;
            // After the last (context_pre_only) block there is none, and none is needed.
            if let Some(ctx) = ctx {
                context = ctx;
            }
        }
        let w = self.norm_out.weight();
        let hidden = self.norm_out.forward(&on(&hidden, w), &on(&temb, w))?;
        let hidden = self.proj_out.forward(&hidden)?;

        // Unpatchify: [B, h*w, p*p*C] -> [B, h, w, p, q, C] -> einsum("nhwpqc->nchpwq") -> [B, C, H, W].
        let (h, wd) = (height / p, width / p);
        let out = hidden.f_reshape([b, h, wd, p, p, c.out_channels])?.f_permute([0, 5, 1, 3, 2, 4])?.f_reshape([b, c.out_channels, h * p, wd * p])?;
        Ok(out)
    }
}
