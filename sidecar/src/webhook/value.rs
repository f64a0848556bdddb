//! The values an operator writes, in a `ckptd.io/*` annotation or in the `--config` file: store
//! URLs, isolator endpoints and object names, each checked by one function so that a cluster default
//! can never hold what a pod's annotation would be denied for. Errors are one sentence that quotes
//! the value (shortened by [`shown`]) and gives the accepted form.

/// Checks a store URL: a scheme the agent opens, a bucket or path, and no credentials, which would end
/// up in the pod spec for everyone with `get pods` to read.
pub fn parse_store(v: &str) -> Result<String, String> {
    let form = "a store URL: s3://bucket/prefix, oss://bucket/prefix, gs://bucket/prefix, az://container/prefix or file:///path";
    let vv = shown(v);
    if v.len() > 2048 {
        return Err(format!("`{vv}` is longer than 2048 characters: use {form}"));
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
        other => return Err(format!("scheme `{other}` is not supported: use {form}")),
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err("the URL carries credentials, which would be readable in the pod spec: remove them and use the store's standard credential environment or a web-identity token".into());
    }
    Ok(v.to_string())
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

/// A value as quoted back in a message: at most 64 characters, so that a hostile or pasted-by-mistake
/// annotation cannot blow up the denial the API server relays.
pub fn shown(v: &str) -> std::borrow::Cow<'_, str> {
    const MAX: usize = 64;
    match v.char_indices().nth(MAX) {
        None => v.into(),
        Some((cut, _)) => format!("{}… ({} bytes)", &v[..cut], v.len()).into(),
    }
}
