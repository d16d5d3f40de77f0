//! The schedule math of [`runner_core::scheduling::schedule`], with libtorch's float32 kernels:
//! [`TorchMath`] computes betas, `alphas_cumprod` and the training sigmas as diffusers does (so
//! rounding is libtorch's: `torch.cumprod` accumulates in double, for instance).
//!
//! Step arithmetic: diffusers' schedule scalars are 0-d float32 CPU tensors, so runner keeps
//! them as `f32` and does `+ - * /` in `f32` (IEEE, as libtorch does); `sqrt`, `log` and `exp`
//! go through libtorch ([`sqrt32`], [`log32`], [`exp32`]) because its vectorised versions
//! differ from IEEE / libm in the last bit. Tensor-by-scalar products take the scalar as `f64` holding the `f32` value,
//! which libtorch's kernels use at the tensor's precision, as they do a 0-d tensor.

use tch::{Device, Kind, Tensor};

pub use runner_core::scheduling::schedule::*;
use runner_core::scheduling::F32Math;

/// [`F32Math`] on libtorch's CPU kernels, op for op as diffusers runs them.
#[derive(Debug, Clone, Copy, Default)]
pub struct TorchMath;

impl F32Math for TorchMath {
    fn linspace(&self, start: f64, end: f64, n: usize) -> Vec<f32> {
        to_vec(&Tensor::linspace(start, end, n as i64, (Kind::Float, Device::Cpu)))
    }
    fn cumprod(&self, x: &[f32]) -> Vec<f32> {
        to_vec(&Tensor::from_slice(x).cumprod(0, Kind::Float))
    }
    fn sqrt(&self, x: &[f32]) -> Vec<f32> {
        to_vec(&Tensor::from_slice(x).sqrt())
    }
    fn log(&self, x: &[f32]) -> Vec<f32> {
        to_vec(&Tensor::from_slice(x).log())
    }
    fn exp(&self, x: &[f32]) -> Vec<f32> {
        to_vec(&Tensor::from_slice(x).exp())
    }
}

pub fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_kind(Kind::Float).contiguous().view(-1)).unwrap_or_default()
}

/// `torch.sqrt` (and `** 0.5`) of a float32 scalar, with libtorch's rounding: its vectorised
/// float sqrt is not IEEE-exact (about 1 value in 200 differs from `f32::sqrt` in the last bit).
pub fn sqrt32(x: f32) -> f32 {
    TorchMath.sqrt32(x)
}

/// `torch.log` of a float32 scalar, with libtorch's rounding.
pub fn log32(x: f32) -> f32 {
    TorchMath.log32(x)
}

/// `torch.exp` of a float32 scalar, with libtorch's rounding.
pub fn exp32(x: f32) -> f32 {
    TorchMath.exp32(x)
}

/// Test support: replays of diffusers runs recorded by tools/make_scheduler_refs.py
/// (tests/fixtures/refs/schedulers.json).
#[cfg(test)]
pub(crate) mod testing {
    use serde_json::Value;
    use tch::{Device, Kind, Tensor};

    use crate::manifest::SchedulerKind;

    pub use crate::parity::rel;
    use crate::parity::{check, check_detail, max_abs, rel_to, SCHEDULE, SCHEDULER_STEP};

    /// The recorded float32 values (serde_json's float parsing can miss the last bit of the
    /// decimal double; rounding to f32 restores the recorded value).
    pub fn nums(v: &Value) -> Vec<f64> {
        v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32 as f64).collect()
    }

    fn tensor(v: &Value) -> Tensor {
        Tensor::from_slice(&nums(v).iter().map(|&x| x as f32).collect::<Vec<_>>()).view([1, 4, 2, 2])
    }

    fn values(t: &Tensor) -> Vec<f64> {
        super::to_vec(t).into_iter().map(f64::from).collect()
    }

    pub fn all_cases() -> Vec<Value> {
        let path = crate::parity::refs_dir().join("schedulers.json");
        let all: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("schedulers.json")).expect("json");
        all["cases"].as_array().expect("cases").clone()
    }

    pub fn cases(class: &str) -> Vec<Value> {
        all_cases().into_iter().filter(|c| c["class_name"] == class).collect()
    }

    /// The case's scheduler, as diffusers built it (`kind`, and `mu` where the case passed one).
    pub fn build_case(case: &Value) -> Box<dyn super::super::Scheduler> {
        try_build(case).unwrap_or_else(|e| panic!("{}: {e}", case["name"]))
    }

    fn try_build(case: &Value) -> Result<Box<dyn super::super::Scheduler>, super::super::SchedulerError> {
        let kind: Option<SchedulerKind> = case["kind"].as_str().map(|k| serde_json::from_value(Value::String(k.into())).expect("kind"));
        let steps = case["steps"].as_u64().expect("steps") as usize;
        super::super::build_with_mu(&case["config"], kind, steps, case["mu"].as_f64())
    }

    /// Builds the case's scheduler and checks its schedule and a replay of diffusers' loop;
    /// returns (schedule, step) max relative differences.
    pub fn check_case(case: &Value) -> (f64, f64) {
        let name = case["name"].as_str().unwrap_or("?");
        let s = build_case(case);
        assert_eq!(s.name(), case["class_name"].as_str().unwrap_or(""), "{name}");
        let mut sched = rel(s.timesteps(), &nums(&case["timesteps"]));
        check_detail(&format!("{name}: timesteps"), sched, SCHEDULE, &format!("{:?} vs {}", s.timesteps(), case["timesteps"]));
        match (s.sigmas(), case["sigmas"].is_null()) {
            (Some(sig), false) => {
                let d = rel(sig, &nums(&case["sigmas"]));
                check_detail(&format!("{name}: sigmas"), d, SCHEDULE, &format!("{sig:?} vs {}", case["sigmas"]));
                sched = sched.max(d);
            }
            (None, true) => {}
            (got, _) => panic!("{name}: sigmas {got:?} vs {}", case["sigmas"]),
        }
        let ins = rel(&[s.init_noise_sigma()], &[case["init_noise_sigma"].as_f64().expect("init_noise_sigma") as f32 as f64]);
        check(&format!("{name}: init_noise_sigma"), ins, SCHEDULE);
        let idx: Vec<usize> = nums(&case["ac_index"]).iter().map(|&i| i as usize).collect();
        let ac: Vec<f64> = idx.iter().map(|&i| s.alphas_cumprod()[i]).collect();
        let d = rel(&ac, &nums(&case["alphas_cumprod"]));
        check(&format!("{name}: alphas_cumprod"), d, SCHEDULE);
        sched = sched.max(d).max(ins);

        // The loop, as tools/make_scheduler_refs.py runs it: the initial draw and any scheduler
        // noise come from the global CPU generator, seeded like the pipeline seeds it. Other
        // tests may draw from it concurrently (the lock covers this module's only), so a miss is
        // retried before it counts.
        let mut last = String::new();
        for _ in 0..3 {
            let _guard = super::super::tests_support::GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
            match replay(case) {
                Ok((step, at)) => {
                    check_detail(&format!("{name}: replayed steps"), step, SCHEDULER_STEP, &at);
                    return (sched, step);
                }
                Err(e) => last = e,
            }
        }
        panic!("{last}");
    }

    /// Replays diffusers' loop: the largest difference of the model inputs and the latents after
    /// each step, and where it was; an error only when the initial draw differs (a concurrent draw).
    fn replay(case: &Value) -> Result<(f64, String), String> {
        let name = case["name"].as_str().unwrap_or("?");
        let mut s = try_build(case).map_err(|e| e.to_string())?;
        tch::manual_seed(case["seed"].as_i64().expect("seed"));
        // The draw advances the generator the ancestral steps draw from next; its values are the
        // recorded ones up to the kernel path (ATen's vectorised and scalar `randn` differ in the
        // last bits): far off means another test drew concurrently, and the case is retried.
        let drawn = Tensor::randn([1, 4, 2, 2], (Kind::Float, Device::Cpu));
        let init = nums(&case["latents_init"]);
        let d = rel(&values(&drawn), &init);
        if d > 1e-3 {
            return Err(format!("{name}: initial draw differs by {d:e}"));
        }
        check(&format!("{name}: initial draw"), d, crate::parity::NOISE);
        let mut latents = Tensor::from_slice(&init.iter().map(|&x| x as f32).collect::<Vec<_>>()).view([1, 4, 2, 2]) * s.init_noise_sigma();
        let (mut worst, mut at) = (0f64, String::new());
        let replay = case["steps_replay"].as_array().expect("steps_replay");
        assert_eq!(replay.len(), s.timesteps().len(), "{name}: loop length");
        // Each step from the recorded latents before it, so a step is measured on its own: chained,
        // the float32 rounding of a 1e4-sized first step (zero terminal SNR) would be carried
        // into steps whose latents are ~1.
        for (i, r) in replay.iter().enumerate() {
            let x = s.scale_model_input(&latents, i);
            let d = rel(&values(&x), &nums(&r["input"]));
            let before = max_abs(&values(&latents));
            let got = s.step(&tensor(&r["model_output"]), i, &latents);
            // Relative to the step's operands (SCHEDULER_STEP says why).
            let want = nums(&r["latents"]);
            let d2 = rel_to(&values(&got), &want, before.max(max_abs(&want)));
            if d.max(d2) > worst {
                (worst, at) = (d.max(d2), format!("step {i}: model input differs by {d:e}, latents by {d2:e}: {:?} vs {}", values(&got), r["latents"]));
            }
            latents = tensor(&r["latents"]);
        }
        Ok((worst, at))
    }

    /// Checks every recorded case of `class`; prints the largest differences.
    pub fn check_class(class: &str) {
        let cases = cases(class);
        assert!(!cases.is_empty(), "no cases for {class}");
        let (mut a, mut b) = (0f64, 0f64);
        for c in &cases {
            let (x, y) = check_case(c);
            if x > 0.0 || y > 0.0 {
                eprintln!("  {}: schedule {x:e}, steps {y:e}", c["name"]);
            }
            a = a.max(x);
            b = b.max(y);
        }
        eprintln!("{class}: {} cases, max relative difference: schedule {a:e}, steps {b:e}", cases.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runner_core::scheduling::StdMath;

    /// StdMath (planning) and TorchMath (the executor) compute the same schedules: equal
    /// lengths, and values within a few float32 ulps (libtorch's vectorised sqrt / log differ
    /// from libm's in the last bit; zero-terminal-SNR rescaling, which divides neighbours,
    /// carries that to a few dozen).
    #[test]
    fn std_math_matches_libtorch() {
        let x: Vec<f32> = (1..2000).map(|i| i as f32 / 1999.0).collect();
        let within = |ulps: f32, a: &[f32], b: &[f32], what: &str| {
            assert_eq!(a.len(), b.len(), "{what}");
            for (i, (p, q)) in a.iter().zip(b).enumerate() {
                assert!((p - q).abs() <= ulps * f32::EPSILON * p.abs().max(q.abs()).max(1e-30), "{what}[{i}]: {p} vs {q}");
            }
        };
        let close = |a: &[f32], b: &[f32], what: &str| within(4.0, a, b, what);
        close(&StdMath.sqrt(&x), &TorchMath.sqrt(&x), "sqrt");
        close(&StdMath.log(&x), &TorchMath.log(&x), "log");
        close(&StdMath.exp(&x), &TorchMath.exp(&x), "exp");
        for n in [1, 2, 3, 10, 1000, 1001] {
            close(&StdMath.linspace(0.00085f64.sqrt(), 0.012f64.sqrt(), n), &TorchMath.linspace(0.00085f64.sqrt(), 0.012f64.sqrt(), n), "linspace");
        }
        let alphas: Vec<f32> = TorchMath.linspace(0.9999, 0.98, 1000);
        close(&StdMath.cumprod(&alphas), &TorchMath.cumprod(&alphas), "cumprod");
        let b = betas(1000, 0.00085, 0.012, BetaSchedule::ScaledLinear, None, &TorchMath);
        close(&alphas_cumprod(&b, false, false, &StdMath), &alphas_cumprod(&b, false, false, &TorchMath), "alphas_cumprod");
        within(64.0, &alphas_cumprod(&b, true, false, &StdMath), &alphas_cumprod(&b, true, false, &TorchMath), "alphas_cumprod, rescaled");
    }

    #[test]
    fn scaled_linear_alphas_cumprod_endpoints() {
        let ac = alphas_cumprod(&betas(1000, 0.00085, 0.012, BetaSchedule::ScaledLinear, None, &TorchMath), false, false, &TorchMath);
        assert_eq!(ac.len(), 1000);
        assert!((ac[0] - 0.99915).abs() < 1e-6);
        assert!((ac[999] - 0.0046).abs() < 1e-4, "{}", ac[999]);
    }
}
