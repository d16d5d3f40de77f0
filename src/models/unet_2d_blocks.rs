//! diffusers `unet_2d_blocks.py`: the down, mid and up blocks of SD 1.x/2.x/XL UNets and of the
//! VAE decoder.

use tch::Tensor;

use super::attention::{Attention, Transformer2DModel};
use super::hooks::{path_of, scoped};
use super::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use tch::nn;

/// What a block needs to know beyond its channels.
#[derive(Debug, Clone, Copy)]
pub struct BlockConfig {
    pub temb: i64,
    pub groups: i64,
    pub eps: f64,
    pub layers: i64,
    /// Cross-attention blocks: heads, transformer layers, context dim, linear projections.
    pub heads: i64,
    pub transformer_layers: i64,
    pub context_dim: i64,
    pub linear_projection: bool,
}

/// `CrossAttnDownBlock2D` (with attentions) or `DownBlock2D` (without).
#[derive(Debug)]
pub struct DownBlock {
    path: String,
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    pub fn new(vs: nn::Path, cin: i64, cout: i64, cfg: BlockConfig, cross_attention: bool, downsample: bool, downsample_padding: i64) -> Self {
        let resnets = (0..cfg.layers).map(|j| ResnetBlock2D::new(&vs / "resnets" / j, if j == 0 { cin } else { cout }, cout, Some(cfg.temb), cfg.groups, cfg.eps, 1.0)).collect();
        let attentions = if cross_attention {
            (0..cfg.layers)
                .map(|j| Transformer2DModel::new(&vs / "attentions" / j, cfg.heads, cout / cfg.heads, cout, cfg.transformer_layers, cfg.context_dim, cfg.groups, cfg.linear_projection))
                .collect()
        } else {
            vec![]
        };
        let downsampler = downsample.then(|| Downsample2D::new(&vs / "downsamplers" / 0, cout, downsample_padding));
        DownBlock { path: path_of(&vs), resnets, attentions, downsampler }
    }

    /// Returns the output and the states kept for the up path.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> (Tensor, Vec<Tensor>) {
        scoped(&self.path, || self.forward_inner(x, temb, context))
    }

    fn forward_inner(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> (Tensor, Vec<Tensor>) {
        let mut h = x.shallow_clone();
        let mut states = vec![];
        for (j, r) in self.resnets.iter().enumerate() {
            h = r.forward(&h, Some(temb));
            if let Some(a) = self.attentions.get(j) {
                h = a.forward(&h, context);
            }
            states.push(h.shallow_clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h);
            states.push(h.shallow_clone());
        }
        (h, states)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, (attention, resnet) x layers.
#[derive(Debug)]
pub struct MidBlockCrossAttn {
    path: String,
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlockCrossAttn {
    pub fn new(vs: nn::Path, channels: i64, cfg: BlockConfig, output_scale_factor: f64) -> Self {
        let resnets = (0..2).map(|j| ResnetBlock2D::new(&vs / "resnets" / j, channels, channels, Some(cfg.temb), cfg.groups, cfg.eps, output_scale_factor)).collect();
        let attentions = vec![Transformer2DModel::new(&vs / "attentions" / 0, cfg.heads, channels / cfg.heads, channels, cfg.transformer_layers, cfg.context_dim, cfg.groups, cfg.linear_projection)];
        MidBlockCrossAttn { path: path_of(&vs), resnets, attentions }
    }
    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Tensor {
        scoped(&self.path, || {
            let mut h = self.resnets[0].forward(x, Some(temb));
            for (a, r) in self.attentions.iter().zip(&self.resnets[1..]) {
                h = a.forward(&h, context);
                h = r.forward(&h, Some(temb));
            }
            h
        })
    }
}

/// `CrossAttnUpBlock2D` (with attentions) or `UpBlock2D` (without).
#[derive(Debug)]
pub struct UpBlock {
    path: String,
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(vs: nn::Path, cin: i64, prev_out: i64, cout: i64, cfg: BlockConfig, cross_attention: bool, upsample: bool) -> Self {
        let resnets = (0..cfg.layers)
            .map(|j| {
                let skip = if j == cfg.layers - 1 { cin } else { cout };
                let rin = if j == 0 { prev_out } else { cout };
                ResnetBlock2D::new(&vs / "resnets" / j, rin + skip, cout, Some(cfg.temb), cfg.groups, cfg.eps, 1.0)
            })
            .collect();
        let attentions = if cross_attention {
            (0..cfg.layers)
                .map(|j| Transformer2DModel::new(&vs / "attentions" / j, cfg.heads, cout / cfg.heads, cout, cfg.transformer_layers, cfg.context_dim, cfg.groups, cfg.linear_projection))
                .collect()
        } else {
            vec![]
        };
        UpBlock { path: path_of(&vs), resnets, attentions, upsampler: upsample.then(|| Upsample2D::new(&vs / "upsamplers" / 0, cout)) }
    }

    pub fn layers(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are consumed from the end, as diffusers pops `res_hidden_states_tuple`.
    pub fn forward(&self, x: &Tensor, skips: &mut Vec<Tensor>, temb: &Tensor, context: &Tensor, upsample_size: Option<(i64, i64)>) -> Tensor {
        scoped(&self.path, || self.forward_inner(x, skips, temb, context, upsample_size))
    }

    fn forward_inner(&self, x: &Tensor, skips: &mut Vec<Tensor>, temb: &Tensor, context: &Tensor, upsample_size: Option<(i64, i64)>) -> Tensor {
        let mut h = x.shallow_clone();
        for (j, r) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("one skip state per resnet");
            // Skip states may come from down blocks placed on other devices.
            let skip = super::resnet::on(&skip, &h);
            h = r.forward(&Tensor::cat(&[h, skip], 1), Some(temb));
            if let Some(a) = self.attentions.get(j) {
                h = a.forward(&h, context);
            }
        }
        match &self.upsampler {
            Some(u) => u.forward(&h, upsample_size),
            None => h,
        }
    }
}

/// VAE decoder `UNetMidBlock2D`: resnet, attention, resnet (no time embedding).
#[derive(Debug)]
pub struct MidBlock2D {
    path: String,
    resnets: Vec<ResnetBlock2D>,
    attention: Option<Attention>,
}

impl MidBlock2D {
    pub fn new(vs: nn::Path, channels: i64, groups: i64, eps: f64, add_attention: bool) -> Self {
        MidBlock2D {
            path: path_of(&vs),
            resnets: (0..2).map(|j| ResnetBlock2D::new(&vs / "resnets" / j, channels, channels, None, groups, eps, 1.0)).collect(),
            attention: add_attention.then(|| Attention::new_spatial(&vs / "attentions" / 0, channels, groups, eps)),
        }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        scoped(&self.path, || {
            let mut h = self.resnets[0].forward(x, None);
            if let Some(a) = &self.attention {
                h = a.forward_spatial(&h);
            }
            self.resnets[1].forward(&h, None)
        })
    }
}

/// VAE `UpDecoderBlock2D`.
#[derive(Debug)]
pub struct UpDecoderBlock2D {
    path: String,
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    pub fn new(vs: nn::Path, cin: i64, cout: i64, layers: i64, groups: i64, eps: f64, upsample: bool) -> Self {
        UpDecoderBlock2D {
            path: path_of(&vs),
            resnets: (0..layers).map(|j| ResnetBlock2D::new(&vs / "resnets" / j, if j == 0 { cin } else { cout }, cout, None, groups, eps, 1.0)).collect(),
            upsampler: upsample.then(|| Upsample2D::new(&vs / "upsamplers" / 0, cout)),
        }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        scoped(&self.path, || {
            let mut h = x.shallow_clone();
            for r in &self.resnets {
                h = r.forward(&h, None);
            }
            match &self.upsampler {
                Some(u) => u.forward(&h, None),
                None => h,
            }
        })
    }
}
