//! `runner run --prompts FILE.jsonl`: the pieces of a batch that need no pipeline. Each
//! non-empty line of the file is a JSON object of `[run]` keys, layered over the manifest the way
//! `--set run.KEY=VALUE` flags are (so a line's image is the image of `runner run` with the same
//! flags, metadata included); output names come from a template.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The keys a line may set: `[run]`'s, and `scheduler` (`pipeline.scheduler`: built per call
/// from the folder's config, as diffusers' `Scheduler.from_config`, so it may change on a loaded
/// pipeline). `output` comes from the template and `threads` is the process's; the other keys
/// outside `[run]` (dtype, placement) belong to the loaded pipeline.
pub const LINE_KEYS: &[&str] = &[
    "scheduler",
    "prompt",
    "negative_prompt",
    "prompt_2",
    "negative_prompt_2",
    "prompt_3",
    "negative_prompt_3",
    "max_sequence_length",
    "steps",
    "guidance_scale",
    "true_cfg_scale",
    "seed",
    "width",
    "height",
    "batch",
    "clip_skip",
    "latents",
    "image",
    "strength",
    "mask_image",
    "adapter_scales",
    "original_size",
    "crops_coords_top_left",
    "target_size",
];

/// One line of the prompts file.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// 0-based, among the file's non-empty lines.
    pub index: usize,
    /// 1-based line number in the file.
    pub line: usize,
    /// The line's keys as `--set` arguments (`run.steps=20`), in the line's order; or why the
    /// line is not a valid one.
    pub sets: Result<Vec<String>, String>,
}

/// The largest prompts file and line read: a million prompts of a few hundred bytes fit; a
/// device such as `/dev/zero` (no newline, no end) is refused at the cap, not read until the
/// OOM killer comes.
pub const MAX_PROMPTS_BYTES: u64 = 256 << 20;
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Reads the prompts file (a regular file, a FIFO or /dev/stdin; at most [`MAX_PROMPTS_BYTES`],
/// lines of at most [`MAX_LINE_BYTES`]): every non-empty line, parsed (a bad line is that line's
/// error).
pub fn read_lines(path: &Path) -> std::io::Result<Vec<Line>> {
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;
    let t = std::fs::metadata(path)?.file_type();
    let stdin = path == Path::new("/dev/stdin");
    if !(t.is_file() || t.is_fifo() || (stdin && t.is_char_device())) {
        return Err(std::io::Error::other("not a regular file (a device, folder or socket): prompts are read from files, FIFOs or /dev/stdin"));
    }
    let mut bytes = vec![];
    std::fs::File::open(path)?.take(MAX_PROMPTS_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_PROMPTS_BYTES {
        return Err(std::io::Error::other(format!("larger than {} MiB: split it, or run shards of it (`--shard K/N`)", MAX_PROMPTS_BYTES >> 20)));
    }
    let text = String::from_utf8(bytes).map_err(|e| std::io::Error::other(format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to())))?;
    if let Some((n, _)) = text.lines().enumerate().find(|(_, l)| l.len() > MAX_LINE_BYTES) {
        return Err(std::io::Error::other(format!("line {} is longer than {} MiB: one JSON object of `[run]` keys a line", n + 1, MAX_LINE_BYTES >> 20)));
    }
    let mut lines = parse_lines(&text);
    // Image paths in a line are relative to the prompts file.
    if let Some(dir) = path.parent().filter(|_| !stdin) {
        for l in &mut lines {
            if let Ok(sets) = &mut l.sets {
                for s in sets.iter_mut() {
                    *s = rebase_path(s, dir);
                }
            }
        }
    }
    Ok(lines)
}

/// `run.image="x.png"` (or `run.mask_image`) with a relative path made relative to `dir`.
fn rebase_path(set: &str, dir: &Path) -> String {
    for key in ["run.image=", "run.mask_image="] {
        if let Some(v) = set.strip_prefix(key) {
            if let Ok(toml::Value::String(p)) = format!("v = {v}").parse::<toml::Table>().map(|mut t| t.remove("v").unwrap_or(toml::Value::Boolean(false))) {
                if Path::new(&p).is_relative() {
                    return format!("{key}{}", toml::Value::String(dir.join(p).to_string_lossy().into_owned()));
                }
            }
        }
    }
    set.to_string()
}

/// The non-empty lines of a JSON-lines text, each parsed into `--set` arguments.
pub fn parse_lines(text: &str) -> Vec<Line> {
    text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).enumerate().map(|(index, (n, l))| Line { index, line: n + 1, sets: line_sets(l) }).collect()
}

/// One line (a JSON object of `[run]` keys) as `--set run.KEY=VALUE` arguments whose values are
/// TOML literals, so that the manifest's layering, schema and checks see them as they see flags.
pub fn line_sets(text: &str) -> Result<Vec<String>, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let serde_json::Value::Object(obj) = value else {
        return Err(format!("must be a JSON object of `[run]` keys (e.g. {{\"prompt\": \"a cat\", \"seed\": 1}}), not {}", json_kind(&value)));
    };
    let mut sets = vec![];
    for (k, v) in &obj {
        if !LINE_KEYS.contains(&k.as_str()) {
            let mut msg = format!("unknown key `{k}`");
            match k.as_str() {
                "output" => msg.push_str(": output names come from the template (`--out`)"),
                "threads" => msg.push_str(": `run.threads` is the process's (set it in the manifest or with `--set`)"),
                "dtype" | "variant" | "kind" | "source" => {
                    msg.push_str(&format!(": `{k}` belongs to `[pipeline]`, fixed for the loaded pipeline (run another manifest or `--set pipeline.{k}=...` for the whole batch)"))
                }
                _ => {
                    if let Some(s) = crate::diag::did_you_mean(k, LINE_KEYS.iter().copied()) {
                        msg.push_str(&format!(" (did you mean `{s}`?)"));
                    }
                    msg.push_str(&format!("; a line takes `[run]` keys: {}", LINE_KEYS.join(", ")));
                }
            }
            return Err(msg);
        }
        if v.is_null() {
            return Err(format!("`{k}` is null: leave the key out for the manifest's value"));
        }
        let table = if k == "scheduler" { "pipeline" } else { "run" };
        // TOML's integers are 64-bit signed: a larger JSON integer (a u64 seed) goes as its
        // digits, which `--set` takes as that number.
        if let Some(n) = v.as_u64().filter(|&n| n > i64::MAX as u64) {
            sets.push(format!("{table}.{k}={n}"));
            continue;
        }
        let t = toml::Value::try_from(v).map_err(|e| format!("`{k}`: {e}"))?;
        sets.push(format!("{table}.{k}={t}"));
    }
    Ok(sets)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// An output name template: text with `{index}`, `{line}`, `{seed}` and `{name}` placeholders
/// (`{index:04}`, `{line:04}`, `{seed:08}`: zero-padded to that width); `{{` and `}}` are braces.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Field { name: Field, width: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Index,
    Line,
    Seed,
    Name,
}

/// The placeholders a template knows.
pub const PLACEHOLDERS: &[&str] = &["index", "line", "seed", "name"];

/// What a template's placeholders stand for, for one line.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    pub index: usize,
    pub line: usize,
    pub seed: u64,
    pub name: &'a str,
}

impl Template {
    pub fn parse(t: &str) -> Result<Template, String> {
        let mut parts = vec![];
        let mut text = String::new();
        let mut chars = t.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '}' => return Err(format!("the output template `{t}` has an unmatched `}}` (write `}}}}` for a brace)")),
                '{' => {
                    let mut inner = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => inner.push(c),
                            None => return Err(format!("the output template `{t}` has an unclosed `{{` (write `{{{{` for a brace)")),
                        }
                    }
                    let (name, spec) = inner.split_once(':').unwrap_or((&inner, ""));
                    let field = match name {
                        "index" => Field::Index,
                        "line" => Field::Line,
                        "seed" => Field::Seed,
                        "name" => Field::Name,
                        _ => {
                            let mut msg = format!("the output template `{t}` has an unknown placeholder `{{{name}}}`");
                            if let Some(s) = crate::diag::did_you_mean(name, PLACEHOLDERS.iter().copied()) {
                                msg.push_str(&format!(" (did you mean `{{{s}}}`?)"));
                            }
                            msg.push_str(
                                "; placeholders: {index} (0-based, among non-empty lines), {line} (line number), {seed}, {name} (the manifest's name), with an optional zero-padded width: {index:04}",
                            );
                            return Err(msg);
                        }
                    };
                    let width = if spec.is_empty() {
                        0
                    } else {
                        match spec.strip_prefix('0').and_then(|w| w.parse::<usize>().ok()) {
                            Some(w) if field != Field::Name && w <= 64 => w,
                            _ => return Err(format!("the output template `{t}`: `{{{inner}}}` has an unknown format (`{{{name}:0N}}` pads a number with zeros to N digits)")),
                        }
                    };
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Field { name: field, width });
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Template { parts })
    }

    /// Whether every line gets its own name (the template has `{index}` or `{line}`).
    pub fn numbers_lines(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Field { name: Field::Index | Field::Line, .. }))
    }

    pub fn expand(&self, f: &Fields) -> PathBuf {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Field { name: Field::Name, .. } => out.push_str(&file_safe(f.name)),
                Part::Field { name, width } => {
                    let n = match name {
                        Field::Index => f.index as u64,
                        Field::Line => f.line as u64,
                        _ => f.seed,
                    };
                    out.push_str(&format!("{n:0width$}"));
                }
            }
        }
        PathBuf::from(out)
    }
}

/// The default template: `<output stem>-{index:04}.png` beside the manifest's output.
pub fn default_template(output: &Path) -> String {
    let stem = output.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let name = format!("{}-{{index:04}}.png", stem.replace('{', "{{").replace('}', "}}"));
    output.with_file_name(name).to_string_lossy().into_owned()
}

/// `--shard K/N`: this process's share of a batch, the lines whose index (0-based among the
/// non-empty lines, the template's `{index}`) modulo N is K. N processes with 0/N ... N-1/N
/// generate every line once between them (a Kubernetes Indexed Job: `--shard
/// $(JOB_COMPLETION_INDEX)/N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// K: 0-based, below `count`.
    pub index: usize,
    /// N: at least 1.
    pub count: usize,
}

impl Shard {
    /// Whether the line of this index is this shard's.
    pub fn contains(&self, line_index: usize) -> bool {
        line_index % self.count == self.index
    }
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Shard, String> {
        // Clap names the value; these say what is wrong with it.
        let usage = "expected K/N, the K-th of N shards, 0-based (0/4, 1/4, 2/4, 3/4)";
        let (k, n) = s.split_once('/').ok_or(usage)?;
        let number = |x: &str| x.bytes().all(|b| b.is_ascii_digit()).then(|| x.parse::<usize>().ok()).flatten();
        let (Some(index), Some(count)) = (number(k), number(n)) else {
            return Err(usage.into());
        };
        if count == 0 {
            return Err("the number of shards N must be at least 1".into());
        }
        if index >= count {
            return Err(format!("the shard K must be below N (shards are 0-based: 0/{count} ... {}/{count})", count - 1));
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Duplicates among `paths` (two lines that would write one file).
pub fn duplicates(paths: impl IntoIterator<Item = PathBuf>) -> Vec<PathBuf> {
    let mut seen = BTreeSet::new();
    let mut dup = BTreeSet::new();
    for p in paths {
        let p = crate::manifest::normalize(&p);
        if !seen.insert(p.clone()) {
            dup.insert(p);
        }
    }
    dup.into_iter().collect()
}

/// A name made safe for a file name (no separators, no spaces).
pub fn file_safe(name: &str) -> String {
    name.replace(['/', '\\', ' '], "-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_keys_are_the_run_keys_but_output_and_threads_and_the_scheduler() {
        let all = crate::manifest::Run {
            prompt: Some(String::new()),
            negative_prompt: Some(String::new()),
            prompt_2: Some(String::new()),
            negative_prompt_2: Some(String::new()),
            prompt_3: Some(String::new()),
            negative_prompt_3: Some(String::new()),
            max_sequence_length: Some(1),
            steps: Some(1),
            guidance_scale: Some(1.0),
            true_cfg_scale: Some(1.0),
            seed: Some(1),
            width: Some(8),
            height: Some(8),
            batch: Some(1),
            clip_skip: Some(1),
            latents: Some("x".into()),
            image: Some("x".into()),
            strength: Some(0.5),
            mask_image: Some("x".into()),
            adapter_scales: Some(Default::default()),
            original_size: Some([8, 8]),
            crops_coords_top_left: Some([0, 0]),
            target_size: Some([8, 8]),
            output: Some("x".into()),
            threads: Some(1),
        };
        let json = serde_json::to_value(&all).unwrap();
        let mut keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).filter(|k| !["output", "threads"].contains(k)).collect();
        keys.push("scheduler");
        let mut ours = LINE_KEYS.to_vec();
        keys.sort();
        ours.sort();
        assert_eq!(keys, ours);
    }

    #[test]
    fn lines_become_set_flags() {
        assert_eq!(line_sets(r#"{"steps": 3, "guidance_scale": 7.5, "original_size": [64, 64]}"#).unwrap(), ["run.steps=3", "run.guidance_scale=7.5", "run.original_size=[64, 64]"]);
        // A table of live adapters' scales.
        assert_eq!(line_sets(r#"{"adapter_scales": {"pixel-art": 0.5}}"#).unwrap(), ["run.adapter_scales={ pixel-art = 0.5 }"]);
        // Strings come back as they were (as `--set` reads a TOML literal), whatever their
        // quotes, breaks and characters.
        for text in ["a \"cat\"", "it's", "back\\slash", "line\nbreak", "'''x'''\"\"\"", "caf\u{e9} \u{1f431}", "30", "true", ""] {
            let sets = line_sets(&serde_json::json!({ "prompt": text }).to_string()).unwrap();
            let value = sets[0].strip_prefix("run.prompt=").unwrap();
            let back: toml::Table = toml::from_str(&format!("v = {value}")).unwrap();
            assert_eq!(back["v"].as_str(), Some(text), "{value}");
        }
        for s in [r#"{"prompt": "x""#, "[1]", r#""x""#] {
            assert!(line_sets(s).is_err(), "{s}");
        }
        let e = line_sets(r#"{"promt": "x"}"#).unwrap_err();
        assert!(e.contains("unknown key `promt`") && e.contains("did you mean `prompt`"), "{e}");
        assert!(line_sets(r#"{"dtype": "fp16"}"#).unwrap_err().contains("`[pipeline]`"));
        assert_eq!(line_sets(r#"{"scheduler": "ddim", "steps": 3}"#).unwrap(), ["pipeline.scheduler=\"ddim\"", "run.steps=3"]);
        assert!(line_sets(r#"{"output": "x.png"}"#).unwrap_err().contains("template"));
        assert!(line_sets(r#"{"seed": null}"#).unwrap_err().contains("null"));
        let lines = parse_lines("{\"seed\": 1}\n\n  \n{\"seed\": 2}\nnope\n");
        assert_eq!(lines.iter().map(|l| (l.index, l.line, l.sets.is_ok())).collect::<Vec<_>>(), [(0, 1, true), (1, 4, true), (2, 5, false)]);
    }

    #[test]
    fn templates() {
        let t = Template::parse("out/{name}-{index:04}-{line}-{seed}{{x}}.png").unwrap();
        assert_eq!(t.expand(&Fields { index: 7, line: 9, seed: 42, name: "my job" }), PathBuf::from("out/my-job-0007-9-42{x}.png"));
        assert!(t.numbers_lines());
        assert!(!Template::parse("out/{seed}.png").unwrap().numbers_lines());
        let e = Template::parse("out/{indx}.png").unwrap_err();
        assert!(e.contains("unknown placeholder `{indx}`") && e.contains("did you mean `{index}`"), "{e}");
        for bad in ["{index", "x}", "{index:4}", "{name:04}", "{index:0x}"] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(default_template(Path::new("a/b.png")), "a/b-{index:04}.png");
    }

    #[test]
    fn shards() {
        let s: Shard = "1/3".parse().unwrap();
        assert_eq!(s, Shard { index: 1, count: 3 });
        assert_eq!(s.to_string(), "1/3");
        assert_eq!((0..8).filter(|&i| s.contains(i)).collect::<Vec<_>>(), [1, 4, 7]);
        // Every line in exactly one shard.
        let all: Vec<Shard> = (0..3).map(|k| format!("{k}/3").parse().unwrap()).collect();
        assert!((0..20).all(|i| all.iter().filter(|s| s.contains(i)).count() == 1));
        assert!("0/1".parse::<Shard>().unwrap().contains(5));
        for bad in ["3/3", "4/3", "0/0", "1", "", "/", "a/2", "1/b", "-1/2", "+1/2", " 1/2", "1/2/3", "1.0/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        assert!("3/3".parse::<Shard>().unwrap_err().contains("below N"));
        assert!("0/0".parse::<Shard>().unwrap_err().contains("at least 1"));
    }
}
