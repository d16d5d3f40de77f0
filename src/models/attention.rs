//! diffusers `attention.py` / `attention_processor.py` / `transformer_2d.py`: `Attention` with
//! `AttnProcessor2_0` (scaled_dot_product_attention), `BasicTransformerBlock` with GEGLU
//! feed-forward, `Transformer2DModel` for continuous (image) inputs.

use tch::nn;
use tch::Tensor;

use super::hooks::{Conv2d, GroupNorm, LayerNorm, Linear};
use super::resnet::{conv2d, group_norm, on};

/// diffusers `Attention`: `to_q`, `to_k`, `to_v` (no bias unless `bias`), `to_out.0` (bias).
#[derive(Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: i64,
    /// VAE attention: a group norm before, the residual added after.
    group_norm: Option<GroupNorm>,
}

impl Attention {
    pub fn new(vs: nn::Path, query_dim: i64, context_dim: Option<i64>, heads: i64, dim_head: i64, bias: bool) -> Self {
        let inner = heads * dim_head;
        let ctx = context_dim.unwrap_or(query_dim);
        let lc = nn::LinearConfig { bias, ..Default::default() };
        Attention {
            to_q: Linear::new(&vs / "to_q", query_dim, inner, lc),
            to_k: Linear::new(&vs / "to_k", ctx, inner, lc),
            to_v: Linear::new(&vs / "to_v", ctx, inner, lc),
            to_out: Linear::new(&vs / "to_out" / "0", inner, query_dim, Default::default()),
            heads,
            group_norm: None,
        }
    }

    /// The VAE mid-block attention (diffusers `Attention(..., norm_num_groups, residual_connection=True,
    /// bias=True)`: single head over all channels).
    pub fn new_spatial(vs: nn::Path, channels: i64, groups: i64, eps: f64) -> Self {
        let mut a = Attention::new(vs.clone(), channels, None, 1, channels, true);
        a.group_norm = Some(group_norm(&vs / "group_norm", groups, channels, eps));
        a
    }

    /// `x`: [B, N, C]; `context`: [B, M, C'] for cross-attention.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Tensor {
        let (b, n, _) = x.size3().expect("[B, N, C]");
        let ctx = context.unwrap_or(x);
        let split = |t: Tensor| {
            let m = t.size()[1];
            t.view([b, m, self.heads, -1]).transpose(1, 2)
        };
        let q = split(self.to_q.forward(x));
        let k = split(self.to_k.forward(ctx));
        let v = split(self.to_v.forward(ctx));
        let o = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        self.to_out.forward(&o.transpose(1, 2).reshape([b, n, -1]))
    }

    /// VAE form on a [B, C, H, W] map: group norm, attention over H*W, residual.
    pub fn forward_spatial(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("[B, C, H, W]");
        let normed = self.group_norm.as_ref().expect("spatial attention").forward(x);
        let seq = normed.view([b, c, h * w]).transpose(1, 2);
        let out = self.forward(&seq, None);
        out.transpose(1, 2).reshape([b, c, h, w]) + x
    }
}

/// diffusers `FeedForward` with `GEGLU`: `net.2(h * gelu(gate))`, `h, gate = net.0.proj(x).chunk(2)`.
#[derive(Debug)]
pub struct FeedForward {
    proj: Linear,
    pub(crate) out: Linear,
}

impl FeedForward {
    pub fn new(vs: nn::Path, dim: i64, mult: i64) -> Self {
        let inner = dim * mult;
        FeedForward { proj: Linear::new(&vs / "net" / "0" / "proj", dim, inner * 2, Default::default()), out: Linear::new(&vs / "net" / "2", inner, dim, Default::default()) }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let hg = self.proj.forward(x).chunk(2, -1);
        self.out.forward(&(&hg[0] * hg[1].gelu("none")))
    }
}

/// diffusers `BasicTransformerBlock` (layer norms, self-attention, cross-attention, GEGLU).
#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(vs: nn::Path, dim: i64, heads: i64, dim_head: i64, context_dim: i64) -> Self {
        let ln = |p: nn::Path| LayerNorm::new(p, vec![dim], nn::LayerNormConfig { eps: 1e-5, ..Default::default() });
        BasicTransformerBlock {
            norm1: ln(&vs / "norm1"),
            attn1: Attention::new(&vs / "attn1", dim, None, heads, dim_head, false),
            norm2: ln(&vs / "norm2"),
            attn2: Attention::new(&vs / "attn2", dim, Some(context_dim), heads, dim_head, false),
            norm3: ln(&vs / "norm3"),
            ff: FeedForward::new(&vs / "ff", dim, 4),
        }
    }
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let (x, context) = (&on(x, self.ff.out.weight()), &on(context, self.ff.out.weight()));
        let x = self.attn1.forward(&self.norm1.forward(x), None) + x;
        let x = self.attn2.forward(&self.norm2.forward(&x), Some(context)) + &x;
        self.ff.forward(&self.norm3.forward(&x)) + &x
    }
}

#[derive(Debug)]
enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

impl Proj {
    fn weight(&self) -> &Tensor {
        match self {
            Proj::Conv(c) => c.weight(),
            Proj::Linear(l) => l.weight(),
        }
    }
}

/// diffusers `Transformer2DModel` for image inputs: group norm, projection in (1x1 conv, or
/// linear with `use_linear_projection`), transformer blocks, projection out, residual.
#[derive(Debug)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Proj,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

impl Transformer2DModel {
    #[allow(clippy::too_many_arguments)]
    pub fn new(vs: nn::Path, heads: i64, dim_head: i64, in_channels: i64, layers: i64, context_dim: i64, groups: i64, linear: bool) -> Self {
        let inner = heads * dim_head;
        let proj = |p: nn::Path, i, o| {
            if linear {
                Proj::Linear(Linear::new(p, i, o, Default::default()))
            } else {
                Proj::Conv(conv2d(p, i, o, 1, 1, 0))
            }
        };
        Transformer2DModel {
            norm: group_norm(&vs / "norm", groups, in_channels, 1e-6),
            proj_in: proj(&vs / "proj_in", in_channels, inner),
            transformer_blocks: (0..layers).map(|i| BasicTransformerBlock::new(&vs / "transformer_blocks" / i, inner, heads, dim_head, context_dim)).collect(),
            proj_out: proj(&vs / "proj_out", inner, in_channels),
        }
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let (b, _, h, w) = x.size4().expect("[B, C, H, W]");
        let residual = x;
        let x = match self.norm.weight() {
            Some(ws) => self.norm.forward(&on(x, ws)),
            None => self.norm.forward(x),
        };
        let x = on(&x, self.proj_in.weight());
        let to_seq = |t: Tensor| {
            let c = t.size()[1];
            t.permute([0, 2, 3, 1]).reshape([b, h * w, c])
        };
        let mut s = match &self.proj_in {
            Proj::Conv(c) => to_seq(c.forward(&x)),
            Proj::Linear(l) => l.forward(&to_seq(x)),
        };
        for blk in &self.transformer_blocks {
            s = blk.forward(&s, context);
        }
        let to_map = |t: Tensor| {
            let c = t.size()[2];
            t.reshape([b, h, w, c]).permute([0, 3, 1, 2]).contiguous()
        };
        let s = on(&s, self.proj_out.weight());
        let out = match &self.proj_out {
            Proj::Conv(c) => c.forward(&to_map(s)),
            Proj::Linear(l) => to_map(l.forward(&s)),
        };
        let residual = on(residual, &out);
        out + residual
    }
}
