//! Strict reading of a model's `config.json`: a missing or `null` key takes diffusers' default, a
//! present key of the wrong type or an impossible value (zero or negative sizes, absurd channel
//! counts) is an error naming the file and the key.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Channel counts, layer counts and sizes above this are refused as impossible (the largest real
/// configs are in the tens of thousands).
pub const MAX_DIM: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{}`: {model} config: {msg}", path.display())]
pub struct ConfigError {
    pub path: PathBuf,
    pub model: String,
    pub msg: String,
}

/// A transformers config (CLIP text, the safety checker's CLIP) that cannot be read: its messages
/// name the file, as transformers' do, not a model.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read `{}`: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("`{}`: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
}

/// A component's parsed `config.json`, for typed, key-naming reads.
pub struct Cfg<'a> {
    v: &'a Value,
    path: &'a Path,
    model: &'a str,
}

impl<'a> Cfg<'a> {
    /// `v` must be a JSON object.
    pub fn new(v: &'a Value, path: &'a Path, model: &'a str) -> Result<Self, ConfigError> {
        let c = Cfg { v, path, model };
        if !v.is_object() {
            return Err(c.err(format!("expected a JSON object, got {}", kind_of(v))));
        }
        Ok(c)
    }

    pub fn err(&self, msg: impl Into<String>) -> ConfigError {
        ConfigError { path: self.path.to_path_buf(), model: self.model.to_string(), msg: msg.into() }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// A count or size in `1..=MAX_DIM`.
    pub fn dim(&self, key: &str, default: u64) -> Result<i64, ConfigError> {
        match self.get(key) {
            None => Ok(default as i64),
            Some(x) => self.dim_value(key, x),
        }
    }

    fn dim_value(&self, key: &str, x: &Value) -> Result<i64, ConfigError> {
        match x.as_u64() {
            Some(n) if (1..=MAX_DIM).contains(&n) => Ok(n as i64),
            Some(n) => Err(self.err(format!("`{key}` must be between 1 and {MAX_DIM}, got {n}"))),
            None => Err(self.err(format!("`{key}` must be a positive integer, got {}", show(x)))),
        }
    }

    /// A non-negative integer (e.g. a padding).
    pub fn count(&self, key: &str, default: u64) -> Result<i64, ConfigError> {
        match self.get(key) {
            None => Ok(default as i64),
            Some(x) => match x.as_u64() {
                Some(n) if n <= MAX_DIM => Ok(n as i64),
                _ => Err(self.err(format!("`{key}` must be an integer from 0 to {MAX_DIM}, got {}", show(x)))),
            },
        }
    }

    /// A finite number.
    pub fn num(&self, key: &str, default: f64) -> Result<f64, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(x) => x.as_f64().filter(|f| f.is_finite()).ok_or_else(|| self.err(format!("`{key}` must be a finite number, got {}", show(x)))),
        }
    }

    pub fn opt_num(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        if self.has(key) {
            self.num(key, 0.0).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn flag(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(x) => x.as_bool().ok_or_else(|| self.err(format!("`{key}` must be true or false, got {}", show(x)))),
        }
    }

    pub fn text(&self, key: &str, default: &'a str) -> Result<&'a str, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(x) => x.as_str().ok_or_else(|| self.err(format!("`{key}` must be a string, got {}", show(x)))),
        }
    }

    pub fn opt_text(&self, key: &str) -> Result<Option<&'a str>, ConfigError> {
        self.get(key).map(|x| x.as_str().ok_or_else(|| self.err(format!("`{key}` must be a string, got {}", show(x))))).transpose()
    }

    /// A list of strings.
    pub fn texts(&self, key: &str, default: &[&str]) -> Result<Vec<String>, ConfigError> {
        match self.get(key) {
            None => Ok(default.iter().map(|s| s.to_string()).collect()),
            Some(Value::Array(a)) => a.iter().enumerate().map(|(i, x)| x.as_str().map(str::to_string).ok_or_else(|| self.err(format!("`{key}[{i}]` must be a string, got {}", show(x))))).collect(),
            Some(x) => Err(self.err(format!("`{key}` must be a list of strings, got {}", show(x)))),
        }
    }

    /// A list of sizes, or (where diffusers takes both) one size for each of `n` blocks.
    pub fn dims(&self, key: &str, n: Option<usize>, default: &[u64]) -> Result<Vec<i64>, ConfigError> {
        match self.get(key) {
            None => Ok(match n {
                Some(n) if default.len() == 1 => vec![default[0] as i64; n],
                _ => default.iter().map(|&d| d as i64).collect(),
            }),
            Some(Value::Array(a)) => {
                if a.is_empty() {
                    return Err(self.err(format!("`{key}` must not be empty")));
                }
                a.iter().enumerate().map(|(i, x)| self.dim_value(&format!("{key}[{i}]"), x)).collect()
            }
            Some(x) if n.is_some() && x.is_number() => Ok(vec![self.dim_value(key, x)?; n.unwrap_or(1)]),
            Some(x) => Err(self.err(format!("`{key}` must be a list of positive integers, got {}", show(x)))),
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A value for a message, shortened.
fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 40 {
        format!("{}...", s.chars().take(37).collect::<String>())
    } else {
        s
    }
}

/// Reads and parses `path` as a JSON object: a missing, unreadable, truncated or non-object file is
/// an error naming it.
pub fn read_json(path: &Path, model: &str) -> Result<Value, ConfigError> {
    let err = |msg: String| ConfigError { path: path.to_path_buf(), model: model.to_string(), msg };
    let text = std::fs::read_to_string(path).map_err(|e| err(if e.kind() == std::io::ErrorKind::NotFound { "the file is missing".into() } else { format!("cannot read it: {e}") }))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON (truncated?): {e}")))?;
    if !v.is_object() {
        return Err(err(format!("expected a JSON object, got {}", kind_of(&v))));
    }
    Ok(v)
}
