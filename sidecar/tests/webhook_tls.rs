//! The webhook over real HTTPS: a CA made with rcgen, a rustls client, certificate rotation on disk,
//! hostile bodies, and the `ckptd webhook` binary itself (gen-cert, serve, exit codes).
#![cfg(feature = "server")]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ckptd::webhook::Config;
use ckptd::webhook::server::serve;
use ckptd::webhook::tls::CertStore;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

/// A test CA that signs serving certificates for 127.0.0.1 with a chosen common name.
struct Ca {
    cert: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new() -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "ckptd test CA");
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, issuer: rcgen::Issuer::new(params, key) }
    }

    /// (certificate PEM, key PEM, certificate DER) for `cn`.
    fn leaf(&self, cn: &str) -> (String, String, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    fn connector(&self) -> TlsConnector {
        connector(self.cert.der().clone())
    }
}

fn connector(ca: CertificateDer<'static>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(cfg))
}

/// Replaces a file the way a Secret volume update does: write elsewhere, then rename over it.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Response {
    status: u16,
    body: Vec<u8>,
    peer_cert: Vec<u8>,
}

/// One HTTP/1.1 request over a fresh TLS connection (`Connection: close`).
async fn request(
    addr: SocketAddr,
    tls: &TlsConnector,
    sni: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<Response> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let mut s = tls.connect(name, tcp).await?;
    let peer_cert = s.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    s.flush().await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let status_line = String::from_utf8_lossy(&out[..split]).lines().next().unwrap_or_default().to_string();
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status code");
    Ok(Response { status, body: out[split + 4..].to_vec(), peer_cert })
}

/// The JSON patch of a response review: base64, as the API server's Go `[]byte` expects.
fn patch_of(review: &serde_json::Value) -> json_patch::Patch {
    use base64::Engine;
    let b64 = review["response"]["patch"].as_str().expect("patch is a base64 string");
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).expect("valid base64");
    serde_json::from_slice(&bytes).expect("a JSON patch")
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/webhook").join(name)).unwrap()
}

struct Running {
    addr: SocketAddr,
    certs: Arc<CertStore>,
    stop: tokio::sync::watch::Sender<bool>,
    served: tokio::task::JoinHandle<ckptd::Result<()>>,
}

async fn start(dir: &Path, max_body: Option<usize>) -> Running {
    let certs = CertStore::load(&dir.join("tls.crt"), &dir.join("tls.key")).unwrap();
    let mut cfg = Config::new("registry.example.com/ckptd:0.1.0");
    if let Some(m) = max_body {
        cfg.file.max_body_bytes = m;
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    tokio::spawn(Arc::clone(&certs).watch(Duration::from_millis(20), stopped(rx.clone())));
    let served = tokio::spawn(serve(listener, Arc::new(cfg), Arc::clone(&certs), stopped(rx)));
    Running { addr, certs, stop, served }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_mutate_health_and_hostile_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (cert, key, _) = ca.leaf("webhook");
    std::fs::write(dir.path().join("tls.crt"), cert).unwrap();
    std::fs::write(dir.path().join("tls.key"), key).unwrap();
    let srv = start(dir.path(), Some(1 << 20)).await;
    let tls = ca.connector();

    // A peer that connects and never starts the handshake must not hold up anyone else: the request
    // below is served while that connection is still pending (the server has not timed it out).
    let silent = TcpStream::connect(srv.addr).await.unwrap();
    for path in ["/healthz", "/readyz"] {
        let r = request(srv.addr, &tls, "localhost", "GET", path, b"").await.unwrap();
        assert_eq!(r.status, 200, "{path}");
    }
    let mut buf = [0u8; 1];
    assert!(
        matches!(silent.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the silent connection was already closed, so requests waited for its handshake timeout"
    );
    drop(silent);
    assert_eq!(request(srv.addr, &tls, "localhost", "GET", "/nope", b"").await.unwrap().status, 404);
    assert_eq!(request(srv.addr, &tls, "localhost", "GET", "/mutate", b"").await.unwrap().status, 405);

    let r = request(srv.addr, &tls, "127.0.0.1", "POST", "/mutate", &fixture("plain-pod.json")).await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let raw: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        (raw["apiVersion"].as_str(), raw["kind"].as_str()),
        (Some("admission.k8s.io/v1"), Some("AdmissionReview"))
    );
    assert_eq!(raw["response"]["allowed"], true);
    assert_eq!(raw["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(raw["response"]["patchType"], "JSONPatch");
    let patch = patch_of(&raw);
    assert!(!patch.0.is_empty());
    let mut obj: serde_json::Value = serde_json::from_slice(&fixture("plain-pod.json")).unwrap();
    json_patch::patch(&mut obj["request"]["object"], &patch).unwrap();
    assert_eq!(obj["request"]["object"]["spec"]["initContainers"][0]["name"], "ckptd-agent");

    let r =
        request(srv.addr, &tls, "localhost", "POST", "/mutate", &fixture("invalid-annotations.json")).await.unwrap();
    assert_eq!(r.status, 200);
    let raw: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(raw["response"]["allowed"], false);
    assert!(raw["response"]["status"]["message"].as_str().unwrap().contains("ckptd.io/slots"));

    let good = fixture("plain-pod.json");
    let oversized = vec![b' '; (1 << 20) + 1];
    for (name, body, status, msg) in [
        ("truncated", good[..good.len() - 10].to_vec(), 400, "not an AdmissionReview"),
        ("garbage", b"\xde\xad\xbe\xef".to_vec(), 400, "not an AdmissionReview"),
        ("oversized", oversized, 413, "larger than 1048576 bytes"),
    ] {
        let r = request(srv.addr, &tls, "localhost", "POST", "/mutate", &body).await.unwrap();
        assert_eq!(r.status, status, "{name}");
        assert!(String::from_utf8_lossy(&r.body).contains(msg), "{name}: {}", String::from_utf8_lossy(&r.body));
    }
    // The server is still healthy after all of that.
    assert_eq!(request(srv.addr, &tls, "localhost", "GET", "/healthz", b"").await.unwrap().status, 200);

    // A client that does not trust the CA is refused at the handshake.
    let other = Ca::new().connector();
    assert!(request(srv.addr, &other, "localhost", "GET", "/healthz", b"").await.is_err());

    srv.stop.send(true).unwrap();
    srv.served.await.unwrap().unwrap();
    assert!(TcpStream::connect(srv.addr).await.is_err(), "listener closed after shutdown");
}

/// The API server speaks HTTP/2 to webhooks when ALPN offers it; the same review must work there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_get_the_same_answers() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (cert, key, _) = ca.leaf("webhook");
    std::fs::write(dir.path().join("tls.crt"), cert).unwrap();
    std::fs::write(dir.path().join("tls.key"), key).unwrap();
    let srv = start(dir.path(), None).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(srv.addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(cfg)).connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "the server negotiates HTTP/2");
    let (client, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.unwrap();
    let req = http::Request::post("https://localhost/mutate").body(()).unwrap();
    let (resp, mut send) = client.send_request(req, false).unwrap();
    send.send_data(bytes::Bytes::from(fixture("plain-pod.json")), true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
        bytes.extend_from_slice(&chunk);
    }
    let raw: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(raw["response"]["allowed"], true);
    assert_eq!(raw["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert!(!patch_of(&raw).0.is_empty());

    srv.stop.send(true).unwrap();
    srv.served.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificate_files_are_served_to_new_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let ca = Ca::new();
    let (cert_a, key_a, der_a) = ca.leaf("before-rotation");
    std::fs::write(&cert_path, &cert_a).unwrap();
    std::fs::write(&key_path, &key_a).unwrap();
    let srv = start(dir.path(), None).await;
    let tls = ca.connector();
    let r = request(srv.addr, &tls, "localhost", "GET", "/healthz", b"").await.unwrap();
    assert_eq!(r.peer_cert, der_a);

    // A half-finished rotation (new certificate, old key) is refused and the old pair keeps serving.
    let (cert_b, key_b, der_b) = ca.leaf("after-rotation");
    replace(&cert_path, &cert_b);
    let err = srv.certs.reload().expect_err("mismatched pair");
    assert!(err.to_string().contains("does not match"), "{err}");
    let r = request(srv.addr, &tls, "localhost", "GET", "/healthz", b"").await.unwrap();
    assert_eq!((r.status, r.peer_cert == der_a), (200, true), "old pair still served mid-rotation");

    // Finish the rotation; the poller picks it up and new handshakes see the new certificate.
    replace(&key_path, &key_b);
    let mut seen_b = false;
    for _ in 0..1500 {
        let r = request(srv.addr, &tls, "localhost", "GET", "/healthz", b"").await.unwrap();
        assert_eq!(r.status, 200);
        assert!(r.peer_cert == der_a || r.peer_cert == der_b, "an unknown certificate was served");
        if r.peer_cert == der_b {
            seen_b = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen_b, "the rotated certificate was never served");
    let r = request(srv.addr, &tls, "localhost", "GET", "/healthz", b"").await.unwrap();
    assert_eq!(r.peer_cert, der_b, "once rotated, the new certificate stays");
    assert!(!srv.certs.reload().unwrap(), "unchanged files are not reloaded again");

    // Garbage in the files is refused; the current pair keeps serving.
    replace(&cert_path, "not a pem");
    assert!(srv.certs.reload().is_err());
    let r = request(srv.addr, &tls, "localhost", "GET", "/healthz", b"").await.unwrap();
    assert_eq!(r.peer_cert, der_b);

    srv.stop.send(true).unwrap();
    srv.served.await.unwrap().unwrap();
}

fn ckptd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ckptd"));
    for var in [
        "CKPTD_AGENT_IMAGE",
        "CKPTD_WEBHOOK_CONFIG",
        "CKPTD_WEBHOOK_LISTEN",
        "CKPTD_WEBHOOK_TLS_CERT",
        "CKPTD_WEBHOOK_TLS_KEY",
        "CKPTD_WEBHOOK_CERT_RELOAD_INTERVAL",
    ] {
        c.env_remove(var);
    }
    c.stdin(Stdio::null());
    c
}

#[test]
fn binary_reports_bad_configuration_with_exit_64_and_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(&cfg, "slot: 3\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["webhook", "--agent-image", "x:1"], "--tls-cert"),
        (
            vec!["webhook", "--agent-image", "x:1", "--tls-cert", missing.to_str().unwrap(), "--tls-key", "k"],
            "missing.pem",
        ),
        (vec!["webhook", "--tls-cert", "c", "--tls-key", "k"], "--agent-image"),
        (
            vec![
                "webhook",
                "--agent-image",
                "x:1",
                "--tls-cert",
                "c",
                "--tls-key",
                "k",
                "--config",
                cfg.to_str().unwrap(),
            ],
            "unknown field `slot`",
        ),
    ];
    for (args, needle) in cases {
        let out = ckptd().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn gen_cert_refuses_a_validity_past_what_x509_holds_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("certs");
    for days in ["3000000", "36501", "0", "4294967295"] {
        let out = ckptd().args(["webhook", "gen-cert", "--days", days, "--out-dir"]).arg(&out_dir).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "--days {days}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "--days {days}: {err}");
        assert!(err.contains("--days") && err.contains("36500"), "--days {days}: {err}");
        assert!(!out_dir.exists(), "--days {days} wrote {}", out_dir.display());
    }
    let out = ckptd().args(["webhook", "gen-cert", "--days", "36500", "--out-dir"]).arg(&out_dir).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out_dir.join("tls.crt").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gen_cert_output_serves_the_service_name_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let out = ckptd()
        .args(["webhook", "gen-cert", "--service", "ckptd-webhook", "--namespace", "ckptd", "--out-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in ["ca.crt", "tls.crt", "tls.key"] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(dir.path().join("tls.key")).unwrap().permissions().mode() & 0o777, 0o600);
    // A second run refuses to replace the key a webhook may be serving.
    let again = ckptd().args(["webhook", "gen-cert", "--out-dir"]).arg(dir.path()).output().unwrap();
    assert_eq!(again.status.code(), Some(64));

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = ckptd()
        .args(["webhook", "--listen", &addr.to_string(), "--agent-image", "registry.example.com/ckptd:0.1.0"])
        .arg("--tls-cert")
        .arg(dir.path().join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.path().join("tls.key"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ca_pem = std::fs::read(dir.path().join("ca.crt")).unwrap();
    let ca: CertificateDer<'static> = rustls::pki_types::pem::PemObject::from_pem_slice(&ca_pem).unwrap();
    let tls = connector(ca);
    let mut last = None;
    for _ in 0..500 {
        match request(addr, &tls, "ckptd-webhook.ckptd.svc", "POST", "/mutate", &fixture("plain-pod.json")).await {
            Ok(r) => {
                last = Some(r);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let r = last.expect("the webhook binary answered over TLS for ckptd-webhook.ckptd.svc");
    assert_eq!(r.status, 200);
    let raw: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(raw["response"]["allowed"], true);

    // The shell's builtin `kill`: no dependency on a kill binary being installed.
    let term = Command::new("sh").arg("-c").arg(format!("kill -TERM {}", child.id())).status().unwrap();
    assert!(term.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM is a clean shutdown");
}

/// Raises this process's soft open-file limit to `want` (or the hard limit), so that a test can
/// hold many sockets; the servers it starts inherit the raised limit.
fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutate_answers_while_1024_slow_clients_hold_connections_to_the_binary() {
    const SLOW_BODIES: usize = 1024;
    const SILENT: usize = 256;
    raise_nofile(8192);
    let dir = tempfile::tempdir().unwrap();
    let out = ckptd().args(["webhook", "gen-cert", "--out-dir"]).arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = ckptd()
        .args(["webhook", "--listen", &addr.to_string(), "--agent-image", "registry.example.com/ckptd:0.1.0"])
        .arg("--tls-cert")
        .arg(dir.path().join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.path().join("tls.key"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed when the test fails, so that a failure leaves no webhook behind.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = KillOnDrop(child);
    let ca_pem = std::fs::read(dir.path().join("ca.crt")).unwrap();
    let ca: CertificateDer<'static> = rustls::pki_types::pem::PemObject::from_pem_slice(&ca_pem).unwrap();
    let tls = connector(ca);
    let sni = "ckptd-webhook.ckptd.svc";
    let mut up = false;
    for _ in 0..500 {
        if request(addr, &tls, sni, "GET", "/healthz", b"").await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(up, "the webhook binary answered /healthz");

    // Clients that finish the handshake, announce a body and never send it, then clients that
    // connect and say nothing at all.
    let mut held = Vec::new();
    for _ in 0..SLOW_BODIES {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut s = tls.connect(ServerName::try_from(sni.to_string()).unwrap(), tcp).await.unwrap();
        let head = "POST /mutate HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{";
        s.write_all(head.as_bytes()).await.unwrap();
        s.flush().await.unwrap();
        held.push(s);
    }
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }

    // Each attempt is bounded, and so are the attempts: a webhook that never answers fails here.
    let pod = fixture("plain-pod.json");
    let mut answer = None;
    for _ in 0..4 {
        let attempt = request(addr, &tls, sni, "POST", "/mutate", &pod);
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(30), attempt).await {
            answer = Some(r);
            break;
        }
    }
    let r = answer.expect("/mutate answered while slow clients held connections");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let review: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(review["response"]["allowed"], true);
    drop((held, silent));

    let mut child = child;
    let term = Command::new("sh").arg("-c").arg(format!("kill -TERM {}", child.0.id())).status().unwrap();
    assert!(term.success());
    assert_eq!(child.0.wait().unwrap().code(), Some(0), "SIGTERM is a clean shutdown");
}
