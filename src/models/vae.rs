//! diffusers `AutoencoderKL`: the decoder (latents -> image), built from `vae/config.json`.

use tch::nn;
use tch::Tensor;

use super::hooks::{Conv2d, GroupNorm};
use super::resnet::{conv2d, group_norm};
use super::unet_2d_blocks::{MidBlock2D, UpDecoderBlock2D};
pub use crate::arch::vae::{AutoencoderKLConfig, Tile};

/// How the decoder splits its work (diffusers `enable_tiling` / `enable_slicing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DecodeMode {
    /// Decode in overlapping tiles when the latent exceeds the tile.
    pub tiling: Option<Tile>,
    /// Decode a batch one sample at a time.
    pub slicing: bool,
}

/// The decoder half of `AutoencoderKL` (`post_quant_conv` where the config has it + `decoder.*`).
#[derive(Debug)]
pub struct AutoencoderKLDecoder {
    pub config: AutoencoderKLConfig,
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_block: MidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    /// Tiling and slicing; off by default.
    pub mode: DecodeMode,
}

impl AutoencoderKLDecoder {
    /// `vs` is the model root (keys `post_quant_conv.*`, `decoder.*`).
    pub fn new(vs: nn::Path, config: AutoencoderKLConfig) -> Self {
        let c = &config;
        let d = &vs / "decoder";
        let rev: Vec<i64> = c.block_out_channels.iter().rev().copied().collect();
        let n = rev.len();
        let eps = 1e-6;
        let mut up_blocks = vec![];
        let mut out = rev[0];
        for (i, &ch) in rev.iter().enumerate() {
            let prev = out;
            out = ch;
            up_blocks.push(UpDecoderBlock2D::new(&d / "up_blocks" / i as i64, prev, out, c.layers_per_block + 1, c.norm_num_groups, eps, i + 1 < n));
        }
        AutoencoderKLDecoder {
            post_quant_conv: c.use_post_quant_conv.then(|| conv2d(&vs / "post_quant_conv", c.latent_channels, c.latent_channels, 1, 1, 0)),
            conv_in: conv2d(&d / "conv_in", c.latent_channels, rev[0], 3, 1, 1),
            mid_block: MidBlock2D::new(&d / "mid_block", rev[0], c.norm_num_groups, eps, c.mid_block_add_attention),
            up_blocks,
            conv_norm_out: group_norm(&d / "conv_norm_out", c.norm_num_groups, c.block_out_channels[0], eps),
            conv_out: conv2d(&d / "conv_out", c.block_out_channels[0], c.out_channels, 3, 1, 1),
            config,
            mode: DecodeMode::default(),
        }
    }

    /// Decodes raw latents `z` (the pipeline's latents through [`Self::unscale_latents`]) to an
    /// image in [-1, 1]: diffusers' `AutoencoderKL.decode`, by [`Self::mode`] one sample at a
    /// time (slicing) and each in tiles (tiling) where the latent exceeds the tile.
    pub fn decode(&self, z: &Tensor) -> Tensor {
        if self.mode.slicing && z.size()[0] > 1 {
            let slices: Vec<Tensor> = z.split(1, 0).iter().map(|s| self.decode_one(s)).collect();
            return Tensor::cat(&slices, 0);
        }
        self.decode_one(z)
    }

    /// diffusers' `_decode`.
    fn decode_one(&self, z: &Tensor) -> Tensor {
        let (h, w) = (z.size()[2], z.size()[3]);
        match self.mode.tiling {
            Some(t) if t.applies(h, w) => self.tiled_decode(z, t),
            _ => self.decode_tile(z),
        }
    }

    /// diffusers' `tiled_decode`: overlapping tiles with a stride of 3/4 tile, each through
    /// `post_quant_conv` and the decoder; every tile blended in place with the one above, then
    /// the one to its left (both as already blended), over a quarter tile; then each cropped to
    /// `row_limit` and the crops concatenated.
    fn tiled_decode(&self, z: &Tensor, t: Tile) -> Tensor {
        let (h, w) = (z.size()[2], z.size()[3]);
        let step = t.overlap();
        let mut rows: Vec<Vec<Tensor>> = vec![];
        for i in (0..h).step_by(step as usize) {
            let mut row = vec![];
            for j in (0..w).step_by(step as usize) {
                let tile = z.narrow(2, i, t.latent.min(h - i)).narrow(3, j, t.latent.min(w - j));
                row.push(self.decode_tile(&tile));
            }
            rows.push(row);
        }
        stitch(&rows, t.blend(), t.row_limit())
    }

    /// `post_quant_conv` (where the config has it) and the decoder, on a whole latent or a tile.
    fn decode_tile(&self, z: &Tensor) -> Tensor {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z),
            None => z.shallow_clone(),
        };
        let mut h = self.mid_block.forward(&self.conv_in.forward(&z));
        for u in &self.up_blocks {
            h = u.forward(&h);
        }
        self.conv_out.forward(&self.conv_norm_out.forward(&h).silu())
    }

    /// What the pipelines pass to `vae.decode`: `latents / scaling_factor` (SD, SDXL), then
    /// `+ shift_factor` where the config has one (SD3), in the latents' dtype, op for op.
    pub fn unscale_latents(&self, latents: &Tensor) -> Tensor {
        let z = latents / self.config.scaling_factor;
        match self.config.shift_factor {
            Some(s) => z + s,
            None => z,
        }
    }

    /// Pipeline latents to `[B, H, W, 3]` floats in [0, 1]: [`Self::unscale_latents`],
    /// [`Self::decode`], then diffusers' `VaeImageProcessor` postprocess with `do_denormalize`.
    pub fn latents_to_image(&self, latents: &Tensor) -> Tensor {
        let img = self.decode(&self.unscale_latents(latents));
        (img / 2.0 + 0.5).clamp(0.0, 1.0).permute([0, 2, 3, 1])
    }
}

/// The tiles of `tiled_decode` / `_tiled_encode` put together: each blended in place with the one
/// above, then the one to its left (both as already blended) over `blend` rows/columns, cropped to
/// `limit`, the crops concatenated.
fn stitch(rows: &[Vec<Tensor>], blend: i64, limit: i64) -> Tensor {
    let mut result_rows = vec![];
    for i in 0..rows.len() {
        let mut row = vec![];
        for j in 0..rows[i].len() {
            if i > 0 {
                blend_into(&rows[i - 1][j], &rows[i][j], 2, blend);
            }
            if j > 0 {
                blend_into(&rows[i][j - 1], &rows[i][j], 3, blend);
            }
            let tile = &rows[i][j];
            row.push(tile.narrow(2, 0, limit.min(tile.size()[2])).narrow(3, 0, limit.min(tile.size()[3])));
        }
        result_rows.push(Tensor::cat(&row, 3));
    }
    Tensor::cat(&result_rows, 2)
}

/// diffusers' `blend_v` (`dim` 2) and `blend_h` (`dim` 3), in place on `b` as diffusers writes
/// them: the first `extent` rows (columns) of `b` become `a`'s last ones weighted by
/// `1 - y / extent` plus `b`'s by `y / extent`.
fn blend_into(a: &Tensor, b: &Tensor, dim: i64, extent: i64) {
    let extent = extent.min(a.size()[dim as usize]).min(b.size()[dim as usize]);
    let a_len = a.size()[dim as usize];
    for y in 0..extent {
        let f = y as f64 / extent as f64;
        let v = a.narrow(dim, a_len - extent + y, 1) * (1.0 - f) + b.narrow(dim, y, 1) * f;
        let mut dst = b.narrow(dim, y, 1);
        dst.copy_(&v);
    }
}

/// diffusers `DownEncoderBlock2D`: resnets, then a stride-2 convolution (padding 0, with
/// diffusers' own (0, 1, 0, 1) padding).
#[derive(Debug)]
struct DownEncoderBlock2D {
    path: String,
    resnets: Vec<super::resnet::ResnetBlock2D>,
    downsampler: Option<super::resnet::Downsample2D>,
}

impl DownEncoderBlock2D {
    fn new(vs: nn::Path, cin: i64, cout: i64, layers: i64, groups: i64, eps: f64, downsample: bool) -> Self {
        DownEncoderBlock2D {
            path: super::hooks::path_of(&vs),
            resnets: (0..layers).map(|j| super::resnet::ResnetBlock2D::new(&vs / "resnets" / j, if j == 0 { cin } else { cout }, cout, None, groups, eps, 1.0)).collect(),
            downsampler: downsample.then(|| super::resnet::Downsample2D::new(&vs / "downsamplers" / 0, cout, 0)),
        }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        super::hooks::scoped(&self.path, || {
            let mut h = x.shallow_clone();
            for r in &self.resnets {
                h = r.forward(&h, None);
            }
            match &self.downsampler {
                Some(d) => d.forward(&h),
                None => h,
            }
        })
    }
}

/// The encoder half of `AutoencoderKL` (`encoder.*` + `quant_conv`), for image-to-image.
#[derive(Debug)]
pub struct AutoencoderKLEncoder {
    pub config: AutoencoderKLConfig,
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: MidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    /// `components.vae.tiling` (diffusers' `enable_tiling`): `tiled_encode` for images over the tile.
    pub tiling: Option<Tile>,
}

impl AutoencoderKLEncoder {
    /// `vs` is the model root (keys `encoder.*`, `quant_conv.*`); `use_quant_conv` is the
    /// config's (`config.use_quant_conv`).
    pub fn new(vs: nn::Path, config: AutoencoderKLConfig, in_channels: i64, use_quant_conv: bool) -> Self {
        let c = &config;
        let e = &vs / "encoder";
        let eps = 1e-6;
        let n = c.block_out_channels.len();
        let mut down_blocks = vec![];
        let mut out = c.block_out_channels[0];
        for (i, &ch) in c.block_out_channels.iter().enumerate() {
            let prev = out;
            out = ch;
            down_blocks.push(DownEncoderBlock2D::new(&e / "down_blocks" / i as i64, prev, out, c.layers_per_block, c.norm_num_groups, eps, i + 1 < n));
        }
        let last = c.block_out_channels[n - 1];
        AutoencoderKLEncoder {
            conv_in: conv2d(&e / "conv_in", in_channels, c.block_out_channels[0], 3, 1, 1),
            down_blocks,
            mid_block: MidBlock2D::new(&e / "mid_block", last, c.norm_num_groups, eps, c.mid_block_add_attention),
            conv_norm_out: group_norm(&e / "conv_norm_out", c.norm_num_groups, last, eps),
            // double_z: mean and log-variance.
            conv_out: conv2d(&e / "conv_out", last, 2 * c.latent_channels, 3, 1, 1),
            quant_conv: use_quant_conv.then(|| conv2d(&vs / "quant_conv", 2 * c.latent_channels, 2 * c.latent_channels, 1, 1, 0)),
            config,
            tiling: None,
        }
    }

    /// diffusers `AutoencoderKL.encode(x).latent_dist`: (mean, logvar) of the posterior for an
    /// image `x` in [-1, 1]; logvar clamped to [-30, 20] as in `DiagonalGaussianDistribution`.
    pub fn encode(&self, x: &Tensor) -> (Tensor, Tensor) {
        let (h, w) = (x.size()[2], x.size()[3]);
        let moments = match self.tiling {
            Some(t) if h > t.sample || w > t.sample => self.tiled_moments(x, t),
            _ => self.moments(x),
        };
        let parts = moments.chunk(2, 1);
        (parts[0].shallow_clone(), parts[1].clamp(-30.0, 20.0))
    }

    /// The encoder and `quant_conv` on an image or a tile: the posterior's moments.
    fn moments(&self, x: &Tensor) -> Tensor {
        let mut h = self.conv_in.forward(x);
        for d in &self.down_blocks {
            h = d.forward(&h);
        }
        h = self.mid_block.forward(&h);
        let moments = self.conv_out.forward(&self.conv_norm_out.forward(&h).silu());
        match &self.quant_conv {
            Some(q) => q.forward(&moments),
            None => moments,
        }
    }

    /// diffusers' `_tiled_encode`: tiles of the tile's pixels with a stride of 3/4 tile, each
    /// encoded alone; the moments of every tile blended in place with the one above, then the one
    /// to its left (both as already blended), over a quarter of a latent tile; then each cropped
    /// to the rest and the crops concatenated.
    fn tiled_moments(&self, x: &Tensor, t: Tile) -> Tensor {
        let (h, w) = (x.size()[2], x.size()[3]);
        let stride = (t.sample as f64 * 0.75) as i64;
        let blend = (t.latent as f64 * 0.25) as i64;
        let limit = t.latent - blend;
        let rows: Vec<Vec<Tensor>> =
            (0..h).step_by(stride as usize).map(|i| (0..w).step_by(stride as usize).map(|j| self.moments(&x.narrow(2, i, t.sample.min(h - i)).narrow(3, j, t.sample.min(w - j)))).collect()).collect();
        stitch(&rows, blend, limit)
    }
}
