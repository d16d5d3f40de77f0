//! diffusers `DDIMScheduler` (scheduling_ddim.py), deterministic (`eta = 0`, the pipelines' default).

use tch::Tensor;

use super::config::{Cfg, Rescale};
use super::schedule::{np_arange, np_linspace, sqrt32, widen, Prediction, Spacing};
use super::{Scheduler, SchedulerError};

pub struct Ddim {
    alphas_cumprod: Vec<f32>,
    alphas_cumprod_f64: Vec<f64>,
    final_alpha_cumprod: f32,
    prediction: Prediction,
    /// `clip_sample_range` when `clip_sample`.
    clip: Option<f64>,
    step_ratio: i64,
    timesteps: Vec<i64>,
    timesteps_f64: Vec<f64>,
}

impl Ddim {
    pub const NAME: &'static str = "DDIMScheduler";

    /// `DDIMScheduler(**config)` then `set_timesteps(steps)`.
    pub(crate) fn new(cfg: &Cfg, steps: usize) -> Result<Self, SchedulerError> {
        let ac = cfg.alphas_cumprod(Rescale::Betas)?;
        let n = ac.len();
        let final_alpha_cumprod = if cfg.bool("set_alpha_to_one", true)? { 1.0 } else { ac[0] };
        let prediction = cfg.prediction()?;
        cfg.require_false("thresholding")?;
        let clip = if cfg.bool("clip_sample", true)? { Some(cfg.f64("clip_sample_range", 1.0)?) } else { None };
        let spacing = cfg.spacing("leading")?;
        let offset = cfg.steps_offset()?;
        if steps == 0 || steps > n {
            return Err(SchedulerError::Steps { class: Self::NAME, steps, reason: format!("expected 1 to num_train_timesteps = {n}") });
        }
        let timesteps: Vec<i64> = match spacing {
            Spacing::Linspace => np_linspace(0.0, (n - 1) as f64, steps).into_iter().rev().map(|t| t.round_ties_even() as i64).collect(),
            Spacing::Leading => (0..steps).rev().map(|i| (i * (n / steps)) as i64 + offset).collect(),
            Spacing::Trailing => np_arange(n as f64, 0.0, -(n as f64 / steps as f64)).into_iter().map(|t| t.round_ties_even() as i64 - 1).collect(),
        };
        if let Some(bad) = timesteps.iter().find(|&&t| t < 0 || t >= n as i64) {
            return Err(SchedulerError::Steps { class: Self::NAME, steps, reason: format!("timestep {bad} is outside the {n} training timesteps (steps_offset = {offset})") });
        }
        Ok(Ddim {
            alphas_cumprod_f64: widen(&ac),
            alphas_cumprod: ac,
            final_alpha_cumprod,
            prediction,
            clip,
            step_ratio: (n / steps) as i64,
            timesteps_f64: timesteps.iter().map(|&t| t as f64).collect(),
            timesteps,
        })
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps_f64
    }
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> Tensor {
        sample.shallow_clone()
    }
    /// diffusers `DDIMScheduler.step` with `eta = 0`, `use_clipped_model_output = False`.
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor) -> Tensor {
        let timestep = self.timesteps[i];
        let prev_timestep = timestep - self.step_ratio;
        let a = self.alphas_cumprod[timestep as usize];
        let ap = if prev_timestep >= 0 { self.alphas_cumprod[prev_timestep as usize] } else { self.final_alpha_cumprod };
        let b = 1.0 - a;
        let (pred_original, pred_epsilon) = match self.prediction {
            Prediction::Epsilon => ((sample - model_output * sqrt32(b) as f64) / sqrt32(a) as f64, model_output.shallow_clone()),
            Prediction::VPrediction => (sample * sqrt32(a) as f64 - model_output * sqrt32(b) as f64, model_output * sqrt32(a) as f64 + sample * sqrt32(b) as f64),
        };
        let pred_original = match self.clip {
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
        &self.alphas_cumprod_f64
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
