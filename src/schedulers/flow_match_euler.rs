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

use runner_core::scheduling as core;

use super::schedule;
use super::Scheduler;

pub struct FlowMatchEulerDiscrete {
    s: core::FlowMatchEulerDiscrete,
    step_index: Option<usize>,
}

impl FlowMatchEulerDiscrete {
    pub const NAME: &'static str = core::FlowMatchEulerDiscrete::NAME;

    pub(crate) fn new(s: core::FlowMatchEulerDiscrete) -> Self {
        FlowMatchEulerDiscrete { step_index: None, s }
    }

    fn index(&self, i: usize) -> usize {
        self.step_index.or_else(|| schedule::index_for_timestep(&self.s.timesteps, self.s.timesteps[i])).unwrap_or(i)
    }
}

impl Scheduler for FlowMatchEulerDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.s.timesteps
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
        let dt = Tensor::scalar_tensor((self.s.sigmas[idx + 1] - self.s.sigmas[idx]) as f64, (Kind::Float, model_output.device()));
        let prev = sample + dt * model_output;
        self.step_index = Some(idx + 1);
        prev.to_kind(model_output.kind())
    }
    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.s.sigmas_f64)
    }
    fn name(&self) -> &'static str {
        Self::NAME
    }
    /// None: flow matching has no noise schedule of betas.
    fn alphas_cumprod(&self) -> &[f64] {
        &[]
    }
    fn set_begin_index(&mut self, k: usize) {
        self.step_index = Some(k);
    }
    /// diffusers `scale_noise`: `sigma * noise + (1.0 - sigma) * sample` at `sigmas[k]`.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, k: usize) -> Tensor {
        let sigma = self.s.sigmas[k];
        noise * sigma as f64 + original * (1.0 - sigma) as f64
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
            assert_eq!(core::calculate_shift(tokens, 256, 4096, 0.5, 1.15), case["mu"].as_f64().unwrap(), "{}", case["name"]);
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
            let sigmas: Vec<f64> = schedule::np_linspace(1.0, 1.0 / n as f64, n);
            let mu = crate::schedulers::dynamic_shift_mu(&cfg, seq).unwrap();
            let s = crate::schedulers::build_with_sigmas(&cfg, None, &sigmas, mu).unwrap();
            let refs: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(crate::parity::refs_dir().join(format!("{case}.safetensors"))).unwrap().into_iter().collect();
            let want = |k: &str| -> Vec<f64> { Vec::<f32>::try_from(&refs[k]).unwrap().into_iter().map(f64::from).collect() };
            assert_eq!(s.sigmas().unwrap(), want("scheduler.sigmas"), "{case}");
            assert_eq!(s.timesteps(), want("scheduler.timesteps"), "{case}");
        }
    }
}
