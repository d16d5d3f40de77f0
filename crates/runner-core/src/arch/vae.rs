//! diffusers' `AutoencoderKL` config, and the tile its `enable_tiling` takes from it.

use std::path::Path;

use super::config::{read_json, Cfg, ConfigError};

#[derive(Debug, Clone, PartialEq)]
pub struct AutoencoderKLConfig {
    pub latent_channels: i64,
    pub out_channels: i64,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    pub norm_num_groups: i64,
    pub scaling_factor: f64,
    /// SD3's latents are shifted as well as scaled (`latents / scaling_factor + shift_factor`
    /// before decoding); None (null, absent) for SD 1.x/2.x and SDXL.
    pub shift_factor: Option<f64>,
    pub force_upcast: bool,
    /// Whether the checkpoint has `quant_conv` (encoder side) / `post_quant_conv` (decoder
    /// side); SD3's VAE has neither.
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
    /// `sample_size`: the image size the VAE was trained at, which diffusers' tiling takes as its
    /// tile (`tile_sample_min_size`). None where the config has no integer `sample_size` (absent,
    /// null, or a list, with which diffusers' `tiled_decode` fails).
    pub sample_size: Option<i64>,
}

impl AutoencoderKLConfig {
    /// From `vae/config.json` (errors name the file and key).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Self::from_json_at(&read_json(path, "AutoencoderKL")?, path)
    }

    pub fn from_json(cfg: &serde_json::Value) -> Result<Self, ConfigError> {
        Self::from_json_at(cfg, Path::new("vae/config.json"))
    }

    /// diffusers' `AutoencoderKL.__init__` defaults where a key is absent or null.
    fn from_json_at(v: &serde_json::Value, path: &Path) -> Result<Self, ConfigError> {
        let cfg = Cfg::new(v, path, "AutoencoderKL")?;
        let err = |m: String| cfg.err(m);
        let block_out = cfg.dims("block_out_channels", None, &[64])?;
        let up = cfg.texts("up_block_types", &["UpDecoderBlock2D"])?;
        if up.iter().any(|t| t != "UpDecoderBlock2D") || up.len() != block_out.len() {
            return Err(err(format!("`up_block_types` {up:?} are not supported (one `UpDecoderBlock2D` per `block_out_channels` entry)")));
        }
        let act = cfg.text("act_fn", "silu")?;
        if act != "silu" {
            return Err(err(format!("`act_fn` `{act}` is not supported (only `silu`)")));
        }
        let groups = cfg.dim("norm_num_groups", 32)?;
        for (i, &c) in block_out.iter().enumerate() {
            if c % groups != 0 {
                return Err(err(format!("`block_out_channels[{i}]` {c} is not a multiple of `norm_num_groups` {groups}")));
            }
        }
        let scaling_factor = cfg.num("scaling_factor", 0.18215)?;
        if scaling_factor == 0.0 {
            return Err(err("`scaling_factor` must not be 0".into()));
        }
        Ok(AutoencoderKLConfig {
            latent_channels: cfg.dim("latent_channels", 4)?,
            out_channels: cfg.dim("out_channels", 3)?,
            block_out_channels: block_out,
            layers_per_block: cfg.dim("layers_per_block", 1)?,
            norm_num_groups: groups,
            scaling_factor,
            shift_factor: cfg.opt_num("shift_factor")?,
            force_upcast: cfg.flag("force_upcast", true)?,
            use_quant_conv: cfg.flag("use_quant_conv", true)?,
            use_post_quant_conv: cfg.flag("use_post_quant_conv", true)?,
            mid_block_add_attention: cfg.flag("mid_block_add_attention", true)?,
            sample_size: if v.get("sample_size").is_some_and(|x| x.is_array()) { None } else { cfg.has("sample_size").then(|| cfg.dim("sample_size", 0)).transpose()? },
        })
    }

    /// diffusers' tile for `enable_tiling` from this config (`path`, for the error): needs an
    /// integer `sample_size` whose latent tile keeps a non-zero stride.
    pub fn tile(&self, path: &Path) -> Result<Tile, ConfigError> {
        let err = |msg: String| ConfigError { path: path.to_path_buf(), model: "AutoencoderKL".into(), msg };
        let Some(sample) = self.sample_size else {
            return Err(
                err("VAE tiling (`components.vae.tiling = true`) needs an integer `sample_size` (the tile size in pixels, diffusers' `tile_sample_min_size`), and this config has none".into()),
            );
        };
        let tile = Tile::new(sample, self.block_out_channels.len());
        if tile.overlap() < 1 {
            return Err(err(format!(
                "`sample_size` {sample} is too small to tile: its latent tile ({} at {}x down) must be at least 2 for a non-zero stride",
                tile.latent,
                1 << (self.block_out_channels.len() - 1)
            )));
        }
        Ok(tile)
    }
}

/// diffusers' `AutoencoderKL` tiling: tiles of `latent` latents decoded to `sample` pixels,
/// overlapping by a quarter (`tile_overlap_factor = 0.25`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    /// `tile_sample_min_size`: the config's `sample_size`.
    pub sample: i64,
    /// `tile_latent_min_size`: `int(sample_size / 2 ** (levels - 1))`.
    pub latent: i64,
}

impl Tile {
    pub fn new(sample_size: i64, levels: usize) -> Self {
        Tile { sample: sample_size, latent: sample_size >> (levels - 1) }
    }
    /// The stride between tiles, in latents: `int(tile_latent_min_size * (1 - 0.25))`.
    pub fn overlap(&self) -> i64 {
        (self.latent as f64 * 0.75) as i64
    }
    /// The rows blended between neighbouring tiles, in pixels: `int(tile_sample_min_size * 0.25)`.
    pub fn blend(&self) -> i64 {
        (self.sample as f64 * 0.25) as i64
    }
    /// The pixels each tile contributes: `tile_sample_min_size - blend_extent`.
    pub fn row_limit(&self) -> i64 {
        self.sample - self.blend()
    }
    /// Whether diffusers' `_decode` tiles a latent of `h` x `w`.
    pub fn applies(&self, h: i64, w: i64) -> bool {
        h > self.latent || w > self.latent
    }
    /// Tiles along a latent side of `n`: `len(range(0, n, overlap))`.
    pub fn count(&self, n: i64) -> i64 {
        (n + self.overlap() - 1) / self.overlap()
    }
}
