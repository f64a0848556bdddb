//! The alert intake: an HTTP(S) endpoint on the isolator (`--alerts-addr`) that takes
//! Alertmanager webhooks (`POST /v1/alerts/alertmanager`) and Alibaba Cloud system events
//! (`POST /v1/alerts/aliyun`), maps each alert through [`AlertMapping`] and the health policy, and
//! hands the findings to the [`Coordinator`] as if an agent had reported them.
//!
//! The repair system reports a node it fixed on the same listener (`POST
//! /v1/repairs/<node>/done`, optionally `{"ticket": "..."}`), which releases the node through the
//! coordinator as `ckptctl release` does and stamps the repair on the fault record.
//!
//! Authentication is the gRPC side's: a client certificate verified against `--client-ca`, or
//! `authorization: Bearer <token>` equal to `--token-file`. TLS is served when `--tls-cert` is
//! given. A payload is checked whole before anything is done: one alert that does not parse or
//! map refuses the payload (400 with the reason) and nothing of it is acted on.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ckptd_proto::v1::FaultAction;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::{ResolvesServerCert, WebPkiClientVerifier};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::alert::{self, NodeRef, Origin};
use super::coordinator::{AlertFault, Coordinator};
use super::mapping::{AlertMapping, Finding};
use crate::gate::Gate;
use crate::health::Policy;
use crate::{Error, ErrorKind, Result};

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;
/// How long a client may take for the TLS handshake, a request head or a body.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections open at once (alert senders are few and retry).
const MAX_CONNECTIONS: usize = 64;

type Body = Full<Bytes>;

/// What the intake needs: the coordinator, the mapping, the policy and the credentials.
pub struct Intake {
    coord: Arc<Coordinator>,
    mapping: AlertMapping,
    policy: Policy,
    token: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for Intake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intake").field("token", &self.token.is_some()).finish_non_exhaustive()
    }
}

impl Intake {
    /// An intake over `coord` that accepts `token` as a bearer token (and, where the TLS layer
    /// verified one, a client certificate).
    pub fn new(coord: Arc<Coordinator>, mapping: AlertMapping, policy: Policy, token: Option<Vec<u8>>) -> Intake {
        Intake { coord, mapping, policy, token: token.map(Arc::from) }
    }

    fn authorized(&self, req: &Request<Incoming>, verified_cert: bool) -> bool {
        if verified_cert {
            return true;
        }
        let Some(expected) = &self.token else { return false };
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|p| bool::from(p.as_bytes().ct_eq(expected)))
    }

    /// Parses and maps a whole payload; `Err` is the 400 reason.
    pub fn findings(&self, origin: Origin, body: &[u8]) -> std::result::Result<Vec<Finding>, String> {
        let alerts = alert::parse(origin, body)?;
        alerts
            .iter()
            .enumerate()
            .map(|(i, a)| self.mapping.map(a, &self.policy).map_err(|e| format!("alert {i}: {e}")))
            .collect()
    }

    /// Releases `node`, reported fixed with the optional body `{"ticket": "..."}`: 200 with the
    /// record stamped, 404 when ckptd did not isolate the node, 400 for a bad body or ticket.
    async fn repaired(&self, node: &str, body: &[u8]) -> Response<Body> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Done {
            ticket: Option<String>,
        }
        let done = if body.iter().all(u8::is_ascii_whitespace) {
            Done { ticket: None }
        } else {
            match serde_json::from_slice::<Done>(body) {
                Ok(d) => d,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("the body must be empty or {{\"ticket\": \"...\"}}: {e}"),
                    );
                }
            }
        };
        match self.coord.repaired(node, done.ticket.as_deref()).await {
            Ok(Some(d)) => respond(
                StatusCode::OK,
                &json!({
                    "node": node,
                    "released": true,
                    "record": d.record,
                    "job": d.job,
                    "repaired_at": humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(d.at)).to_string(),
                }),
            ),
            Ok(None) => error(
                StatusCode::NOT_FOUND,
                &format!("node {} is not isolated by ckptd", crate::text::capped(node, 64)),
            ),
            Err(e) => error(status_of(&e), &e.to_string()),
        }
    }

    /// Acts on the findings of one payload and says what became of each.
    async fn process(&self, origin: Origin, body: &[u8]) -> Response<Body> {
        let findings = match self.findings(origin, body) {
            Ok(f) => f,
            Err(reason) => {
                tracing::warn!(source = origin.as_str(), reason = %reason, "alert payload refused");
                return error(StatusCode::BAD_REQUEST, &reason);
            }
        };
        let mut results = Vec::with_capacity(findings.len());
        for f in findings {
            match self.one(&f).await {
                Ok(v) => results.push(v),
                Err(e) => return error(status_of(&e), &e.to_string()),
            }
        }
        respond(StatusCode::OK, &json!({ "results": results }))
    }

    async fn one(&self, f: &Finding) -> Result<Value> {
        let mut out = json!({
            "alert": f.alert, "source": f.origin.as_str(), "kind": f.kind, "action": f.action.as_str(),
        });
        if !f.firing {
            tracing::info!(source = f.origin.as_str(), alert = %f.alert, kind = %f.kind, node = ?f.node, "alert resolved: recorded, not acted on");
            out["outcome"] = json!("resolved");
            out["note"] = json!("resolved alerts are recorded, not acted on");
            return Ok(out);
        }
        let node = match &f.node {
            NodeRef::Name(n) => Some(n.clone()),
            NodeRef::Instance(id) => {
                let node = self.coord.node_of_instance(id).await?;
                if node.is_none() {
                    tracing::warn!(instance = %id, alert = %f.alert, "no node has this instance in its spec.providerID: recorded, not acted on");
                    out["outcome"] = json!("unknown-node");
                    out["note"] = json!(format!("no node's spec.providerID names instance {id}"));
                }
                node
            }
        };
        let Some(node) = node else { return Ok(out) };
        out["node"] = json!(node);
        let reply = self
            .coord
            .report_alert(AlertFault {
                node,
                kind: f.kind.clone(),
                action: f.action,
                source: f.origin.as_str().to_string(),
                evidence: f.evidence.clone(),
            })
            .await?;
        out["outcome"] = json!(reply.outcome.as_str());
        if !reply.note.is_empty() {
            out["note"] = json!(reply.note);
        }
        out["jobs"] = reply
            .jobs
            .iter()
            .map(|(job, ack)| {
                let taken =
                    FaultAction::try_from(ack.action).ok().and_then(|a| crate::health::Action::try_from(a).ok());
                json!({ "job": job, "action": taken.map(|a| a.as_str()), "note": ack.note })
            })
            .collect();
        Ok(out)
    }
}

/// The status of a coordinator error: 503 when the sender should retry (not the leader, the
/// cluster unreachable), 400 for a bad request, 500 otherwise.
fn status_of(e: &Error) -> StatusCode {
    match e.kind() {
        ErrorKind::NotLeader | ErrorKind::Cluster | ErrorKind::IsolatorUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// What a request asks for.
enum Route {
    /// An alert payload.
    Alerts(Origin),
    /// `POST /v1/repairs/<node>/done`.
    RepairDone(String),
}

fn respond(status: StatusCode, v: &Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(v.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    resp
}

fn error(status: StatusCode, reason: &str) -> Response<Body> {
    respond(status, &json!({ "error": reason }))
}

/// Routes one request. Never fails: every problem is a status with a JSON `{"error": ...}`.
pub async fn handle(req: Request<Incoming>, intake: Arc<Intake>, verified_cert: bool) -> Response<Body> {
    let route = match req.uri().path() {
        "/v1/alerts/alertmanager" => Route::Alerts(Origin::Alertmanager),
        "/v1/alerts/aliyun" => Route::Alerts(Origin::Aliyun),
        "/healthz" if req.method() == Method::GET => return respond(StatusCode::OK, &json!({ "ok": true })),
        p => match p.strip_prefix("/v1/repairs/").and_then(|rest| rest.strip_suffix("/done")) {
            Some(node) if !node.is_empty() && !node.contains('/') => Route::RepairDone(node.to_string()),
            _ => {
                return error(
                    StatusCode::NOT_FOUND,
                    &format!(
                        "no endpoint {}: POST to /v1/alerts/alertmanager, /v1/alerts/aliyun or /v1/repairs/<node>/done",
                        crate::text::capped(p, 64)
                    ),
                );
            }
        },
    };
    if req.method() != Method::POST {
        let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "use POST");
        r.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        return r;
    }
    if !intake.authorized(&req, verified_cert) {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "the isolator needs a client certificate signed by its CA or `authorization: Bearer <token>`",
        );
        r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        return r;
    }
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return error(StatusCode::BAD_REQUEST, &format!("the body is larger than {MAX_BODY} bytes"));
    }
    let body = match tokio::time::timeout(REQUEST_TIMEOUT, Limited::new(req.into_body(), MAX_BODY).collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            let reason = if e.is::<http_body_util::LengthLimitError>() {
                format!("the body is larger than {MAX_BODY} bytes")
            } else {
                format!("cannot read the body: {e}")
            };
            return error(StatusCode::BAD_REQUEST, &reason);
        }
        Err(_) => return error(StatusCode::BAD_REQUEST, "the body did not arrive within 10 s"),
    };
    match route {
        Route::Alerts(origin) => intake.process(origin, &body).await,
        Route::RepairDone(node) => intake.repaired(&node, &body).await,
    }
}

/// A TLS configuration for the intake: the certificate pair, and with `client_ca` client
/// certificates verified against it (optional when a token is accepted too, as on the gRPC side).
pub fn tls_config(cert: &Path, key: &Path, client_ca: Option<&Path>, token: bool) -> Result<Arc<ServerConfig>> {
    let store = crate::webhook::tls::CertStore::load(cert, key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config { what: "TLS".into(), reason: e.to_string() })?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let bad = |reason: String| Error::Config { what: format!("--client-ca {}", ca.display()), reason };
            let pem = std::fs::read(ca).map_err(|e| Error::unreadable("--client-ca", ca, &e))?;
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&pem) {
                roots.add(c.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let v = if token { v.allow_unauthenticated() } else { v };
            builder.with_client_cert_verifier(v.build().map_err(|e| bad(e.to_string()))?)
        }
    };
    let mut cfg = builder.with_cert_resolver(store as Arc<dyn ResolvesServerCert>);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Serves the intake on `listener` (TLS when `tls` is given) until `cancel`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    intake: Arc<Intake>,
    cancel: CancellationToken,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    let gate = Gate::new(MAX_CONNECTIONS);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(REQUEST_TIMEOUT);
    loop {
        let admission = tokio::select! {
            () = cancel.cancelled() => return,
            a = gate.admit() => a,
        };
        let (tcp, peer) = tokio::select! {
            () = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "alert intake: accept failed");
                    gate.evict_oldest_fresh();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, builder, intake, cancel) =
            (acceptor.clone(), builder.clone(), Arc::clone(&intake), cancel.clone());
        tokio::spawn(async move {
            let ticket = admission.ticket();
            let serve = async move {
                let service = |verified: bool| {
                    hyper::service::service_fn(move |req| {
                        ticket.established();
                        let intake = Arc::clone(&intake);
                        async move { Ok::<_, Infallible>(handle(req, intake, verified).await) }
                    })
                };
                let result = match acceptor {
                    Some(acceptor) => {
                        let tls = match tokio::time::timeout(REQUEST_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "alert intake: TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                        let verified = tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
                        builder.serve_connection(TokioIo::new(tls), service(verified)).await
                    }
                    None => builder.serve_connection(TokioIo::new(tcp), service(false)).await,
                };
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "alert intake connection ended");
                }
            };
            tokio::select! {
                () = serve => {}
                () = admission.must_close(REQUEST_TIMEOUT) => {
                    tracing::debug!(%peer, "alert intake connection closed before its first request");
                }
                () = cancel.cancelled() => {}
            }
        });
    }
}
