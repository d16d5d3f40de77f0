//! `runner inspect`: what a pipeline folder, component folder, index or file holds, from
//! headers alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::layout::{read_config, read_model_index, resolve_source, variants_in, Checkpoint, PipelineFolder, VariantPolicy, WeightFiles};
use super::CheckpointError;
use crate::units::ByteSize;

#[derive(Debug, Serialize)]
pub struct Report {
    pub path: PathBuf,
    /// `pipeline`, `component`, `index` or `file`.
    pub kind: &'static str,
    pub class_name: Option<String>,
    pub diffusers_version: Option<String>,
    pub variant_requested: Option<String>,
    pub components: Vec<ComponentReport>,
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ComponentReport {
    pub name: String,
    pub library: Option<String>,
    pub class: Option<String>,
    pub weights: Option<WeightsReport>,
}

#[derive(Debug, Serialize)]
pub struct WeightsReport {
    pub files: Vec<PathBuf>,
    pub index: Option<PathBuf>,
    pub variant: Option<String>,
    pub variants_found: Vec<String>,
    pub tensors: usize,
    pub parameters: u64,
    pub stored_bytes: u64,
    pub bytes_by_dtype: BTreeMap<String, u64>,
    /// Exact bytes once loaded at each target dtype (floats cast, integers kept).
    pub bytes_at: BTreeMap<&'static str, u64>,
}

fn weights_report(c: &Checkpoint, dir: Option<&Path>) -> WeightsReport {
    let index = match &c.weights.files {
        WeightFiles::Sharded(i) => Some(i.path.clone()),
        WeightFiles::Single(_) | WeightFiles::Gguf(_) => None,
    };
    WeightsReport {
        files: c.files.iter().map(|(p, _)| p.clone()).collect(),
        index,
        variant: c.weights.variant.clone(),
        variants_found: dir.map(variants_in).unwrap_or_default(),
        tensors: c.tensor_count(),
        parameters: c.parameters(),
        stored_bytes: c.stored_bytes(),
        bytes_by_dtype: c.bytes_by_dtype(),
        bytes_at: BTreeMap::from([("fp32", c.bytes_at(4)), ("fp16", c.bytes_at(2)), ("bf16", c.bytes_at(2))]),
    }
}

/// Inspects `path`: a pipeline folder (has `model_index.json`), a component folder, a
/// `*.safetensors.index.json`, or one `.safetensors` file.
pub fn inspect(path: &Path, variant: Option<&str>) -> Result<Report, CheckpointError> {
    let is_pipeline = path.is_dir() && path.join("model_index.json").is_file();
    if is_pipeline {
        let p = PipelineFolder::open(path, variant)?;
        // Opening reads no model config (run and validate parse them strictly in preflight), so
        // a broken one would pass unseen: check each, as the component-folder case does.
        for c in &p.components {
            let config = c.dir.join("config.json");
            if config.is_file() {
                read_config(&config)?;
            }
        }
        let components = p
            .components
            .iter()
            .map(|c| ComponentReport {
                name: c.name.clone(),
                library: Some(c.library.clone()),
                class: Some(c.class.clone()),
                weights: c.checkpoint.as_ref().map(|ck| weights_report(ck, Some(&c.dir))),
            })
            .collect();
        return Ok(Report {
            path: path.to_path_buf(),
            kind: "pipeline",
            class_name: p.index.class_name.clone(),
            diffusers_version: p.index.diffusers_version.clone(),
            variant_requested: variant.map(str::to_string),
            components,
            notes: p.notes,
        });
    }
    if path.is_dir() && std::fs::read_dir(path).map(|mut d| d.next().is_none()).unwrap_or(false) {
        return Err(CheckpointError::format(path, "the folder is empty"));
    }
    if path.is_dir() && !path.join("config.json").is_file() {
        // Neither a pipeline nor a component folder: say what is missing.
        read_model_index(path)?;
    }
    let w = resolve_source(path, None, variant, VariantPolicy::Require)?;
    let kind = match (&w.files, path.is_dir()) {
        (_, true) => "component",
        (WeightFiles::Sharded(_), false) => "index",
        (WeightFiles::Single(_) | WeightFiles::Gguf(_), false) => "file",
    };
    let c = Checkpoint::open(w)?;
    // A config without `_class_name` (nor transformers' `architectures`) leaves the class empty;
    // a broken one is an error, not an empty class.
    let class = if path.is_dir() {
        let v = read_config(&path.join("config.json"))?;
        v.get("_class_name").or_else(|| v.get("architectures").and_then(|a| a.get(0))).and_then(|s| s.as_str()).map(str::to_string)
    } else {
        None
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(Report {
        path: path.to_path_buf(),
        kind,
        class_name: None,
        diffusers_version: None,
        variant_requested: variant.map(str::to_string),
        notes: c.weights.notes.clone(),
        components: vec![ComponentReport { name, library: None, class, weights: Some(weights_report(&c, path.is_dir().then_some(path))) }],
    })
}

fn file_summary(w: &WeightsReport) -> String {
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match &w.index {
        Some(i) => format!("{} ({} shards)", name(i), w.files.len()),
        None => w.files.first().map(|f| name(f)).unwrap_or_default(),
    }
}

/// A table for people.
pub fn render_table(r: &Report) -> String {
    let mut out = String::new();
    let title = match (&r.class_name, &r.diffusers_version) {
        (Some(c), Some(v)) => format!(" ({c}, diffusers {v})"),
        (Some(c), None) => format!(" ({c})"),
        _ => String::new(),
    };
    out.push_str(&format!("{} {}{title}\n", r.kind, r.path.display()));
    if let Some(v) = &r.variant_requested {
        out.push_str(&format!("variant requested: {v}\n"));
    }
    let header = ["component", "class", "weights", "variant", "tensors", "params", "stored", "fp32", "fp16/bf16"];
    let mut rows: Vec<Vec<String>> = vec![];
    for c in &r.components {
        let class = c.class.clone().unwrap_or_default();
        match &c.weights {
            None => rows.push(vec![c.name.clone(), class, "(no weights)".into(), String::new(), String::new(), String::new(), String::new(), String::new(), String::new()]),
            Some(w) => {
                let dtypes = w.bytes_by_dtype.keys().cloned().collect::<Vec<_>>().join("+");
                rows.push(vec![
                    c.name.clone(),
                    class,
                    file_summary(w),
                    w.variant.clone().unwrap_or_else(|| "-".into()),
                    w.tensors.to_string(),
                    w.parameters.to_string(),
                    format!("{} {dtypes}", ByteSize(w.stored_bytes)),
                    ByteSize(w.bytes_at["fp32"]).to_string(),
                    ByteSize(w.bytes_at["fp16"]).to_string(),
                ]);
            }
        }
    }
    let widths: Vec<usize> = (0..header.len()).map(|i| rows.iter().map(|r| r[i].chars().count()).chain([header[i].len()]).max().unwrap_or(0)).collect();
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let right = i >= 4;
            if right {
                s.push_str(&format!("{c:>w$}  ", w = widths[i]));
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    out.push_str(&line(header.iter().map(|s| s.to_string()).collect()));
    for r in rows {
        out.push_str(&line(r));
    }
    let weights: Vec<&WeightsReport> = r.components.iter().filter_map(|c| c.weights.as_ref()).collect();
    if weights.len() > 1 {
        let sum = |k: &str| weights.iter().map(|w| w.bytes_at[k]).sum::<u64>();
        out.push_str(&format!("total at fp32: {}, at fp16/bf16: {}\n", ByteSize(sum("fp32")), ByteSize(sum("fp16"))));
    }
    let found: Vec<String> = r.components.iter().filter_map(|c| c.weights.as_ref()).flat_map(|w| w.variants_found.clone()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    if !found.is_empty() {
        out.push_str(&format!("variants found: {}\n", found.join(", ")));
    }
    for n in &r.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out
}
