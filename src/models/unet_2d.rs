//! diffusers `UNet2DConditionModel` for SD 1.x, 2.x and XL configs, built from its config.json.

use tch::nn;
use tch::{Kind, Tensor};

use super::embeddings::{TimestepEmbedding, Timesteps};
use super::hooks::{Conv2d, GroupNorm};
use super::resnet::{conv2d, group_norm, on};
use super::unet_2d_blocks::{BlockConfig, DownBlock, MidBlockCrossAttn, UpBlock};
use super::weights::{cfg_bool, cfg_f64, cfg_list_str, cfg_list_u64, cfg_str, cfg_u64};
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
    pub fn from_json(cfg: &serde_json::Value) -> Result<Self, ModelError> {
        let err = |m: String| ModelError::Config { model: "UNet2DConditionModel".into(), msg: m };
        let block_out: Vec<i64> = cfg_list_u64(cfg, "block_out_channels", 4, 320).into_iter().map(|v| v as i64).collect();
        let n = block_out.len();
        let down = cfg_list_str(cfg, "down_block_types");
        let up = cfg_list_str(cfg, "up_block_types");
        if down.len() != n || up.len() != n {
            return Err(err(format!("down_block_types ({}) and up_block_types ({}) must have one entry per block_out_channels ({n})", down.len(), up.len())));
        }
        for t in down.iter().chain(&up) {
            if !matches!(t.as_str(), "CrossAttnDownBlock2D" | "DownBlock2D" | "CrossAttnUpBlock2D" | "UpBlock2D") {
                return Err(err(format!("block type `{t}` is not supported (supported: CrossAttnDownBlock2D, DownBlock2D, CrossAttnUpBlock2D, UpBlock2D)")));
            }
        }
        let mid = cfg_str(cfg, "mid_block_type", "UNetMidBlock2DCrossAttn");
        if mid != "UNetMidBlock2DCrossAttn" {
            return Err(err(format!("mid_block_type `{mid}` is not supported")));
        }
        for (key, want) in [("time_embedding_type", "positional"), ("resnet_time_scale_shift", "default"), ("attention_type", "default")] {
            let v = cfg_str(cfg, key, want);
            if v != want {
                return Err(err(format!("`{key}` = `{v}` is not supported (only `{want}`)")));
            }
        }
        for key in ["class_embed_type", "encoder_hid_dim", "time_cond_proj_dim", "reverse_transformer_layers_per_block"] {
            if cfg.get(key).is_some_and(|v| !v.is_null()) {
                return Err(err(format!("`{key}` is not supported")));
            }
        }
        if cfg_bool(cfg, "only_cross_attention", false) || cfg_bool(cfg, "dual_cross_attention", false) || cfg_bool(cfg, "center_input_sample", false) {
            return Err(err("only_cross_attention / dual_cross_attention / center_input_sample are not supported".into()));
        }
        let heads_key = if cfg.get("num_attention_heads").is_some_and(|v| !v.is_null()) { "num_attention_heads" } else { "attention_head_dim" };
        let heads: Vec<i64> = cfg_list_u64(cfg, heads_key, n, 8).into_iter().map(|v| v as i64).collect();
        let tlpb: Vec<i64> = cfg_list_u64(cfg, "transformer_layers_per_block", n, 1).into_iter().map(|v| v as i64).collect();
        if heads.len() != n || tlpb.len() != n {
            return Err(err(format!("`{heads_key}` and `transformer_layers_per_block` need {n} entries")));
        }
        let addition = match cfg.get("addition_embed_type").and_then(|v| v.as_str()) {
            None => None,
            Some("text_time") => Some((cfg_u64(cfg, "addition_time_embed_dim", 256) as i64, cfg_u64(cfg, "projection_class_embeddings_input_dim", 2816) as i64)),
            Some(other) => return Err(err(format!("addition_embed_type `{other}` is not supported (only `text_time`)"))),
        };
        let act = cfg_str(cfg, "act_fn", "silu");
        if act != "silu" {
            return Err(err(format!("act_fn `{act}` is not supported")));
        }
        Ok(UNet2DConditionConfig {
            in_channels: cfg_u64(cfg, "in_channels", 4) as i64,
            out_channels: cfg_u64(cfg, "out_channels", 4) as i64,
            block_out_channels: block_out,
            down_block_types: down,
            up_block_types: up,
            layers_per_block: cfg_u64(cfg, "layers_per_block", 2) as i64,
            norm_num_groups: cfg_u64(cfg, "norm_num_groups", 32) as i64,
            norm_eps: cfg_f64(cfg, "norm_eps", 1e-5),
            cross_attention_dim: cfg_u64(cfg, "cross_attention_dim", 1280) as i64,
            heads,
            transformer_layers_per_block: tlpb,
            use_linear_projection: cfg_bool(cfg, "use_linear_projection", false),
            flip_sin_to_cos: cfg_bool(cfg, "flip_sin_to_cos", true),
            freq_shift: cfg_f64(cfg, "freq_shift", 0.0),
            downsample_padding: cfg_u64(cfg, "downsample_padding", 1) as i64,
            mid_block_scale_factor: cfg_f64(cfg, "mid_block_scale_factor", 1.0),
            addition_text_time: addition,
            sample_size: cfg_u64(cfg, "sample_size", 64) as i64,
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
