//! A real `ckptd agent` linked to a real `ckptd isolator` (`--dry-run`: no cluster needed), with
//! two ranks attached through the trainer library: the agent forwards each rank's phase to the
//! isolator with its heartbeats (a phase change within a step included), and its own fault report
//! carries the ranks' phase, which the fault record keeps as `fault_phase` and the handling follows.
//!
//! The isolator's view of a rank's phase is read back through fault records: a report that names
//! no phase is handled in the phase the ranks' last heartbeats gave.
#![cfg(feature = "server")]

#[path = "support/agent_proc.rs"]
mod agent_proc;
#[path = "support/isolator_proc.rs"]
mod isolator_proc;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ckptd::client::{Checkpointer, CheckpointerConfig, Phase};
use ckptd::isolator::link::{IsolatorLink, LinkCredentials};
use ckptd_proto::v1::{FaultAction, FaultRecord, FaultReport};
use isolator_proc::{IsolatorProc, TOKEN, token_file};

const JOB: &str = "llm";
/// Longest a test waits for something a real process does; never asserted as a duration.
const PATIENCE: Duration = Duration::from_secs(120);

/// The agent process, killed when dropped (its stderr is in the test directory's `agent.log`).
struct Agent {
    child: Child,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An agent for ranks 0 and 1 of a 2-rank job on node-0, linked to `iso`, with drills allowed.
fn agent(dir: &Path, iso: &IsolatorProc, socket: &Path) -> Agent {
    let token = token_file(dir);
    let log = dir.join("agent.log");
    let child = agent_proc::start(
        Command::new(env!("CARGO_BIN_EXE_ckptd"))
            .arg("agent")
            .args(["--socket", socket.to_str().unwrap(), "--job", JOB])
            .args(["--store", &format!("file://{}", dir.join("store").display())])
            .args(["--arena-dir", dir.join("arena").to_str().unwrap(), "--world-size", "2", "--ranks", "0,1"])
            .args(["--isolator", &iso.url(), "--isolator-token-file", token.to_str().unwrap()])
            .args(["--node", "node-0", "--pod", "train-0", "--namespace", "train"])
            .args(["--no-kmsg", "--no-nvml", "--no-ib", "--allow-inject", "--hang-floor", "10m"])
            .env("CKPTD_LOG", "info"),
        &log,
        socket,
        PATIENCE,
    );
    Agent { child }
}

fn trainer(socket: &Path, rank: u32) -> Checkpointer {
    let mut cfg = CheckpointerConfig::new(JOB);
    cfg.socket = Some(socket.to_path_buf());
    cfg.rank = Some(rank);
    cfg.world_size = Some(2);
    Checkpointer::new(cfg).expect("attach to the agent")
}

/// Polls `f` until it gives `Some`; the limit is a safety net, not an assertion about speed.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(started.elapsed() < PATIENCE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The phase the isolator holds for `rank`: a report of an `ignore` fault on it that names no
/// phase is recorded with the phase of the rank's last heartbeat.
fn isolator_phase(rt: &tokio::runtime::Runtime, link: &IsolatorLink, rank: u32) -> String {
    rt.block_on(async {
        let probe = FaultReport {
            job: JOB.into(),
            ranks: vec![rank],
            source: "test".into(),
            kind: format!("probe-{rank}"),
            action: FaultAction::Ignore as i32,
            ..Default::default()
        };
        link.report_fault(probe).await.unwrap();
        let records = link.list_faults(JOB).await.unwrap();
        let newest = records.iter().rev().find(|r| r.kind == format!("probe-{rank}")).expect("the probe's record");
        newest.fault_phase.clone()
    })
}

#[test]
fn the_agent_forwards_each_ranks_phase_and_reports_faults_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path());
    let iso = IsolatorProc::spawn(dir.path(), "isolator", &["--dry-run", "--token-file", token.to_str().unwrap()]);
    let socket = dir.path().join("agent.sock");
    let _agent = agent(dir.path(), &iso, &socket);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let link = rt.block_on(IsolatorLink::connect(&iso.url(), LinkCredentials::token(TOKEN))).unwrap();

    let ck0 = trainer(&socket, 0);
    let ck1 = trainer(&socket, 1);
    eventually("both ranks registered with the isolator", || {
        let jobs = rt.block_on(link.list_jobs()).ok()?;
        jobs.iter().any(|j| j.job == JOB && j.registered == 2).then_some(())
    });
    assert_eq!(isolator_phase(&rt, &link, 0), "", "no phase before a heartbeat names one");

    // Rank 0 steps, then saves within the same step; rank 1 starts, then loads.
    ck0.heartbeat(5, Phase::Step).unwrap();
    eventually("rank 0's step phase at the isolator", || (isolator_phase(&rt, &link, 0) == "step").then_some(()));
    ck0.heartbeat(5, Phase::CheckpointSave).unwrap();
    ck1.heartbeat(0, Phase::Init).unwrap();
    ck1.heartbeat(0, Phase::CheckpointLoad).unwrap();
    eventually("rank 0 saving at the isolator", || (isolator_phase(&rt, &link, 0) == "checkpoint-save").then_some(()));
    eventually("rank 1 loading at the isolator", || (isolator_phase(&rt, &link, 1) == "checkpoint-load").then_some(()));

    // The agent's own report (a drilled hang) names the phase of its ranks: saving wins.
    let out = Command::new(env!("CARGO_BIN_EXE_ckptctl"))
        .args(["inject", "--socket", socket.to_str().unwrap(), "--hang", "--rank", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hang: FaultRecord = eventually("the hang's record", || {
        let records = rt.block_on(link.list_faults(JOB)).ok()?;
        records.into_iter().find(|r| r.kind == "hang" && r.source == "inject")
    });
    assert_eq!(hang.fault_phase, "checkpoint-save", "{hang:?}");
    assert_eq!(hang.ranks, vec![0, 1]);
    assert!(hang.note.contains("fault during checkpoint-save"), "handled in that phase: {}", hang.note);
}
