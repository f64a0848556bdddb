//! System tests of `ckptd demo`: the real binary, a real `file://` store.

use std::process::Command;

use ckpt_core::{Engine, EngineConfig, StepState};

fn ckptd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ckptd"));
    cmd.env_remove("CKPTD_LOG");
    cmd
}

#[test]
fn demo_checkpoints_crashes_and_restores_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let arena = tempfile::tempdir().unwrap();
    let out = ckptd()
        .args(["demo", "--state-mib", "8", "--steps", "12", "--every", "4", "--compute-ms", "5", "--store", &url])
        .args(["--arena-dir".as_ref(), arena.path().as_os_str()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.starts_with("demo ok: restored step 12 (") && last.ends_with("MiB) bitwise identical"), "{stdout}");
    // Three saves, each with its stall and its time to durable; one restore from each tier.
    for step in [4, 8, 12] {
        assert!(stdout.contains(&format!("step {step}: save stall ")), "{stdout}");
        assert!(stdout.contains(&format!("step {step}: durable ")), "{stdout}");
    }
    assert!(stdout.contains("restore      8.0 MiB of step 12: memory tier "), "{stdout}");
    assert!(stdout.contains("node lost: removed the arena"), "{stdout}");
    // The demo leaves no arena behind in the memory-backed directory.
    assert_eq!(std::fs::read_dir(arena.path()).unwrap().count(), 0);

    // A fresh reader of the store sees what the demo claims: step 12 committed and valid, with
    // retention's default of 2 keeping step 8 too.
    let engine = Engine::open(&url, EngineConfig::default()).unwrap();
    let latest = engine.latest_valid("demo").unwrap().expect("a committed step");
    assert_eq!(latest.step, 12);
    let committed: Vec<u64> =
        engine.steps("demo").unwrap().into_iter().filter(|s| s.state == StepState::Committed).map(|s| s.step).collect();
    assert_eq!(committed, vec![8, 12]);
}

#[test]
fn a_bad_or_unusable_store_is_one_line_and_exit_64() {
    for store in ["ftp://x", "memory://"] {
        let out = ckptd().args(["demo", "--store", store]).output().unwrap();
        assert_eq!(out.status.code(), Some(64));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(store.trim_end_matches("//")), "{stderr}");
        assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn a_bad_flag_is_one_line_and_exit_64() {
    let out = ckptd().args(["demo", "--steps", "2", "--every", "5"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--every 5"), "{stderr}");

    let out = ckptd().args(["demo", "--compression", "lz4"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim_end().lines().count(), 1);
}

#[test]
fn sidecar_demo_kills_the_trainer_and_restores_from_the_agents_memory() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("store").display());
    let out = ckptd()
        .current_dir(dir.path())
        .args(["demo", "--mode", "sidecar", "--state-mib", "4", "--steps", "9", "--every", "4", "--compute-ms", "5"])
        .args(["--store", &url])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exit {:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("SIGKILLed at step 9 after 2 saves"), "{stdout}");
    assert!(stdout.contains("restored 8 memory=true"), "{stdout}");
    assert!(stdout.contains("state checked bitwise"), "{stdout}");
    assert!(stdout.contains("time from SIGKILL to restored in a new process"), "{stdout}");
    // The resumed trainer saved on: steps 12 and 16 are committed by the agent.
    let engine = Engine::open(&url, EngineConfig::default()).unwrap();
    assert_eq!(engine.latest_valid("demo").unwrap().map(|m| m.step), Some(16));
}
