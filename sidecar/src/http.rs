//! The plain HTTP/1 endpoint both metrics ports serve (`ckptd agent --metrics-addr`, `ckptd
//! isolator --metrics-addr`): scrapes and probes, answered by a synchronous handler.
//!
//! A probe must get its answer while other peers misbehave, so connections pass a [`Gate`]: at the
//! bound a new connection evicts the oldest one that has not sent a whole request, and a
//! connection whose first request head is not complete within [`HEAD_DEADLINE`] is closed however
//! slowly it trickles bytes. Later request heads on a kept-alive connection have the same
//! deadline (hyper's header read timeout).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::gate::Gate;

/// The most connections a metrics port holds open.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a client may take to send a whole request head.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(5);

/// Serves `handler` on `listener` until `cancel`, within [`MAX_CONNECTIONS`] and [`HEAD_DEADLINE`].
pub async fn serve<H>(listener: TcpListener, handler: H, cancel: CancellationToken)
where
    H: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    let gate = Gate::new(MAX_CONNECTIONS);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEAD_DEADLINE);
    loop {
        let admission = tokio::select! {
            () = cancel.cancelled() => return,
            a = gate.admit() => a,
        };
        let (stream, peer) = tokio::select! {
            () = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: make idle peers give theirs back, and
                    // back off instead of spinning.
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    gate.evict_oldest_fresh();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (handler, builder, cancel) = (Arc::clone(&handler), builder.clone(), cancel.clone());
        tokio::spawn(async move {
            let ticket = admission.ticket();
            let svc = hyper::service::service_fn(move |req| {
                ticket.established();
                std::future::ready(Ok::<_, Infallible>(handler(&req)))
            });
            tokio::select! {
                r = builder.serve_connection(TokioIo::new(stream), svc) => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "metrics connection ended");
                    }
                }
                () = admission.must_close(HEAD_DEADLINE) => {
                    tracing::debug!(%peer, "metrics connection closed before its first request: evicted or too slow");
                }
                () = cancel.cancelled() => {}
            }
        });
    }
}
