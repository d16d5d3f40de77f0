//! diffusers `UNet2DConditionModel` for SD 1.x, 2.x and XL configs, built from its config.json.

use tch::nn;
use tch::{Kind, Tensor};

use super::embeddings::{TimestepEmbedding, Timesteps};
use super::hooks::{Conv2d, GroupNorm};
use super::resnet::{conv2d, group_norm, on};
use super::unet_2d_blocks::{BlockConfig, DownBlock, MidBlockCrossAttn, UpBlock};
pub use crate::arch::unet::UNet2DConditionConfig;

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
