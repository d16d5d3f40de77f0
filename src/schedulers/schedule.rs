//! Schedule math shared by the schedulers, in the precision diffusers 0.42.1 computes it:
//! betas and `alphas_cumprod` with libtorch float32 ops (through tch, so rounding is libtorch's:
//! `torch.cumprod` accumulates in double, for instance), timestep spacings and interpolation as
//! numpy float64 (`np.linspace`, `np.arange`, `np.interp`, round-half-even `np.round`).
//!
//! Step arithmetic: diffusers' schedule scalars are 0-d float32 CPU tensors, so runner keeps
//! them as `f32` and does `+ - * /` in `f32` (IEEE, as libtorch does); `sqrt`, `log` and `exp`
//! go through libtorch ([`sqrt32`], [`log32`], [`exp32`]) because its vectorised versions
//! differ from IEEE / libm in the last bit. Tensor-by-scalar products take the scalar as `f64` holding the `f32` value,
//! which libtorch's kernels use at the tensor's precision, as they do a 0-d tensor.

use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredcosCapV2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

/// diffusers `timestep_spacing` (Table 2 of "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

/// The betas as diffusers' scheduler `__init__` builds them (float32 tensor on the CPU).
pub fn betas(n: usize, beta_start: f64, beta_end: f64, schedule: BetaSchedule, trained: Option<&[f64]>) -> Tensor {
    let opts = (Kind::Float, Device::Cpu);
    if let Some(t) = trained {
        // torch.tensor(trained_betas, dtype=torch.float32)
        return Tensor::from_slice(&t.iter().map(|&b| b as f32).collect::<Vec<_>>());
    }
    match schedule {
        BetaSchedule::Linear => Tensor::linspace(beta_start, beta_end, n as i64, opts),
        // torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
        BetaSchedule::ScaledLinear => Tensor::linspace(beta_start.powf(0.5), beta_end.powf(0.5), n as i64, opts).pow_tensor_scalar(2),
        BetaSchedule::SquaredcosCapV2 => Tensor::from_slice(&betas_for_alpha_bar(n).iter().map(|&b| b as f32).collect::<Vec<_>>()),
    }
}

/// diffusers `betas_for_alpha_bar(n)` (the "cosine" transform, `max_beta = 0.999`), in Python floats.
pub fn betas_for_alpha_bar(n: usize) -> Vec<f64> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
        })
        .collect()
}

/// `alphas_cumprod = cumprod(1 - betas)`, with diffusers' `rescale_zero_terminal_snr` first when
/// `rescale`, and `alphas_cumprod[-1] = 2**-24` after it when `fix_last` (Euler, DPM-Solver).
pub fn alphas_cumprod(betas: &Tensor, rescale: bool, fix_last: bool) -> Vec<f32> {
    let betas = if rescale { rescale_zero_terminal_snr(betas) } else { betas.shallow_clone() };
    let alphas = betas.neg() + 1.0;
    let mut ac = to_vec(&alphas.cumprod(0, Kind::Float));
    if fix_last {
        if let Some(last) = ac.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    ac
}

/// diffusers `rescale_zero_terminal_snr(betas)` (arXiv 2305.08891, Algorithm 1), op for op.
pub fn rescale_zero_terminal_snr(betas: &Tensor) -> Tensor {
    let alphas = betas.neg() + 1.0;
    let sqrt = alphas.cumprod(0, Kind::Float).sqrt();
    let n = sqrt.size()[0];
    let s0 = sqrt.get(0);
    let st = sqrt.get(n - 1);
    let sqrt = (&sqrt - &st) * (&s0 / (&s0 - &st));
    let bar = sqrt.pow_tensor_scalar(2);
    let alphas = bar.narrow(0, 1, n - 1) / bar.narrow(0, 0, n - 1);
    let alphas = Tensor::cat(&[bar.narrow(0, 0, 1), alphas], 0);
    alphas.neg() + 1.0
}

/// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32 (libtorch's sqrt), ascending in t.
pub fn train_sigmas(ac: &[f32]) -> Vec<f32> {
    let ac = Tensor::from_slice(ac);
    to_vec(&((ac.neg() + 1.0) / &ac).sqrt())
}

pub fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_kind(Kind::Float).contiguous().view(-1)).unwrap_or_default()
}

pub fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// `torch.sqrt` (and `** 0.5`) of a float32 scalar, with libtorch's rounding: its vectorised
/// float sqrt is not IEEE-exact (about 1 value in 200 differs from `f32::sqrt` in the last bit).
pub fn sqrt32(x: f32) -> f32 {
    Tensor::from_slice(&[x]).sqrt().double_value(&[0]) as f32
}

/// `torch.log` of a float32 scalar, with libtorch's rounding.
pub fn log32(x: f32) -> f32 {
    Tensor::from_slice(&[x]).log().double_value(&[0]) as f32
}

/// `torch.exp` of a float32 scalar, with libtorch's rounding.
pub fn exp32(x: f32) -> f32 {
    Tensor::from_slice(&[x]).exp().double_value(&[0]) as f32
}

/// `np.linspace(start, stop, num)` in float64, numpy 2's arithmetic.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    let div = num.saturating_sub(1) as f64;
    let delta = stop - start;
    let mut y: Vec<f64> = (0..num)
        .map(|i| {
            let i = i as f64;
            if div > 0.0 {
                let step = delta / div;
                if step == 0.0 {
                    i / div * delta
                } else {
                    i * step
                }
            } else {
                i * delta
            }
        })
        .map(|v| v + start)
        .collect();
    if num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` with a float step: `ceil((stop - start) / step)` values
/// `start + i * ((start + step) - start)`, as numpy fills them.
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return vec![];
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, np.arange(len(fp)), fp)`: numpy's `arr_interp` for integer knots.
pub fn np_interp(x: f64, fp: &[f64]) -> f64 {
    let n = fp.len();
    if x.is_nan() {
        return x;
    }
    if x < 0.0 {
        return fp[0];
    }
    if x >= (n - 1) as f64 {
        return fp[n - 1];
    }
    let j = x.floor() as usize;
    let xj = j as f64;
    if xj == x {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / ((j + 1) as f64 - xj);
    let r = slope * (x - xj) + fp[j];
    if r.is_nan() {
        let r2 = slope * (x - (j + 1) as f64) + fp[j + 1];
        if r2.is_nan() && fp[j] == fp[j + 1] {
            return fp[j];
        }
        return r2;
    }
    r
}

/// diffusers `_convert_to_karras`: Karras et al. (2022) sigmas, rho = 7, in float64.
pub fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n).into_iter().map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho)).collect()
}

/// diffusers `_sigma_to_t(sigma, log_sigmas)`: the fractional train timestep of `sigma`,
/// interpolating `log_sigmas` (float32, ascending in t) linearly.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // argmax of the cumsum of (log_sigma - log_sigmas >= 0): the last index where it holds, or 0.
    let low_idx = log_sigmas.iter().rposition(|&l| log_sigma - l as f64 >= 0.0).unwrap_or(0).min(n - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx] as f64;
    let high = log_sigmas[high_idx] as f64;
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// The diffusers `index_for_timestep` rule: the second match when the timestep occurs more than
/// once (so a schedule that starts on a repeated timestep skips no sigma), else the first.
pub fn index_for_timestep(timesteps: &[f64], t: f64) -> Option<usize> {
    let mut hits = timesteps.iter().enumerate().filter(|(_, &x)| x == t).map(|(i, _)| i);
    let first = hits.next()?;
    Some(hits.next().unwrap_or(first))
}

/// diffusers starts its step counter at `index_for_timestep(timesteps[0])`; when the first timestep
/// repeats, that is 1 and the loop runs past the last sigma (IndexError upstream): refuse such a
/// schedule up front.
pub(crate) fn check_first_timestep(class: &'static str, steps: usize, timesteps: &[f64]) -> Result<(), super::SchedulerError> {
    match timesteps.first() {
        Some(&t0) if index_for_timestep(timesteps, t0) != Some(0) => Err(super::SchedulerError::Steps {
            class,
            steps,
            reason: format!("the schedule starts with a repeated timestep ({t0}), which diffusers cannot step through; change sigma_max, the spacing or the step count"),
        }),
        _ => Ok(()),
    }
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

    pub fn cases(class: &str) -> Vec<Value> {
        let path = crate::parity::refs_dir().join("schedulers.json");
        let all: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("schedulers.json")).expect("json");
        all["cases"].as_array().expect("cases").iter().filter(|c| c["class_name"] == class).cloned().collect()
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

    #[test]
    fn numpy_helpers() {
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(np_linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(np_arange(1000.0, 0.0, -250.0), vec![1000.0, 750.0, 500.0, 250.0]);
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 3.0).len(), 3);
        assert_eq!(np_interp(1.5, &[1.0, 2.0, 4.0]), 3.0);
        assert_eq!(np_interp(7.0, &[1.0, 2.0, 4.0]), 4.0);
        assert_eq!(index_for_timestep(&[5.0, 3.0, 3.0, 1.0], 3.0), Some(2));
        assert_eq!(index_for_timestep(&[5.0, 3.0, 1.0], 5.0), Some(0));
        assert_eq!(index_for_timestep(&[5.0], 2.0), None);
        // np.round rounds half to even
        assert_eq!(f64::round_ties_even(2.5), 2.0);
    }

    #[test]
    fn scaled_linear_alphas_cumprod_endpoints() {
        let ac = alphas_cumprod(&betas(1000, 0.00085, 0.012, BetaSchedule::ScaledLinear, None), false, false);
        assert_eq!(ac.len(), 1000);
        assert!((ac[0] - 0.99915).abs() < 1e-6);
        assert!((ac[999] - 0.0046).abs() < 1e-4, "{}", ac[999]);
    }
}
