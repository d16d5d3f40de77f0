//! diffusers `EulerAncestralDiscreteScheduler` (scheduling_euler_ancestral_discrete.py): an Euler
//! step to `sigma_down` plus fresh noise times `sigma_up` (the noise is the executor's).

use super::config::{Cfg, Rescale};
use super::math::F32Math;
use super::schedule::{self, check_steps, init_noise_sigma, np_interp, spaced_timesteps, widen, Prediction};
use super::SchedulerError;

/// `EulerAncestralDiscreteScheduler(**config)` after `set_timesteps(steps)`.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscrete {
    pub alphas_cumprod: Vec<f64>,
    pub sigmas: Vec<f32>,
    pub sigmas_f64: Vec<f64>,
    pub timesteps: Vec<f64>,
    pub init_noise_sigma: f32,
    pub prediction: Prediction,
}

impl EulerAncestralDiscrete {
    pub const NAME: &'static str = "EulerAncestralDiscreteScheduler";

    /// `EulerAncestralDiscreteScheduler(**config)` then `set_timesteps(steps)`.
    pub(crate) fn new(cfg: &Cfg, steps: usize, math: &dyn F32Math) -> Result<Self, SchedulerError> {
        let ac = cfg.alphas_cumprod(Rescale::BetasAndLastCumprod, math)?;
        let n = ac.len();
        let prediction = cfg.prediction()?;
        let spacing = cfg.spacing("linspace")?;
        let offset = cfg.steps_offset()?;
        check_steps(Self::NAME, steps, n)?;
        let timesteps = spaced_timesteps(spacing, n, steps, offset);
        let train = widen(&schedule::train_sigmas(&ac, math));
        let sigmas: Vec<f32> = timesteps.iter().map(|&t| np_interp(t as f64, &train) as f32).chain(std::iter::once(0.0)).collect();
        schedule::check_first_timestep(Self::NAME, steps, &widen(&timesteps))?;
        Ok(EulerAncestralDiscrete {
            alphas_cumprod: widen(&ac),
            init_noise_sigma: init_noise_sigma(&sigmas, spacing, math),
            sigmas_f64: widen(&sigmas),
            sigmas,
            timesteps: widen(&timesteps),
            prediction,
        })
    }
}
