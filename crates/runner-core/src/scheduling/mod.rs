//! Schedules from scheduler configs, without libtorch: what diffusers' scheduler classes
//! (`PNDMScheduler`, `EulerDiscreteScheduler`, ..., `FlowMatchEulerDiscreteScheduler`) compute in
//! `__init__` and `set_timesteps`, mirroring diffusers 0.42.1 so that runner's timesteps and
//! sigmas are diffusers'. The executor's `runner::schedulers` steps through them with tensors;
//! preflight builds them here to check a config before anything loads.
//!
//! Each scheduler is built from a `scheduler_config.json` (its `_class_name`) or from a
//! [`SchedulerKind`] applied to any saved config (diffusers `X.from_config(other.config)`: keys
//! X knows are kept, the others ignored, missing ones take X's defaults). The float32 tensor
//! arithmetic goes through an [`F32Math`] (see [`math`]): libtorch's in the executor, plain Rust
//! ([`StdMath`]) here.

mod config;
mod ddim;
mod dpm_solver_multistep;
mod euler;
mod euler_ancestral;
mod flow_match_euler;
mod lms;
pub mod math;
mod pndm;
pub mod schedule;

use serde_json::Value;

use crate::manifest::SchedulerKind;
use config::Cfg;

pub use ddim::Ddim;
pub use dpm_solver_multistep::DpmSolverMultistep;
pub use euler::EulerDiscrete;
pub use euler_ancestral::EulerAncestralDiscrete;
pub use flow_match_euler::{calculate_shift, FlowMatchEulerDiscrete, TimeShift};
pub use lms::LmsDiscrete;
pub use math::{F32Math, StdMath};
pub use pndm::Pndm;

/// A scheduler's schedule after `set_timesteps`: one variant per supported diffusers class.
#[derive(Debug, Clone)]
pub enum Schedule {
    Pndm(Pndm),
    Ddim(Ddim),
    EulerDiscrete(EulerDiscrete),
    EulerAncestralDiscrete(EulerAncestralDiscrete),
    DpmSolverMultistep(DpmSolverMultistep),
    LmsDiscrete(LmsDiscrete),
    FlowMatchEulerDiscrete(FlowMatchEulerDiscrete),
}

impl Schedule {
    /// The diffusers class name, e.g. "EulerDiscreteScheduler".
    pub fn name(&self) -> &'static str {
        match self {
            Schedule::Pndm(_) => Pndm::NAME,
            Schedule::Ddim(_) => Ddim::NAME,
            Schedule::EulerDiscrete(_) => EulerDiscrete::NAME,
            Schedule::EulerAncestralDiscrete(_) => EulerAncestralDiscrete::NAME,
            Schedule::DpmSolverMultistep(_) => DpmSolverMultistep::NAME,
            Schedule::LmsDiscrete(_) => LmsDiscrete::NAME,
            Schedule::FlowMatchEulerDiscrete(_) => FlowMatchEulerDiscrete::NAME,
        }
    }

    /// diffusers `scheduler.timesteps`: one model call each.
    pub fn timesteps(&self) -> &[f64] {
        match self {
            Schedule::Pndm(s) => &s.timesteps_f64,
            Schedule::Ddim(s) => &s.timesteps_f64,
            Schedule::EulerDiscrete(s) => &s.timesteps,
            Schedule::EulerAncestralDiscrete(s) => &s.timesteps,
            Schedule::DpmSolverMultistep(s) => &s.timesteps,
            Schedule::LmsDiscrete(s) => &s.timesteps,
            Schedule::FlowMatchEulerDiscrete(s) => &s.timesteps,
        }
    }
}

/// A scheduler config that runner cannot use. Messages name the file, the class and the key.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("scheduler_config.json: not valid JSON: {0}")]
    Parse(String),
    #[error("scheduler_config.json: expected a JSON object, got {0}")]
    NotAnObject(String),
    #[error("scheduler_config.json: no `_class_name` (and no scheduler kind given)")]
    MissingClass,
    #[error("scheduler_config.json: unsupported scheduler class `{name}`; supported: {}", SUPPORTED.join(", "))]
    UnsupportedClass { name: String },
    #[error("scheduler_config.json: {class}: `{key}` = {value}: {reason}")]
    BadValue { class: &'static str, key: String, value: String, reason: String },
    #[error("{class}: {steps} inference steps: {reason}")]
    Steps { class: &'static str, steps: usize, reason: String },
    /// A flow-matching config given to a noise-prediction scheduler, or the other way round.
    #[error("scheduler_config.json: `{class}` cannot run from a `{config_class}` config: {reason}")]
    Incompatible { class: &'static str, config_class: String, reason: &'static str },
    #[error("{class}: mu = {mu} (from the pipeline): {reason}")]
    Mu { class: &'static str, mu: f64, reason: String },
}

/// The diffusers classes [`build`] accepts.
pub const SUPPORTED: &[&str] = &[Pndm::NAME, EulerDiscrete::NAME, EulerAncestralDiscrete::NAME, Ddim::NAME, DpmSolverMultistep::NAME, LmsDiscrete::NAME, FlowMatchEulerDiscrete::NAME];

/// Parses scheduler_config.json text (lenient: accepts -Infinity/Infinity/NaN, which Python's
/// `json.dumps` writes and strict JSON refuses; they become the strings "-Infinity", ... that
/// the numeric readers of [`build`] accept).
pub fn parse_config(text: &str) -> Result<Value, SchedulerError> {
    serde_json::from_str(&quote_non_finite(text)).map_err(|e| SchedulerError::Parse(e.to_string()))
}

/// Rewrites the bare tokens `-Infinity`, `Infinity` and `NaN` outside strings as JSON strings.
fn quote_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(tok) = ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| rest.starts_with(t)) {
            out.push('"');
            out.push_str(tok);
            out.push('"');
            rest = &rest[tok.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Builds the scheduler from a config (its `_class_name`), or from `kind` when given (keeping the
/// config's shared values, as diffusers `X.from_config(other.config)` does), set for `steps`
/// inference steps (diffusers `set_timesteps(steps)`).
///
/// `dpmpp-2m` / `dpmpp-2m-karras` set what their names say on top of the config
/// (`algorithm_type = "dpmsolver++"`, `solver_order = 2`, `use_karras_sigmas`), like
/// `DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=...)`.
///
/// A flow-matching config with `use_dynamic_shifting` needs the pipeline's `mu`: see
/// [`build_with_mu`].
pub fn build(config: &Value, kind: Option<SchedulerKind>, steps: usize, math: &dyn F32Math) -> Result<Schedule, SchedulerError> {
    build_with_mu(config, kind, steps, None, math)
}

/// [`build`], with diffusers `set_timesteps(steps, mu=mu)`: `mu` is the resolution-dependent
/// shift the flow-matching pipelines pass when the config has `use_dynamic_shifting` (see
/// [`dynamic_shift_mu`]); it is required then, unused otherwise (as in diffusers), and refused by
/// the other schedulers, whose `set_timesteps` takes no `mu`.
pub fn build_with_mu(config: &Value, kind: Option<SchedulerKind>, steps: usize, mu: Option<f64>, math: &dyn F32Math) -> Result<Schedule, SchedulerError> {
    build_spaced(config, kind, Spacing::Steps(steps), mu, math)
}

/// [`build_with_mu`] with the pipeline's own sigmas, diffusers `set_timesteps(sigmas=sigmas,
/// mu=mu)` (FluxPipeline passes `linspace(1, 1/N, N)`): one step per sigma. Only the
/// flow-matching scheduler takes them.
pub fn build_with_sigmas(config: &Value, kind: Option<SchedulerKind>, sigmas: &[f64], mu: Option<f64>, math: &dyn F32Math) -> Result<Schedule, SchedulerError> {
    build_spaced(config, kind, Spacing::Sigmas(sigmas), mu, math)
}

/// How `set_timesteps` is called.
enum Spacing<'a> {
    Steps(usize),
    Sigmas(&'a [f64]),
}

fn build_spaced(config: &Value, kind: Option<SchedulerKind>, spacing: Spacing, mu: Option<f64>, math: &dyn F32Math) -> Result<Schedule, SchedulerError> {
    let own = config.as_object().and_then(|m| m.get("_class_name")).and_then(Value::as_str).map(str::to_string);
    let mut map = init_map(config)?;
    let class: &'static str = match kind {
        Some(k) => class_of(k),
        None => match map.get("_class_name") {
            Some(Value::String(s)) => SUPPORTED.iter().copied().find(|c| c == s).ok_or_else(|| SchedulerError::UnsupportedClass { name: s.clone() })?,
            Some(v) => return Err(SchedulerError::BadValue { class: "scheduler", key: "_class_name".into(), value: short(v), reason: "expected a class name string".into() }),
            None => return Err(SchedulerError::MissingClass),
        },
    };
    // A model trained for flow matching (SD3, FLUX) cannot be sampled with a noise-prediction
    // scheduler, nor the reverse; diffusers' from_config would build either silently.
    if let Some(own) = own.as_ref().filter(|o| is_flow_matching(o) != is_flow_matching(class)) {
        let reason = if is_flow_matching(class) { "a flow-matching scheduler needs a flow-matching model (SD3, FLUX)" } else { "a flow-matching model (SD3, FLUX) needs a flow-matching scheduler" };
        return Err(SchedulerError::Incompatible { class, config_class: own.clone(), reason });
    }
    if let (Some(m), false) = (mu, class == FlowMatchEulerDiscrete::NAME) {
        return Err(SchedulerError::Mu { class, mu: m, reason: "only flow-matching schedulers take mu".into() });
    }
    let steps = match spacing {
        Spacing::Steps(n) => n,
        Spacing::Sigmas(s) if class == FlowMatchEulerDiscrete::NAME => {
            return Ok(Schedule::FlowMatchEulerDiscrete(FlowMatchEulerDiscrete::with_sigmas(&Cfg::new(FlowMatchEulerDiscrete::NAME, &map), s, mu)?));
        }
        Spacing::Sigmas(_) => {
            return Err(SchedulerError::Incompatible { class, config_class: own.unwrap_or_else(|| class.to_string()), reason: "only a flow-matching scheduler takes the pipeline's sigmas (FLUX)" })
        }
    };
    if let Some(k @ (SchedulerKind::DpmPP2M | SchedulerKind::DpmPP2MKarras)) = kind {
        map.insert("algorithm_type".into(), "dpmsolver++".into());
        map.insert("solver_order".into(), 2.into());
        map.insert("use_karras_sigmas".into(), (k == SchedulerKind::DpmPP2MKarras).into());
    }
    Ok(match class {
        Pndm::NAME => Schedule::Pndm(Pndm::new(&Cfg::new(Pndm::NAME, &map), steps, math)?),
        Ddim::NAME => Schedule::Ddim(Ddim::new(&Cfg::new(Ddim::NAME, &map), steps, math)?),
        EulerDiscrete::NAME => Schedule::EulerDiscrete(EulerDiscrete::new(&Cfg::new(EulerDiscrete::NAME, &map), steps, math)?),
        EulerAncestralDiscrete::NAME => Schedule::EulerAncestralDiscrete(EulerAncestralDiscrete::new(&Cfg::new(EulerAncestralDiscrete::NAME, &map), steps, math)?),
        DpmSolverMultistep::NAME => Schedule::DpmSolverMultistep(DpmSolverMultistep::new(&Cfg::new(DpmSolverMultistep::NAME, &map), steps, math)?),
        LmsDiscrete::NAME => Schedule::LmsDiscrete(LmsDiscrete::new(&Cfg::new(LmsDiscrete::NAME, &map), steps, math)?),
        FlowMatchEulerDiscrete::NAME => Schedule::FlowMatchEulerDiscrete(FlowMatchEulerDiscrete::new(&Cfg::new(FlowMatchEulerDiscrete::NAME, &map), steps, mu)?),
        _ => return Err(SchedulerError::UnsupportedClass { name: class.to_string() }),
    })
}

/// The `mu` a flow-matching pipeline passes for `image_seq_len` latent tokens (SD3:
/// `(latent_height / patch_size) * (latent_width / patch_size)`): diffusers' `calculate_shift`
/// of the config's `base_image_seq_len`, `max_image_seq_len`, `base_shift` and `max_shift` when
/// `use_dynamic_shifting` is set, else None (the pipelines pass no `mu` then). Pass it to
/// [`build_with_mu`].
pub fn dynamic_shift_mu(config: &Value, image_seq_len: usize) -> Result<Option<f64>, SchedulerError> {
    let map = init_map(config)?;
    let cfg = Cfg::new(FlowMatchEulerDiscrete::NAME, &map);
    flow_match_euler::FlowMatchConfig::read(&cfg)?.mu(&cfg, image_seq_len)
}

/// Whether a diffusers scheduler class is a flow-matching one (`FlowMatch*`).
pub fn is_flow_matching(class: &str) -> bool {
    class.starts_with("FlowMatch")
}

/// The config as `__init__` sees it: diffusers `extract_init_dict` gives the keys listed in
/// `_use_default_values` the class defaults.
fn init_map(config: &Value) -> Result<serde_json::Map<String, Value>, SchedulerError> {
    let mut map = config.as_object().ok_or_else(|| SchedulerError::NotAnObject(short(config)))?.clone();
    if let Some(Value::Array(keys)) = map.get("_use_default_values").cloned() {
        for k in keys.iter().filter_map(Value::as_str) {
            map.shift_remove(k);
        }
    }
    Ok(map)
}

/// The diffusers class of a runner scheduler name.
pub fn class_of(kind: SchedulerKind) -> &'static str {
    match kind {
        SchedulerKind::Pndm => Pndm::NAME,
        SchedulerKind::Ddim => Ddim::NAME,
        SchedulerKind::Euler => EulerDiscrete::NAME,
        SchedulerKind::EulerAncestral => EulerAncestralDiscrete::NAME,
        SchedulerKind::DpmPP2M | SchedulerKind::DpmPP2MKarras => DpmSolverMultistep::NAME,
        SchedulerKind::Lms => LmsDiscrete::NAME,
        SchedulerKind::FlowMatchEuler => FlowMatchEulerDiscrete::NAME,
    }
}

/// A JSON value for a message, cut short.
pub(crate) fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(57).collect::<String>())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_parse_keeps_strings() {
        let v = parse_config(r#"{"a": -Infinity, "b": [Infinity, NaN], "c": "NaN -Infinity \" Infinity", "d": 1}"#).unwrap();
        assert_eq!(v["a"], "-Infinity");
        assert_eq!(v["b"][0], "Infinity");
        assert_eq!(v["b"][1], "NaN");
        assert_eq!(v["c"], "NaN -Infinity \" Infinity");
        assert_eq!(v["d"], 1);
        assert!(matches!(parse_config("{\"a\": }"), Err(SchedulerError::Parse(_))));
    }

    #[test]
    fn unsupported_class_names_it_and_the_supported_ones() {
        let v = parse_config(r#"{"_class_name": "UniPCMultistepScheduler"}"#).unwrap();
        let e = build(&v, None, 10, &StdMath).err().unwrap().to_string();
        assert!(e.contains("UniPCMultistepScheduler") && e.contains("PNDMScheduler") && e.contains("DPMSolverMultistepScheduler"), "{e}");
        assert!(matches!(build(&parse_config("{}").unwrap(), None, 4, &StdMath), Err(SchedulerError::MissingClass)));
        assert!(matches!(build(&parse_config("[1]").unwrap(), None, 4, &StdMath), Err(SchedulerError::NotAnObject(_))));
    }
}
