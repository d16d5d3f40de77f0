//! A request body, checked: a JSON object of `[run]` keys layered over the manifest as
//! `runner run --prompts` layers a line, then held against `[serve]`'s limits.

use runner::exec::batch as b;
use runner::manifest::{self, LoadedManifest, Overrides};

type Diag = runner::diag::Diagnostic;

/// What a request body asks for, checked: the layered manifest and the response format.
#[derive(Debug)]
pub struct Request {
    pub m: LoadedManifest,
    pub json: bool,
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
    let run = &m.manifest.run;
    if let (Some(max), Some(steps)) = (limits.max_steps, run.steps) {
        if steps > max {
            return Err(rejected(format!("`steps` = {steps} is over this server's limit `serve.max_steps` = {max}"), Some("steps")));
        }
    }
    if let (Some(max), Some(batch)) = (limits.max_batch, run.batch) {
        if batch > max {
            return Err(rejected(format!("`batch` = {batch} is over this server's limit `serve.max_batch` = {max}"), Some("batch")));
        }
    }
    if let (Some(max), Some(w), Some(h)) = (limits.max_pixels, run.width, run.height) {
        if w as u64 * h as u64 > max {
            return Err(rejected(
                format!("{w}x{h} = {} pixels is over this server's limit `serve.max_pixels` = {max}", w as u64 * h as u64),
                Some(if obj.contains_key("width") { "width" } else { "height" }),
            ));
        }
    }
    if !json && run.batch.unwrap_or(1) > 1 {
        return Err(rejected("a batch of more than one image needs `\"response\": \"json\"`", Some("batch")));
    }
    // What the configs say of the request (sizes, the scheduler against the kind), before it
    // waits in the queue.
    let d = runner::preflight::check_run(&m, loaded.0, loaded.1);
    if !d.is_empty() {
        return Err(rejected_by(&d, &obj));
    }
    Ok(Request { m, json })
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
