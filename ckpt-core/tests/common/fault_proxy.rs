//! A fault-injecting HTTP/1 proxy that sits between an S3 client and the loopback S3 server.
//!
//! Store-fault tests must show that saves retry through transient errors and fail cleanly on
//! persistent ones. A mock store cannot prove that, because the retry logic under test lives in
//! the real HTTP client. So tests point the real client at this proxy, and the proxy forwards to
//! the real server, except when its [`FaultPlan`] says to answer `503 SlowDown`, to delay, to
//! drop the connection without a response, or to cut a response body off half-way.
//!
//! Faults are decided per request, never per connection, from a seeded xorshift generator, so a
//! plan replays the same decisions for the same request sequence. Requests are forwarded with
//! their method, path, query and headers unchanged (the `Host` header included, since SigV4
//! signs it), and bodies are streamed both ways; only a truncated response is buffered, and
//! only that one response.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// How long [`FaultProxy::shutdown`] lets in-flight requests finish before aborting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop cannot spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// How long a truncated body stays open after its first half, so hyper flushes the status line
/// and the partial body to the socket before the connection is torn down.
const TRUNCATE_FLUSH_GRACE: Duration = Duration::from_millis(20);

type BoxError = Box<dyn StdError + Send + Sync>;
type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// What the proxy does to the requests it sees; replace it at any time with
/// [`FaultProxy::set_plan`].
///
/// The default plan forwards everything untouched. For each request that matches
/// [`only_methods`](Self::only_methods), the proxy first applies [`fail_first_n`](Self::fail_first_n),
/// then rolls, in this order and each independently: delay, error, drop, truncate. The first of
/// error, drop and truncate that hits wins; a delay applies before whichever action follows.
/// Rates are probabilities in `[0, 1]`: `0` never fires, `1` always does.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultPlan {
    /// Answer `503 SlowDown` with an S3 XML error body instead of forwarding.
    pub error_rate: f64,
    /// Read the request, then close the connection without any response.
    pub drop_rate: f64,
    /// Forward the request, then send the status line, headers and half of the body (so the
    /// `Content-Length` is never met) and close. A response with an empty body, such as a PUT's,
    /// is cut before its status line instead: the server applied the request but the client
    /// sees a dropped connection, the "ambiguous write" a retrying writer must survive.
    pub truncate_rate: f64,
    /// How long a delayed request waits before it is handled.
    pub delay: Duration,
    /// Probability that a request waits [`delay`](Self::delay).
    pub delay_rate: f64,
    /// Restrict every fault to these methods (e.g. `PUT` and `POST` to hit only writes);
    /// `None` means all methods. Requests with other methods are always forwarded untouched.
    pub only_methods: Option<Vec<Method>>,
    /// The first `n` matching requests after [`FaultProxy::set_plan`] get `503 SlowDown`,
    /// deterministically; later ones follow the rates.
    pub fail_first_n: u32,
    /// Seed of the fault generator; the same seed gives the same decisions.
    pub seed: u64,
}

/// Counters since [`FaultProxy::start`]; they are not reset by [`FaultProxy::set_plan`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Requests whose head the proxy received.
    pub requests: u64,
    /// Requests answered with an injected `503`.
    pub injected_errors: u64,
    /// Connections closed without a response by a drop fault.
    pub dropped: u64,
    /// Responses cut off by a truncate fault (these also count as forwarded).
    pub truncated: u64,
    /// Requests that waited out a delay fault.
    pub delayed: u64,
    /// Requests for which the upstream returned a response.
    pub forwarded: u64,
    /// Requests the upstream could not answer; the client got `502 Bad Gateway`.
    pub upstream_errors: u64,
}

/// A running proxy on `127.0.0.1`; see the [module docs](self).
///
/// Dropping it stops accepting and closes connections in the background; prefer
/// [`FaultProxy::shutdown`], which waits for that.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on an ephemeral loopback port and forwards to `upstream` with the default
    /// (pass-through) plan.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // A fresh upstream connection per request: a pooled connection that the server closed
        // while idle would fail the next request, and that failure would look like an injected
        // fault. Loopback connects are cheap.
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .http1_preserve_header_case(true)
            .build(connector);
        let shared = Arc::new(Shared {
            upstream,
            client,
            state: Mutex::new(PlanState::new(FaultPlan::default())),
            counters: Counters::default(),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&shared), shutdown_rx));
        Ok(FaultProxy { addr, shared, shutdown, task: Some(task) })
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL to give a client instead of the server's: `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the plan for requests that arrive from now on, and restarts its
    /// [`fail_first_n`](FaultPlan::fail_first_n) count and its generator from
    /// [`seed`](FaultPlan::seed).
    pub fn set_plan(&self, plan: FaultPlan) {
        *self.shared.lock_state() = PlanState::new(plan);
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> FaultStats {
        self.shared.counters.snapshot()
    }

    /// Stops accepting, lets in-flight requests finish for a short grace period, aborts the
    /// rest, and returns once every connection is closed.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            if let Err(error) = task.await {
                tracing::debug!(%error, "fault proxy accept loop ended abnormally");
            }
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// State every connection of one proxy shares.
#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    client: Client<HttpConnector, Incoming>,
    state: Mutex<PlanState>,
    counters: Counters,
}

impl Shared {
    fn lock_state(&self) -> std::sync::MutexGuard<'_, PlanState> {
        // The critical sections cannot panic half-way, so a poisoned lock still holds a
        // consistent plan.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    injected_errors: AtomicU64,
    dropped: AtomicU64,
    truncated: AtomicU64,
    delayed: AtomicU64,
    forwarded: AtomicU64,
    upstream_errors: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> FaultStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FaultStats {
            requests: get(&self.requests),
            injected_errors: get(&self.injected_errors),
            dropped: get(&self.dropped),
            truncated: get(&self.truncated),
            delayed: get(&self.delayed),
            forwarded: get(&self.forwarded),
            upstream_errors: get(&self.upstream_errors),
        }
    }
}

/// The active plan plus what it has consumed so far.
#[derive(Debug)]
struct PlanState {
    plan: FaultPlan,
    matched: u64,
    rng: XorShift64,
}

impl PlanState {
    fn new(plan: FaultPlan) -> Self {
        let rng = XorShift64::new(plan.seed);
        PlanState { plan, matched: 0, rng }
    }

    /// Decides the fate of one request; see [`FaultPlan`] for the order of the rolls.
    fn decide(&mut self, method: &Method) -> Decision {
        let matches = self.plan.only_methods.as_ref().is_none_or(|methods| methods.contains(method));
        if !matches {
            return Decision::default();
        }
        let index = self.matched;
        self.matched += 1;
        let delay = self.rng.roll(self.plan.delay_rate).then_some(self.plan.delay).filter(|d| !d.is_zero());
        let action = if index < u64::from(self.plan.fail_first_n) || self.rng.roll(self.plan.error_rate) {
            Action::Error
        } else if self.rng.roll(self.plan.drop_rate) {
            Action::Drop
        } else if self.rng.roll(self.plan.truncate_rate) {
            Action::Truncate
        } else {
            Action::Forward
        };
        Decision { delay, action }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Decision {
    delay: Option<Duration>,
    action: Action,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Action {
    #[default]
    Forward,
    Error,
    Drop,
    Truncate,
}

/// xorshift64*: tiny, deterministic and good enough to spread faults; not for anything else.
#[derive(Debug)]
struct XorShift64(u64);

impl XorShift64 {
    fn new(seed: u64) -> Self {
        // The all-zero state is a fixed point; mix the seed so 0 is a usable seed too.
        let state = seed ^ 0x9E37_79B9_7F4A_7C15;
        XorShift64(if state == 0 { 1 } else { state })
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// `true` with probability `rate`; draws nothing when `rate <= 0`.
    fn roll(&mut self, rate: f64) -> bool {
        if rate <= 0.0 || rate.is_nan() {
            return false;
        }
        // 53 random bits give a uniform f64 in [0, 1).
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        unit < rate
    }
}

/// The error a handler returns to make hyper close the connection without a response.
#[derive(Debug)]
struct InjectedDrop;

impl fmt::Display for InjectedDrop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection dropped by fault plan")
    }
}

impl StdError for InjectedDrop {}

/// The error that ends a truncated response body, which makes hyper close the connection.
#[derive(Debug)]
struct InjectedTruncation;

impl fmt::Display for InjectedTruncation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("response body truncated by fault plan")
    }
}

impl StdError for InjectedTruncation {}

/// Resolves once shutdown is requested, or once the [`FaultProxy`] handle is gone.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await, or the task is not `Send`.
    let _ = shutdown.wait_for(|&stop| stop).await;
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    connections.spawn(serve_connection(stream, Arc::clone(&shared), shutdown.clone()));
                }
                Err(error) => {
                    tracing::debug!(%error, "fault proxy accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let drained =
        tokio::time::timeout(SHUTDOWN_GRACE, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::debug!(
            connections = connections.len(),
            "fault proxy aborting connections after the shutdown grace period"
        );
        connections.shutdown().await;
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "fault proxy could not set TCP_NODELAY");
    }
    let service = service_fn(move |req| handle(Arc::clone(&shared), req));
    let connection = http1::Builder::new()
        .keep_alive(true)
        .preserve_header_case(true)
        .serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = stopped(&mut shutdown) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    // Injected drops and truncations end here as errors too; none of them is the proxy's fault.
    if let Err(error) = result {
        tracing::debug!(%error, "fault proxy connection closed with an error");
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<ProxyBody>, BoxError> {
    Counters::bump(&shared.counters.requests);
    let decision = shared.lock_state().decide(req.method());
    if let Some(delay) = decision.delay {
        Counters::bump(&shared.counters.delayed);
        tokio::time::sleep(delay).await;
    }
    match decision.action {
        Action::Forward => Ok(forward(&shared, req).await.unwrap_or_else(|bad_gateway| bad_gateway)),
        Action::Error => {
            drain(req.into_body()).await?;
            Counters::bump(&shared.counters.injected_errors);
            Ok(slow_down())
        }
        Action::Drop => {
            drain(req.into_body()).await?;
            Counters::bump(&shared.counters.dropped);
            Err(Box::new(InjectedDrop))
        }
        Action::Truncate => {
            let response = match forward(&shared, req).await {
                Ok(response) => response,
                Err(bad_gateway) => return Ok(bad_gateway),
            };
            Counters::bump(&shared.counters.truncated);
            truncate(response).await
        }
    }
}

/// Sends `req` to the upstream unchanged except for the URI's authority, which the client
/// needs to connect; the `Host` header and all others stay as the client sent them. When the
/// upstream cannot answer, the error is the `502 Bad Gateway` to send instead.
async fn forward(shared: &Shared, req: Request<Incoming>) -> Result<Response<ProxyBody>, Response<ProxyBody>> {
    let (mut parts, body) = req.into_parts();
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let uri = match format!("http://{}{path_and_query}", shared.upstream).parse::<Uri>() {
        Ok(uri) => uri,
        Err(error) => return Err(bad_gateway(shared, &error)),
    };
    parts.uri = uri;
    match shared.client.request(Request::from_parts(parts, body)).await {
        Ok(response) => {
            Counters::bump(&shared.counters.forwarded);
            Ok(response.map(|body| body.map_err(|e| Box::new(e) as BoxError).boxed_unsync()))
        }
        Err(error) => Err(bad_gateway(shared, &error)),
    }
}

/// Reads a request body to its end without keeping it, so a fault hits only after the whole
/// request arrived (as a server-side failure would).
async fn drain(mut body: Incoming) -> Result<(), BoxError> {
    while let Some(frame) = body.frame().await {
        frame?;
    }
    Ok(())
}

/// Keeps `response`'s head and the first half of its body, then fails the body so hyper closes
/// the connection; an empty body fails before the head is sent.
async fn truncate(response: Response<ProxyBody>) -> Result<Response<ProxyBody>, BoxError> {
    let (parts, body) = response.into_parts();
    let full = body.collect().await?.to_bytes();
    if full.is_empty() {
        return Err(Box::new(InjectedTruncation));
    }
    let half = full.slice(..full.len() / 2);
    let first_half = futures::stream::once(async move { Ok(Frame::data(half)) });
    let cut = futures::stream::once(async {
        tokio::time::sleep(TRUNCATE_FLUSH_GRACE).await;
        Err(Box::new(InjectedTruncation) as BoxError)
    });
    let frames = first_half.chain(cut);
    Ok(Response::from_parts(parts, StreamBody::new(frames).boxed_unsync()))
}

fn full_body(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|never: Infallible| match never {}).boxed_unsync()
}

/// The `503 SlowDown` that S3 sends when throttling, which clients must retry.
fn slow_down() -> Response<ProxyBody> {
    const BODY: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
        <Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>\
        <RequestId>ckptd-fault-proxy</RequestId></Error>";
    let mut response = Response::new(full_body(BODY));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/xml"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(BODY.len()));
    response
}

fn bad_gateway(shared: &Shared, error: &dyn fmt::Display) -> Response<ProxyBody> {
    Counters::bump(&shared.counters.upstream_errors);
    tracing::debug!(%error, upstream = %shared.upstream, "fault proxy could not reach the upstream");
    let mut response = Response::new(full_body(format!("fault proxy: upstream failed: {error}\n")));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}
