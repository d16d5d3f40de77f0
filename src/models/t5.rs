//! T5 encoder (transformers `T5EncoderModel`, models/t5/modeling_t5.py of transformers 5.24): SD3's
//! and FLUX's `text_encoder_3` / `text_encoder_2`. Variables sit at the checkpoint's key paths
//! (`encoder.block.{i}.layer.0.SelfAttention.q.weight`, ...), so a sharded T5-XXL loads unchanged.
//!
//! What transformers does and this follows: the relative position bias comes from the first
//! block's `relative_attention_bias` and is shared by every block; attention scores are not scaled
//! (T5 folds the scale into its initialisation); the layer norm is an RMS norm accumulated in fp32;
//! v1.1 checkpoints use a gated-GELU (`gelu_new`) feed-forward; in an fp16 model the `wo`
//! projections stay fp32 (`_keep_in_fp32_modules`) and hidden states are clamped to fp16's range
//! after each sub-layer. `encoder.embed_tokens.weight` is tied to `shared.weight`: a checkpoint
//! holding either (or both) loads.

use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

use crate::arch::config::ConfigError;
pub use crate::arch::t5::T5Config;
use crate::checkpoint::layout::Checkpoint;
use crate::checkpoint::load::Mapped;
use crate::models::clip::{Activation, Apply};
use crate::models::hooks::{path_of, scoped};
use crate::models::weights::{build_from_checkpoint, param, param_at, WeightsError};

#[derive(Debug, thiserror::Error)]
pub enum T5Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("T5EncoderModel: libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// A bias-free linear layer announcing its path, with any live LoRA adapters beside it.
struct Linear {
    weight: Tensor,
    path: String,
    lora: Option<crate::models::lora::Live>,
}

impl Linear {
    fn new(p: nn::Path, d_in: i64, d_out: i64) -> Linear {
        Self::with(p, param_weight(d_in, d_out))
    }

    /// A `wo`: fp32 in an fp16 model.
    fn keep_fp32(p: nn::Path, d_in: i64, d_out: i64, model_kind: Kind) -> Linear {
        if model_kind == Kind::Half {
            let weight = param_at(&p, "weight", &[d_out, d_in], Kind::Float);
            return Self::with(p, |_| weight);
        }
        Self::with(p, param_weight(d_in, d_out))
    }

    fn with(p: nn::Path, weight: impl FnOnce(&nn::Path) -> Tensor) -> Linear {
        let weight = weight(&p);
        let path = path_of(&p);
        let lora = crate::models::lora::Live::take(&p, &format!("{path}.weight"), weight.kind(), None);
        Linear { weight, path, lora }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        scoped(&self.path, || {
            let y = x.f_linear::<&Tensor>(&self.weight, None)?;
            match &self.lora {
                Some(l) => l.apply(x, y),
                None => Ok(y),
            }
        })
    }
}

fn param_weight(d_in: i64, d_out: i64) -> impl FnOnce(&nn::Path) -> Tensor {
    move |p| param(p, "weight", &[d_out, d_in], nn::Init::Const(0.))
}

/// `T5LayerNorm`: RMS norm without bias, the variance accumulated in fp32.
struct LayerNorm {
    weight: Tensor,
    eps: f64,
    path: String,
}

impl LayerNorm {
    fn new(p: nn::Path, dim: i64, eps: f64) -> LayerNorm {
        LayerNorm { weight: param(&p, "weight", &[dim], nn::Init::Const(1.)), eps, path: path_of(&p) }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        scoped(&self.path, || {
            let variance = x.f_to_kind(Kind::Float)?.f_pow_tensor_scalar(2)?.f_mean_dim(-1, true, None::<Kind>)?;
            let mut h = x.f_mul(&variance.f_add_scalar(self.eps)?.f_rsqrt()?)?;
            if matches!(self.weight.kind(), Kind::Half | Kind::BFloat16) {
                h = h.f_to_kind(self.weight.kind())?;
            }
            self.weight.f_mul(&h)
        })
    }
}

/// An embedding table announcing its path (streamed like any other module).
struct Embedding {
    weight: Tensor,
    path: String,
}

impl Embedding {
    fn new(p: nn::Path, n: i64, dim: i64) -> Embedding {
        Embedding { weight: param(&p, "weight", &[n, dim], nn::Init::Const(0.)), path: path_of(&p) }
    }

    fn forward(&self, ids: &Tensor) -> Result<Tensor, tch::TchError> {
        scoped(&self.path, || Tensor::f_embedding(&self.weight, &ids.f_to_device(self.weight.device())?, -1, false, false))
    }
}

/// `T5Block` of the encoder: self-attention then feed-forward, each pre-normed with a residual.
struct Block {
    path: String,
    attn_norm: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ff_norm: LayerNorm,
    /// `wi`, or `wi_0` when gated.
    wi: Linear,
    /// `wi_1` (gated only).
    wi_1: Option<Linear>,
    wo: Linear,
    act: Activation,
}

impl Block {
    fn new(p: nn::Path, c: &T5Config, kind: Kind) -> Block {
        let attn = &p / "layer" / 0;
        let sa = &attn / "SelfAttention";
        let ff = &p / "layer" / 1;
        let dense = &ff / "DenseReluDense";
        let inner = c.num_heads * c.d_kv;
        let (wi, wi_1) =
            if c.gated { (Linear::new(&dense / "wi_0", c.d_model, c.d_ff), Some(Linear::new(&dense / "wi_1", c.d_model, c.d_ff))) } else { (Linear::new(&dense / "wi", c.d_model, c.d_ff), None) };
        Block {
            path: path_of(&p),
            attn_norm: LayerNorm::new(&attn / "layer_norm", c.d_model, c.layer_norm_epsilon),
            q: Linear::new(&sa / "q", c.d_model, inner),
            k: Linear::new(&sa / "k", c.d_model, inner),
            v: Linear::new(&sa / "v", c.d_model, inner),
            o: Linear::new(&sa / "o", inner, c.d_model),
            ff_norm: LayerNorm::new(&ff / "layer_norm", c.d_model, c.layer_norm_epsilon),
            wi,
            wi_1,
            wo: Linear::keep_fp32(&dense / "wo", c.d_ff, c.d_model, kind),
            act: c.act,
        }
    }

    fn forward(&self, x: &Tensor, bias: &Tensor, heads: i64) -> Result<Tensor, tch::TchError> {
        scoped(&self.path, || {
            // A T5 split across devices: the activations and the bias follow the block.
            let device = self.q.weight.device();
            let (x, bias) = (&x.f_to_device(device)?, &bias.f_to_device(device)?);
            let (b, t, _) = x.size3()?;
            let y = self.attn_norm.forward(x)?;
            let split = |z: Tensor| z.f_view([b, t, heads, -1])?.f_transpose(1, 2);
            let (q, k, v) = (split(self.q.forward(&y)?)?, split(self.k.forward(&y)?)?, split(self.v.forward(&y)?)?);
            // Unscaled scores plus the position bias, softmax over keys: transformers' default
            // (sdpa) attention, the bias as SDPA's additive mask at scale 1 (bit-equal to it; the
            // eager matmul-add-softmax differs in the last bits).
            let mask = bias.f_to_kind(q.kind())?.f_contiguous()?;
            let a = Tensor::f_scaled_dot_product_attention(&q, &k, &v, Some(&mask), 0.0, false, 1.0, false)?.f_transpose(1, 2)?.f_reshape([b, t, -1])?;
            let x = clamp_fp16(&x.f_add(&self.o.forward(&a)?)?)?;
            let y = self.ff_norm.forward(&x)?;
            let h = self.act.apply(&self.wi.forward(&y)?)?;
            let h = match &self.wi_1 {
                None => h,
                Some(wi_1) => h.f_mul(&wi_1.forward(&y)?)?,
            };
            // `wo` may be fp32 in an fp16 model: its input follows it (and the sum promotes).
            let h = if h.kind() != self.wo.weight.kind() { h.f_to_kind(self.wo.weight.kind())? } else { h };
            clamp_fp16(&x.f_add(&self.wo.forward(&h)?)?)
        })
    }
}

/// transformers' fp16 guard after each sub-layer: clamp to the largest finite value (1000 below
/// it when an inf already appeared).
fn clamp_fp16(x: &Tensor) -> Result<Tensor, tch::TchError> {
    if x.kind() != Kind::Half {
        return Ok(x.shallow_clone());
    }
    let max = 65504.0 - if x.f_isinf()?.f_any()?.int64_value(&[]) != 0 { 1000.0 } else { 0.0 };
    x.f_clamp(-max, max)
}

/// `_relative_position_bucket` for a bidirectional encoder: [query, key] bucket ids.
fn position_buckets(len: i64, num_buckets: i64, max_distance: i64, device: Device) -> Result<Tensor, tch::TchError> {
    let ctx = Tensor::f_arange(len, (Kind::Int64, device))?.f_unsqueeze(1)?;
    let mem = Tensor::f_arange(len, (Kind::Int64, device))?.f_unsqueeze(0)?;
    let rel = mem.f_sub(&ctx)?;
    let half = num_buckets / 2;
    let mut buckets = rel.f_gt(0)?.f_to_kind(Kind::Int64)?.f_mul_scalar(half)?;
    let rel = rel.f_abs()?;
    let max_exact = half / 2;
    let is_small = rel.f_lt(max_exact)?;
    // max_exact + log(rel / max_exact) / log(max_distance / max_exact) * (half - max_exact), truncated.
    let large = rel
        .f_to_kind(Kind::Float)?
        .f_div_scalar(max_exact as f64)?
        .f_log()?
        .f_div_scalar((max_distance as f64 / max_exact as f64).ln())?
        .f_mul_scalar((half - max_exact) as f64)?
        .f_to_kind(Kind::Int64)?
        .f_add_scalar(max_exact)?
        .f_clamp_max(half - 1)?;
    buckets = buckets.f_add(&rel.f_where_self(&is_small, &large)?)?;
    Ok(buckets)
}

/// transformers `T5EncoderModel`.
pub struct T5EncoderModel {
    pub config: T5Config,
    vs: VarStore,
    mapped: Mapped,
    shared: Embedding,
    relative_attention_bias: Embedding,
    blocks: Vec<Block>,
    final_layer_norm: LayerNorm,
}

impl T5EncoderModel {
    /// Builds the model from `ck`, strictly; floats at `kind` (the `wo`s fp32 when `kind` is fp16).
    pub fn load(config: &T5Config, ck: &Checkpoint, device: Device, kind: Kind) -> Result<Self, T5Error> {
        let c = config;
        // The tied embedding: `shared.weight` is the parameter; a copy saved as
        // `encoder.embed_tokens.weight` is the same tensor (taken when `shared` is absent).
        let tied = "encoder.embed_tokens.weight";
        let embed_key = if ck.tensors.contains_key("shared.weight") || !ck.tensors.contains_key(tied) { "shared" } else { "encoder.embed_tokens" };
        let ck = if embed_key == "shared" && ck.tensors.contains_key(tied) {
            Checkpoint { tensors: ck.tensors.iter().filter(|(k, _)| k.as_str() != tied).map(|(k, v)| (k.clone(), v.clone())).collect(), ..ck.clone() }
        } else {
            ck.clone()
        };
        let vs = VarStore::new(device);
        let ((shared, relative_attention_bias, blocks, final_layer_norm), mapped) = build_from_checkpoint(&vs, &ck, "T5EncoderModel", kind, |root| {
            let emb = embed_key.split('.').fold(root.clone(), |p, s| &p / s);
            let shared = Embedding::new(emb, c.vocab_size, c.d_model);
            let enc = &root / "encoder";
            let bias = Embedding::new(&enc / "block" / 0 / "layer" / 0 / "SelfAttention" / "relative_attention_bias", c.relative_attention_num_buckets, c.num_heads);
            let blocks = (0..c.num_layers).map(|i| Block::new(&enc / "block" / i, c, kind)).collect::<Vec<_>>();
            let final_layer_norm = LayerNorm::new(&enc / "final_layer_norm", c.d_model, c.layer_norm_epsilon);
            (shared, bias, blocks, final_layer_norm)
        })?;
        Ok(T5EncoderModel { config: c.clone(), vs, mapped, shared, relative_attention_bias, blocks, final_layer_norm })
    }

    /// The variables (the executor moves and accounts them).
    pub fn varstore(&self) -> &VarStore {
        &self.vs
    }

    /// The mapped checkpoint files its same-dtype CPU parameters view.
    pub fn mapped(&self) -> &Mapped {
        &self.mapped
    }

    /// `last_hidden_state` [B, T, d_model] for `input_ids` [B, T] (no attention mask, as the
    /// diffusion pipelines call it).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor, T5Error> {
        let c = &self.config;
        let t = input_ids.size()[1];
        let mut x = self.shared.forward(input_ids)?;
        // compute_bias: [1, heads, T, T] from the first block's table, shared by all blocks.
        let buckets = position_buckets(t, c.relative_attention_num_buckets, c.relative_attention_max_distance, self.relative_attention_bias.weight.device())?;
        let bias = self.relative_attention_bias.forward(&buckets)?.f_permute([2, 0, 1])?.f_unsqueeze(0)?;
        for block in &self.blocks {
            x = block.forward(&x, &bias, c.num_heads)?;
        }
        let x = x.f_to_device(self.final_layer_norm.weight.device())?;
        Ok(self.final_layer_norm.forward(&x)?)
    }
}
