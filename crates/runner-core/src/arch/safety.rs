//! The `CLIPConfig` of Stable Diffusion's safety checker (its vision tower's part).

use std::path::Path;

use serde_json::Value;

use super::clip::Activation;
use super::config::ReadError;

/// transformers `CLIPVisionConfig`, the fields `CLIPVisionModel` reads (defaults as there).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_channels: i64,
    pub image_size: i64,
    pub patch_size: i64,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

/// The `CLIPConfig` of a `safety_checker/config.json`: `vision_config` and `projection_dim`.
#[derive(Debug, Clone, PartialEq)]
pub struct SafetyCheckerConfig {
    pub vision: ClipVisionConfig,
    pub projection_dim: i64,
}

impl SafetyCheckerConfig {
    /// Reads `path` (a `safety_checker/config.json`).
    pub fn from_file(path: &Path) -> Result<Self, ReadError> {
        let text = std::fs::read_to_string(path).map_err(|source| ReadError::Io { path: path.to_path_buf(), source })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| ReadError::Config { path: path.to_path_buf(), msg: format!("invalid JSON: {e}") })?;
        Self::from_json_at(&v, path)
    }

    /// From a config value (errors shown as `config.json`).
    pub fn from_json(v: &Value) -> Result<Self, ReadError> {
        Self::from_json_at(v, Path::new("config.json"))
    }

    fn from_json_at(v: &Value, path: &Path) -> Result<Self, ReadError> {
        let err = |msg: String| ReadError::Config { path: path.to_path_buf(), msg };
        if !v.is_object() {
            return Err(err("expected a JSON object".into()));
        }
        let empty = Value::Object(Default::default());
        let vc = match v.get("vision_config") {
            None | Some(Value::Null) => &empty,
            Some(x) if x.is_object() => x,
            Some(x) => return Err(err(format!("`vision_config` must be an object, got {x}"))),
        };
        // A present key of the wrong type is an error, not the default.
        let positive = |obj: &Value, prefix: &str, key: &str, default: i64| -> Result<i64, ReadError> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x.as_i64().filter(|&n| n > 0).ok_or_else(|| err(format!("`{prefix}{key}` must be a positive integer, got {x}"))),
            }
        };
        let p = "vision_config.";
        let act_name = match vc.get("hidden_act") {
            None | Some(Value::Null) => "quick_gelu",
            Some(x) => x.as_str().ok_or_else(|| err(format!("`{p}hidden_act` must be a string, got {x}")))?,
        };
        let hidden_act = Activation::from_name(act_name).ok_or_else(|| err(format!("`{p}hidden_act` `{act_name}` is not supported (quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, relu, silu)")))?;
        let layer_norm_eps = match vc.get("layer_norm_eps") {
            None | Some(Value::Null) => 1e-5,
            Some(x) => x.as_f64().ok_or_else(|| err(format!("`{p}layer_norm_eps` must be a number, got {x}")))?,
        };
        let num_hidden_layers = match vc.get("num_hidden_layers") {
            None | Some(Value::Null) => 12,
            Some(x) => x.as_i64().filter(|&n| n >= 0).ok_or_else(|| err(format!("`{p}num_hidden_layers` must be a non-negative integer, got {x}")))?,
        };
        let vision = ClipVisionConfig {
            hidden_size: positive(vc, p, "hidden_size", 768)?,
            intermediate_size: positive(vc, p, "intermediate_size", 3072)?,
            num_hidden_layers,
            num_attention_heads: positive(vc, p, "num_attention_heads", 12)?,
            num_channels: positive(vc, p, "num_channels", 3)?,
            image_size: positive(vc, p, "image_size", 224)?,
            patch_size: positive(vc, p, "patch_size", 32)?,
            hidden_act,
            layer_norm_eps,
        };
        if vision.hidden_size % vision.num_attention_heads != 0 {
            return Err(err(format!("`{p}hidden_size` {} is not a multiple of `{p}num_attention_heads` {}", vision.hidden_size, vision.num_attention_heads)));
        }
        if vision.patch_size > vision.image_size {
            return Err(err(format!("`{p}patch_size` {} exceeds `{p}image_size` {}", vision.patch_size, vision.image_size)));
        }
        if vision.num_channels != 3 {
            return Err(err(format!("`{p}num_channels` must be 3 (RGB images), got {}", vision.num_channels)));
        }
        Ok(SafetyCheckerConfig { vision, projection_dim: positive(v, "", "projection_dim", 512)? })
    }
}
