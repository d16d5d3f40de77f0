//! Schedule math shared by the schedulers, in the precision diffusers 0.42.1 computes it:
//! betas and `alphas_cumprod` as float32 tensor ops (through an [`F32Math`]: libtorch's in the
//! executor, so rounding is libtorch's, `torch.cumprod` accumulating in double for instance),
//! timestep spacings and interpolation as numpy float64 (`np.linspace`, `np.arange`,
//! `np.interp`, round-half-even `np.round`). Elementwise `+ - * /` of float32 tensors are IEEE
//! float32 operations, done here on `f32`.

use super::math::F32Math;
use super::SchedulerError;

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

/// The betas as diffusers' scheduler `__init__` builds them (a float32 tensor).
pub fn betas(n: usize, beta_start: f64, beta_end: f64, schedule: BetaSchedule, trained: Option<&[f64]>, math: &dyn F32Math) -> Vec<f32> {
    if let Some(t) = trained {
        // torch.tensor(trained_betas, dtype=torch.float32)
        return t.iter().map(|&b| b as f32).collect();
    }
    match schedule {
        BetaSchedule::Linear => math.linspace(beta_start, beta_end, n),
        // torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2 (ATen squares by multiplying)
        BetaSchedule::ScaledLinear => math.linspace(beta_start.powf(0.5), beta_end.powf(0.5), n).into_iter().map(|b| b * b).collect(),
        BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar(n).iter().map(|&b| b as f32).collect(),
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
pub fn alphas_cumprod(betas: &[f32], rescale: bool, fix_last: bool, math: &dyn F32Math) -> Vec<f32> {
    let betas = if rescale { rescale_zero_terminal_snr(betas, math) } else { betas.to_vec() };
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut ac = math.cumprod(&alphas);
    if fix_last {
        if let Some(last) = ac.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    ac
}

/// diffusers `rescale_zero_terminal_snr(betas)` (arXiv 2305.08891, Algorithm 1), op for op.
pub fn rescale_zero_terminal_snr(betas: &[f32], math: &dyn F32Math) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let sqrt = math.sqrt(&math.cumprod(&alphas));
    let (s0, st) = (sqrt[0], sqrt[sqrt.len() - 1]);
    let scale = s0 / (s0 - st);
    let bar: Vec<f32> = sqrt.iter().map(|s| (s - st) * scale).map(|s| s * s).collect();
    std::iter::once(bar[0]).chain(bar.windows(2).map(|w| w[1] / w[0])).map(|a| 1.0 - a).collect()
}

/// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32, ascending in t.
pub fn train_sigmas(ac: &[f32], math: &dyn F32Math) -> Vec<f32> {
    math.sqrt(&ac.iter().map(|a| (1.0 - a) / a).collect::<Vec<_>>())
}

pub fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
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
pub(crate) fn check_first_timestep(class: &'static str, steps: usize, timesteps: &[f64]) -> Result<(), SchedulerError> {
    match timesteps.first() {
        Some(&t0) if index_for_timestep(timesteps, t0) != Some(0) => Err(SchedulerError::Steps {
            class,
            steps,
            reason: format!("the schedule starts with a repeated timestep ({t0}), which diffusers cannot step through; change sigma_max, the spacing or the step count"),
        }),
        _ => Ok(()),
    }
}

/// `1 <= steps <= num_train_timesteps`.
pub(crate) fn check_steps(class: &'static str, steps: usize, n: usize) -> Result<(), SchedulerError> {
    if steps == 0 || steps > n {
        return Err(SchedulerError::Steps { class, steps, reason: format!("expected 1 to num_train_timesteps = {n}") });
    }
    Ok(())
}

/// The `set_timesteps` spacing shared by the Euler-type schedulers (float32 timesteps, descending).
pub(crate) fn spaced_timesteps(spacing: Spacing, n: usize, steps: usize, offset: i64) -> Vec<f32> {
    match spacing {
        // np.linspace(0, n - 1, steps, dtype=np.float32)[::-1]
        Spacing::Linspace => np_linspace(0.0, (n - 1) as f64, steps).into_iter().rev().map(|t| t as f32).collect(),
        // (np.arange(0, steps) * ratio).round()[::-1].astype(np.float32) + steps_offset
        Spacing::Leading => (0..steps).rev().map(|i| (i * (n / steps)) as f32 + offset as f32).collect(),
        // np.arange(n, 0, -n / steps).round().astype(np.float32) - 1
        Spacing::Trailing => np_arange(n as f64, 0.0, -(n as f64 / steps as f64)).into_iter().map(|t| t.round_ties_even() as f32 - 1.0).collect(),
    }
}

/// Euler-type `init_noise_sigma`: the largest sigma, or `(max**2 + 1) ** 0.5` for "leading" spacing.
pub(crate) fn init_noise_sigma(sigmas: &[f32], spacing: Spacing, math: &dyn F32Math) -> f32 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        Spacing::Linspace | Spacing::Trailing => max,
        Spacing::Leading => math.sqrt32(max * max + 1.0),
    }
}

#[cfg(test)]
mod tests {
    use super::super::StdMath;
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
        let ac = alphas_cumprod(&betas(1000, 0.00085, 0.012, BetaSchedule::ScaledLinear, None, &StdMath), false, false, &StdMath);
        assert_eq!(ac.len(), 1000);
        assert!((ac[0] - 0.99915).abs() < 1e-6);
        assert!((ac[999] - 0.0046).abs() < 1e-4, "{}", ac[999]);
    }

    #[test]
    fn zero_terminal_snr_ends_at_zero() {
        let b = betas(1000, 0.00085, 0.012, BetaSchedule::ScaledLinear, None, &StdMath);
        let ac = alphas_cumprod(&b, true, false, &StdMath);
        assert_eq!(ac[999], 0.0);
        assert!((ac[0] - 0.99915).abs() < 1e-4, "{}", ac[0]);
    }
}
