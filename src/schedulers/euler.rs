//! diffusers `EulerDiscreteScheduler` (scheduling_euler_discrete.py): Algorithm 2 of Karras et al.
//! (2022) without churn (the pipelines pass `s_churn = 0`), so it draws no noise.

use tch::{Kind, Tensor};

use runner_core::scheduling as core;

use super::schedule::{self, sqrt32, Prediction};
use super::Scheduler;

pub struct EulerDiscrete {
    s: core::EulerDiscrete,
    step_index: Option<usize>,
}

impl EulerDiscrete {
    pub const NAME: &'static str = core::EulerDiscrete::NAME;

    pub(crate) fn new(s: core::EulerDiscrete) -> Self {
        EulerDiscrete { step_index: None, s }
    }

    fn index(&self, i: usize) -> usize {
        self.step_index.or_else(|| schedule::index_for_timestep(&self.s.timesteps, self.s.timesteps[i])).unwrap_or(i)
    }
}

/// Euler-type `scale_model_input`: `sample / (sigma**2 + 1) ** 0.5`.
pub(crate) fn scale_by_sigma(sample: &Tensor, sigma: f32) -> Tensor {
    sample / sqrt32(sigma * sigma + 1.0) as f64
}

/// Euler-type `pred_original_sample` (the `sample` here is already float32).
pub(crate) fn pred_original(prediction: Prediction, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Tensor {
    match prediction {
        Prediction::Epsilon => sample - model_output * sigma as f64,
        // model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        Prediction::VPrediction => model_output * (-sigma / sqrt32(sigma * sigma + 1.0)) as f64 + sample / (sigma * sigma + 1.0) as f64,
    }
}

impl Scheduler for EulerDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.s.timesteps
    }
    fn init_noise_sigma(&self) -> f64 {
        self.s.init_noise_sigma as f64
    }
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Tensor {
        scale_by_sigma(sample, self.s.sigmas[self.index(i)])
    }
    /// diffusers `EulerDiscreteScheduler.step` with `s_churn = 0` (so `sigma_hat = sigma`).
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor) -> Tensor {
        let idx = self.index(i);
        let sample = sample.to_kind(Kind::Float);
        let sigma = self.s.sigmas[idx];
        // gamma = 0: sigma_hat = sigma * (gamma + 1) = sigma exactly.
        let sigma_hat = sigma;
        let pred = pred_original(self.s.prediction, model_output, &sample, sigma);
        let derivative = (&sample - pred) / sigma_hat as f64;
        let dt = self.s.sigmas[idx + 1] - sigma_hat;
        let prev = sample + derivative * dt as f64;
        self.step_index = Some(idx + 1);
        prev.to_kind(model_output.kind())
    }
    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.s.sigmas_f64)
    }
    fn name(&self) -> &'static str {
        Self::NAME
    }
    fn alphas_cumprod(&self) -> &[f64] {
        &self.s.alphas_cumprod
    }
    fn set_begin_index(&mut self, k: usize) {
        self.step_index = Some(k);
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, k: usize) -> Tensor {
        super::add_noise_sigma(self.s.sigmas[k], original, noise)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::schedule::testing;

    /// Every EulerDiscrete case of tests/fixtures/refs/schedulers.json (tools/make_scheduler_refs.py).
    #[test]
    fn matches_diffusers() {
        testing::check_class(EulerDiscrete::NAME);
    }
}
