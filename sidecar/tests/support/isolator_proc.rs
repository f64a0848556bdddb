//! `ckptd isolator` as a real child process, for the isolator tests and the later system test.
#![allow(dead_code, clippy::print_stderr)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A token long enough for the isolator's check.
pub const TOKEN: &str = "test-token-0123456789abcdef";

/// A running isolator; SIGKILLed on drop.
pub struct IsolatorProc {
    child: Child,
    /// gRPC address.
    pub grpc: SocketAddr,
    /// Metrics address.
    pub metrics: SocketAddr,
    /// Alert intake address, when started with `--alerts-addr`.
    pub alerts: Option<SocketAddr>,
    /// Its stderr log.
    pub log: PathBuf,
}

/// Writes [`TOKEN`] into `dir/token` and returns the path.
pub fn token_file(dir: &Path) -> PathBuf {
    let p = dir.join("token");
    std::fs::write(&p, format!("{TOKEN}\n")).expect("write token");
    p
}

impl IsolatorProc {
    /// Starts `ckptd isolator` on loopback ports with `args`; its log goes to `dir/<name>.log`.
    pub fn spawn(dir: &Path, name: &str, args: &[&str]) -> IsolatorProc {
        IsolatorProc::spawn_with_env(dir, name, args, &[])
    }

    /// [`spawn`](IsolatorProc::spawn) with extra environment variables (store credentials).
    pub fn spawn_with_env(dir: &Path, name: &str, args: &[&str], env: &[(String, String)]) -> IsolatorProc {
        let log = dir.join(format!("{name}.log"));
        let err = std::fs::File::create(&log).expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_ckptd"))
            .arg("isolator")
            .args(["--listen", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
            .args(args)
            .env("CKPTD_LOG", "info,ckptd=debug")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn ckptd isolator");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                panic!("isolator did not start ({status:?}):\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
        };
        let field = |k: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no {k} in `{line}`"))
        };
        let alerts = line.split_whitespace().find_map(|w| w.strip_prefix("alerts=")).and_then(|a| a.parse().ok());
        IsolatorProc { grpc: field("grpc="), metrics: field("metrics="), alerts, child, log }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on the metrics endpoint: (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(self.metrics).expect("connect metrics");
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (code, body)
    }

    /// SIGKILL (a crash, not a clean shutdown).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for IsolatorProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` until it returns `Some`, for at most `limit`; panics with `what` otherwise. The limit
/// is a safety net against hangs, not an assertion about speed.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// POSTs `body` to the isolator's alert intake (`--alerts-addr`) over plain HTTP/1.1, with the
/// bearer `token` if given: (status, body as JSON or `null`).
pub async fn post_intake(iso: &IsolatorProc, path: &str, token: Option<&str>, body: &[u8]) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = iso.alerts.expect("the isolator prints its alerts address");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to the intake");
    let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: isolator\r\ncontent-type: application/json\r\n{auth}content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write head");
    // A peer that refuses an oversize body early may close before it is all sent.
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let out = String::from_utf8_lossy(&out).to_string();
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, serde_json::from_str(&body).unwrap_or(serde_json::Value::Null))
}

/// Reads one HTTP/1.1 request with a content-length (a fake endpoint's side): (head, body), or
/// `None` when the peer closed first.
pub async fn read_request(s: &mut tokio::net::TcpStream) -> Option<(String, String)> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = s.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        let Some((head, body)) = text.split_once("\r\n\r\n") else { continue };
        let len = head
            .lines()
            .find_map(|l| l.to_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        if body.len() >= len {
            return Some((head.to_string(), body[..len].to_string()));
        }
    }
}

/// `ckptctl faults --job JOB --json` against `iso` with the token in `dir`: the records.
pub fn ckptctl_faults(iso: &IsolatorProc, dir: &Path, job: &str) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_ckptctl"))
        .args(["faults", "--job", job, "--json", "--isolator", &iso.url(), "--token-file"])
        .arg(dir.join("token"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// A test CA with a server certificate for `localhost` and a client certificate, the server's
/// files written into a directory for `--tls-cert`, `--tls-key` and `--client-ca`.
pub struct TestPki {
    /// The CA certificate (PEM), for clients that verify the server.
    pub ca_pem: String,
    /// The client certificate and its key (PEM), signed by the CA.
    pub client_pem: String,
    pub client_key_pem: String,
    /// Paths of the server certificate, its key and the CA certificate.
    pub cert: String,
    pub key: String,
    pub ca_path: String,
}

impl TestPki {
    /// Makes the CA and both certificates (the client's named `client_name`) and writes the
    /// server's files into `dir`.
    pub fn new(dir: &Path, client_name: &str) -> TestPki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params.clone(), ca_key);
        let signed = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_pem, server_key_pem) = signed("localhost");
        let (client_pem, client_key_pem) = signed(client_name);
        let write = |name: &str, pem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, pem).unwrap();
            path.to_str().unwrap().to_string()
        };
        TestPki {
            cert: write("server.pem", &server_pem),
            key: write("server.key", &server_key_pem),
            ca_path: write("ca.pem", &ca.pem()),
            ca_pem: ca.pem(),
            client_pem,
            client_key_pem,
        }
    }
}
