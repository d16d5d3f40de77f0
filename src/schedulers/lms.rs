//! diffusers `LMSDiscreteScheduler` (scheduling_lms_discrete.py): linear multistep on the Euler
//! derivatives, order 4. diffusers integrates each Lagrange coefficient with
//! `scipy.integrate.quad`; for these cubic integrands that is one 21-point Gauss-Kronrod rule
//! ([`qk21`]) over an integrand evaluated in float32 (diffusers' sigmas are float32 tensors).

use tch::Tensor;

use runner_core::scheduling as core;

use super::euler::{pred_original, scale_by_sigma};
use super::schedule;
use super::Scheduler;

pub struct LmsDiscrete {
    s: core::LmsDiscrete,
    derivatives: Vec<Tensor>,
    step_index: Option<usize>,
}

/// The order `step` uses (diffusers' default `order=4`).
const ORDER: usize = 4;

impl LmsDiscrete {
    pub const NAME: &'static str = core::LmsDiscrete::NAME;

    pub(crate) fn new(s: core::LmsDiscrete) -> Self {
        LmsDiscrete { derivatives: vec![], step_index: None, s }
    }

    fn index(&self, i: usize) -> usize {
        self.step_index.or_else(|| schedule::index_for_timestep(&self.s.timesteps, self.s.timesteps[i])).unwrap_or(i)
    }

    /// diffusers `get_lms_coefficient(order, t, current_order)`: the integral from `sigmas[t]` to
    /// `sigmas[t + 1]` of the Lagrange basis polynomial of `current_order`.
    fn lms_coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let s = &self.s.sigmas;
        let f = |tau: f64| -> f64 {
            // float32 arithmetic: `tau - sigma` with a 0-d float32 tensor rounds tau to float32.
            let mut prod = 1.0f32;
            for k in (0..order).filter(|&k| k != current) {
                prod *= (tau as f32 - s[t - k]) / (s[t - current] - s[t - k]);
            }
            prod as f64
        };
        qk21(f, s[t] as f64, s[t + 1] as f64)
    }
}

/// QUADPACK's 21-point Gauss-Kronrod rule (`dqk21`), in its summation order: the result
/// `scipy.integrate.quad` returns when its first error estimate passes, as it does for polynomials.
// QUADPACK's constants, digit for digit.
#[allow(clippy::excessive_precision)]
fn qk21(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    const XGK: [f64; 11] = [
        0.995657163025808080735527280689003,
        0.973906528517171720077964012084452,
        0.930157491355708226001207180059508,
        0.865063366688984510732096688423493,
        0.780817726586416897063717578345042,
        0.679409568299024406234327365114874,
        0.562757134668604683339000099272694,
        0.433395394129247190799265943165784,
        0.294392862701460198131126603103866,
        0.148874338981631210884826001129720,
        0.0,
    ];
    const WGK: [f64; 11] = [
        0.011694638867371874278064396062192,
        0.032558162307964727478818972459390,
        0.054755896574351996031381300244580,
        0.075039674810919952767043140916190,
        0.093125454583697605535065465083366,
        0.109387158802297641899210590325805,
        0.123491976262065851077208064184660,
        0.134709217311473325928054001771707,
        0.142775938577060080797094273138717,
        0.147739104901338491374841515972068,
        0.149445554002916905664936468389821,
    ];
    let centr = 0.5 * (a + b);
    let hlgth = 0.5 * (b - a);
    let mut resk = WGK[10] * f(centr);
    // Gauss nodes (odd 0-based indices) first, then the Kronrod ones, as dqk21 loops.
    for j in (1..10).step_by(2).chain((0..10).step_by(2)) {
        let absc = hlgth * XGK[j];
        resk += WGK[j] * (f(centr - absc) + f(centr + absc));
    }
    resk * hlgth
}

impl Scheduler for LmsDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.s.timesteps
    }
    fn init_noise_sigma(&self) -> f64 {
        self.s.init_noise_sigma as f64
    }
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Tensor {
        scale_by_sigma(sample, self.s.sigmas[self.index(i)])
    }
    /// diffusers `LMSDiscreteScheduler.step` with `order = 4`.
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor) -> Tensor {
        let idx = self.index(i);
        let sigma = self.s.sigmas[idx];
        let pred = pred_original(self.s.prediction, model_output, sample, sigma);
        self.derivatives.push((sample - pred) / sigma as f64);
        if self.derivatives.len() > ORDER {
            self.derivatives.drain(..1);
        }
        let order = (idx + 1).min(ORDER);
        let mut acc: Option<Tensor> = None;
        for (current, d) in (0..order).zip(self.derivatives.iter().rev()) {
            let term = d * self.lms_coefficient(order, idx, current);
            acc = Some(match acc {
                None => term,
                Some(a) => a + term,
            });
        }
        self.step_index = Some(idx + 1);
        match acc {
            Some(a) => sample + a,
            None => sample.shallow_clone(),
        }
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
    fn add_noise(&self, original: &Tensor, noise: &Tensor, k: usize) -> Tensor {
        super::add_noise_sigma(self.s.sigmas[k], original, noise)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::schedule::testing;

    /// Every LmsDiscrete case of tests/fixtures/refs/schedulers.json (tools/make_scheduler_refs.py).
    #[test]
    fn matches_diffusers() {
        testing::check_class(LmsDiscrete::NAME);
    }
}
