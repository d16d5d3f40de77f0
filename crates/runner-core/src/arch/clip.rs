//! transformers' `CLIPTextConfig`, and the activations CLIP and T5 configs name.

use std::path::Path;

use serde_json::Value;

use super::config::ReadError;

/// transformers' `ACT2FN` names a CLIP config may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    QuickGelu,
    /// erf GELU (`GELUActivation`).
    Gelu,
    /// tanh approximation written out (`NewGELUActivation`).
    GeluNew,
    /// torch's tanh GELU (`GELUTanh`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
    Silu,
}

impl Activation {
    pub fn from_name(s: &str) -> Option<Activation> {
        Some(match s {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            "gelu_new" => Activation::GeluNew,
            "gelu_pytorch_tanh" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            _ => return None,
        })
    }
}

/// transformers `CLIPTextConfig`, the fields the text model reads (defaults as there).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub projection_dim: i64,
    pub eos_token_id: i64,
    /// `architectures` names `CLIPTextModelWithProjection` (SDXL's `text_encoder_2`).
    pub with_projection: bool,
}

impl ClipTextConfig {
    /// From a component's `config.json` value; errors name the key (shown as `config.json`).
    pub fn from_json(v: &Value) -> Result<Self, ReadError> {
        Self::from_json_at(v, Path::new("config.json"))
    }

    /// Reads `path` (a component's `config.json`).
    pub fn from_file(path: &Path) -> Result<Self, ReadError> {
        let text = std::fs::read_to_string(path).map_err(|source| ReadError::Io { path: path.to_path_buf(), source })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| ReadError::Config { path: path.to_path_buf(), msg: format!("invalid JSON: {e}") })?;
        Self::from_json_at(&v, path)
    }

    fn from_json_at(v: &Value, path: &Path) -> Result<Self, ReadError> {
        let err = |msg: String| ReadError::Config { path: path.to_path_buf(), msg };
        if !v.is_object() {
            return Err(err("expected a JSON object".into()));
        }
        // A present key of the wrong type is an error, not the default.
        let int = |key: &str, default: i64| -> Result<i64, ReadError> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x.as_i64().ok_or_else(|| err(format!("`{key}` must be an integer, got {x}"))),
            }
        };
        let positive = |key: &str, default: i64| -> Result<i64, ReadError> {
            let n = int(key, default)?;
            if n > 0 {
                Ok(n)
            } else {
                Err(err(format!("`{key}` must be positive, got {n}")))
            }
        };
        let act_name = match v.get("hidden_act") {
            None | Some(Value::Null) => "quick_gelu",
            Some(x) => x.as_str().ok_or_else(|| err(format!("`hidden_act` must be a string, got {x}")))?,
        };
        let hidden_act = Activation::from_name(act_name).ok_or_else(|| err(format!("`hidden_act` `{act_name}` is not supported (quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, relu, silu)")))?;
        let layer_norm_eps = match v.get("layer_norm_eps") {
            None | Some(Value::Null) => 1e-5,
            Some(x) => x.as_f64().ok_or_else(|| err(format!("`layer_norm_eps` must be a number, got {x}")))?,
        };
        let with_projection = v.get("architectures").and_then(Value::as_array).is_some_and(|a| a.iter().any(|s| s.as_str() == Some("CLIPTextModelWithProjection")));
        let c = ClipTextConfig {
            vocab_size: positive("vocab_size", 49408)?,
            hidden_size: positive("hidden_size", 512)?,
            intermediate_size: positive("intermediate_size", 2048)?,
            num_hidden_layers: int("num_hidden_layers", 12)?,
            num_attention_heads: positive("num_attention_heads", 8)?,
            max_position_embeddings: positive("max_position_embeddings", 77)?,
            hidden_act,
            layer_norm_eps,
            projection_dim: positive("projection_dim", 512)?,
            eos_token_id: int("eos_token_id", 49407)?,
            with_projection,
        };
        if c.num_hidden_layers < 0 {
            return Err(err(format!("`num_hidden_layers` must not be negative, got {}", c.num_hidden_layers)));
        }
        if c.hidden_size % c.num_attention_heads != 0 {
            return Err(err(format!("`hidden_size` {} is not a multiple of `num_attention_heads` {}", c.hidden_size, c.num_attention_heads)));
        }
        Ok(c)
    }

    pub fn model_name(&self) -> &'static str {
        if self.with_projection {
            "CLIPTextModelWithProjection"
        } else {
            "CLIPTextModel"
        }
    }
}
