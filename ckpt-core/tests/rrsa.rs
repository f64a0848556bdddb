//! RRSA credentials for `oss://`, end to end: a fake Alibaba Cloud STS on 127.0.0.1 hands out
//! temporary keys for the pod's OIDC token, and the loopback S3 server stores the objects behind a
//! recording proxy that shows which security token each request carried.
//!
//! The STS checks what `AssumeRoleWithOIDC` must carry (action, version, role, OIDC provider,
//! token) and refuses anything else the way STS does. Its credentials for the first token expire
//! two seconds after issue; those for the rotated token last an hour, so the test can tell a
//! refresh (forced by expiry, made with the token file's new content) from caching.
//!
//! `s3://` with EKS's web identity (IRSA) goes the same way through a fake AWS STS
//! (`AssumeRoleWithWebIdentity`, XML answers), reached through `AWS_ENDPOINT_URL_STS`.
//!
//! The error tests need no S3 server: the credential fails before any request leaves.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::Path as FsPath;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ckpt_core::store::rrsa::{ENV_OIDC_PROVIDER_ARN, ENV_OIDC_TOKEN_FILE, ENV_ROLE_ARN, ENV_STS_ENDPOINT};
use ckpt_core::store::{MapEnv, Store};
use ckpt_core::{ErrorKind, StoreOptions};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::net::TcpListener;

const ROLE: &str = "acs:ram::1234567890:role/ckptd-agent";
const PROVIDER: &str = "acs:ram::1234567890:oidc-provider/ack-rrsa-c0ffee";
/// The projected token before and after the kubelet rotates it.
const TOKEN_V1: &str = "eyJhbGciOiJSUzI1NiJ9.first-token-payload.sig1";
const TOKEN_V2: &str = "eyJhbGciOiJSUzI1NiJ9.rotated-token-payload.sig2";

/// One `AssumeRoleWithOIDC` call the fake STS granted.
#[derive(Debug, Clone)]
struct Grant {
    oidc_token: String,
    security_token: String,
}

/// What the fake STS answers besides its checks.
#[derive(Debug, Clone, Copy, PartialEq)]
enum StsMode {
    Grant,
    /// `503` for the first `n` calls, then grants.
    Unavailable(u32),
    /// `200` with a body that is not STS's JSON.
    Malformed,
}

struct FakeSts {
    mode: Mutex<StsMode>,
    calls: Mutex<u32>,
    grants: Mutex<Vec<Grant>>,
}

impl FakeSts {
    fn new(mode: StsMode) -> Arc<Self> {
        Arc::new(FakeSts { mode: Mutex::new(mode), calls: Mutex::new(0), grants: Mutex::new(Vec::new()) })
    }

    fn grants(&self) -> Vec<Grant> {
        self.grants.lock().unwrap().clone()
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let query: BTreeMap<String, String> =
            url::form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes()).into_owned().collect();
        let form: BTreeMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
        let calls = {
            let mut c = self.calls.lock().unwrap();
            *c += 1;
            *c
        };
        let get = |m: &BTreeMap<String, String>, k: &str| m.get(k).cloned().unwrap_or_default();
        let refuse = |code: &str, message: &str| {
            let body = serde_json::json!({
                "RequestId": "3D57EAD2-8723-1F26-B69C-F8707D8B565D",
                "HostId": "sts.aliyuncs.com",
                "Code": code,
                "Message": message,
            });
            json(StatusCode::BAD_REQUEST, &body.to_string())
        };
        if parts.method != http::Method::POST
            || get(&query, "Action") != "AssumeRoleWithOIDC"
            || get(&query, "Version") != "2015-04-01"
            || get(&query, "Format") != "JSON"
            || get(&query, "Timestamp").is_empty()
        {
            return refuse("InvalidAction.NotFound", "Specified api is not found, please check your url and method.");
        }
        if query.contains_key("OIDCToken") {
            return refuse("InvalidParameter", "the OIDC token belongs in the body, not in the URL");
        }
        if get(&form, "RoleArn") != ROLE || get(&form, "RoleSessionName").is_empty() {
            return refuse("EntityNotExist.Role", "The specified Role not exists .");
        }
        if get(&form, "OIDCProviderArn") != PROVIDER {
            return refuse("EntityNotExist.OIDCProvider", "The specified OIDCProvider not exists.");
        }
        let oidc_token = get(&form, "OIDCToken");
        let lifetime = match oidc_token.as_str() {
            TOKEN_V1 => Duration::from_secs(2),
            TOKEN_V2 => Duration::from_secs(3600),
            _ => return refuse("AuthenticationFail.OIDCToken.Invalid", "The OIDC token is invalid or expired."),
        };
        match *self.mode.lock().unwrap() {
            StsMode::Unavailable(n) if calls <= n => {
                return json(StatusCode::SERVICE_UNAVAILABLE, r#"{"Code":"ServiceUnavailable","Message":"busy"}"#);
            }
            StsMode::Malformed => return json(StatusCode::OK, "<html>captive portal</html>"),
            _ => {}
        }
        let n = self.grants.lock().unwrap().len() + 1;
        let grant = Grant { oidc_token, security_token: format!("CAIS-security-token-{n}") };
        let answer = serde_json::json!({
            "RequestId": "3D57EAD2-8723-1F26-B69C-F8707D8B565D",
            "Credentials": {
                "AccessKeyId": format!("STS.access-key-{n}"),
                "AccessKeySecret": format!("sts-secret-{n}"),
                "SecurityToken": grant.security_token,
                "Expiration": utc(SystemTime::now() + lifetime),
            },
            "AssumedRoleUser": {"Arn": format!("{ROLE}/ckptd"), "AssumedRoleId": "3409:ckptd"},
        });
        self.grants.lock().unwrap().push(grant);
        json(StatusCode::OK, &answer.to_string())
    }
}

fn json(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// `t` as STS writes `Expiration` (`2021-10-20T04:27:09Z`).
fn utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let (mut days, rem) = (secs / 86_400, secs % 86_400);
    let leap = |y: u64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let mut year = 1970;
    while days >= if leap(year) { 366 } else { 365 } {
        days -= if leap(year) { 366 } else { 365 };
        year += 1;
    }
    let lens = [31, if leap(year) { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let mut month = 0;
    while days >= lens[month] {
        days -= lens[month];
        month += 1;
    }
    format!("{year:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", month + 1, days + 1, rem / 3600, rem / 60 % 60, rem % 60)
}

/// One request the S3 server received through the proxy.
#[derive(Debug, Clone)]
struct Seen {
    method: http::Method,
    path: String,
    security_token: Option<String>,
    authorization: String,
}

/// Forwards to the loopback S3 server and records each request. `oss://` addresses its bucket
/// by host name, which a 127.0.0.1 endpoint cannot carry, so the proxy puts the bucket in front
/// of the path as the S3 server expects.
struct RecordingProxy {
    upstream: String,
    /// The bucket to put in front of the path (`oss://`); empty for path-style `s3://`.
    bucket: String,
    seen: Mutex<Vec<Seen>>,
}

impl RecordingProxy {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (mut parts, body) = req.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let header = |k: &str| parts.headers.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
        self.seen.lock().unwrap().push(Seen {
            method: parts.method.clone(),
            path: parts.uri.path().to_string(),
            security_token: header("x-amz-security-token"),
            authorization: header("authorization").unwrap_or_default(),
        });
        let path_and_query = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let bucket = if self.bucket.is_empty() { String::new() } else { format!("/{}", self.bucket) };
        parts.uri = format!("{}{bucket}{path_and_query}", self.upstream).parse().unwrap();
        parts.headers.remove(http::header::HOST);
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        match client.request(Request::from_parts(parts, Full::new(body))).await {
            Ok(resp) => {
                let (parts, body) = resp.into_parts();
                let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                Response::from_parts(parts, Full::new(body))
            }
            Err(e) => Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body(Full::new(Bytes::from(format!("proxy: {e}"))))
                .unwrap(),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// Serves `handle` on a fresh 127.0.0.1 port and returns `http://127.0.0.1:<port>`.
async fn serve<S, F, Fut>(state: Arc<S>, handle: F) -> String
where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, Request<Incoming>) -> Fut + Send + Sync + Copy + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let state = state.clone();
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(state, req).await) }
            });
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });
    format!("http://{addr}")
}

async fn start_sts(mode: StsMode) -> (Arc<FakeSts>, String) {
    let sts = FakeSts::new(mode);
    let url = serve(sts.clone(), |s: Arc<FakeSts>, req| async move { s.handle(req).await }).await;
    (sts, url)
}

/// What ACK's pod-identity webhook sets, plus the fake STS's endpoint.
fn rrsa_env(token_file: &FsPath, sts: &str) -> MapEnv {
    MapEnv(
        [
            (ENV_ROLE_ARN, ROLE.to_string()),
            (ENV_OIDC_PROVIDER_ARN, PROVIDER.to_string()),
            (ENV_OIDC_TOKEN_FILE, token_file.display().to_string()),
            (ENV_STS_ENDPOINT, sts.to_string()),
            ("OSS_REGION", "cn-wulanchabu".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    )
}

fn options() -> StoreOptions {
    StoreOptions {
        max_retries: 0,
        initial_backoff: Duration::from_millis(10),
        retry_timeout: Duration::from_secs(10),
        ..StoreOptions::default()
    }
}

/// Every string a leak would show: the OIDC tokens and the keys and tokens STS handed out.
fn secrets() -> Vec<String> {
    let mut s = vec![TOKEN_V1.to_string(), TOKEN_V2.to_string()];
    for n in 1..=4 {
        s.push(format!("sts-secret-{n}"));
        s.push(format!("CAIS-security-token-{n}"));
    }
    s
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in secrets() {
        assert!(!text.contains(&secret), "{what} shows `{secret}`: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oss_requests_carry_the_sts_token_and_refresh_it_with_the_rotated_oidc_token() {
    if !common::s3::s3_available() {
        return;
    }
    let (sts, sts_url) = start_sts(StsMode::Grant).await;
    let proxy = Arc::new(RecordingProxy {
        upstream: common::s3::require_endpoint().trim_end_matches('/').to_string(),
        bucket: common::s3::bucket(),
        seen: Mutex::new(Vec::new()),
    });
    let proxy_url = serve(proxy.clone(), |p: Arc<RecordingProxy>, req| async move { p.handle(req).await }).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN_V1}\n")).unwrap();

    let root = common::s3::unique_prefix("rrsa");
    let url = format!("oss://{}/{root}?endpoint={proxy_url}", common::s3::bucket());
    let store = Store::open_with_env(&url, &options(), &rrsa_env(&token_file, &sts_url)).unwrap();
    let os = store.object_store().clone();
    let a = store.path("job/a");
    let b = store.path("job/b");

    // The first request fetches credentials with the first token and carries STS's security token.
    os.put(&a, PutPayload::from_static(b"first")).await.unwrap();
    let grants = sts.grants();
    assert_eq!(grants.len(), 1, "{grants:?}");
    assert_eq!(grants[0].oidc_token, TOKEN_V1, "the token file's content, without its newline");
    let seen = proxy.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].security_token.as_deref(), Some("CAIS-security-token-1"), "{seen:?}");
    assert!(seen[0].authorization.contains("Credential=STS.access-key-1/"), "signed with the STS key: {seen:?}");

    // The kubelet rotates the token; once the first credential has aged past its refresh point
    // (it expires two seconds after issue), the next request fetches with the new token.
    std::fs::write(&token_file, TOKEN_V2).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    os.put(&b, PutPayload::from_static(b"second")).await.unwrap();
    let grants = sts.grants();
    let last = grants.last().unwrap();
    assert_eq!(last.oidc_token, TOKEN_V2, "the refresh read the rotated token file: {grants:?}");
    let refreshed = last.security_token.clone();
    let seen = proxy.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].security_token.as_deref(), Some(refreshed.as_str()), "{seen:?}");

    // The second credential lasts an hour: it is cached, and every request carries it.
    assert_eq!(os.get(&a).await.unwrap().bytes().await.unwrap().as_ref(), b"first");
    assert_eq!(os.get(&b).await.unwrap().bytes().await.unwrap().as_ref(), b"second");
    let listed = os.list_with_delimiter(Some(&store.path("job"))).await.unwrap();
    assert_eq!(listed.objects.len(), 2, "{listed:?}");
    os.delete(&a).await.unwrap();
    os.delete(&b).await.unwrap();
    let seen = proxy.seen();
    assert_eq!(seen.len(), 5, "{seen:?}");
    for s in &seen {
        assert_eq!(s.security_token.as_deref(), Some(refreshed.as_str()), "{} {}: {s:?}", s.method, s.path);
    }
    assert_eq!(sts.grants().len(), grants.len(), "no STS call while the credential is fresh");

    // Nothing the provider holds shows in the store's Debug output.
    assert_no_secret("the store's Debug", &format!("{store:?} {:?}", store.s3_client()));
}

/// Opens an `oss://` store on a closed port (no request gets that far) and returns the error of
/// the first request.
async fn first_request_error(env: &MapEnv) -> ckpt_core::Error {
    let store = Store::open_with_env("oss://bkt/root?endpoint=http://127.0.0.1:9", &options(), env).unwrap();
    let path = Path::from("root/job/x");
    let e = store.object_store().head(&path).await.unwrap_err();
    ckpt_core::Error::Store { op: "head", path: path.to_string(), cause: e }
}

#[tokio::test]
async fn an_sts_refusal_names_its_code_and_what_to_fix_and_no_secret() {
    let (sts, sts_url) = start_sts(StsMode::Grant).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    // A token STS does not accept (expired, or for another audience).
    std::fs::write(&token_file, "eyJhbGciOiJSUzI1NiJ9.stale-token-payload.sig0").unwrap();
    let e = first_request_error(&rrsa_env(&token_file, &sts_url)).await;
    let msg = e.to_string();
    assert!(msg.contains("AuthenticationFail.OIDCToken.Invalid"), "{msg}");
    assert!(msg.contains(ROLE) && msg.contains(PROVIDER), "says which role and provider to check: {msg}");
    assert!(!msg.contains("stale-token-payload"), "{msg}");
    assert_no_secret("the error", &format!("{msg} {e:?}"));
    assert_eq!(e.kind(), ErrorKind::Storage, "a refusal is not retried as transient: {msg}");
    assert!(sts.grants().is_empty());
}

#[tokio::test]
async fn a_missing_token_file_says_which_file_and_variable() {
    let (sts, sts_url) = start_sts(StsMode::Grant).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("not-projected");
    let e = first_request_error(&rrsa_env(&token_file, &sts_url)).await;
    let msg = e.to_string();
    assert!(msg.contains(&token_file.display().to_string()) && msg.contains(ENV_OIDC_TOKEN_FILE), "{msg}");
    assert_eq!(e.kind(), ErrorKind::Storage, "{msg}");
    assert_eq!(*sts.calls.lock().unwrap(), 0, "STS is not called without a token");
}

#[tokio::test]
async fn a_malformed_sts_answer_is_reported_without_its_contents() {
    let (_sts, sts_url) = start_sts(StsMode::Malformed).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN_V1).unwrap();
    let e = first_request_error(&rrsa_env(&token_file, &sts_url)).await;
    let msg = e.to_string();
    assert!(msg.contains("without usable Credentials"), "{msg}");
    assert_no_secret("the error", &msg);
}

#[tokio::test]
async fn an_unavailable_sts_is_tried_again() {
    let (sts, sts_url) = start_sts(StsMode::Unavailable(2)).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN_V1).unwrap();
    let e = first_request_error(&rrsa_env(&token_file, &sts_url)).await;
    // Two 503s, then a grant: the credential was obtained, and the request failed only because
    // nothing listens on the S3 port.
    assert_eq!(*sts.calls.lock().unwrap(), 3);
    assert_eq!(sts.grants().len(), 1);
    assert!(!e.to_string().contains("RRSA"), "{e}");
}

#[tokio::test]
async fn rrsa_variables_half_set_are_refused_when_the_store_opens() {
    let mut env = rrsa_env(FsPath::new("/var/run/secrets/tokens/token"), "https://sts.aliyuncs.com");
    env.0.remove(ENV_OIDC_PROVIDER_ARN);
    let e = Store::open_with_env("oss://bkt/root", &options(), &env).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(ENV_OIDC_PROVIDER_ARN) && msg.contains("pod-identity.alibabacloud.com/role-name"), "{msg}");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{msg}");
}

const AWS_ROLE: &str = "arn:aws:iam::123456789012:role/ckptd-agent";

/// A fake AWS STS: `AssumeRoleWithWebIdentity` as a form POST, answered in STS's XML. Tokens and
/// lifetimes as the fake Alibaba STS's.
struct FakeAwsSts {
    grants: Mutex<Vec<Grant>>,
}

impl FakeAwsSts {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let form: BTreeMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
        let get = |k: &str| form.get(k).cloned().unwrap_or_default();
        let xml = |status: StatusCode, body: String| {
            Response::builder()
                .status(status)
                .header("content-type", "text/xml")
                .body(Full::new(Bytes::from(body)))
                .unwrap()
        };
        let refuse = |code: &str, message: &str| {
            xml(
                StatusCode::BAD_REQUEST,
                format!(
                    "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type>\
                     <Code>{code}</Code><Message>{message}</Message></Error><RequestId>c6104cbe</RequestId></ErrorResponse>"
                ),
            )
        };
        if parts.method != http::Method::POST
            || get("Action") != "AssumeRoleWithWebIdentity"
            || get("Version") != "2011-06-15"
            || parts.uri.query().is_some_and(|q| q.contains("WebIdentityToken"))
        {
            return refuse("InvalidAction", "Could not find operation");
        }
        if get("RoleArn") != AWS_ROLE || get("RoleSessionName").is_empty() {
            return refuse("AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity");
        }
        let token = get("WebIdentityToken");
        let lifetime = match token.as_str() {
            TOKEN_V1 => Duration::from_secs(2),
            TOKEN_V2 => Duration::from_secs(3600),
            _ => {
                return refuse(
                    "InvalidIdentityToken",
                    "Couldn't retrieve verification key from your identity provider",
                );
            }
        };
        let n = self.grants.lock().unwrap().len() + 1;
        let grant = Grant { oidc_token: token, security_token: format!("IQoJb3JpZ2luX2VjE-session-{n}") };
        let answer = format!(
            "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
             <AssumeRoleWithWebIdentityResult><SubjectFromWebIdentityToken>system:serviceaccount:ml:trainer</SubjectFromWebIdentityToken>\
             <AssumedRoleUser><Arn>{AWS_ROLE}/ckptd</Arn><AssumedRoleId>AROA:ckptd</AssumedRoleId></AssumedRoleUser>\
             <Credentials><SessionToken>{}</SessionToken><SecretAccessKey>aws-secret-{n}</SecretAccessKey>\
             <Expiration>{}</Expiration><AccessKeyId>ASIA-key-{n}</AccessKeyId></Credentials>\
             <Audience>sts.amazonaws.com</Audience></AssumeRoleWithWebIdentityResult>\
             <ResponseMetadata><RequestId>ad4156e9</RequestId></ResponseMetadata></AssumeRoleWithWebIdentityResponse>",
            grant.security_token,
            utc(SystemTime::now() + lifetime)
        );
        self.grants.lock().unwrap().push(grant);
        xml(StatusCode::OK, answer)
    }
}

/// What EKS's IRSA sets, plus the fake STS's endpoint and the S3 server's (behind `s3`).
fn irsa_env(token_file: &FsPath, sts: &str, s3: &str) -> MapEnv {
    MapEnv(
        [
            ("AWS_ROLE_ARN", AWS_ROLE.to_string()),
            ("AWS_WEB_IDENTITY_TOKEN_FILE", token_file.display().to_string()),
            ("AWS_ENDPOINT_URL_STS", sts.to_string()),
            ("AWS_ENDPOINT_URL", s3.to_string()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_requests_carry_the_web_identity_session_token_and_refresh_it_with_the_rotated_token() {
    if !common::s3::s3_available() {
        return;
    }
    let sts = Arc::new(FakeAwsSts { grants: Mutex::new(Vec::new()) });
    let sts_url = serve(sts.clone(), |s: Arc<FakeAwsSts>, req| async move { s.handle(req).await }).await;
    let proxy = Arc::new(RecordingProxy {
        upstream: common::s3::require_endpoint().trim_end_matches('/').to_string(),
        bucket: String::new(),
        seen: Mutex::new(Vec::new()),
    });
    let proxy_url = serve(proxy.clone(), |p: Arc<RecordingProxy>, req| async move { p.handle(req).await }).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN_V1}\n")).unwrap();

    let url = format!("s3://{}/{}", common::s3::bucket(), common::s3::unique_prefix("irsa"));
    let store = Store::open_with_env(&url, &options(), &irsa_env(&token_file, &sts_url, &proxy_url)).unwrap();
    let os = store.object_store().clone();
    let (a, b) = (store.path("job/a"), store.path("job/b"));

    os.put(&a, PutPayload::from_static(b"first")).await.unwrap();
    let grants = sts.grants.lock().unwrap().clone();
    assert_eq!(grants.len(), 1, "{grants:?}");
    assert_eq!(grants[0].oidc_token, TOKEN_V1);
    let seen = proxy.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].security_token.as_deref(), Some("IQoJb3JpZ2luX2VjE-session-1"), "{seen:?}");
    assert!(seen[0].authorization.contains("Credential=ASIA-key-1/"), "signed with the STS key: {seen:?}");

    // Rotated token, first credential past its refresh point: the next request fetches anew.
    std::fs::write(&token_file, TOKEN_V2).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    os.put(&b, PutPayload::from_static(b"second")).await.unwrap();
    let last = sts.grants.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.oidc_token, TOKEN_V2, "the refresh read the rotated token file");
    assert_eq!(os.get(&a).await.unwrap().bytes().await.unwrap().as_ref(), b"first");
    let seen = proxy.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for s in &seen {
        assert_eq!(s.security_token.as_deref(), Some(last.security_token.as_str()), "{s:?}");
    }
    let debug = format!("{store:?} {:?}", store.s3_client());
    for secret in [TOKEN_V1, TOKEN_V2, "aws-secret-1", "aws-secret-2", "IQoJb3JpZ2luX2VjE-session-1"] {
        assert!(!debug.contains(secret), "the store's Debug shows `{secret}`");
    }

    // A token STS does not accept: the error says which code and what to check, and no secret.
    std::fs::write(&token_file, "eyJ.not-a-valid-token.sig").unwrap();
    let refused = Store::open_with_env(&url, &options(), &irsa_env(&token_file, &sts_url, &proxy_url)).unwrap();
    let e = refused.object_store().head(&a).await.unwrap_err().to_string();
    assert!(e.contains("InvalidIdentityToken") && e.contains("trust policy"), "{e}");
    assert!(!e.contains("not-a-valid-token"), "{e}");
}
