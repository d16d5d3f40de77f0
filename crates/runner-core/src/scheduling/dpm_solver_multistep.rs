//! diffusers `DPMSolverMultistepScheduler` (scheduling_dpmsolver_multistep.py): DPM-Solver++ (and
//! the deprecated DPM-Solver) multistep, orders 1 to 3, midpoint or Heun second-order updates,
//! optional Karras sigmas. The SDE variants (which draw noise) are not implemented.

use super::config::{Cfg, Rescale};
use super::math::F32Math;
use super::schedule::{self, check_steps, karras, np_arange, np_interp, np_linspace, sigma_to_t, widen, Prediction, Spacing};
use super::SchedulerError;

/// `DPMSolverMultistepScheduler(**config)` after `set_timesteps(steps)`.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistep {
    pub alphas_cumprod: Vec<f64>,
    pub sigmas: Vec<f32>,
    pub sigmas_f64: Vec<f64>,
    pub timesteps: Vec<f64>,
    pub prediction: Prediction,
    /// `algorithm_type == "dpmsolver++"` (else "dpmsolver").
    pub plus_plus: bool,
    /// `solver_type == "midpoint"` (else "heun").
    pub midpoint: bool,
    pub solver_order: usize,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub final_sigma_zero: bool,
}

impl DpmSolverMultistep {
    pub const NAME: &'static str = "DPMSolverMultistepScheduler";

    /// `DPMSolverMultistepScheduler(**config)` then `set_timesteps(steps)`.
    pub(crate) fn new(cfg: &Cfg, steps: usize, math: &dyn F32Math) -> Result<Self, SchedulerError> {
        let ac = cfg.alphas_cumprod(Rescale::BetasAndLastCumprod, math)?;
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
        let one_minus: Vec<f32> = ac.iter().map(|a| 1.0 - a).collect();
        let lambda_t: Vec<f32> = math.log(&math.sqrt(&ac)).iter().zip(math.log(&math.sqrt(&one_minus))).map(|(a, b)| a - b).collect();
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
        let train = schedule::train_sigmas(&ac, math);
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
        })
    }
}
