//! The trainer socket's accept loop: every connection passes the agent's [`Gate`], so idle peers
//! cannot take every connection (or every file descriptor) from the trainers and `ckptctl`.
//!
//! Each accepted stream carries its gate admission. Its [`Peer`] (the gate's [`Ticket`] and the
//! connecting process's pid from the socket's peer credentials) is the connection's tonic connect
//! info, and [`EstablishLayer`] marks the connection established when its first request arrives. A connection that is evicted, or sends no request within [`FRESH_DEADLINE`], fails its
//! next read, and hyper closes it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::server::Connected;

use crate::gate::{Gate, Ticket};

/// How long a connection may stay open without sending a request.
pub(super) const FRESH_DEADLINE: Duration = Duration::from_secs(10);

/// Connections accepted through `gate`; ends never (tonic stops polling it at shutdown).
pub(super) struct Incoming {
    listener: Arc<UnixListener>,
    gate: Arc<Gate>,
    next: Pin<Box<dyn Future<Output = GatedStream> + Send>>,
}

impl Incoming {
    pub(super) fn new(listener: UnixListener, gate: Arc<Gate>) -> Incoming {
        let listener = Arc::new(listener);
        let next = Box::pin(accept(Arc::clone(&listener), Arc::clone(&gate)));
        Incoming { listener, gate, next }
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = Result<GatedStream, std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let stream = std::task::ready!(self.next.as_mut().poll(cx));
        self.next = Box::pin(accept(Arc::clone(&self.listener), Arc::clone(&self.gate)));
        Poll::Ready(Some(Ok(stream)))
    }
}

/// Admits, then accepts, one connection. Accept failures (out of file descriptors) evict the
/// oldest fresh connection so that its descriptor comes back, and back off instead of spinning.
async fn accept(listener: Arc<UnixListener>, gate: Arc<Gate>) -> GatedStream {
    let admission = Arc::new(gate.admit().await);
    loop {
        match listener.accept().await {
            Ok((io, _)) => {
                let closing = Arc::clone(&admission);
                // SO_PEERCRED: the pid as this agent's pid namespace sees it; 0 (dropped here)
                // when the trainer's process is not visible from it.
                let pid = io.peer_cred().ok().and_then(|c| c.pid()).filter(|&p| p > 0);
                return GatedStream {
                    io,
                    peer: Peer { ticket: admission.ticket(), pid },
                    must_close: Box::pin(async move { closing.must_close(FRESH_DEADLINE).await }),
                };
            }
            Err(e) => {
                tracing::warn!(error = %e, "trainer socket: accept failed");
                gate.evict_oldest_fresh();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// An accepted connection holding its gate admission (inside `must_close`) until it is dropped.
pub(super) struct GatedStream {
    io: UnixStream,
    peer: Peer,
    must_close: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl GatedStream {
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.must_close.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "closed before its first request: evicted for a newer connection or too slow",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

/// Who is at the other end of a trainer-socket connection.
#[derive(Debug, Clone)]
pub(super) struct Peer {
    pub ticket: Ticket,
    /// The connecting process, when it is visible in this agent's pid namespace (a pod that
    /// shares its process namespace, or a test on one machine): the target of the last-resort
    /// signal after a restart order (see `Agent::order_restore`).
    pub pid: Option<i32>,
}

impl Connected for GatedStream {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for GatedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for GatedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Marks a connection established on its first request (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct EstablishLayer;

impl<S> tower::Layer<S> for EstablishLayer {
    type Service = Establish<S>;

    fn layer(&self, inner: S) -> Establish<S> {
        Establish { inner }
    }
}

/// The service of [`EstablishLayer`].
#[derive(Debug, Clone)]
pub(super) struct Establish<S> {
    inner: S,
}

impl<S, B> tower::Service<hyper::Request<B>> for Establish<S>
where
    S: tower::Service<hyper::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: hyper::Request<B>) -> S::Future {
        if let Some(peer) = req.extensions().get::<Peer>() {
            peer.ticket.established();
        }
        self.inner.call(req)
    }
}
