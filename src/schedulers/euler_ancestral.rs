//! diffusers `EulerAncestralDiscreteScheduler` (scheduling_euler_ancestral_discrete.py): an Euler
//! step to `sigma_down` plus fresh noise times `sigma_up`, drawn at every step (the last one too,
//! where `sigma_up` is 0) from the global CPU generator, in the model output's shape and dtype.

use tch::{Device, Kind, Tensor};

use super::config::{Cfg, Rescale};
use super::euler::{check_steps, init_noise_sigma, pred_original, scale_by_sigma, spaced_timesteps};
use super::schedule::{self, np_interp, sqrt32, widen, Prediction};
use super::{Scheduler, SchedulerError};

pub struct EulerAncestralDiscrete {
    alphas_cumprod: Vec<f64>,
    sigmas: Vec<f32>,
    sigmas_f64: Vec<f64>,
    timesteps: Vec<f64>,
    init_noise_sigma: f32,
    prediction: Prediction,
    step_index: Option<usize>,
}

impl EulerAncestralDiscrete {
    pub const NAME: &'static str = "EulerAncestralDiscreteScheduler";

    /// `EulerAncestralDiscreteScheduler(**config)` then `set_timesteps(steps)`.
    pub(crate) fn new(cfg: &Cfg, steps: usize) -> Result<Self, SchedulerError> {
        let ac = cfg.alphas_cumprod(Rescale::BetasAndLastCumprod)?;
        let n = ac.len();
        let prediction = cfg.prediction()?;
        let spacing = cfg.spacing("linspace")?;
        let offset = cfg.steps_offset()?;
        check_steps(Self::NAME, steps, n)?;
        let timesteps = spaced_timesteps(spacing, n, steps, offset);
        let train = widen(&schedule::train_sigmas(&ac));
        let sigmas: Vec<f32> = timesteps.iter().map(|&t| np_interp(t as f64, &train) as f32).chain(std::iter::once(0.0)).collect();
        schedule::check_first_timestep(Self::NAME, steps, &widen(&timesteps))?;
        Ok(EulerAncestralDiscrete {
            alphas_cumprod: widen(&ac),
            init_noise_sigma: init_noise_sigma(&sigmas, spacing),
            sigmas_f64: widen(&sigmas),
            sigmas,
            timesteps: widen(&timesteps),
            prediction,
            step_index: None,
        })
    }

    fn index(&self, i: usize) -> usize {
        self.step_index.or_else(|| schedule::index_for_timestep(&self.timesteps, self.timesteps[i])).unwrap_or(i)
    }
}

impl Scheduler for EulerAncestralDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Tensor {
        scale_by_sigma(sample, self.sigmas[self.index(i)])
    }
    /// diffusers `EulerAncestralDiscreteScheduler.step`.
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor) -> Tensor {
        let idx = self.index(i);
        let sigma = self.sigmas[idx];
        let sample = sample.to_kind(Kind::Float);
        let pred = pred_original(self.prediction, model_output, &sample, sigma);
        let (from, to) = (sigma, self.sigmas[idx + 1]);
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
        Some(&self.sigmas_f64)
    }
    fn name(&self) -> &'static str {
        Self::NAME
    }
    fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
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
