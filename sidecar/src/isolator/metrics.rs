//! The isolator's Prometheus metrics and the small HTTP endpoint that serves them with `/healthz`
//! (always 200 while the process runs) and `/readyz` (200 only on the Lease holder, so a Service
//! routes agents to the leader).

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::state::{ALL_STATES, JobState};

/// Label set `{job}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabel {
    /// The job.
    pub job: String,
}

/// Label set `{job, state}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobStateLabel {
    /// The job.
    pub job: String,
    /// The state name.
    pub state: String,
}

type U64Gauge = Gauge<u64, AtomicU64>;

/// Every isolator metric.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    job_state: Family<JobStateLabel, U64Gauge>,
    generation: Family<JobLabel, U64Gauge>,
    latest_global_step: Family<JobLabel, U64Gauge>,
    stragglers: Family<JobLabel, U64Gauge>,
    isolated_nodes: U64Gauge,
    circuit_open: U64Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut r = Registry::default();
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            job_state: Family::default(),
            generation: Family::default(),
            latest_global_step: Family::default(),
            stragglers: Family::default(),
            isolated_nodes: U64Gauge::default(),
            circuit_open: U64Gauge::default(),
        };
        r.register("ckptd_isolator_job_state", "1 for the state each job is in", m.job_state.clone());
        r.register("ckptd_isolator_generation", "Restart generation of each job", m.generation.clone());
        r.register(
            "ckptd_isolator_latest_global_step",
            "Newest globally committed step of each job",
            m.latest_global_step.clone(),
        );
        r.register("ckptd_isolator_stragglers", "Ranks flagged as stragglers", m.stragglers.clone());
        r.register("ckptd_isolator_isolated_nodes", "Nodes the isolator holds isolated", m.isolated_nodes.clone());
        r.register(
            "ckptd_isolator_circuit_open",
            "1 while the circuit breaker refuses isolations (alert only)",
            m.circuit_open.clone(),
        );
        if let Ok(mut g) = m.registry.lock() {
            *g = r;
        }
        m
    }

    /// Publishes one job's figures.
    pub fn job(&self, job: &str, state: JobState, generation: u64, committed: Option<u64>, stragglers: usize) {
        for s in ALL_STATES {
            let l = JobStateLabel { job: job.to_string(), state: s.name().to_string() };
            self.job_state.get_or_create(&l).set(u64::from(s == state));
        }
        let l = JobLabel { job: job.to_string() };
        self.generation.get_or_create(&l).set(generation);
        if let Some(step) = committed {
            self.latest_global_step.get_or_create(&l).set(step);
        }
        self.stragglers.get_or_create(&l).set(stragglers as u64);
    }

    /// Publishes the number of isolated nodes.
    pub fn isolated_nodes(&self, n: usize) {
        self.isolated_nodes.set(n as u64);
    }

    /// Publishes the breaker's state.
    pub fn circuit_open(&self, open: bool) {
        self.circuit_open.set(u64::from(open));
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `cancel`, with the connection
/// bound and request-head deadline of [`crate::http`].
pub async fn serve(
    listener: TcpListener,
    metrics: std::sync::Arc<Metrics>,
    leader: watch::Receiver<bool>,
    cancel: CancellationToken,
) {
    crate::http::serve(listener, move |req| respond(req.uri().path(), &metrics, *leader.borrow()), cancel).await
}

fn respond(path: &str, metrics: &Metrics, leader: bool) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match path {
        "/metrics" => (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.encode()),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" if leader => (StatusCode::OK, "text/plain", "leader\n".to_string()),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not the leader\n".to_string()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_string()),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(ctype));
    r
}
