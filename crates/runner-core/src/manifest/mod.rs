//! Manifests: serde types, layered loading with provenance, schema and semantic validation.
//!
//! [`load`] is the one entry point: it reads the file, merges `RUNNER_*` variables and `--set`
//! flags over it, validates the result against `schemas/manifest.schema.json` and the checks a
//! schema cannot express, and returns either the typed manifest (with warnings) or every error
//! found, each pointing at the file span, variable or flag its value came from.

mod check;
mod layers;
mod schema;
mod spans;
mod types;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use figment::value::{Dict, Value};
use figment::Figment;

pub use layers::{is_override_var, Origin, Overrides, ENV_PREFIX, ENV_SEPARATOR};
pub use schema::{generate_schema, schema_json, COMMITTED_SCHEMA};
pub use types::*;

use crate::diag::{Diagnostic, Location, SourceText};

/// A manifest that passed validation, with what is needed to explain where its values came from.
#[derive(Debug)]
pub struct LoadedManifest {
    pub manifest: Manifest,
    /// The manifest file as given.
    pub path: PathBuf,
    pub source: Arc<SourceText>,
    /// Warnings (never errors: those make [`load`] fail).
    pub warnings: Vec<Diagnostic>,
    /// Sources named `hf://…`, by key (`pipeline.source`), resolved in the Hub cache.
    pub hub: std::collections::BTreeMap<String, HubSource>,
    /// The commits Hub names were pinned to (`--locked`), kept for [`relayer`].
    pins: crate::hub::Pins,
    provenance: Provenance,
}

/// A Hub source and what the cache made of it.
#[derive(Debug, Clone)]
pub struct HubSource {
    pub name: crate::hub::HubName,
    pub resolved: Result<crate::hub::Resolved, crate::hub::HubError>,
}

/// Maps key paths of the merged manifest to their origins and file spans.
#[derive(Debug)]
struct Provenance {
    figment: Figment,
    root: Dict,
    doc: toml_edit::ImDocument<String>,
    source: Arc<SourceText>,
}

/// What part of a key/value pair a diagnostic should point at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    Key,
    Value,
}

impl Provenance {
    /// The value at `path`, or the deepest ancestor present, with the depth reached.
    fn find(&self, path: &[String]) -> (Option<&Value>, usize) {
        let mut cur: Option<&Value> = None;
        let mut depth = 0;
        for seg in path {
            let next = match cur {
                None => self.root.get(seg),
                Some(Value::Dict(_, d)) => d.get(seg),
                Some(Value::Array(_, a)) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
                Some(_) => None,
            };
            match next {
                Some(v) => {
                    cur = Some(v);
                    depth += 1;
                }
                None => break,
            }
        }
        (cur, depth)
    }

    fn origin(&self, path: &[String]) -> Option<Origin> {
        let (value, _) = self.find(path);
        let md = self.figment.get_metadata(value?.tag())?;
        Origin::from_metadata(md)
    }

    /// Where the value (or key) at `path` came from; for a missing key, its nearest ancestor.
    fn locate(&self, path: &[String], want: Want) -> Location {
        let (value, depth) = self.find(path);
        let origin = value.and_then(|v| self.figment.get_metadata(v.tag())).and_then(Origin::from_metadata);
        match origin {
            Some(Origin::File(_)) | None => {
                // A missing key points at its parent table's key; the root at the file's start.
                let (sub, want) = if depth == path.len() { (path, want) } else { (&path[..depth], Want::Key) };
                let span = spans::span_of(&self.doc, sub, want).unwrap_or(0..0);
                Location::File { source: self.source.clone(), span }
            }
            Some(o) => o.location(),
        }
    }
}

impl LoadedManifest {
    /// Where the value at a dotted key path came from.
    pub fn origin(&self, key: &str) -> Option<Origin> {
        self.provenance.origin(&split_key(key))
    }

    /// Resolves a path value: relative to the manifest's folder when the manifest file set it,
    /// relative to the current directory when an environment variable or `--set` did (cargo's
    /// rule for config paths).
    /// Where the value of `key` (`run.clip_skip`) was set: a file span, a variable or a flag.
    pub fn locate_value(&self, key: &str) -> Location {
        self.provenance.locate(&split_key(key), Want::Value)
    }

    pub fn resolve_path(&self, key: &str, p: &Path) -> PathBuf {
        if let Some(h) = self.hub.get(key) {
            // A Hub source not in the cache: its would-be snapshot path (which does not exist);
            // opening the pipeline reports [`LoadedManifest::hub_problems`] first.
            return match &h.resolved {
                Ok(r) => r.path.clone(),
                Err(_) => h.name.repo_dir(&crate::hub::cache_dir()).join("snapshots").join(h.name.revision()).join(h.name.path.as_deref().unwrap_or("")),
            };
        }
        resolve_path_with(&self.path, self.origin(key), p)
    }

    /// For a file of a Hub snapshot (`path` at or under one), what to run to fetch what is missing.
    pub fn pull_note(&self, path: &Path) -> Option<String> {
        let h = self.hub.values().find(|h| h.resolved.as_ref().is_ok_and(|r| path.starts_with(&r.snapshot)))?;
        Some(format!("`{}` is in the Hugging Face cache's snapshot of `{}`: fetch what it lacks with `runner pull {}`", path.display(), h.name, self.path.display()))
    }

    /// Hub sources the cache cannot serve, as one message naming each and what to run.
    pub fn hub_problems(&self) -> Option<String> {
        let problems: Vec<String> = self.hub.iter().filter_map(|(k, h)| h.resolved.as_ref().err().map(|e| format!("`{k}`: {e}"))).collect();
        if problems.is_empty() {
            return None;
        }
        let pull = self.hub.values().any(|h| h.resolved.as_ref().is_err_and(crate::hub::HubError::needs_pull));
        let mut msg = problems.join("; ");
        if pull {
            msg.push_str(&format!(" (runner never downloads while it plans or runs: fetch the files with `runner pull {}`)", self.path.display()));
        }
        Some(msg)
    }

    /// The pipeline folder, resolved.
    pub fn pipeline_source(&self) -> PathBuf {
        self.resolve_path("pipeline.source", &self.manifest.pipeline.source)
    }

    /// Every effective leaf value with its origin, for `runner config`: values as written where
    /// a layer set them, typed defaults (origin `default`) where none did.
    pub fn provenance_table(&self) -> Vec<(String, String, String)> {
        fn walk(prefix: &mut Vec<String>, v: &serde_json::Value, out: &mut Vec<(Vec<String>, serde_json::Value)>) {
            match v {
                serde_json::Value::Object(o) => {
                    for (k, child) in o {
                        prefix.push(k.clone());
                        walk(prefix, child, out);
                        prefix.pop();
                    }
                }
                leaf => out.push((prefix.clone(), leaf.clone())),
            }
        }
        let typed = serde_json::to_value(&self.manifest).expect("manifest serializes");
        let mut leaves = vec![];
        walk(&mut vec![], &typed, &mut leaves);
        let mut rows: Vec<_> = leaves
            .into_iter()
            .map(|(path, typed_value)| {
                let key = join_key(&path);
                match self.provenance.find(&path) {
                    (Some(v), depth) if depth == path.len() => {
                        let origin = Diagnostic::error("", self.provenance.locate(&path, Want::Value)).origin();
                        (key, render_value(v), origin)
                    }
                    _ => (key, typed_value.to_string(), "default".to_string()),
                }
            })
            .collect();
        rows.sort();
        rows
    }
}

/// A merged value as TOML would write it.
fn render_value(v: &Value) -> String {
    match v {
        Value::String(_, s) => format!("{s:?}"),
        Value::Char(_, c) => format!("{:?}", c.to_string()),
        Value::Bool(_, b) => b.to_string(),
        Value::Array(_, a) => format!("[{}]", a.iter().map(render_value).collect::<Vec<_>>().join(", ")),
        Value::Dict(..) => "{...}".to_string(),
        Value::Empty(..) => String::new(),
        Value::Num(..) => match (v.to_i128(), v.to_f64()) {
            (Some(i), _) => i.to_string(),
            (None, Some(f)) => format!("{f:?}"),
            (None, None) => format!("{v:?}"),
        },
    }
}

pub(crate) fn resolve_path_with(manifest: &Path, origin: Option<Origin>, p: &Path) -> PathBuf {
    if p.is_absolute() {
        return normalize(p);
    }
    match origin {
        Some(Origin::Env(_)) | Some(Origin::Cli(_)) => normalize(p),
        _ => normalize(&manifest.parent().map(|d| d.join(p)).unwrap_or_else(|| p.to_path_buf())),
    }
}

/// Removes `.` and folds `dir/..` lexically (`manifests/../models` -> `models`), keeping
/// leading `..`; symlinks are not resolved, as in cargo's config paths.
pub fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out: Vec<Component> = vec![];
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.last() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir) | Some(Component::Prefix(_)) => {}
                _ => out.push(c),
            },
            other => out.push(other),
        }
    }
    if out.is_empty() {
        PathBuf::from(".")
    } else {
        out.iter().collect()
    }
}

/// Splits a dotted key (`components.text_encoder_2.dtype`).
pub fn split_key(key: &str) -> Vec<String> {
    key.split('.').map(str::to_string).collect()
}

/// Joins key segments for messages, quoting segments that need it (`placement.max_memory."cuda:0"`).
pub fn join_key(path: &[String]) -> String {
    path.iter().map(|s| if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') { s.clone() } else { format!("{s:?}") }).collect::<Vec<_>>().join(".")
}

/// Reads, merges, and validates a manifest. On failure, returns every diagnostic (errors and
/// warnings), sorted by location.
pub fn load(path: &Path, overrides: &Overrides) -> Result<LoadedManifest, Vec<Diagnostic>> {
    load_source(path, Arc::new(read_source(path)?), overrides, None)
}

/// [`load`]; with `locked`, Hub names resolve to the commits `MANIFEST.lock` pins.
pub fn load_locked(path: &Path, overrides: &Overrides, locked: bool) -> Result<LoadedManifest, Vec<Diagnostic>> {
    if !locked {
        return load(path, overrides);
    }
    let pins = crate::lock::hub_pins(path).map_err(|e| vec![Diagnostic::error(format!("--locked: {e}"), Location::Path(crate::lock::lock_path(path)))])?;
    load(path, &Overrides { pins, ..overrides.clone() })
}

/// [`load`] of the text `m` was read from, with other `overrides`: what a batch line or a
/// served request layers over the manifest the process started with (an edit of the file
/// meanwhile changes nothing of a loaded pipeline's requests).
pub fn relayer(m: &LoadedManifest, overrides: &Overrides) -> Result<LoadedManifest, Vec<Diagnostic>> {
    if overrides.pins.is_empty() && !m.pins.is_empty() {
        // A line or request of a `--locked` run reads the commits the run was pinned to.
        return load_source(&m.path, m.source.clone(), &Overrides { pins: m.pins.clone(), ..overrides.clone() }, Some(m));
    }
    load_source(&m.path, m.source.clone(), overrides, Some(m))
}

/// `base`: the manifest a line or request is layered over; its Hub sources' resolutions are kept
/// where the layered manifest names the same (the loaded pipeline's snapshot, no cache walk per
/// request).
fn load_source(path: &Path, source: Arc<SourceText>, overrides: &Overrides, base: Option<&LoadedManifest>) -> Result<LoadedManifest, Vec<Diagnostic>> {
    let doc = match toml_edit::ImDocument::parse(source.text.clone()) {
        Ok(doc) => doc,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let message = e.message().trim_end().replace('\n', "; ");
            let d = Diagnostic::error(format!("invalid TOML in `{}`: {message}", source.path.display()), Location::File { source: source.clone(), span })
                .with_label(e.message().lines().next().unwrap_or("here").to_string());
            return Err(vec![d]);
        }
    };

    let (figment, mut diags) = layers::merge(path, &source.text, overrides);
    tracing::debug!(manifest = %path.display(), env = overrides.env.len(), sets = overrides.sets.len(), "merging manifest layers");
    let root = match figment::Provider::data(&figment) {
        Ok(mut map) => map.remove(&figment::Profile::Default).unwrap_or_default(),
        Err(e) => {
            diags.push(Diagnostic::error(format!("cannot merge `{}`: {e}", source.path.display()), Location::Path(path.to_path_buf())));
            return Err(diags);
        }
    };
    let provenance = Provenance { figment, root, doc, source: source.clone() };

    // Structure and value ranges, against the committed JSON schema.
    let (json, non_finite) = to_json(&provenance.root);
    for p in non_finite {
        let key = join_key(&p);
        diags.push(Diagnostic::error(format!("`{key}` must be a finite number"), provenance.locate(&p, Want::Value)).with_key(key).with_label("not a finite number"));
    }
    diags.extend(schema::validate(&json, &provenance));
    diags.extend(check::check(&json, path, &provenance));

    // Typed values, then what the schema cannot express.
    let manifest = if diags.iter().any(Diagnostic::is_error) {
        None
    } else {
        match provenance.figment.extract::<Manifest>() {
            Ok(m) => Some(m),
            Err(errors) => {
                for e in errors {
                    diags.push(figment_diagnostic(&provenance, e));
                }
                None
            }
        }
    };
    diags.sort_by_key(Diagnostic::sort_key);
    tracing::debug!(
        manifest = %path.display(),
        errors = diags.iter().filter(|d| d.is_error()).count(),
        warnings = diags.iter().filter(|d| !d.is_error()).count(),
        "validated"
    );
    match manifest {
        Some(manifest) if !diags.iter().any(Diagnostic::is_error) => {
            let known = base.filter(|b| b.pins == overrides.pins).map(|b| &b.hub);
            let hub = hub_sources(&manifest, &overrides.pins, known);
            Ok(LoadedManifest { manifest, path: path.to_path_buf(), source, warnings: diags, hub, pins: overrides.pins.clone(), provenance })
        }
        _ => Err(diags),
    }
}

/// Every `hf://` source of the manifest by key, resolved in the cache (never the network).
fn hub_sources(m: &Manifest, pins: &crate::hub::Pins, known: Option<&std::collections::BTreeMap<String, HubSource>>) -> std::collections::BTreeMap<String, HubSource> {
    let cache = crate::hub::cache_dir();
    let mut keys: Vec<(String, &Path)> = vec![("pipeline.source".into(), &m.pipeline.source)];
    keys.extend(m.components.iter().filter_map(|(n, c)| c.source.as_deref().map(|s| (format!("components.{n}.source"), s))));
    keys.extend(m.adapters.iter().map(|(n, a)| (format!("adapters.{n}.source"), a.source.as_path())));
    keys.into_iter()
        .filter_map(|(k, p)| {
            let name = crate::hub::HubName::parse(p.to_str()?).ok()?;
            if let Some(h) = known.and_then(|known| known.get(&k)).filter(|h| h.name == name) {
                return Some((k, h.clone()));
            }
            let resolved = crate::hub::resolve(&cache, &name, pins);
            Some((k, HubSource { name, resolved }))
        })
        .collect()
}

/// The largest manifest runner reads.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

fn read_source(path: &Path) -> Result<SourceText, Vec<Diagnostic>> {
    let fail = |msg: String| vec![Diagnostic::error(msg, Location::Path(path.to_path_buf()))];
    if path.is_dir() {
        return Err(fail(format!("`{}` is a directory, not a manifest file", path.display())));
    }
    // A manifest is kilobytes: read at most a little more than the cap, from a regular file or,
    // by intent, a FIFO or stdin (`/dev/stdin`, `<(...)`); never a device such as /dev/urandom.
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read manifest `{}`: {e}", path.display())))?;
    let t = meta.file_type();
    let stdin = path == Path::new("/dev/stdin") || path == Path::new("-");
    if !(t.is_file() || t.is_fifo() || (stdin && t.is_char_device())) {
        return Err(fail(format!("`{}` is not a regular file (a device or socket): manifests are read from files, FIFOs or /dev/stdin", path.display())));
    }
    let mut bytes = vec![];
    let file = std::fs::File::open(path).map_err(|e| fail(format!("cannot read manifest `{}`: {e}", path.display())))?;
    file.take(MAX_MANIFEST_BYTES + 1).read_to_end(&mut bytes).map_err(|e| fail(format!("cannot read manifest `{}`: {e}", path.display())))?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(fail(format!("`{}` is larger than {} MiB: a manifest is a few kilobytes of TOML (is it the right file?)", path.display(), MAX_MANIFEST_BYTES >> 20)));
    }
    match String::from_utf8(bytes) {
        Ok(text) => Ok(SourceText { path: path.to_path_buf(), text }),
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            let bad_len = e.utf8_error().error_len().unwrap_or(1);
            let text = String::from_utf8_lossy(e.as_bytes()).into_owned();
            // In the lossy text the first bad sequence is one U+FFFD (3 bytes) at the same offset.
            let source = Arc::new(SourceText { path: path.to_path_buf(), text });
            let d = Diagnostic::error(format!("`{}` is not valid UTF-8 (TOML files must be UTF-8)", path.display()), Location::File { source, span: at..at + 3 })
                .with_label(format!("invalid byte sequence ({bad_len} byte{})", if bad_len == 1 { "" } else { "s" }));
            Err(vec![d])
        }
    }
}

/// Converts figment's merged value to JSON for the schema validator, collecting the paths of
/// non-finite floats (TOML has `nan` and `inf`; JSON has neither).
fn to_json(root: &Dict) -> (serde_json::Value, Vec<Vec<String>>) {
    fn conv(v: &Value, path: &mut Vec<String>, bad: &mut Vec<Vec<String>>) -> serde_json::Value {
        use serde_json::Value as J;
        match v {
            Value::String(_, s) => J::String(s.clone()),
            Value::Char(_, c) => J::String(c.to_string()),
            Value::Bool(_, b) => J::Bool(*b),
            Value::Empty(..) => J::Null,
            Value::Num(..) => {
                if let Some(u) = v.to_u128() {
                    u64::try_from(u).map(J::from).unwrap_or_else(|_| J::from(u as f64))
                } else if let Some(i) = v.to_i128() {
                    i64::try_from(i).map(J::from).unwrap_or_else(|_| J::from(i as f64))
                } else {
                    let f = v.to_f64().unwrap_or(f64::NAN);
                    match serde_json::Number::from_f64(f) {
                        Some(n) => J::Number(n),
                        None => {
                            bad.push(path.clone());
                            J::from(0.0)
                        }
                    }
                }
            }
            Value::Dict(_, d) => J::Object(
                d.iter()
                    .map(|(k, v)| {
                        path.push(k.clone());
                        let j = conv(v, path, bad);
                        path.pop();
                        (k.clone(), j)
                    })
                    .collect(),
            ),
            Value::Array(_, a) => J::Array(
                a.iter()
                    .enumerate()
                    .map(|(i, v)| {
                        path.push(i.to_string());
                        let j = conv(v, path, bad);
                        path.pop();
                        j
                    })
                    .collect(),
            ),
        }
    }
    let mut bad = vec![];
    let mut path = vec![];
    let json = serde_json::Value::Object(
        root.iter()
            .map(|(k, v)| {
                path.push(k.clone());
                let j = conv(v, &mut path, &mut bad);
                path.pop();
                (k.clone(), j)
            })
            .collect(),
    );
    (json, bad)
}

/// A typed-extraction error (after the schema passed), located through its figment path.
fn figment_diagnostic(p: &Provenance, e: figment::Error) -> Diagnostic {
    let path = e.path.clone();
    let key = join_key(&path);
    let msg = match &e.kind {
        figment::error::Kind::Message(m) => m.clone(),
        other => other.to_string(),
    };
    let message = if key.is_empty() { msg.clone() } else { format!("invalid value for `{key}`: {msg}") };
    Diagnostic::error(message, p.locate(&path, Want::Value)).with_key(key)
}

#[cfg(test)]
mod tests;
