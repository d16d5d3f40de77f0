//! Jobs: what a request asked for, its progress as the worker reports it, and its outcome. A
//! job is cancelled (a `DELETE`, its deadline, a client that hung up, a drain that ran out of
//! time) by ending it at once with the reason's status: a queued job never runs, a running one
//! stops where its current step ends.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use runner::manifest::LoadedManifest;
use serde::Serialize;
use tokio::sync::watch;

/// Finished asynchronous jobs kept for `GET /v1/jobs/{id}` (the oldest go first).
pub const KEEP_FINISHED: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl Phase {
    pub fn finished(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Cancelled)
    }
}

/// What `GET /v1/jobs/{id}` and the event stream report as it changes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Progress {
    pub state: Phase,
    /// Denoising steps done.
    pub step: usize,
    /// Of how many (0 until the worker has set the schedule up).
    pub steps: usize,
}

/// Why a job ends without its images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    /// `DELETE /v1/jobs/{id}`.
    Deleted,
    /// `[serve] timeout` passed.
    Deadline,
    /// The client of `POST /v1/images` closed its connection.
    Disconnected,
    /// SIGTERM/SIGINT and `--drain-timeout` passed.
    Shutdown,
}

impl Cancel {
    fn outcome(self) -> (Phase, StatusCode, &'static str) {
        match self {
            Cancel::Deleted => (Phase::Cancelled, StatusCode::GONE, "cancelled by a DELETE"),
            Cancel::Deadline => (Phase::Failed, StatusCode::GATEWAY_TIMEOUT, "over this server's deadline `serve.timeout`"),
            // 499 as nginx logs it: nobody reads the answer.
            Cancel::Disconnected => (Phase::Cancelled, StatusCode::from_u16(499).expect("499 is a valid status"), "the client closed the connection"),
            Cancel::Shutdown => (Phase::Cancelled, StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down"),
        }
    }
}

/// A finished job's images and figures.
pub struct Generated {
    pub images: Vec<Vec<u8>>,
    pub report: runner::exec::RunReport,
}

pub enum Outcome {
    Done(Box<Generated>),
    Error { status: StatusCode, message: String },
}

#[derive(Default)]
struct Times {
    started: Option<Instant>,
    finished: Option<Instant>,
}

/// The places of the queue: `[serve] queue` jobs may wait. A job holds its place from its
/// acceptance until the worker takes it or it ends (a cancelled job frees its place at once,
/// though the worker skips it later).
pub struct Places {
    limit: usize,
    taken: AtomicUsize,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Places {
    pub fn new(limit: usize, gauge: prometheus_client::metrics::gauge::Gauge) -> Arc<Places> {
        Arc::new(Places { limit, taken: AtomicUsize::new(0), gauge })
    }

    pub fn full(&self) -> bool {
        self.taken.load(Ordering::SeqCst) >= self.limit
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A place, or `false` when all are taken.
    fn take(&self) -> bool {
        let ok = self.taken.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < self.limit).then_some(n + 1)).is_ok();
        if ok {
            self.gauge.inc();
        }
        ok
    }

    fn give_back(&self) {
        self.taken.fetch_sub(1, Ordering::SeqCst);
        self.gauge.dec();
    }
}

pub struct Entry {
    pub id: String,
    /// The queue place this job holds while it waits.
    place: Mutex<Option<Arc<Places>>>,
    /// The request, checked; taken by the worker.
    request: Mutex<Option<Box<LoadedManifest>>>,
    pub json: bool,
    /// The request's `latents`, as data.
    pub latents: Option<Arc<runner::exec::latents::LatentsData>>,
    /// The request's `image` (and `mask_image`), decoded.
    pub init: Option<Arc<runner::exec::InitImages>>,
    pub created: Instant,
    created_unix: f64,
    pub deadline: Option<Instant>,
    cancel: Mutex<Option<Cancel>>,
    progress: watch::Sender<Progress>,
    outcome: Mutex<Option<Arc<Outcome>>>,
    times: Mutex<Times>,
}

/// A fresh job id: 16 hex digits, unique in this process and unlikely to repeat across restarts.
fn new_id() -> String {
    use sha2::{Digest, Sha256};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    let h = Sha256::digest(format!("{t}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    h[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl Entry {
    pub fn new(m: LoadedManifest, json: bool, latents: Option<Arc<runner::exec::latents::LatentsData>>, init: Option<Arc<runner::exec::InitImages>>, timeout: Option<f64>) -> Arc<Entry> {
        let created = Instant::now();
        Arc::new(Entry {
            id: new_id(),
            place: Mutex::new(None),
            request: Mutex::new(Some(Box::new(m))),
            json,
            latents,
            init,
            created,
            created_unix: SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64(),
            deadline: timeout.map(|t| created + std::time::Duration::from_secs_f64(t)),
            cancel: Mutex::new(None),
            progress: watch::Sender::new(Progress { state: Phase::Queued, step: 0, steps: 0 }),
            outcome: Mutex::new(None),
            times: Mutex::new(Times::default()),
        })
    }

    /// Takes a queue place for this job: `false` when the queue is full.
    pub fn wait_in(&self, places: &Arc<Places>) -> bool {
        let ok = places.take();
        if ok {
            *self.place.lock().unwrap_or_else(|e| e.into_inner()) = Some(places.clone());
        }
        ok
    }

    /// Gives the job's queue place back (once).
    pub fn leave_queue(&self) {
        if let Some(p) = self.place.lock().unwrap_or_else(|e| e.into_inner()).take() {
            p.give_back();
        }
    }

    pub fn progress(&self) -> Progress {
        *self.progress.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    pub fn outcome(&self) -> Option<Arc<Outcome>> {
        self.outcome.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Resolves once the job has ended.
    pub async fn finished(&self) -> Arc<Outcome> {
        let mut rx = self.progress.subscribe();
        // The sender lives in `self`: the wait ends only by the job ending.
        let _ = rx.wait_for(|p| p.state.finished()).await;
        self.outcome().expect("a finished job has an outcome")
    }

    /// The worker takes the job: `None` when it has ended already (cancelled while queued).
    pub fn start(&self) -> Option<Box<LoadedManifest>> {
        self.leave_queue();
        let m = self.request.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        if self.outcome().is_some() {
            return None;
        }
        self.times.lock().unwrap_or_else(|e| e.into_inner()).started = Some(Instant::now());
        self.progress.send_modify(|p| p.state = Phase::Running);
        Some(m)
    }

    /// Ends the job with `outcome` unless it has ended already (the first end wins: a cancel
    /// answers at once; the worker's result of a step it was in is then dropped).
    pub fn finish(&self, outcome: Outcome, phase: Phase) -> bool {
        let mut slot = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return false;
        }
        *slot = Some(Arc::new(outcome));
        drop(slot);
        self.leave_queue();
        self.request.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.times.lock().unwrap_or_else(|e| e.into_inner()).finished = Some(Instant::now());
        self.progress.send_modify(|p| p.state = phase);
        true
    }

    /// Cancels the job for `why`: it ends now; a running generation stops where its step ends.
    pub fn cancel(&self, why: Cancel) -> bool {
        self.cancel.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(why);
        let (phase, status, message) = why.outcome();
        self.finish(Outcome::Error { status, message: message.to_string() }, phase)
    }

    /// Why the worker should stop before its next step of `n` (which the progress reports).
    pub fn should_stop(&self, n: usize) -> Option<String> {
        self.progress.send_if_modified(|p| {
            let changed = p.steps != n;
            p.steps = n;
            changed
        });
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            self.cancel(Cancel::Deadline);
        }
        let why = (*self.cancel.lock().unwrap_or_else(|e| e.into_inner()))?;
        Some(why.outcome().2.to_string())
    }

    pub fn stepped(&self, i: usize, n: usize) {
        self.progress.send_modify(|p| {
            p.step = i + 1;
            p.steps = n;
        });
    }

    /// `GET /v1/jobs/{id}`'s document.
    pub fn describe(&self) -> serde_json::Value {
        let p = self.progress();
        let t = self.times.lock().unwrap_or_else(|e| e.into_inner());
        let secs = |a: Instant, b: Option<Instant>| b.map(|b| b.duration_since(a).as_secs_f64());
        let now = Some(Instant::now());
        let mut v = serde_json::json!({
            "id": self.id,
            "state": p.state,
            "step": p.step,
            "steps": p.steps,
            "created": self.created_unix,
            "timings": {
                "queued_s": secs(self.created, t.started.or(t.finished).or(now)),
                "running_s": t.started.and_then(|s| secs(s, t.finished.or(now))),
                "total_s": secs(self.created, t.finished.or(now)),
            },
            "links": { "self": format!("/v1/jobs/{}", self.id), "image": format!("/v1/jobs/{}/image", self.id), "events": format!("/v1/jobs/{}/events", self.id) },
        });
        match self.outcome().as_deref() {
            Some(Outcome::Done(g)) => {
                v["images"] = g.images.len().into();
                v["seed"] = g.report.seed.into();
                v["width"] = g.report.width.into();
                v["height"] = g.report.height.into();
                v["warnings"] = serde_json::json!(g.report.warnings);
            }
            Some(Outcome::Error { status, message }) => v["error"] = serde_json::json!({ "status": status.as_u16(), "message": message }),
            None => {}
        }
        v
    }
}

/// Every job not yet ended (for the drain), and the asynchronous jobs by id.
#[derive(Default)]
pub struct Table {
    by_id: Mutex<HashMap<String, Arc<Entry>>>,
    /// Ids in the order they came, to forget the oldest finished ones.
    order: Mutex<VecDeque<String>>,
    live: Mutex<Vec<Weak<Entry>>>,
}

impl Table {
    /// Tracks `e` for the drain (every job) and, when `listed`, by id.
    pub fn add(&self, e: &Arc<Entry>, listed: bool) {
        let mut live = self.live.lock().unwrap_or_else(|x| x.into_inner());
        live.retain(|w| w.upgrade().is_some_and(|e| !e.progress().state.finished()));
        live.push(Arc::downgrade(e));
        drop(live);
        if !listed {
            return;
        }
        let mut by_id = self.by_id.lock().unwrap_or_else(|x| x.into_inner());
        let mut order = self.order.lock().unwrap_or_else(|x| x.into_inner());
        by_id.insert(e.id.clone(), e.clone());
        order.push_back(e.id.clone());
        // Forget the oldest finished jobs beyond the limit (unfinished ones are bounded by the queue).
        let finished = order.iter().filter(|id| by_id.get(*id).is_some_and(|e| e.progress().state.finished())).count();
        let mut excess = finished.saturating_sub(KEEP_FINISHED);
        order.retain(|id| {
            if excess > 0 && by_id.get(id).is_some_and(|e| e.progress().state.finished()) {
                by_id.remove(id);
                excess -= 1;
                false
            } else {
                true
            }
        });
    }

    pub fn get(&self, id: &str) -> Option<Arc<Entry>> {
        self.by_id.lock().unwrap_or_else(|x| x.into_inner()).get(id).cloned()
    }

    pub fn remove(&self, id: &str) {
        self.by_id.lock().unwrap_or_else(|x| x.into_inner()).remove(id);
        self.order.lock().unwrap_or_else(|x| x.into_inner()).retain(|x| x != id);
    }

    /// The jobs not yet ended.
    pub fn live(&self) -> Vec<Arc<Entry>> {
        self.live.lock().unwrap_or_else(|x| x.into_inner()).iter().filter_map(Weak::upgrade).filter(|e| !e.progress().state.finished()).collect()
    }
}
