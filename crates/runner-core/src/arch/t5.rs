//! transformers' `T5Config` (SD3's `text_encoder_3`, FLUX's `text_encoder_2`).

use std::path::Path;

use serde_json::Value;

use super::clip::Activation;
use super::config::{Cfg, ConfigError};

/// transformers `T5Config`, the fields the encoder reads (defaults as there).
#[derive(Debug, Clone, PartialEq)]
pub struct T5Config {
    pub vocab_size: i64,
    pub d_model: i64,
    pub d_kv: i64,
    pub d_ff: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub relative_attention_num_buckets: i64,
    pub relative_attention_max_distance: i64,
    pub layer_norm_epsilon: f64,
    /// `feed_forward_proj = "gated-..."` (T5 1.1, T5-XXL): act(`wi_0`) * `wi_1`; else act(`wi`).
    pub gated: bool,
    /// `dense_act_fn` (transformers derives it from `feed_forward_proj`; "gelu" means `gelu_new`).
    pub act: Activation,
}

impl T5Config {
    /// From a component's `config.json` (`path` names it in errors).
    pub fn from_json(v: &Value, path: &Path) -> Result<Self, ConfigError> {
        let c = Cfg::new(v, path, "T5EncoderModel")?;
        let proj = c.text("feed_forward_proj", "relu")?;
        let (gated, derived) = match proj.strip_prefix("gated-") {
            Some(act) => (true, act),
            None => (false, proj),
        };
        // T5Config: `dense_act_fn` is the part after "gated-", with "gelu" read as "gelu_new".
        let derived = if derived == "gelu" { "gelu_new" } else { derived };
        let act_name = c.text("dense_act_fn", derived)?;
        let act = Activation::from_name(act_name).ok_or_else(|| c.err(format!("`dense_act_fn` = {act_name:?} (from `feed_forward_proj` = {proj:?}) is not an activation runner implements")))?;
        Ok(T5Config {
            vocab_size: c.dim("vocab_size", 32128)?,
            d_model: c.dim("d_model", 512)?,
            d_kv: c.dim("d_kv", 64)?,
            d_ff: c.dim("d_ff", 2048)?,
            num_layers: c.dim("num_layers", 6)?,
            num_heads: c.dim("num_heads", 8)?,
            relative_attention_num_buckets: c.dim("relative_attention_num_buckets", 32)?,
            relative_attention_max_distance: c.dim("relative_attention_max_distance", 128)?,
            layer_norm_epsilon: c.num("layer_norm_epsilon", 1e-6)?,
            gated,
            act,
        })
    }
}
