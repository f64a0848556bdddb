//! The HTTPS shell around [`mutate`](super::mutate()): TLS, routing, body limits, AdmissionReview
//! decoding and encoding. Nothing here decides anything about a pod.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::config::Config;
use super::mutate::mutate;
use super::templates::{JOB_KINDS, propagate};
use super::tls::CertStore;
use crate::gate::Gate;
use crate::{Error, Result};

/// How long a client may take to finish the TLS handshake and send its first request head, to send
/// any later request head on a kept-alive connection, and to send a request body: the API server
/// does each in milliseconds, and a slow peer must not hold a connection slot.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// The most connections open at once. At the bound, a new connection evicts the oldest one that
/// has not sent a whole request yet ([`Gate`]); only when every connection has, it waits in the
/// kernel's accept queue.
const MAX_CONNECTIONS: usize = 1024;
/// How long in-flight requests may take to finish after shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

type Body = Full<Bytes>;

/// Serves the webhook on `listener` until `shutdown` resolves, then lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    cfg: Arc<Config>,
    certs: Arc<CertStore>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let acceptor = TlsAcceptor::from(certs.server_config()?);
    let gate = Gate::new(MAX_CONNECTIONS);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HANDSHAKE_TIMEOUT);
    // HTTP/2 has no header timeout: pings find dead peers, and the gate's fresh deadline ends a
    // connection that never completes a request.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(HANDSHAKE_TIMEOUT))
        .keep_alive_timeout(HANDSHAKE_TIMEOUT);
    tokio::pin!(shutdown);
    loop {
        let admission = tokio::select! {
            _ = &mut shutdown => break,
            a = gate.admit() => a,
        };
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: make idle peers give theirs back, and
                    // back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    gate.evict_oldest_fresh();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, builder, cfg, mut stop) = (acceptor.clone(), builder.clone(), Arc::clone(&cfg), stop_rx.clone());
        tokio::spawn(async move {
            let ticket = admission.ticket();
            let serve = async {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                let service = hyper::service::service_fn(move |req| {
                    ticket.established();
                    handle(req, Arc::clone(&cfg))
                });
                let conn = builder.serve_connection(TokioIo::new(tls), service);
                tokio::pin!(conn);
                let result = tokio::select! {
                    r = conn.as_mut() => r,
                    _ = async { drop(stop.wait_for(|stopping| *stopping).await) } => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            };
            tokio::select! {
                () = serve => {}
                () = admission.must_close(HANDSHAKE_TIMEOUT) => {
                    tracing::debug!(%peer, "connection closed before its first request: evicted or too slow");
                }
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection task holds an admission: having every slot back means every connection is
    // closed.
    if !gate.drained(SHUTDOWN_GRACE).await {
        tracing::warn!("connections still open after the shutdown grace period");
    }
    Ok(())
}

/// Routes one request. Never fails: every problem becomes an HTTP status with a one-line message.
pub async fn handle(req: Request<Incoming>, cfg: Arc<Config>) -> std::result::Result<Response<Body>, Infallible> {
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") | (&Method::GET, "/readyz") => text(StatusCode::OK, "ok"),
        (&Method::POST, "/mutate") => {
            let limit = cfg.file.max_body_bytes;
            let body = tokio::time::timeout(BODY_TIMEOUT, Limited::new(req.into_body(), limit).collect()).await;
            let Ok(body) = body else {
                return Ok(text(
                    StatusCode::REQUEST_TIMEOUT,
                    &format!("the request body did not arrive within {} s", BODY_TIMEOUT.as_secs()),
                ));
            };
            match body {
                // Decoding up to maxBodyBytes of JSON is CPU work that can take milliseconds: keep it
                // off the async workers.
                Ok(body) => {
                    let bytes = body.to_bytes();
                    let cfg = Arc::clone(&cfg);
                    tokio::task::spawn_blocking(move || review_response(&bytes, &cfg)).await.unwrap_or_else(|e| {
                        tracing::error!(error = %e, "review task failed");
                        text(StatusCode::INTERNAL_SERVER_ERROR, "the review failed inside the webhook")
                    })
                }
                Err(e) if e.is::<http_body_util::LengthLimitError>() => text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("request body is larger than {limit} bytes (maxBodyBytes)"),
                ),
                Err(e) => text(StatusCode::BAD_REQUEST, &format!("cannot read the request body: {e}")),
            }
        }
        (_, "/mutate" | "/healthz" | "/readyz") => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => text(StatusCode::NOT_FOUND, "not found: the webhook serves POST /mutate, GET /healthz and GET /readyz"),
    })
}

/// Decodes an AdmissionReview, runs `mutate` and encodes the answer: 200 with a review for anything
/// that is a review, 400 with a message for anything that is not.
pub fn review_response(body: &[u8], cfg: &Config) -> Response<Body> {
    match review(body, cfg) {
        Ok(resp) => match encode_review(resp) {
            Ok(json) => Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(json)))
                .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "cannot build the response")),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot encode the response: {e}")),
        },
        Err(reason) => text(StatusCode::BAD_REQUEST, &reason),
    }
}

/// The response review as the API server reads it. `patch` is a Go `[]byte`, which JSON carries as
/// base64; kube's `AdmissionResponse` serialises it as an array of numbers (kube-rs issue 1781), so it
/// is re-encoded here.
pub fn encode_review(resp: AdmissionResponse) -> serde_json::Result<Vec<u8>> {
    use base64::Engine;
    let patch = resp.patch.clone();
    let mut review = serde_json::to_value(resp.into_review())?;
    if let (Some(bytes), Some(slot)) = (patch, review.pointer_mut("/response/patch")) {
        *slot = serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    serde_json::to_vec(&review)
}

/// The admission decision for one review body, or why the body is not a review.
pub fn review(body: &[u8], cfg: &Config) -> std::result::Result<AdmissionResponse, String> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| format!("the body is not an AdmissionReview: {e}"))?;
    if review.types.api_version != "admission.k8s.io/v1" || review.types.kind != "AdmissionReview" {
        return Err(format!(
            "expected apiVersion admission.k8s.io/v1, kind AdmissionReview; got {} {} (set admissionReviewVersions: [v1])",
            review.types.api_version, review.types.kind
        ));
    }
    // `try_into` copies the review's apiVersion and kind into the request, and from there into the
    // response: the API server rejects a response without them.
    let req: AdmissionRequest<DynamicObject> =
        review.try_into().map_err(|_| "the AdmissionReview has no request".to_string())?;
    let resp = AdmissionResponse::from(&req);
    let (group, kind) = (req.kind.group.as_str(), req.kind.kind.as_str());
    if req.operation == Operation::Create && req.sub_resource.is_none() && JOB_KINDS.contains(&(group, kind)) {
        let Some(obj) = &req.object else { return Err(format!("a {kind} CREATE review without request.object")) };
        let job = serde_json::to_value(obj).map_err(|e| format!("request.object is not a valid {kind}: {e}"))?;
        let patch = propagate(group, kind, &job);
        if patch.0.is_empty() {
            return Ok(resp);
        }
        let name = obj.metadata.name.clone().or_else(|| obj.metadata.generate_name.clone()).unwrap_or_default();
        tracing::info!(%kind, job = %name, ops = patch.0.len(), "labelling pod templates for injection");
        return resp.with_patch(patch).map_err(|e| e.to_string());
    }
    let is_pod = req.kind.group.is_empty() && req.kind.version == "v1" && req.kind.kind == "Pod";
    if !is_pod || req.operation != Operation::Create || req.sub_resource.is_some() {
        return Ok(resp);
    }
    let Some(obj) = req.object else { return Err("a pod CREATE review without request.object".into()) };
    let pod: Pod = serde_json::to_value(&obj)
        .and_then(serde_json::from_value)
        .map_err(|e| format!("request.object is not a valid Pod: {e}"))?;
    let pod_name = pod.metadata.name.clone().or_else(|| pod.metadata.generate_name.clone()).unwrap_or_default();
    let namespace = req.namespace.clone().unwrap_or_default();
    match mutate(&pod, cfg) {
        Ok(patch) if patch.0.is_empty() => Ok(resp),
        Ok(patch) => {
            if super::mutate::has_agent(&pod) {
                tracing::info!(pod = %pod_name, %namespace, ops = patch.0.len(), "giving the agent the pod's workload identity");
            } else {
                tracing::info!(pod = %pod_name, %namespace, ops = patch.0.len(), "injecting the agent");
            }
            resp.with_patch(patch).map_err(|e| e.to_string())
        }
        Err(denial) => {
            tracing::info!(pod = %pod_name, %namespace, reason = %denial, "pod denied");
            let mut resp = resp.deny(denial.to_string());
            resp.result.code = 403;
            resp.result.reason = "Forbidden".into();
            Ok(resp)
        }
    }
}

fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{msg}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// Binds `addr` (`--listen`).
pub async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|source| Error::Listen {
        what: "the webhook's HTTPS (--listen)",
        addr: addr.to_string(),
        source,
    })
}
