//! `runner serve MANIFEST`: an HTTP server in front of one loaded pipeline. The weights are
//! loaded once by a worker thread that owns the session; every request's `[run]` keys are
//! layered over the manifest as `runner run --prompts` layers a line's (so that a served image
//! equals `runner run`'s with the same `--set` flags, byte for byte), checked on a blocking
//! thread, then queued for the worker. libtorch never runs on the async runtime's threads.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use tokio::sync::{mpsc, oneshot};

use runner::exec::batch as b;
use runner::manifest::{self, LoadedManifest, Overrides};

/// The largest request body (413 beyond).
pub const BODY_LIMIT: usize = 1 << 20;
/// `[serve] queue`'s default.
pub const DEFAULT_QUEUE: usize = 8;

/// Why the server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("`--listen {0}`: not an address and port (e.g. 127.0.0.1:8080)")]
    Address(String),
    #[error("`--listen {0}` is not a loopback address and the server has no authentication yet: pass --insecure-bind to listen there anyway")]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("`{file}` is not a valid manifest: {message}")]
    Manifest { file: PathBuf, message: String },
    #[error("--locked: {0}")]
    Lock(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// `runner serve`'s flags.
pub struct ServeJob<'a> {
    pub file: &'a Path,
    pub listen: &'a str,
    pub insecure_bind: bool,
    pub locked: bool,
    pub overrides: &'a Overrides,
}

/// The address to listen on, refused when it is not a loopback one (unless `insecure`).
pub fn listen_addr(listen: &str, insecure: bool) -> Result<SocketAddr, ServeError> {
    let addr: SocketAddr = listen.parse().map_err(|_| ServeError::Address(listen.to_string()))?;
    if !addr.ip().is_loopback() && !insecure {
        return Err(ServeError::NotLoopback(addr));
    }
    Ok(addr)
}

/// A request, checked, for the worker.
struct Job {
    m: Box<LoadedManifest>,
    reply: oneshot::Sender<Result<Generated, (StatusCode, String)>>,
}

struct Generated {
    images: Vec<Vec<u8>>,
    report: runner::exec::RunReport,
    total_s: f64,
}

struct App {
    file: PathBuf,
    overrides: Overrides,
    ready: AtomicBool,
    queue: mpsc::Sender<Job>,
    limits: manifest::Serve,
}

pub fn serve(job: ServeJob) -> anyhow::Result<ExitCode> {
    let addr = listen_addr(job.listen, job.insecure_bind)?;
    let file = job.file.to_path_buf();
    let base = manifest::load(&file, job.overrides).map_err(|d| {
        let errors: Vec<String> = d.iter().filter(|d| d.is_error()).map(|d| d.message.clone()).collect();
        ServeError::Manifest { file: file.clone(), message: errors.join("; ") }
    })?;
    for w in &base.warnings {
        eprintln!("warning: {}", w.message);
    }
    let lock_sha256 = if job.locked {
        runner::lock::verify_lock(&base).map_err(|e| ServeError::Lock(e.to_string()))?;
        runner::lock::sha256_file(&runner::lock::lock_path(&file)).ok().map(|(_, h)| h)
    } else {
        None
    };
    let limits = base.manifest.serve.clone().unwrap_or_default();
    let (tx, rx) = mpsc::channel(limits.queue.map_or(DEFAULT_QUEUE, |q| q as usize));
    let app = Arc::new(App { file: file.clone(), overrides: job.overrides.clone(), ready: AtomicBool::new(false), queue: tx, limits });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).map_err(|source| ServeError::Bind { addr, source })?;
    let bound = listener.local_addr()?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{bound}")?;
        out.flush()?;
    }
    // The worker: loads the weights, then generates one job after the other.
    let worker_app = app.clone();
    std::thread::Builder::new().name("runner-worker".into()).spawn(move || worker(base, lock_sha256, rx, &worker_app))?;
    let router = Router::new().route("/healthz", get(|| async { "ok\n" })).route("/readyz", get(readyz)).route("/v1/images", post(images)).layer(DefaultBodyLimit::max(BODY_LIMIT)).with_state(app);
    rt.block_on(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                // Ctrl-C or SIGTERM (a service manager, a container's stop).
                let term = async {
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                        Ok(mut s) => {
                            s.recv().await;
                        }
                        Err(_) => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term => {}
                }
            })
            .await
    })?;
    Ok(ExitCode::SUCCESS)
}

fn worker(base: LoadedManifest, lock_sha256: Option<String>, mut rx: mpsc::Receiver<Job>, app: &App) {
    if let Some(t) = base.manifest.run.threads {
        tch::set_num_threads(t as i32);
    }
    let opts = runner::exec::RunOptions { out: Some(temp_png()), dump: None, plan: Default::default(), progress: false, simulate: false, lock_sha256 };
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runner::exec::load(&base, &opts)));
    let mut session = match loaded {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            eprintln!("error: `{}`: {e}", app.file.display());
            std::process::exit(1);
        }
        Err(p) => {
            eprintln!("error: `{}`: libtorch failed while loading: {}", app.file.display(), panic_text(p));
            std::process::exit(1);
        }
    };
    app.ready.store(true, Ordering::SeqCst);
    eprintln!("ready: {} loaded", base.manifest.name);
    while let Some(job) = rx.blocking_recv() {
        if job.reply.is_closed() {
            continue;
        }
        let started = Instant::now();
        let out = temp_png();
        let run_opts = runner::exec::RunOptions { out: Some(out.clone()), ..opts.clone() };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| session.generate_run(&job.m, &run_opts)));
        let result = match r {
            Ok(Ok(report)) => {
                let read: Result<Vec<Vec<u8>>, _> = report.images.iter().map(std::fs::read).collect();
                for p in &report.images {
                    let _ = std::fs::remove_file(p);
                }
                read.map(|images| Generated { images, report, total_s: started.elapsed().as_secs_f64() }).map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot read the image back: {e}")))
            }
            Ok(Err(e)) => {
                let status = match e {
                    runner::exec::ExecError::Unsupported(_) | runner::exec::ExecError::Preflight(_) => StatusCode::UNPROCESSABLE_ENTITY,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                Err((status, e.to_string()))
            }
            Err(p) => Err((StatusCode::INTERNAL_SERVER_ERROR, format!("libtorch failed while running: {}", panic_text(p)))),
        };
        let _ = job.reply.send(result);
    }
}

/// A fresh temp path for one request's images (numbered beside it for batches).
fn temp_png() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!("runner-serve-{}-{}.png", std::process::id(), N.fetch_add(1, Ordering::Relaxed)))
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "unknown error".into())
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading\n").into_response()
    }
}

/// A JSON error: `{"error": {"message", "field"}}`.
fn error(status: StatusCode, message: impl Into<String>, field: Option<&str>) -> Response {
    let body = serde_json::json!({ "error": { "message": message.into(), "field": field } });
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

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
pub fn parse_request(body: &[u8], file: &Path, overrides: &Overrides, limits: &manifest::Serve) -> Result<Request, Rejected> {
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
        manifest::load(file, &o).map_err(|d| {
            let first = d.iter().find(|d| d.is_error());
            let field = first.and_then(|d| d.key.as_deref()).map(|k| k.strip_prefix("run.").unwrap_or(k));
            let errors: Vec<String> = d.iter().filter(|d| d.is_error()).map(|d| d.message.clone()).collect();
            rejected(errors.join("; "), field)
        })
    };
    let mut m = load(&sets)?;
    if m.manifest.run.seed.is_none() {
        // A seed drawn for the request, so that the response (and the image's metadata) name it.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        sets.push(format!("run.seed={}", (t.as_nanos() as u64) % (1 << 53)));
        m = load(&sets)?;
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
    Ok(Request { m, json })
}

async fn images(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let checker = app.clone();
    let parsed = tokio::task::spawn_blocking(move || parse_request(&body, &checker.file, &checker.overrides, &checker.limits)).await;
    let req = match parsed {
        Ok(Ok(r)) => r,
        Ok(Err(r)) => return error(StatusCode::UNPROCESSABLE_ENTITY, r.message, r.field.as_deref()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    };
    let (reply, answer) = oneshot::channel();
    let json = req.json;
    match app.queue.try_send(Job { m: Box::new(req.m), reply }) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, "the queue is full: retry later", None);
            r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return r;
        }
        Err(mpsc::error::TrySendError::Closed(_)) => return error(StatusCode::SERVICE_UNAVAILABLE, "the worker has stopped", None),
    }
    let g = match answer.await {
        Ok(Ok(g)) => g,
        Ok(Err((status, message))) => return error(status, message, None),
        Err(_) => return error(StatusCode::INTERNAL_SERVER_ERROR, "the worker dropped the request", None),
    };
    if !json {
        let png = g.images.into_iter().next().unwrap_or_default();
        return (StatusCode::OK, [(header::CONTENT_TYPE, "image/png")], png).into_response();
    }
    let r = &g.report;
    let t = &r.timings;
    let body = serde_json::json!({
        "images": g.images.iter().map(|i| base64::engine::general_purpose::STANDARD.encode(i)).collect::<Vec<_>>(),
        "seed": r.seed,
        "steps": r.steps,
        "width": r.width,
        "height": r.height,
        "timings": {
            "encode_s": t.encode_s, "denoise_s": t.denoise_s, "first_step_s": t.first_step_s,
            "seconds_per_step": t.seconds_per_step, "decode_s": t.decode_s, "total_s": g.total_s,
        },
        "warnings": r.warnings,
    });
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}
