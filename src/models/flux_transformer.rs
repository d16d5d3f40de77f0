//! diffusers `FluxTransformer2DModel` (models/transformers/transformer_flux.py of diffusers 0.42.1):
//! the rectified-flow transformer of FLUX.1 dev and schnell. Variables sit at the checkpoint's key
//! paths (`x_embedder.weight`, `transformer_blocks.{i}.attn.to_q.weight`,
//! `single_transformer_blocks.{i}.proj_mlp.weight`, ...), so the sharded checkpoints load unchanged.
//!
//! What diffusers does and this follows: the pipeline packs 2x2 latent patches into tokens
//! itself, so the model sees [B, S, in_channels] and `x_embedder` is a plain linear; the timestep
//! (the pipeline's t/1000, scaled back by 1000 in the model dtype) and, for dev, the distilled
//! guidance scale each get the 256-channel sinusoid (cos first) and an MLP, added to the projected
//! pooled CLIP embedding (`temb`); the T5 states are projected by `context_embedder`. Positions
//! are not added but rotated in: each token has 3 ids (text: the pipeline's zeros; image:
//! (0, row, column)), and `FluxPosEmbed` turns them into per-axis rotary tables applied to the
//! queries and keys. The double-stream `FluxTransformerBlock`s keep text and image apart except in
//! the joint attention (text first); the single-stream `FluxSingleTransformerBlock`s run both as
//! one sequence; `norm_out` and `proj_out` then map the image tokens back to packed latents.

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::arch::config::ConfigError;
pub use crate::arch::flux::FluxTransformer2DConfig;
use crate::checkpoint::layout::Checkpoint;
use crate::checkpoint::load::Mapped;
use crate::models::flux_blocks::{FluxPosEmbed, FluxSingleTransformerBlock, FluxTransformerBlock};
use crate::models::mmdit_blocks::{AdaLayerNormContinuous, CombinedTimestepTextProjEmbeddings, Linear};
use crate::models::resnet::on;
use crate::models::weights::{build_from_checkpoint, WeightsError};

const MODEL: &str = "FluxTransformer2DModel";

#[derive(Debug, thiserror::Error)]
pub enum FluxError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// Inputs the transformer cannot take (shapes, guidance given or missing).
    #[error("FluxTransformer2DModel: {0}")]
    Input(String),
    #[error("FluxTransformer2DModel: libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// diffusers `FluxTransformer2DModel`.
pub struct FluxTransformer2DModel {
    pub config: FluxTransformer2DConfig,
    vs: VarStore,
    mapped: Mapped,
    pos_embed: FluxPosEmbed,
    time_text_embed: CombinedTimestepTextProjEmbeddings,
    context_embedder: Linear,
    x_embedder: Linear,
    transformer_blocks: Vec<FluxTransformerBlock>,
    single_transformer_blocks: Vec<FluxSingleTransformerBlock>,
    norm_out: AdaLayerNormContinuous,
    proj_out: Linear,
    /// The dtype it computes in (with layerwise casting, not `x_embedder`'s storage dtype).
    kind: Kind,
}

impl FluxTransformer2DModel {
    /// Builds the model from `ck`, strictly (every parameter present with its shape, nothing
    /// else); floats at `kind`.
    pub fn load(config: &FluxTransformer2DConfig, ck: &Checkpoint, device: Device, kind: Kind) -> Result<Self, FluxError> {
        let c = config;
        let (d, heads, head_dim) = (c.inner_dim(), c.num_attention_heads, c.attention_head_dim);
        let vs = VarStore::new(device);
        let (parts, mapped) = build_from_checkpoint(&vs, ck, MODEL, kind, |root| {
            // The same order as diffusers' __init__ (the streaming load follows it).
            let time_text_embed = CombinedTimestepTextProjEmbeddings::new(&root / "time_text_embed", d, c.pooled_projection_dim, c.guidance_embeds);
            let context_embedder = Linear::new(&root / "context_embedder", c.joint_attention_dim, d);
            let x_embedder = Linear::new(&root / "x_embedder", c.in_channels, d);
            let blocks = (0..c.num_layers).map(|i| FluxTransformerBlock::new(&root / "transformer_blocks" / i, d, heads, head_dim)).collect::<Vec<_>>();
            let singles = (0..c.num_single_layers).map(|i| FluxSingleTransformerBlock::new(&root / "single_transformer_blocks" / i, d, heads, head_dim)).collect::<Vec<_>>();
            let norm_out = AdaLayerNormContinuous::new(&root / "norm_out", d, d);
            let proj_out = Linear::new(&root / "proj_out", d, c.patch_size * c.patch_size * c.out_channels);
            (time_text_embed, context_embedder, x_embedder, blocks, singles, norm_out, proj_out)
        })?;
        let (time_text_embed, context_embedder, x_embedder, transformer_blocks, single_transformer_blocks, norm_out, proj_out) = parts;
        let pos_embed = FluxPosEmbed { axes_dim: c.axes_dims_rope.clone(), theta: 10000.0 };
        Ok(FluxTransformer2DModel { config: c.clone(), vs, mapped, pos_embed, time_text_embed, context_embedder, x_embedder, transformer_blocks, single_transformer_blocks, norm_out, proj_out, kind })
    }

    /// The variables (the executor moves and accounts them).
    pub fn varstore(&self) -> &VarStore {
        &self.vs
    }

    /// The mapped checkpoint files its same-dtype CPU parameters view.
    pub fn mapped(&self) -> &Mapped {
        &self.mapped
    }

    /// The model's prediction [B, S, out_channels] (packed, like the input), on `proj_out`'s
    /// device, for `hidden_states` [B, S, in_channels] (the packed latents),
    /// `encoder_hidden_states` [B, T, joint_attention_dim], `pooled_projections`
    /// [B, pooled_projection_dim], `timestep` [B] (the pipeline's t/1000, any float dtype; a
    /// single value is broadcast), `guidance` [B] (given exactly when the config has
    /// `guidance_embeds`), and the position ids `txt_ids` [T, 3] and `img_ids` [S, 3] (float; a
    /// 3-D [N, ., 3] is taken at [0], diffusers' deprecated form). Inputs go to the model's
    /// device and float dtype.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        pooled_projections: &Tensor,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        txt_ids: &Tensor,
        img_ids: &Tensor,
    ) -> Result<Tensor, FluxError> {
        let c = &self.config;
        let input = |msg: String| FluxError::Input(msg);
        let (b, s, channels) = hidden_states.size3().map_err(|_| input(format!("hidden_states must be [B, S, {}] (packed latents), got {:?}", c.in_channels, hidden_states.size())))?;
        if channels != c.in_channels {
            return Err(input(format!("hidden_states must be [B, S, {}] (`in_channels`), got {:?}", c.in_channels, hidden_states.size())));
        }
        let t = match encoder_hidden_states.size().as_slice() {
            &[eb, t, dim] if eb == b && dim == c.joint_attention_dim => t,
            sz => return Err(input(format!("encoder_hidden_states must be [{b}, T, {}] (`joint_attention_dim`), got {sz:?}", c.joint_attention_dim))),
        };
        match pooled_projections.size().as_slice() {
            &[pb, dim] if pb == b && dim == c.pooled_projection_dim => {}
            sz => return Err(input(format!("pooled_projections must be [{b}, {}] (`pooled_projection_dim`), got {sz:?}", c.pooled_projection_dim))),
        }
        let per_sample = |name: &str, x: &Tensor| match x.size().as_slice() {
            &[n] if n == b || n == 1 => Ok(()),
            sz => Err(input(format!("{name} must be [{b}] (one per sample), got {sz:?}"))),
        };
        per_sample("timestep", timestep)?;
        match (guidance, c.guidance_embeds) {
            (Some(g), true) => per_sample("guidance", g)?,
            (None, false) => {}
            // diffusers fails with a TypeError in `time_text_embed` either way.
            (None, true) => return Err(input("guidance is required: the config has `guidance_embeds` (a guidance-distilled model such as FLUX.1-dev)".into())),
            (Some(_), false) => return Err(input("guidance was given, but the config has no `guidance_embeds` (e.g. FLUX.1-schnell): the model has no guidance embedder".into())),
        }
        let axes = c.axes_dims_rope.len() as i64;
        let ids = |name: &str, x: &Tensor, n: i64, what: &str| -> Result<Tensor, FluxError> {
            let x = match x.size().as_slice() {
                // diffusers' deprecated batched form: the first entry.
                &[k, _, _] if k > 0 => x.f_get(0)?,
                _ => x.shallow_clone(),
            };
            match x.size().as_slice() {
                &[m, a] if m == n && a == axes => Ok(x),
                _ => Err(input(format!("{name} must be [{n}, {axes}] (one id triple per {what}), got {:?}", x.size()))),
            }
        };
        let txt_ids = ids("txt_ids", txt_ids, t, "text token")?;
        let img_ids = ids("img_ids", img_ids, s, "image token")?;

        let w = &self.x_embedder.weight;
        let (device, kind) = (w.device(), self.kind);
        let to_model = |x: &Tensor| x.f_to_device(device)?.f_to_kind(kind);
        let mut hidden = self.x_embedder.forward(&to_model(hidden_states)?)?;
        // `timestep.to(hidden_states.dtype) * 1000`: rounded to the model dtype first, as there.
        let scaled = |x: &Tensor| to_model(x)?.f_mul_scalar(1000.0);
        let guidance = guidance.map(scaled).transpose()?;
        let temb = self.time_text_embed.forward(&scaled(timestep)?, guidance.as_ref(), &to_model(pooled_projections)?)?;
        let mut context = self.context_embedder.forward(&on(&to_model(encoder_hidden_states)?, &self.context_embedder.weight))?;

        // Text ids first, like the tokens in the attention.
        let rotary = self.pos_embed.forward(&Tensor::f_cat(&[&txt_ids.f_to_device(Device::Cpu)?, &img_ids.f_to_device(Device::Cpu)?], 0)?)?.on(w);
        for block in &self.transformer_blocks {
            (context, hidden) = block.forward(&hidden, &context, &temb, &rotary)?;
        }
        for block in &self.single_transformer_blocks {
            (context, hidden) = block.forward(&hidden, &context, &temb, &rotary)?;
        }
        let w = self.norm_out.weight();
        let hidden = self.norm_out.forward(&on(&hidden, w), &on(&temb, w))?;
        Ok(self.proj_out.forward(&hidden)?)
    }
}
