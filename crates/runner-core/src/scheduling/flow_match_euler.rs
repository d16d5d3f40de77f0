//! diffusers `FlowMatchEulerDiscreteScheduler` (scheduling_flow_match_euler_discrete.py), as
//! Stable Diffusion 3 uses it: sigmas from 1 down to the shifted `1 / num_train_timesteps`, a
//! static `shift` or (with `use_dynamic_shifting`) the pipeline's resolution-dependent `mu`, and
//! the Euler step of the flow ODE, `x + (sigma_next - sigma) * v`. No noise is drawn.
//!
//! Precision, as diffusers computes it: `__init__` shifts the training sigmas with float32 tensor
//! ops (only their first and last matter: `set_timesteps` spans them), `set_timesteps` spaces and
//! shifts in numpy float64, then rounds the sigmas to float32 and takes `timesteps = sigmas * N`
//! in float32.

use super::config::Cfg;
use super::schedule::{self, check_steps, np_linspace, widen};
use super::SchedulerError;

/// diffusers `time_shift_type`: how `mu` shifts the sigmas under `use_dynamic_shifting`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeShift {
    /// `exp(mu) / (exp(mu) + (1 / t - 1))`
    Exponential,
    /// `mu / (mu + (1 / t - 1))`
    Linear,
}

/// The config keys of `FlowMatchEulerDiscreteScheduler.__init__` that runner implements, read
/// strictly; the others must keep their defaults.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FlowMatchConfig {
    pub num_train_timesteps: usize,
    pub shift: f64,
    pub use_dynamic_shifting: bool,
    /// `float | None` in diffusers: `null` stays None (and fails where the pipeline needs it).
    pub base_shift: Option<f64>,
    pub max_shift: Option<f64>,
    pub base_image_seq_len: i64,
    pub max_image_seq_len: i64,
    pub time_shift_type: TimeShift,
}

impl FlowMatchConfig {
    pub fn read(cfg: &Cfg) -> Result<Self, SchedulerError> {
        let num_train_timesteps = cfg.num_train_timesteps()?;
        let shift = cfg.f64("shift", 1.0)?;
        if !(shift.is_finite() && shift > 0.0) {
            return Err(cfg.bad("shift", shift.to_string(), "expected a positive number"));
        }
        let time_shift_type = match cfg.choice("time_shift_type", "exponential", &["exponential", "linear"])? {
            "exponential" => TimeShift::Exponential,
            _ => TimeShift::Linear,
        };
        // Schedules runner does not implement: refused, never ignored.
        for key in ["invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling"] {
            cfg.require_false(key)?;
        }
        // diffusers stretches only when `if self.config.shift_terminal:` (None and 0.0 do not).
        if let Some(t) = cfg.opt_f64("shift_terminal")?.filter(|&t| t != 0.0) {
            return Err(cfg.bad("shift_terminal", t.to_string(), "not supported by runner (only null)"));
        }
        Ok(FlowMatchConfig {
            num_train_timesteps,
            shift,
            use_dynamic_shifting: cfg.bool("use_dynamic_shifting", false)?,
            base_shift: cfg.nullable_f64("base_shift", 0.5)?,
            max_shift: cfg.nullable_f64("max_shift", 1.15)?,
            base_image_seq_len: cfg.int("base_image_seq_len", 256)?,
            max_image_seq_len: cfg.int("max_image_seq_len", 4096)?,
            time_shift_type,
        })
    }

    /// The pipelines' `mu` for `image_seq_len` latent tokens when `use_dynamic_shifting` is on
    /// (StableDiffusion3Pipeline / FluxPipeline: `calculate_shift` of the config's values).
    pub fn mu(&self, cfg: &Cfg, image_seq_len: usize) -> Result<Option<f64>, SchedulerError> {
        if !self.use_dynamic_shifting {
            return Ok(None);
        }
        let need = |key: &str, v: Option<f64>| v.ok_or_else(|| cfg.bad(key, "null", "use_dynamic_shifting needs a number here (calculate_shift)"));
        let (base_shift, max_shift) = (need("base_shift", self.base_shift)?, need("max_shift", self.max_shift)?);
        if self.max_image_seq_len == self.base_image_seq_len {
            return Err(cfg.bad("max_image_seq_len", self.max_image_seq_len.to_string(), "must differ from base_image_seq_len (calculate_shift divides by the difference)"));
        }
        Ok(Some(calculate_shift(image_seq_len, self.base_image_seq_len, self.max_image_seq_len, base_shift, max_shift)))
    }
}

/// diffusers' pipeline function `calculate_shift` (pipeline_stable_diffusion_3.py,
/// pipeline_flux.py): `mu` linear in the number of latent tokens, in Python floats.
pub fn calculate_shift(image_seq_len: usize, base_seq_len: i64, max_seq_len: i64, base_shift: f64, max_shift: f64) -> f64 {
    let m = (max_shift - base_shift) / (max_seq_len - base_seq_len) as f64;
    let b = base_shift - m * base_seq_len as f64;
    image_seq_len as f64 * m + b
}

/// `FlowMatchEulerDiscreteScheduler(**config)` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct FlowMatchEulerDiscrete {
    pub sigmas: Vec<f32>,
    pub sigmas_f64: Vec<f64>,
    pub timesteps: Vec<f64>,
}

impl FlowMatchEulerDiscrete {
    pub const NAME: &'static str = "FlowMatchEulerDiscreteScheduler";

    /// `FlowMatchEulerDiscreteScheduler(**config)` then `set_timesteps(steps, mu=mu)`. `mu` is
    /// required with `use_dynamic_shifting` and, as in diffusers, unused without it.
    pub(crate) fn new(cfg: &Cfg, steps: usize, mu: Option<f64>) -> Result<Self, SchedulerError> {
        let c = FlowMatchConfig::read(cfg)?;
        let n = c.num_train_timesteps;
        check_steps(Self::NAME, steps, n)?;
        let mu = Self::check_mu(cfg, &c, mu)?;

        // __init__: sigmas = linspace(1, N, N)[::-1] / N as float32 tensors, shifted (float32
        // tensor ops, the shift rounded to float32) unless shifting is dynamic. Elementwise, so
        // the two ends set_timesteps uses are computed alone.
        // (A float32 tensor times a Python float multiplies by the float rounded to float32.)
        let ends = [1.0f32, 1.0 / n as f32]; // N / N and 1 / N
        let (shift, shift_1) = (c.shift as f32, (c.shift - 1.0) as f32);
        let ends = if c.use_dynamic_shifting { ends } else { ends.map(|e| (e * shift) / (e * shift_1 + 1.0)) };
        let (sigma_max, sigma_min) = (ends[0] as f64, ends[1] as f64);

        // set_timesteps: numpy float64 from here to the float32 cast.
        let nf = n as f64;
        let sigmas: Vec<f64> = np_linspace(sigma_max * nf, sigma_min * nf, steps).into_iter().map(|t| t / nf).collect();
        let sigmas: Vec<f64> = match mu {
            None => sigmas.iter().map(|&s| c.shift * s / (1.0 + (c.shift - 1.0) * s)).collect(),
            // time_shift(mu, 1.0, t): `(1 / t - 1) ** 1.0` is exact.
            Some(mu) => match c.time_shift_type {
                TimeShift::Exponential => sigmas.iter().map(|&t| mu.exp() / (mu.exp() + (1.0 / t - 1.0))).collect(),
                TimeShift::Linear => sigmas.iter().map(|&t| mu / (mu + (1.0 / t - 1.0))).collect(),
            },
        };
        Self::finish(sigmas.iter().map(|&s| s as f32).collect(), n, steps)
    }

    /// `set_timesteps(sigmas=sigmas, mu=mu)` (FluxPipeline passes `linspace(1, 1/N, N)`): the
    /// sigmas are cast to float32 first (numpy), so the shift is float32 arithmetic, with the
    /// Python floats `exp(mu)`, `shift` and `shift - 1` rounded to float32 as numpy does.
    pub(crate) fn with_sigmas(cfg: &Cfg, sigmas: &[f64], mu: Option<f64>) -> Result<Self, SchedulerError> {
        let c = FlowMatchConfig::read(cfg)?;
        let n = c.num_train_timesteps;
        check_steps(Self::NAME, sigmas.len(), n)?;
        let mu = Self::check_mu(cfg, &c, mu)?;
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        let sigmas: Vec<f32> = match mu {
            None => {
                let (shift, shift_1) = (c.shift as f32, (c.shift - 1.0) as f32);
                sigmas.iter().map(|&s| shift * s / (1.0 + shift_1 * s)).collect()
            }
            Some(mu) => match c.time_shift_type {
                TimeShift::Exponential => {
                    let e = mu.exp() as f32;
                    sigmas.iter().map(|&t| e / (e + (1.0 / t - 1.0))).collect()
                }
                TimeShift::Linear => {
                    let m = mu as f32;
                    sigmas.iter().map(|&t| m / (m + (1.0 / t - 1.0))).collect()
                }
            },
        };
        let steps = sigmas.len();
        Self::finish(sigmas, n, steps)
    }

    /// `mu` is required with `use_dynamic_shifting` and, as in diffusers, unused without it.
    fn check_mu(cfg: &Cfg, c: &FlowMatchConfig, mu: Option<f64>) -> Result<Option<f64>, SchedulerError> {
        match (c.use_dynamic_shifting, mu) {
            (false, _) => Ok(None),
            (true, None) => Err(cfg.bad("use_dynamic_shifting", "true", "needs the pipeline's `mu` (resolution-dependent shifting), which was not given")),
            (true, Some(m)) if !m.is_finite() || (c.time_shift_type == TimeShift::Linear && m <= 0.0) => {
                Err(SchedulerError::Mu { class: Self::NAME, mu: m, reason: "expected a finite number (positive for time_shift_type \"linear\")".into() })
            }
            (true, Some(m)) => Ok(Some(m)),
        }
    }

    /// The float32 sigmas to the schedule: `timesteps = sigmas * N` on the float32 tensor, and a
    /// trailing 0.
    fn finish(sigmas: Vec<f32>, n: usize, steps: usize) -> Result<Self, SchedulerError> {
        let timesteps: Vec<f64> = sigmas.iter().map(|&s| (s * n as f32) as f64).collect();
        let sigmas: Vec<f32> = sigmas.into_iter().chain(std::iter::once(0.0)).collect();
        schedule::check_first_timestep(Self::NAME, steps, &timesteps)?;
        Ok(FlowMatchEulerDiscrete { sigmas_f64: widen(&sigmas), sigmas, timesteps })
    }
}
