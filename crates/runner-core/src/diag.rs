//! Diagnostics that point at where a value came from: a span in a manifest file, an environment
//! variable or a `--set` flag. Rendered for people (codespan-style snippets) or as JSON.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use codespan_reporting::diagnostic::{Diagnostic as CsDiagnostic, Label, Severity as CsSeverity};
use codespan_reporting::files::SimpleFile;
use codespan_reporting::term::{self, termcolor::WriteColor};
use serde::Serialize;

/// The text of a file that diagnostics point into.
#[derive(Debug)]
pub struct SourceText {
    pub path: PathBuf,
    pub text: String,
}

impl SourceText {
    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..floor_char_boundary(&self.text, offset)];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Where a diagnosed value came from.
#[derive(Debug, Clone)]
pub enum Location {
    /// A span of a manifest file.
    File { source: Arc<SourceText>, span: Range<usize> },
    /// A whole file (unreadable, a directory, ...).
    Path(PathBuf),
    /// An environment variable, e.g. `RUNNER_RUN__STEPS`.
    Env { var: String },
    /// A command-line flag, e.g. `--set run.steps=0`.
    Cli { arg: String },
    /// A built-in default.
    Default,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in a manifest (or its layers).
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub severity: Severity,
    pub message: String,
    /// The dotted key the problem is about (`run.steps`), when there is one.
    pub key: Option<String>,
    pub location: Location,
    /// Short text under the snippet's caret.
    pub label: Option<String>,
    /// `help:` lines.
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub fn error(message: impl Into<String>, location: Location) -> Self {
        Diagnostic { severity: Severity::Error, message: message.into(), key: None, location, label: None, notes: vec![] }
    }
    pub fn warning(message: impl Into<String>, location: Location) -> Self {
        Diagnostic { severity: Severity::Warning, ..Diagnostic::error(message, location) }
    }
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }
    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// `path:line:col` (or the env var / flag) this diagnostic points at.
    pub fn origin(&self) -> String {
        match &self.location {
            Location::File { source, span } => {
                let (l, c) = source.line_col(span.start);
                format!("{}:{l}:{c}", source.path.display())
            }
            Location::Path(p) => p.display().to_string(),
            Location::Env { var } => format!("environment variable `{var}`"),
            Location::Cli { arg } => format!("command line `{arg}`"),
            Location::Default => "built-in default".to_string(),
        }
    }

    /// Renders for people: a snippet for file spans, an origin line otherwise.
    pub fn render(&self, out: &mut dyn WriteColor) -> io::Result<()> {
        let severity = match self.severity {
            Severity::Error => CsSeverity::Error,
            Severity::Warning => CsSeverity::Warning,
        };
        let mut d = CsDiagnostic::new(severity).with_message(&self.message);
        let config = term::Config::default();
        match &self.location {
            Location::File { source, span } => {
                let file = SimpleFile::new(source.path.display().to_string(), source.text.as_str());
                let label = Label::primary((), span.clone()).with_message(self.label.clone().unwrap_or_default());
                d = d.with_labels(vec![label]).with_notes(self.notes.iter().map(|n| format!("help: {n}")).collect());
                term::emit(out, &config, &file, &d).map_err(io::Error::other)?;
            }
            other => {
                let mut notes = vec![];
                let origin = match other {
                    Location::Default => None,
                    _ => Some(self.origin()),
                };
                if let Some(o) = origin {
                    notes.push(match &self.label {
                        Some(l) => format!("in {o}: {l}"),
                        None => format!("in {o}"),
                    });
                }
                notes.extend(self.notes.iter().map(|n| format!("help: {n}")));
                d = d.with_notes(notes);
                let file = SimpleFile::new("", "");
                term::emit(out, &config, &file, &d).map_err(io::Error::other)?;
            }
        }
        Ok(())
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "severity": self.severity,
            "message": self.message,
            "key": self.key,
            "notes": self.notes,
        });
        let o = v.as_object_mut().expect("object");
        match &self.location {
            Location::File { source, span } => {
                let (line, col) = source.line_col(span.start);
                let (end_line, end_col) = source.line_col(span.end);
                o.insert("source".into(), "file".into());
                o.insert("file".into(), source.path.display().to_string().into());
                o.insert("line".into(), line.into());
                o.insert("column".into(), col.into());
                o.insert("end_line".into(), end_line.into());
                o.insert("end_column".into(), end_col.into());
            }
            Location::Path(p) => {
                o.insert("source".into(), "file".into());
                o.insert("file".into(), p.display().to_string().into());
            }
            Location::Env { var } => {
                o.insert("source".into(), "env".into());
                o.insert("env".into(), var.clone().into());
            }
            Location::Cli { arg } => {
                o.insert("source".into(), "cli".into());
                o.insert("arg".into(), arg.clone().into());
            }
            Location::Default => {
                o.insert("source".into(), "default".into());
            }
        }
        if let Some(l) = &self.label {
            o.insert("label".into(), l.clone().into());
        }
        v
    }

    /// Sort key: errors in file order, then warnings; non-file origins after file ones.
    pub fn sort_key(&self) -> (Severity, u8, usize, String) {
        match &self.location {
            Location::File { span, .. } => (self.severity, 0, span.start, self.message.clone()),
            Location::Path(_) => (self.severity, 1, 0, self.message.clone()),
            Location::Env { var } => (self.severity, 2, 0, var.clone() + &self.message),
            Location::Cli { arg } => (self.severity, 3, 0, arg.clone() + &self.message),
            Location::Default => (self.severity, 4, 0, self.message.clone()),
        }
    }
}

/// Renders a list of diagnostics to a writer, e.g. stderr, with colour when asked.
pub fn render_all(diags: &[Diagnostic], out: &mut dyn WriteColor) -> io::Result<()> {
    for d in diags {
        d.render(out)?;
    }
    out.flush()
}

/// Renders diagnostics without colour, for tests and logs.
pub fn render_plain(diags: &[Diagnostic]) -> String {
    let mut buf = term::termcolor::NoColor::new(Vec::new());
    render_all(diags, &mut buf).expect("writing to memory");
    String::from_utf8_lossy(&buf.into_inner()).into_owned()
}

/// "did you mean" for a misspelt name, when one candidate is close.
pub fn did_you_mean<'a>(given: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let given_l = given.to_ascii_lowercase();
    candidates.into_iter().map(|c| (strsim::jaro_winkler(&given_l, &c.to_ascii_lowercase()), c)).filter(|(score, _)| *score > 0.8).max_by(|a, b| a.0.total_cmp(&b.0)).map(|(_, c)| c)
}

/// A path for display relative to the current directory when it lies below it.
pub fn display_path(p: &Path) -> String {
    match std::env::current_dir().ok().and_then(|cwd| p.strip_prefix(cwd).ok().map(Path::to_path_buf)) {
        Some(rel) if !rel.as_os_str().is_empty() => rel.display().to_string(),
        _ => p.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_chars() {
        let s = SourceText { path: "m.toml".into(), text: "a = 1\nbé = \"x\"\n".into() };
        assert_eq!(s.line_col(0), (1, 1));
        assert_eq!(s.line_col(6), (2, 1));
        assert_eq!(s.line_col(10), (2, 4)); // 'é' is two bytes, one column
    }

    #[test]
    fn suggestions() {
        assert_eq!(did_you_mean("stpes", ["steps", "seed", "prompt"]), Some("steps"));
        assert_eq!(did_you_mean("zzz", ["steps", "seed"]), None);
    }
}
