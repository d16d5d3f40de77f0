//! diffusers `LMSDiscreteScheduler` (scheduling_lms_discrete.py): linear multistep on the Euler
//! derivatives, order 4.

use super::config::{Cfg, Rescale};
use super::math::F32Math;
use super::schedule::{self, check_steps, init_noise_sigma, karras, np_interp, sigma_to_t, spaced_timesteps, widen, Prediction};
use super::SchedulerError;

/// `LMSDiscreteScheduler(**config)` after `set_timesteps(steps)`.
#[derive(Debug, Clone)]
pub struct LmsDiscrete {
    pub alphas_cumprod: Vec<f64>,
    pub sigmas: Vec<f32>,
    pub sigmas_f64: Vec<f64>,
    pub timesteps: Vec<f64>,
    pub init_noise_sigma: f32,
    pub prediction: Prediction,
}

impl LmsDiscrete {
    pub const NAME: &'static str = "LMSDiscreteScheduler";

    /// `LMSDiscreteScheduler(**config)` then `set_timesteps(steps)`.
    pub(crate) fn new(cfg: &Cfg, steps: usize, math: &dyn F32Math) -> Result<Self, SchedulerError> {
        let ac = cfg.alphas_cumprod(Rescale::NotAKey, math)?;
        let n = ac.len();
        let use_karras = cfg.bool("use_karras_sigmas", false)?;
        cfg.require_false("use_exponential_sigmas")?;
        cfg.require_false("use_beta_sigmas")?;
        let prediction = cfg.prediction()?;
        let spacing = cfg.spacing("linspace")?;
        let offset = cfg.steps_offset()?;
        check_steps(Self::NAME, steps, n)?;
        let mut timesteps: Vec<f64> = spaced_timesteps(spacing, n, steps, offset).into_iter().map(f64::from).collect();
        let train = schedule::train_sigmas(&ac, math);
        let train64 = widen(&train);
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| np_interp(t, &train64)).collect();
        if use_karras {
            let log_sigmas: Vec<f32> = train.iter().map(|&s| s.ln()).collect();
            sigmas = karras(sigmas[sigmas.len() - 1], sigmas[0], steps);
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas) as f32 as f64).collect();
        }
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).chain(std::iter::once(0.0)).collect();
        schedule::check_first_timestep(Self::NAME, steps, &timesteps)?;
        Ok(LmsDiscrete { alphas_cumprod: widen(&ac), init_noise_sigma: init_noise_sigma(&sigmas, spacing, math), sigmas_f64: widen(&sigmas), sigmas, timesteps, prediction })
    }
}
