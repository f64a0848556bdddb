//! The whole fault path, in CI: kmock (a Kubernetes API emulator) with five nodes, a real
//! `ckptd isolator`, four real `ckptd agent` processes (one per node, each watching its own
//! kernel-log file) and four trainer processes of a 4-rank job that save through their agents.
//!
//! An XID 79 line is appended to rank 2's kernel log. Then: the health controller of agent 2
//! decides drain-node, the isolator cordons and taints node-2, records an Event and deletes pod
//! train-2, asks the healthy ranks for a snapshot and orders every rank to restore the newest
//! globally committed step at a new generation. The test plays the job controller: it starts
//! rank 2 again (a fresh agent with an empty arena on node-4, as a rescheduled pod would be) and
//! checks that all four ranks resume from the same step with bitwise-identical state, then prints
//! the time from injection to resumed training.
#![cfg(feature = "server")]
// The test reports its measurement (time from injection to resumed) and where its logs are.
#![allow(clippy::print_stdout, clippy::print_stderr)]

#[path = "support/isolator_proc.rs"]
mod isolator_proc;
#[path = "support/kmock.rs"]
mod kmock;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ckpt_core::DType;
use ckpt_core::copy::Device;
use ckptd::client::{Checkpointer, CheckpointerConfig, Phase, TensorRef};
use isolator_proc::{IsolatorProc, token_file};
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kmock::{Kmock, POD_NAMESPACE};
use kube::Api;
use kube::api::ListParams;

const CHILD_ENV: &str = "CKPTD_SYSTEM_TRAINER";
const JOB: &str = "llm";
const WORLD: u32 = 4;
const N: usize = 50_000;
const PATIENCE: Duration = Duration::from_secs(180);

fn state(rank: u32, step: u64) -> Vec<f32> {
    (0..N).map(|i| rank as f32 * 10_000.0 + step as f32 + i as f32 * 0.5).collect()
}

fn refs(w: &mut [f32], counter: &mut [i64]) -> Vec<TensorRef> {
    vec![
        TensorRef {
            name: "w".into(),
            dtype: DType::F32,
            shape: vec![w.len() as u64],
            addr: w.as_mut_ptr() as u64,
            device: Device::Cpu,
        },
        TensorRef {
            name: "step".into(),
            dtype: DType::I64,
            shape: vec![],
            addr: counter.as_mut_ptr() as u64,
            device: Device::Cpu,
        },
    ]
}

/// The trainer process: trains (its state at step s is `state(rank, s)`), heartbeats, saves every
/// 3 steps and answers snapshot requests; on a restore order it loads that step, checks it bitwise
/// and prints `resumed <step> gen <generation>`, then idles. With `fresh`, it waits for the restore
/// order before doing anything (a rescheduled rank).
#[test]
fn system_trainer() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let mut it = spec.split('|');
    let socket = PathBuf::from(it.next().unwrap());
    let rank: u32 = it.next().unwrap().parse().unwrap();
    let fresh = it.next() == Some("fresh");
    let mut cfg = CheckpointerConfig::new(JOB);
    cfg.socket = Some(socket);
    cfg.rank = Some(rank);
    cfg.world_size = Some(WORLD);
    let ck = Checkpointer::new(cfg).unwrap();
    let mut out = std::io::stdout();
    let mut w = state(rank, 0);
    let mut counter = vec![0i64];
    let mut step = 0u64;
    loop {
        if let Some((s, generation)) = ck.take_restore_order() {
            ck.fence(None).unwrap();
            // SAFETY: the state is ours alone during the load.
            let loaded = unsafe { ck.load(&refs(&mut w, &mut counter), Some(s), None) }.unwrap();
            let ok = loaded.step == s
                && counter[0] == s as i64
                && w.iter().zip(state(rank, s)).all(|(a, b)| a.to_bits() == b.to_bits());
            writeln!(out, "resumed {s} gen {generation} ok={ok} memory={}", loaded.from_memory).unwrap();
            out.flush().unwrap();
            loop {
                let _ = ck.heartbeat(s, Phase::Step);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        if fresh || ck.stop_requested().is_some() {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        step += 1;
        ck.fence(None).unwrap();
        w = state(rank, step);
        counter[0] = step as i64;
        let requested = ck.heartbeat(step, Phase::Step).unwrap().is_some();
        if step % 3 == 0 || requested {
            // SAFETY: `w` and `counter` are written again only after the fence above.
            unsafe { ck.save(&refs(&mut w, &mut counter), step, Vec::new(), None) }.unwrap();
            writeln!(out, "saved {step}").unwrap();
            out.flush().unwrap();
        }
        std::thread::sleep(Duration::from_millis(40));
    }
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent(dir: &Path, iso: &str, rank: u32, node: &str, pod: &str) -> (Proc, PathBuf, PathBuf) {
    let home = dir.join(format!("{pod}-{node}"));
    std::fs::create_dir_all(&home).unwrap();
    let socket = home.join("agent.sock");
    let kmsg = home.join("kmsg");
    std::fs::write(&kmsg, b"").unwrap();
    let token = token_file(dir);
    let store = format!("file://{}", dir.join("store").display());
    let log = std::fs::File::create(home.join("agent.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_ckptd"))
        .arg("agent")
        .args(["--socket", socket.to_str().unwrap(), "--store", &store, "--job", JOB])
        .args(["--arena-dir", home.join("arena").to_str().unwrap(), "--world-size", "4"])
        .args(["--ranks", &rank.to_string(), "--commit-timeout", "60s"])
        .args(["--isolator", iso, "--isolator-token-file", token.to_str().unwrap()])
        .args(["--node", node, "--pod", pod, "--namespace", POD_NAMESPACE])
        .args(["--kmsg", kmsg.to_str().unwrap(), "--no-ib", "--no-nvml", "--hang-floor", "10m"])
        .env("CKPTD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(started.elapsed() < PATIENCE, "agent for rank {rank} never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Proc(child), socket, kmsg)
}

/// Starts a trainer; its stdout lines arrive on the returned channel.
fn trainer(socket: &Path, rank: u32, fresh: bool) -> (Proc, mpsc::Receiver<String>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "system_trainer", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{}|{rank}|{}", socket.display(), if fresh { "fresh" } else { "" }))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (Proc(child), rx)
}

/// Waits for a line containing `what`; returns it from `what` on.
fn wait_line(rx: &mpsc::Receiver<String>, what: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|_| panic!("no `{what}` line in time"));
        if let Some(at) = line.find(what) {
            return line[at..].to_string();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xid_79_on_one_node_isolates_it_and_every_rank_resumes_from_the_same_global_step() {
    let Some(km) = Kmock::start(5) else { return };
    let mut dir = tempfile::Builder::new().prefix("ckptd-system-").tempdir().unwrap();
    // Logs of every process stay for a post-mortem when the test fails.
    dir.disable_cleanup(true);
    eprintln!("system test directory: {}", dir.path().display());
    let token = token_file(dir.path());
    let iso = IsolatorProc::spawn(
        dir.path(),
        "isolator",
        &[
            "--token-file",
            token.to_str().unwrap(),
            "--kube-url",
            &km.url,
            "--max-isolated",
            "2",
            "--max-isolated-fraction",
            "1",
            "--snapshot-timeout",
            "5s",
        ],
    );
    let url = iso.url();
    let d = dir.path().to_path_buf();
    let (agents, trainers) = tokio::task::spawn_blocking(move || {
        let mut agents = Vec::new();
        let mut trainers = Vec::new();
        for r in 0..WORLD {
            let (a, socket, kmsg) = agent(&d, &url, r, &format!("node-{r}"), &format!("train-{r}"));
            agents.push((a, kmsg));
            trainers.push(trainer(&socket, r, false));
        }
        (agents, trainers)
    })
    .await
    .unwrap();

    // Training runs and commits globally through the isolator.
    let store = format!("file://{}", dir.path().join("store").display());
    // The engine runs its own runtime: use it from blocking sections only.
    let engine = tokio::task::block_in_place(|| ckpt_core::Engine::open(&store, Default::default()).unwrap());
    let latest = |e: &ckpt_core::Engine| tokio::task::block_in_place(|| e.latest(JOB).unwrap().map(|m| m.step));
    let started = Instant::now();
    loop {
        if latest(&engine).is_some_and(|s| s >= 6) {
            break;
        }
        assert!(started.elapsed() < PATIENCE, "no global commit: {}", iso.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Inject XID 79 on rank 2's node, through the kernel-log path a real fault takes.
    let injected = Instant::now();
    let mut f = std::fs::OpenOptions::new().append(true).open(&agents[2].1).unwrap();
    writeln!(f, "NVRM: Xid (PCI:0000:3b:00): 79, pid=4242, name=python, GPU has fallen off the bus.").unwrap();
    drop(f);

    // The isolator acts on node-2 in the cluster.
    let client = km.client();
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), POD_NAMESPACE);
    loop {
        let n = nodes.get("node-2").await.unwrap();
        let cordoned = n.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
        let tainted = n
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default()
            .iter()
            .any(|t| t.key == "ckptd.io/unhealthy" && t.effect == "NoSchedule");
        let pod_gone = matches!(pods.get("train-2").await, Err(kube::Error::Api(s)) if s.code == 404);
        if cordoned && tainted && pod_gone {
            break;
        }
        assert!(injected.elapsed() < PATIENCE, "node-2 not isolated: {}", iso.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events: Vec<Event> = Api::<Event>::all(client.clone()).list(&ListParams::default()).await.unwrap().items;
    assert!(
        events.iter().any(|e| e.involved_object.name.as_deref() == Some("node-2")),
        "no Event on node-2: {events:?}"
    );
    for healthy in ["node-0", "node-1", "node-3"] {
        let n = nodes.get(healthy).await.unwrap();
        assert!(!n.spec.and_then(|s| s.unschedulable).unwrap_or(false), "{healthy} was cordoned");
    }

    // The job controller reschedules rank 2: a fresh pod (agent and trainer) on node-4.
    let d = dir.path().to_path_buf();
    let url = iso.url();
    let (new_agent, new_trainer, rest) = tokio::task::spawn_blocking(move || {
        let mut trainers = trainers;
        drop(trainers.remove(2)); // the deleted pod's trainer
        let (a, socket, _) = agent(&d, &url, 2, "node-4", "train-2b");
        let t = trainer(&socket, 2, true);
        (a, t, trainers)
    })
    .await
    .unwrap();

    let mut resumed = Vec::new();
    let (rest, new_trainer) = tokio::task::spawn_blocking(move || {
        for (r, (_, rx)) in [0u32, 1, 3].into_iter().zip(&rest) {
            resumed.push((r, wait_line(rx, "resumed")));
        }
        resumed.push((2, wait_line(&new_trainer.1, "resumed")));
        (resumed, (rest, new_trainer))
    })
    .await
    .unwrap();
    let took = injected.elapsed();
    let resumed = rest;
    let lines: Vec<&str> = resumed.iter().map(|(_, l)| l.as_str()).collect();
    let first: Vec<&str> = lines[0].split_whitespace().collect();
    let (step, generation) = (first[1], first[3]);
    for (r, l) in &resumed {
        let f: Vec<&str> = l.split_whitespace().collect();
        assert_eq!((f[1], f[3], f[4]), (step, generation, "ok=true"), "rank {r}: {l}");
    }
    assert!(generation.parse::<u64>().unwrap() >= 1, "the restart raised the generation");
    let step: u64 = step.parse().unwrap();
    assert_eq!(latest(&engine), Some(step), "ranks resumed from the newest global step");
    assert!(tokio::task::block_in_place(|| engine.verify(JOB, step).unwrap().ok()));
    println!(
        "xid 79 injected -> node-2 isolated -> all {WORLD} ranks resumed from global step {step} (generation {generation}) in {:.2} s",
        took.as_secs_f64()
    );
    drop((new_agent, new_trainer, agents));
    tokio::task::block_in_place(|| drop(engine));
    dir.disable_cleanup(false);
}
