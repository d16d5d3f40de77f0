//! `GET /metrics`: the server's counters in the Prometheus text format (OpenMetrics), through
//! the Prometheus project's own client crate.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route (`/v1/jobs/{id}`, not the id).
    pub path: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    pub path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `succeeded`, `failed`, `cancelled`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    pub device: String,
}

/// The request's method as a label: one of the methods the API or a client's probe may use,
/// else `other` (a method is the client's to invent: each would be a new series).
pub fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method as M;
    match *m {
        M::GET => "GET",
        M::POST => "POST",
        M::DELETE => "DELETE",
        M::HEAD => "HEAD",
        M::OPTIONS => "OPTIONS",
        M::PUT => "PUT",
        M::PATCH => "PATCH",
        _ => "other",
    }
}

fn http_histogram() -> Histogram {
    // 0.25 ms .. ~8 min: the HTTP path alone (a 429, a health check) and whole generations.
    Histogram::new(exponential_buckets(0.00025, 2.5, 16))
}

pub struct Metrics {
    registry: Registry,
    pub queue_depth: Gauge,
    pub running: Gauge,
    pub ready: Gauge,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Family<PathLabels, Histogram, fn() -> Histogram>,
    pub jobs: Family<OutcomeLabels, Counter>,
    pub generation_seconds: Histogram,
    pub step_seconds: Histogram,
    pub resident_bytes: Family<DeviceLabels, Gauge>,
    pub rss_bytes: Gauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("runner"),
            queue_depth: Gauge::default(),
            running: Gauge::default(),
            ready: Gauge::default(),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(http_histogram as fn() -> Histogram),
            jobs: Family::default(),
            generation_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            step_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            resident_bytes: Family::default(),
            rss_bytes: Gauge::default(),
        };
        // Registered handles share their values with the fields (the metric types are `Arc`s).
        let r = &mut m.registry;
        r.register("queue_depth", "Requests waiting for the worker", m.queue_depth.clone());
        r.register("jobs_running", "Generations running now (0 or 1)", m.running.clone());
        r.register("ready", "1 once the weights are loaded and the warm-up generation is done", m.ready.clone());
        r.register("http_requests", "HTTP requests answered, by route, method and status", m.requests.clone());
        r.register_with_unit("http_request_duration", "Time to answer an HTTP request, by route", Unit::Seconds, m.request_seconds.clone());
        r.register("generations", "Generations ended, by outcome", m.jobs.clone());
        r.register_with_unit("generation_duration", "Time the worker spent on one generation (encode, denoise, decode, PNG)", Unit::Seconds, m.generation_seconds.clone());
        r.register_with_unit("step_duration", "Time of one denoising step", Unit::Seconds, m.step_seconds.clone());
        r.register_with_unit("device_resident", "Weight bytes resident on each planned device between generations (the ledger)", Unit::Bytes, m.resident_bytes.clone());
        r.register_with_unit("process_resident_memory", "This process's resident set", Unit::Bytes, m.rss_bytes.clone());
        m
    }

    /// The text of `GET /metrics`.
    pub fn encode(&self) -> String {
        if let Some((rss, _)) = runner::exec::allocator::host_rss() {
            self.rss_bytes.set(rss as i64);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
