//! Listing and aborting incomplete multipart uploads.
//!
//! The first test runs against a real S3 server: `bash scripts/test.sh` starts a loopback one and
//! exports `CKPTD_TEST_S3_ENDPOINT`, `CKPTD_TEST_S3_BUCKET` and the `AWS_*` variables the store
//! reads. Without them that test fails, unless `CKPTD_SKIP_S3_TESTS=1` says to skip it. The others
//! use a scripted loopback server for what a real one will not do on demand.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ckpt_core::store::MapEnv;
use ckpt_core::store::s3_uploads::{PendingUpload, abort, list_pending};
use ckpt_core::{ErrorKind, Store, StoreOptions};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use object_store::{ObjectStoreExt, PutPayload};

/// The test bucket, or `None` when S3 tests are skipped on purpose.
#[allow(clippy::print_stderr)]
fn test_bucket() -> Option<String> {
    if std::env::var_os("CKPTD_TEST_S3_ENDPOINT").is_none() {
        if std::env::var("CKPTD_SKIP_S3_TESTS").as_deref() == Ok("1") {
            eprintln!("skipped: CKPTD_SKIP_S3_TESTS=1 and no CKPTD_TEST_S3_ENDPOINT");
            return None;
        }
        panic!(
            "CKPTD_TEST_S3_ENDPOINT is not set: run the S3 tests through `bash scripts/test.sh`, which \
             starts a loopback S3 server, or set CKPTD_SKIP_S3_TESTS=1 to skip them"
        );
    }
    Some(
        std::env::var("CKPTD_TEST_S3_BUCKET")
            .expect("CKPTD_TEST_S3_BUCKET is not set: run the S3 tests through `bash scripts/test.sh`"),
    )
}

/// A prefix no other test run uses, so concurrent runs against one bucket do not see each other.
fn unique_prefix() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("s3-uploads-{}-{nanos}", std::process::id())
}

fn find<'a>(uploads: &'a [PendingUpload], key: &str) -> Vec<&'a PendingUpload> {
    uploads.iter().filter(|u| u.key == key).collect()
}

#[tokio::test]
async fn lists_and_aborts_a_stale_upload() -> anyhow::Result<()> {
    let Some(bucket) = test_bucket() else {
        return Ok(());
    };
    let root = unique_prefix();
    let store = Store::open(&format!("s3://{bucket}/{root}"), &StoreOptions::default())?;

    // A crashed writer's upload: created, one 5 MiB part written, never completed. The key has
    // characters that must be percent-encoded in the request path.
    let path = store.path("job/step 7/rank+0=ü.ckpt");
    let mut upload = store.object_store().put_multipart(&path).await?;
    upload.put_part(PutPayload::from(vec![7u8; 5 << 20])).await?;
    // An upload of another job, which a listing of this job's prefix must not return.
    let other = store.path("other-job/step-1/rank-0.ckpt");
    let _other_upload = store.object_store().put_multipart(&other).await?;

    let prefix = format!("{root}/job/");
    let pending = list_pending(&store, &prefix).await?;
    assert_eq!(pending.len(), 1, "{pending:?}");
    let found = &pending[0];
    assert_eq!(found.key, path.as_ref());
    assert!(!found.upload_id.is_empty());
    // Only that it was read: moto reports the same fixed `Initiated` (2010-11-10) for every
    // upload, so its value says nothing here.
    assert!(found.initiated.is_some(), "the server gave no readable Initiated time");

    let everything = list_pending(&store, &format!("{root}/")).await?;
    assert_eq!(find(&everything, path.as_ref()).len(), 1, "{everything:?}");
    let other_pending = find(&everything, other.as_ref());
    assert_eq!(other_pending.len(), 1, "{everything:?}");
    let other_pending = other_pending[0].clone();

    abort(&store, found).await?;
    let after = list_pending(&store, &prefix).await?;
    assert!(find(&after, path.as_ref()).is_empty(), "still listed after abort: {after:?}");

    // Aborting again (a retry, or a second janitor) is fine.
    abort(&store, found).await?;

    // The other job's upload was untouched; clean it up.
    let rest = list_pending(&store, &format!("{root}/")).await?;
    assert_eq!(rest, vec![other_pending.clone()]);
    abort(&store, &other_pending).await?;
    assert!(list_pending(&store, &format!("{root}/")).await?.is_empty());
    Ok(())
}

/// One request the fake server saw.
#[derive(Debug, Clone)]
struct Seen {
    method: http::Method,
    /// Path and query, as sent.
    target: String,
    authorization: Option<String>,
}

type Reply = (u16, Vec<u8>);

/// A loopback HTTP server that answers every request with `respond(method, path-and-query)` and
/// records what it saw. It stands in for S3 where moto cannot: pagination (moto ignores
/// `max-uploads`), throttling, and oversized or looping answers.
async fn fake_s3(
    respond: impl Fn(&http::Method, &str) -> Reply + Send + Sync + 'static,
) -> anyhow::Result<(Store, Arc<Mutex<Vec<Seen>>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let respond = Arc::new(respond);
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let respond = respond.clone();
            let log = log.clone();
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let target = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
                let authorization =
                    req.headers().get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
                let (status, body) = respond(req.method(), &target);
                log.lock().unwrap().push(Seen { method: req.method().clone(), target, authorization });
                let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
                *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                async move { Ok::<_, Infallible>(response) }
            });
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });
    let env = MapEnv(
        [
            ("AWS_ENDPOINT_URL", endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "AKIDFAKE"),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
            ("AWS_REGION", "eu-west-1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    );
    let store = Store::open_with_env("s3://bkt/root", &StoreOptions::default(), &env)?;
    Ok((store, seen))
}

const SECRET: &str = "fake-secret-never-shown";

fn page(uploads: &[(&str, &str)], next: Option<(&str, &str)>) -> Vec<u8> {
    let mut xml = String::from(
        r#"<?xml version="1.0" encoding="UTF-8"?><ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>bkt</Bucket>"#,
    );
    match next {
        Some((key, id)) => xml.push_str(&format!(
            "<NextKeyMarker>{key}</NextKeyMarker><NextUploadIdMarker>{id}</NextUploadIdMarker><IsTruncated>true</IsTruncated>"
        )),
        None => xml.push_str("<IsTruncated>false</IsTruncated>"),
    }
    for (key, id) in uploads {
        xml.push_str(&format!(
            "<Upload><Key>{key}</Key><UploadId>{id}</UploadId><Initiated>2026-01-02T03:04:05.000Z</Initiated></Upload>"
        ));
    }
    xml.push_str("</ListMultipartUploadsResult>");
    xml.into_bytes()
}

fn s3_error(code: &str) -> Vec<u8> {
    format!("<Error><Code>{code}</Code><Message>fake {code}</Message></Error>").into_bytes()
}

#[tokio::test]
async fn follows_pages_retries_throttling_and_keeps_to_the_prefix() -> anyhow::Result<()> {
    let throttled = AtomicBool::new(false);
    let (store, seen) = fake_s3(move |method, target| match (method.as_str(), target) {
        ("GET", t) if t.contains("key-marker=") => (200, page(&[("root/job/b", "u2")], None)),
        ("GET", _) => {
            if !throttled.swap(true, Ordering::SeqCst) {
                return (503, s3_error("SlowDown"));
            }
            // A server that ignores `prefix` must not make us return other jobs' uploads.
            (200, page(&[("root/job/a", "u+1"), ("root/other/c", "u3")], Some(("root/job/a", "u+1"))))
        }
        ("DELETE", "/bkt/root/job/a?uploadId=u%2B1") => (204, Vec::new()),
        ("DELETE", "/bkt/root/job/b?uploadId=u2") => (404, s3_error("NoSuchUpload")),
        ("DELETE", _) => (403, s3_error("AccessDenied")),
        _ => (400, s3_error("BadRequest")),
    })
    .await?;

    let pending = list_pending(&store, "root/job/").await?;
    let listed: Vec<(&str, &str)> = pending.iter().map(|u| (u.key.as_str(), u.upload_id.as_str())).collect();
    assert_eq!(listed, [("root/job/a", "u+1"), ("root/job/b", "u2")]);
    assert_eq!(pending[0].initiated, Some(UNIX_EPOCH + std::time::Duration::from_secs(1_767_323_045)));

    abort(&store, &pending[0]).await?;
    abort(&store, &pending[1]).await?; // 404 NoSuchUpload: already gone

    let denied = PendingUpload { key: "root/job/c".into(), upload_id: "u9".into(), initiated: None };
    let err = abort(&store, &denied).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Storage, "{err}");
    assert!(err.to_string().contains("AccessDenied"), "{err}");
    assert!(!format!("{err} {err:?}").contains(SECRET));

    let seen = seen.lock().unwrap().clone();
    let requests: Vec<String> = seen.iter().map(|s| format!("{} {}", s.method, s.target)).collect();
    let first = "GET /bkt?uploads=&prefix=root%2Fjob%2F";
    assert_eq!(
        requests,
        [
            first,
            first,
            "GET /bkt?uploads=&prefix=root%2Fjob%2F&key-marker=root%2Fjob%2Fa&upload-id-marker=u%2B1",
            "DELETE /bkt/root/job/a?uploadId=u%2B1",
            "DELETE /bkt/root/job/b?uploadId=u2",
            "DELETE /bkt/root/job/c?uploadId=u9",
        ]
    );
    for s in &seen {
        let auth = s.authorization.as_deref().unwrap_or_default();
        assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDFAKE/"), "{s:?}");
        assert!(auth.contains("/eu-west-1/s3/aws4_request") && !auth.contains(SECRET), "{s:?}");
    }
    Ok(())
}

#[tokio::test]
async fn refuses_oversized_and_looping_answers() -> anyhow::Result<()> {
    let (store, _) = fake_s3(|_, _| (200, vec![b' '; (16 << 20) + 1])).await?;
    let err = list_pending(&store, "root/").await.unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");

    // A truncated page whose marker never moves would otherwise be listed forever.
    let (store, seen) = fake_s3(|_, _| (200, page(&[("root/a", "u1")], Some(("root/a", "u1"))))).await?;
    let err = list_pending(&store, "root/").await.unwrap_err();
    assert!(err.to_string().contains("does not advance"), "{err}");
    assert_eq!(seen.lock().unwrap().len(), 2);

    let (store, _) = fake_s3(|_, _| (200, b"<ListMultipartUploadsResult><Upload>".to_vec())).await?;
    let err = list_pending(&store, "root/").await.unwrap_err();
    assert!(err.to_string().contains("malformed"), "{err}");
    Ok(())
}
