//! diffusers `DDIMScheduler` (scheduling_ddim.py), deterministic (`eta = 0`, the pipelines' default).

use tch::Tensor;

use runner_core::scheduling as core;

use super::schedule::{sqrt32, Prediction};
use super::Scheduler;

pub struct Ddim {
    s: core::Ddim,
}

impl Ddim {
    pub const NAME: &'static str = core::Ddim::NAME;

    pub(crate) fn new(s: core::Ddim) -> Self {
        Ddim { s }
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.s.timesteps_f64
    }
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> Tensor {
        sample.shallow_clone()
    }
    /// diffusers `DDIMScheduler.step` with `eta = 0`, `use_clipped_model_output = False`.
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor) -> Tensor {
        let timestep = self.s.timesteps[i];
        let prev_timestep = timestep - self.s.step_ratio;
        let a = self.s.alphas_cumprod[timestep as usize];
        let ap = if prev_timestep >= 0 { self.s.alphas_cumprod[prev_timestep as usize] } else { self.s.final_alpha_cumprod };
        let b = 1.0 - a;
        let (pred_original, pred_epsilon) = match self.s.prediction {
            Prediction::Epsilon => ((sample - model_output * sqrt32(b) as f64) / sqrt32(a) as f64, model_output.shallow_clone()),
            Prediction::VPrediction => (sample * sqrt32(a) as f64 - model_output * sqrt32(b) as f64, model_output * sqrt32(a) as f64 + sample * sqrt32(b) as f64),
        };
        let pred_original = match self.s.clip {
            Some(r) => pred_original.clamp(-r, r),
            None => pred_original,
        };
        // _get_variance, times eta = 0.0: std_dev_t is a float32 zero.
        let bp = 1.0 - ap;
        let variance = (bp / b) * (1.0 - a / ap);
        let std_dev_t = 0.0 * sqrt32(variance);
        let direction = pred_epsilon * sqrt32(1.0 - ap - std_dev_t * std_dev_t) as f64;
        pred_original * sqrt32(ap) as f64 + direction
    }
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }
    fn name(&self) -> &'static str {
        Self::NAME
    }
    fn alphas_cumprod(&self) -> &[f64] {
        &self.s.alphas_cumprod_f64
    }
    fn set_begin_index(&mut self, _k: usize) {}
    fn add_noise(&self, original: &Tensor, noise: &Tensor, k: usize) -> Tensor {
        super::add_noise_alphas(&self.s.alphas_cumprod, self.s.timesteps[k] as usize, original, noise)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::schedule::testing;

    /// Every Ddim case of tests/fixtures/refs/schedulers.json (tools/make_scheduler_refs.py).
    #[test]
    fn matches_diffusers() {
        testing::check_class(Ddim::NAME);
    }
}
