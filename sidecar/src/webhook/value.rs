//! The values an operator writes, in a `ckptd.io/*` annotation or in the `--config` file: store
//! URLs, isolator endpoints and object names, each checked by one function so that a cluster default
//! can never hold what a pod's annotation would be denied for. Errors are one sentence that quotes
//! the value (shortened by [`shown`]) and gives the accepted form.

/// Checks a store URL: a scheme the agent opens, a bucket or path, no control characters, and no
/// credentials in any form (user-info, or a query parameter such as `sig`, `token` or
/// `X-Amz-Signature`), which would end up in the pod spec for everyone with `get pods` to read.
/// Messages quote the URL only with credentials removed.
pub fn parse_store(v: &str) -> Result<String, String> {
    let form = "a store URL: s3://bucket/prefix, oss://bucket/prefix, gs://bucket/prefix, az://container/prefix or file:///path";
    let redacted = ckpt_core::store::redact_url(v);
    let vv = shown(&redacted);
    if v.len() > 2048 {
        return Err(format!("`{vv}` is longer than 2048 characters: use {form}"));
    }
    if v.chars().any(char::is_control) {
        return Err(format!("`{vv}` contains control characters: use {form}"));
    }
    if let Some(what) = credentials(v) {
        return Err(format!(
            "the URL carries credentials ({what}), which would be readable in the pod spec: remove them and give the agent its credentials through a Secret (AWS_*/OSS_* environment variables) or a workload identity (IRSA, RRSA, GKE or Azure workload identity)"
        ));
    }
    let u = url::Url::parse(v).map_err(|e| format!("`{vv}` is not {form} ({e})"))?;
    match u.scheme() {
        "s3" | "oss" | "gs" | "az" | "azure" | "abfs" => {
            if u.host_str().is_none_or(str::is_empty) {
                return Err(format!("`{vv}` has no bucket: use {form}"));
            }
        }
        "file" => {
            if u.path().len() <= 1 {
                return Err(format!("`{vv}` names no directory: use {form}"));
            }
        }
        other => return Err(format!("scheme `{}` is not supported: use {form}", shown(other))),
    }
    Ok(v.to_string())
}

/// Query parameter names that hold a secret or a signature in some store's URL form (S3 and OSS
/// presigned URLs, Azure SAS, GCS signed URLs, object_store options), matched as substrings of the
/// lowercased name.
const CREDENTIAL_PARAMS: [&str; 9] =
    ["secret", "token", "sig", "password", "passwd", "credential", "key", "auth", "session"];

/// What kind of credential `v` carries, judged on the raw text so that a URL that does not parse
/// is judged too: user-info before the host, or a query parameter named like a secret.
fn credentials(v: &str) -> Option<String> {
    let before_fragment = v.split('#').next().unwrap_or_default();
    let (base, query) = before_fragment.split_once('?').unwrap_or((before_fragment, ""));
    let authority = base.split_once("://").map_or("", |(_, rest)| rest.split('/').next().unwrap_or_default());
    if authority.contains('@') {
        return Some("user-info before the host".into());
    }
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = url::form_urlencoded::parse(format!("{key}=").as_bytes())
            .next()
            .map(|(k, _)| k.to_ascii_lowercase())
            .unwrap_or_default();
        if CREDENTIAL_PARAMS.iter().any(|p| key.contains(p)) {
            return Some(format!("the query parameter `{}`", shown(&key)));
        }
        if value.contains('@') || value.to_ascii_lowercase().contains("%40") {
            return Some(format!("user-info in the query parameter `{}`", shown(&key)));
        }
    }
    None
}

/// Checks an isolator endpoint: `https://host[:port]`, or `none` to opt out of a cluster default.
pub fn parse_isolator(v: &str) -> Result<Option<String>, String> {
    if v == "none" {
        return Ok(None);
    }
    let form = "https://host[:port] (e.g. https://ckptd-isolator.ckptd.svc:7443) or none";
    let vv = shown(v);
    let u = url::Url::parse(v).map_err(|_| format!("`{vv}` is not {form}"))?;
    if u.scheme() != "https" {
        return Err(format!(
            "`{vv}` is not {form}: the agent sends its token, so the isolator must be reached over TLS"
        ));
    }
    if u.host_str().is_none_or(str::is_empty)
        || !u.username().is_empty()
        || u.password().is_some()
        || u.path() != "/"
        || u.query().is_some()
        || u.fragment().is_some()
    {
        return Err(format!("`{vv}` is not {form}"));
    }
    Ok(Some(v.trim_end_matches('/').to_string()))
}

/// Whether `s` is a DNS-1123 subdomain (the form of Kubernetes object names).
pub fn is_dns_subdomain(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 253
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// A value as quoted back in a message: at most 64 characters and control characters escaped, so
/// that a hostile or pasted-by-mistake annotation cannot blow up or break the denial the API server
/// relays.
pub fn shown(v: &str) -> crate::text::Peer<'_> {
    crate::text::capped(v, 64)
}
