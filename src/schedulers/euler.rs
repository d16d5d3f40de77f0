//! diffusers `EulerDiscreteScheduler` (scheduling_euler_discrete.py): Algorithm 2 of Karras et al.
//! (2022) without churn (the pipelines pass `s_churn = 0`), so it draws no noise.

use tch::{Kind, Tensor};

use super::config::{Cfg, Rescale};
use super::schedule::{self, karras, log32, np_arange, np_interp, np_linspace, sigma_to_t, sqrt32, widen, Prediction, Spacing};
use super::{Scheduler, SchedulerError};

pub struct EulerDiscrete {
    alphas_cumprod: Vec<f64>,
    sigmas: Vec<f32>,
    sigmas_f64: Vec<f64>,
    timesteps: Vec<f64>,
    init_noise_sigma: f32,
    prediction: Prediction,
    step_index: Option<usize>,
}

/// The `set_timesteps` spacing shared by the Euler-type schedulers (float32 timesteps, descending).
pub(crate) fn spaced_timesteps(spacing: Spacing, n: usize, steps: usize, offset: i64) -> Vec<f32> {
    match spacing {
        // np.linspace(0, n - 1, steps, dtype=np.float32)[::-1]
        Spacing::Linspace => np_linspace(0.0, (n - 1) as f64, steps).into_iter().rev().map(|t| t as f32).collect(),
        // (np.arange(0, steps) * ratio).round()[::-1].astype(np.float32) + steps_offset
        Spacing::Leading => (0..steps).rev().map(|i| (i * (n / steps)) as f32 + offset as f32).collect(),
        // np.arange(n, 0, -n / steps).round().astype(np.float32) - 1
        Spacing::Trailing => np_arange(n as f64, 0.0, -(n as f64 / steps as f64)).into_iter().map(|t| t.round_ties_even() as f32 - 1.0).collect(),
    }
}

/// `init_noise_sigma`: the largest sigma, or `(max**2 + 1) ** 0.5` for "leading" spacing.
pub(crate) fn init_noise_sigma(sigmas: &[f32], spacing: Spacing) -> f32 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        Spacing::Linspace | Spacing::Trailing => max,
        Spacing::Leading => sqrt32(max * max + 1.0),
    }
}

pub(crate) fn check_steps(class: &'static str, steps: usize, n: usize) -> Result<(), SchedulerError> {
    if steps == 0 || steps > n {
        return Err(SchedulerError::Steps { class, steps, reason: format!("expected 1 to num_train_timesteps = {n}") });
    }
    Ok(())
}

impl EulerDiscrete {
    pub const NAME: &'static str = "EulerDiscreteScheduler";

    /// `EulerDiscreteScheduler(**config)` then `set_timesteps(steps)`.
    pub(crate) fn new(cfg: &Cfg, steps: usize) -> Result<Self, SchedulerError> {
        let ac = cfg.alphas_cumprod(Rescale::BetasAndLastCumprod)?;
        let n = ac.len();
        let prediction = cfg.prediction()?;
        cfg.choice("interpolation_type", "linear", &["linear"])?;
        let continuous = cfg.choice("timestep_type", "discrete", &["discrete", "continuous"])? == "continuous";
        let use_karras = cfg.bool("use_karras_sigmas", false)?;
        cfg.require_false("use_exponential_sigmas")?;
        cfg.require_false("use_beta_sigmas")?;
        let sigma_min = cfg.opt_f64("sigma_min")?;
        let sigma_max = cfg.opt_f64("sigma_max")?;
        let spacing = cfg.spacing("linspace")?;
        let offset = cfg.steps_offset()?;
        let sigma_min_last = cfg.choice("final_sigmas_type", "zero", &["zero", "sigma_min"])? == "sigma_min";
        check_steps(Self::NAME, steps, n)?;

        let mut timesteps: Vec<f64> = spaced_timesteps(spacing, n, steps, offset).into_iter().map(f64::from).collect();
        let train = schedule::train_sigmas(&ac);
        let log_sigmas: Vec<f32> = train.iter().map(|&s| s.ln()).collect();
        let train64 = widen(&train);
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| np_interp(t, &train64)).collect();
        if use_karras {
            let lo = sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let hi = sigma_max.unwrap_or(sigmas[0]);
            sigmas = karras(lo, hi, steps);
            // float32, as `torch.from_numpy(timesteps.astype(np.float32))` keeps them.
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas) as f32 as f64).collect();
        }
        let last = if sigma_min_last { train[0] } else { 0.0 };
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).chain(std::iter::once(last)).collect();
        if continuous && prediction == Prediction::VPrediction {
            // torch.Tensor([0.25 * sigma.log() for sigma in sigmas[:-1]])
            timesteps = sigmas[..sigmas.len() - 1].iter().map(|&s| (0.25 * log32(s)) as f64).collect();
        }
        schedule::check_first_timestep(Self::NAME, steps, &timesteps)?;
        Ok(EulerDiscrete { alphas_cumprod: widen(&ac), init_noise_sigma: init_noise_sigma(&sigmas, spacing), sigmas_f64: widen(&sigmas), sigmas, timesteps, prediction, step_index: None })
    }

    fn index(&self, i: usize) -> usize {
        self.step_index.or_else(|| schedule::index_for_timestep(&self.timesteps, self.timesteps[i])).unwrap_or(i)
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
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Tensor {
        scale_by_sigma(sample, self.sigmas[self.index(i)])
    }
    /// diffusers `EulerDiscreteScheduler.step` with `s_churn = 0` (so `sigma_hat = sigma`).
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor) -> Tensor {
        let idx = self.index(i);
        let sample = sample.to_kind(Kind::Float);
        let sigma = self.sigmas[idx];
        // gamma = 0: sigma_hat = sigma * (gamma + 1) = sigma exactly.
        let sigma_hat = sigma;
        let pred = pred_original(self.prediction, model_output, &sample, sigma);
        let derivative = (&sample - pred) / sigma_hat as f64;
        let dt = self.sigmas[idx + 1] - sigma_hat;
        let prev = sample + derivative * dt as f64;
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

    /// Every EulerDiscrete case of tests/fixtures/refs/schedulers.json (tools/make_scheduler_refs.py).
    #[test]
    fn matches_diffusers() {
        testing::check_class(EulerDiscrete::NAME);
    }
}
