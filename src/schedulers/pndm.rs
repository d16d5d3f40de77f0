//! diffusers `PNDMScheduler` (scheduling_pndm.py) with `skip_prk_steps = true`: the PLMS sampler
//! Stable Diffusion 1.x ships with. N steps make N+1 model calls: the second call redoes the first
//! step with the mean of the first two predictions.

use tch::Tensor;

use super::config::{Cfg, Rescale};
use super::schedule::{np_arange, np_linspace, sqrt32, widen, Prediction, Spacing};
use super::{Scheduler, SchedulerError};

pub struct Pndm {
    alphas_cumprod: Vec<f32>,
    alphas_cumprod_f64: Vec<f64>,
    final_alpha_cumprod: f32,
    prediction: Prediction,
    /// `num_train_timesteps // num_inference_steps`
    step_ratio: i64,
    timesteps: Vec<i64>,
    timesteps_f64: Vec<f64>,
    counter: usize,
    ets: Vec<Tensor>,
    cur_sample: Option<Tensor>,
}

impl Pndm {
    pub const NAME: &'static str = "PNDMScheduler";

    /// `PNDMScheduler(**config)` then `set_timesteps(steps)`.
    pub(crate) fn new(cfg: &Cfg, steps: usize) -> Result<Self, SchedulerError> {
        let ac = cfg.alphas_cumprod(Rescale::NotAKey)?;
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
        Ok(Pndm {
            alphas_cumprod_f64: widen(&ac),
            alphas_cumprod: ac,
            final_alpha_cumprod,
            prediction,
            step_ratio,
            timesteps_f64: timesteps.iter().map(|&t| t as f64).collect(),
            timesteps,
            counter: 0,
            ets: vec![],
            cur_sample: None,
        })
    }

    /// diffusers `PNDMScheduler._get_prev_sample`: formula (9) of the PNDM paper.
    fn prev_sample(&self, sample: &Tensor, timestep: i64, prev_timestep: i64, model_output: &Tensor) -> Tensor {
        let a = self.alphas_cumprod[timestep as usize];
        let ap = if prev_timestep >= 0 { self.alphas_cumprod[prev_timestep as usize] } else { self.final_alpha_cumprod };
        let b = 1.0 - a;
        let bp = 1.0 - ap;
        let model_output = match self.prediction {
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
        &self.timesteps_f64
    }
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> Tensor {
        sample.shallow_clone()
    }
    /// diffusers `PNDMScheduler.step_plms`.
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor) -> Tensor {
        let mut timestep = self.timesteps[i];
        let mut prev_timestep = timestep - self.step_ratio;
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.shallow_clone());
        } else {
            prev_timestep = timestep;
            timestep += self.step_ratio;
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
        &self.alphas_cumprod_f64
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
