//! Self-tests of the fault-injecting proxy in `tests/common/fault_proxy.rs`.
//!
//! The store-fault tests trust the proxy to inject exactly what its plan says, so these tests
//! check that against the real loopback S3 server (moto, started by `scripts/test.sh`) and the
//! real `object_store` S3 client. The determinism test needs no server: its upstream is a closed
//! port, so every forwarded request turns into a `502` that tells it apart from an injected `503`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use common::fault_proxy::{FaultPlan, FaultProxy, FaultStats};
use common::s3;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

/// A proxy in front of the test server, and a client whose requests go through it.
async fn proxied_store(retry: RetryConfig) -> Result<(FaultProxy, Arc<dyn ObjectStore>)> {
    let upstream = s3::endpoint_addr(&s3::require_endpoint());
    let proxy = FaultProxy::start(upstream).await?;
    let store = s3::builder(&proxy.endpoint()).with_retry(retry).build()?;
    Ok((proxy, Arc::new(store)))
}

fn no_retries() -> RetryConfig {
    RetryConfig { max_retries: 0, ..Default::default() }
}

fn object(tag: &str) -> Path {
    Path::from(format!("{}/object.bin", s3::unique_prefix(tag)))
}

#[tokio::test]
async fn pass_through_round_trips_a_put_and_a_get() -> Result<()> {
    if !s3::s3_available() {
        return Ok(());
    }
    let (proxy, store) = proxied_store(no_retries()).await?;
    let path = object("fault-proxy-pass");
    let data = Bytes::from((0..=255u8).cycle().take(100_000).collect::<Vec<u8>>());

    store.put(&path, PutPayload::from(data.clone())).await?;
    let read = store.get(&path).await?.bytes().await?;

    ensure!(read == data, "read back {} bytes that differ from the {} written", read.len(), data.len());
    let stats = proxy.stats();
    ensure!(stats == FaultStats { requests: 2, forwarded: 2, ..FaultStats::default() }, "unexpected stats {stats:?}");
    store.delete(&path).await?;
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn put_retries_through_the_first_failures() -> Result<()> {
    if !s3::s3_available() {
        return Ok(());
    }
    let (proxy, store) = proxied_store(RetryConfig::default()).await?;
    proxy.set_plan(FaultPlan { fail_first_n: 2, only_methods: Some(vec![Method::PUT]), ..FaultPlan::default() });
    let path = object("fault-proxy-fail-first");

    store.put(&path, PutPayload::from_static(b"survives two 503s")).await?;

    let stats = proxy.stats();
    ensure!(stats.injected_errors == 2, "expected 2 injected errors, got {stats:?}");
    ensure!(stats.requests == 3 && stats.forwarded == 1, "expected two failures then one forward, got {stats:?}");
    proxy.set_plan(FaultPlan::default());
    let read = store.get(&path).await?.bytes().await?;
    ensure!(read.as_ref() == b"survives two 503s", "read back {read:?}");
    store.delete(&path).await?;
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn injected_error_without_retries_fails_the_put() -> Result<()> {
    if !s3::s3_available() {
        return Ok(());
    }
    let (proxy, store) = proxied_store(no_retries()).await?;
    proxy.set_plan(FaultPlan { error_rate: 1.0, ..FaultPlan::default() });
    let path = object("fault-proxy-error");

    let result = store.put(&path, PutPayload::from_static(b"never stored")).await;

    ensure!(result.is_err(), "put succeeded through an injected 503");
    let stats = proxy.stats();
    ensure!(stats.injected_errors == 1 && stats.forwarded == 0, "unexpected stats {stats:?}");
    proxy.set_plan(FaultPlan::default());
    ensure!(
        matches!(store.head(&path).await, Err(object_store::Error::NotFound { .. })),
        "the rejected put reached the server"
    );
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn dropped_connection_without_retries_fails_the_put() -> Result<()> {
    if !s3::s3_available() {
        return Ok(());
    }
    let (proxy, store) = proxied_store(no_retries()).await?;
    proxy.set_plan(FaultPlan { drop_rate: 1.0, ..FaultPlan::default() });
    let path = object("fault-proxy-drop");

    let result = store.put(&path, PutPayload::from_static(b"never stored")).await;

    ensure!(result.is_err(), "put succeeded through a dropped connection");
    let stats = proxy.stats();
    ensure!(stats.dropped >= 1 && stats.forwarded == 0, "unexpected stats {stats:?}");
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn truncated_get_fails_to_read_the_body() -> Result<()> {
    if !s3::s3_available() {
        return Ok(());
    }
    let (proxy, store) = proxied_store(no_retries()).await?;
    let path = object("fault-proxy-truncate");
    let data = Bytes::from(vec![7u8; 64 * 1024]);
    store.put(&path, PutPayload::from(data)).await?;
    proxy.set_plan(FaultPlan { truncate_rate: 1.0, only_methods: Some(vec![Method::GET]), ..FaultPlan::default() });

    let result = async { store.get(&path).await?.bytes().await }.await;

    ensure!(result.is_err(), "a truncated body read back as {:?} bytes", result.map(|b| b.len()));
    ensure!(proxy.stats().truncated == 1, "unexpected stats {:?}", proxy.stats());
    proxy.set_plan(FaultPlan::default());
    store.delete(&path).await?;
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn truncated_put_response_leaves_an_ambiguous_write() -> Result<()> {
    if !s3::s3_available() {
        return Ok(());
    }
    let (proxy, store) = proxied_store(no_retries()).await?;
    proxy.set_plan(FaultPlan { truncate_rate: 1.0, only_methods: Some(vec![Method::PUT]), ..FaultPlan::default() });
    let path = object("fault-proxy-ambiguous");

    let result = store.put(&path, PutPayload::from_static(b"stored, unacknowledged")).await;

    ensure!(result.is_err(), "put succeeded although its response was cut");
    let read = store.get(&path).await?.bytes().await?;
    ensure!(read.as_ref() == b"stored, unacknowledged", "read back {read:?}");
    store.delete(&path).await?;
    proxy.shutdown().await;
    Ok(())
}

/// An address nothing listens on, so every request the proxy forwards there gets a `502`.
fn closed_port() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

type RawClient = Client<HttpConnector, Empty<Bytes>>;

fn raw_client() -> RawClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// One GET through `proxy`: its status, or the error when no response came back.
async fn raw_get(
    client: &RawClient,
    proxy: &FaultProxy,
    key: usize,
) -> Result<Result<StatusCode, hyper_util::client::legacy::Error>> {
    let request = Request::get(format!("{}/key-{key}", proxy.endpoint())).body(Empty::new())?;
    Ok(match client.request(request).await {
        Ok(response) => {
            let status = response.status();
            response.into_body().collect().await?;
            Ok(status)
        }
        Err(error) => Err(error),
    })
}

/// Sends `count` GETs through a proxy in front of a closed port, and returns the statuses:
/// `503` for an injected error, `502` for a forwarded request.
async fn statuses_for(plan: FaultPlan, count: usize) -> Result<(Vec<StatusCode>, FaultStats)> {
    let proxy = FaultProxy::start(closed_port()?).await?;
    proxy.set_plan(plan);
    let client = raw_client();
    let mut statuses = Vec::with_capacity(count);
    for key in 0..count {
        statuses.push(raw_get(&client, &proxy, key).await?.context("proxy did not answer")?);
    }
    let stats = proxy.stats();
    proxy.shutdown().await;
    Ok((statuses, stats))
}

#[tokio::test]
async fn decisions_are_per_request_and_replay_with_the_seed() -> Result<()> {
    let plan = FaultPlan { error_rate: 0.5, fail_first_n: 3, seed: 42, ..FaultPlan::default() };
    let (first, stats) = statuses_for(plan.clone(), 40).await?;
    let (again, _) = statuses_for(plan, 40).await?;

    ensure!(first == again, "same seed, different decisions:\n{first:?}\n{again:?}");
    ensure!(
        first[..3].iter().all(|s| *s == StatusCode::SERVICE_UNAVAILABLE),
        "fail_first_n did not fail the first requests: {first:?}"
    );
    let errors = first.iter().filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE).count();
    let forwarded = first.iter().filter(|s| **s == StatusCode::BAD_GATEWAY).count();
    ensure!(errors + forwarded == first.len(), "unexpected statuses: {first:?}");
    // 3 forced plus a binomial(37, 0.5): far outside [8, 35] only if the generator is broken.
    ensure!((8..=35).contains(&errors), "{errors} of 40 failed at error_rate 0.5: {first:?}");
    ensure!(
        stats.injected_errors == errors as u64 && stats.upstream_errors == forwarded as u64,
        "stats {stats:?} disagree with the statuses {first:?}"
    );
    Ok(())
}

#[tokio::test]
async fn only_methods_limits_faults_and_delays_to_matching_requests() -> Result<()> {
    let put_only = FaultPlan {
        error_rate: 1.0,
        delay: Duration::from_millis(1),
        delay_rate: 1.0,
        only_methods: Some(vec![Method::PUT]),
        ..FaultPlan::default()
    };
    let (statuses, stats) = statuses_for(put_only, 5).await?;

    ensure!(
        statuses.iter().all(|s| *s == StatusCode::BAD_GATEWAY),
        "GETs were faulted by a PUT-only plan: {statuses:?}"
    );
    ensure!(stats.injected_errors == 0 && stats.delayed == 0, "unexpected stats {stats:?}");

    let delay_gets = FaultPlan {
        delay: Duration::from_millis(1),
        delay_rate: 1.0,
        only_methods: Some(vec![Method::GET]),
        ..FaultPlan::default()
    };
    let (statuses, stats) = statuses_for(delay_gets, 5).await?;

    ensure!(
        statuses.iter().all(|s| *s == StatusCode::BAD_GATEWAY),
        "a delay-only plan changed the outcome: {statuses:?}"
    );
    ensure!(stats.delayed == 5 && stats.injected_errors == 0, "unexpected stats {stats:?}");
    Ok(())
}

#[tokio::test]
async fn drop_closes_the_connection_without_a_response_and_the_proxy_keeps_serving() -> Result<()> {
    let proxy = FaultProxy::start(closed_port()?).await?;
    let client = raw_client();
    proxy.set_plan(FaultPlan { drop_rate: 1.0, ..FaultPlan::default() });

    let dropped = raw_get(&client, &proxy, 0).await?;

    ensure!(dropped.is_err(), "a dropped request got a response: {dropped:?}");
    proxy.set_plan(FaultPlan::default());
    let after = raw_get(&client, &proxy, 1).await?;
    ensure!(matches!(after, Ok(StatusCode::BAD_GATEWAY)), "the request after a drop was not forwarded: {after:?}");
    let stats = proxy.stats();
    ensure!(stats.requests == 2 && stats.dropped == 1 && stats.upstream_errors == 1, "unexpected stats {stats:?}");
    proxy.shutdown().await;
    Ok(())
}
