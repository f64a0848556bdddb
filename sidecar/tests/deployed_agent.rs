//! The agent as the webhook deploys it: the patch for a labelled pod is rendered from a captured
//! AdmissionReview, the injected container's command and environment are taken exactly as
//! rendered, and the real `ckptd agent` is started on this machine with them. `ckptctl health
//! --json` must then show every reporter enabled, or unavailable for a reason of this machine
//! (no GPU driver, no InfiniBand, no permission for the kernel log), and none disabled by
//! configuration; and an NCCL error written where the trainer's `NCCL_DEBUG_FILE` points must
//! reach the agent's active faults.
//!
//! A pod is not a process on this machine, so a few things are rewritten, each as the kubelet
//! would resolve it, and nothing else:
//! - each emptyDir the agent mounts is a fresh directory here: a mount path at the start of a
//!   variable's value becomes that directory (the trainer's mounts resolve the same way, so the
//!   NCCL volume is shared as in the pod);
//! - a hostPath volume is the node's own path, so `/dev/kmsg` stays `/dev/kmsg`;
//! - downward-API variables get this machine's host name, the pod's name and namespace from the
//!   review and a fixed UID (the API server assigns the real one after admission);
//! - the metrics port, which is the pod's own in its network namespace, becomes a free port on
//!   127.0.0.1 because this machine's is shared.
#![cfg(feature = "server")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ckptd::webhook::Config;
use ckptd::webhook::server::review;
use serde_json::Value;

/// Longest the test waits for something a real process does; never asserted as a duration.
const PATIENCE: Duration = Duration::from_secs(120);
/// The pod's UID as the downward API would give it (assigned by the API server after admission).
const POD_UID: &str = "3f0e9c1a-5b7d-4e2a-9c1f-0d2b7a6e4c11";

/// The captured review's pod with the webhook's patch applied.
fn injected_pod() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/webhook/plain-pod.json");
    let body = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let resp = review(&body, &Config::new("registry.example.com/ckptd:0.1.0")).expect("a valid review");
    assert!(resp.allowed, "{:?}", resp.result);
    let raw: Value = serde_json::from_slice(&body).unwrap();
    let mut pod = raw["request"]["object"].clone();
    let patch: json_patch::Patch = serde_json::from_slice(resp.patch.as_deref().expect("a patch")).unwrap();
    json_patch::patch(&mut pod, &patch).expect("the patch applies");
    pod
}

fn container<'a>(pod: &'a Value, list: &str, name: &str) -> &'a Value {
    pod["spec"][list]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name}"))
}

/// Where each of a container's mount paths is on this machine: an emptyDir is a directory under
/// `root` named after its volume (the same for every container that mounts it), a hostPath is the
/// node's path itself.
fn local_mounts(pod: &Value, c: &Value, root: &Path) -> Vec<(String, PathBuf)> {
    let volumes: BTreeMap<&str, &Value> = pod["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| (v["name"].as_str().expect("volume name"), v))
        .collect();
    let mut out = Vec::new();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let (name, at) = (m["name"].as_str().unwrap(), m["mountPath"].as_str().unwrap().to_string());
        let v = volumes.get(name).unwrap_or_else(|| panic!("mount {name} has no volume"));
        let local = if v["emptyDir"].is_object() {
            let dir = root.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            dir
        } else if let Some(host) = v["hostPath"]["path"].as_str() {
            PathBuf::from(host)
        } else {
            panic!("the agent mounts {name}, which is neither an emptyDir nor a hostPath: {v}");
        };
        out.push((at, local));
    }
    // The longest mount path first, so a nested mount wins over its parent.
    out.sort_by_key(|(at, _)| std::cmp::Reverse(at.len()));
    out
}

/// `value` with a leading mount path replaced by where that volume is on this machine.
fn resolve(value: &str, mounts: &[(String, PathBuf)]) -> String {
    for (at, local) in mounts {
        if let Some(rest) = value.strip_prefix(at.as_str()).filter(|r| r.is_empty() || r.starts_with('/')) {
            return format!("{}{rest}", local.display());
        }
    }
    value.to_string()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The agent container's environment as the kubelet would give it on this machine.
fn agent_env(pod: &Value, agent: &Value, mounts: &[(String, PathBuf)]) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for e in agent["env"].as_array().expect("env") {
        let name = e["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = e["value"].as_str() {
            resolve(v, mounts)
        } else {
            match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("spec.nodeName") => hostname(),
                Some("metadata.name") => pod["metadata"]["name"].as_str().unwrap().to_string(),
                Some("metadata.namespace") => pod["metadata"]["namespace"].as_str().unwrap().to_string(),
                Some("metadata.uid") => POD_UID.to_string(),
                _ => panic!("{name} comes from something this test does not resolve: {e}"),
            }
        };
        env.insert(name, value);
    }
    let metrics = env.get_mut(ckptd::env::ENV_METRICS_ADDR).expect("a metrics address");
    assert!(metrics.starts_with("0.0.0.0:"), "{metrics}");
    *metrics = format!("127.0.0.1:{}", free_port());
    env
}

struct Agent {
    child: Child,
    log: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn health(socket: &Path) -> Value {
    let o = Command::new(env!("CARGO_BIN_EXE_ckptctl"))
        .args(["health", "--json", "--socket"])
        .arg(socket)
        .env_remove(ckptd::env::ENV_SOCKET)
        .output()
        .unwrap();
    assert!(o.status.success(), "ckptctl health: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

/// Why an unavailable reporter may be unavailable on a machine like this one: no hardware, or no
/// permission. Anything else (a flag, a missing path in the configuration) fails the test.
fn hardware_or_permission(reporter: &str, detail: &str) -> bool {
    match reporter {
        "nvml" => detail.starts_with("NVML unavailable") || detail.starts_with("NVML loaded but shows no GPUs"),
        "kmsg" => detail.contains("permission denied") || detail.contains("no such device"),
        "ib" => detail.starts_with("no InfiniBand or RoCE devices under /sys/class/infiniband"),
        _ => false,
    }
}

#[test]
fn the_injected_agent_runs_every_reporter_and_reads_the_trainers_nccl_log() {
    let pod = injected_pod();
    let agent = container(&pod, "initContainers", "ckptd-agent");
    let trainer = container(&pod, "containers", "trainer");
    let root = tempfile::tempdir().unwrap();
    let agent_mounts = local_mounts(&pod, agent, root.path());
    let env = agent_env(&pod, agent, &agent_mounts);
    assert!(
        !env.keys().any(|k| k.starts_with("CKPTD_NO_")),
        "a labelled pod with no opt-out switches no reporter off: {env:?}"
    );
    assert_eq!(env[ckptd::env::ENV_KMSG], "/dev/kmsg", "the hostPath is the node's path");

    let command: Vec<&str> = agent["command"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let args: Vec<&str> = agent["args"].as_array().into_iter().flatten().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(command.first(), Some(&"ckptd"), "the image's ckptd is this build's");
    let log = root.path().join("agent.log");
    let child = Command::new(env!("CARGO_BIN_EXE_ckptd"))
        .args(&command[1..])
        .args(&args)
        .env_clear()
        .envs(&env)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start ckptd agent");
    let agent_proc = Agent { child, log };

    let socket = PathBuf::from(&env[ckptd::env::ENV_SOCKET]);
    let started = Instant::now();
    let mut agent_proc = agent_proc;
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if let Ok(Some(status)) = agent_proc.child.try_wait() {
            panic!("the agent exited with {status}: {}", agent_proc.log());
        }
        assert!(started.elapsed() < PATIENCE, "the agent never listened: {}", agent_proc.log());
        std::thread::sleep(Duration::from_millis(25));
    }

    let status = health(&socket);
    let reporters = status["reporters"].as_object().expect("reporters");
    let names: Vec<&str> = reporters.keys().map(String::as_str).collect();
    assert_eq!(names, ["ib", "kmsg", "nccl", "nvml", "progress"], "{status:#}");
    for (name, r) in reporters {
        let detail = r["detail"].as_str().unwrap_or_default();
        match r["state"].as_str() {
            Some("enabled") => assert_eq!(r["enabled"], true, "{name}: {r}"),
            Some("unavailable") => assert!(
                hardware_or_permission(name, detail),
                "{name} is unavailable for a reason that is not this machine's hardware or permissions: {detail}"
            ),
            other => panic!("{name} is {other:?} as the webhook deploys it: {detail}\n{}", agent_proc.log()),
        }
    }
    for name in ["progress", "nccl"] {
        assert_eq!(reporters[name]["state"], "enabled", "{name}: {}", reporters[name]);
    }
    assert!(!agent_proc.log().contains("nccl disabled"), "{}", agent_proc.log());

    // The trainer writes where its NCCL_DEBUG_FILE says, through its own mount of the shared
    // volume; NCCL expands %h to the host name and %p to the process id.
    let trainer_mounts = local_mounts(&pod, trainer, root.path());
    let debug_file = trainer["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "NCCL_DEBUG_FILE")
        .and_then(|e| e["value"].as_str())
        .expect("the trainer's NCCL_DEBUG_FILE");
    let written = resolve(&debug_file.replace("%h", "train-0").replace("%p", "4242"), &trainer_mounts);
    assert!(written.starts_with(root.path().to_str().unwrap()), "{written} is on a shared volume");
    let line = "[rank0]:[E1128 18:02:11.123456789 ProcessGroupNCCL.cpp:616] [Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran for 600042 milliseconds before timing out.";
    std::fs::write(&written, format!("train-0:4242:4242 [0] NCCL INFO Bootstrap : Using eth0\n{line}\n")).unwrap();

    let started = Instant::now();
    let fault = loop {
        let status = health(&socket);
        let found = status["active_faults"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["finding"]["kind"] == "nccl-timeout")
            .cloned();
        if let Some(f) = found {
            break f;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the NCCL line never reached the agent: {status:#}\n{}",
            agent_proc.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(fault["finding"]["source"], "nccl", "{fault}");
    assert_eq!(fault["finding"]["evidence"], line, "{fault}");
    assert_eq!(fault["finding"]["rank"], 0, "{fault}");
    assert_eq!(fault["action"], "restart-job", "{fault}");
}
