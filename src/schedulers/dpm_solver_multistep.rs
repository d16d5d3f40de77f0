//! diffusers `DPMSolverMultistepScheduler` (scheduling_dpmsolver_multistep.py): DPM-Solver++ (and
//! the deprecated DPM-Solver) multistep, orders 1 to 3, midpoint or Heun second-order updates,
//! optional Karras sigmas. The SDE variants (which draw noise) are not implemented.

use tch::{Kind, Tensor};

use super::config::{Cfg, Rescale};
use super::euler::check_steps;
use super::schedule::{self, exp32, karras, log32, np_arange, np_interp, np_linspace, sigma_to_t, sqrt32, widen, Prediction, Spacing};
use super::{Scheduler, SchedulerError};

pub struct DpmSolverMultistep {
    alphas_cumprod: Vec<f64>,
    sigmas: Vec<f32>,
    sigmas_f64: Vec<f64>,
    timesteps: Vec<f64>,
    prediction: Prediction,
    /// `algorithm_type == "dpmsolver++"` (else "dpmsolver").
    plus_plus: bool,
    /// `solver_type == "midpoint"` (else "heun").
    midpoint: bool,
    solver_order: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    step_index: Option<usize>,
}

/// diffusers `_sigma_to_alpha_sigma_t` (non-flow): `alpha_t = 1 / (sigma**2 + 1) ** 0.5`, `sigma_t = sigma * alpha_t`.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / sqrt32(sigma * sigma + 1.0);
    (alpha, sigma * alpha)
}

/// `lambda = log(alpha_t) - log(sigma_t)`.
fn lambda(alpha: f32, sigma: f32) -> f32 {
    log32(alpha) - log32(sigma)
}

impl DpmSolverMultistep {
    pub const NAME: &'static str = "DPMSolverMultistepScheduler";

    /// `DPMSolverMultistepScheduler(**config)` then `set_timesteps(steps)`.
    pub(crate) fn new(cfg: &Cfg, steps: usize) -> Result<Self, SchedulerError> {
        let ac = cfg.alphas_cumprod(Rescale::BetasAndLastCumprod)?;
        let n = ac.len();
        let solver_order = cfg.int("solver_order", 2)?;
        if !(1..=3).contains(&solver_order) {
            return Err(cfg.bad("solver_order", solver_order.to_string(), "supported: 1, 2, 3"));
        }
        let prediction = cfg.prediction()?;
        cfg.require_false("thresholding")?;
        // "deis" is registered as "dpmsolver++", and "logrho"/"bh1"/"bh2" as "midpoint", by diffusers' __init__.
        let algorithm = cfg.choice("algorithm_type", "dpmsolver++", &["dpmsolver++", "dpmsolver", "deis"])?;
        let plus_plus = algorithm != "dpmsolver";
        let midpoint = cfg.choice("solver_type", "midpoint", &["midpoint", "heun", "logrho", "bh1", "bh2"])? != "heun";
        let lower_order_final = cfg.bool("lower_order_final", true)?;
        let euler_at_final = cfg.bool("euler_at_final", false)?;
        let use_karras = cfg.bool("use_karras_sigmas", false)?;
        for key in ["use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting"] {
            cfg.require_false(key)?;
        }
        let final_sigma_zero = cfg.choice("final_sigmas_type", "zero", &["zero", "sigma_min"])? == "zero";
        if !plus_plus && final_sigma_zero {
            return Err(cfg.bad("final_sigmas_type", "\"zero\"", "not supported with algorithm_type \"dpmsolver\" (diffusers asks for \"sigma_min\")"));
        }
        let lambda_min_clipped = cfg.f64("lambda_min_clipped", f64::NEG_INFINITY)?;
        if let Some(v) = cfg.opt_str("variance_type")? {
            return Err(cfg.bad("variance_type", format!("{v:?}"), "not supported by runner (only null)"));
        }
        let spacing = cfg.spacing("linspace")?;
        let offset = cfg.steps_offset()?;
        check_steps(Self::NAME, steps, n)?;

        // clipped_idx = torch.searchsorted(torch.flip(lambda_t, [0]), lambda_min_clipped)
        let acs = Tensor::from_slice(&ac);
        let lambda_t = schedule::to_vec(&(acs.sqrt().log() - (acs.neg() + 1.0).sqrt().log()));
        let clipped_idx = lambda_t.iter().rev().take_while(|&&l| (l as f64) < lambda_min_clipped).count();
        let last_timestep = n - clipped_idx;
        let mut timesteps: Vec<f64> = match spacing {
            Spacing::Linspace => {
                let mut t: Vec<f64> = np_linspace(0.0, last_timestep as f64 - 1.0, steps + 1).into_iter().rev().map(f64::round_ties_even).collect();
                t.pop();
                t
            }
            Spacing::Leading => {
                let ratio = last_timestep / (steps + 1);
                (1..=steps).rev().map(|i| (i * ratio) as f64 + offset as f64).collect()
            }
            Spacing::Trailing => np_arange(last_timestep as f64, 0.0, -(n as f64 / steps as f64)).into_iter().map(|t| t.round_ties_even() - 1.0).collect(),
        };
        let train = schedule::train_sigmas(&ac);
        let sigmas: Vec<f64> = if use_karras {
            let log_sigmas: Vec<f32> = train.iter().map(|&s| s.ln()).collect();
            // `hasattr(self.config, "sigma_min")`: a key from another class's config counts.
            let lo = cfg.opt_f64("sigma_min")?.unwrap_or(train[0] as f64);
            let hi = cfg.opt_f64("sigma_max")?.unwrap_or(train[n - 1] as f64);
            let s = karras(lo, hi, steps);
            let round = cfg.choice("beta_schedule", "linear", &["linear", "scaled_linear", "squaredcos_cap_v2"])? != "squaredcos_cap_v2";
            timesteps = s.iter().map(|&x| sigma_to_t(x, &log_sigmas)).map(|t| if round { t.round_ties_even() } else { t }).collect();
            s
        } else {
            let train64 = widen(&train);
            timesteps.iter().map(|&t| np_interp(t, &train64)).collect()
        };
        // `.to(torch.int64)` truncates (Karras timesteps of squaredcos_cap_v2 are fractional).
        let timesteps: Vec<f64> = timesteps.iter().map(|t| t.trunc()).collect();
        let last = if final_sigma_zero { 0.0 } else { train[0] };
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).chain(std::iter::once(last)).collect();
        schedule::check_first_timestep(Self::NAME, steps, &timesteps)?;
        Ok(DpmSolverMultistep {
            alphas_cumprod: widen(&ac),
            sigmas_f64: widen(&sigmas),
            sigmas,
            timesteps,
            prediction,
            plus_plus,
            midpoint,
            solver_order: solver_order as usize,
            lower_order_final,
            euler_at_final,
            final_sigma_zero,
            model_outputs: (0..solver_order).map(|_| None).collect(),
            lower_order_nums: 0,
            step_index: None,
        })
    }

    /// diffusers `index_for_timestep` (the last index when the timestep is not in the schedule).
    fn index(&self, i: usize) -> usize {
        self.step_index.unwrap_or_else(|| schedule::index_for_timestep(&self.timesteps, self.timesteps[i]).unwrap_or(self.timesteps.len() - 1))
    }

    /// diffusers `convert_model_output`: the data prediction x0 (DPM-Solver++) or the noise (DPM-Solver).
    fn convert_model_output(&self, model_output: &Tensor, sample: &Tensor, idx: usize) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[idx]);
        match (self.plus_plus, self.prediction) {
            (true, Prediction::Epsilon) => (sample - model_output * sigma_t as f64) / alpha_t as f64,
            (true, Prediction::VPrediction) => sample * alpha_t as f64 - model_output * sigma_t as f64,
            (false, Prediction::Epsilon) => model_output.shallow_clone(),
            (false, Prediction::VPrediction) => model_output * alpha_t as f64 + sample * sigma_t as f64,
        }
    }

    /// diffusers `dpm_solver_first_order_update` (an Euler step in lambda).
    fn first_order(&self, m0: &Tensor, sample: &Tensor, idx: usize) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[idx + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[idx]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        if self.plus_plus {
            sample * (sigma_t / sigma_s) as f64 - m0 * (alpha_t * (exp32(-h) - 1.0)) as f64
        } else {
            sample * (alpha_t / alpha_s) as f64 - m0 * (sigma_t * (exp32(h) - 1.0)) as f64
        }
    }

    /// diffusers `multistep_dpm_solver_second_order_update`.
    fn second_order(&self, m0: &Tensor, m1: &Tensor, sample: &Tensor, idx: usize) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[idx + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[idx]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[idx - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let r0 = h_0 / h;
        let d0 = m0;
        let d1 = (m0 - m1) * (1.0 / r0) as f64;
        match (self.plus_plus, self.midpoint) {
            (true, true) => {
                let c = alpha_t * (exp32(-h) - 1.0);
                sample * (sigma_t / sigma_s0) as f64 - d0 * c as f64 - d1 * (0.5 * c) as f64
            }
            (true, false) => {
                let c = alpha_t * (exp32(-h) - 1.0);
                sample * (sigma_t / sigma_s0) as f64 - d0 * c as f64 + d1 * (alpha_t * ((exp32(-h) - 1.0) / h + 1.0)) as f64
            }
            (false, true) => {
                let c = sigma_t * (exp32(h) - 1.0);
                sample * (alpha_t / alpha_s0) as f64 - d0 * c as f64 - d1 * (0.5 * c) as f64
            }
            (false, false) => {
                let c = sigma_t * (exp32(h) - 1.0);
                sample * (alpha_t / alpha_s0) as f64 - d0 * c as f64 - d1 * (sigma_t * ((exp32(h) - 1.0) / h - 1.0)) as f64
            }
        }
    }

    /// diffusers `multistep_dpm_solver_third_order_update`.
    fn third_order(&self, m: [&Tensor; 3], sample: &Tensor, idx: usize) -> Tensor {
        let [m0, m1, m2] = m;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[idx + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[idx]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[idx - 1]);
        let (alpha_s2, sigma_s2) = alpha_sigma(self.sigmas[idx - 2]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let lambda_s2 = lambda(alpha_s2, sigma_s2);
        let (h, h_0, h_1) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
        let (r0, r1) = (h_0 / h, h_1 / h);
        let d0 = m0;
        let d1_0 = (m0 - m1) * (1.0 / r0) as f64;
        let d1_1 = (m1 - m2) * (1.0 / r1) as f64;
        let d1 = &d1_0 + (&d1_0 - &d1_1) * (r0 / (r0 + r1)) as f64;
        let d2 = (&d1_0 - &d1_1) * (1.0 / (r0 + r1)) as f64;
        if self.plus_plus {
            let e = exp32(-h) - 1.0;
            sample * (sigma_t / sigma_s0) as f64 - d0 * (alpha_t * e) as f64 + d1 * (alpha_t * (e / h + 1.0)) as f64 - d2 * (alpha_t * ((exp32(-h) - 1.0 + h) / (h * h) - 0.5)) as f64
        } else {
            let e = exp32(h) - 1.0;
            sample * (alpha_t / alpha_s0) as f64 - d0 * (sigma_t * e) as f64 - d1 * (sigma_t * (e / h - 1.0)) as f64 - d2 * (sigma_t * ((exp32(h) - 1.0 - h) / (h * h) - 0.5)) as f64
        }
    }
}

impl Scheduler for DpmSolverMultistep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> Tensor {
        sample.shallow_clone()
    }
    /// diffusers `DPMSolverMultistepScheduler.step`.
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor) -> Tensor {
        let idx = self.index(i);
        let len = self.timesteps.len();
        let lower_order_final = idx == len - 1 && (self.euler_at_final || (self.lower_order_final && len < 15) || self.final_sigma_zero);
        let lower_order_second = idx + 2 == len && self.lower_order_final && len < 15;
        let model_output = self.convert_model_output(model_output, sample, idx);
        self.model_outputs.rotate_left(1);
        let order = self.solver_order;
        self.model_outputs[order - 1] = Some(model_output.shallow_clone());
        let sample = sample.to_kind(Kind::Float);
        let out = |k: usize| self.model_outputs[order - 1 - k].as_ref().unwrap_or(&model_output);
        let prev = if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(&model_output, &sample, idx)
        } else if order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(out(0), out(1), &sample, idx)
        } else {
            self.third_order([out(0), out(1), out(2)], &sample, idx)
        };
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
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

    /// Every DpmSolverMultistep case of tests/fixtures/refs/schedulers.json (tools/make_scheduler_refs.py).
    #[test]
    fn matches_diffusers() {
        testing::check_class(DpmSolverMultistep::NAME);
    }
}
