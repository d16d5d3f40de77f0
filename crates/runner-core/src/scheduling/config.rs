//! Typed reads of scheduler config keys with a class's defaults, as diffusers' `register_to_config`
//! `__init__` signatures give them. Keys a class does not know are ignored (as `from_config` does);
//! a `null` is Python's `None`: false for flags, "absent" for optional values, an error elsewhere.

use serde_json::{Map, Value};

use super::math::F32Math;
use super::schedule::{self, BetaSchedule, Prediction, Spacing};
use super::{short, SchedulerError};

pub(crate) struct Cfg<'a> {
    pub class: &'static str,
    map: &'a Map<String, Value>,
}

impl<'a> Cfg<'a> {
    pub fn new(class: &'static str, map: &'a Map<String, Value>) -> Self {
        Cfg { class, map }
    }

    pub fn bad(&self, key: &str, value: impl Into<String>, reason: impl Into<String>) -> SchedulerError {
        SchedulerError::BadValue { class: self.class, key: key.into(), value: value.into(), reason: reason.into() }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    fn num(&self, key: &str, v: &Value) -> Result<f64, SchedulerError> {
        match v {
            Value::Number(n) => n.as_f64().ok_or_else(|| self.bad(key, short(v), "expected a number")),
            // parse_config's spellings of Python's non-finite floats.
            Value::String(s) if s == "-Infinity" => Ok(f64::NEG_INFINITY),
            Value::String(s) if s == "Infinity" => Ok(f64::INFINITY),
            Value::String(s) if s == "NaN" => Ok(f64::NAN),
            _ => Err(self.bad(key, short(v), "expected a number")),
        }
    }

    pub fn f64(&self, key: &str, default: f64) -> Result<f64, SchedulerError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => self.num(key, v),
        }
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, SchedulerError> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => self.num(key, v).map(Some),
        }
    }

    /// A `float | None` key with a non-None default: absent takes `default`, `null` is None.
    pub fn nullable_f64(&self, key: &str, default: f64) -> Result<Option<f64>, SchedulerError> {
        match self.get(key) {
            None => Ok(Some(default)),
            Some(Value::Null) => Ok(None),
            Some(v) => self.num(key, v).map(Some),
        }
    }

    pub fn int(&self, key: &str, default: i64) -> Result<i64, SchedulerError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => match v.as_f64() {
                Some(x) if x.fract() == 0.0 && x.abs() <= 1e15 => Ok(x as i64),
                _ => Err(self.bad(key, short(v), "expected an integer")),
            },
        }
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool, SchedulerError> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.bad(key, short(v), "expected true or false")),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>, SchedulerError> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.bad(key, short(v), "expected a string")),
        }
    }

    /// A string key that must be one of `allowed` (the values runner implements).
    pub fn choice(&self, key: &str, default: &'static str, allowed: &[&'static str]) -> Result<&'static str, SchedulerError> {
        let s = match self.get(key) {
            None => default,
            Some(Value::String(s)) => s.as_str(),
            Some(v) => return Err(self.bad(key, short(v), format!("expected one of {}", quoted(allowed)))),
        };
        allowed.iter().copied().find(|a| *a == s).ok_or_else(|| self.bad(key, format!("{s:?}"), format!("supported: {}", quoted(allowed))))
    }

    /// A flag runner does not implement: it must be false (or absent).
    pub fn require_false(&self, key: &str) -> Result<(), SchedulerError> {
        if self.bool(key, false)? {
            return Err(self.bad(key, "true", "not supported by runner"));
        }
        Ok(())
    }

    pub fn prediction(&self) -> Result<Prediction, SchedulerError> {
        Ok(match self.choice("prediction_type", "epsilon", &["epsilon", "v_prediction"])? {
            "epsilon" => Prediction::Epsilon,
            _ => Prediction::VPrediction,
        })
    }

    pub fn spacing(&self, default: &'static str) -> Result<Spacing, SchedulerError> {
        Ok(match self.choice("timestep_spacing", default, &["linspace", "leading", "trailing"])? {
            "linspace" => Spacing::Linspace,
            "leading" => Spacing::Leading,
            _ => Spacing::Trailing,
        })
    }

    pub fn num_train_timesteps(&self) -> Result<usize, SchedulerError> {
        let n = self.int("num_train_timesteps", 1000)?;
        if !(2..=1_000_000).contains(&n) {
            return Err(self.bad("num_train_timesteps", n.to_string(), "expected 2 to 1000000"));
        }
        Ok(n as usize)
    }

    pub fn steps_offset(&self) -> Result<i64, SchedulerError> {
        let n = self.int("steps_offset", 0)?;
        if !(0..=1_000_000).contains(&n) {
            return Err(self.bad("steps_offset", n.to_string(), "expected 0 to 1000000"));
        }
        Ok(n)
    }

    /// The training noise schedule's `alphas_cumprod` (float32), from `num_train_timesteps`,
    /// `beta_start`, `beta_end`, `beta_schedule`, `trained_betas` and, where the class has it,
    /// `rescale_betas_zero_snr`.
    pub fn alphas_cumprod(&self, rescale: Rescale, math: &dyn F32Math) -> Result<Vec<f32>, SchedulerError> {
        let n = self.num_train_timesteps()?;
        let trained = match self.get("trained_betas") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => {
                let v = a.iter().map(|x| self.num("trained_betas", x)).collect::<Result<Vec<_>, _>>()?;
                if v.len() != n {
                    return Err(self.bad("trained_betas", format!("{} values", v.len()), format!("expected num_train_timesteps = {n} values")));
                }
                Some(v)
            }
            Some(v) => return Err(self.bad("trained_betas", short(v), "expected a list of numbers")),
        };
        let sched = match self.choice("beta_schedule", "linear", &["linear", "scaled_linear", "squaredcos_cap_v2"])? {
            "linear" => BetaSchedule::Linear,
            "scaled_linear" => BetaSchedule::ScaledLinear,
            _ => BetaSchedule::SquaredcosCapV2,
        };
        let betas = schedule::betas(n, self.f64("beta_start", 0.0001)?, self.f64("beta_end", 0.02)?, sched, trained.as_deref(), math);
        let rescaled = rescale != Rescale::NotAKey && self.bool("rescale_betas_zero_snr", false)?;
        Ok(schedule::alphas_cumprod(&betas, rescaled, rescaled && rescale == Rescale::BetasAndLastCumprod, math))
    }
}

/// What a class does with `rescale_betas_zero_snr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rescale {
    /// Not one of the class's keys (PNDM, LMS).
    NotAKey,
    /// Rescales the betas (DDIM).
    Betas,
    /// Rescales the betas and sets the last `alphas_cumprod` to 2**-24 (Euler, DPM-Solver).
    BetasAndLastCumprod,
}

fn quoted(a: &[&str]) -> String {
    a.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ")
}
