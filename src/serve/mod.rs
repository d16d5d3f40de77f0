//! `runner serve MANIFEST`: an HTTP server in front of one loaded pipeline. A worker thread owns
//! the session: it loads the weights once, runs a one-step warm-up generation (then `/readyz`
//! answers 200), and generates one job after the other from a bounded queue. Every request's
//! `[run]` keys are layered over the manifest as `runner run --prompts` layers a line's, so that
//! a served image equals `runner run`'s with the same `--set` flags, byte for byte. libtorch
//! never runs on the async runtime's threads; jobs are cancelled between denoising steps.

mod jobs;
mod metrics;
mod openai;
mod request;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{MatchedPath, Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use http_body_util::BodyExt as _;
use tokio::sync::{mpsc, watch};

use jobs::{Cancel, Entry, Generated, Outcome, Phase};
use runner::manifest::{self, LoadedManifest, Overrides};

use request::parse_request;

/// The largest request body (413 beyond): room for `latents` (base64) of a 1024x1024 FLUX image
/// in F32 and then some.
pub const BODY_LIMIT: usize = 4 << 20;
/// `[serve] queue`'s default.
pub const DEFAULT_QUEUE: usize = 8;
/// `[serve] read_timeout`'s default, in seconds.
pub const DEFAULT_READ_TIMEOUT: f64 = 30.0;

/// A test hook, not an interface (no flag, no `--help`): with `RUNNER_TEST_STEP_GATE=DIR`, read
/// once at start-up, each denoising step `i` of a served job waits until `DIR/open` or
/// `DIR/step-{i}` exists, answering cancellation every 10 ms meanwhile. tests/serve.rs holds jobs
/// running with it, so that deadlines, floods, DELETEs and drains do not race the machine's speed.
/// Unset, nothing is checked; the warm-up generation never waits.
const STEP_GATE_VAR: &str = "RUNNER_TEST_STEP_GATE";

/// Why the server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("`--listen {0}`: not an address and port (e.g. 127.0.0.1:8080)")]
    Address(String),
    #[error("`--listen {0}` is not a loopback address and the manifest sets no `serve.token_env`: set a bearer token, or pass --insecure-bind to listen there without one")]
    NotLoopback(SocketAddr),
    #[error("`serve.token_env` names `{0}`, which is not set (or empty) in the environment: the server would have no token")]
    NoToken(String),
    #[error("`serve.token_env` names `{0}`, whose value holds whitespace (a trailing newline?) or characters outside printable ASCII: no client could send it in `Authorization: Bearer <token>` (the value is not shown)")]
    BadToken(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("`{file}` is not a valid manifest: {message}")]
    Manifest { file: PathBuf, message: String },
    #[error("{0}")]
    Limit(String),
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
    /// `--devices` / `--simulate`'s inventory.
    pub devices: Option<runner::plan::inventory::Inventory>,
    /// `--simulate`: plan for `devices`, run on the CPU.
    pub simulate: bool,
    pub locked: bool,
    pub drain_timeout: Duration,
    pub overrides: &'a Overrides,
}

/// The address to listen on, refused when it is not a loopback one unless requests need a
/// token (`authenticated`) or `insecure`.
pub fn listen_addr(listen: &str, authenticated: bool, insecure: bool) -> Result<SocketAddr, ServeError> {
    let addr: SocketAddr = listen.parse().map_err(|_| ServeError::Address(listen.to_string()))?;
    if !addr.ip().is_loopback() && !authenticated && !insecure {
        return Err(ServeError::NotLoopback(addr));
    }
    Ok(addr)
}

struct App {
    file: PathBuf,
    /// The manifest as the server started with it: requests are layered over its text.
    base: Arc<LoadedManifest>,
    /// Its pipeline folder and configs, as preflight read them: requests are checked against them.
    folder: runner::checkpoint::layout::PipelineFolder,
    configs: runner::preflight::Configs,
    overrides: Overrides,
    limits: manifest::Serve,
    token: Option<String>,
    read_timeout: Duration,
    ready: AtomicBool,
    draining: AtomicBool,
    /// Closed (taken) when the server drains: the worker ends after what is queued.
    queue: Mutex<Option<mpsc::UnboundedSender<Arc<Entry>>>>,
    /// The queue's places (`[serve] queue`).
    places: Arc<jobs::Places>,
    jobs: jobs::Table,
    metrics: metrics::Metrics,
    /// Mean seconds of a generation (an f64's bits), for `Retry-After`.
    mean_generation_s: AtomicU64,
    /// [`STEP_GATE_VAR`]'s folder.
    step_gate: Option<PathBuf>,
    /// Images of OpenAI `url` answers.
    files: openai::Files,
}

impl App {
    fn mean_generation_s(&self) -> f64 {
        f64::from_bits(self.mean_generation_s.load(Ordering::Relaxed))
    }

    fn record_generation(&self, seconds: f64) {
        let old = self.mean_generation_s();
        let new = if old == 0.0 { seconds } else { 0.8 * old + 0.2 * seconds };
        self.mean_generation_s.store(new.to_bits(), Ordering::Relaxed);
    }
}

pub fn serve(job: ServeJob) -> anyhow::Result<ExitCode> {
    let file = job.file.to_path_buf();
    let invalid = |d: Vec<runner::diag::Diagnostic>| ServeError::Manifest { file: file.clone(), message: errors_of(&d) };
    let base = manifest::load_locked(&file, job.overrides, job.locked).map_err(invalid)?;
    let limits = base.manifest.serve.clone().unwrap_or_default();
    let token = match &limits.token_env {
        Some(var) => {
            let token = std::env::var(var).ok().filter(|t| !t.is_empty()).ok_or_else(|| ServeError::NoToken(var.clone()))?;
            // What a client can send in `Authorization: Bearer <token>` and be matched: a
            // newline or spaces around it, or other characters, would refuse every client.
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ServeError::BadToken(var.clone()).into());
            }
            Some(token)
        }
        None => None,
    };
    let addr = listen_addr(job.listen, token.is_some(), job.insecure_bind)?;
    for w in &base.warnings {
        eprintln!("warning: {}", w.message);
    }
    // Everything knowable without loading a weight, before the server listens.
    let runner::preflight::Checked { folder, configs, run } = runner::preflight::check(&base).map_err(invalid)?;
    // The manifest's own job within `[serve]`'s limits, defaults included: else every request
    // that leaves the key out would be refused.
    if let Some(over) = request::over_limit(&base, &run, &limits) {
        return Err(ServeError::Limit(format!(
            "the manifest's {}: `run.{}` in the manifest (or `--set`) must fit it",
            over.message(),
            if over.key == "pixels" { "width` and `run.height" } else { over.key }
        ))
        .into());
    }
    let lock_sha256 = if job.locked { Some(runner::lock::verified_sha256(&base).map_err(|e| ServeError::Lock(e.to_string()))?) } else { None };
    let (tx, rx) = mpsc::unbounded_channel();
    let metrics = metrics::Metrics::new();
    let places = jobs::Places::new(limits.queue.map_or(DEFAULT_QUEUE, |q| q as usize), metrics.queue_depth.clone());
    let base = Arc::new(base);
    let app = Arc::new(App {
        file: file.clone(),
        base: base.clone(),
        folder,
        configs,
        overrides: job.overrides.clone(),
        read_timeout: Duration::from_secs_f64(limits.read_timeout.unwrap_or(DEFAULT_READ_TIMEOUT)),
        limits,
        token,
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        queue: Mutex::new(Some(tx)),
        places,
        jobs: Default::default(),
        metrics,
        mean_generation_s: AtomicU64::new(0),
        step_gate: std::env::var_os(STEP_GATE_VAR).map(PathBuf::from),
        files: Default::default(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).map_err(|source| ServeError::Bind { addr, source })?;
    let bound = listener.local_addr()?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{bound}")?;
        out.flush()?;
    }
    let worker_app = app.clone();
    let opts = runner::exec::RunOptions {
        plan: runner::plan::build::BuildOptions { devices: job.devices, weights_only: false },
        simulate: job.simulate,
        lock_sha256,
        in_memory: true,
        images: true,
        ..Default::default()
    };
    let worker = std::thread::Builder::new().name("runner-worker".into()).spawn(move || worker(base, opts, rx, &worker_app))?;
    rt.block_on(run_server(listener, app.clone(), job.drain_timeout));
    if app.ready.load(Ordering::SeqCst) {
        // The queue is closed and every job has ended: the worker returns where its step ends.
        let _ = worker.join();
    }
    eprintln!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// The first and the longest wait after a failed accept.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Accept failures closer than this are one episode, said once.
const ACCEPT_SAY_EVERY: Duration = Duration::from_secs(60);

/// A failed accept that concerns one connection only (hyper-util's `is_connection_error`).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(e.kind(), K::ConnectionRefused | K::ConnectionAborted | K::ConnectionReset)
}

/// Resolves on SIGTERM (a service manager, a container's stop) or SIGINT.
async fn shutdown_signal() {
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
}

/// Accepts connections until a signal, then drains: no new connections, `/readyz` 503, what is
/// queued or running finishes within `drain_timeout` (then it is cancelled), connections close.
async fn run_server(listener: tokio::net::TcpListener, app: Arc<App>, drain_timeout: Duration) {
    let router = router(app.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    let signal = shutdown_signal();
    tokio::pin!(signal);
    // The wait before the next accept after one failed (out of file descriptors, memory): none
    // while accepts succeed.
    let mut backoff: Option<Duration> = None;
    // When the last such failure was said: once per episode (failures a minute apart or less).
    let mut said: Option<Instant> = None;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => {
                        backoff = None;
                        stream
                    }
                    // The peer gave up before its connection was accepted: nothing is wrong here.
                    Err(e) if is_connection_error(&e) => continue,
                    Err(e) => {
                        // As hyper's and axum's `serve`: retrying at once would spin a core while
                        // the cause (EMFILE) lasts.
                        if said.is_none_or(|t| t.elapsed() > ACCEPT_SAY_EVERY) {
                            eprintln!("warning: cannot accept connections: {e}; retrying with a back-off of up to 1 s (said once a minute at most)");
                        }
                        said = Some(Instant::now());
                        let wait = backoff.map_or(ACCEPT_BACKOFF_MIN, |d| (d * 2).min(ACCEPT_BACKOFF_MAX));
                        backoff = Some(wait);
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = &mut signal => break,
                        }
                        continue;
                    }
                };
                let service = hyper_util::service::TowerToHyperService::new(router.clone());
                let mut stop = stop_rx.clone();
                let read_timeout = app.read_timeout;
                conns.spawn(async move {
                    let mut builder = hyper::server::conn::http1::Builder::new();
                    // A client that never finishes its request head is dropped.
                    builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(read_timeout);
                    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = stop.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
                    }
                    let _ = conn.await;
                });
            }
            _ = &mut signal => break,
        }
        // Forget finished connections.
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    app.draining.store(true, Ordering::SeqCst);
    app.metrics.ready.set(0);
    let live = app.jobs.live().len();
    eprintln!("draining: {live} job(s) queued or running, up to {:.0} s (--drain-timeout)", drain_timeout.as_secs_f64());
    let until = tokio::time::Instant::now() + drain_timeout;
    loop {
        if app.jobs.live().is_empty() && app.metrics.running.get() == 0 {
            break;
        }
        if tokio::time::Instant::now() >= until {
            let cancelled = app.jobs.live().into_iter().filter(|e| e.cancel(Cancel::Shutdown)).count();
            eprintln!("draining: cancelled {cancelled} job(s) at --drain-timeout");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Close the queue: the worker ends after skipping what was cancelled in it.
    app.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
    let _ = stop_tx.send(true);
    // Every job has ended, so answers are written at once; event streams end with their jobs.
    if tokio::time::timeout(Duration::from_secs(5), async { while conns.join_next().await.is_some() {} }).await.is_err() {
        conns.abort_all();
    }
}

fn router(app: Arc<App>) -> Router {
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/images", axum::routing::post(images))
        .route("/v1/jobs", axum::routing::post(submit_job))
        .route("/v1/jobs/{id}", get(job).delete(delete_job))
        .route("/v1/jobs/{id}/image", get(job_image))
        .route("/v1/jobs/{id}/events", get(job_events))
        .route("/v1/images/generations", axum::routing::post(openai::generations))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{id}", get(openai::model_by_id))
        .route_layer(middleware::from_fn_with_state(app.clone(), authenticate));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/", get(page))
        .route("/v1/images/files/{name}", get(openai::file))
        .merge(protected)
        .route_layer(middleware::from_fn_with_state(app.clone(), count))
        .with_state(app)
}

const OPENAI_IMAGES: &str = "/v1/images/generations";

/// `GET /`: the page to generate from (one static file, no build step, nothing fetched from
/// elsewhere; it asks for the token, if any, and keeps it in `sessionStorage`).
async fn page() -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' blob: data:; connect-src 'self' blob:; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE,
    )
        .into_response()
}

const PAGE: &str = include_str!("page.html");

/// Requests by route and status, and their latency.
async fn count(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let path = req.extensions().get::<MatchedPath>().map_or("other", |p| p.as_str()).to_string();
    // Label values the client cannot invent (one series each, however many requests).
    let method = metrics::method_label(req.method()).to_string();
    let started = Instant::now();
    let uri = req.uri().path().to_string();
    let r = next.run(req).await;
    let seconds = started.elapsed().as_secs_f64();
    // An access log line (RUST_LOG=runner=info).
    tracing::info!("{method} {uri} {} {:.1} ms", r.status().as_u16(), seconds * 1e3);
    app.metrics.requests.get_or_create(&metrics::RequestLabels { path: path.clone(), method, status: r.status().as_u16() }).inc();
    app.metrics.request_seconds.get_or_create(&metrics::PathLabels { path }).observe(seconds);
    r
}

/// `Authorization: Bearer <token>` when `[serve] token_env` is set.
async fn authenticate(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(token) = &app.token {
        // The scheme is case-insensitive (RFC 7235 section 2.1), then one or more spaces.
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim_start_matches(' '));
        // Compared in constant time: the answer's timing tells nothing of the token.
        let ok = given.is_some_and(|g| g.len() == token.len() && g.bytes().zip(token.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0);
        if !ok {
            let openai = [OPENAI_IMAGES, "/v1/models"].iter().any(|p| req.uri().path().starts_with(p));
            let mut r = if openai {
                let message = if given.is_some() { "Incorrect API key provided" } else { "You didn't provide an API key: this server needs `Authorization: Bearer <token>`" };
                openai::error(StatusCode::UNAUTHORIZED, message, None, Some("invalid_api_key"))
            } else {
                error(StatusCode::UNAUTHORIZED, "this server needs `Authorization: Bearer <token>`", None)
            };
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

fn worker(base: Arc<LoadedManifest>, opts: runner::exec::RunOptions, mut rx: mpsc::UnboundedReceiver<Arc<Entry>>, app: &Arc<App>) {
    if let Some(t) = base.manifest.run.threads {
        tch::set_num_threads(t as i32);
    }
    let fail = |what: &str, e: String| -> ! {
        eprintln!("error: `{}`: {what}: {e}", app.file.display());
        std::process::exit(1);
    };
    let started = Instant::now();
    let mut session = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runner::exec::load(&base, &opts))) {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => fail("cannot load", e.to_string()),
        Err(p) => fail("libtorch failed while loading", panic_text(p)),
    };
    // A one-step generation first: kernels chosen, caches warm, the whole path proven.
    let mut warm = app.overrides.clone();
    warm.sets.extend(["run.steps=1".to_string(), "run.batch=1".to_string()]);
    if base.manifest.run.prompt.is_none() {
        warm.sets.push("run.prompt=warm-up".to_string());
    }
    let warmed = manifest::relayer(&base, &warm).map_err(|d| errors_of(&d)).and_then(|m| generate(&mut session, &m, &opts).map_err(|(_, e)| e));
    if let Err(e) = warmed {
        fail("the warm-up generation failed", e);
    }
    update_resident(&session, app);
    app.ready.store(true, Ordering::SeqCst);
    app.metrics.ready.set(1);
    eprintln!("ready: {} loaded and warmed up in {:.1} s", base.manifest.name, started.elapsed().as_secs_f64());
    while let Some(entry) = rx.blocking_recv() {
        let Some(m) = entry.start() else { continue };
        tracing::info!(job = %entry.id, "generating (queued {:.2} s)", entry.created.elapsed().as_secs_f64());
        app.metrics.running.set(1);
        let t = Instant::now();
        let watch = runner::exec::Watch(Arc::new(Watcher { entry: entry.clone(), app: app.clone() }));
        let run_opts = runner::exec::RunOptions { watch: Some(watch), latents: entry.latents.clone(), init: entry.init.clone(), ..opts.clone() };
        let (outcome, phase) = match generate(&mut session, &m, &run_opts) {
            Ok(g) => {
                app.metrics.generation_seconds.observe(t.elapsed().as_secs_f64());
                app.record_generation(t.elapsed().as_secs_f64());
                (Outcome::Done(Box::new(g)), Phase::Succeeded)
            }
            Err((status, message)) => (Outcome::Error { status, message }, Phase::Failed),
        };
        entry.finish(outcome, phase);
        let ended = match entry.progress().state {
            Phase::Succeeded => "succeeded",
            Phase::Cancelled => "cancelled",
            _ => "failed",
        };
        app.metrics.jobs.get_or_create(&metrics::OutcomeLabels { outcome: ended.to_string() }).inc();
        app.metrics.running.set(0);
        update_resident(&session, app);
    }
}

fn update_resident(session: &runner::exec::Session, app: &App) {
    if let Ok(bytes) = session.resident_bytes() {
        for (device, b) in bytes {
            app.metrics.resident_bytes.get_or_create(&metrics::DeviceLabels { device }).set(b as i64);
        }
    }
}

/// One generation on the session: the PNGs' bytes, or the status and message of its failure.
fn generate(session: &mut runner::exec::Session, m: &LoadedManifest, opts: &runner::exec::RunOptions) -> Result<Generated, (StatusCode, String)> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| session.generate_run(m, opts))) {
        Ok(Ok(mut report)) => Ok(Generated { images: std::mem::take(&mut report.pngs), report }),
        Ok(Err(e)) => {
            use runner::exec::ExecError as E;
            let status = match e {
                E::Unsupported(_) | E::Preflight(_) => StatusCode::UNPROCESSABLE_ENTITY,
                // The job has ended already with its cancel's status; this one is not seen.
                E::Cancelled { .. } => StatusCode::GONE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            Err((status, e.to_string()))
        }
        Err(p) => Err((StatusCode::INTERNAL_SERVER_ERROR, format!("libtorch failed while running: {}", panic_text(p)))),
    }
}

/// The worker's view of a job between steps.
struct Watcher {
    entry: Arc<Entry>,
    app: Arc<App>,
}

impl runner::exec::StepWatch for Watcher {
    fn cancelled(&self, i: usize, n: usize) -> Option<String> {
        // `i == n`: before the decode, which the gate leaves alone.
        if let Some(gate) = self.app.step_gate.as_deref().filter(|_| i < n) {
            while !(gate.join("open").exists() || gate.join(format!("step-{i}")).exists()) {
                if let Some(why) = self.entry.should_stop(n) {
                    return Some(why);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.entry.should_stop(n)
    }
    fn stepped(&self, i: usize, n: usize, seconds: f64) {
        self.entry.stepped(i, n);
        self.app.metrics.step_seconds.observe(seconds);
    }
}

/// The error messages of diagnostics, in one line.
fn errors_of(d: &[runner::diag::Diagnostic]) -> String {
    d.iter().filter(|d| d.is_error()).map(|d| d.message.as_str()).collect::<Vec<_>>().join("; ")
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "unknown error".into())
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.draining.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if app.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading\n").into_response()
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], app.metrics.encode()).into_response()
}

/// A JSON error: `{"error": {"message", "field"}}`.
fn error(status: StatusCode, message: impl Into<String>, field: Option<&str>) -> Response {
    let body = serde_json::json!({ "error": { "message": message.into(), "field": field } });
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

/// The body, within `BODY_LIMIT` (413) and `[serve] read_timeout` (408).
async fn read_body(app: &App, body: Body) -> Result<axum::body::Bytes, Refusal> {
    let limited = http_body_util::Limited::new(body, BODY_LIMIT);
    match tokio::time::timeout(app.read_timeout, limited.collect()).await {
        Err(_) => Err(Refusal::new(StatusCode::REQUEST_TIMEOUT, format!("the request body did not arrive within {:.1} s (`serve.read_timeout`)", app.read_timeout.as_secs_f64()), None)),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(Refusal::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is over {BODY_LIMIT} bytes"), None)),
        Ok(Err(e)) => Err(Refusal::new(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}"), None)),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// Why a request was not queued: the status, the message, the field it is about, and for a full
/// queue the seconds to wait.
struct Refusal {
    pub status: StatusCode,
    pub message: String,
    pub field: Option<String>,
    pub retry_after: Option<u64>,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>, field: Option<&str>) -> Refusal {
        Refusal { status, message: message.into(), field: field.map(str::to_string), retry_after: None }
    }

    /// In the native shape (`{"error": {"message", "field"}}`).
    fn native(self) -> Response {
        let mut r = error(self.status, self.message, self.field.as_deref());
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// Checks a request and queues it: the job, or the answer that refuses it.
async fn enqueue(app: &Arc<App>, body: Body, listed: bool) -> Result<Arc<Entry>, Response> {
    if app.draining.load(Ordering::SeqCst) {
        return Err(error(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down", None));
    }
    // A full queue answers before the body is checked (a flood costs no parsing).
    if app.places.full() {
        return Err(queue_full(app).native());
    }
    let body = read_body(app, body).await.map_err(Refusal::native)?;
    enqueue_bytes(app, body.to_vec(), listed).await.map_err(Refusal::native)
}

/// [`enqueue`] of a body already read.
async fn enqueue_bytes(app: &Arc<App>, body: Vec<u8>, listed: bool) -> Result<Arc<Entry>, Refusal> {
    if app.draining.load(Ordering::SeqCst) {
        return Err(Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down", None));
    }
    if app.places.full() {
        return Err(queue_full(app));
    }
    let checker = app.clone();
    let parsed = tokio::task::spawn_blocking(move || parse_request(&body, &checker.base, (&checker.folder, &checker.configs), &checker.overrides, &checker.limits)).await;
    let req = match parsed {
        Ok(Ok(r)) => r,
        Ok(Err(r)) => return Err(Refusal::new(StatusCode::UNPROCESSABLE_ENTITY, r.message, r.field.as_deref())),
        Err(e) => return Err(Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None)),
    };
    let entry = Entry::new(req.m, req.json, req.latents, req.init, app.limits.timeout);
    if !entry.wait_in(&app.places) {
        return Err(queue_full(app));
    }
    let sent = match app.queue.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        None => Err("the server is shutting down"),
        Some(q) => q.send(entry.clone()).map_err(|_| "the worker has stopped"),
    };
    if let Err(why) = sent {
        entry.leave_queue();
        return Err(Refusal::new(StatusCode::SERVICE_UNAVAILABLE, why, None));
    }
    app.jobs.add(&entry, listed);
    if let Some(deadline) = entry.deadline {
        let weak = Arc::downgrade(&entry);
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline.into()).await;
            if let Some(e) = weak.upgrade() {
                e.cancel(Cancel::Deadline);
            }
        });
    }
    Ok(entry)
}

/// 429, with `Retry-After` about when one place frees up: the mean generation, at least 1 s.
fn queue_full(app: &App) -> Refusal {
    let wait = app.mean_generation_s().ceil().clamp(1.0, 3600.0) as u64;
    let waiting = app.places.limit();
    Refusal { retry_after: Some(wait), ..Refusal::new(StatusCode::TOO_MANY_REQUESTS, format!("the queue is full ({waiting} waiting): retry later"), None) }
}

/// Cancels a synchronous request's job when its handler is dropped unanswered (the client hung up).
struct HangUp(Option<Arc<Entry>>);

impl Drop for HangUp {
    fn drop(&mut self) {
        if let Some(e) = self.0.take() {
            if e.cancel(Cancel::Disconnected) {
                tracing::info!(job = %e.id, "the client closed the connection: job cancelled");
            }
        }
    }
}

/// `POST /v1/images`: generates and answers with the image(s).
async fn images(State(app): State<Arc<App>>, body: Body) -> Response {
    let entry = match enqueue(&app, body, false).await {
        Ok(e) => e,
        Err(r) => return r,
    };
    let mut hang_up = HangUp(Some(entry.clone()));
    let outcome = entry.finished().await;
    hang_up.0 = None;
    match &*outcome {
        Outcome::Error { status, message } => error(*status, message.clone(), None),
        Outcome::Done(g) if !entry.json => (StatusCode::OK, [(header::CONTENT_TYPE, "image/png")], g.images.first().cloned().unwrap_or_default()).into_response(),
        Outcome::Done(g) => {
            let r = &g.report;
            let t = &r.timings;
            let d = entry.describe();
            let body = serde_json::json!({
                "images": g.images.iter().map(|i| base64::engine::general_purpose::STANDARD.encode(i)).collect::<Vec<_>>(),
                "seed": r.seed,
                "steps": r.steps,
                "width": r.width,
                "height": r.height,
                "timings": {
                    "queued_s": d["timings"]["queued_s"], "encode_s": t.encode_s, "denoise_s": t.denoise_s, "first_step_s": t.first_step_s,
                    "seconds_per_step": t.seconds_per_step, "decode_s": t.decode_s, "total_s": d["timings"]["total_s"],
                },
                "warnings": r.warnings,
            });
            json(StatusCode::OK, &body)
        }
    }
}

/// `POST /v1/jobs`: queues and answers 202 with the job (`Location: /v1/jobs/{id}`).
async fn submit_job(State(app): State<Arc<App>>, body: Body) -> Response {
    match enqueue(&app, body, true).await {
        Ok(e) => {
            let mut r = json(StatusCode::ACCEPTED, &e.describe());
            if let Ok(v) = HeaderValue::from_str(&format!("/v1/jobs/{}", e.id)) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        Err(r) => r,
    }
}

fn no_job(id: &str) -> Response {
    error(StatusCode::NOT_FOUND, format!("no job `{id}` (finished jobs are kept for the last {})", jobs::KEEP_FINISHED), None)
}

async fn job(State(app): State<Arc<App>>, UrlPath(id): UrlPath<String>) -> Response {
    match app.jobs.get(&id) {
        Some(e) => json(StatusCode::OK, &e.describe()),
        None => no_job(&id),
    }
}

/// `DELETE /v1/jobs/{id}`: cancels a job not yet ended (a running one stops where its step
/// ends); forgets one that has.
async fn delete_job(State(app): State<Arc<App>>, UrlPath(id): UrlPath<String>) -> Response {
    let Some(e) = app.jobs.get(&id) else { return no_job(&id) };
    if !e.cancel(Cancel::Deleted) {
        app.jobs.remove(&id);
    }
    json(StatusCode::OK, &e.describe())
}

#[derive(serde::Deserialize)]
struct ImageQuery {
    index: Option<usize>,
}

/// `GET /v1/jobs/{id}/image[?index=N]`: a finished job's PNG.
async fn job_image(State(app): State<Arc<App>>, UrlPath(id): UrlPath<String>, q: Result<Query<ImageQuery>, QueryRejection>) -> Response {
    // A bad query is refused in the JSON shape of every refusal (axum's own answer is text).
    let q = match q {
        Ok(Query(q)) => q,
        Err(_) => return error(StatusCode::BAD_REQUEST, "`index` must be a whole number from 0 (the image's place in the job's batch)", Some("index")),
    };
    let Some(e) = app.jobs.get(&id) else { return no_job(&id) };
    let index = q.index.unwrap_or(0);
    match e.outcome().as_deref() {
        None => error(StatusCode::CONFLICT, format!("job `{id}` is {}: its image is not made yet", serde_json::json!(e.progress().state).as_str().unwrap_or("")), None),
        Some(Outcome::Error { status, message }) => error(*status, message.clone(), None),
        Some(Outcome::Done(g)) => match g.images.get(index) {
            Some(png) => (StatusCode::OK, [(header::CONTENT_TYPE, "image/png")], png.clone()).into_response(),
            None => error(StatusCode::NOT_FOUND, format!("job `{id}` made {} image(s): no index {index}", g.images.len()), Some("index")),
        },
    }
}

/// `GET /v1/jobs/{id}/events`: server-sent events, `progress` ({state, step, steps}) as the job
/// moves, then `done` with the job's document.
async fn job_events(State(app): State<Arc<App>>, UrlPath(id): UrlPath<String>) -> Response {
    let Some(e) = app.jobs.get(&id) else { return no_job(&id) };
    let rx = e.subscribe();
    // (receiver, job, first event sent, done sent)
    let stream = futures_util::stream::unfold((rx, e, false, false), |(mut rx, e, started, done)| async move {
        if done {
            return None;
        }
        if started && rx.changed().await.is_err() {
            return None;
        }
        let p = *rx.borrow_and_update();
        let event = if p.state.finished() { Event::default().event("done").data(e.describe().to_string()) } else { Event::default().event("progress").data(serde_json::json!(p).to_string()) };
        let finished = p.state.finished();
        Some((Ok::<_, std::convert::Infallible>(event), (rx, e, true, finished)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}
