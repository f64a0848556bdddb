//! Stores: opening an `Arc<dyn ObjectStore>` from a URL, and the checkpoint layout on it.
//!
//! The seam is `object_store`'s trait; we add no storage trait of our own. [`Store`] only adds what
//! the engine needs on top: the URL's path prefix, the local root directory for `file://` (so that
//! shards are written with pwrite (`O_DIRECT` where it can) + fsync and read with pread), and the S3 coordinates that the
//! multipart janitor needs.
//!
//! Endpoint and credentials come from the standard environment variables (`AWS_*`, `OSS_*`,
//! `ALIBABA_CLOUD_*`, `GOOGLE_*`, `AZURE_*`) and web-identity token files: for `s3://`,
//! `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN` (IRSA, [`rrsa::WebIdentityConfig`]); for `oss://`,
//! the RRSA variables of ACK's pod-identity webhook ([`rrsa`]), used when no static OSS key is set.
//! They never appear in a log line or an error: [`Store::url`] is the URL with user-info and query
//! values removed.

pub mod layout;
#[cfg(feature = "cloud")]
pub mod oss;
#[cfg(feature = "cloud")]
pub mod rrsa;
#[cfg(feature = "cloud")]
pub mod s3_uploads;

use std::collections::BTreeMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use object_store::path::Path;
#[cfg(feature = "cloud")]
use object_store::{BackoffConfig, ClientOptions, RetryConfig};

use crate::error::{Error, Result};

/// Environment variable: extra S3 endpoint override for `s3://` URLs (same as `AWS_ENDPOINT_URL`).
pub const ENV_AWS_ENDPOINT_URL: &str = "AWS_ENDPOINT_URL";
/// Environment variable: OSS region, used when an `oss://` URL has no `region=` query value.
pub const ENV_OSS_REGION: &str = "OSS_REGION";
/// Environment variable: Alibaba Cloud region, the fallback for [`ENV_OSS_REGION`].
pub const ENV_ALIBABA_CLOUD_REGION_ID: &str = "ALIBABA_CLOUD_REGION_ID";
/// Environment variable: full OSS endpoint override (e.g. an internal VPC endpoint).
pub const ENV_OSS_ENDPOINT: &str = "OSS_ENDPOINT";
/// Environment variables holding OSS access keys, in order of preference per field.
pub const ENV_OSS_ACCESS_KEY_ID: [&str; 3] = ["OSS_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"];
/// See [`ENV_OSS_ACCESS_KEY_ID`].
pub const ENV_OSS_ACCESS_KEY_SECRET: [&str; 3] =
    ["OSS_ACCESS_KEY_SECRET", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "AWS_SECRET_ACCESS_KEY"];
/// See [`ENV_OSS_ACCESS_KEY_ID`].
pub const ENV_OSS_SESSION_TOKEN: [&str; 3] = ["OSS_SESSION_TOKEN", "ALIBABA_CLOUD_SECURITY_TOKEN", "AWS_SESSION_TOKEN"];

/// Where configuration values come from. Tests feed a map; production reads the process.
pub trait Env: Send + Sync {
    /// The value of one variable.
    fn get(&self, key: &str) -> Option<String>;
    /// Every variable, for builders that take all `AWS_*` keys.
    fn vars(&self) -> Vec<(String, String)>;
}

/// The process environment.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.is_empty())
    }
    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars().collect()
    }
}

/// A fixed map of variables.
#[derive(Debug, Default, Clone)]
pub struct MapEnv(pub BTreeMap<String, String>);

impl Env for MapEnv {
    fn get(&self, key: &str) -> Option<String> {
        self.0.get(key).cloned().filter(|v| !v.is_empty())
    }
    fn vars(&self) -> Vec<(String, String)> {
        self.0.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// How a store is opened: retry policy and timeouts for remote stores.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Retries for transient failures (5xx, timeouts, connection resets).
    pub max_retries: usize,
    /// Give up retrying a request after this long.
    pub retry_timeout: Duration,
    /// First backoff delay; it doubles up to `max_backoff`, with jitter.
    pub initial_backoff: Duration,
    /// Largest backoff delay.
    pub max_backoff: Duration,
    /// Per-request timeout (connect + transfer).
    pub request_timeout: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Allow plain-HTTP endpoints (loopback test servers). Defaults to true only for loopback.
    pub allow_http: Option<bool>,
    /// Create the directory of a `file://` store when it is missing. Writers (the agent, the
    /// engine) want this; read-only tools (`ckptctl`) turn it off so that a mistyped path is
    /// reported as missing instead of becoming a new, empty store.
    pub create_local_dir: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_retries: 8,
            retry_timeout: Duration::from_secs(120),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(10),
            allow_http: None,
            create_local_dir: true,
        }
    }
}

#[cfg(feature = "cloud")]
impl StoreOptions {
    fn retry_config(&self) -> RetryConfig {
        RetryConfig {
            backoff: BackoffConfig { init_backoff: self.initial_backoff, max_backoff: self.max_backoff, base: 2.0 },
            max_retries: self.max_retries,
            retry_timeout: self.retry_timeout,
        }
    }

    fn client_options(&self, allow_http: bool) -> ClientOptions {
        ClientOptions::new()
            .with_timeout(self.request_timeout)
            .with_connect_timeout(self.connect_timeout)
            .with_allow_http(allow_http)
    }
}

/// The kind of backend a URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// `file:///dir`: a POSIX or parallel file system.
    Local {
        /// The directory that holds every job.
        root: PathBuf,
    },
    /// `memory://`: in-process, for tests and benchmarks.
    Memory,
    /// `s3://` or `oss://`: an S3-compatible object store.
    S3(S3Target),
    /// `gs://` or `az://`, or a store built by the caller.
    Other,
}

/// The coordinates of an S3-compatible bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Target {
    /// The bucket name.
    pub bucket: String,
    /// The region used for signing.
    pub region: String,
    /// The endpoint, when not AWS's default.
    pub endpoint: Option<String>,
    /// Whether requests go to `https://<bucket>.<endpoint host>` (OSS always does).
    pub virtual_hosted: bool,
    /// Whether the endpoint is plain HTTP.
    pub allow_http: bool,
}

/// An opened store: the object store, the path prefix of the URL, and what the engine needs to know
/// about the backend.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: Path,
    backend: Backend,
    url: String,
    #[cfg(feature = "cloud")]
    s3: Option<Arc<object_store::aws::AmazonS3>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("url", &self.url).field("backend", &self.backend).finish()
    }
}

impl Store {
    /// Opens a store from a URL: `file:///path`, `s3://bucket/prefix`, `oss://bucket/prefix`,
    /// `gs://bucket/prefix`, `az://container/prefix` or `memory://`. A bare path is taken as
    /// `file://`.
    pub fn open(url: &str, options: &StoreOptions) -> Result<Store> {
        Self::open_with_env(url, options, &ProcessEnv)
    }

    /// [`Store::open`] with configuration read from `env` instead of the process environment.
    pub fn open_with_env(url: &str, options: &StoreOptions, env: &dyn Env) -> Result<Store> {
        let shown = redact_url(url);
        let bad = |reason: String| Error::InvalidUrl { url: shown.clone(), reason };
        if url.trim().is_empty() {
            return Err(bad(format!("the store URL is empty: use {URL_FORMS}")));
        }
        if !url.contains("://") {
            return Self::open_local(FsPath::new(url), &shown, options);
        }
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let prefix = Path::parse(parsed.path().trim_matches('/')).map_err(|e| bad(format!("bad path: {e}")))?;
        match parsed.scheme() {
            "file" => {
                let path = parsed.to_file_path().map_err(|()| bad("a file:// URL needs an absolute path".into()))?;
                if path.parent().is_none() {
                    return Err(bad("a file:// URL needs a directory below the root, e.g. file:///mnt/ckpt".into()));
                }
                Self::open_local(&path, &shown, options)
            }
            "memory" => {
                Ok(Store::plain(Arc::new(object_store::memory::InMemory::new()), prefix, Backend::Memory, shown))
            }
            "s3" | "oss" | "gs" | "az" | "azure" | "abfs" => Self::open_cloud(&parsed, prefix, options, env, shown),
            other => Err(bad(format!("unknown scheme `{other}`: use {URL_FORMS}"))),
        }
    }

    #[cfg(feature = "cloud")]
    fn open_cloud(
        parsed: &url::Url,
        prefix: Path,
        options: &StoreOptions,
        env: &dyn Env,
        shown: String,
    ) -> Result<Store> {
        use std::str::FromStr;
        let bad = |reason: String| Error::InvalidUrl { url: shown.clone(), reason };
        match parsed.scheme() {
            "s3" | "oss" => {
                let target = resolve_s3(parsed, env).map_err(bad)?;
                let s3 = Arc::new(build_s3(&target, parsed, options, env).map_err(|e| bad(e.to_string()))?);
                Ok(Store {
                    inner: s3.clone(),
                    prefix,
                    backend: Backend::S3(target),
                    url: shown.clone(),
                    #[cfg(feature = "cloud")]
                    s3: Some(s3),
                })
            }
            "gs" => {
                let bucket = parsed.host_str().ok_or_else(|| bad("missing bucket".into()))?;
                let mut b = object_store::gcp::GoogleCloudStorageBuilder::new();
                for (k, v) in env.vars() {
                    if let Ok(key) = object_store::gcp::GoogleConfigKey::from_str(&k.to_ascii_lowercase()) {
                        b = b.with_config(key, v);
                    }
                }
                let store = b
                    .with_bucket_name(bucket)
                    .with_retry(options.retry_config())
                    .with_client_options(options.client_options(false))
                    .build()
                    .map_err(|e| bad(e.to_string()))?;
                Ok(Store::plain(Arc::new(store), prefix, Backend::Other, shown.clone()))
            }
            "az" | "azure" | "abfs" => {
                let container = parsed.host_str().ok_or_else(|| bad("missing container".into()))?;
                let mut b = object_store::azure::MicrosoftAzureBuilder::new();
                for (k, v) in env.vars() {
                    if let Ok(key) = object_store::azure::AzureConfigKey::from_str(&k.to_ascii_lowercase()) {
                        b = b.with_config(key, v);
                    }
                }
                let store = b
                    .with_container_name(container)
                    .with_retry(options.retry_config())
                    .with_client_options(options.client_options(false))
                    .build()
                    .map_err(|e| bad(e.to_string()))?;
                Ok(Store::plain(Arc::new(store), prefix, Backend::Other, shown.clone()))
            }
            _ => Err(bad("not a cloud scheme".into())),
        }
    }

    #[cfg(not(feature = "cloud"))]
    fn open_cloud(parsed: &url::Url, _: Path, _: &StoreOptions, _: &dyn Env, shown: String) -> Result<Store> {
        Err(Error::InvalidUrl {
            url: shown,
            reason: format!(
                "this build of ckpt-core has no `{}://` support: enable its `cloud` feature",
                parsed.scheme()
            ),
        })
    }

    fn open_local(path: &FsPath, shown: &str, options: &StoreOptions) -> Result<Store> {
        if options.create_local_dir {
            std::fs::create_dir_all(path).map_err(|e| Error::io("create directory", path, e))?;
        } else if !path.is_dir() {
            return Err(Error::NotFound {
                what: format!("store directory `{}` (does it exist? check the path in {shown})", path.display()),
            });
        }
        let root = path.canonicalize().map_err(|e| Error::io("resolve directory", path, e))?;
        let fs =
            object_store::local::LocalFileSystem::new_with_prefix(&root).map_err(|e| Error::store("open", shown, e))?;
        Ok(Store::plain(Arc::new(fs), Path::default(), Backend::Local { root }, shown.to_string()))
    }

    /// A store with no S3 client attached.
    fn plain(inner: Arc<dyn ObjectStore>, prefix: Path, backend: Backend, url: String) -> Store {
        Store {
            inner,
            prefix,
            backend,
            url,
            #[cfg(feature = "cloud")]
            s3: None,
        }
    }

    /// Wraps a store built by the caller (a test double around a real store, a custom client).
    /// `prefix` is prepended to every path the engine uses.
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, prefix: &str, label: &str) -> Result<Store> {
        let prefix = Path::parse(prefix.trim_matches('/'))
            .map_err(|e| Error::InvalidUrl { url: label.to_string(), reason: format!("bad prefix: {e}") })?;
        Ok(Store::plain(inner, prefix, Backend::Other, label.to_string()))
    }

    /// The object store itself.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// The URL with credentials removed, safe for logs and errors.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// What kind of backend this is.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The `AmazonS3` client, for `s3://` and `oss://` stores.
    #[cfg(feature = "cloud")]
    pub fn s3_client(&self) -> Option<&Arc<object_store::aws::AmazonS3>> {
        self.s3.as_ref()
    }

    /// The full object path of `rel`, a path relative to the URL's prefix.
    pub fn path(&self, rel: &str) -> Path {
        let rel = Path::from(rel);
        self.prefix.parts().chain(rel.parts()).collect()
    }

    /// The object path relative to the URL's prefix, or `None` when it lies outside it.
    pub fn relative(&self, full: &Path) -> Option<String> {
        full.prefix_match(&self.prefix).map(|parts| {
            let v: Vec<String> = parts.map(|p| p.as_ref().to_string()).collect();
            v.join("/")
        })
    }

    /// For `file://` stores, the local file that holds `path`.
    pub fn local_file(&self, path: &Path) -> Option<PathBuf> {
        match &self.backend {
            Backend::Local { root } => Some(root.join(path.as_ref())),
            _ => None,
        }
    }
}

/// The URL forms a store can be opened from, for messages.
const URL_FORMS: &str = "file:///path, s3://bucket/prefix, oss://, gs://, az:// or memory://";

/// Removes user-info, query values and the fragment from a URL so that it can be logged, whether
/// or not it parses. Control characters are written as escapes, so a URL cannot break a log line.
pub fn redact_url(url: &str) -> String {
    let shown = match url::Url::parse(url) {
        Ok(mut u) => {
            if !u.username().is_empty() || u.password().is_some() {
                let _ = u.set_username("");
                let _ = u.set_password(None);
            }
            if u.query().is_some() {
                let keys: Vec<String> = u.query_pairs().map(|(k, _)| format!("{k}=…")).collect();
                u.set_query(Some(&keys.join("&")));
            }
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => redact_unparsed(url),
    };
    shown.chars().flat_map(|c| if c.is_control() { c.escape_default().collect() } else { vec![c] }).collect()
}

/// [`redact_url`] for a string that is not a URL: keeps the scheme, drops everything up to the
/// last `@` of the authority (user-info) and everything from the first `?` or `#`.
fn redact_unparsed(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or_default();
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    format!("{scheme}://{host}{path}")
}

fn query_value(url: &url::Url, key: &str) -> Option<String> {
    url.query_pairs().find(|(k, _)| k == key).map(|(_, v)| v.into_owned()).filter(|v| !v.is_empty())
}

fn first_env(env: &dyn Env, keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| env.get(k))
}

#[cfg(feature = "cloud")]
fn is_loopback_endpoint(endpoint: &str) -> bool {
    url::Url::parse(endpoint)
        .ok()
        .and_then(|u| u.host_str().map(|h| h == "localhost" || h.starts_with("127.") || h == "[::1]"))
        .unwrap_or(false)
}

/// Resolves the bucket, region and endpoint of an `s3://` or `oss://` URL. Pure, so it is tested on
/// maps of variables.
pub fn resolve_s3(url: &url::Url, env: &dyn Env) -> std::result::Result<S3Target, String> {
    let bucket = url.host_str().filter(|b| !b.is_empty()).ok_or("missing bucket name")?.to_string();
    if url.scheme() == "oss" {
        let region = query_value(url, "region")
            .or_else(|| first_env(env, &[ENV_OSS_REGION, ENV_ALIBABA_CLOUD_REGION_ID]))
            .ok_or_else(|| format!("no OSS region: add `?region=cn-hangzhou` to the URL or set {ENV_OSS_REGION}"))?;
        let region = region.strip_prefix("oss-").unwrap_or(&region).to_string();
        let endpoint = query_value(url, "endpoint")
            .or_else(|| env.get(ENV_OSS_ENDPOINT))
            .unwrap_or_else(|| format!("https://oss-{region}.aliyuncs.com"));
        let allow_http = endpoint.starts_with("http://");
        return Ok(S3Target { bucket, region, endpoint: Some(endpoint), virtual_hosted: true, allow_http });
    }
    let endpoint = query_value(url, "endpoint")
        .or_else(|| first_env(env, &[ENV_AWS_ENDPOINT_URL, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT"]));
    let region = query_value(url, "region")
        .or_else(|| first_env(env, &["AWS_REGION", "AWS_DEFAULT_REGION"]))
        .unwrap_or_else(|| "us-east-1".to_string());
    let virtual_hosted = query_value(url, "virtual_hosted")
        .or_else(|| env.get("AWS_VIRTUAL_HOSTED_STYLE_REQUEST"))
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false);
    let allow_http = endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
    Ok(S3Target { bucket, region, endpoint, virtual_hosted, allow_http })
}

/// `https://host` → `https://<bucket>.host`, unless the host already starts with the bucket.
pub fn bucket_endpoint(endpoint: &str, bucket: &str) -> String {
    match url::Url::parse(endpoint) {
        Ok(mut u) => {
            let host = u.host_str().unwrap_or_default().to_string();
            if !host.starts_with(&format!("{bucket}.")) && u.set_host(Some(&format!("{bucket}.{host}"))).is_err() {
                return endpoint.to_string();
            }
            u.as_str().trim_end_matches('/').to_string()
        }
        Err(_) => endpoint.to_string(),
    }
}

/// A configuration problem found while building a store, as `object_store` reports it.
#[cfg(feature = "cloud")]
fn config_error(reason: String) -> object_store::Error {
    object_store::Error::Generic { store: "OSS", source: reason.into() }
}

#[cfg(feature = "cloud")]
fn build_s3(
    target: &S3Target,
    url: &url::Url,
    options: &StoreOptions,
    env: &dyn Env,
) -> std::result::Result<object_store::aws::AmazonS3, object_store::Error> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    use std::str::FromStr;
    let mut b = AmazonS3Builder::new();
    if url.scheme() == "s3" {
        for (k, v) in env.vars() {
            if !k.starts_with("AWS_") {
                continue;
            }
            if let Ok(key) = AmazonS3ConfigKey::from_str(&k.to_ascii_lowercase()) {
                b = b.with_config(key, v);
            }
        }
        // IRSA: the web identity token is traded at STS by our provider (static keys win, as in
        // the AWS SDKs' chain).
        let static_keys = env.get("AWS_ACCESS_KEY_ID").is_some();
        if !static_keys
            && let Some(web) = rrsa::WebIdentityConfig::from_env(env, &target.region)
                .map_err(|reason| object_store::Error::Generic { store: "S3", source: reason.into() })?
        {
            b = b.with_credentials(Arc::new(rrsa::OidcCredentialProvider::aws(web, options)?));
        }
    } else {
        if let Some(id) = first_env(env, &ENV_OSS_ACCESS_KEY_ID) {
            b = b.with_access_key_id(id);
        }
        if let Some(secret) = first_env(env, &ENV_OSS_ACCESS_KEY_SECRET) {
            b = b.with_secret_access_key(secret);
        }
        if let Some(token) = first_env(env, &ENV_OSS_SESSION_TOKEN) {
            b = b.with_token(token);
        }
        let static_keys = first_env(env, &ENV_OSS_ACCESS_KEY_ID).is_some();
        if !static_keys && let Some(rrsa) = rrsa::RrsaConfig::from_env(env).map_err(config_error)? {
            b = b.with_credentials(Arc::new(rrsa::OidcCredentialProvider::new(rrsa, options)?));
        }
        b = b.with_http_connector(oss::ForbidOverwriteConnector);
    }
    // A plain-HTTP endpoint is used only when the operator wrote one, and by default only on
    // loopback: a remote http:// endpoint would send data unencrypted.
    let loopback = target.endpoint.as_deref().is_some_and(is_loopback_endpoint);
    let allow_http = options.allow_http.unwrap_or(target.allow_http && loopback);
    b = b
        .with_bucket_name(&target.bucket)
        .with_region(&target.region)
        .with_virtual_hosted_style_request(target.virtual_hosted)
        .with_retry(options.retry_config())
        .with_client_options(options.client_options(allow_http));
    if let Some(endpoint) = &target.endpoint {
        // object_store expects a virtual-hosted endpoint to name the bucket already.
        let endpoint = if target.virtual_hosted { bucket_endpoint(endpoint, &target.bucket) } else { endpoint.clone() };
        b = b.with_endpoint(endpoint);
    }
    b.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> MapEnv {
        MapEnv(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn oss_region_from_url_then_env() {
        let u = url::Url::parse("oss://bkt/jobs?region=cn-beijing").unwrap();
        let t = resolve_s3(&u, &env(&[(ENV_OSS_REGION, "cn-hangzhou")])).unwrap();
        assert_eq!(t.region, "cn-beijing");
        assert_eq!(t.endpoint.as_deref(), Some("https://oss-cn-beijing.aliyuncs.com"));
        assert!(t.virtual_hosted);
        assert_eq!(
            bucket_endpoint("https://oss-cn-beijing.aliyuncs.com", "bkt"),
            "https://bkt.oss-cn-beijing.aliyuncs.com"
        );
        assert_eq!(
            bucket_endpoint("https://bkt.oss-cn-beijing.aliyuncs.com", "bkt"),
            "https://bkt.oss-cn-beijing.aliyuncs.com"
        );

        let u = url::Url::parse("oss://bkt/jobs").unwrap();
        let t = resolve_s3(&u, &env(&[(ENV_ALIBABA_CLOUD_REGION_ID, "oss-cn-shanghai")])).unwrap();
        assert_eq!(t.region, "cn-shanghai");
        assert_eq!(t.endpoint.as_deref(), Some("https://oss-cn-shanghai.aliyuncs.com"));

        let err = resolve_s3(&u, &env(&[])).unwrap_err();
        assert!(err.contains("region=") && err.contains(ENV_OSS_REGION), "{err}");
    }

    #[test]
    fn s3_endpoint_and_region_from_env() {
        let u = url::Url::parse("s3://bkt/a/b").unwrap();
        let t = resolve_s3(&u, &env(&[("AWS_ENDPOINT_URL", "http://127.0.0.1:9000"), ("AWS_REGION", "eu-west-1")]))
            .unwrap();
        assert_eq!(t.bucket, "bkt");
        assert_eq!(t.region, "eu-west-1");
        assert_eq!(t.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert!(t.allow_http);
        assert!(!t.virtual_hosted);
    }

    #[test]
    fn redaction_hides_secrets() {
        let shown = redact_url("s3://AKIA:supersecret@bkt/p?token=abc&region=x");
        assert!(!shown.contains("supersecret") && !shown.contains("AKIA") && !shown.contains("abc"), "{shown}");
        assert!(shown.contains("bkt/p"));
    }

    #[test]
    fn redaction_hides_secrets_of_urls_that_do_not_parse() {
        for (url, secrets) in [
            ("s3://KEY:SECRET@/p", &["KEY", "SECRET"][..]),
            ("s3://KEY:SECRET@[bad/p?token=t0k", &["KEY", "SECRET", "t0k"]),
            ("oss://a@b:c@/x#sig=s1g", &["a@b", "c@", "s1g"]),
        ] {
            let shown = redact_url(url);
            for s in secrets {
                assert!(!shown.contains(s), "{url} shows {s}: {shown}");
            }
            let e = Store::open_with_env(url, &StoreOptions::default(), &env(&[])).unwrap_err();
            let msg = e.to_string();
            for s in secrets {
                assert!(!msg.contains(s), "{url}: the error shows {s}: {msg}");
            }
            assert_eq!(e.kind(), crate::ErrorKind::InvalidInput, "{msg}");
        }
        assert_eq!(redact_url("s3://KEY:SECRET@/p"), "s3:///p");
        let forged = redact_url("gs://bkt/a\nforged line\u{1b}[31m");
        assert!(!forged.chars().any(char::is_control), "{forged:?}");
        assert_eq!(redact_url("not a url\n"), "not a url\\n");
        assert_eq!(redact_url("s3://bkt/p#frag"), "s3://bkt/p");
    }

    #[test]
    fn empty_urls_and_the_file_root_are_refused() {
        for url in ["", " ", "file://", "file:///", "file:///.."] {
            let e = Store::open_with_env(url, &StoreOptions::default(), &env(&[])).unwrap_err();
            assert!(matches!(e, Error::InvalidUrl { .. }), "`{url}`: {e:?}");
        }
    }

    #[test]
    fn a_missing_directory_is_not_created_when_creation_is_off() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("typo/ckpt");
        let url = format!("file://{}", missing.display());
        let read_only = StoreOptions { create_local_dir: false, ..StoreOptions::default() };
        let e = Store::open_with_env(&url, &read_only, &env(&[])).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains(&missing.display().to_string()), "{e}");
        assert!(!dir.path().join("typo").exists(), "nothing is created");
        Store::open_with_env(&url, &StoreOptions::default(), &env(&[])).unwrap();
        assert!(missing.is_dir(), "writers still create the directory");
        Store::open_with_env(&url, &read_only, &env(&[])).unwrap();
    }

    #[test]
    fn credentials_never_in_errors() {
        let e = Store::open_with_env("ftp://user:hunter2@host/x", &StoreOptions::default(), &env(&[])).unwrap_err();
        let msg = e.to_string();
        assert!(!msg.contains("hunter2"), "{msg}");
        assert!(msg.contains("unknown scheme"), "{msg}");
    }

    #[test]
    fn prefix_is_applied() {
        let s = Store::open("memory:///root/sub", &StoreOptions::default()).unwrap();
        assert_eq!(s.path("job/step-1/MANIFEST").as_ref(), "root/sub/job/step-1/MANIFEST");
        let full = s.path("job/x");
        assert_eq!(s.relative(&full).as_deref(), Some("job/x"));
    }
}
