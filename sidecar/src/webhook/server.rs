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
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::config::Config;
use super::mutate::mutate;
use super::templates::{JOB_KINDS, propagate};
use super::tls::CertStore;
use crate::{Error, Result};

/// How long a client may take to finish the TLS handshake or send the request head: the API server
/// does both in milliseconds, and a slow peer must not hold a connection slot.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most connections served at once; more wait in the kernel's accept queue.
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
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HANDSHAKE_TIMEOUT);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, builder, cfg, mut stop) = (acceptor.clone(), builder.clone(), Arc::clone(&cfg), stop_rx.clone());
        tokio::spawn(async move {
            let _permit = permit;
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
            let service = hyper::service::service_fn(move |req| handle(req, Arc::clone(&cfg)));
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
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection task holds a permit: having them all back means every connection is closed.
    let all = MAX_CONNECTIONS as u32;
    if tokio::time::timeout(SHUTDOWN_GRACE, slots.acquire_many(all)).await.is_err() {
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
            match Limited::new(req.into_body(), limit).collect().await {
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
            tracing::info!(pod = %pod_name, %namespace, ops = patch.0.len(), "injecting the agent");
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
