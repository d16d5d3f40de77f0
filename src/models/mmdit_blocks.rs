//! The MMDiT pieces of diffusers 0.42.1 that SD3's transformer is built from (FLUX shares most):
//! `JointTransformerBlock` (attention.py), `Attention` with `JointAttnProcessor2_0`
//! (attention_processor.py), `AdaLayerNormZero`, `SD35AdaLayerNormZeroX`,
//! `AdaLayerNormContinuous` and `RMSNorm` (normalization.py), `FeedForward` with the tanh GELU
//! (`activation_fn="gelu-approximate"`), and the timestep/pooled-text conditioning
//! (`CombinedTimestepTextProjEmbeddings`, with FLUX-dev's guidance embedder: embeddings.py).
//! Variables sit at the checkpoint's key paths.
//!
//! The parameter-free `nn.LayerNorm`s (`norm1.norm`, `norm2`, `norm2_context`) are plain function
//! calls: they hold no weights for forward hooks to bring.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use crate::models::embeddings::timestep_embedding;
use crate::models::hooks::{path_of, scoped};
use crate::models::resnet::on;
use crate::models::weights::param;

/// `nn.Linear` with a bias, announcing its path. From a GGUF checkpoint, diffusers' `GGUFLinear`:
/// a quantized weight stays in its blocks and is dequantized to the compute dtype as the layer
/// runs (the copy dropped after).
pub(crate) struct Linear {
    pub(crate) weight: Tensor,
    bias: Tensor,
    path: String,
    /// Layerwise casting: parameters stored narrower, cast as the layer runs.
    cast: Option<crate::models::cast::Cast>,
    /// A GGUF-quantized weight's type and shape, and the dtype it computes in.
    quant: Option<(crate::models::quantized::Quant, Kind)>,
    /// Live LoRA adapters beside it.
    lora: Option<crate::models::lora::Live>,
}

impl Linear {
    pub(crate) fn new(p: nn::Path, d_in: i64, d_out: i64) -> Linear {
        let (weight, quant) = crate::models::weights::param_quantizable(&p, "weight", &[d_out, d_in], Init::Const(0.));
        let bias = param(&p, "bias", &[d_out], Init::Const(0.));
        let path = path_of(&p);
        // Preflight refuses `storage_dtype` on a GGUF component: nothing to cast a quantized layer to.
        let cast = if quant.is_some() { None } else { crate::models::cast::layer(&path, &[&weight, &bias]) };
        // The pairs run at the compute dtype: a quantized or cast weight's, else the weight's own.
        let kind = quant.as_ref().map(|(_, k)| *k).or(cast.map(|c| c.compute)).unwrap_or(weight.kind());
        let lora = crate::models::lora::Live::take(&p, &format!("{path}.weight"), kind, None);
        Linear { weight, bias, path, cast, quant, lora }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        use crate::models::cast::compute;
        scoped(&self.path, || {
            let y = match &self.quant {
                Some((q, kind)) => crate::models::quantized::linear(x, &self.weight, q, Some(&self.bias), *kind),
                None => x.f_linear(&compute(&self.weight, self.cast), Some(&compute(&self.bias, self.cast))),
            }?;
            match &self.lora {
                Some(l) => l.apply(x, y),
                None => Ok(y),
            }
        })
    }
}

/// `nn.LayerNorm(dim, elementwise_affine=False)` over the last dimension.
pub(crate) fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor, tch::TchError> {
    let dim = x.size().last().copied().unwrap_or(1);
    x.f_layer_norm([dim], None::<&Tensor>, None::<&Tensor>, eps, true)
}

/// `t[:, None]`: a [B, D] modulation broadcast over the sequence.
pub(crate) fn per_token(t: &Tensor) -> Result<Tensor, tch::TchError> {
    t.f_unsqueeze(1)
}

/// `norm(x) * (1 + scale[:, None]) + shift[:, None]`, in diffusers' order of operations.
pub(crate) fn modulate(normed: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor, tch::TchError> {
    normed.f_mul(&per_token(&scale.f_add_scalar(1.0)?)?)?.f_add(&per_token(shift)?)
}

/// diffusers `RMSNorm(dim, eps, elementwise_affine=True)`: the variance in fp32, the product
/// promoted (fp16 input times an fp32 rsqrt), back to fp16/bf16 only before an fp16/bf16 weight.
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f64,
    path: String,
}

impl RmsNorm {
    pub(crate) fn new(p: nn::Path, dim: i64, eps: f64) -> RmsNorm {
        RmsNorm { weight: param(&p, "weight", &[dim], Init::Const(1.)), eps, path: path_of(&p) }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        scoped(&self.path, || {
            let variance = x.f_to_kind(Kind::Float)?.f_pow_tensor_scalar(2)?.f_mean_dim(-1, true, None::<Kind>)?;
            let h = x.f_mul(&variance.f_add_scalar(self.eps)?.f_rsqrt()?)?;
            let h = if matches!(self.weight.kind(), Kind::Half | Kind::BFloat16) { h.f_to_kind(self.weight.kind())? } else { h };
            h.f_mul(&self.weight)
        })
    }
}

/// `linear_2(silu(linear_1(x)))`: diffusers `TimestepEmbedding` and `PixArtAlphaTextProjection(act_fn="silu")`.
pub(crate) struct SiluMlp {
    pub(crate) linear_1: Linear,
    linear_2: Linear,
    path: String,
}

impl SiluMlp {
    pub(crate) fn new(p: nn::Path, d_in: i64, d: i64) -> SiluMlp {
        SiluMlp { linear_1: Linear::new(&p / "linear_1", d_in, d), linear_2: Linear::new(&p / "linear_2", d, d), path: path_of(&p) }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        scoped(&self.path, || self.linear_2.forward(&self.linear_1.forward(x)?.f_silu()?))
    }
}

/// diffusers `CombinedTimestepTextProjEmbeddings` (SD3, FLUX schnell) and, with `guidance`,
/// `CombinedTimestepGuidanceTextProjEmbeddings` (FLUX dev): `timestep_embedder(Timesteps(256,
/// flip_sin_to_cos=True, downscale_freq_shift=0)(t))` [+ `guidance_embedder(...(guidance))`]
/// + `text_embedder(pooled)`.
pub(crate) struct CombinedTimestepTextProjEmbeddings {
    pub(crate) timestep_embedder: SiluMlp,
    guidance_embedder: Option<SiluMlp>,
    text_embedder: SiluMlp,
    path: String,
}

impl CombinedTimestepTextProjEmbeddings {
    pub(crate) fn new(p: nn::Path, dim: i64, pooled_dim: i64, guidance: bool) -> CombinedTimestepTextProjEmbeddings {
        CombinedTimestepTextProjEmbeddings {
            timestep_embedder: SiluMlp::new(&p / "timestep_embedder", 256, dim),
            guidance_embedder: guidance.then(|| SiluMlp::new(&p / "guidance_embedder", 256, dim)),
            text_embedder: SiluMlp::new(&p / "text_embedder", pooled_dim, dim),
            path: path_of(&p),
        }
    }

    /// The first weight (where a split model's inputs go).
    pub(crate) fn weight(&self) -> &Tensor {
        &self.timestep_embedder.linear_1.weight
    }

    /// `guidance` is used only by a model built with a guidance embedder (the caller checks that
    /// one is given exactly then).
    pub(crate) fn forward(&self, timestep: &Tensor, guidance: Option<&Tensor>, pooled: &Tensor) -> Result<Tensor, tch::TchError> {
        scoped(&self.path, || {
            let w = self.weight();
            let (timestep, pooled) = (&on(timestep, w), &on(pooled, w));
            // The sinusoids are computed in fp32 from the (float) values, then cast to the
            // pooled embeddings' dtype.
            let sinusoid = |t: &Tensor| timestep_embedding(t, 256, true, 0.0).f_to_kind(pooled.kind());
            let mut emb = self.timestep_embedder.forward(&sinusoid(timestep)?)?;
            if let (Some(embedder), Some(g)) = (&self.guidance_embedder, guidance) {
                // (timestep + guidance) + text, in diffusers' order.
                emb = emb.f_add(&embedder.forward(&sinusoid(&on(g, w))?)?)?;
            }
            emb.f_add(&self.text_embedder.forward(pooled)?)
        })
    }
}

/// What `AdaLayerNormZero` (6 chunks) or `SD35AdaLayerNormZeroX` (9 chunks) hands the block.
pub(crate) struct AdaNormZeroOut {
    /// `norm(x) * (1 + scale_msa) + shift_msa`.
    pub x: Tensor,
    pub gate_msa: Tensor,
    pub shift_mlp: Tensor,
    pub scale_mlp: Tensor,
    pub gate_mlp: Tensor,
    /// MMDiT-X: `norm(x) * (1 + scale_msa2) + shift_msa2` and `gate_msa2`, for `attn2`.
    pub second: Option<(Tensor, Tensor)>,
}

/// `AdaLayerNormZero(dim)` or, with `dual`, `SD35AdaLayerNormZeroX(dim)`: `linear(silu(emb))`
/// chunked into shift/scale/gate triples; the norm is a layer norm without affine, eps 1e-6.
pub(crate) struct AdaLayerNormZero {
    linear: Linear,
    chunks: i64,
    path: String,
}

impl AdaLayerNormZero {
    pub(crate) fn new(p: nn::Path, dim: i64, dual: bool) -> AdaLayerNormZero {
        let chunks = if dual { 9 } else { 6 };
        AdaLayerNormZero { linear: Linear::new(&p / "linear", dim, chunks * dim), chunks, path: path_of(&p) }
    }

    /// The first weight (where a split model's inputs go).
    pub(crate) fn weight(&self) -> &Tensor {
        &self.linear.weight
    }

    pub(crate) fn forward(&self, x: &Tensor, emb: &Tensor) -> Result<AdaNormZeroOut, tch::TchError> {
        scoped(&self.path, || {
            let emb = self.linear.forward(&emb.f_silu()?)?;
            // shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp[, shift_msa2, scale_msa2, gate_msa2]
            let c = emb.f_chunk(self.chunks, 1)?;
            let normed = layer_norm(x, 1e-6)?;
            let second = if self.chunks == 9 { Some((modulate(&normed, &c[6], &c[7])?, c[8].shallow_clone())) } else { None };
            Ok(AdaNormZeroOut {
                x: modulate(&normed, &c[0], &c[1])?,
                gate_msa: c[2].shallow_clone(),
                shift_mlp: c[3].shallow_clone(),
                scale_mlp: c[4].shallow_clone(),
                gate_mlp: c[5].shallow_clone(),
                second,
            })
        })
    }
}

/// `AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6)`: `linear(silu(cond))`
/// split into (scale, shift) — scale first, unlike the zero norms.
pub(crate) struct AdaLayerNormContinuous {
    linear: Linear,
    path: String,
}

impl AdaLayerNormContinuous {
    pub(crate) fn new(p: nn::Path, dim: i64, conditioning_dim: i64) -> AdaLayerNormContinuous {
        AdaLayerNormContinuous { linear: Linear::new(&p / "linear", conditioning_dim, 2 * dim), path: path_of(&p) }
    }

    /// The first weight (where a split model's inputs go).
    pub(crate) fn weight(&self) -> &Tensor {
        &self.linear.weight
    }

    pub(crate) fn forward(&self, x: &Tensor, cond: &Tensor) -> Result<Tensor, tch::TchError> {
        scoped(&self.path, || {
            let emb = self.linear.forward(&cond.f_silu()?.f_to_kind(x.kind())?)?;
            let c = emb.f_chunk(2, 1)?;
            modulate(&layer_norm(x, 1e-6)?, &c[1], &c[0])
        })
    }
}

/// `FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate")`: `net.2(gelu_tanh(net.0.proj(x)))`.
pub(crate) struct FeedForward {
    proj: Linear,
    out: Linear,
    path: String,
}

impl FeedForward {
    pub(crate) fn new(p: nn::Path, dim: i64) -> FeedForward {
        let net = &p / "net";
        FeedForward { proj: Linear::new(&net / "0" / "proj", dim, 4 * dim), out: Linear::new(&net / "2", 4 * dim, dim), path: path_of(&p) }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        scoped(&self.path, || self.out.forward(&self.proj.forward(x)?.f_gelu("tanh")?))
    }
}

/// The projections of the context stream in a joint attention (`added_kv_proj_dim=dim`).
struct Added {
    add_q_proj: Linear,
    add_k_proj: Linear,
    add_v_proj: Linear,
    norm_added_q: Option<RmsNorm>,
    norm_added_k: Option<RmsNorm>,
    /// Absent with `context_pre_only` (the last block: its context output is unused).
    to_add_out: Option<Linear>,
}

/// diffusers `Attention(query_dim=dim, dim_head, heads, out_dim=dim, bias=True, qk_norm, eps=1e-6)`
/// run by `JointAttnProcessor2_0`: with the context projections, the image and context tokens
/// attend jointly (image first) and the output is split back; without (`attn2`), self-attention.
pub(crate) struct JointAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
    added: Option<Added>,
    to_out: Linear,
    heads: i64,
    path: String,
}

impl JointAttention {
    /// `joint`: `Some(context_pre_only)` for the block's `attn`, `None` for `attn2`.
    pub(crate) fn new(p: nn::Path, dim: i64, heads: i64, head_dim: i64, qk_rms_norm: bool, joint: Option<bool>) -> JointAttention {
        let inner = heads * head_dim;
        let norm = |name: &str| qk_rms_norm.then(|| RmsNorm::new(&p / name, head_dim, 1e-6));
        let added = joint.map(|context_pre_only| Added {
            add_q_proj: Linear::new(&p / "add_q_proj", dim, inner),
            add_k_proj: Linear::new(&p / "add_k_proj", dim, inner),
            add_v_proj: Linear::new(&p / "add_v_proj", dim, inner),
            norm_added_q: norm("norm_added_q"),
            norm_added_k: norm("norm_added_k"),
            to_add_out: (!context_pre_only).then(|| Linear::new(&p / "to_add_out", inner, dim)),
        });
        JointAttention {
            to_q: Linear::new(&p / "to_q", dim, inner),
            to_k: Linear::new(&p / "to_k", dim, inner),
            to_v: Linear::new(&p / "to_v", dim, inner),
            norm_q: norm("norm_q"),
            norm_k: norm("norm_k"),
            added,
            to_out: Linear::new(&p / "to_out" / "0", inner, dim),
            heads,
            path: path_of(&p),
        }
    }

    /// `x` [B, N, D] and, for the joint attention, `context` [B, M, D]: the image output and the
    /// context output (`None` for `attn2`; unprojected with `context_pre_only`, as diffusers
    /// returns it there, and the block drops it).
    pub(crate) fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>), tch::TchError> {
        scoped(&self.path, || {
            let (b, n, _) = x.size3()?;
            let heads = self.heads;
            // [B, T, heads * head_dim] -> [B, heads, T, head_dim], then the optional RMS norm.
            let split = |z: Tensor, norm: &Option<RmsNorm>| -> Result<Tensor, tch::TchError> {
                let z = z.f_view([b, -1, heads, z.size()[2] / heads])?.f_transpose(1, 2)?;
                match norm {
                    Some(nm) => nm.forward(&z),
                    None => Ok(z),
                }
            };
            let mut q = split(self.to_q.forward(x)?, &self.norm_q)?;
            let mut k = split(self.to_k.forward(x)?, &self.norm_k)?;
            let mut v = split(self.to_v.forward(x)?, &None)?;
            let joint = match (&self.added, context) {
                (Some(a), Some(c)) => Some((a, c)),
                _ => None,
            };
            if let Some((a, c)) = joint {
                let cq = split(a.add_q_proj.forward(c)?, &a.norm_added_q)?;
                let ck = split(a.add_k_proj.forward(c)?, &a.norm_added_k)?;
                let cv = split(a.add_v_proj.forward(c)?, &None)?;
                // Image tokens first, context tokens after, along the sequence.
                q = Tensor::f_cat(&[&q, &cq], 2)?;
                k = Tensor::f_cat(&[&k, &ck], 2)?;
                v = Tensor::f_cat(&[&v, &cv], 2)?;
            }
            let head_dim = q.size()[3];
            let o = Tensor::f_scaled_dot_product_attention(&q, &k, &v, None::<&Tensor>, 0.0, false, None, false)?;
            let o = o.f_transpose(1, 2)?.f_reshape([b, -1, heads * head_dim])?;
            let (img, ctx) = match joint {
                Some((a, _)) => {
                    let m = o.size()[1] - n;
                    let ctx = o.f_narrow(1, n, m)?;
                    let ctx = match &a.to_add_out {
                        Some(l) => l.forward(&ctx)?,
                        None => ctx,
                    };
                    (o.f_narrow(1, 0, n)?, Some(ctx))
                }
                None => (o, None),
            };
            Ok((self.to_out.forward(&img)?, ctx))
        })
    }
}

/// How a block normalises the context stream.
enum ContextNorm {
    Zero(AdaLayerNormZero),
    /// `context_pre_only` (the last block).
    Continuous(AdaLayerNormContinuous),
}

/// diffusers `JointTransformerBlock` (MMDiT; MMDiT-X with `use_dual_attention`): the no-split unit
/// of the SD3 transformer. The image and context streams each get an adaptive-norm-zero
/// modulation, attend jointly, and get their gated feed-forward; the last block
/// (`context_pre_only`) only feeds the context into the attention and returns no context.
pub(crate) struct JointTransformerBlock {
    norm1: AdaLayerNormZero,
    norm1_context: ContextNorm,
    attn: JointAttention,
    attn2: Option<JointAttention>,
    ff: FeedForward,
    ff_context: Option<FeedForward>,
    path: String,
}

impl JointTransformerBlock {
    pub(crate) fn new(p: nn::Path, dim: i64, heads: i64, head_dim: i64, context_pre_only: bool, qk_rms_norm: bool, dual_attention: bool) -> JointTransformerBlock {
        JointTransformerBlock {
            norm1: AdaLayerNormZero::new(&p / "norm1", dim, dual_attention),
            norm1_context: if context_pre_only {
                ContextNorm::Continuous(AdaLayerNormContinuous::new(&p / "norm1_context", dim, dim))
            } else {
                ContextNorm::Zero(AdaLayerNormZero::new(&p / "norm1_context", dim, false))
            },
            attn: JointAttention::new(&p / "attn", dim, heads, head_dim, qk_rms_norm, Some(context_pre_only)),
            attn2: dual_attention.then(|| JointAttention::new(&p / "attn2", dim, heads, head_dim, qk_rms_norm, None)),
            ff: FeedForward::new(&p / "ff", dim),
            ff_context: (!context_pre_only).then(|| FeedForward::new(&p / "ff_context", dim)),
            path: path_of(&p),
        }
    }

    /// The block's first weight (where a split model's inputs go).
    pub(crate) fn weight(&self) -> &Tensor {
        self.norm1.weight()
    }

    /// `(encoder_hidden_states, hidden_states)` as diffusers returns them: the context is `None`
    /// after a `context_pre_only` block.
    pub(crate) fn forward(&self, hidden: &Tensor, context: &Tensor, temb: &Tensor) -> Result<(Option<Tensor>, Tensor), tch::TchError> {
        scoped(&self.path, || {
            let w = self.weight();
            let (hidden, context, temb) = (&on(hidden, w), &on(context, w), &on(temb, w));
            let n = self.norm1.forward(hidden, temb)?;
            let (norm_context, context_mod) = match &self.norm1_context {
                ContextNorm::Zero(nm) => {
                    let o = nm.forward(context, temb)?;
                    (o.x.shallow_clone(), Some(o))
                }
                ContextNorm::Continuous(nm) => (nm.forward(context, temb)?, None),
            };
            let (attn_out, context_attn_out) = self.attn.forward(&n.x, Some(&norm_context))?;
            let mut hidden = hidden.f_add(&per_token(&n.gate_msa)?.f_mul(&attn_out)?)?;
            if let (Some(attn2), Some((x2, gate_msa2))) = (&self.attn2, &n.second) {
                let (out2, _) = attn2.forward(x2, None)?;
                hidden = hidden.f_add(&per_token(gate_msa2)?.f_mul(&out2)?)?;
            }
            let normed = modulate(&layer_norm(&hidden, 1e-6)?, &n.shift_mlp, &n.scale_mlp)?;
            let hidden = hidden.f_add(&per_token(&n.gate_mlp)?.f_mul(&self.ff.forward(&normed)?)?)?;

            let context = match (context_mod, &self.ff_context, context_attn_out) {
                (Some(c), Some(ff_context), Some(ctx_out)) => {
                    let context = context.f_add(&per_token(&c.gate_msa)?.f_mul(&ctx_out)?)?;
                    let normed = modulate(&layer_norm(&context, 1e-6)?, &c.shift_mlp, &c.scale_mlp)?;
                    Some(context.f_add(&per_token(&c.gate_mlp)?.f_mul(&ff_context.forward(&normed)?)?)?)
                }
                // context_pre_only: diffusers sets encoder_hidden_states to None.
                _ => None,
            };
            Ok((context, hidden))
        })
    }
}
