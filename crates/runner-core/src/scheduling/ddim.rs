//! diffusers `DDIMScheduler` (scheduling_ddim.py), deterministic (`eta = 0`, the pipelines' default).

use super::config::{Cfg, Rescale};
use super::math::F32Math;
use super::schedule::{np_arange, np_linspace, widen, Prediction, Spacing};
use super::SchedulerError;

/// `DDIMScheduler(**config)` after `set_timesteps(steps)`.
#[derive(Debug, Clone)]
pub struct Ddim {
    pub alphas_cumprod: Vec<f32>,
    pub alphas_cumprod_f64: Vec<f64>,
    pub final_alpha_cumprod: f32,
    pub prediction: Prediction,
    /// `clip_sample_range` when `clip_sample`.
    pub clip: Option<f64>,
    pub step_ratio: i64,
    pub timesteps: Vec<i64>,
    pub timesteps_f64: Vec<f64>,
}

impl Ddim {
    pub const NAME: &'static str = "DDIMScheduler";

    /// `DDIMScheduler(**config)` then `set_timesteps(steps)`.
    pub(crate) fn new(cfg: &Cfg, steps: usize, math: &dyn F32Math) -> Result<Self, SchedulerError> {
        let ac = cfg.alphas_cumprod(Rescale::Betas, math)?;
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
