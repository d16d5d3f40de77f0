//! diffusers' `FluxTransformer2DModel` config (FLUX.1 dev and schnell).

use std::path::Path;

use serde_json::Value;

use super::config::{Cfg, ConfigError};

const MODEL: &str = "FluxTransformer2DModel";

/// diffusers `FluxTransformer2DModel`'s config (defaults as there: FLUX.1's sizes).
#[derive(Debug, Clone, PartialEq)]
pub struct FluxTransformer2DConfig {
    /// Always 1: the pipeline packs 2x2 latent patches into `in_channels` itself.
    pub patch_size: i64,
    /// The packed latents' channels (4 x the VAE's latent channels).
    pub in_channels: i64,
    pub out_channels: i64,
    /// Double-stream blocks (`FluxTransformerBlock`).
    pub num_layers: i64,
    /// Single-stream blocks (`FluxSingleTransformerBlock`).
    pub num_single_layers: i64,
    pub attention_head_dim: i64,
    pub num_attention_heads: i64,
    /// T5's `d_model`.
    pub joint_attention_dim: i64,
    /// CLIP's pooled output width.
    pub pooled_projection_dim: i64,
    /// FLUX.1-dev's embedded (distilled) guidance; schnell has none.
    pub guidance_embeds: bool,
    /// The rotary embedding's channels per id axis; they sum to `attention_head_dim`.
    pub axes_dims_rope: Vec<i64>,
}

impl FluxTransformer2DConfig {
    /// From a component's `config.json` (`path` names it in errors).
    pub fn from_json(v: &Value, path: &Path) -> Result<Self, ConfigError> {
        let c = Cfg::new(v, path, MODEL)?;
        let in_channels = c.dim("in_channels", 64)?;
        let cfg = FluxTransformer2DConfig {
            patch_size: c.dim("patch_size", 1)?,
            in_channels,
            // diffusers: `out_channels or in_channels`.
            out_channels: c.dim("out_channels", in_channels as u64)?,
            num_layers: c.count("num_layers", 19)?,
            num_single_layers: c.count("num_single_layers", 38)?,
            attention_head_dim: c.dim("attention_head_dim", 128)?,
            num_attention_heads: c.dim("num_attention_heads", 24)?,
            joint_attention_dim: c.dim("joint_attention_dim", 4096)?,
            pooled_projection_dim: c.dim("pooled_projection_dim", 768)?,
            guidance_embeds: c.flag("guidance_embeds", false)?,
            axes_dims_rope: c.dims("axes_dims_rope", None, &[16, 56, 56])?,
        };
        // diffusers' forward never unpatchifies: proj_out's p*p*C channels would not be latents.
        if cfg.patch_size != 1 {
            return Err(c.err(format!("`patch_size` = {} is not supported (FLUX packs 2x2 patches in the pipeline; the model's is 1)", cfg.patch_size)));
        }
        if cfg.in_channels % 4 != 0 {
            return Err(c.err(format!("`in_channels` {} must be 4 x the VAE's latent channels (the pipeline packs 2x2 patches)", cfg.in_channels)));
        }
        if cfg.out_channels != cfg.in_channels {
            return Err(c.err(format!("`out_channels` {} must equal `in_channels` {} (the output is unpacked like the input)", cfg.out_channels, cfg.in_channels)));
        }
        let rope: i64 = cfg.axes_dims_rope.iter().sum();
        if cfg.axes_dims_rope.len() != 3 || cfg.axes_dims_rope.iter().any(|d| d % 2 != 0) || rope != cfg.attention_head_dim {
            return Err(
                c.err(format!("`axes_dims_rope` {:?} must be three even sizes that sum to `attention_head_dim` {} (one per id axis: index, row, column)", cfg.axes_dims_rope, cfg.attention_head_dim))
            );
        }
        Ok(cfg)
    }

    /// The width of the token streams, `num_attention_heads * attention_head_dim`.
    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Tensors whose shapes the config decides, enough to tell a checkpoint of another size or
    /// variant of the model: name -> shape, or `None` where the config says it is absent (a block
    /// past the last, schnell's guidance embedder). Checked before a weight is read.
    pub fn key_shapes(&self) -> Vec<(String, Option<Vec<u64>>)> {
        let (d, head) = (self.inner_dim() as u64, self.attention_head_dim as u64);
        let (l, s) = (self.num_layers as u64, self.num_single_layers as u64);
        let mut v = vec![
            ("x_embedder.weight".to_string(), Some(vec![d, self.in_channels as u64])),
            ("context_embedder.weight".to_string(), Some(vec![d, self.joint_attention_dim as u64])),
            ("time_text_embed.text_embedder.linear_1.weight".to_string(), Some(vec![d, self.pooled_projection_dim as u64])),
            ("time_text_embed.guidance_embedder.linear_1.weight".to_string(), self.guidance_embeds.then(|| vec![d, 256])),
            ("proj_out.weight".to_string(), Some(vec![(self.patch_size * self.patch_size * self.out_channels) as u64, d])),
            (format!("transformer_blocks.{l}.attn.to_q.weight"), None),
            (format!("single_transformer_blocks.{s}.proj_mlp.weight"), None),
        ];
        if l > 0 {
            v.push((format!("transformer_blocks.{}.attn.to_q.weight", l - 1), Some(vec![d, d])));
            v.push(("transformer_blocks.0.attn.norm_q.weight".to_string(), Some(vec![head])));
        }
        if s > 0 {
            v.push((format!("single_transformer_blocks.{}.proj_mlp.weight", s - 1), Some(vec![4 * d, d])));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<FluxTransformer2DConfig, String> {
        FluxTransformer2DConfig::from_json(&v, Path::new("transformer/config.json")).map_err(|e| e.to_string())
    }

    #[test]
    fn flux_dev_config_parses() {
        let c = parse(json!({"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "guidance_embeds": true, "in_channels": 64,
            "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768}))
        .unwrap();
        assert_eq!((c.inner_dim(), c.out_channels, c.axes_dims_rope.clone(), c.guidance_embeds), (3072, 64, vec![16, 56, 56], true));
    }

    #[test]
    fn unsupported_values_name_the_key() {
        for (v, key) in [
            (json!({"patch_size": 2}), "`patch_size`"),
            (json!({"axes_dims_rope": [16, 56, 57]}), "`axes_dims_rope`"),
            (json!({"attention_head_dim": 64}), "`axes_dims_rope`"),
            (json!({"out_channels": 16}), "`out_channels`"),
            (json!({"in_channels": 62, "out_channels": 62}), "`in_channels`"),
            (json!({"guidance_embeds": "yes"}), "`guidance_embeds`"),
        ] {
            let e = parse(v.clone()).unwrap_err();
            assert!(e.contains(key) && e.contains("transformer/config.json"), "{v}: {e}");
        }
    }
}
