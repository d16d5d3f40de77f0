//! A request body, checked: a JSON object of `[run]` keys layered over the manifest as
//! `runner run --prompts` layers a line, then held against `[serve]`'s limits.

use std::sync::Arc;

use base64::Engine as _;
use runner::exec::batch as b;
use runner::exec::latents::LatentsData;
use runner::manifest::{self, LoadedManifest, Overrides};

type Diag = runner::diag::Diagnostic;

/// What a request body asks for, checked: the layered manifest and the response format.
#[derive(Debug)]
pub struct Request {
    pub m: LoadedManifest,
    pub json: bool,
    /// `latents`, decoded and checked against the job's shape.
    pub latents: Option<Arc<LatentsData>>,
    /// `image` and `mask_image`, decoded.
    pub init: Option<Arc<runner::exec::InitImages>>,
}

/// A rejected request: a message and the field it is about.
#[derive(Debug, PartialEq)]
pub struct Rejected {
    pub message: String,
    pub field: Option<String>,
}

fn rejected(message: impl Into<String>, field: Option<&str>) -> Rejected {
    Rejected { message: message.into(), field: field.map(str::to_string) }
}

const LATENTS_NOT_DATA: &str = "`latents` must be a safetensors file's bytes in base64: requests carry data, not paths or file names on the server";

/// Whether a `latents` string that decodes as base64 reads as a file name: a safetensors file's
/// bytes (an 8-byte header length, then `{`) almost never encode like one, and the answer to one
/// names the mistake.
fn looks_like_path(s: &str) -> bool {
    s.starts_with(['/', '.', '~']) || s.ends_with(".safetensors") || s.len() < 16
}

/// Parses and checks a request body: a JSON object of `[run]` keys (`prompt` required) and
/// `response` (`"png"` or `"json"`), layered over the manifest as `runner run --prompts` layers
/// a line, then held against `[serve]`'s limits.
pub fn parse_request(
    body: &[u8],
    base: &LoadedManifest,
    loaded: (&runner::checkpoint::layout::PipelineFolder, &runner::preflight::Configs),
    overrides: &Overrides,
    limits: &manifest::Serve,
) -> Result<Request, Rejected> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| rejected(format!("not valid JSON: {e}"), None))?;
    let serde_json::Value::Object(mut obj) = value else {
        return Err(rejected("the body must be a JSON object of `[run]` keys (e.g. {\"prompt\": \"a cat\", \"seed\": 1})", None));
    };
    let json = match obj.remove("response") {
        None => false,
        Some(serde_json::Value::String(s)) if s == "png" => false,
        Some(serde_json::Value::String(s)) if s == "json" => true,
        Some(_) => return Err(rejected("`response` must be \"png\" or \"json\"", Some("response"))),
    };
    // Requests carry data, never a path on the server: `latents` is a safetensors file's bytes
    // in base64, checked here (after the layering, against the job's shape), not a file name.
    let latents = match obj.remove("latents") {
        None => None,
        Some(serde_json::Value::String(s)) => {
            let bytes = base64::engine::general_purpose::STANDARD.decode(s.trim()).map_err(|_| rejected(LATENTS_NOT_DATA, Some("latents")))?;
            // A path that happens to be base64 (`/etc`) is answered as one, not as data.
            Some((bytes, looks_like_path(&s)))
        }
        Some(_) => return Err(rejected(LATENTS_NOT_DATA, Some("latents"))),
    };
    // `image` and `mask_image` likewise: an image file's bytes in base64 (PNG, JPEG or WebP).
    let mut images: [Option<Vec<u8>>; 2] = [None, None];
    for (slot, field) in images.iter_mut().zip(["image", "mask_image"]) {
        let not_data = || rejected(format!("`{field}` must be an image file's bytes (PNG, JPEG or WebP) in base64: requests carry data, not paths or file names on the server"), Some(field));
        match obj.remove(field) {
            None => {}
            Some(serde_json::Value::String(s)) => {
                let bytes = base64::engine::general_purpose::STANDARD.decode(s.trim()).map_err(|_| not_data())?;
                if s.starts_with(['/', '.', '~']) || s.len() < 16 {
                    return Err(not_data());
                }
                *slot = Some(bytes);
            }
            Some(_) => return Err(not_data()),
        }
    }
    let probe = |i: usize, field: &str| -> Result<Option<(u32, u32)>, Rejected> {
        images[i].as_deref().map(|b| runner_core::image::probe(b, &format!("`{field}`")).map(|p| (p.width, p.height)).map_err(|e| rejected(e.to_string(), Some(field)))).transpose()
    };
    let (image_size, mask_size) = (probe(0, "image")?, probe(1, "mask_image")?);
    if let Some(k) = obj.keys().find(|k| !b::LINE_KEYS.contains(&k.as_str())) {
        let field = k.clone();
        let message = b::line_sets(&serde_json::json!({ &field: null }).to_string()).err().unwrap_or_else(|| format!("unknown key `{field}`"));
        return Err(rejected(message, Some(&field)));
    }
    if !obj.contains_key("prompt") {
        return Err(rejected("`prompt` is required", Some("prompt")));
    }
    let mut sets = vec![];
    for (k, v) in &obj {
        // One key at a time, so that an error names its field.
        let one = b::line_sets(&serde_json::json!({ k: v }).to_string()).map_err(|e| rejected(e, Some(k)))?;
        sets.extend(one);
    }
    let load = |sets: &[String]| {
        let mut o = overrides.clone();
        o.sets.extend(sets.iter().cloned());
        manifest::relayer(base, &o).map_err(|d| rejected_by(&d, &obj))
    };
    let mut m = load(&sets)?;
    if m.manifest.run.seed.is_none() {
        // A seed drawn for the request, so that the response (and the image's metadata) name it.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        sets.push(format!("run.seed={}", (t.as_nanos() as u64) % (1 << 53)));
        m = load(&sets)?;
    }
    if let (Some(allowed), Some(asked)) = (&limits.schedulers, obj.get("scheduler")) {
        if !m.manifest.pipeline.scheduler.is_some_and(|s| allowed.contains(&s)) {
            let names: Vec<String> = allowed.iter().map(|s| serde_json::to_value(s).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()).collect();
            return Err(rejected(format!("`scheduler` = {asked} is not one of this server's `serve.schedulers`: {}", names.join(", ")), Some("scheduler")));
        }
    }
    let spec = match image_size {
        Some(size) => runner::preflight::RunSpec::with_images(&m, loaded.1, Some(size), mask_size),
        None => runner::preflight::RunSpec::new(&m, loaded.1),
    };
    if let Some(over) = over_limit(&m, &spec, limits) {
        let field = match over.key {
            "pixels" => ["width", "height"].into_iter().find(|k| obj.contains_key(*k)),
            k => Some(k),
        };
        return Err(rejected(over.message(), field));
    }
    let run = &m.manifest.run;
    if !json && run.batch.unwrap_or(1) > 1 {
        return Err(rejected("a batch of more than one image needs `\"response\": \"json\"`", Some("batch")));
    }
    // What the configs say of the request (sizes, the scheduler against the kind), before it
    // waits in the queue.
    let d = runner::preflight::check_run(&m, loaded.0, loaded.1, &spec);
    if !d.is_empty() {
        return Err(rejected_by(&d, &obj));
    }
    let latents = match latents {
        None => None,
        Some((bytes, path)) => {
            let shape = spec.shape;
            let scale = loaded.1.vae_scale_factor();
            let want = [shape.batch, loaded.1.vae.latent_channels as u64, shape.height / scale, shape.width / scale];
            let checked = LatentsData::from_safetensors(&bytes, &want).map_err(|e| rejected(if path { LATENTS_NOT_DATA.to_string() } else { format!("`latents`: {e}") }, Some("latents")))?;
            Some(Arc::new(checked))
        }
    };
    let init = match &images {
        [Some(image), mask] => Some(Arc::new(
            runner::exec::InitImages::from_bytes(image, mask.as_deref()).map_err(|e| rejected(e.to_string(), Some(if e.to_string().starts_with("`mask_image`") { "mask_image" } else { "image" })))?,
        )),
        [None, Some(_)] => return Err(rejected("`mask_image` without `image`: inpainting repaints the masked part of an image", Some("mask_image"))),
        [None, None] => None,
    };
    Ok(Request { m, json, latents, init })
}

/// Diagnostics as a rejection: their errors' messages, and the request's field the first one is
/// about (its key without `run.` / `pipeline.`; a scheduler problem with no key: `scheduler` when
/// the request named one).
fn rejected_by(d: &[Diag], obj: &serde_json::Map<String, serde_json::Value>) -> Rejected {
    let errors: Vec<&Diag> = d.iter().filter(|d| d.is_error()).collect();
    let first = errors.first();
    let field = first.and_then(|d| d.key.as_deref()).map(|k| k.strip_prefix("run.").or_else(|| k.strip_prefix("pipeline.")).unwrap_or(k).to_string()).or_else(|| {
        let about_scheduler = first.is_some_and(|d| d.message.contains("scheduler"));
        (about_scheduler && obj.contains_key("scheduler")).then(|| "scheduler".to_string())
    });
    Rejected { message: errors.iter().map(|d| d.message.as_str()).collect::<Vec<_>>().join("; "), field }
}

/// A `[serve]` limit an effective value is over.
#[derive(Debug, PartialEq)]
pub struct Over {
    /// `steps`, `batch` or `pixels`.
    pub key: &'static str,
    /// The value, and where it came from when no layer set it.
    pub value: String,
    pub limit: String,
}

impl Over {
    pub fn message(&self) -> String {
        format!("{} is over this server's limit {}", self.value, self.limit)
    }
}

/// The first of `[serve]`'s limits that `m` is over, held against the values the job would run
/// with: the manifest's and the request's, else the pipeline's defaults (the kind's steps, the
/// model's size from its config, one image), so that leaving a key out never escapes a limit.
pub fn over_limit(m: &LoadedManifest, spec: &runner::preflight::RunSpec, limits: &manifest::Serve) -> Option<Over> {
    let run = &m.manifest.run;
    let kind = spec.kind;
    let shape = spec.shape;
    let default = |set: bool, what: &str| if set { String::new() } else { format!(" ({what})") };
    if let Some(max) = limits.max_steps {
        let steps = spec.steps;
        if steps > max {
            let why = default(run.steps.is_some(), &format!("the default of `{}`", serde_json::to_value(kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()));
            return Some(Over { key: "steps", value: format!("`steps` = {steps}{why}"), limit: format!("`serve.max_steps` = {max}") });
        }
    }
    if let Some(max) = limits.max_batch {
        if shape.batch > u64::from(max) {
            return Some(Over { key: "batch", value: format!("`batch` = {}", shape.batch), limit: format!("`serve.max_batch` = {max}") });
        }
    }
    if let Some(max) = limits.max_pixels {
        let pixels = shape.width * shape.height;
        if pixels > max {
            let why = default(run.width.is_some() && run.height.is_some(), "with the model's default size from its config");
            return Some(Over { key: "pixels", value: format!("{}x{} = {pixels} pixels{why}", shape.width, shape.height), limit: format!("`serve.max_pixels` = {max}") });
        }
    }
    None
}
