//! The FLUX pieces of diffusers 0.42.1 (models/transformers/transformer_flux.py) beside the shared
//! MMDiT ones of [`mmdit_blocks`](crate::models::mmdit_blocks): `FluxPosEmbed` and
//! `apply_rotary_emb` (embeddings.py, the real-valued interleaved form), `FluxAttention` with
//! `FluxAttnProcessor`, `AdaLayerNormZeroSingle` (normalization.py), and the double-stream
//! `FluxTransformerBlock` and single-stream `FluxSingleTransformerBlock`. Variables sit at the
//! checkpoint's key paths.
//!
//! Unlike SD3's, FLUX's attention puts the text tokens first, rotates queries and keys by the
//! token ids, and normalises them with `torch.nn.RMSNorm` (not diffusers' `RMSNorm`): that is
//! `aten::rms_norm`, which is what `TorchRmsNorm` calls.

use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

use crate::models::hooks::{path_of, scoped};
use crate::models::mmdit_blocks::{layer_norm, modulate, per_token, AdaLayerNormZero, FeedForward, Linear};
use crate::models::resnet::on;
use crate::models::weights::param;

/// The rotary tables of a token sequence: `(cos, sin)`, each [S, head_dim] f32.
pub(crate) struct Rotary {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rotary {
    /// The tables on `like`'s device (a split model's blocks each take them along).
    pub(crate) fn on(&self, like: &Tensor) -> Rotary {
        Rotary { cos: on(&self.cos, like), sin: on(&self.sin, like) }
    }
}

/// diffusers `FluxPosEmbed(theta=10000, axes_dim)`: per id axis, `get_1d_rotary_pos_embed(dim,
/// ids[:, i], use_real=True, repeat_interleave_real=True, freqs_dtype=float64)`, concatenated.
pub(crate) struct FluxPosEmbed {
    pub axes_dim: Vec<i64>,
    pub theta: f64,
}

impl FluxPosEmbed {
    /// `ids` [S, axes]: any numeric dtype and device. diffusers takes `ids.float()` and computes
    /// the angles in float64 on the ids' device; they are computed here in float64 on the CPU
    /// (a few kilobytes; the same values on every device) and returned there, cast to f32.
    pub(crate) fn forward(&self, ids: &Tensor) -> Result<Rotary, tch::TchError> {
        let pos = ids.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?;
        let (mut cos, mut sin) = (vec![], vec![]);
        for (i, &dim) in self.axes_dim.iter().enumerate() {
            // 1 / theta^(arange(0, dim, 2) / dim), in float64.
            let exponent = Tensor::f_arange_start_step(0, dim, 2, (Kind::Double, Device::Cpu))?.f_div_scalar(dim as f64)?;
            let freqs = Tensor::f_pow_scalar(self.theta, &exponent)?.f_reciprocal()?;
            // torch.outer promotes the f32 positions to float64.
            let angles = pos.f_select(1, i as i64)?.f_to_kind(Kind::Double)?.f_outer(&freqs)?;
            let n = angles.size()[1] * 2;
            cos.push(angles.f_cos()?.f_repeat_interleave_self_int(2, 1, n)?.f_to_kind(Kind::Float)?);
            sin.push(angles.f_sin()?.f_repeat_interleave_self_int(2, 1, n)?.f_to_kind(Kind::Float)?);
        }
        Ok(Rotary { cos: Tensor::f_cat(&cos, -1)?, sin: Tensor::f_cat(&sin, -1)? })
    }
}

/// diffusers `apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1,
/// sequence_dim=1)` for `x` [B, S, H, D]: the adjacent pairs (x0, x1) rotate to
/// (x0 cos - x1 sin, x1 cos + x0 sin), in f32, and the result goes back to `x`'s dtype.
fn apply_rotary_emb(x: &Tensor, r: &Rotary) -> Result<Tensor, tch::TchError> {
    let (cos, sin) = (r.cos.f_unsqueeze(0)?.f_unsqueeze(2)?, r.sin.f_unsqueeze(0)?.f_unsqueeze(2)?);
    let s = x.size();
    let mut pairs = s[..s.len() - 1].to_vec();
    pairs.extend([-1, 2]);
    let pairs = x.f_reshape(pairs)?;
    let (real, imag) = (pairs.f_select(-1, 0)?, pairs.f_select(-1, 1)?);
    let rotated = Tensor::f_stack(&[imag.f_neg()?, real], -1)?.f_flatten(3, -1)?;
    x.f_to_kind(Kind::Float)?.f_mul(&cos)?.f_add(&rotated.f_to_kind(Kind::Float)?.f_mul(&sin)?)?.f_to_kind(x.kind())
}

/// `torch.nn.RMSNorm(head_dim, eps=1e-6)` with its weight: `aten::rms_norm` itself, so its
/// precision handling is torch's.
pub(crate) struct TorchRmsNorm {
    weight: Tensor,
    path: String,
}

impl TorchRmsNorm {
    fn new(p: nn::Path, dim: i64) -> TorchRmsNorm {
        TorchRmsNorm { weight: param(&p, "weight", &[dim], Init::Const(1.)), path: path_of(&p) }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        scoped(&self.path, || x.f_rms_norm([self.weight.size()[0]], Some(&self.weight), 1e-6))
    }
}

/// The text stream's projections in a double-stream attention (`added_kv_proj_dim=dim`).
struct Added {
    add_q_proj: Linear,
    add_k_proj: Linear,
    add_v_proj: Linear,
    norm_added_q: TorchRmsNorm,
    norm_added_k: TorchRmsNorm,
    to_add_out: Linear,
}

/// diffusers `FluxAttention(query_dim=dim, heads, dim_head, out_dim=dim, bias=True, eps=1e-6)` run
/// by `FluxAttnProcessor`. With the text projections (`added_kv_proj_dim`: the double-stream
/// blocks) the text and image tokens attend jointly, text first, and both outputs are projected;
/// without (`pre_only`: the single-stream blocks) it is self-attention with no output projection.
pub(crate) struct FluxAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    norm_q: TorchRmsNorm,
    norm_k: TorchRmsNorm,
    added: Option<Added>,
    /// `to_out.0`; absent with `pre_only`.
    to_out: Option<Linear>,
    head_dim: i64,
    path: String,
}

impl FluxAttention {
    /// `joint`: the double-stream form (text projections and `to_out`), else the single-stream one.
    pub(crate) fn new(p: nn::Path, dim: i64, heads: i64, head_dim: i64, joint: bool) -> FluxAttention {
        let inner = heads * head_dim;
        let added = joint.then(|| Added {
            add_q_proj: Linear::new(&p / "add_q_proj", dim, inner),
            add_k_proj: Linear::new(&p / "add_k_proj", dim, inner),
            add_v_proj: Linear::new(&p / "add_v_proj", dim, inner),
            norm_added_q: TorchRmsNorm::new(&p / "norm_added_q", head_dim),
            norm_added_k: TorchRmsNorm::new(&p / "norm_added_k", head_dim),
            to_add_out: Linear::new(&p / "to_add_out", inner, dim),
        });
        FluxAttention {
            to_q: Linear::new(&p / "to_q", dim, inner),
            to_k: Linear::new(&p / "to_k", dim, inner),
            to_v: Linear::new(&p / "to_v", dim, inner),
            norm_q: TorchRmsNorm::new(&p / "norm_q", head_dim),
            norm_k: TorchRmsNorm::new(&p / "norm_k", head_dim),
            added,
            to_out: joint.then(|| Linear::new(&p / "to_out" / "0", inner, dim)),
            head_dim,
            path: path_of(&p),
        }
    }

    /// `x` [B, N, D] and, for the joint form, `context` [B, M, D]; `rotary` covers the M + N
    /// tokens (text first), or N without context. Returns the image output and the text output
    /// (joint form only).
    pub(crate) fn forward(&self, x: &Tensor, context: Option<&Tensor>, rotary: &Rotary) -> Result<(Tensor, Option<Tensor>), tch::TchError> {
        scoped(&self.path, || {
            // [B, T, heads * head_dim] -> [B, T, heads, head_dim] (diffusers' `unflatten`).
            let heads = |z: Tensor| -> Result<Tensor, tch::TchError> {
                let s = z.size();
                z.f_reshape([s[0], s[1], -1, self.head_dim])
            };
            let mut q = self.norm_q.forward(&heads(self.to_q.forward(x)?)?)?;
            let mut k = self.norm_k.forward(&heads(self.to_k.forward(x)?)?)?;
            let mut v = heads(self.to_v.forward(x)?)?;
            let joint = match (&self.added, context) {
                (Some(a), Some(c)) => Some((a, c)),
                _ => None,
            };
            if let Some((a, c)) = joint {
                let cq = a.norm_added_q.forward(&heads(a.add_q_proj.forward(c)?)?)?;
                let ck = a.norm_added_k.forward(&heads(a.add_k_proj.forward(c)?)?)?;
                let cv = heads(a.add_v_proj.forward(c)?)?;
                // Text tokens first, along the sequence.
                q = Tensor::f_cat(&[&cq, &q], 1)?;
                k = Tensor::f_cat(&[&ck, &k], 1)?;
                v = Tensor::f_cat(&[&cv, &v], 1)?;
            }
            let q = apply_rotary_emb(&q, rotary)?;
            let k = apply_rotary_emb(&k, rotary)?;
            // The native backend's SDPA takes [B, heads, T, head_dim].
            let t = |z: &Tensor| z.f_transpose(1, 2);
            let o = Tensor::f_scaled_dot_product_attention(&t(&q)?, &t(&k)?, &t(&v)?, None::<&Tensor>, 0.0, false, None, false)?;
            let o = t(&o)?.f_flatten(2, 3)?.f_to_kind(q.kind())?;
            match joint {
                Some((a, c)) => {
                    let m = c.size()[1];
                    let n = o.size()[1] - m;
                    let ctx = a.to_add_out.forward(&o.f_narrow(1, 0, m)?.f_contiguous()?)?;
                    let img = o.f_narrow(1, m, n)?.f_contiguous()?;
                    let img = match &self.to_out {
                        Some(l) => l.forward(&img)?,
                        None => img,
                    };
                    Ok((img, Some(ctx)))
                }
                None => Ok((o, None)),
            }
        })
    }
}

/// `x.clip(-65504, 65504)` when fp16 (diffusers keeps the residual streams finite there).
fn clip_fp16(x: Tensor) -> Result<Tensor, tch::TchError> {
    if x.kind() == Kind::Half {
        x.f_clamp(-65504.0, 65504.0)
    } else {
        Ok(x)
    }
}

/// diffusers `FluxTransformerBlock` (double stream, MMDiT): the image and text streams each get an
/// adaptive-norm-zero modulation, attend jointly (text first), and get their gated feed-forward.
pub(crate) struct FluxTransformerBlock {
    norm1: AdaLayerNormZero,
    norm1_context: AdaLayerNormZero,
    attn: FluxAttention,
    ff: FeedForward,
    ff_context: FeedForward,
    path: String,
}

impl FluxTransformerBlock {
    pub(crate) fn new(p: nn::Path, dim: i64, heads: i64, head_dim: i64) -> FluxTransformerBlock {
        FluxTransformerBlock {
            norm1: AdaLayerNormZero::new(&p / "norm1", dim, false),
            norm1_context: AdaLayerNormZero::new(&p / "norm1_context", dim, false),
            attn: FluxAttention::new(&p / "attn", dim, heads, head_dim, true),
            ff: FeedForward::new(&p / "ff", dim),
            ff_context: FeedForward::new(&p / "ff_context", dim),
            path: path_of(&p),
        }
    }

    /// `(encoder_hidden_states, hidden_states)`, as diffusers returns them, on the block's device.
    pub(crate) fn forward(&self, hidden: &Tensor, context: &Tensor, temb: &Tensor, rotary: &Rotary) -> Result<(Tensor, Tensor), tch::TchError> {
        scoped(&self.path, || {
            let w = self.norm1.weight();
            let (hidden, context, temb, rotary) = (&on(hidden, w), &on(context, w), &on(temb, w), &rotary.on(w));
            let n = self.norm1.forward(hidden, temb)?;
            let c = self.norm1_context.forward(context, temb)?;
            let (attn_out, ctx_attn_out) = self.attn.forward(&n.x, Some(&c.x), rotary)?;
            let ctx_attn_out = ctx_attn_out.expect("the joint attention returns the text output");

            let hidden = hidden.f_add(&per_token(&n.gate_msa)?.f_mul(&attn_out)?)?;
            let normed = modulate(&layer_norm(&hidden, 1e-6)?, &n.shift_mlp, &n.scale_mlp)?;
            let hidden = hidden.f_add(&per_token(&n.gate_mlp)?.f_mul(&self.ff.forward(&normed)?)?)?;

            let context = context.f_add(&per_token(&c.gate_msa)?.f_mul(&ctx_attn_out)?)?;
            let normed = modulate(&layer_norm(&context, 1e-6)?, &c.shift_mlp, &c.scale_mlp)?;
            let context = context.f_add(&per_token(&c.gate_mlp)?.f_mul(&self.ff_context.forward(&normed)?)?)?;
            // diffusers clips only the text stream here.
            Ok((clip_fp16(context)?, hidden))
        })
    }
}

/// diffusers `AdaLayerNormZeroSingle(dim)`: `linear(silu(emb))` chunked into (shift, scale, gate);
/// returns `norm(x) * (1 + scale) + shift` and the gate.
pub(crate) struct AdaLayerNormZeroSingle {
    linear: Linear,
    path: String,
}

impl AdaLayerNormZeroSingle {
    pub(crate) fn new(p: nn::Path, dim: i64) -> AdaLayerNormZeroSingle {
        AdaLayerNormZeroSingle { linear: Linear::new(&p / "linear", dim, 3 * dim), path: path_of(&p) }
    }

    pub(crate) fn forward(&self, x: &Tensor, emb: &Tensor) -> Result<(Tensor, Tensor), tch::TchError> {
        scoped(&self.path, || {
            let c = self.linear.forward(&emb.f_silu()?)?.f_chunk(3, 1)?;
            Ok((modulate(&layer_norm(x, 1e-6)?, &c[0], &c[1])?, c[2].shallow_clone()))
        })
    }
}

/// diffusers `FluxSingleTransformerBlock` (single stream): text and image tokens concatenated
/// (text first) go through one modulation, a self-attention and a parallel tanh-GELU MLP, joined
/// by `proj_out` into a gated residual; the streams are split back on the way out.
pub(crate) struct FluxSingleTransformerBlock {
    norm: AdaLayerNormZeroSingle,
    proj_mlp: Linear,
    attn: FluxAttention,
    proj_out: Linear,
    path: String,
}

impl FluxSingleTransformerBlock {
    pub(crate) fn new(p: nn::Path, dim: i64, heads: i64, head_dim: i64) -> FluxSingleTransformerBlock {
        // mlp_ratio 4.0.
        let mlp = 4 * dim;
        FluxSingleTransformerBlock {
            norm: AdaLayerNormZeroSingle::new(&p / "norm", dim),
            proj_mlp: Linear::new(&p / "proj_mlp", dim, mlp),
            attn: FluxAttention::new(&p / "attn", dim, heads, head_dim, false),
            proj_out: Linear::new(&p / "proj_out", dim + mlp, dim),
            path: path_of(&p),
        }
    }

    /// `(encoder_hidden_states, hidden_states)`, as diffusers returns them, on the block's device.
    pub(crate) fn forward(&self, hidden: &Tensor, context: &Tensor, temb: &Tensor, rotary: &Rotary) -> Result<(Tensor, Tensor), tch::TchError> {
        scoped(&self.path, || {
            let w = &self.norm.linear.weight;
            let (hidden, context, temb, rotary) = (&on(hidden, w), &on(context, w), &on(temb, w), &rotary.on(w));
            let text = context.size()[1];
            let residual = Tensor::f_cat(&[context, hidden], 1)?;
            let (normed, gate) = self.norm.forward(&residual, temb)?;
            let mlp = self.proj_mlp.forward(&normed)?.f_gelu("tanh")?;
            let (attn_out, _) = self.attn.forward(&normed, None, rotary)?;
            let out = self.proj_out.forward(&Tensor::f_cat(&[&attn_out, &mlp], 2)?)?;
            let out = clip_fp16(residual.f_add(&per_token(&gate)?.f_mul(&out)?)?)?;
            let n = out.size()[1] - text;
            Ok((out.f_narrow(1, 0, text)?, out.f_narrow(1, text, n)?))
        })
    }
}
