//! The agent's Prometheus metrics and the small HTTP endpoint that serves them with `/healthz`.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// A `rank` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RankLabel {
    /// The global rank.
    pub rank: String,
}

/// A `source` label for restores: `memory` or `storage`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// Where the restored bytes came from.
    pub source: String,
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    /// Time trainers spent blocked in `save()`, as they report it at handover.
    pub save_stall: Histogram,
    /// Shard bytes written to the store.
    pub persist_bytes: Counter,
    /// Time from handover to durable (shard written and, on rank 0, committed).
    pub persist_seconds: Histogram,
    /// Snapshots handed over and not yet durable.
    pub queue_depth: Gauge,
    /// Saves that failed.
    pub persist_failures: Counter,
    /// Newest durable step, per rank.
    pub last_durable_step: Family<RankLabel, Gauge>,
    /// Snapshots persisted for a trainer that died before handing them over.
    pub flushed: Counter,
    /// Restores staged in the arena, by source.
    pub restores: Family<SourceLabel, Counter>,
    /// Trainer sessions open.
    pub attached: Gauge,
    /// Committed steps a restore passed over because their data was damaged.
    pub damaged_steps: Counter,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Arc<Metrics> {
        let m = Metrics {
            save_stall: Histogram::new(exponential_buckets(1e-4, 2.0, 18)),
            persist_bytes: Counter::default(),
            persist_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 14)),
            queue_depth: Gauge::default(),
            persist_failures: Counter::default(),
            last_durable_step: Family::default(),
            flushed: Counter::default(),
            restores: Family::default(),
            attached: Gauge::default(),
            damaged_steps: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("ckptd");
        r.register(
            "restore_damaged_steps",
            "Committed steps a restore passed over because their data failed verification",
            m.damaged_steps.clone(),
        );
        r.register("save_stall_seconds", "Time trainers spent blocked in save()", m.save_stall.clone());
        r.register("persist_bytes", "Shard bytes written to the store", m.persist_bytes.clone());
        r.register("persist_seconds", "Time from handover to durable and committed", m.persist_seconds.clone());
        r.register("persist_queue_depth", "Snapshots handed over and not yet durable", m.queue_depth.clone());
        r.register("persist_failures", "Saves that failed", m.persist_failures.clone());
        r.register("last_durable_step", "Newest durable step of each rank", m.last_durable_step.clone());
        r.register("flushed_snapshots", "Snapshots persisted after their trainer died", m.flushed.clone());
        r.register("restores", "Restores staged in the arena, by source", m.restores.clone());
        r.register("attached_trainers", "Trainer sessions open", m.attached.clone());
        Arc::new(m)
    }
}

/// Serves `GET /metrics` and `GET /healthz` on `addr` until `shutdown`, with the connection bound
/// and request-head deadline of [`crate::http`].
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| Error::Config {
        what: "--metrics-addr".into(),
        reason: format!("cannot listen on {addr}: {e}"),
    })?;
    Ok(tokio::spawn(crate::http::serve(listener, move |req| respond(req, &registry), shutdown)))
}

fn respond(req: &Request<hyper::body::Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let text = |code: StatusCode, body: String, ctype: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(ctype));
        r
    };
    match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => text(StatusCode::OK, body, "application/openmetrics-text; version=1.0.0; charset=utf-8"),
                Err(e) => {
                    text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode metrics: {e}\n"), "text/plain")
                }
            }
        }
        (&hyper::Method::GET, "/healthz") => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics or /healthz\n".into(), "text/plain"),
    }
}
