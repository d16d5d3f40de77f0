//! diffusers `DPMSolverMultistepScheduler` (scheduling_dpmsolver_multistep.py): DPM-Solver++ (and
//! the deprecated DPM-Solver) multistep, orders 1 to 3, midpoint or Heun second-order updates,
//! optional Karras sigmas. The SDE variants (which draw noise) are not implemented.

use tch::{Kind, Tensor};

use runner_core::scheduling as core;

use super::schedule::{self, exp32, log32, sqrt32, Prediction};
use super::Scheduler;

pub struct DpmSolverMultistep {
    s: core::DpmSolverMultistep,
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
    pub const NAME: &'static str = core::DpmSolverMultistep::NAME;

    pub(crate) fn new(s: core::DpmSolverMultistep) -> Self {
        DpmSolverMultistep { model_outputs: (0..s.solver_order).map(|_| None).collect(), lower_order_nums: 0, step_index: None, s }
    }

    /// diffusers `index_for_timestep` (the last index when the timestep is not in the schedule).
    fn index(&self, i: usize) -> usize {
        self.step_index.unwrap_or_else(|| schedule::index_for_timestep(&self.s.timesteps, self.s.timesteps[i]).unwrap_or(self.s.timesteps.len() - 1))
    }

    /// diffusers `convert_model_output`: the data prediction x0 (DPM-Solver++) or the noise (DPM-Solver).
    fn convert_model_output(&self, model_output: &Tensor, sample: &Tensor, idx: usize) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma(self.s.sigmas[idx]);
        match (self.s.plus_plus, self.s.prediction) {
            (true, Prediction::Epsilon) => (sample - model_output * sigma_t as f64) / alpha_t as f64,
            (true, Prediction::VPrediction) => sample * alpha_t as f64 - model_output * sigma_t as f64,
            (false, Prediction::Epsilon) => model_output.shallow_clone(),
            (false, Prediction::VPrediction) => model_output * alpha_t as f64 + sample * sigma_t as f64,
        }
    }

    /// diffusers `dpm_solver_first_order_update` (an Euler step in lambda).
    fn first_order(&self, m0: &Tensor, sample: &Tensor, idx: usize) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma(self.s.sigmas[idx + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.s.sigmas[idx]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        if self.s.plus_plus {
            sample * (sigma_t / sigma_s) as f64 - m0 * (alpha_t * (exp32(-h) - 1.0)) as f64
        } else {
            sample * (alpha_t / alpha_s) as f64 - m0 * (sigma_t * (exp32(h) - 1.0)) as f64
        }
    }

    /// diffusers `multistep_dpm_solver_second_order_update`.
    fn second_order(&self, m0: &Tensor, m1: &Tensor, sample: &Tensor, idx: usize) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma(self.s.sigmas[idx + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.s.sigmas[idx]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.s.sigmas[idx - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let r0 = h_0 / h;
        let d0 = m0;
        let d1 = (m0 - m1) * (1.0 / r0) as f64;
        match (self.s.plus_plus, self.s.midpoint) {
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
        let (alpha_t, sigma_t) = alpha_sigma(self.s.sigmas[idx + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.s.sigmas[idx]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.s.sigmas[idx - 1]);
        let (alpha_s2, sigma_s2) = alpha_sigma(self.s.sigmas[idx - 2]);
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
        if self.s.plus_plus {
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
        &self.s.timesteps
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
        let len = self.s.timesteps.len();
        let lower_order_final = idx == len - 1 && (self.s.euler_at_final || (self.s.lower_order_final && len < 15) || self.s.final_sigma_zero);
        let lower_order_second = idx + 2 == len && self.s.lower_order_final && len < 15;
        let model_output = self.convert_model_output(model_output, sample, idx);
        self.model_outputs.rotate_left(1);
        let order = self.s.solver_order;
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
        Some(&self.s.sigmas_f64)
    }
    fn name(&self) -> &'static str {
        Self::NAME
    }
    fn alphas_cumprod(&self) -> &[f64] {
        &self.s.alphas_cumprod
    }
    fn set_begin_index(&mut self, k: usize) {
        self.step_index = Some(k);
    }
    /// `alpha_t * original + sigma_t * noise` at `sigmas[k]` (`_sigma_to_alpha_sigma_t`).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, k: usize) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma(self.s.sigmas[k]);
        original * alpha_t as f64 + noise * sigma_t as f64
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
