//! diffusers `UNet2DConditionModel` for SD 1.x, 2.x and XL configs, built from its config.json.

use std::path::Path;

use tch::nn;
use tch::{Kind, Tensor};

use super::config::{read_json, Cfg};
use super::embeddings::{TimestepEmbedding, Timesteps};
use super::hooks::{Conv2d, GroupNorm};
use super::resnet::{conv2d, group_norm, on};
use super::unet_2d_blocks::{BlockConfig, DownBlock, MidBlockCrossAttn, UpBlock};
use super::ModelError;

/// The config values runner supports, read from `unet/config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct UNet2DConditionConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub block_out_channels: Vec<i64>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub layers_per_block: i64,
    pub norm_num_groups: i64,
    pub norm_eps: f64,
    pub cross_attention_dim: i64,
    /// Heads per down block (diffusers: `num_attention_heads or attention_head_dim`).
    pub heads: Vec<i64>,
    pub transformer_layers_per_block: Vec<i64>,
    pub use_linear_projection: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub downsample_padding: i64,
    pub mid_block_scale_factor: f64,
    /// SDXL `text_time` conditioning: (addition_time_embed_dim, projection_class_embeddings_input_dim).
    pub addition_text_time: Option<(i64, i64)>,
    pub sample_size: i64,
}

impl UNet2DConditionConfig {
    /// From `unet/config.json` (errors name the file and key).
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        Self::from_json_at(&read_json(path, "UNet2DConditionModel")?, path)
    }

    pub fn from_json(cfg: &serde_json::Value) -> Result<Self, ModelError> {
        Self::from_json_at(cfg, Path::new("unet/config.json"))
    }

    /// diffusers' `UNet2DConditionModel.__init__` defaults where a key is absent or null.
    fn from_json_at(v: &serde_json::Value, path: &Path) -> Result<Self, ModelError> {
        let cfg = Cfg::new(v, path, "UNet2DConditionModel")?;
        let err = |m: String| ModelError::from(cfg.err(m));
        let block_out = cfg.dims("block_out_channels", None, &[320, 640, 1280, 1280])?;
        let n = block_out.len();
        let down = cfg.texts("down_block_types", &["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"])?;
        let up = cfg.texts("up_block_types", &["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])?;
        if down.len() != n || up.len() != n {
            return Err(err(format!("`down_block_types` ({}) and `up_block_types` ({}) must have one entry per `block_out_channels` ({n})", down.len(), up.len())));
        }
        for t in down.iter().chain(&up) {
            if !matches!(t.as_str(), "CrossAttnDownBlock2D" | "DownBlock2D" | "CrossAttnUpBlock2D" | "UpBlock2D") {
                return Err(err(format!("block type `{t}` is not supported (supported: CrossAttnDownBlock2D, DownBlock2D, CrossAttnUpBlock2D, UpBlock2D)")));
            }
        }
        let mid = cfg.text("mid_block_type", "UNetMidBlock2DCrossAttn")?;
        if mid != "UNetMidBlock2DCrossAttn" {
            return Err(err(format!("`mid_block_type` `{mid}` is not supported")));
        }
        for (key, want) in [("time_embedding_type", "positional"), ("resnet_time_scale_shift", "default"), ("attention_type", "default")] {
            let v = cfg.text(key, want)?;
            if v != want {
                return Err(err(format!("`{key}` = `{v}` is not supported (only `{want}`)")));
            }
        }
        for key in ["class_embed_type", "encoder_hid_dim", "time_cond_proj_dim", "reverse_transformer_layers_per_block"] {
            if cfg.has(key) {
                return Err(err(format!("`{key}` is not supported")));
            }
        }
        for key in ["only_cross_attention", "dual_cross_attention", "center_input_sample"] {
            if cfg.flag(key, false)? {
                return Err(err(format!("`{key}` is not supported")));
            }
        }
        // diffusers: `num_attention_heads or attention_head_dim` (the latter is, historically, heads).
        let heads_key = if cfg.has("num_attention_heads") { "num_attention_heads" } else { "attention_head_dim" };
        let heads = cfg.dims(heads_key, Some(n), &[8])?;
        let tlpb = cfg.dims("transformer_layers_per_block", Some(n), &[1])?;
        if heads.len() != n || tlpb.len() != n {
            return Err(err(format!("`{heads_key}` and `transformer_layers_per_block` need {n} entries (one per `block_out_channels`)")));
        }
        let groups = cfg.dim("norm_num_groups", 32)?;
        for (i, (&c, &h)) in block_out.iter().zip(&heads).enumerate() {
            if c % groups != 0 {
                return Err(err(format!("`block_out_channels[{i}]` {c} is not a multiple of `norm_num_groups` {groups}")));
            }
            if down[i].starts_with("CrossAttn") && c % h != 0 {
                return Err(err(format!("`block_out_channels[{i}]` {c} is not a multiple of `{heads_key}[{i}]` {h}")));
            }
        }
        let addition = match cfg.opt_text("addition_embed_type")? {
            None => None,
            Some("text_time") => Some((cfg.dim("addition_time_embed_dim", 256)?, cfg.dim("projection_class_embeddings_input_dim", 2816)?)),
            Some(other) => return Err(err(format!("`addition_embed_type` `{other}` is not supported (only `text_time`)"))),
        };
        let act = cfg.text("act_fn", "silu")?;
        if act != "silu" {
            return Err(err(format!("`act_fn` `{act}` is not supported (only `silu`)")));
        }
        let norm_eps = cfg.num("norm_eps", 1e-5)?;
        if norm_eps <= 0.0 {
            return Err(err(format!("`norm_eps` must be positive, got {norm_eps}")));
        }
        Ok(UNet2DConditionConfig {
            in_channels: cfg.dim("in_channels", 4)?,
            out_channels: cfg.dim("out_channels", 4)?,
            block_out_channels: block_out,
            down_block_types: down,
            up_block_types: up,
            layers_per_block: cfg.dim("layers_per_block", 2)?,
            norm_num_groups: groups,
            norm_eps,
            cross_attention_dim: cfg.dim("cross_attention_dim", 1280)?,
            heads,
            transformer_layers_per_block: tlpb,
            use_linear_projection: cfg.flag("use_linear_projection", false)?,
            flip_sin_to_cos: cfg.flag("flip_sin_to_cos", true)?,
            freq_shift: cfg.num("freq_shift", 0.0)?,
            downsample_padding: cfg.count("downsample_padding", 1)?,
            mid_block_scale_factor: cfg.num("mid_block_scale_factor", 1.0)?,
            addition_text_time: addition,
            sample_size: cfg.dim("sample_size", 64)?,
        })
    }
}

/// SDXL's additional conditioning.
#[derive(Debug)]
pub struct AddedCond<'a> {
    pub text_embeds: &'a Tensor,
    pub time_ids: &'a Tensor,
}

#[derive(Debug)]
pub struct UNet2DConditionModel {
    pub config: UNet2DConditionConfig,
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    add: Option<(Timesteps, TimestepEmbedding)>,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlockCrossAttn,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    pub fn new(vs: nn::Path, config: UNet2DConditionConfig) -> Self {
        let c = &config;
        let n = c.block_out_channels.len();
        let c0 = c.block_out_channels[0];
        let temb = c0 * 4;
        let block = |layers: i64, heads: i64, tl: i64| BlockConfig {
            temb,
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            layers,
            heads,
            transformer_layers: tl,
            context_dim: c.cross_attention_dim,
            linear_projection: c.use_linear_projection,
        };
        let time_proj = Timesteps { num_channels: c0, flip_sin_to_cos: c.flip_sin_to_cos, freq_shift: c.freq_shift };
        let time_embedding = TimestepEmbedding::new(&vs / "time_embedding", c0, temb);
        let add = c
            .addition_text_time
            .map(|(dim, input)| (Timesteps { num_channels: dim, flip_sin_to_cos: c.flip_sin_to_cos, freq_shift: c.freq_shift }, TimestepEmbedding::new(&vs / "add_embedding", input, temb)));
        let mut down_blocks = vec![];
        let mut out_ch = c0;
        for i in 0..n {
            let cin = out_ch;
            out_ch = c.block_out_channels[i];
            let cross = c.down_block_types[i] == "CrossAttnDownBlock2D";
            down_blocks.push(DownBlock::new(
                &vs / "down_blocks" / i as i64,
                cin,
                out_ch,
                block(c.layers_per_block, c.heads[i], c.transformer_layers_per_block[i]),
                cross,
                i + 1 < n,
                c.downsample_padding,
            ));
        }
        let last = c.block_out_channels[n - 1];
        let mid_block = MidBlockCrossAttn::new(&vs / "mid_block", last, block(1, c.heads[n - 1], c.transformer_layers_per_block[n - 1]), c.mid_block_scale_factor);
        let rev: Vec<i64> = c.block_out_channels.iter().rev().copied().collect();
        let rev_heads: Vec<i64> = c.heads.iter().rev().copied().collect();
        let rev_tl: Vec<i64> = c.transformer_layers_per_block.iter().rev().copied().collect();
        let mut up_blocks = vec![];
        let mut out_ch = rev[0];
        for i in 0..n {
            let prev_out = out_ch;
            out_ch = rev[i];
            let cin = rev[(i + 1).min(n - 1)];
            let cross = c.up_block_types[i] == "CrossAttnUpBlock2D";
            up_blocks.push(UpBlock::new(&vs / "up_blocks" / i as i64, cin, prev_out, out_ch, block(c.layers_per_block + 1, rev_heads[i], rev_tl[i]), cross, i + 1 < n));
        }
        UNet2DConditionModel {
            conv_in: conv2d(&vs / "conv_in", c.in_channels, c0, 3, 1, 1),
            time_proj,
            time_embedding,
            add,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(&vs / "conv_norm_out", c.norm_num_groups, c0, c.norm_eps),
            conv_out: conv2d(&vs / "conv_out", c0, c.out_channels, 3, 1, 1),
            config,
        }
    }

    /// `sample` [B, C, h, w]; `timestep` a scalar; `context` [B, 77, cross_attention_dim].
    pub fn forward(&self, sample: &Tensor, timestep: f64, context: &Tensor, added: Option<AddedCond>) -> Tensor {
        let b = sample.size()[0];
        let kind = sample.kind();
        let device = sample.device();
        // 1. time
        let t = Tensor::full([b], timestep, (Kind::Float, device));
        let t_emb = self.time_proj.forward(&t).to_kind(kind);
        let mut emb = self.time_embedding.forward(&on(&t_emb, self.time_embedding.weight()));
        if let (Some((proj, embed)), Some(a)) = (&self.add, added) {
            let time_embeds = proj.forward(&a.time_ids.flatten(0, -1)).reshape([b, -1]);
            let add_embeds = Tensor::cat(&[a.text_embeds.to_kind(Kind::Float), time_embeds.to_device(a.text_embeds.device())], -1).to_kind(kind);
            let add = embed.forward(&on(&add_embeds, embed.weight()));
            emb += on(&add, &emb);
        }
        // 2. pre-process; a size not divisible by 2^upsamplers needs explicit upsample sizes.
        let factor = 1i64 << (self.up_blocks.len() - 1);
        let (h, w) = (sample.size()[2], sample.size()[3]);
        let forward_upsample_size = h % factor != 0 || w % factor != 0;
        let mut x = self.conv_in.forward(&on(sample, self.conv_in.weight()));
        // 3. down
        let mut skips = vec![x.shallow_clone()];
        for d in &self.down_blocks {
            let (y, states) = d.forward(&x, &emb, context);
            x = y;
            skips.extend(states);
        }
        // 4. mid
        x = self.mid_block.forward(&x, &emb, context);
        // 5. up
        let nup = self.up_blocks.len();
        for (i, u) in self.up_blocks.iter().enumerate() {
            let keep = skips.len() - u.layers();
            let size = if i + 1 < nup && forward_upsample_size {
                let s = skips[keep - 1].size();
                Some((s[2], s[3]))
            } else {
                None
            };
            let mut mine = skips.split_off(keep);
            x = u.forward(&x, &mut mine, &emb, context, size);
        }
        // 6. post-process
        let x = match self.conv_norm_out.weight() {
            Some(ws) => self.conv_norm_out.forward(&on(&x, ws)),
            None => self.conv_norm_out.forward(&x),
        };
        self.conv_out.forward(&on(&x.silu(), self.conv_out.weight()))
    }
}
