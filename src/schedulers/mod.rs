//! Schedulers (diffusers `PNDMScheduler`, `EulerDiscreteScheduler`, ...,
//! `FlowMatchEulerDiscreteScheduler`), mirroring diffusers
//! 0.42.1 step by step so that runner's latents match diffusers' to float rounding.
//!
//! The schedule (betas, `alphas_cumprod`, timesteps, sigmas) and the config rules are
//! [`runner_core::scheduling`]'s, computed here with libtorch's float32 kernels ([`TorchMath`])
//! as diffusers computes them; this module adds the steps. Step arithmetic keeps diffusers'
//! operand order, with diffusers' 0-d float32 tensors as `f32` scalars (see [`schedule`]).

mod ddim;
mod dpm_solver_multistep;
mod euler;
mod euler_ancestral;
mod flow_match_euler;
mod lms;
mod pndm;
pub mod schedule;

use serde_json::Value;

use crate::manifest::SchedulerKind;
use runner_core::scheduling::{self as core, Schedule};

pub use ddim::Ddim;
pub use dpm_solver_multistep::DpmSolverMultistep;
pub use euler::EulerDiscrete;
pub use euler_ancestral::EulerAncestralDiscrete;
pub use flow_match_euler::FlowMatchEulerDiscrete;
pub use lms::LmsDiscrete;
pub use pndm::Pndm;
pub use runner_core::scheduling::{calculate_shift, class_of, dynamic_shift_mu, is_flow_matching, parse_config, SchedulerError, TimeShift, SUPPORTED};
pub use schedule::TorchMath;

/// One diffusion scheduler, set for a number of inference steps. The pipeline loop is
/// `for i in 0..timesteps().len() { x = scale_model_input(latents, i); ...; latents = step(eps, i, latents) }`.
pub trait Scheduler {
    /// The timesteps the pipeline loop iterates over (diffusers `scheduler.timesteps`, one UNet call each).
    fn timesteps(&self) -> &[f64];
    /// diffusers `init_noise_sigma`: initial latents = randn * this.
    fn init_noise_sigma(&self) -> f64;
    /// diffusers `scale_model_input(sample, t)` for loop iteration `i`.
    fn scale_model_input(&self, sample: &tch::Tensor, i: usize) -> tch::Tensor;
    /// diffusers `step(model_output, t, sample)` for loop iteration `i` (the guided noise prediction);
    /// returns the new sample. Schedulers that need noise (ancestral) draw it themselves from
    /// libtorch's global CPU generator (`tch::manual_seed`), in diffusers' order and dtype, then
    /// move it to the sample's device.
    fn step(&mut self, model_output: &tch::Tensor, i: usize, sample: &tch::Tensor) -> tch::Tensor;
    /// diffusers `scheduler.sigmas` where the scheduler has them.
    fn sigmas(&self) -> Option<&[f64]>;
    /// diffusers class name, e.g. "EulerDiscreteScheduler".
    fn name(&self) -> &'static str;
    /// diffusers `scheduler.alphas_cumprod` (float32 values); empty for flow matching, which has none.
    fn alphas_cumprod(&self) -> &[f64];
    /// diffusers `set_begin_index(k)` (image-to-image starts the loop at schedule index `k`, and
    /// the loop then passes `k + j` as `i`); schedulers without one (PNDM, DDIM) just index.
    fn set_begin_index(&mut self, k: usize);
    /// diffusers `add_noise(original, noise, timesteps[k])` (flow matching: `scale_noise`) at
    /// schedule index `k`, in the samples' dtype.
    fn add_noise(&self, original: &tch::Tensor, noise: &tch::Tensor, k: usize) -> tch::Tensor;
}

/// `add_noise` of the schedulers indexed by `alphas_cumprod[timestep]` (DDPM family):
/// `alphas_cumprod[t] ** 0.5 * original + (1 - alphas_cumprod[t]) ** 0.5 * noise` in float32.
pub(crate) fn add_noise_alphas(alphas_cumprod: &[f32], timestep: usize, original: &tch::Tensor, noise: &tch::Tensor) -> tch::Tensor {
    let a = alphas_cumprod[timestep];
    original * schedule::sqrt32(a) as f64 + noise * schedule::sqrt32(1.0 - a) as f64
}

/// `add_noise` of the sigma schedulers (Euler, Euler ancestral, LMS): `original + noise * sigma`.
pub(crate) fn add_noise_sigma(sigma: f32, original: &tch::Tensor, noise: &tch::Tensor) -> tch::Tensor {
    original + noise * sigma as f64
}

/// Builds the scheduler from a config (its `_class_name`), or from `kind` when given (keeping the
/// config's shared values, as diffusers `X.from_config(other.config)` does), set for `steps`
/// inference steps (diffusers `set_timesteps(steps)`): [`runner_core::scheduling::build`] with
/// libtorch's arithmetic.
pub fn build(config: &Value, kind: Option<SchedulerKind>, steps: usize) -> Result<Box<dyn Scheduler>, SchedulerError> {
    build_with_mu(config, kind, steps, None)
}

/// [`build`], with diffusers `set_timesteps(steps, mu=mu)` (see
/// [`runner_core::scheduling::build_with_mu`]).
pub fn build_with_mu(config: &Value, kind: Option<SchedulerKind>, steps: usize, mu: Option<f64>) -> Result<Box<dyn Scheduler>, SchedulerError> {
    core::build_with_mu(config, kind, steps, mu, &TorchMath).map(stepper)
}

/// [`build_with_mu`] with the pipeline's own sigmas, diffusers `set_timesteps(sigmas=sigmas,
/// mu=mu)` (FluxPipeline passes `linspace(1, 1/N, N)`).
pub fn build_with_sigmas(config: &Value, kind: Option<SchedulerKind>, sigmas: &[f64], mu: Option<f64>) -> Result<Box<dyn Scheduler>, SchedulerError> {
    core::build_with_sigmas(config, kind, sigmas, mu, &TorchMath).map(stepper)
}

/// The scheduler that steps through a schedule.
fn stepper(s: Schedule) -> Box<dyn Scheduler> {
    match s {
        Schedule::Pndm(s) => Box::new(Pndm::new(s)),
        Schedule::Ddim(s) => Box::new(Ddim::new(s)),
        Schedule::EulerDiscrete(s) => Box::new(EulerDiscrete::new(s)),
        Schedule::EulerAncestralDiscrete(s) => Box::new(EulerAncestralDiscrete::new(s)),
        Schedule::DpmSolverMultistep(s) => Box::new(DpmSolverMultistep::new(s)),
        Schedule::LmsDiscrete(s) => Box::new(LmsDiscrete::new(s)),
        Schedule::FlowMatchEulerDiscrete(s) => Box::new(FlowMatchEulerDiscrete::new(s)),
    }
}

/// Serialises the tests that seed and draw from libtorch's global CPU generator.
#[cfg(test)]
pub(crate) mod tests_support {
    pub static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Validation (StdMath) and the executor (TorchMath) agree on every recorded configuration:
    /// same class, same number of timesteps, values within float32 rounding.
    #[test]
    fn planning_schedules_match_the_executors() {
        for case in schedule::testing::all_cases() {
            let name = case["name"].as_str().unwrap_or("?");
            let kind: Option<SchedulerKind> = case["kind"].as_str().map(|k| serde_json::from_value(Value::String(k.into())).expect("kind"));
            let steps = case["steps"].as_u64().expect("steps") as usize;
            let planned = core::build_with_mu(&case["config"], kind, steps, case["mu"].as_f64(), &core::StdMath).unwrap_or_else(|e| panic!("{name}: {e}"));
            let run = build_with_mu(&case["config"], kind, steps, case["mu"].as_f64()).unwrap();
            assert_eq!(planned.name(), run.name(), "{name}");
            let d = schedule::testing::rel(planned.timesteps(), run.timesteps());
            assert!(d <= 1e-5, "{name}: timesteps differ by {d:e}: {:?} vs {:?}", planned.timesteps(), run.timesteps());
        }
    }
}
