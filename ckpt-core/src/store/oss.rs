//! Create-only writes on OSS.
//!
//! `object_store` writes an object create-only (`PutMode::Create`) with the S3 header
//! `If-None-Match: *`. OSS documents its own header for this, `x-oss-forbid-overwrite: true`: with
//! it, a PutObject (or CompleteMultipartUpload) on a name that exists is refused with HTTP 409
//! `FileAlreadyExists` instead of overwriting. [`ForbidOverwriteConnector`] is the HTTP client of
//! `oss://` stores: it adds that header to every PUT or POST that carries `If-None-Match: *`, so
//! the MANIFEST write keeps the commit rule (one writer creates a step's MANIFEST) on OSS, and
//! leaves every other request (shards, reads, lists) untouched. `object_store` reports the 409 as
//! `AlreadyExists`, which the commit turns into [`crate::Error::Conflict`].
//!
//! The header is added after `object_store` has signed the request, so it is not among the
//! SigV4 signed headers; OSS checks the headers a signature lists.

use http::Method;
use http::header::{HeaderName, HeaderValue, IF_NONE_MATCH};
use object_store::ClientOptions;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpService, ReqwestConnector,
};

/// OSS's create-only request header.
pub const FORBID_OVERWRITE: HeaderName = HeaderName::from_static("x-oss-forbid-overwrite");

/// Builds the HTTP client of an `oss://` store: `object_store`'s reqwest client, with
/// [`FORBID_OVERWRITE`] added to create-only writes (see the module documentation).
#[derive(Debug, Default)]
pub struct ForbidOverwriteConnector;

impl HttpConnector for ForbidOverwriteConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(ForbidOverwrite { inner: ReqwestConnector::default().connect(options)? }))
    }
}

#[derive(Debug)]
struct ForbidOverwrite {
    inner: HttpClient,
}

#[async_trait::async_trait]
impl HttpService for ForbidOverwrite {
    async fn call(&self, mut req: HttpRequest) -> Result<HttpResponse, HttpError> {
        if is_create_only_write(&req) {
            req.headers_mut().insert(FORBID_OVERWRITE, HeaderValue::from_static("true"));
        }
        self.inner.execute(req).await
    }
}

/// A PUT (PutObject) or POST (CompleteMultipartUpload) that `object_store` made create-only.
fn is_create_only_write(req: &HttpRequest) -> bool {
    (req.method() == Method::PUT || req.method() == Method::POST)
        && req.headers().get(IF_NONE_MATCH).is_some_and(|v| v.as_bytes() == b"*")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http::{HeaderMap, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use object_store::{ObjectStoreExt, PutPayload};
    use tokio::net::TcpListener;

    use super::*;
    use crate::manifest::{Manifest, ShardEntry};
    use crate::store::{MapEnv, Store, StoreOptions, layout};

    /// OSS's answer to a forbidden overwrite, as its documentation shows it.
    const FILE_ALREADY_EXISTS: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error>\n  \
        <Code>FileAlreadyExists</Code>\n  <Message>The object you specified already exists and can not be \
        overwritten.</Message>\n  <RequestId>5C3D9175B6FC201293AD****</RequestId>\n  \
        <HostId>bkt.oss-cn-hangzhou.aliyuncs.com</HostId>\n  <EC>0026-00000001</EC>\n</Error>\n";

    /// One request the fake OSS endpoint saw, and what it answered.
    #[derive(Debug, Clone)]
    struct Seen {
        method: Method,
        path: String,
        headers: HeaderMap,
        status: StatusCode,
    }

    /// An OSS endpoint on 127.0.0.1 that keeps objects in memory and, like OSS, overwrites on PUT
    /// unless `x-oss-forbid-overwrite: true` is sent. It does not look at `If-None-Match`, so
    /// only OSS's own header can keep an object from being overwritten here.
    #[derive(Default)]
    struct FakeOss {
        objects: Mutex<BTreeMap<String, Bytes>>,
        seen: Mutex<Vec<Seen>>,
    }

    impl FakeOss {
        async fn handle(&self, req: http::Request<Incoming>) -> Response<Full<Bytes>> {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let path = parts.uri.path().to_string();
            let forbid = parts.headers.get(FORBID_OVERWRITE).is_some_and(|v| v == "true");
            let (status, body) = {
                let mut objects = self.objects.lock().unwrap();
                match parts.method {
                    Method::PUT if forbid && objects.contains_key(&path) => {
                        (StatusCode::CONFLICT, Bytes::from_static(FILE_ALREADY_EXISTS.as_bytes()))
                    }
                    Method::PUT => {
                        objects.insert(path.clone(), body);
                        (StatusCode::OK, Bytes::new())
                    }
                    Method::GET => match objects.get(&path) {
                        Some(b) => (StatusCode::OK, b.clone()),
                        None => (StatusCode::NOT_FOUND, Bytes::new()),
                    },
                    _ => (StatusCode::METHOD_NOT_ALLOWED, Bytes::new()),
                }
            };
            self.seen.lock().unwrap().push(Seen { method: parts.method, path, headers: parts.headers, status });
            let len = body.len();
            Response::builder()
                .status(status)
                .header("etag", "\"e\"")
                .header("content-length", len)
                .body(Full::new(body))
                .unwrap()
        }

        fn seen(&self) -> Vec<Seen> {
            std::mem::take(&mut *self.seen.lock().unwrap())
        }
    }

    async fn serve(fake: Arc<FakeOss>) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let fake = fake.clone();
                let service = hyper::service::service_fn(move |req| {
                    let fake = fake.clone();
                    async move { Ok::<_, Infallible>(fake.handle(req).await) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        port
    }

    fn manifest(note: &str) -> Manifest {
        let entry = ShardEntry { rank: 0, object: layout::shard_name(0), size: 10, index_crc32c: 7, region_len: 4 };
        let metadata = BTreeMap::from([("note".to_string(), note.to_string())]);
        Manifest::new("job", 40, 1, vec![entry], metadata).unwrap()
    }

    #[test]
    fn the_manifest_put_forbids_overwrite_and_a_refusal_is_a_conflict() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let fake = Arc::new(FakeOss::default());
        let port = rt.block_on(serve(fake.clone()));
        let env = MapEnv(
            [("OSS_ACCESS_KEY_ID", "LTAIkey"), ("OSS_ACCESS_KEY_SECRET", "oss-secret")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        let url = format!("oss://bkt/root?region=cn-hangzhou&endpoint=http://127.0.0.1:{port}");
        let options = StoreOptions { max_retries: 1, ..StoreOptions::default() };
        let store = Store::open_with_env(&url, &options, &env).unwrap();
        let rt_handle = rt.handle().clone();

        // A shard is an ordinary PUT: OSS may overwrite it, and no create-only header goes out.
        let shard = store.path(&layout::shard_path("job", 40, 0));
        let os = store.object_store().clone();
        rt.block_on(os.put(&shard, PutPayload::from_static(b"shard"))).unwrap();
        let seen = fake.seen();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!((&seen[0].method, seen[0].path.as_str()), (&Method::PUT, "/root/job/step-40/rank-0.ckpt"));
        assert!(seen[0].headers.get(FORBID_OVERWRITE).is_none(), "{:?}", seen[0].headers);
        assert!(seen[0].headers.get(IF_NONE_MATCH).is_none(), "{:?}", seen[0].headers);

        // The MANIFEST is written create-only, with both S3's and OSS's header.
        let first = manifest("first");
        crate::commit::write_manifest(&store, &rt_handle, &first).unwrap();
        let seen = fake.seen();
        assert_eq!(seen.len(), 1, "one PUT and nothing else: {seen:?}");
        let put = &seen[0];
        assert_eq!((&put.method, put.path.as_str()), (&Method::PUT, "/root/job/step-40/MANIFEST"));
        assert_eq!(put.headers.get(FORBID_OVERWRITE).map(|v| v.as_bytes()), Some(&b"true"[..]));
        assert_eq!(put.headers.get(IF_NONE_MATCH).map(|v| v.as_bytes()), Some(&b"*"[..]));
        assert_eq!(put.headers.get_all(FORBID_OVERWRITE).iter().count(), 1, "{:?}", put.headers);
        assert!(
            put.headers.get("authorization").is_some_and(|a| a.to_str().unwrap().contains("Credential=LTAIkey/")),
            "signed with the OSS key: {:?}",
            put.headers
        );

        // Another writer's MANIFEST for the same step: OSS refuses it (409 FileAlreadyExists), the
        // commit reports a conflict, and the stored MANIFEST is still the first one.
        let e = crate::commit::write_manifest(&store, &rt_handle, &manifest("second")).unwrap_err();
        assert!(matches!(e, crate::Error::Conflict { step: 40, .. }), "{e:?}");
        let seen = fake.seen();
        assert_eq!(
            seen.iter().map(|s| (s.method.clone(), s.status)).collect::<Vec<_>>(),
            [(Method::PUT, StatusCode::CONFLICT), (Method::GET, StatusCode::OK)],
            "refused, then the stored MANIFEST is read to tell a lost response from a real conflict"
        );
        assert!(seen[1].headers.get(FORBID_OVERWRITE).is_none(), "reads carry no create-only header");
        let stored = fake.objects.lock().unwrap().get("/root/job/step-40/MANIFEST").cloned().unwrap();
        assert_eq!(stored.as_ref(), first.encode().as_slice(), "the first MANIFEST was not overwritten");

        // The same MANIFEST again (a create-only PUT retried after its response was lost) is ours.
        crate::commit::write_manifest(&store, &rt_handle, &first).unwrap();
    }
}
