//! diffusers `EulerDiscreteScheduler` (scheduling_euler_discrete.py): Algorithm 2 of Karras et al.
//! (2022) without churn (the pipelines pass `s_churn = 0`), so it draws no noise.

use super::config::{Cfg, Rescale};
use super::math::F32Math;
use super::schedule::{self, check_steps, init_noise_sigma, karras, np_interp, sigma_to_t, spaced_timesteps, widen, Prediction};
use super::SchedulerError;

/// `EulerDiscreteScheduler(**config)` after `set_timesteps(steps)`.
#[derive(Debug, Clone)]
pub struct EulerDiscrete {
    pub alphas_cumprod: Vec<f64>,
    pub sigmas: Vec<f32>,
    pub sigmas_f64: Vec<f64>,
    pub timesteps: Vec<f64>,
    pub init_noise_sigma: f32,
    pub prediction: Prediction,
}

impl EulerDiscrete {
    pub const NAME: &'static str = "EulerDiscreteScheduler";

    /// `EulerDiscreteScheduler(**config)` then `set_timesteps(steps)`.
    pub(crate) fn new(cfg: &Cfg, steps: usize, math: &dyn F32Math) -> Result<Self, SchedulerError> {
        let ac = cfg.alphas_cumprod(Rescale::BetasAndLastCumprod, math)?;
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
        let train = schedule::train_sigmas(&ac, math);
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
            timesteps = sigmas[..sigmas.len() - 1].iter().map(|&s| (0.25 * math.log32(s)) as f64).collect();
        }
        schedule::check_first_timestep(Self::NAME, steps, &timesteps)?;
        Ok(EulerDiscrete { alphas_cumprod: widen(&ac), init_noise_sigma: init_noise_sigma(&sigmas, spacing, math), sigmas_f64: widen(&sigmas), sigmas, timesteps, prediction })
    }
}
