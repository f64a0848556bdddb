//! RRSA credentials for `oss://`: temporary keys from Alibaba Cloud STS `AssumeRoleWithOIDC`.
//!
//! On ACK, the pod-identity webhook gives a pod a projected ServiceAccount token and three
//! variables: the RAM role to assume ([`ENV_ROLE_ARN`]), the cluster's OIDC provider
//! ([`ENV_OIDC_PROVIDER_ARN`]) and the token file ([`ENV_OIDC_TOKEN_FILE`]). The token is traded
//! at STS for an AccessKey pair and a security token that expire, so [`OidcCredentialProvider`]
//! plugs into `object_store`'s credential seam: it caches the credential, fetches a new one a
//! margin before expiry, and reads the token file again for every fetch because the kubelet
//! rotates it. The S3 client then signs with the temporary keys and sends the security token
//! (`x-amz-security-token`) with each request; signing stays `object_store`'s.
//!
//! `AssumeRoleWithOIDC` is an anonymous call: the OIDC token is the proof, so the request carries
//! no signature. The token goes in the POST body, never in the URL, and neither it nor the keys
//! STS returns appear in a log line, an error or a `Debug` output.
//!
//! `s3://` gets the same from AWS STS `AssumeRoleWithWebIdentity` ([`WebIdentityConfig`]: EKS's
//! IRSA and pod identity set `AWS_ROLE_ARN` and `AWS_WEB_IDENTITY_TOKEN_FILE`), through the same
//! provider, so that the STS endpoint can be named (`AWS_ENDPOINT_URL_STS`, as the AWS SDKs read
//! it) and the exchange is tested against a fake STS like RRSA's.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use object_store::CredentialProvider;
use object_store::aws::AwsCredential;
use object_store::client::{HttpClient, HttpConnector, ReqwestConnector};
use serde::Deserialize;
use tokio::sync::Mutex;

use super::s3_uploads::{format_timestamp, parse_timestamp};
use super::{Env, StoreOptions, is_loopback_endpoint};
use crate::error::Error;

/// Environment variable: the RAM role to assume (`acs:ram::<account>:role/<name>`); set by ACK's
/// pod-identity webhook.
pub const ENV_ROLE_ARN: &str = "ALIBABA_CLOUD_ROLE_ARN";
/// Environment variable: the cluster's RAM OIDC provider (`acs:ram::<account>:oidc-provider/<name>`).
pub const ENV_OIDC_PROVIDER_ARN: &str = "ALIBABA_CLOUD_OIDC_PROVIDER_ARN";
/// Environment variable: the file holding the projected ServiceAccount token (it rotates).
pub const ENV_OIDC_TOKEN_FILE: &str = "ALIBABA_CLOUD_OIDC_TOKEN_FILE";
/// Environment variable: the STS endpoint, a host (`sts-vpc.cn-hangzhou.aliyuncs.com`) or a URL.
pub const ENV_STS_ENDPOINT: &str = "ALIBABA_CLOUD_STS_ENDPOINT";
/// Environment variable: the STS region, used when [`ENV_STS_ENDPOINT`] is unset.
pub const ENV_STS_REGION: &str = "ALIBABA_CLOUD_STS_REGION";
/// Environment variable: `true` to use the VPC STS endpoint of [`ENV_STS_REGION`].
pub const ENV_VPC_ENDPOINT_ENABLED: &str = "ALIBABA_CLOUD_VPC_ENDPOINT_ENABLED";
/// Environment variable: the session name STS records (default [`DEFAULT_SESSION_NAME`]).
pub const ENV_ROLE_SESSION_NAME: &str = "ALIBABA_CLOUD_ROLE_SESSION_NAME";

/// The STS endpoint when neither [`ENV_STS_ENDPOINT`] nor [`ENV_STS_REGION`] is set.
pub const DEFAULT_STS_ENDPOINT: &str = "https://sts.aliyuncs.com";
/// The session name when [`ENV_ROLE_SESSION_NAME`] is unset.
pub const DEFAULT_SESSION_NAME: &str = "ckptd";
/// Credentials are fetched again this long before they expire, or at three quarters of their
/// lifetime when that comes first.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(180);
/// Attempts per fetch; connection failures and 5xx answers are tried again.
const FETCH_ATTEMPTS: u32 = 3;
/// Longest STS error message kept in an error.
const MAX_MESSAGE: usize = 300;
/// What the errors name this credential source.
const PROVIDER: &str = "RRSA (STS AssumeRoleWithOIDC)";

/// Where RRSA credentials come from: the role, the OIDC provider, the token file and STS.
///
/// It holds no secret (the token is read from its file at each fetch), so `Debug` shows it all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RrsaConfig {
    /// The RAM role to assume.
    pub role_arn: String,
    /// The RAM OIDC provider that vouches for the token.
    pub oidc_provider_arn: String,
    /// The projected ServiceAccount token.
    pub token_file: std::path::PathBuf,
    /// The STS endpoint URL.
    pub sts_endpoint: String,
    /// The session name STS records in the audit trail.
    pub session_name: String,
}

impl RrsaConfig {
    /// Reads the RRSA variables. `Ok(None)` when none of the three that ACK injects is set; an
    /// error that names the missing ones when only some are.
    pub fn from_env(env: &dyn Env) -> Result<Option<RrsaConfig>, String> {
        let vars = [ENV_ROLE_ARN, ENV_OIDC_PROVIDER_ARN, ENV_OIDC_TOKEN_FILE].map(|k| (k, env.get(k)));
        if vars.iter().all(|(_, v)| v.is_none()) {
            return Ok(None);
        }
        let missing: Vec<&str> = vars.iter().filter(|(_, v)| v.is_none()).map(|(k, _)| *k).collect();
        if !missing.is_empty() {
            return Err(format!(
                "RRSA needs {ENV_ROLE_ARN}, {ENV_OIDC_PROVIDER_ARN} and {ENV_OIDC_TOKEN_FILE}, but {} unset: \
                 annotate the pod's ServiceAccount with pod-identity.alibabacloud.com/role-name and let \
                 ACK's pod-identity webhook set them, or set them all",
                missing.join(" and ")
            ));
        }
        let [(_, Some(role_arn)), (_, Some(oidc_provider_arn)), (_, Some(token_file))] = vars else {
            return Ok(None);
        };
        let sts_endpoint = match (env.get(ENV_STS_ENDPOINT), env.get(ENV_STS_REGION)) {
            (Some(e), _) if e.contains("://") => e.trim_end_matches('/').to_string(),
            (Some(host), _) => format!("https://{}", host.trim_end_matches('/')),
            (None, Some(region)) => {
                let vpc = env.get(ENV_VPC_ENDPOINT_ENABLED).is_some_and(|v| v.eq_ignore_ascii_case("true"));
                format!("https://sts{}.{region}.aliyuncs.com", if vpc { "-vpc" } else { "" })
            }
            (None, None) => DEFAULT_STS_ENDPOINT.to_string(),
        };
        if sts_endpoint.starts_with("http://") && !is_loopback_endpoint(&sts_endpoint) {
            return Err(format!(
                "{ENV_STS_ENDPOINT} `{sts_endpoint}` is plain HTTP: the OIDC token and the keys STS returns \
                 would cross the network unencrypted; use https://"
            ));
        }
        let session_name = env.get(ENV_ROLE_SESSION_NAME).unwrap_or_else(|| DEFAULT_SESSION_NAME.to_string());
        Ok(Some(RrsaConfig { role_arn, oidc_provider_arn, token_file: token_file.into(), sts_endpoint, session_name }))
    }
}

/// Environment variable: the IAM role to assume with the web identity token (EKS IRSA).
pub const ENV_AWS_ROLE_ARN: &str = "AWS_ROLE_ARN";
/// Environment variable: the web identity token file (a projected ServiceAccount token; it rotates).
pub const ENV_AWS_WEB_IDENTITY_TOKEN_FILE: &str = "AWS_WEB_IDENTITY_TOKEN_FILE";
/// Environment variable: the session name STS records (default [`DEFAULT_SESSION_NAME`]).
pub const ENV_AWS_ROLE_SESSION_NAME: &str = "AWS_ROLE_SESSION_NAME";
/// Environment variable: the STS endpoint URL (the AWS SDKs' service-specific endpoint variable).
pub const ENV_AWS_ENDPOINT_URL_STS: &str = "AWS_ENDPOINT_URL_STS";

/// Where `s3://` web-identity credentials come from: the role, the token file and AWS STS.
///
/// It holds no secret (the token is read from its file at each fetch), so `Debug` shows it all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebIdentityConfig {
    /// The IAM role to assume.
    pub role_arn: String,
    /// The projected ServiceAccount token.
    pub token_file: std::path::PathBuf,
    /// The STS endpoint URL.
    pub sts_endpoint: String,
    /// The session name STS records.
    pub session_name: String,
}

impl WebIdentityConfig {
    /// Reads `AWS_ROLE_ARN` and `AWS_WEB_IDENTITY_TOKEN_FILE`. `Ok(None)` when neither is set; an
    /// error naming the missing one when only one is. The endpoint is `AWS_ENDPOINT_URL_STS`, else
    /// the regional one of `region`.
    pub fn from_env(env: &dyn Env, region: &str) -> Result<Option<WebIdentityConfig>, String> {
        let (role, file) = (env.get(ENV_AWS_ROLE_ARN), env.get(ENV_AWS_WEB_IDENTITY_TOKEN_FILE));
        let (role_arn, token_file) = match (role, file) {
            (None, None) => return Ok(None),
            (Some(r), Some(f)) => (r, f),
            (r, _) => {
                let missing = if r.is_none() { ENV_AWS_ROLE_ARN } else { ENV_AWS_WEB_IDENTITY_TOKEN_FILE };
                return Err(format!(
                    "web identity needs {ENV_AWS_ROLE_ARN} and {ENV_AWS_WEB_IDENTITY_TOKEN_FILE}, but {missing} is unset: annotate the pod's ServiceAccount with eks.amazonaws.com/role-arn (IRSA), or set both"
                ));
            }
        };
        let sts_endpoint = match env.get(ENV_AWS_ENDPOINT_URL_STS) {
            Some(e) => e.trim_end_matches('/').to_string(),
            None => format!("https://sts.{region}.amazonaws.com"),
        };
        if sts_endpoint.starts_with("http://") && !is_loopback_endpoint(&sts_endpoint) {
            return Err(format!(
                "{ENV_AWS_ENDPOINT_URL_STS} `{sts_endpoint}` is plain HTTP: the token and the keys STS returns \
                 would cross the network unencrypted; use https://"
            ));
        }
        let session_name = env.get(ENV_AWS_ROLE_SESSION_NAME).unwrap_or_else(|| DEFAULT_SESSION_NAME.to_string());
        Ok(Some(WebIdentityConfig { role_arn, token_file: token_file.into(), sts_endpoint, session_name }))
    }
}

/// Which STS a provider asks, with what.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// Alibaba Cloud STS `AssumeRoleWithOIDC`, for `oss://`.
    Rrsa(RrsaConfig),
    /// AWS STS `AssumeRoleWithWebIdentity`, for `s3://`.
    Aws(WebIdentityConfig),
}

impl Source {
    fn token_file(&self) -> &std::path::Path {
        match self {
            Source::Rrsa(c) => &c.token_file,
            Source::Aws(c) => &c.token_file,
        }
    }

    fn token_env(&self) -> &'static str {
        match self {
            Source::Rrsa(_) => ENV_OIDC_TOKEN_FILE,
            Source::Aws(_) => ENV_AWS_WEB_IDENTITY_TOKEN_FILE,
        }
    }

    fn sts_endpoint(&self) -> &str {
        match self {
            Source::Rrsa(c) => &c.sts_endpoint,
            Source::Aws(c) => &c.sts_endpoint,
        }
    }

    fn role_arn(&self) -> &str {
        match self {
            Source::Rrsa(c) => &c.role_arn,
            Source::Aws(c) => &c.role_arn,
        }
    }

    fn provider(&self) -> &'static str {
        match self {
            Source::Rrsa(_) => PROVIDER,
            Source::Aws(_) => "web identity (AWS STS AssumeRoleWithWebIdentity)",
        }
    }

    fn store(&self) -> &'static str {
        match self {
            Source::Rrsa(_) => "OSS",
            Source::Aws(_) => "S3",
        }
    }
}

/// A credential and when to fetch the next one.
struct Cached {
    credential: Arc<AwsCredential>,
    refresh_at: Instant,
}

/// An `object_store` credential provider that trades the pod's OIDC token for temporary keys at
/// Alibaba Cloud STS (`oss://`) or AWS STS (`s3://`); see the module documentation.
pub struct OidcCredentialProvider {
    config: Source,
    client: HttpClient,
    backoff: Duration,
    cache: Mutex<Option<Cached>>,
}

impl std::fmt::Debug for OidcCredentialProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcCredentialProvider").field("config", &self.config).finish_non_exhaustive()
    }
}

impl OidcCredentialProvider {
    /// A provider for `config`, calling STS with the timeouts of `options`. Nothing is fetched
    /// until the first request needs a credential.
    pub fn new(config: RrsaConfig, options: &StoreOptions) -> object_store::Result<Self> {
        Self::with_source(Source::Rrsa(config), options)
    }

    /// A provider of `s3://` credentials from AWS STS `AssumeRoleWithWebIdentity`.
    pub fn aws(config: WebIdentityConfig, options: &StoreOptions) -> object_store::Result<Self> {
        Self::with_source(Source::Aws(config), options)
    }

    fn with_source(config: Source, options: &StoreOptions) -> object_store::Result<Self> {
        let allow_http = is_loopback_endpoint(config.sts_endpoint());
        let client = ReqwestConnector::default().connect(&options.client_options(allow_http))?;
        Ok(OidcCredentialProvider { config, client, backoff: options.initial_backoff, cache: Mutex::new(None) })
    }

    /// Fetches a credential, trying connection failures and 5xx answers again.
    async fn fetch(&self) -> Result<Cached, FetchError> {
        let (file, var) = (self.config.token_file(), self.config.token_env());
        let token = tokio::fs::read_to_string(file).await.map_err(|e| {
            FetchError::Refused(format!(
                "cannot read the OIDC token file `{}` ({var}): {e}; check that the pod's ServiceAccount token is \
                 projected there",
                file.display()
            ))
        })?;
        let token = token.trim();
        if token.is_empty() {
            return Err(FetchError::Refused(format!("the OIDC token file `{}` ({var}) is empty", file.display())));
        }
        let mut delay = self.backoff;
        let mut attempt = 1;
        loop {
            match self.call_sts(token).await {
                Err(FetchError::Transient(_)) if attempt < FETCH_ATTEMPTS => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn call_sts(&self, token: &str) -> Result<Cached, FetchError> {
        let c = match &self.config {
            Source::Rrsa(c) => c,
            Source::Aws(c) => return self.call_aws_sts(c, token).await,
        };
        let timestamp = format_timestamp(SystemTime::now());
        let query = form(&[
            ("Action", "AssumeRoleWithOIDC"),
            ("Format", "JSON"),
            ("Version", "2015-04-01"),
            ("Timestamp", &timestamp),
        ]);
        let body = form(&[
            ("RoleArn", &c.role_arn),
            ("OIDCProviderArn", &c.oidc_provider_arn),
            ("OIDCToken", token),
            ("RoleSessionName", &c.session_name),
        ]);
        let (status, bytes) = self.post_form(format!("{}/?{query}", c.sts_endpoint), body).await?;
        if !status.is_success() {
            let detail = match serde_json::from_slice::<StsError>(&bytes) {
                Ok(e) => format!("{}: {}", e.code, redact(&e.message, token)),
                Err(_) => "no error code in the answer".to_string(),
            };
            let trusted = format!("OIDC provider `{}`", c.oidc_provider_arn);
            return Err(refusal(status, &c.role_arn, &c.token_file, &detail, &trusted));
        }
        let answer: StsAnswer = serde_json::from_slice(&bytes)
            .map_err(|e| FetchError::Refused(format!("STS answered HTTP {status} without usable Credentials: {e}")))?;
        let creds = answer.credentials;
        let key = AwsCredential {
            key_id: creds.access_key_id,
            secret_key: creds.access_key_secret,
            token: Some(creds.security_token),
        };
        cached(&c.role_arn, "OSS credentials through RRSA", key, &creds.expiration)
    }

    /// AWS STS `AssumeRoleWithWebIdentity`: an unsigned form POST (the token is the proof), an XML
    /// answer.
    async fn call_aws_sts(&self, c: &WebIdentityConfig, token: &str) -> Result<Cached, FetchError> {
        let body = form(&[
            ("Action", "AssumeRoleWithWebIdentity"),
            ("Version", "2011-06-15"),
            ("RoleArn", &c.role_arn),
            ("RoleSessionName", &c.session_name),
            ("WebIdentityToken", token),
        ]);
        let (status, bytes) = self.post_form(format!("{}/", c.sts_endpoint), body).await?;
        let text = String::from_utf8_lossy(&bytes);
        if !status.is_success() {
            let detail = match quick_xml::de::from_str::<AwsErrorResponse>(&text) {
                Ok(e) => format!("{}: {}", e.error.code, redact(&e.error.message, token)),
                Err(_) => "no error code in the answer".to_string(),
            };
            return Err(refusal(status, &c.role_arn, &c.token_file, &detail, "the cluster's OIDC provider"));
        }
        let answer: AwsAnswer = quick_xml::de::from_str(&text)
            .map_err(|e| FetchError::Refused(format!("STS answered HTTP {status} without usable Credentials: {e}")))?;
        let creds = answer.result.credentials;
        let key = AwsCredential {
            key_id: creds.access_key_id,
            secret_key: creds.secret_access_key,
            token: Some(creds.session_token),
        };
        cached(&c.role_arn, "S3 credentials through web identity", key, &creds.expiration)
    }

    /// POSTs a form to STS; the answer's status and body. Not answering is transient.
    async fn post_form(&self, url: String, body: String) -> Result<(http::StatusCode, Bytes), FetchError> {
        let endpoint = self.config.sts_endpoint();
        let request = http::Request::post(url)
            .header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Bytes::from(body).into())
            .map_err(|e| FetchError::Refused(format!("bad STS endpoint `{endpoint}`: {e}")))?;
        let response = self
            .client
            .execute(request)
            .await
            .map_err(|e| FetchError::Transient(format!("STS at {endpoint} did not answer: {e}")))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .bytes()
            .await
            .map_err(|e| FetchError::Transient(format!("reading the STS answer failed: {e}")))?;
        Ok((status, bytes))
    }
}

/// An STS refusal: what to check, and whether to try again (5xx and 429 are worth it).
fn refusal(
    status: http::StatusCode,
    role: &str,
    token_file: &std::path::Path,
    detail: &str,
    trusted: &str,
) -> FetchError {
    let msg = format!(
        "STS refused to let role `{role}` be assumed with the token of `{}` (HTTP {status}, {detail}); check the \
         role's trust policy names {trusted} and this ServiceAccount",
        token_file.display()
    );
    if status.is_server_error() || status.as_u16() == 429 {
        FetchError::Transient(msg)
    } else {
        FetchError::Refused(msg)
    }
}

/// The credential STS handed out for `role`, to be fetched again a margin before `expiration`.
fn cached(role: &str, what: &str, credential: AwsCredential, expiration: &str) -> Result<Cached, FetchError> {
    let expires = parse_timestamp(expiration).ok_or_else(|| {
        FetchError::Refused(format!("STS answered an Expiration `{expiration:.40}` that is not a UTC time"))
    })?;
    let lifetime = expires.duration_since(SystemTime::now()).unwrap_or_default();
    let margin = REFRESH_MARGIN.min(lifetime / 4);
    tracing::info!(role, expires_in_s = lifetime.as_secs(), "obtained temporary {what}");
    Ok(Cached { credential: Arc::new(credential), refresh_at: Instant::now() + (lifetime - margin) })
}

#[async_trait::async_trait]
impl CredentialProvider for OidcCredentialProvider {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.as_ref().filter(|c| Instant::now() < c.refresh_at) {
            return Ok(c.credential.clone());
        }
        match self.fetch().await {
            Ok(fresh) => {
                let credential = fresh.credential.clone();
                *cache = Some(fresh);
                Ok(credential)
            }
            Err(e) => {
                let permanent = matches!(e, FetchError::Refused(_));
                let (FetchError::Refused(reason) | FetchError::Transient(reason)) = e;
                let source = Box::new(Error::Credentials { provider: self.config.provider(), reason });
                Err(if permanent {
                    object_store::Error::Unauthenticated { path: self.config.role_arn().to_string(), source }
                } else {
                    object_store::Error::Generic { store: self.config.store(), source }
                })
            }
        }
    }
}

/// Why a fetch failed: worth trying again (network, 5xx), or not until someone fixes something.
enum FetchError {
    Transient(String),
    Refused(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsAnswer {
    credentials: StsCredentials,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsCredentials {
    access_key_id: String,
    access_key_secret: String,
    security_token: String,
    expiration: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsError {
    code: String,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AwsAnswer {
    #[serde(rename = "AssumeRoleWithWebIdentityResult")]
    result: AwsResult,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AwsResult {
    credentials: AwsCredentials,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AwsCredentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: String,
    expiration: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AwsErrorResponse {
    error: StsError,
}

/// An STS message cut to [`MAX_MESSAGE`] characters, with the token taken out should STS ever
/// quote it.
fn redact(message: &str, token: &str) -> String {
    let shown: String = message.chars().take(MAX_MESSAGE).collect();
    if token.len() >= 8 { shown.replace(token, "<token>") } else { shown }
}

fn form(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MapEnv;

    fn env(pairs: &[(&str, &str)]) -> MapEnv {
        MapEnv(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    const ROLE: &str = "acs:ram::123:role/ckpt";
    const PROVIDER_ARN: &str = "acs:ram::123:oidc-provider/ack-rrsa-c1";

    #[test]
    fn web_identity_needs_both_variables_and_an_encrypted_or_loopback_sts() {
        assert_eq!(WebIdentityConfig::from_env(&env(&[]), "us-east-1"), Ok(None));
        let e =
            WebIdentityConfig::from_env(&env(&[(ENV_AWS_ROLE_ARN, "arn:aws:iam::1:role/r")]), "us-east-1").unwrap_err();
        assert!(e.contains(ENV_AWS_WEB_IDENTITY_TOKEN_FILE) && e.contains("is unset"), "{e}");
        let both = [(ENV_AWS_ROLE_ARN, "arn:aws:iam::1:role/r"), (ENV_AWS_WEB_IDENTITY_TOKEN_FILE, "/var/run/t")];
        let c = WebIdentityConfig::from_env(&env(&both), "eu-west-1").unwrap().unwrap();
        assert_eq!(
            (c.sts_endpoint.as_str(), c.session_name.as_str()),
            ("https://sts.eu-west-1.amazonaws.com", "ckptd")
        );
        let remote = [both[0], both[1], (ENV_AWS_ENDPOINT_URL_STS, "http://sts.example.com")];
        assert!(WebIdentityConfig::from_env(&env(&remote), "eu-west-1").unwrap_err().contains("plain HTTP"));
    }

    #[test]
    fn config_needs_all_three_variables() {
        assert_eq!(RrsaConfig::from_env(&env(&[])), Ok(None));
        let err = RrsaConfig::from_env(&env(&[(ENV_ROLE_ARN, ROLE)])).unwrap_err();
        assert!(err.contains(ENV_OIDC_PROVIDER_ARN) && err.contains(ENV_OIDC_TOKEN_FILE), "{err}");
        assert!(!err.contains(&format!("{ENV_ROLE_ARN} and")), "only the missing ones are named: {err}");

        let full = [(ENV_ROLE_ARN, ROLE), (ENV_OIDC_PROVIDER_ARN, PROVIDER_ARN), (ENV_OIDC_TOKEN_FILE, "/var/run/t")];
        let c = RrsaConfig::from_env(&env(&full)).unwrap().unwrap();
        assert_eq!(c.sts_endpoint, DEFAULT_STS_ENDPOINT);
        assert_eq!(c.session_name, DEFAULT_SESSION_NAME);
        assert_eq!(c.token_file, std::path::Path::new("/var/run/t"));

        let with = |extra: &[(&'static str, &'static str)]| {
            let mut e = env(&full);
            e.0.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            RrsaConfig::from_env(&e)
        };
        let vpc = with(&[(ENV_STS_REGION, "cn-wulanchabu"), (ENV_VPC_ENDPOINT_ENABLED, "true")]).unwrap().unwrap();
        assert_eq!(vpc.sts_endpoint, "https://sts-vpc.cn-wulanchabu.aliyuncs.com");
        let host = with(&[(ENV_STS_ENDPOINT, "sts-vpc.cn-beijing.aliyuncs.com")]).unwrap().unwrap();
        assert_eq!(host.sts_endpoint, "https://sts-vpc.cn-beijing.aliyuncs.com");
        let local = with(&[(ENV_STS_ENDPOINT, "http://127.0.0.1:9/")]).unwrap().unwrap();
        assert_eq!(local.sts_endpoint, "http://127.0.0.1:9");
        let err = with(&[(ENV_STS_ENDPOINT, "http://sts.example.com")]).unwrap_err();
        assert!(err.contains("https://"), "{err}");
    }

    #[test]
    fn sts_messages_never_quote_the_token() {
        let token = "eyJhbGciOiJSUzI1NiJ9.secret-part";
        let shown = redact(&format!("token {token} is expired"), token);
        assert!(!shown.contains("secret-part"), "{shown}");
        assert!(redact(&"x".repeat(5000), token).len() <= MAX_MESSAGE);
    }
}
