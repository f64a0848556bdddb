//! kmock, the stateful Kubernetes API emulator from PyPI, as a child process for the isolator
//! tests (and the later system test).
//!
//! Python comes from `CKPTD_TEST_PYTHON` (default `python3`) and must be able to `import kmock`
//! (`pip install kmock`). When it cannot, [`Kmock::start`] returns `None` after a loud message, so
//! the test skips, unless `CKPTD_REQUIRE_KMOCK` is set (CI), in which case it panics.
#![allow(dead_code, clippy::print_stderr)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Python interpreter with kmock.
pub const ENV_PYTHON: &str = "CKPTD_TEST_PYTHON";
/// Set (to anything) to turn a missing kmock into a failure instead of a skip.
pub const ENV_REQUIRE: &str = "CKPTD_REQUIRE_KMOCK";
/// Namespace of the pre-loaded pods `train-<i>`.
pub const POD_NAMESPACE: &str = "train";

/// A running kmock; killed on drop (and it exits by itself when our end of its stdin closes).
pub struct Kmock {
    child: Child,
    _stdin: ChildStdin,
    /// Base URL, `http://127.0.0.1:<port>`.
    pub url: String,
}

fn python() -> String {
    std::env::var(ENV_PYTHON).ok().filter(|p| !p.is_empty()).unwrap_or_else(|| "python3".to_string())
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/kmock_server.py")
}

impl Kmock {
    /// Starts kmock with `nodes` nodes `node-<i>` and pods `train/train-<i>` on them. `None`:
    /// kmock is not installed and the test should return (skip).
    pub fn start(nodes: usize) -> Option<Kmock> {
        Kmock::start_with(nodes, &[])
    }

    /// [`start`](Kmock::start) with more options of `kmock_server.py` (`--owner-job NAME`: the
    /// pods belong to a batch/v1 Job NAME).
    pub fn start_with(nodes: usize, extra: &[&str]) -> Option<Kmock> {
        let py = python();
        let importable =
            Command::new(&py).args(["-c", "import kmock"]).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        if !importable {
            let msg = format!(
                "kmock is not importable with `{py}`: `pip install kmock` and point {ENV_PYTHON} at that python"
            );
            if std::env::var_os(ENV_REQUIRE).is_some() {
                panic!("{msg} ({ENV_REQUIRE} is set)");
            }
            eprintln!("\n!!!!!!!!!! SKIPPING kmock test: {msg} !!!!!!!!!!\n");
            return None;
        }
        let mut child = Command::new(&py)
            .arg(script())
            .args(["--nodes", &nodes.to_string(), "--pods-namespace", POD_NAMESPACE])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {py}: {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("KMOCK_URL=") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let url = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("kmock did not print its URL within 60 s")
        });
        Some(Kmock { child, _stdin: stdin, url })
    }

    /// A kube client for the emulator.
    pub fn client(&self) -> kube::Client {
        ckptd::isolator::install_crypto_provider();
        let cfg = kube::Config::new(self.url.parse().expect("kmock url"));
        kube::Client::try_from(cfg).expect("kube client")
    }
}

impl Drop for Kmock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The node's taints as (key, value, effect).
pub fn taints(n: &k8s_openapi::api::core::v1::Node) -> Vec<(String, Option<String>, String)> {
    n.spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|t| (t.key, t.value, t.effect))
        .collect()
}

/// Whether the node is cordoned.
pub fn cordoned(n: &k8s_openapi::api::core::v1::Node) -> bool {
    n.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false)
}

/// The Events in `ns` about the object `name`.
pub async fn events_about(client: &kube::Client, ns: &str, name: &str) -> Vec<k8s_openapi::api::core::v1::Event> {
    use k8s_openapi::api::core::v1::Event;
    // kmock knows a resource only once an object of it exists: 404 means no Event yet.
    match kube::Api::<Event>::namespaced(client.clone(), ns).list(&Default::default()).await {
        Ok(list) => list.items.into_iter().filter(|e| e.involved_object.name.as_deref() == Some(name)).collect(),
        Err(kube::Error::Api(s)) if s.code == 404 => Vec::new(),
        Err(e) => panic!("list events in {ns}: {e}"),
    }
}

/// Registers a one-rank job `job` on node `node-<i>` with pod `train-<i>` (the pods this emulator
/// pre-loads) with the isolator `iso`, its store in `dir`.
pub async fn job_on(
    iso: &crate::isolator_proc::IsolatorProc,
    dir: &tempfile::TempDir,
    job: &str,
    i: u32,
) -> ckptd::Result<ckptd::isolator::link::IsolatorLink> {
    use ckptd::isolator::link::{IsolatorLink, LinkCredentials};
    let l = IsolatorLink::connect(&iso.url(), LinkCredentials::token(crate::isolator_proc::TOKEN)).await?;
    let store = format!("file://{}", dir.path().join("store").display());
    l.register(job, &[0], 1, &format!("node-{i}"), &format!("train-{i}"), POD_NAMESPACE, &store).await?;
    Ok(l)
}
