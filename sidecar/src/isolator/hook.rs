//! [`Hook`]: an HTTP endpoint that the isolator POSTs JSON to (`--fault-notify-url`). HTTPS, or
//! plain HTTP on a loopback address only, so that a record never crosses the network in clear.
//! One request per connection (HTTP/1.1), a timeout for the whole exchange, and an answer read up
//! to 64 KiB.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use crate::{Error, Result};

/// Most bytes of an answer read.
const MAX_ANSWER: usize = 64 * 1024;
/// Time for one whole exchange (connect, TLS, request, answer).
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// System CA bundles tried, in order, for HTTPS hooks without `--hook-ca`.
const SYSTEM_BUNDLES: [&str; 3] =
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

/// An endpoint to POST JSON to.
#[derive(Clone)]
pub struct Hook {
    url: String,
    host: String,
    port: u16,
    path: String,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hook").field("url", &self.url).field("tls", &self.tls.is_some()).finish()
    }
}

fn bad(flag: &str, reason: impl Into<String>) -> Error {
    Error::Config { what: flag.to_string(), reason: reason.into() }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn roots(flag: &str, ca: Option<&Path>) -> Result<rustls::RootCertStore> {
    let (path, pem) = match ca {
        Some(p) => (p.to_path_buf(), std::fs::read(p).map_err(|e| Error::unreadable("--hook-ca", p, &e))?),
        None => SYSTEM_BUNDLES
            .iter()
            .find_map(|p| std::fs::read(p).ok().map(|b| (Path::new(p).to_path_buf(), b)))
            .ok_or_else(|| bad(flag, "HTTPS needs CA certificates: no system bundle found, give --hook-ca"))?,
    };
    let mut store = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| bad("--hook-ca", format!("{}: {e}", path.display())))?;
        // A system bundle may hold a certificate rustls does not take; the others still count.
        let _ = store.add(c);
    }
    if store.is_empty() {
        return Err(bad("--hook-ca", format!("{} holds no usable CA certificate", path.display())));
    }
    Ok(store)
}

impl Hook {
    /// Checks `url` (given as `flag`): `https://…`, or `http://` on a loopback address. HTTPS trusts
    /// the CA certificates of `ca` (PEM), else the system bundle.
    pub fn new(flag: &str, url: &str, ca: Option<&Path>) -> Result<Hook> {
        let u = url::Url::parse(url).map_err(|e| bad(flag, format!("`{url}` is not a URL: {e}")))?;
        let host = u.host_str().filter(|h| !h.is_empty()).ok_or_else(|| bad(flag, format!("`{url}` has no host")))?;
        if !u.username().is_empty() || u.password().is_some() {
            return Err(bad(flag, "credentials in the URL are not accepted"));
        }
        let tls = match u.scheme() {
            "https" => {
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let cfg = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| bad(flag, e.to_string()))?
                    .with_root_certificates(roots(flag, ca)?)
                    .with_no_client_auth();
                let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                    .map_err(|e| bad(flag, format!("`{host}`: {e}")))?;
                Some((Arc::new(cfg), name))
            }
            "http" if is_loopback(host) => None,
            "http" => return Err(bad(flag, format!("`{url}`: plain http is accepted on loopback only; use https"))),
            s => return Err(bad(flag, format!("`{url}`: scheme `{s}` is not http or https"))),
        };
        let port = u.port_or_known_default().ok_or_else(|| bad(flag, format!("`{url}` has no port")))?;
        let path = match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_string(),
        };
        Ok(Hook { url: url.to_string(), host: host.to_string(), port, path, tls })
    }

    /// The URL as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// POSTs `body` (JSON) and returns the status and up to 64 KiB of the answer, within
    /// [`TIMEOUT`].
    pub async fn post_json(&self, body: &[u8]) -> Result<(u16, Vec<u8>)> {
        let body = Bytes::copy_from_slice(body);
        match tokio::time::timeout(TIMEOUT, self.exchange(body)).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout { what: format!("POST {}", self.url), waited_ms: TIMEOUT.as_millis() as u64 }),
        }
    }

    async fn exchange(&self, body: Bytes) -> Result<(u16, Vec<u8>)> {
        let fail =
            |reason: String| Error::Runtime { what: "POST to a hook", reason: format!("{}: {reason}", self.url) };
        let host = self.host.trim_matches(['[', ']']);
        let tcp = TcpStream::connect((host, self.port)).await.map_err(|e| fail(e.to_string()))?;
        let authority = if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let req = hyper::Request::post(self.path.as_str())
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, concat!("ckptd-isolator/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(body))
            .map_err(|e| fail(e.to_string()))?;
        let resp = match &self.tls {
            Some((cfg, name)) => {
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| fail(format!("TLS: {e}")))?;
                send(TokioIo::new(tls), req).await
            }
            None => send(TokioIo::new(tcp), req).await,
        }
        .map_err(fail)?;
        let status = resp.status().as_u16();
        let answer = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map(|b| b.to_bytes().to_vec())
            .map_err(|e| fail(format!("reading the answer: {e}")))?;
        Ok((status, answer))
    }
}

async fn send<T>(
    io: T,
    req: hyper::Request<Full<Bytes>>,
) -> std::result::Result<hyper::Response<hyper::body::Incoming>, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string());
    if resp.is_err() {
        conn.abort();
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_for_loopback_only() {
        for ok in ["http://127.0.0.1:8080/faults", "http://localhost/x", "http://[::1]:9/x?y=1"] {
            Hook::new("--fault-notify-url", ok, None).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, why) in [
            ("http://10.0.0.1/x", "loopback only"),
            ("ftp://127.0.0.1/x", "scheme"),
            ("not a url", "not a URL"),
            ("http://u:p@127.0.0.1/", "credentials"),
        ] {
            let e = Hook::new("--fault-notify-url", bad, None).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Config);
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
        let h = Hook::new("--fault-notify-url", "http://[::1]:9/x?y=1", None).unwrap();
        assert_eq!((h.port, h.path.as_str()), (9, "/x?y=1"));
    }

    #[test]
    fn https_needs_usable_ca_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("ca.pem");
        std::fs::write(&empty, "no certificate here").unwrap();
        let e = Hook::new("--fault-notify-url", "https://hooks.example/x", Some(&empty)).unwrap_err();
        assert!(e.to_string().contains("no usable CA"), "{e}");
    }

    #[tokio::test]
    async fn a_post_returns_the_status_and_the_answer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&got).contains("{\"a\":1}") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "the client closed early");
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await.unwrap();
            String::from_utf8_lossy(&got).to_string()
        });
        let h = Hook::new("--fault-notify-url", &format!("http://{addr}/hook"), None).unwrap();
        let (status, answer) = h.post_json(br#"{"a":1}"#).await.unwrap();
        assert_eq!((status, answer.as_slice()), (202, &b"ok"[..]));
        let req = server.await.unwrap();
        assert!(req.starts_with("POST /hook HTTP/1.1\r\n"), "{req}");
        assert!(req.to_lowercase().contains("content-type: application/json"), "{req}");
        let closed = Hook::new("--fault-notify-url", "http://127.0.0.1:1/x", None).unwrap();
        assert!(closed.post_json(b"{}").await.is_err());
    }
}
