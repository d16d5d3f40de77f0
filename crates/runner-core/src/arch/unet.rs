//! diffusers' `UNet2DConditionModel` config (SD 1.x, 2.x, XL).

use std::path::Path;

use super::config::{read_json, Cfg, ConfigError};

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
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Self::from_json_at(&read_json(path, "UNet2DConditionModel")?, path)
    }

    pub fn from_json(cfg: &serde_json::Value) -> Result<Self, ConfigError> {
        Self::from_json_at(cfg, Path::new("unet/config.json"))
    }

    /// diffusers' `UNet2DConditionModel.__init__` defaults where a key is absent or null.
    fn from_json_at(v: &serde_json::Value, path: &Path) -> Result<Self, ConfigError> {
        let cfg = Cfg::new(v, path, "UNet2DConditionModel")?;
        let err = |m: String| cfg.err(m);
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
