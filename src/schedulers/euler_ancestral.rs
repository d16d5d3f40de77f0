//! diffusers `EulerAncestralDiscreteScheduler` (scheduling_euler_ancestral_discrete.py): an Euler
//! step to `sigma_down` plus fresh noise times `sigma_up`, drawn at every step (the last one too,
//! where `sigma_up` is 0) from the global CPU generator, in the model output's shape and dtype.

use tch::{Device, Kind, Tensor};

use runner_core::scheduling as core;

use super::euler::{pred_original, scale_by_sigma};
use super::schedule::{self, sqrt32};
use super::Scheduler;

pub struct EulerAncestralDiscrete {
    s: core::EulerAncestralDiscrete,
    step_index: Option<usize>,
}

impl EulerAncestralDiscrete {
    pub const NAME: &'static str = core::EulerAncestralDiscrete::NAME;

    pub(crate) fn new(s: core::EulerAncestralDiscrete) -> Self {
        EulerAncestralDiscrete { step_index: None, s }
    }

    fn index(&self, i: usize) -> usize {
        self.step_index.or_else(|| schedule::index_for_timestep(&self.s.timesteps, self.s.timesteps[i])).unwrap_or(i)
    }
}

impl Scheduler for EulerAncestralDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.s.timesteps
    }
    fn init_noise_sigma(&self) -> f64 {
        self.s.init_noise_sigma as f64
    }
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Tensor {
        scale_by_sigma(sample, self.s.sigmas[self.index(i)])
    }
    /// diffusers `EulerAncestralDiscreteScheduler.step`.
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor) -> Tensor {
        let idx = self.index(i);
        let sigma = self.s.sigmas[idx];
        let sample = sample.to_kind(Kind::Float);
        let pred = pred_original(self.s.prediction, model_output, &sample, sigma);
        let (from, to) = (sigma, self.s.sigmas[idx + 1]);
        let sigma_up = sqrt32((to * to) * (from * from - to * to) / (from * from));
        let sigma_down = sqrt32(to * to - sigma_up * sigma_up);
        let derivative = (&sample - pred) / sigma as f64;
        let dt = sigma_down - sigma;
        let prev = sample + derivative * dt as f64;
        // randn_tensor(shape, dtype=model_output.dtype, generator=<CPU generator>), then to the device.
        let noise = Tensor::randn(model_output.size(), (model_output.kind(), Device::Cpu)).to_device(model_output.device());
        let prev = prev + noise * sigma_up as f64;
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

    /// Every EulerAncestralDiscrete case of tests/fixtures/refs/schedulers.json (tools/make_scheduler_refs.py).
    #[test]
    fn matches_diffusers() {
        testing::check_class(EulerAncestralDiscrete::NAME);
    }
}
