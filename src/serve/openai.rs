//! OpenAI's images API in front of the same queue: `POST /v1/images/generations` (what
//! `client.images.generate(...)` sends) and `GET /v1/models`. A request is translated into the
//! native body (`n` → `batch`, `size` → `width`/`height`) and checked by the same code, so its
//! images are `runner run`'s; refusals come in OpenAI's error shape
//! (`{"error": {"message", "type", "param", "code"}}`) with its status codes, which the `openai`
//! client maps to its exceptions (401 `AuthenticationError`, 429 `RateLimitError`, ...).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;

use super::jobs::Outcome;
use super::{enqueue_bytes, read_body, App, HangUp, Refusal};

/// How long a `response_format: "url"` image stays fetchable.
pub const URL_TTL: Duration = Duration::from_secs(3600);
/// The most images kept for URLs (the oldest go first).
pub const URL_KEEP: usize = 256;

/// OpenAI's parameters runner accepts and ignores (with an `X-Runner-Warning` header).
const IGNORED: &[&str] = &["quality", "style", "background", "moderation", "output_compression", "partial_images", "stream"];
/// runner's own request keys a client may add (extensions); `width`, `height` and `batch` come
/// from `size` and `n`.
const EXTENSIONS: &[&str] = &[
    "negative_prompt",
    "negative_prompt_2",
    "negative_prompt_3",
    "prompt_2",
    "prompt_3",
    "seed",
    "steps",
    "guidance_scale",
    "true_cfg_scale",
    "scheduler",
    "clip_skip",
    "adapter_scales",
    "max_sequence_length",
];

/// An answer in OpenAI's error shape.
pub fn error(status: StatusCode, message: impl Into<String>, param: Option<&str>, code: Option<&str>) -> Response {
    let kind = match status.as_u16() {
        401 | 403 => "invalid_request_error",
        429 => "requests",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    };
    let body = serde_json::json!({ "error": { "message": message.into(), "type": kind, "param": param, "code": code } });
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// A native refusal in OpenAI's shape: 422 becomes 400 (OpenAI's status for a bad parameter), the
/// native field its OpenAI name.
fn refused(r: Refusal) -> Response {
    let status = if r.status == StatusCode::UNPROCESSABLE_ENTITY { StatusCode::BAD_REQUEST } else { r.status };
    let param = r.field.as_deref().map(|f| match f {
        "width" | "height" => "size",
        "batch" => "n",
        other => other,
    });
    let code = match status.as_u16() {
        429 => Some("rate_limit_exceeded"),
        413 => Some("request_too_large"),
        408 => Some("timeout"),
        400 => Some("invalid_value"),
        _ => None,
    };
    let mut resp = error(status, r.message, param, code);
    if let Some(s) = r.retry_after {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    resp
}

/// A request translated into the native body.
#[derive(Debug, PartialEq)]
pub struct Translated {
    pub native: serde_json::Value,
    pub url: bool,
    /// OpenAI parameters accepted and ignored.
    pub ignored: Vec<String>,
}

/// A refused translation: status 400 (404 for another model), message, param, code.
#[derive(Debug, PartialEq)]
pub struct Bad(pub StatusCode, pub String, pub Option<&'static str>, pub &'static str);

fn bad(message: impl Into<String>, param: &'static str) -> Bad {
    Bad(StatusCode::BAD_REQUEST, message.into(), Some(param), "invalid_value")
}

/// `"WxH"`, both whole numbers from 1 (`"auto"`: the manifest's size).
fn parse_size(s: &str) -> Result<Option<(u64, u64)>, Bad> {
    if s == "auto" {
        return Ok(None);
    }
    let msg = || bad(format!("Invalid value for 'size': '{s}'. Use 'WIDTHxHEIGHT' (e.g. '1024x1024', whole numbers from 1) or 'auto'"), "size");
    let (w, h) = s.split_once('x').ok_or_else(msg)?;
    let num = |p: &str| -> Result<u64, Bad> {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 6 {
            return Err(msg());
        }
        p.parse::<u64>().ok().filter(|v| *v > 0).ok_or_else(msg)
    };
    Ok(Some((num(w)?, num(h)?)))
}

/// Translates an OpenAI images request into the native body.
pub fn translate(body: &[u8], model_name: &str) -> Result<Translated, Bad> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| Bad(StatusCode::BAD_REQUEST, format!("We could not parse the JSON body of your request: {e}"), None, "invalid_json"))?;
    let serde_json::Value::Object(obj) = v else {
        return Err(Bad(StatusCode::BAD_REQUEST, "The body of your request must be a JSON object".into(), None, "invalid_json"));
    };
    let mut native = serde_json::Map::new();
    let mut url = false;
    let mut ignored = vec![];
    for (k, v) in &obj {
        match k.as_str() {
            "prompt" => match v.as_str() {
                Some(p) if !p.is_empty() => {
                    native.insert("prompt".into(), v.clone());
                }
                _ => return Err(bad("'prompt' must be a non-empty string", "prompt")),
            },
            "n" => match v.as_u64() {
                Some(n) if n >= 1 => {
                    native.insert("batch".into(), n.into());
                }
                _ => return Err(bad(format!("Invalid value for 'n': {v}. It must be a whole number from 1"), "n")),
            },
            "size" => match v.as_str() {
                Some(s) => {
                    if let Some((w, h)) = parse_size(s)? {
                        native.insert("width".into(), w.into());
                        native.insert("height".into(), h.into());
                    }
                }
                None => return Err(bad(format!("Invalid value for 'size': {v}. It must be a string such as '1024x1024'"), "size")),
            },
            "response_format" => match v.as_str() {
                Some("b64_json") => url = false,
                Some("url") => url = true,
                _ => return Err(bad(format!("Invalid value for 'response_format': {v}. Supported values are: 'b64_json' and 'url'"), "response_format")),
            },
            "output_format" => match v.as_str() {
                Some("png") => {}
                _ => return Err(bad(format!("Invalid value for 'output_format': {v}. This server writes 'png' only"), "output_format")),
            },
            "model" => match v.as_str() {
                Some(m) if m == model_name => {}
                Some(m) => return Err(Bad(StatusCode::NOT_FOUND, format!("The model '{m}' does not exist: this server serves '{model_name}' (GET /v1/models)"), Some("model"), "model_not_found")),
                None => return Err(bad("'model' must be a string", "model")),
            },
            "user" => {}
            k if IGNORED.contains(&k) => ignored.push(k.to_string()),
            k if EXTENSIONS.contains(&k) => {
                native.insert(k.to_string(), v.clone());
            }
            k => return Err(Bad(StatusCode::BAD_REQUEST, format!("Unrecognized request argument supplied: {k}"), None, "unknown_parameter")),
        }
    }
    if !native.contains_key("prompt") {
        return Err(bad("Missing required parameter: 'prompt'", "prompt"));
    }
    native.insert("response".into(), "json".into());
    Ok(Translated { native: serde_json::Value::Object(native), url, ignored })
}

/// PNGs kept for `response_format: "url"`, by an unguessable id, for [`URL_TTL`].
#[derive(Default)]
pub struct Files(Mutex<VecDeque<Kept>>);

/// An image kept for a URL: its id, when it was made, its PNG.
type Kept = (String, Instant, Arc<Vec<u8>>);

impl Files {
    fn put(&self, png: Vec<u8>) -> String {
        let id = format!("{:016x}{:016x}", runner_core::fsutil::random_token(), runner_core::fsutil::random_token());
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        q.retain(|(_, t, _)| now.duration_since(*t) < URL_TTL);
        while q.len() >= URL_KEEP {
            q.pop_front();
        }
        q.push_back((id.clone(), now, Arc::new(png)));
        id
    }

    fn get(&self, id: &str) -> Option<Arc<Vec<u8>>> {
        let q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.iter().find(|(i, t, _)| i == id && t.elapsed() < URL_TTL).map(|(_, _, p)| p.clone())
    }
}

/// `POST /v1/images/generations`.
pub async fn generations(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    let body = match read_body(&app, body).await {
        Ok(b) => b,
        Err(r) => return refused(r),
    };
    let t = match translate(&body, &app.base.manifest.name) {
        Ok(t) => t,
        Err(Bad(status, message, param, code)) => return error(status, message, param, Some(code)),
    };
    let entry = match enqueue_bytes(&app, t.native.to_string().into_bytes(), false).await {
        Ok(e) => e,
        Err(r) => return refused(r),
    };
    let mut hang_up = HangUp(Some(entry.clone()));
    let outcome = entry.finished().await;
    hang_up.0 = None;
    let g = match &*outcome {
        Outcome::Error { status, message } => {
            let code = if status.as_u16() == 504 { Some("timeout") } else { None };
            return error(*status, message.clone(), None, code);
        }
        Outcome::Done(g) => g,
    };
    let origin = headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(|h| format!("http://{h}")).unwrap_or_default();
    let data: Vec<serde_json::Value> = g
        .images
        .iter()
        .map(|png| {
            if t.url {
                serde_json::json!({ "url": format!("{origin}/v1/images/files/{}.png", app.files.put(png.clone())) })
            } else {
                serde_json::json!({ "b64_json": base64::engine::general_purpose::STANDARD.encode(png) })
            }
        })
        .collect();
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let body = serde_json::json!({ "created": created, "data": data, "seed": g.report.seed });
    let mut r = (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
    if !t.ignored.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&format!("ignored OpenAI parameters: {}", t.ignored.join(", "))) {
            r.headers_mut().insert("x-runner-warning", v);
        }
    }
    r
}

/// `GET /v1/images/files/{id}.png`: an image a `url` answer named, for [`URL_TTL`]. Needs no
/// token (as OpenAI's URLs): the id is 128 random bits.
pub async fn file(State(app): State<Arc<App>>, UrlPath(name): UrlPath<String>) -> Response {
    let id = name.strip_suffix(".png").unwrap_or(&name);
    match app.files.get(id) {
        Some(png) => (StatusCode::OK, [(header::CONTENT_TYPE, "image/png"), (header::CACHE_CONTROL, "private, max-age=3600")], png.as_ref().clone()).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no image `{name}` (images of `url` answers are kept {} s)", URL_TTL.as_secs()), None, Some("not_found")),
    }
}

/// The served model as `GET /v1/models` lists it, with runner's own fields (`kind`, the
/// defaults and limits a client may show).
pub fn model(app: &App) -> serde_json::Value {
    let m = &app.base.manifest;
    let run = &m.run;
    let spec = runner::preflight::RunSpec::new(&app.base, &app.configs);
    serde_json::json!({
        "id": m.name,
        "object": "model",
        "created": 0,
        "owned_by": "runner",
        "runner": {
            "kind": m.pipeline.kind,
            "width": spec.shape.width,
            "height": spec.shape.height,
            "steps": spec.steps,
            "guidance_scale": run.guidance_scale,
            "negative_prompt": run.negative_prompt,
            "multiple": app.configs.vae_scale_factor() * app.configs.patch_size().unwrap_or(1),
            "limits": app.limits,
        },
    })
}

/// `GET /v1/models`.
pub async fn models(State(app): State<Arc<App>>) -> Response {
    let body = serde_json::json!({ "object": "list", "data": [model(&app)] });
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// `GET /v1/models/{id}`.
pub async fn model_by_id(State(app): State<Arc<App>>, UrlPath(id): UrlPath<String>) -> Response {
    if id != app.base.manifest.name {
        return error(StatusCode::NOT_FOUND, format!("The model '{id}' does not exist"), Some("model"), Some("model_not_found"));
    }
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], model(&app).to_string()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translates_and_refuses() {
        let t = translate(br#"{"prompt": "a cat", "n": 2, "size": "64x48", "response_format": "url", "model": "m", "user": "u", "quality": "hd", "seed": 3}"#, "m").unwrap();
        assert_eq!(t.native, serde_json::json!({"prompt": "a cat", "batch": 2, "width": 64, "height": 48, "seed": 3, "response": "json"}));
        assert!(t.url);
        assert_eq!(t.ignored, ["quality"]);
        for (body, param) in [
            (r#"{"prompt": "a", "size": "0x0"}"#, "size"),
            (r#"{"prompt": "a", "size": "64"}"#, "size"),
            (r#"{"prompt": "a", "size": "64x64x64"}"#, "size"),
            (r#"{"prompt": "a", "size": "-64x64"}"#, "size"),
            (r#"{"prompt": "a", "size": 64}"#, "size"),
            (r#"{"prompt": "a", "n": 0}"#, "n"),
            (r#"{"prompt": "a", "n": 1.5}"#, "n"),
            (r#"{"prompt": "a", "response_format": "jpeg"}"#, "response_format"),
            (r#"{"n": 1}"#, "prompt"),
            (r#"{"prompt": ""}"#, "prompt"),
        ] {
            let e = translate(body.as_bytes(), "m").unwrap_err();
            assert_eq!((e.0, e.2), (StatusCode::BAD_REQUEST, Some(param)), "{body}: {e:?}");
        }
        assert_eq!(translate(br#"{"prompt": "a", "model": "dall-e-3"}"#, "m").unwrap_err().0, StatusCode::NOT_FOUND);
        assert_eq!(translate(br#"{"prompt": "a", "width": 64}"#, "m").unwrap_err().3, "unknown_parameter");
        assert_eq!(translate(b"[1]", "m").unwrap_err().3, "invalid_json");
    }
}
