//! diffusers `embeddings.py`: sinusoidal timestep embeddings and the MLP that follows them.

use tch::nn;

use super::hooks::{scoped, Linear};
use tch::{Kind, Tensor};

/// diffusers `get_timestep_embedding`: `[sin, cos]` (or `[cos, sin]` with `flip_sin_to_cos`) of
/// `t * exp(-ln(max_period) * i / (half - freq_shift))`, computed in f32.
pub fn timestep_embedding(timesteps: &Tensor, dim: i64, flip_sin_to_cos: bool, freq_shift: f64) -> Tensor {
    let half = dim / 2;
    let exponent = Tensor::arange(half, (Kind::Float, timesteps.device())) * (-(10000f64).ln()) / (half as f64 - freq_shift);
    let emb = exponent.exp();
    let emb = timesteps.to_kind(Kind::Float).unsqueeze(-1) * emb.unsqueeze(0);
    let emb = Tensor::cat(&[emb.sin(), emb.cos()], -1);
    let emb = if flip_sin_to_cos { Tensor::cat(&[emb.narrow(-1, half, half), emb.narrow(-1, 0, half)], -1) } else { emb };
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1])
    } else {
        emb
    }
}

/// diffusers `Timesteps` (no parameters).
#[derive(Debug)]
pub struct Timesteps {
    pub num_channels: i64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
}

impl Timesteps {
    pub fn forward(&self, t: &Tensor) -> Tensor {
        timestep_embedding(t, self.num_channels, self.flip_sin_to_cos, self.freq_shift)
    }
}

/// diffusers `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    path: String,
}

impl TimestepEmbedding {
    pub fn new(vs: nn::Path, in_channels: i64, time_embed_dim: i64) -> Self {
        TimestepEmbedding {
            path: super::hooks::path_of(&vs),
            linear_1: Linear::new(&vs / "linear_1", in_channels, time_embed_dim, Default::default()),
            linear_2: Linear::new(&vs / "linear_2", time_embed_dim, time_embed_dim, Default::default()),
        }
    }
    /// `x` goes to the weights' device first (a split model's units take their inputs along).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        scoped(&self.path, || {
            let h = self.linear_1.forward(&super::resnet::on(x, self.linear_1.weight())).silu();
            self.linear_2.forward(&super::resnet::on(&h, self.linear_2.weight()))
        })
    }

    /// The first weight (where inputs go when the model is split across devices).
    pub fn weight(&self) -> &Tensor {
        self.linear_1.weight()
    }
}
