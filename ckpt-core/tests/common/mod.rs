//! Helpers shared by the integration tests of `ckpt-core`.
//!
//! Each test binary pulls this in with `mod common;`. Not every binary uses every helper, so
//! the submodules allow dead code instead of each test silencing warnings on its own.

#[allow(dead_code)]
pub mod fault_proxy;
#[allow(dead_code)]
pub mod reliability;
#[allow(dead_code)]
pub mod shard_file;

/// Access to the loopback S3 server (moto) that `scripts/test.sh` starts for the test run.
///
/// A test that needs S3 either gets an endpoint or fails loudly: the only way to skip is the
/// explicit opt-out [`s3::SKIP_ENV`]`=1`, checked through [`s3::s3_available`].
#[allow(dead_code)]
pub mod s3 {
    use std::net::SocketAddr;
    use std::time::{SystemTime, UNIX_EPOCH};

    use object_store::aws::AmazonS3Builder;

    /// Endpoint of the S3-compatible test server, e.g. `http://127.0.0.1:5999`.
    pub const ENDPOINT_ENV: &str = "CKPTD_TEST_S3_ENDPOINT";
    /// Bucket the tests share; it must already exist on the server.
    pub const BUCKET_ENV: &str = "CKPTD_TEST_S3_BUCKET";
    /// Set to `1` to skip S3 tests explicitly when no server is available.
    pub const SKIP_ENV: &str = "CKPTD_SKIP_S3_TESTS";
    /// Bucket used when [`BUCKET_ENV`] is not set.
    pub const DEFAULT_BUCKET: &str = "ckptd-test";
    /// Static credentials; moto accepts any.
    pub const ACCESS_KEY_ID: &str = "test";
    /// Static credentials; moto accepts any.
    pub const SECRET_ACCESS_KEY: &str = "test";
    /// Region the test clients sign for.
    pub const REGION: &str = "us-east-1";

    /// The endpoint from [`ENDPOINT_ENV`], if set and non-empty.
    pub fn endpoint() -> Option<String> {
        std::env::var(ENDPOINT_ENV).ok().filter(|e| !e.trim().is_empty())
    }

    /// The shared test bucket from [`BUCKET_ENV`], or [`DEFAULT_BUCKET`].
    pub fn bucket() -> String {
        std::env::var(BUCKET_ENV).ok().filter(|b| !b.trim().is_empty()).unwrap_or_else(|| DEFAULT_BUCKET.to_owned())
    }

    /// The S3 endpoint; panics with instructions when it is not configured.
    ///
    /// Callers that may be skipped must check [`s3_available`] first.
    pub fn require_endpoint() -> String {
        match endpoint() {
            Some(endpoint) => endpoint,
            None => panic!(
                "{ENDPOINT_ENV} is not set: this test needs the loopback S3 server. Run the tests \
                 with `bash scripts/test.sh` (it starts moto and creates the bucket), or start \
                 `moto_server -H 127.0.0.1 -p PORT`, create bucket `{}` and export \
                 {ENDPOINT_ENV}=http://127.0.0.1:PORT. To skip S3 tests on purpose, set {SKIP_ENV}=1",
                bucket()
            ),
        }
    }

    /// Whether S3 tests should run.
    ///
    /// Returns `false` only when the run opted out with [`SKIP_ENV`]`=1` (and says so on
    /// stderr); otherwise it requires the endpoint and panics like [`require_endpoint`], so a
    /// missing server can never turn into a silently passing test.
    #[allow(clippy::print_stderr)]
    pub fn s3_available() -> bool {
        if std::env::var(SKIP_ENV).is_ok_and(|v| v.trim() == "1") {
            eprintln!("skipping S3 test: {SKIP_ENV}=1");
            return false;
        }
        require_endpoint();
        true
    }

    /// A key prefix no other test or concurrent run uses: `tag`, process id and nanoseconds.
    pub fn unique_prefix(tag: &str) -> String {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
        format!("{tag}-{}-{nanos}", std::process::id())
    }

    /// The socket address behind an `http://host:port` endpoint, for [`super::fault_proxy`].
    pub fn endpoint_addr(endpoint: &str) -> SocketAddr {
        let url = url::Url::parse(endpoint).unwrap_or_else(|e| panic!("{ENDPOINT_ENV}={endpoint:?} is not a url: {e}"));
        url.socket_addrs(|| None)
            .ok()
            .and_then(|addrs| addrs.into_iter().next())
            .unwrap_or_else(|| panic!("{ENDPOINT_ENV}={endpoint:?} does not resolve to an address"))
    }

    /// A client builder for the test bucket at `endpoint` (path-style, plain http, test
    /// credentials), so tests only add what they vary, such as the retry policy.
    pub fn builder(endpoint: &str) -> AmazonS3Builder {
        AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_bucket_name(bucket())
            .with_allow_http(true)
            .with_access_key_id(ACCESS_KEY_ID)
            .with_secret_access_key(SECRET_ACCESS_KEY)
            .with_region(REGION)
    }
}
