//! diffusers' `SD3Transformer2DModel` config (SD3 medium, SD 3.5's MMDiT-X).

use std::path::Path;

use serde_json::Value;

use super::config::{Cfg, ConfigError};

const MODEL: &str = "SD3Transformer2DModel";

/// The query/key normalisation of the attentions (`qk_norm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    /// `"rms_norm"` (SD 3.5): an RMS norm with a weight over each head, eps 1e-6.
    RmsNorm,
}

/// diffusers `SD3Transformer2DModel`'s config (defaults as there: SD3 medium's sizes).
#[derive(Debug, Clone, PartialEq)]
pub struct SD3Transformer2DConfig {
    /// The default latent height/width (the pipeline's default image size / vae_scale_factor).
    pub sample_size: i64,
    pub patch_size: i64,
    pub in_channels: i64,
    pub num_layers: i64,
    pub attention_head_dim: i64,
    pub num_attention_heads: i64,
    /// The channels of the text states (T5 `d_model`, and CLIP's zero-padded to it).
    pub joint_attention_dim: i64,
    /// `context_embedder`'s output: equal to `num_attention_heads * attention_head_dim`.
    pub caption_projection_dim: i64,
    /// The pooled CLIP embeddings' channels (both encoders' concatenated).
    pub pooled_projection_dim: i64,
    pub out_channels: i64,
    /// The side of the stored position grid, in patches: larger latents are refused.
    pub pos_embed_max_size: i64,
    /// The blocks with a second self-attention (`attn2`, MMDiT-X); indices past the last block
    /// have no effect, as in diffusers.
    pub dual_attention_layers: Vec<i64>,
    pub qk_norm: Option<QkNorm>,
}

impl SD3Transformer2DConfig {
    /// Tensors whose shapes the config decides (see `FluxTransformer2DConfig::key_shapes`):
    /// embedders, the output projection, the block count, SD3.5's second attentions and q/k norms.
    pub fn key_shapes(&self) -> Vec<(String, Option<Vec<u64>>)> {
        let d = (self.num_attention_heads * self.attention_head_dim) as u64;
        let (p, l) = (self.patch_size as u64, self.num_layers as u64);
        let mut v = vec![
            ("pos_embed.proj.weight".to_string(), Some(vec![d, self.in_channels as u64, p, p])),
            ("context_embedder.weight".to_string(), Some(vec![self.caption_projection_dim as u64, self.joint_attention_dim as u64])),
            ("time_text_embed.text_embedder.linear_1.weight".to_string(), Some(vec![d, self.pooled_projection_dim as u64])),
            ("proj_out.weight".to_string(), Some(vec![p * p * self.out_channels as u64, d])),
            (format!("transformer_blocks.{l}.attn.to_q.weight"), None),
        ];
        if l > 0 {
            v.push((format!("transformer_blocks.{}.attn.to_q.weight", l - 1), Some(vec![d, d])));
            v.push(("transformer_blocks.0.attn.norm_q.weight".to_string(), self.qk_norm.map(|_| vec![self.attention_head_dim as u64])));
        }
        for i in 0..l {
            let dual = self.dual_attention_layers.contains(&(i as i64));
            v.push((format!("transformer_blocks.{i}.attn2.to_q.weight"), dual.then(|| vec![d, d])));
        }
        v
    }

    /// From a component's `config.json` (`path` names it in errors).
    pub fn from_json(v: &Value, path: &Path) -> Result<Self, ConfigError> {
        let c = Cfg::new(v, path, MODEL)?;
        let in_channels = c.dim("in_channels", 16)?;
        // diffusers: `out_channels if out_channels is not None else in_channels` (absent: 16).
        let out_channels = if v.get("out_channels").is_some_and(Value::is_null) { in_channels } else { c.dim("out_channels", 16)? };
        // A null size makes diffusers compute an uncropped sincos table at run time instead of
        // storing one; no SD3 checkpoint does that.
        if v.get("pos_embed_max_size").is_some_and(Value::is_null) {
            return Err(c.err("`pos_embed_max_size` = null (position embeddings computed at run time, not stored) is not supported by runner"));
        }
        let dual_attention_layers = match v.get("dual_attention_layers") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => {
                a.iter().enumerate().map(|(i, x)| x.as_i64().ok_or_else(|| c.err(format!("`dual_attention_layers[{i}]` must be an integer, got {x}")))).collect::<Result<Vec<_>, _>>()?
            }
            Some(x) => return Err(c.err(format!("`dual_attention_layers` must be a list of block indices, got {x}"))),
        };
        let qk_norm = match c.opt_text("qk_norm")? {
            None => None,
            Some("rms_norm") => Some(QkNorm::RmsNorm),
            Some(other) => return Err(c.err(format!("`qk_norm` = {other:?} is not supported by runner (null or \"rms_norm\")"))),
        };
        let cfg = SD3Transformer2DConfig {
            sample_size: c.dim("sample_size", 128)?,
            patch_size: c.dim("patch_size", 2)?,
            in_channels,
            num_layers: c.dim("num_layers", 18)?,
            attention_head_dim: c.dim("attention_head_dim", 64)?,
            num_attention_heads: c.dim("num_attention_heads", 18)?,
            joint_attention_dim: c.dim("joint_attention_dim", 4096)?,
            caption_projection_dim: c.dim("caption_projection_dim", 1152)?,
            pooled_projection_dim: c.dim("pooled_projection_dim", 2048)?,
            out_channels,
            pos_embed_max_size: c.dim("pos_embed_max_size", 96)?,
            dual_attention_layers,
            qk_norm,
        };
        // The projected text states enter blocks of width heads * head_dim (diffusers fails at
        // the first block's norm otherwise).
        if cfg.caption_projection_dim != cfg.inner_dim() {
            return Err(c.err(format!("`caption_projection_dim` {} must equal `num_attention_heads` * `attention_head_dim` = {}", cfg.caption_projection_dim, cfg.inner_dim())));
        }
        Ok(cfg)
    }

    /// The width of the token streams, `num_attention_heads * attention_head_dim`.
    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }
}
