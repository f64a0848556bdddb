//! Incomplete S3 multipart uploads: listing them and aborting them.
//!
//! A writer that crashes between `CreateMultipartUpload` and `CompleteMultipartUpload` leaves its
//! parts behind. They are billed like objects but invisible to a plain `LIST`, so retention must
//! find and abort them. `object_store` has no call that lists multipart uploads, so this module
//! sends the two S3 requests itself (`ListMultipartUploads` and `AbortMultipartUpload`). It signs
//! them with `object_store`'s public SigV4 signer, using the store's own credential provider (so
//! static keys, web identity / IRSA and instance credentials all work), and sends them through
//! `object_store`'s HTTP client.
//!
//! Only `s3://` and `oss://` stores have this kind of debris we can reach. GCS and Azure rely on the
//! bucket's lifecycle rules (a rule that deletes incomplete uploads after a day), and `file://` has
//! no multipart debris other than temporary files, which retention removes itself. For those
//! stores [`list_pending`] returns an empty list.
//!
//! Responses are untrusted input: their size is capped at [`MAX_RESPONSE_BYTES`], a listing stops
//! after [`MAX_PAGES`] pages, and the XML parser returns errors instead of panicking. Credentials
//! and signed headers never reach an error or a log line.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http::{Method, StatusCode};
use object_store::ClientOptions;
use object_store::aws::{AmazonS3, AwsAuthorizer};
use object_store::client::{HttpClient, HttpConnector, HttpErrorKind, HttpRequest, HttpRequestBody, ReqwestConnector};
use serde::Deserialize;

use super::{Backend, S3Target};
use crate::error::{Error, Result};

/// The largest response body read from S3. A full `ListMultipartUploads` page (1000 uploads) is
/// well under 1 MiB; anything much larger is not a real S3 response.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// The most pages one [`list_pending`] call reads (S3 returns up to 1000 uploads a page). A bucket
/// with more debris than that is cleaned over several retention passes.
pub const MAX_PAGES: usize = 1000;

/// The largest error body read, only to find S3's error code.
const MAX_ERROR_BYTES: usize = 64 << 10;
/// Attempts per request for failures that may pass (connection errors, 5xx, throttling).
const MAX_ATTEMPTS: u32 = 3;
/// The first delay between attempts; it doubles after each.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Per-request timeout (connect + transfer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of S3's error message goes into an error.
const MAX_MESSAGE_CHARS: usize = 200;

const OP_LIST: &str = "list multipart uploads";
const OP_ABORT: &str = "abort multipart upload";

/// One incomplete multipart upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpload {
    /// The full object key (including the store URL's prefix).
    pub key: String,
    /// The upload id S3 gave the writer; it names the upload in [`abort`].
    pub upload_id: String,
    /// When the upload was started, when the server said so in a form we read.
    pub initiated: Option<SystemTime>,
}

/// Lists incomplete multipart uploads under `prefix` (a full key prefix, e.g. `"root/job/"`).
///
/// Only uploads whose key starts with `prefix` are returned, even if a server ignores the `prefix`
/// parameter, so that retention never aborts an upload outside its own jobs. A listing stops after
/// [`MAX_PAGES`] pages; the rest are found by a later call once the first ones are aborted.
///
/// Stores other than `s3://` and `oss://` return an empty list (see the module documentation).
pub async fn list_pending(store: &crate::Store, prefix: &str) -> Result<Vec<PendingUpload>> {
    let Some(api) = Api::new(store, OP_LIST, prefix)? else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    let mut marker: Option<(String, String)> = None;
    for page in 0..MAX_PAGES {
        let url = api.list_url(prefix, marker.as_ref());
        let (status, body) = api.send(Method::GET, &url, OP_LIST, prefix).await?;
        if !status.is_success() {
            return Err(status_error(OP_LIST, prefix, status, &body));
        }
        let parsed = parse_list_page(&body)
            .map_err(|reason| malformed(OP_LIST, prefix, format!("malformed response: {reason}")))?;
        tracing::debug!(
            page,
            uploads = parsed.uploads.len(),
            truncated = parsed.is_truncated,
            "listed multipart uploads"
        );
        found.extend(parsed.uploads.into_iter().filter(|u| u.key.starts_with(prefix) && !u.upload_id.is_empty()));
        if !parsed.is_truncated {
            return Ok(found);
        }
        let next = (parsed.next_key_marker.unwrap_or_default(), parsed.next_upload_id_marker.unwrap_or_default());
        if next.0.is_empty() || marker.as_ref() == Some(&next) {
            return Err(malformed(
                OP_LIST,
                prefix,
                "the listing is truncated but its next marker is missing or does not advance".into(),
            ));
        }
        marker = Some(next);
    }
    tracing::warn!(
        pages = MAX_PAGES,
        uploads = found.len(),
        "stopped listing multipart uploads at the page limit; the rest are listed on a later pass"
    );
    Ok(found)
}

/// Aborts one upload, which frees its parts. Aborting an upload that no longer exists (S3 answers
/// 404 `NoSuchUpload`: it was completed, or aborted before) is not an error, so a janitor that
/// races another janitor or a retry does not fail.
///
/// For a store other than `s3://` or `oss://` there is nothing to abort and this returns `Ok`.
pub async fn abort(store: &crate::Store, upload: &PendingUpload) -> Result<()> {
    let key = upload.key.as_str();
    let Some(api) = Api::new(store, OP_ABORT, key)? else {
        return Ok(());
    };
    let url = api.object_url(key, &upload.upload_id);
    let (status, body) = api.send(Method::DELETE, &url, OP_ABORT, key).await?;
    if status.is_success() {
        tracing::debug!(key, upload_id = %upload.upload_id, "aborted multipart upload");
        return Ok(());
    }
    if status == StatusCode::NOT_FOUND && parse_error_body(&body).code == "NoSuchUpload" {
        tracing::debug!(key, upload_id = %upload.upload_id, "multipart upload was already gone");
        return Ok(());
    }
    Err(status_error(OP_ABORT, key, status, &body))
}

/// What the two requests need: where the bucket is, how to sign, how to send.
struct Api<'a> {
    target: &'a S3Target,
    s3: &'a AmazonS3,
    http: HttpClient,
    /// The bucket's URL: `<endpoint>/<bucket>` (path style) or `https://<bucket>.<host>/`.
    bucket_url: String,
}

impl<'a> Api<'a> {
    /// `None` for stores that are not S3-compatible.
    fn new(store: &'a crate::Store, op: &'static str, path: &str) -> Result<Option<Api<'a>>> {
        let (Backend::S3(target), Some(s3)) = (store.backend(), store.s3_client()) else {
            return Ok(None);
        };
        let bucket_url = bucket_url(target).map_err(|reason| malformed(op, path, reason))?;
        // The store itself only talks plain HTTP to an `http://` endpoint the operator wrote; we
        // follow the same endpoint, so the same rule holds.
        let options = ClientOptions::new()
            .with_allow_http(target.allow_http)
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(CONNECT_TIMEOUT);
        let http = ReqwestConnector::default().connect(&options).map_err(|e| Error::store(op, path, e))?;
        Ok(Some(Api { target, s3: s3.as_ref(), http, bucket_url }))
    }

    fn list_url(&self, prefix: &str, marker: Option<&(String, String)>) -> String {
        let mut url = format!("{}?uploads=&prefix={}", self.bucket_url, encode(prefix, false));
        if let Some((key, upload_id)) = marker {
            url.push_str("&key-marker=");
            url.push_str(&encode(key, false));
            if !upload_id.is_empty() {
                url.push_str("&upload-id-marker=");
                url.push_str(&encode(upload_id, false));
            }
        }
        url
    }

    fn object_url(&self, key: &str, upload_id: &str) -> String {
        format!("{}/{}?uploadId={}", self.bucket_url.trim_end_matches('/'), encode(key, true), encode(upload_id, false))
    }

    /// Sends one signed request with an empty body and reads the response body (up to
    /// [`MAX_RESPONSE_BYTES`] for success, less for errors). Both requests are idempotent, so
    /// connection failures, 5xx and throttling are retried a few times.
    async fn send(&self, method: Method, url: &str, op: &'static str, path: &str) -> Result<(StatusCode, Bytes)> {
        let uri: http::Uri = url::Url::parse(url)
            .ok()
            .and_then(|u| u.as_str().parse().ok())
            .ok_or_else(|| malformed(op, path, "cannot build a request URL from the endpoint and key".into()))?;
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            let credential = self.s3.credentials().get_credential().await.map_err(|e| Error::store(op, path, e))?;
            let mut request: HttpRequest = http::Request::builder()
                .method(method.clone())
                .uri(uri.clone())
                .body(HttpRequestBody::empty())
                .map_err(|e| malformed(op, path, format!("cannot build the request: {e}")))?;
            AwsAuthorizer::new(&credential, "s3", &self.target.region)
                .try_authorize(&mut request, None)
                .map_err(|e| Error::store(op, path, e))?;
            let retryable = match self.http.execute(request).await {
                Ok(response) => {
                    let status = response.status();
                    let again = status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
                    if !again || attempt >= MAX_ATTEMPTS {
                        let cap = if status.is_success() { MAX_RESPONSE_BYTES } else { MAX_ERROR_BYTES };
                        let body = read_capped(response, cap, status.is_success())
                            .await
                            .map_err(|reason| malformed(op, path, reason))?;
                        return Ok((status, body));
                    }
                    format!("HTTP {}", status.as_u16())
                }
                Err(e) => {
                    let again = matches!(
                        e.kind(),
                        HttpErrorKind::Connect
                            | HttpErrorKind::Request
                            | HttpErrorKind::Timeout
                            | HttpErrorKind::Interrupted
                    );
                    if !again || attempt >= MAX_ATTEMPTS {
                        return Err(Error::store(op, path, generic(format!("{e}"))));
                    }
                    format!("{e}")
                }
            };
            tracing::debug!(op, attempt, error = %retryable, "S3 request failed, retrying");
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2);
            attempt += 1;
        }
    }
}

/// Reads a response body, refusing one larger than `cap` (success) or cutting it at `cap` (an
/// error body, of which only the start matters).
async fn read_capped(
    response: object_store::client::HttpResponse,
    cap: usize,
    strict: bool,
) -> std::result::Result<Bytes, String> {
    let too_large = || format!("response body is larger than {cap} bytes");
    let declared = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if strict && declared.is_some_and(|n| n > cap as u64) {
        return Err(too_large());
    }
    let mut stream = response.into_body().bytes_stream();
    let mut body = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("reading the response failed: {e}"))?;
        let room = cap - body.len();
        if chunk.len() > room {
            if strict {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk[..room]);
            break;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The URL of the bucket: `<endpoint>/<bucket>` for path-style requests, or
/// `<scheme>://<bucket>.<host>/` for virtual-hosted ones. An endpoint whose host already starts
/// with `<bucket>.` (the form `object_store` expects for virtual-hosted requests) is used as is.
fn bucket_url(target: &S3Target) -> std::result::Result<String, String> {
    let endpoint = match &target.endpoint {
        Some(e) => e.clone(),
        None => format!("https://s3.{}.amazonaws.com", target.region),
    };
    let mut url = url::Url::parse(&endpoint).map_err(|e| format!("bad endpoint: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.query().is_some() || url.fragment().is_some() {
        return Err("bad endpoint: it must be an http:// or https:// URL without query".into());
    }
    if target.virtual_hosted {
        let host = url.host_str().ok_or("bad endpoint: no host")?.to_string();
        if !host.starts_with(&format!("{}.", target.bucket)) {
            url.set_host(Some(&format!("{}.{host}", target.bucket)))
                .map_err(|e| format!("bad endpoint for virtual-hosted requests: {e}"))?;
        }
        let base = url.as_str().trim_end_matches('/');
        Ok(format!("{base}/"))
    } else {
        let base = url.as_str().trim_end_matches('/');
        Ok(format!("{base}/{}", encode(&target.bucket, false)))
    }
}

/// Percent-encodes everything except RFC 3986 unreserved characters (and `/` in paths), the form
/// SigV4 signs for S3.
fn encode(s: &str, keep_slash: bool) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
    out
}

/// One page of a `ListMultipartUploads` answer.
#[derive(Debug, Default, PartialEq, Eq)]
struct ListPage {
    uploads: Vec<PendingUpload>,
    is_truncated: bool,
    next_key_marker: Option<String>,
    next_upload_id_marker: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListResultXml {
    #[serde(default)]
    is_truncated: bool,
    #[serde(default)]
    next_key_marker: Option<String>,
    #[serde(default)]
    next_upload_id_marker: Option<String>,
    #[serde(default, rename = "Upload")]
    uploads: Vec<UploadXml>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UploadXml {
    key: String,
    upload_id: String,
    #[serde(default)]
    initiated: Option<String>,
}

/// Parses a `ListMultipartUploadsResult` document. Unknown elements are ignored.
fn parse_list_page(body: &[u8]) -> std::result::Result<ListPage, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("not UTF-8: {e}"))?;
    let xml: ListResultXml = quick_xml::de::from_str(text).map_err(|e| e.to_string())?;
    Ok(ListPage {
        uploads: xml
            .uploads
            .into_iter()
            .map(|u| PendingUpload {
                initiated: u.initiated.as_deref().and_then(parse_timestamp),
                key: u.key,
                upload_id: u.upload_id,
            })
            .collect(),
        is_truncated: xml.is_truncated,
        next_key_marker: xml.next_key_marker,
        next_upload_id_marker: xml.next_upload_id_marker,
    })
}

/// The useful part of an S3 `<Error>` document.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
struct S3ErrorXml {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// Parses an S3 error body; anything unreadable gives empty fields.
fn parse_error_body(body: &[u8]) -> S3ErrorXml {
    std::str::from_utf8(body).ok().and_then(|text| quick_xml::de::from_str::<S3ErrorXml>(text).ok()).unwrap_or_default()
}

/// S3 answered with a status other than success.
#[derive(Debug)]
struct S3StatusError {
    status: u16,
    code: String,
    message: String,
}

impl std::fmt::Display for S3StatusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3 answered HTTP {}", self.status)?;
        if !self.code.is_empty() {
            write!(f, " {}", self.code)?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for S3StatusError {}

/// Maps a non-success answer to the `object_store` error that says the same, so that
/// [`Error::kind`] classifies it (404 not found, 401/403 storage, others transient).
fn status_error(op: &'static str, path: &str, status: StatusCode, body: &[u8]) -> Error {
    let parsed = parse_error_body(body);
    let clean = |s: &str, max: usize| -> String { s.chars().filter(|c| !c.is_control()).take(max).collect() };
    let source = Box::new(S3StatusError {
        status: status.as_u16(),
        code: clean(&parsed.code, 64),
        message: clean(&parsed.message, MAX_MESSAGE_CHARS),
    });
    let path_owned = path.to_string();
    let e = match status {
        StatusCode::NOT_FOUND => object_store::Error::NotFound { path: path_owned, source },
        StatusCode::FORBIDDEN => object_store::Error::PermissionDenied { path: path_owned, source },
        StatusCode::UNAUTHORIZED => object_store::Error::Unauthenticated { path: path_owned, source },
        _ => object_store::Error::Generic { store: "S3", source },
    };
    Error::store(op, path, e)
}

fn generic(message: String) -> object_store::Error {
    object_store::Error::Generic { store: "S3", source: message.into() }
}

fn malformed(op: &'static str, path: &str, reason: String) -> Error {
    Error::store(op, path, generic(reason))
}

/// Parses an ISO 8601 / RFC 3339 UTC timestamp as S3 writes it (`2010-11-10T20:48:33.000Z`), also
/// accepting a `±HH:MM` offset. `None` for anything else.
pub(crate) fn parse_timestamp(s: &str) -> Option<SystemTime> {
    let b = s.trim().as_bytes();
    let num = |from: usize, to: usize| -> Option<i64> {
        let digits = b.get(from..to)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(digits.iter().fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0')))
    };
    let sep = |at: usize, allowed: &[u8]| b.get(at).is_some_and(|c| allowed.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = b.get(19..)?;
    let mut nanos: u32 = 0;
    if let Some((b'.', frac)) = rest.split_first() {
        let len = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if len == 0 {
            return None;
        }
        let mut scale = 100_000_000u32;
        for d in &frac[..len.min(9)] {
            nanos += u32::from(d - b'0') * scale;
            scale /= 10;
        }
        rest = &frac[len..];
    }
    let offset = match rest {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digit = |c: &u8| c.is_ascii_digit().then(|| i64::from(c - b'0'));
            let hours = digit(h1)? * 10 + digit(h2)?;
            let minutes = digit(m1)? * 10 + digit(m2)?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            let secs = hours * 3600 + minutes * 60;
            if *sign == b'-' { -secs } else { secs }
        }
        _ => return None,
    };
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset;
    if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(secs.unsigned_abs(), nanos))
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))?
            .checked_add(Duration::from_nanos(u64::from(nanos)))
    }
}

/// `t` as `YYYY-MM-DDTHH:MM:SSZ` (whole seconds, UTC), the form cloud APIs take; the inverse of
/// [`parse_timestamp`] for times after 1970.
pub(crate) fn format_timestamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's `civil_from_days`, the inverse of `days_from_civil`.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Shaped like AWS's documented answer, with pagination fields and an `Initiator`/`Owner` that
    /// must be skipped.
    const PAGE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>ckptd-test</Bucket>
  <KeyMarker></KeyMarker>
  <UploadIdMarker></UploadIdMarker>
  <NextKeyMarker>root/job/step-8/rank-1.ckpt</NextKeyMarker>
  <NextUploadIdMarker>VXBsb2FkIElEIGZvciBlbHZpbmcncyBteS1tb3ZpZS5tMnRzIHVwbG9hZA</NextUploadIdMarker>
  <Delimiter></Delimiter>
  <Prefix>root/job/</Prefix>
  <MaxUploads>2</MaxUploads>
  <IsTruncated>true</IsTruncated>
  <Upload>
    <Key>root/job/step-8/rank-0.ckpt</Key>
    <UploadId>VXBsb2FkIElEIGZvciA2aWWpbmcncyBteS1tb3ZpZS5tMnRzIHVwbG9hZA</UploadId>
    <Initiator>
      <ID>arn:aws:iam::111122223333:user/some-user-11116a31-17b5-4fb7-9df5-b288870f11xx</ID>
      <DisplayName>umat-user-11116a31-17b5-4fb7-9df5-b288870f11xx</DisplayName>
    </Initiator>
    <Owner>
      <ID>75aa57f09aa0c8caeab4f8c24e99d10f8e7faeebf76c078efc7c6caea54ba06a</ID>
      <DisplayName>someone</DisplayName>
    </Owner>
    <StorageClass>STANDARD</StorageClass>
    <Initiated>2010-11-10T20:48:33.000Z</Initiated>
  </Upload>
  <Upload>
    <Key>root/job/step-8/rank-1 &amp; co.ckpt</Key>
    <UploadId>VXBsb2FkIElEIGZvciBlbHZpbmcncyBteS1tb3ZpZS5tMnRzIHVwbG9hZA</UploadId>
    <StorageClass>STANDARD</StorageClass>
    <Initiated>2010-11-10T20:49:33Z</Initiated>
  </Upload>
</ListMultipartUploadsResult>"#;

    #[test]
    fn parses_a_truncated_page() {
        let page = parse_list_page(PAGE.as_bytes()).unwrap();
        assert!(page.is_truncated);
        assert_eq!(page.next_key_marker.as_deref(), Some("root/job/step-8/rank-1.ckpt"));
        assert_eq!(
            page.next_upload_id_marker.as_deref(),
            Some("VXBsb2FkIElEIGZvciBlbHZpbmcncyBteS1tb3ZpZS5tMnRzIHVwbG9hZA")
        );
        assert_eq!(
            page.uploads,
            vec![
                PendingUpload {
                    key: "root/job/step-8/rank-0.ckpt".into(),
                    upload_id: "VXBsb2FkIElEIGZvciA2aWWpbmcncyBteS1tb3ZpZS5tMnRzIHVwbG9hZA".into(),
                    initiated: Some(UNIX_EPOCH + Duration::from_secs(1_289_422_113)),
                },
                PendingUpload {
                    key: "root/job/step-8/rank-1 & co.ckpt".into(),
                    upload_id: "VXBsb2FkIElEIGZvciBlbHZpbmcncyBteS1tb3ZpZS5tMnRzIHVwbG9hZA".into(),
                    initiated: Some(UNIX_EPOCH + Duration::from_secs(1_289_422_173)),
                },
            ]
        );
    }

    #[test]
    fn parses_an_empty_last_page() {
        let body = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>b</Bucket><KeyMarker/><UploadIdMarker/><NextKeyMarker/><NextUploadIdMarker/>
  <Prefix>root/</Prefix><MaxUploads>1000</MaxUploads><IsTruncated>false</IsTruncated>
</ListMultipartUploadsResult>"#;
        let page = parse_list_page(body.as_bytes()).unwrap();
        assert!(!page.is_truncated);
        assert!(page.uploads.is_empty());
    }

    #[test]
    fn rejects_malformed_pages() {
        for bad in [
            "",
            "not xml",
            "<ListMultipartUploadsResult><Upload><Key>a</Key></Upload></ListMultipartUploadsResult>",
            "<ListMultipartUploadsResult><IsTruncated>maybe</IsTruncated></ListMultipartUploadsResult>",
            "<ListMultipartUploadsResult><Upload><Key>a</Key><UploadId>x</UploadId>",
            "<a><b></a></b>",
        ] {
            assert!(parse_list_page(bad.as_bytes()).is_err(), "{bad:?} parsed");
        }
        assert!(parse_list_page(&[0xff, 0xfe, b'<']).is_err());
    }

    #[test]
    fn reads_s3_error_codes() {
        let body = br#"<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>NoSuchUpload</Code><Message>The specified upload does not exist.</Message>
<UploadId>abc</UploadId><RequestId>4442587FB7D0A2F9</RequestId></Error>"#;
        let e = parse_error_body(body);
        assert_eq!(e.code, "NoSuchUpload");
        assert_eq!(e.message, "The specified upload does not exist.");
        assert_eq!(parse_error_body(b"<html>bad gateway"), S3ErrorXml::default());
    }

    #[test]
    fn status_errors_are_classified() {
        use crate::ErrorKind;
        let e = status_error(OP_ABORT, "k", StatusCode::NOT_FOUND, b"<Error><Code>NoSuchBucket</Code></Error>");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("NoSuchBucket"), "{e}");
        let e = status_error(OP_LIST, "p/", StatusCode::FORBIDDEN, b"");
        assert_eq!(e.kind(), ErrorKind::Storage);
        let e = status_error(OP_LIST, "p/", StatusCode::SERVICE_UNAVAILABLE, b"<Error><Code>SlowDown</Code></Error>");
        assert_eq!(e.kind(), ErrorKind::Transient);
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp("1970-01-01T00:00:00Z"), Some(UNIX_EPOCH));
        assert_eq!(
            parse_timestamp("2024-02-29T12:00:00.5+02:00"),
            Some(UNIX_EPOCH + Duration::new(1_709_200_800, 500_000_000))
        );
        assert_eq!(
            parse_timestamp("1969-12-31T23:59:59.250Z"),
            Some(UNIX_EPOCH - Duration::from_secs(1) + Duration::from_millis(250))
        );
        for bad in [
            "",
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00.Z",
            "2024-01-01",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn urls() {
        let mut t = S3Target {
            bucket: "bkt".into(),
            region: "eu-west-1".into(),
            endpoint: None,
            virtual_hosted: false,
            allow_http: false,
        };
        assert_eq!(bucket_url(&t).unwrap(), "https://s3.eu-west-1.amazonaws.com/bkt");
        t.virtual_hosted = true;
        assert_eq!(bucket_url(&t).unwrap(), "https://bkt.s3.eu-west-1.amazonaws.com/");
        t.endpoint = Some("https://oss-cn-beijing.aliyuncs.com".into());
        assert_eq!(bucket_url(&t).unwrap(), "https://bkt.oss-cn-beijing.aliyuncs.com/");
        t.endpoint = Some("https://bkt.oss-cn-beijing.aliyuncs.com/".into());
        assert_eq!(bucket_url(&t).unwrap(), "https://bkt.oss-cn-beijing.aliyuncs.com/");
        t.virtual_hosted = false;
        t.endpoint = Some("http://127.0.0.1:5998/".into());
        assert_eq!(bucket_url(&t).unwrap(), "http://127.0.0.1:5998/bkt");
        t.endpoint = Some("ftp://x".into());
        assert!(bucket_url(&t).is_err());
        assert_eq!(encode("a b/c+d~é", true), "a%20b/c%2Bd~%C3%A9");
        assert_eq!(encode("a/b", false), "a%2Fb");
    }

    #[tokio::test]
    async fn other_stores_have_no_pending_uploads() {
        let store = crate::Store::open("memory:///root", &crate::StoreOptions::default()).unwrap();
        assert!(list_pending(&store, "root/").await.unwrap().is_empty());
        let upload = PendingUpload { key: "root/x".into(), upload_id: "u".into(), initiated: None };
        abort(&store, &upload).await.unwrap();
    }

    fn render(uploads: &[(String, String)], truncated: bool) -> String {
        let esc = |s: &str| quick_xml::escape::escape(s).into_owned();
        let mut xml = String::from("<ListMultipartUploadsResult><Bucket>b</Bucket>");
        xml.push_str(&format!("<IsTruncated>{truncated}</IsTruncated>"));
        for (key, id) in uploads {
            xml.push_str(&format!(
                "<Upload><Key>{}</Key><UploadId>{}</UploadId><Initiated>2024-01-01T00:00:00.000Z</Initiated></Upload>",
                esc(key),
                esc(id)
            ));
        }
        xml.push_str("</ListMultipartUploadsResult>");
        xml
    }

    proptest! {
        #[test]
        fn page_round_trip(
            uploads in prop::collection::vec(("[a-zA-Z0-9 /_.&<>'\"=-]{1,40}", "[a-zA-Z0-9_.-]{1,60}"), 0..20),
            truncated in any::<bool>(),
        ) {
            let page = parse_list_page(render(&uploads, truncated).as_bytes()).unwrap();
            prop_assert_eq!(page.is_truncated, truncated);
            let got: Vec<(String, String)> = page.uploads.iter().map(|u| (u.key.clone(), u.upload_id.clone())).collect();
            prop_assert_eq!(got, uploads);
        }

        #[test]
        fn parsers_never_panic(body in prop::collection::vec(any::<u8>(), 0..512), text in ".{0,64}") {
            let _ = parse_list_page(&body);
            let _ = parse_error_body(&body);
            let _ = parse_timestamp(&text);
        }

        #[test]
        fn mutated_pages_never_panic(cut in 0usize..PAGE.len(), byte in any::<u8>()) {
            let mut body = PAGE.as_bytes().to_vec();
            body[cut] = byte;
            let _ = parse_list_page(&body);
            let _ = parse_list_page(&PAGE.as_bytes()[..cut]);
        }

        #[test]
        fn timestamps_follow_the_calendar(days in 0i64..=2_932_896, secs in 0i64..86_400) {
            // 2_932_896 days after 1970-01-01 is 9999-12-31.
            let (y, m, d) = civil_from_days(days);
            let text = format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60);
            let expected = UNIX_EPOCH + Duration::from_secs((days * 86_400 + secs) as u64);
            prop_assert_eq!(parse_timestamp(&text), Some(expected));
            prop_assert_eq!(format_timestamp(expected), text);
        }
    }

    /// The inverse of `days_from_civil`, written independently (by counting years and months) so
    /// the property test does not check the parser against itself.
    fn civil_from_days(mut days: i64) -> (i64, i64, i64) {
        let mut year = 1970;
        loop {
            let len = if is_leap(year) { 366 } else { 365 };
            if days < len {
                break;
            }
            days -= len;
            year += 1;
        }
        let mut month = 1;
        while days >= days_in_month(year, month) {
            days -= days_in_month(year, month);
            month += 1;
        }
        (year, month, days + 1)
    }
}
