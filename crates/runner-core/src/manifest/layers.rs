//! Layered configuration with provenance: manifest file < `RUNNER_*` environment < `--set`.
//!
//! Each layer is its own figment provider whose metadata says exactly where it came from (the
//! file, the variable's name, the flag as typed), so every value of the merged manifest can be
//! traced back through its figment tag, and then, for the file, to a span of the TOML text.

// Diagnostics are built once per bad layer, off any hot path: their size does not matter.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};

use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};

use crate::diag::{Diagnostic, Location};

/// Prefix of environment variables that override manifest keys.
pub const ENV_PREFIX: &str = "RUNNER_";
/// Separator of nested keys in environment variable names (`RUNNER_RUN__STEPS` -> `run.steps`).
pub const ENV_SEPARATOR: &str = "__";

/// The override layers above the manifest file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `RUNNER_*` variables, as (name, value).
    pub env: Vec<(String, String)>,
    /// `--set key.path=value` arguments in command-line order (later wins).
    pub sets: Vec<String>,
    /// Hub revisions pinned to commits (`--locked`: the lock's `[[hub]]` entries).
    pub pins: crate::hub::Pins,
}

impl Overrides {
    /// Takes the `RUNNER_<SECTION>__<KEY>` variables of this process. Variables without `__` are
    /// left alone: CI systems set `RUNNER_OS`, `RUNNER_TEMP`, `RUNNER_NAME`, ... for themselves.
    pub fn from_process(sets: Vec<String>) -> Self {
        let mut env: Vec<(String, String)> = std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))).filter(|(k, _)| is_override_var(k)).collect();
        env.sort();
        Overrides { env, sets, pins: Default::default() }
    }
}

/// Whether an environment variable is a manifest override.
pub fn is_override_var(name: &str) -> bool {
    name.strip_prefix(ENV_PREFIX).is_some_and(|rest| rest.contains(ENV_SEPARATOR))
}

/// Where one layer's values came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File(PathBuf),
    Env(String),
    Cli(String),
}

const ENV_TAG: &str = "env:";
const CLI_TAG: &str = "cli:";

impl Origin {
    pub fn from_metadata(md: &Metadata) -> Option<Origin> {
        match md.source.as_ref()? {
            Source::File(p) => Some(Origin::File(p.clone())),
            Source::Custom(s) => {
                if let Some(var) = s.strip_prefix(ENV_TAG) {
                    Some(Origin::Env(var.to_string()))
                } else {
                    s.strip_prefix(CLI_TAG).map(|a| Origin::Cli(a.to_string()))
                }
            }
            _ => None,
        }
    }

    pub fn location(&self) -> Location {
        match self {
            Origin::File(p) => Location::Path(p.clone()),
            Origin::Env(var) => Location::Env { var: var.clone() },
            Origin::Cli(arg) => Location::Cli { arg: arg.clone() },
        }
    }
}

/// The manifest file as a provider (parsed by figment's TOML format, tagged with its path).
pub struct FileLayer<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl Provider for FileLayer<'_> {
    fn metadata(&self) -> Metadata {
        Metadata::from("manifest file", Source::File(self.path.to_path_buf()))
    }
    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        use figment::providers::Format;
        figment::providers::Toml::string(self.text).data()
    }
}

/// One key set from outside the file: an environment variable or a `--set` flag.
pub struct KeyLayer {
    origin: Origin,
    path: Vec<String>,
    value: Value,
}

impl Provider for KeyLayer {
    fn metadata(&self) -> Metadata {
        let (name, tag) = match &self.origin {
            Origin::Env(v) => (format!("environment variable `{v}`"), format!("{ENV_TAG}{v}")),
            Origin::Cli(a) => (format!("command line `{a}`"), format!("{CLI_TAG}{a}")),
            Origin::File(p) => (p.display().to_string(), p.display().to_string()),
        };
        Metadata::from(name, Source::Custom(tag))
    }
    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut v = self.value.clone();
        for seg in self.path.iter().skip(1).rev() {
            let mut d = Dict::new();
            d.insert(seg.clone(), v);
            v = Value::from(d);
        }
        let mut root = Dict::new();
        root.insert(self.path[0].clone(), v);
        Ok(Profile::Default.collect(root))
    }
}

/// Parses an override's value as a TOML literal (`30`, `true`, `"x"`, `[1, 2]`, `{ a = 1 }`),
/// or takes it as a plain string when it is not one (`a cute dog`, `fp16`).
/// A whole number beyond TOML's 64-bit signed integers (up to 2^64-1, `run.seed`'s range) is
/// that number, not a string.
pub fn parse_literal(s: &str) -> Value {
    let doc = format!("v = {s}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(t) if t.len() == 1 => t.get("v").and_then(|v| Value::serialize(v).ok()).unwrap_or_else(|| Value::from(s.to_string())),
        _ => match big_unsigned(s) {
            Some(n) => Value::from(n),
            None => Value::from(s.to_string()),
        },
    }
}

/// `s` as a u64 from 2^63 up, written as TOML would write it (digits, no sign or leading zero).
pub fn big_unsigned(s: &str) -> Option<u64> {
    let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && !s.starts_with('0');
    digits.then(|| s.parse::<u64>().ok()).flatten().filter(|&n| n > i64::MAX as u64)
}

/// Builds the layer of one environment variable.
pub fn env_layer(name: &str, value: &str) -> Result<KeyLayer, Diagnostic> {
    let origin = Origin::Env(name.to_string());
    let rest = name.strip_prefix(ENV_PREFIX).unwrap_or(name);
    let path: Vec<String> = rest.split(ENV_SEPARATOR).map(|s| s.to_ascii_lowercase()).collect();
    if path.iter().any(String::is_empty) {
        return Err(Diagnostic::error(format!("environment variable `{name}` has an empty key segment"), origin.location())
            .with_note("nest keys with a double underscore: `RUNNER_RUN__STEPS=20` sets `run.steps`"));
    }
    Ok(KeyLayer { origin, path, value: parse_literal(value) })
}

/// Builds the layer of one `--set key.path=value` argument.
pub fn set_layer(arg: &str) -> Result<KeyLayer, Diagnostic> {
    let origin = Origin::Cli(format!("--set {arg}"));
    let Some((key, value)) = arg.split_once('=') else {
        return Err(
            Diagnostic::error(format!("`--set {arg}` is not of the form KEY=VALUE"), origin.location()).with_note("for example `--set run.steps=20` or `--set placement.max_memory.\"cuda:0\"=10GiB`")
        );
    };
    let key = key.trim();
    let path: Vec<String> = match toml_edit::Key::parse(key) {
        Ok(keys) if !keys.is_empty() => keys.iter().map(|k| k.get().to_string()).collect(),
        _ => {
            return Err(Diagnostic::error(format!("`--set {arg}`: `{key}` is not a dotted key path"), origin.location())
                .with_note("write keys as in TOML: `run.steps`, `components.unet.device`, `placement.max_memory.\"cuda:0\"`"))
        }
    };
    Ok(KeyLayer { origin, path, value: parse_literal(value.trim()) })
}

/// Merges the file and the override layers, in order. Override syntax problems come back as
/// diagnostics (the valid layers are still merged so that all problems are reported at once).
pub fn merge(path: &Path, text: &str, overrides: &Overrides) -> (Figment, Vec<Diagnostic>) {
    let mut fig = Figment::new().merge(FileLayer { path, text });
    let mut diags = vec![];
    for (name, value) in &overrides.env {
        match env_layer(name, value) {
            Ok(layer) => fig = fig.merge(layer),
            Err(d) => diags.push(d),
        }
    }
    for arg in &overrides.sets {
        match set_layer(arg) {
            Ok(layer) => fig = fig.merge(layer),
            Err(d) => diags.push(d),
        }
    }
    (fig, diags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals() {
        assert_eq!(parse_literal("30").to_i128(), Some(30));
        assert_eq!(parse_literal("a cute dog").as_str(), Some("a cute dog"));
        assert_eq!(parse_literal("\"30\"").as_str(), Some("30"));
        assert_eq!(parse_literal("fp16").as_str(), Some("fp16"));
        assert_eq!(parse_literal("1\nx = 2").as_str(), Some("1\nx = 2"));
        assert!(parse_literal("[1, 2]").as_array().is_some());
        // Beyond TOML's i64: the u64 it writes; other digits stay what they were.
        assert_eq!(parse_literal("18446744073709551615").to_u128(), Some(u64::MAX as u128));
        assert_eq!(parse_literal("9223372036854775808").to_u128(), Some(1 << 63));
        assert_eq!(parse_literal("18446744073709551616").as_str(), Some("18446744073709551616"));
        assert_eq!(parse_literal("007").as_str(), Some("007"));
    }

    #[test]
    fn ci_variables_are_not_overrides() {
        assert!(is_override_var("RUNNER_RUN__STEPS"));
        assert!(!is_override_var("RUNNER_OS"));
        assert!(!is_override_var("RUNNER_NAME"));
        assert!(!is_override_var("CARGO_RUN__X"));
    }

    #[test]
    fn set_paths() {
        let l = set_layer("placement.max_memory.\"cuda:0\"=10GiB").unwrap();
        assert_eq!(l.path, ["placement", "max_memory", "cuda:0"]);
        assert!(set_layer("run.steps").is_err());
        assert!(set_layer("run..steps=1").is_err());
    }
}
