//! diffusers `FlowMatchEulerDiscreteScheduler` (scheduling_flow_match_euler_discrete.py), as
//! Stable Diffusion 3 uses it: sigmas from 1 down to the shifted `1 / num_train_timesteps`, a
//! static `shift` or (with `use_dynamic_shifting`) the pipeline's resolution-dependent `mu`, and
//! the Euler step of the flow ODE, `x + (sigma_next - sigma) * v`. No noise is drawn.
//!
//! Precision, as diffusers computes it: `__init__` shifts the training sigmas with float32 tensor
//! ops (only their first and last matter: `set_timesteps` spans them), `set_timesteps` spaces and
//! shifts in numpy float64, then rounds the sigmas to float32 and takes `timesteps = sigmas * N`
//! in float32.

use tch::{Kind, Tensor};

use super::config::Cfg;
use super::euler::check_steps;
use super::schedule::{self, np_linspace, widen};
use super::{Scheduler, SchedulerError};

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

pub struct FlowMatchEulerDiscrete {
    sigmas: Vec<f32>,
    sigmas_f64: Vec<f64>,
    timesteps: Vec<f64>,
    step_index: Option<usize>,
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
        let ends = Tensor::from_slice(&[n as f32, 1.0]) / n as f64;
        let ends = if c.use_dynamic_shifting { ends } else { (&ends * c.shift) / ((&ends * (c.shift - 1.0)) + 1.0) };
        let ends = schedule::to_vec(&ends);
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
        Ok(FlowMatchEulerDiscrete { sigmas_f64: widen(&sigmas), sigmas, timesteps, step_index: None })
    }

    fn index(&self, i: usize) -> usize {
        self.step_index.or_else(|| schedule::index_for_timestep(&self.timesteps, self.timesteps[i])).unwrap_or(i)
    }
}

impl Scheduler for FlowMatchEulerDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    /// diffusers has none: flow-matching pipelines use the unit-variance draw as is.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// diffusers has none: the transformer takes the latents unscaled.
    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> Tensor {
        sample.shallow_clone()
    }
    /// diffusers `step` without stochastic sampling or per-token timesteps.
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor) -> Tensor {
        let idx = self.index(i);
        let sample = sample.to_kind(Kind::Float);
        // diffusers' sigmas live on the pipeline's device (set_timesteps(device=...)), so `dt` is
        // a 0-d float32 tensor there, not a CPU scalar: on CUDA a half model_output rounds it to
        // half before the product. The same tensor here gives libtorch's same arithmetic.
        let dt = Tensor::scalar_tensor((self.sigmas[idx + 1] - self.sigmas[idx]) as f64, (Kind::Float, model_output.device()));
        let prev = sample + dt * model_output;
        self.step_index = Some(idx + 1);
        prev.to_kind(model_output.kind())
    }
    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas_f64)
    }
    fn name(&self) -> &'static str {
        Self::NAME
    }
    /// None: flow matching has no noise schedule of betas.
    fn alphas_cumprod(&self) -> &[f64] {
        &[]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::schedule::testing;

    /// Every FlowMatchEulerDiscrete case of tests/fixtures/refs/schedulers.json
    /// (tools/make_scheduler_refs.py), with the schedule equal in float32, not just close.
    #[test]
    fn matches_diffusers() {
        testing::check_class(FlowMatchEulerDiscrete::NAME);
        for case in testing::cases(FlowMatchEulerDiscrete::NAME) {
            let name = case["name"].as_str().unwrap_or("?");
            let s = testing::build_case(&case);
            assert_eq!(s.timesteps(), testing::nums(&case["timesteps"]), "{name}");
            assert_eq!(s.sigmas().unwrap(), testing::nums(&case["sigmas"]), "{name}");
        }
    }

    /// The pipelines' `calculate_shift`, equal to the Python floats the cases were run with.
    #[test]
    fn calculate_shift_matches_python() {
        let mut seen = 0;
        for case in testing::cases(FlowMatchEulerDiscrete::NAME) {
            let Some(seq) = case["name"].as_str().and_then(|n| ["1024px", "512px", "768x512", "linear-6"].iter().position(|k| n.contains(k))) else { continue };
            let tokens = [4096, 1024, 1536, 1024][seq];
            assert_eq!(calculate_shift(tokens, 256, 4096, 0.5, 1.15), case["mu"].as_f64().unwrap(), "{}", case["name"]);
            seen += 1;
        }
        assert_eq!(seen, 4);
    }

    /// FluxPipeline's `set_timesteps(sigmas=linspace(1, 1/N, N), mu=mu)`: equal in float32 to what
    /// diffusers recorded in the FLUX references (dev: dynamic shifting; schnell: shift 1).
    #[test]
    fn flux_sigmas_match_diffusers() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        for (case, folder) in [("flux-dev", "tiny-flux-dev"), ("flux-dev-true-cfg", "tiny-flux-dev"), ("flux-schnell-nonsquare", "tiny-flux-schnell")] {
            let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(crate::parity::refs_dir().join(format!("{case}.json"))).unwrap()).unwrap();
            let cfg = crate::schedulers::parse_config(&std::fs::read_to_string(root.join(folder).join("scheduler/scheduler_config.json")).unwrap()).unwrap();
            let n = meta["steps"].as_u64().unwrap() as usize;
            let seq = (meta["height"].as_u64().unwrap() / 16 * (meta["width"].as_u64().unwrap() / 16)) as usize;
            let sigmas: Vec<f64> = np_linspace(1.0, 1.0 / n as f64, n);
            let mu = crate::schedulers::dynamic_shift_mu(&cfg, seq).unwrap();
            let s = crate::schedulers::build_with_sigmas(&cfg, None, &sigmas, mu).unwrap();
            let refs: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(crate::parity::refs_dir().join(format!("{case}.safetensors"))).unwrap().into_iter().collect();
            let want = |k: &str| -> Vec<f64> { Vec::<f32>::try_from(&refs[k]).unwrap().into_iter().map(f64::from).collect() };
            assert_eq!(s.sigmas().unwrap(), want("scheduler.sigmas"), "{case}");
            assert_eq!(s.timesteps(), want("scheduler.timesteps"), "{case}");
        }
    }
}
