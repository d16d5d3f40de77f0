//! diffusers `PNDMScheduler` (scheduling_pndm.py) with `skip_prk_steps = true`: the PLMS sampler
//! Stable Diffusion 1.x ships with. N steps make N+1 model calls: the second call redoes the first
//! step with the mean of the first two predictions.

use super::config::{Cfg, Rescale};
use super::math::F32Math;
use super::schedule::{np_arange, np_linspace, widen, Prediction, Spacing};
use super::SchedulerError;

/// `PNDMScheduler(**config)` after `set_timesteps(steps)`.
#[derive(Debug, Clone)]
pub struct Pndm {
    pub alphas_cumprod: Vec<f32>,
    pub alphas_cumprod_f64: Vec<f64>,
    pub final_alpha_cumprod: f32,
    pub prediction: Prediction,
    /// `num_train_timesteps // num_inference_steps`
    pub step_ratio: i64,
    pub timesteps: Vec<i64>,
    pub timesteps_f64: Vec<f64>,
}

impl Pndm {
    pub const NAME: &'static str = "PNDMScheduler";

    /// `PNDMScheduler(**config)` then `set_timesteps(steps)`.
    pub(crate) fn new(cfg: &Cfg, steps: usize, math: &dyn F32Math) -> Result<Self, SchedulerError> {
        let ac = cfg.alphas_cumprod(Rescale::NotAKey, math)?;
        let n = ac.len();
        if !cfg.bool("skip_prk_steps", false)? {
            return Err(cfg.bad("skip_prk_steps", "false", "runner implements PNDM's PLMS steps only: set skip_prk_steps = true (as Stable Diffusion does)"));
        }
        let final_alpha_cumprod = if cfg.bool("set_alpha_to_one", false)? { 1.0 } else { ac[0] };
        let prediction = cfg.prediction()?;
        let spacing = cfg.spacing("leading")?;
        let offset = cfg.steps_offset()?;
        if steps == 0 || steps > n {
            return Err(SchedulerError::Steps { class: Self::NAME, steps, reason: format!("expected 1 to num_train_timesteps = {n}") });
        }
        // set_timesteps: `_timesteps` ascending.
        let base: Vec<i64> = match spacing {
            Spacing::Linspace => np_linspace(0.0, (n - 1) as f64, steps).into_iter().map(|t| t.round_ties_even() as i64).collect(),
            Spacing::Leading => (0..steps).map(|i| (i * (n / steps)) as i64 + offset).collect(),
            Spacing::Trailing => {
                let mut t: Vec<i64> = np_arange(n as f64, 0.0, -(n as f64 / steps as f64)).into_iter().map(|t| t.round_ties_even() as i64 - 1).collect();
                t.reverse();
                t
            }
        };
        // plms_timesteps = concatenate([_ts[:-1], _ts[-2:-1], _ts[-1:]])[::-1]
        let k = base.len();
        let mut timesteps: Vec<i64> = base[..k - 1].to_vec();
        if k >= 2 {
            timesteps.push(base[k - 2]);
        }
        timesteps.push(base[k - 1]);
        timesteps.reverse();
        let step_ratio = (n / steps) as i64;
        // Every alphas_cumprod index step() will use must exist (diffusers would raise IndexError).
        if let Some(bad) = timesteps.iter().chain(timesteps.get(1).map(|t| t + step_ratio).iter()).find(|&&t| t < 0 || t >= n as i64) {
            return Err(SchedulerError::Steps { class: Self::NAME, steps, reason: format!("timestep {bad} is outside the {n} training timesteps (steps_offset = {offset}, timestep_spacing)") });
        }
        Ok(Pndm { alphas_cumprod_f64: widen(&ac), alphas_cumprod: ac, final_alpha_cumprod, prediction, step_ratio, timesteps_f64: timesteps.iter().map(|&t| t as f64).collect(), timesteps })
    }
}
