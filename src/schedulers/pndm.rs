//! diffusers `PNDMScheduler` (scheduling_pndm.py) with `skip_prk_steps = true`: the PLMS sampler
//! Stable Diffusion 1.x ships with. N steps make N+1 model calls: the second call redoes the first
//! step with the mean of the first two predictions.

use tch::Tensor;

use runner_core::scheduling as core;

use super::schedule::{sqrt32, Prediction};
use super::Scheduler;

pub struct Pndm {
    s: core::Pndm,
    counter: usize,
    ets: Vec<Tensor>,
    cur_sample: Option<Tensor>,
}

impl Pndm {
    pub const NAME: &'static str = core::Pndm::NAME;

    pub(crate) fn new(s: core::Pndm) -> Self {
        Pndm { counter: 0, ets: vec![], cur_sample: None, s }
    }

    /// diffusers `PNDMScheduler._get_prev_sample`: formula (9) of the PNDM paper.
    fn prev_sample(&self, sample: &Tensor, timestep: i64, prev_timestep: i64, model_output: &Tensor) -> Tensor {
        let a = self.s.alphas_cumprod[timestep as usize];
        let ap = if prev_timestep >= 0 { self.s.alphas_cumprod[prev_timestep as usize] } else { self.s.final_alpha_cumprod };
        let b = 1.0 - a;
        let bp = 1.0 - ap;
        let model_output = match self.s.prediction {
            Prediction::VPrediction => model_output * sqrt32(a) as f64 + sample * sqrt32(b) as f64,
            Prediction::Epsilon => model_output.shallow_clone(),
        };
        let sample_coeff = sqrt32(ap / a);
        let denom = a * sqrt32(bp) + sqrt32(a * b * ap);
        sample * sample_coeff as f64 - (model_output * (ap - a) as f64) / denom as f64
    }
}

impl Scheduler for Pndm {
    fn timesteps(&self) -> &[f64] {
        &self.s.timesteps_f64
    }
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> Tensor {
        sample.shallow_clone()
    }
    /// diffusers `PNDMScheduler.step_plms`.
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor) -> Tensor {
        let mut timestep = self.s.timesteps[i];
        let mut prev_timestep = timestep - self.s.step_ratio;
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.shallow_clone());
        } else {
            prev_timestep = timestep;
            timestep += self.s.step_ratio;
        }
        let e = &self.ets;
        let n = e.len();
        let mut sample = sample.shallow_clone();
        let model_output = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.shallow_clone());
            model_output.shallow_clone()
        } else if n == 1 && self.counter == 1 {
            if let Some(s) = self.cur_sample.take() {
                sample = s;
            }
            (model_output + &e[0]) / 2.0
        } else if n == 2 {
            (&e[1] * 3.0 - &e[0]) / 2.0
        } else if n == 3 {
            (&e[2] * 23.0 - &e[1] * 16.0 + &e[0] * 5.0) / 12.0
        } else {
            (&e[n - 1] * 55.0 - &e[n - 2] * 59.0 + &e[n - 3] * 37.0 - &e[n - 4] * 9.0) * (1.0 / 24.0)
        };
        let prev = self.prev_sample(&sample, timestep, prev_timestep, &model_output);
        self.counter += 1;
        prev
    }
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }
    fn name(&self) -> &'static str {
        Self::NAME
    }
    fn alphas_cumprod(&self) -> &[f64] {
        &self.s.alphas_cumprod_f64
    }
    fn set_begin_index(&mut self, _k: usize) {}
    fn add_noise(&self, original: &Tensor, noise: &Tensor, k: usize) -> Tensor {
        super::add_noise_alphas(&self.s.alphas_cumprod, self.s.timesteps[k] as usize, original, noise)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::schedule::testing;

    /// Every Pndm case of tests/fixtures/refs/schedulers.json (tools/make_scheduler_refs.py).
    #[test]
    fn matches_diffusers() {
        testing::check_class(Pndm::NAME);
    }
}
