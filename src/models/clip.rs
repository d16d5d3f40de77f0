//! CLIP text encoders (transformers `CLIPTextModel`, `CLIPTextModelWithProjection`,
//! models/clip/modeling_clip.py of transformers 5.24), with variables at the checkpoint's key
//! paths so that [`build_from_checkpoint`](super::weights::build_from_checkpoint) fills them strictly.
//!
//! Key layout: transformers 5 saves `CLIPTextModel` without the `text_model.` prefix
//! (`embeddings.token_embedding.weight`), transformers 4 and original SD checkpoints with it;
//! transformers accepts both (`PrefixChange(prefix_to_remove="text_model")` in
//! conversion_mapping.py), so the model's root follows the checkpoint. The projection model
//! always nests the text model under `text_model.` beside `text_projection.weight`.

use std::path::Path;

use tch::nn::{self, Init, VarStore};
use tch::{Device, Kind, Tensor};

pub use crate::arch::clip::{Activation, ClipTextConfig};
use crate::checkpoint::layout::{resolve_folder, Checkpoint, Library, VariantPolicy};
use crate::checkpoint::CheckpointError;
use crate::models::hooks::{path_of, scoped};
use crate::models::weights::{build_from_checkpoint, param, WeightsError};

#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    #[error(transparent)]
    Config(#[from] crate::arch::config::ReadError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{model}: {msg}")]
    Input { model: &'static str, msg: String },
    #[error("{model}: libtorch: {source}")]
    Torch { model: &'static str, source: tch::TchError },
}

/// [`Activation`]'s tensor function.
pub(crate) trait Apply {
    fn apply(self, x: &Tensor) -> Result<Tensor, tch::TchError>;
}

impl Apply for Activation {
    fn apply(self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        match self {
            // QuickGELUActivation: x * sigmoid(1.702 x)
            Activation::QuickGelu => x.f_mul(&x.f_mul_scalar(1.702)?.f_sigmoid()?),
            Activation::Gelu => x.f_gelu("none"),
            Activation::GeluTanh => x.f_gelu("tanh"),
            // NewGELUActivation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            Activation::GeluNew => {
                let inner = x.f_add(&x.f_pow_tensor_scalar(3.0)?.f_mul_scalar(0.044715)?)?.f_mul_scalar((2.0 / std::f64::consts::PI).sqrt())?;
                x.f_mul_scalar(0.5)?.f_mul(&inner.f_tanh()?.f_add_scalar(1.0)?)
            }
            Activation::Relu => x.f_relu(),
            Activation::Silu => x.f_silu(),
        }
    }
}

/// A linear layer whose parameters are `p/weight` and `p/bias` (shared with the vision tower of
/// the safety checker).
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    path: String,
    /// Live LoRA adapters beside it.
    lora: Option<crate::models::lora::Live>,
}

impl Linear {
    pub(crate) fn new(p: nn::Path, d_in: i64, d_out: i64, bias: bool) -> Linear {
        let weight = param(&p, "weight", &[d_out, d_in], Init::Const(0.));
        let bias = bias.then(|| param(&p, "bias", &[d_out], Init::Const(0.)));
        let path = path_of(&p);
        let lora = crate::models::lora::Live::take(&p, &format!("{path}.weight"), weight.kind(), None);
        Linear { weight, bias, path, lora }
    }
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        scoped(&self.path, || {
            let y = x.f_linear(&self.weight, self.bias.as_ref())?;
            match &self.lora {
                Some(l) => l.apply(x, y),
                None => Ok(y),
            }
        })
    }
}

pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    dim: i64,
    path: String,
}

impl LayerNorm {
    pub(crate) fn new(p: nn::Path, dim: i64, eps: f64) -> LayerNorm {
        LayerNorm { weight: param(&p, "weight", &[dim], Init::Const(1.)), bias: param(&p, "bias", &[dim], Init::Const(0.)), eps, dim, path: path_of(&p) }
    }
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        scoped(&self.path, || x.f_layer_norm([self.dim], Some(&self.weight), Some(&self.bias), self.eps, true))
    }
}

/// `CLIPEncoderLayer`: pre-norm attention and MLP, each with a residual. The text encoder
/// attends causally; the vision tower (safety checker) everywhere.
pub(crate) struct EncoderLayer {
    path: String,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm1: LayerNorm,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    pub(crate) fn new(p: nn::Path, h: i64, i: i64, layer_norm_eps: f64) -> EncoderLayer {
        let attn = &p / "self_attn";
        let mlp = &p / "mlp";
        EncoderLayer {
            path: path_of(&p),
            q_proj: Linear::new(&attn / "q_proj", h, h, true),
            k_proj: Linear::new(&attn / "k_proj", h, h, true),
            v_proj: Linear::new(&attn / "v_proj", h, h, true),
            out_proj: Linear::new(&attn / "out_proj", h, h, true),
            layer_norm1: LayerNorm::new(&p / "layer_norm1", h, layer_norm_eps),
            layer_norm2: LayerNorm::new(&p / "layer_norm2", h, layer_norm_eps),
            fc1: Linear::new(&mlp / "fc1", h, i, true),
            fc2: Linear::new(&mlp / "fc2", i, h, true),
        }
    }

    pub(crate) fn forward(&self, x: &Tensor, heads: i64, act: Activation, causal: bool) -> Result<Tensor, tch::TchError> {
        scoped(&self.path, || self.forward_inner(x, heads, act, causal))
    }

    fn forward_inner(&self, x: &Tensor, heads: i64, act: Activation, causal: bool) -> Result<Tensor, tch::TchError> {
        let (b, t, h) = x.size3()?;
        let head_dim = h / heads;
        // CLIPAttention.forward: [B, T, H] -> [B, heads, T, head_dim], scale head_dim^-0.5.
        let y = self.layer_norm1.forward(x)?;
        let split = |z: Tensor| z.f_view([b, t, heads, head_dim])?.f_transpose(1, 2);
        let q = split(self.q_proj.forward(&y)?)?;
        let k = split(self.k_proj.forward(&y)?)?;
        let v = split(self.v_proj.forward(&y)?)?;
        // The text model's causal mask (`create_causal_mask`) as SDPA's `is_causal` (no padding
        // mask: the pipelines pass none).
        let a = Tensor::f_scaled_dot_product_attention(&q, &k, &v, None::<&Tensor>, 0.0, causal, (head_dim as f64).powf(-0.5), false)?;
        let a = a.f_transpose(1, 2)?.f_reshape([b, t, h])?;
        let x = x.f_add(&self.out_proj.forward(&a)?)?;
        let y = self.layer_norm2.forward(&x)?;
        let y = self.fc2.forward(&act.apply(&self.fc1.forward(&y)?)?)?;
        x.f_add(&y)
    }
}

/// What `forward(..., output_hidden_states=True)` returns, batch first.
#[derive(Debug)]
pub struct ClipTextOutput {
    /// The embeddings output, then every layer's output: `num_hidden_layers + 1` of [B, T, H]
    /// (the last is before `final_layer_norm`).
    pub hidden_states: Vec<Tensor>,
    /// [B, T, H], after `final_layer_norm`.
    pub last_hidden_state: Tensor,
    /// [B, H]: `last_hidden_state` at the eos position (`pooler_output`).
    pub pooled: Tensor,
    /// [B, projection_dim]: `text_projection(pooled)`, for the projection model.
    pub text_embeds: Option<Tensor>,
}

/// `CLIPTextModel` / `CLIPTextModelWithProjection` (per `config.with_projection`).
pub struct ClipTextModel {
    config: ClipTextConfig,
    /// Owns the variables the fields below are views of.
    _vs: VarStore,
    /// The mapped checkpoint files same-dtype parameters view.
    _mapped: crate::checkpoint::load::Mapped,
    token_embedding: Tensor,
    position_embedding: Tensor,
    /// Module paths of `embeddings`, `embeddings.token_embedding`, `embeddings.position_embedding`
    /// (with the checkpoint's prefix), announced to forward hooks.
    embedding_paths: [String; 3],
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
}

impl std::fmt::Debug for ClipTextModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTextModel").field("config", &self.config).field("device", &self.token_embedding.device()).finish()
    }
}

impl ClipTextModel {
    /// A component folder: `config.json` and `model[.variant].safetensors` (or its index); a
    /// missing variant falls back to the plain weights, as diffusers does.
    pub fn from_folder(dir: &Path, variant: Option<&str>, device: Device, kind: Kind) -> Result<Self, ClipError> {
        let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
        let ck = Checkpoint::open(resolve_folder(dir, Some(Library::Transformers), variant, VariantPolicy::FallBack)?)?;
        Self::load(&config, &ck, device, kind)
    }

    /// Builds the model and fills it from `ck`, strictly (every key present, shaped as the
    /// config says, nothing extra but optional buffers).
    pub fn load(config: &ClipTextConfig, ck: &Checkpoint, device: Device, kind: Kind) -> Result<Self, ClipError> {
        let c = config;
        let vs = VarStore::new(device);
        let legacy_prefix = ck.tensors.keys().any(|k| k.starts_with("text_model."));
        // The parameters are the checkpoint's tensors (views of the mapped file at the same dtype).
        let ((token_embedding, position_embedding, embedding_paths, layers, final_layer_norm, text_projection), mapped) = build_from_checkpoint(&vs, ck, c.model_name(), kind, |root| {
            let text = if c.with_projection || legacy_prefix { &root / "text_model" } else { root.clone() };
            let emb = &text / "embeddings";
            let embedding_paths = [path_of(&emb), path_of(&(&emb / "token_embedding")), path_of(&(&emb / "position_embedding"))];
            let token_embedding = param(&(&emb / "token_embedding"), "weight", &[c.vocab_size, c.hidden_size], Init::Const(0.));
            let position_embedding = param(&(&emb / "position_embedding"), "weight", &[c.max_position_embeddings, c.hidden_size], Init::Const(0.));
            let enc = &text / "encoder" / "layers";
            let layers: Vec<EncoderLayer> = (0..c.num_hidden_layers).map(|i| EncoderLayer::new(&enc / i, c.hidden_size, c.intermediate_size, c.layer_norm_eps)).collect();
            let final_layer_norm = LayerNorm::new(&text / "final_layer_norm", c.hidden_size, c.layer_norm_eps);
            let text_projection = c.with_projection.then(|| Linear::new(&root / "text_projection", c.hidden_size, c.projection_dim, false));
            (token_embedding, position_embedding, embedding_paths, layers, final_layer_norm, text_projection)
        })?;
        Ok(ClipTextModel { config: c.clone(), _vs: vs, _mapped: mapped, token_embedding, position_embedding, embedding_paths, layers, final_layer_norm, text_projection })
    }

    /// The mapped checkpoint files its same-dtype parameters view.
    pub fn mapped(&self) -> &crate::checkpoint::load::Mapped {
        &self._mapped
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// The variables (the executor moves and accounts them).
    pub fn varstore(&self) -> &VarStore {
        &self._vs
    }

    /// `input_ids`: [T] or [B, T] integer ids (moved to the model's device). Errors, rather
    /// than libtorch aborts, for sequences longer than `max_position_embeddings` or ids
    /// outside the vocabulary.
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput, ClipError> {
        let model = self.config.model_name();
        let input_err = |msg: String| ClipError::Input { model, msg };
        let torch = |source: tch::TchError| ClipError::Torch { model, source };
        let ids = match input_ids.dim() {
            1 => input_ids.f_unsqueeze(0).map_err(torch)?,
            2 => input_ids.shallow_clone(),
            d => return Err(input_err(format!("input_ids must be [T] or [B, T], got {d} dimensions"))),
        };
        if !matches!(ids.kind(), Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8) {
            return Err(input_err(format!("input_ids must be integers, got {:?}", ids.kind())));
        }
        let (b, t) = ids.size2().map_err(torch)?;
        if t > self.config.max_position_embeddings {
            return Err(input_err(format!("sequence length {t} exceeds max_position_embeddings {}", self.config.max_position_embeddings)));
        }
        if b == 0 || t == 0 {
            return Err(input_err(format!("input_ids is empty ({b} x {t})")));
        }
        let ids = ids.f_to_kind(Kind::Int64).map_err(torch)?.f_to_device(self.token_embedding.device()).map_err(torch)?;
        let (lo, hi) = (ids.f_min().map_err(torch)?.int64_value(&[]), ids.f_max().map_err(torch)?.int64_value(&[]));
        if lo < 0 || hi >= self.config.vocab_size {
            return Err(input_err(format!("token ids must be in 0..{}, got {lo}..={hi}", self.config.vocab_size)));
        }
        tch::no_grad(|| self.forward_checked(&ids)).map_err(torch)
    }

    /// `text_model.final_layer_norm` on a hidden state: diffusers' `clip_skip` takes
    /// `hidden_states[-(clip_skip + 1)]` through it (`StableDiffusionPipeline.encode_prompt`).
    pub fn apply_final_layer_norm(&self, hidden: &Tensor) -> Result<Tensor, ClipError> {
        let model = self.config.model_name();
        let h = hidden.size().last().copied();
        if h != Some(self.config.hidden_size) {
            return Err(ClipError::Input { model, msg: format!("final_layer_norm expects a last dimension of {}, got shape {:?}", self.config.hidden_size, hidden.size()) });
        }
        tch::no_grad(|| self.final_layer_norm.forward(hidden)).map_err(|source| ClipError::Torch { model, source })
    }

    fn forward_checked(&self, ids: &Tensor) -> Result<ClipTextOutput, tch::TchError> {
        let c = &self.config;
        let (b, t) = ids.size2()?;
        // CLIPTextEmbeddings: token + position embeddings (position_ids = arange(T)).
        let [emb, tok_path, pos_path] = &self.embedding_paths;
        let mut h = scoped(emb, || {
            let pos = Tensor::f_arange(t, (Kind::Int64, self.token_embedding.device()))?;
            let tok = scoped(tok_path, || Tensor::f_embedding(&self.token_embedding, ids, -1, false, false))?;
            tok.f_add(&scoped(pos_path, || Tensor::f_embedding(&self.position_embedding, &pos, -1, false, false))?)
        })?;
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        for layer in &self.layers {
            let next = layer.forward(&h, c.num_attention_heads, c.hidden_act, true)?;
            hidden_states.push(h);
            h = next;
        }
        hidden_states.push(h.shallow_clone());
        let last_hidden_state = self.final_layer_norm.forward(&h)?;
        // CLIPTextModel.forward's pooling: legacy configs (eos_token_id == 2) take the highest
        // id (the eos of the original vocabulary); newer ones the first `eos_token_id`.
        let eos_pos = if c.eos_token_id == 2 { ids.f_argmax(-1, false)? } else { ids.f_eq(c.eos_token_id)?.f_to_kind(Kind::Int)?.f_argmax(-1, false)? };
        let index = eos_pos.f_view([b, 1, 1])?.f_expand([b, 1, c.hidden_size], false)?;
        let pooled = last_hidden_state.f_gather(1, &index, false)?.f_squeeze_dim(1)?;
        let text_embeds = match &self.text_projection {
            Some(p) => Some(p.forward(&pooled)?),
            None => None,
        };
        Ok(ClipTextOutput { hidden_states, last_hidden_state, pooled, text_embeds })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_errors() {
        let c = ClipTextConfig::from_json(&serde_json::json!({"architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu"})).unwrap();
        assert_eq!((c.hidden_size, c.num_hidden_layers, c.eos_token_id, c.hidden_act, c.with_projection), (512, 12, 49407, Activation::Gelu, true));
        let e = ClipTextConfig::from_json(&serde_json::json!({"hidden_act": "xielu"})).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("hidden_act") && e.contains("xielu"), "{e}");
        let e = ClipTextConfig::from_json(&serde_json::json!({"hidden_size": 10, "num_attention_heads": 3})).unwrap_err().to_string();
        assert!(e.contains("num_attention_heads"), "{e}");
        let e = ClipTextConfig::from_json(&serde_json::json!({"hidden_size": "big"})).unwrap_err().to_string();
        assert!(e.contains("`hidden_size` must be an integer"), "{e}");
    }

    #[test]
    fn activations_match_their_formulas() {
        let x = Tensor::from_slice(&[-2.0f32, -0.5, 0.0, 0.7, 3.0]);
        let q = Activation::QuickGelu.apply(&x).unwrap();
        let want = &x * (&x * 1.702).sigmoid();
        assert!(q.allclose(&want, 1e-6, 1e-6, false));
        let n = Activation::GeluNew.apply(&x).unwrap();
        let t = Activation::GeluTanh.apply(&x).unwrap();
        assert!(n.allclose(&t, 1e-5, 1e-6, false));
    }
}
