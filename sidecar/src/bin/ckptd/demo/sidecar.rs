//! `ckptd demo --mode sidecar`: the sidecar path end to end on one machine. It starts a real agent
//! process and a trainer process, SIGKILLs the trainer mid-run, starts a new trainer that restores
//! from the agent's memory and checks the restored state bitwise, and prints the time from the
//! kill to the state restored in the new process.
//!
//! The trainer is this binary again (`ckptd demo-trainer`, hidden), running the embedded demo's
//! training loop against the agent's socket. It prints `step N`, `step N: save stall U us`,
//! `restored N memory=B load_ms M` and `verified N` lines, which the demo reads. The new trainer
//! restores the last step the killed one handed over, which the agent commits after the kill.

use std::io::{BufRead, BufReader, Lines, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use ckptd::client::{Checkpointer, CheckpointerConfig, Phase};

use super::state::{self, State};
use super::{Config, SEED, Scratch};

/// Settings of one demo trainer process.
#[derive(Debug, Clone)]
pub struct TrainerConfig {
    /// The agent's socket.
    pub socket: PathBuf,
    /// The demo's settings (the store and the arena are the agent's).
    pub demo: Config,
    /// Restore this step first, once the agent has committed it.
    pub resume: Option<u64>,
}

/// Runs one trainer process; see the module documentation for what it prints.
pub fn trainer(cfg: &TrainerConfig, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut ck_cfg = CheckpointerConfig::new(cfg.demo.job.clone());
    ck_cfg.socket = Some(cfg.socket.clone());
    let ck = Checkpointer::new(ck_cfg)?;
    let specs = state::specs(cfg.demo.state_bytes);
    let (mut state, base) = if let Some(step) = cfg.resume {
        ck.heartbeat(0, Phase::CheckpointLoad)?;
        let mut state = State::poisoned(&specs, SEED);
        let t = Instant::now();
        // The killed trainer handed the step over; the agent may still be committing it.
        while ck.latest_step()?.is_none_or(|s| s < step) {
            ensure!(t.elapsed() < Duration::from_secs(60), "the agent did not commit step {step} within 60 s");
            std::thread::sleep(Duration::from_millis(5));
        }
        // SAFETY: `state` owns the tensors and nothing else touches them until `load` returns.
        let loaded = unsafe { ck.load(&state.refs(), Some(step), None) }?;
        let load_ms = t.elapsed().as_secs_f64() * 1e3;
        writeln!(out, "restored {} memory={} load_ms {load_ms:.1}", loaded.step, loaded.from_memory)?;
        state.step = super::local_step(&loaded.metadata)?;
        super::verify(&state, &State::derive(&specs, SEED, state.step), "the restored state")?;
        writeln!(out, "verified {}", loaded.step)?;
        let base =
            loaded.step.checked_sub(state.step).ok_or_else(|| anyhow!("step {} is inconsistent", loaded.step))?;
        (state, base)
    } else {
        (State::init(&specs, SEED), ck.latest_step()?.unwrap_or(0))
    };
    let on_step = |step: u64, out: &mut dyn Write| {
        ck.heartbeat(base + step, Phase::Step)?;
        writeln!(out, "step {step}")?;
        Ok(out.flush()?)
    };
    super::train(&ck, &mut state, &cfg.demo, base, cfg.demo.steps, out, &on_step)?;
    if cfg.resume.is_some() {
        super::verify(&state, &State::derive(&specs, SEED, cfg.demo.steps), "the resumed run")?;
    }
    Ok(ck.close()?)
}

/// A child process, killed if the demo ends before it does.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn spawn(args: &[String], stdout: Stdio) -> anyhow::Result<Proc> {
    let exe = std::env::current_exe().context("cannot locate the ckptd binary")?;
    let child = Command::new(&exe).args(args).stdout(stdout).stderr(Stdio::inherit()).spawn();
    Ok(Proc(child.with_context(|| format!("cannot start {}", exe.display()))?))
}

fn trainer_args(cfg: &Config, steps: u64, socket: &Path, resume: Option<u64>) -> Vec<String> {
    let mut a: Vec<String> = vec!["demo-trainer".into(), "--socket".into(), socket.display().to_string()];
    for (flag, value) in [
        ("--job", cfg.job.clone()),
        ("--state-bytes", cfg.state_bytes.to_string()),
        ("--steps", steps.to_string()),
        ("--every", cfg.every.to_string()),
        ("--compute-ms", cfg.compute.as_millis().to_string()),
    ] {
        a.extend([flag.to_string(), value]);
    }
    if let Some(step) = resume {
        a.extend(["--resume".into(), step.to_string()]);
    }
    a
}

/// Reads the trainer's lines up to the first one `done` accepts; returns the lines read.
fn read_until(lines: &mut Lines<BufReader<ChildStdout>>, done: impl Fn(&str) -> bool) -> anyhow::Result<Vec<String>> {
    let mut seen = Vec::new();
    for l in lines {
        let l = l.context("cannot read the trainer's output")?;
        let stop = done(&l);
        seen.push(l);
        if stop {
            return Ok(seen);
        }
    }
    bail!("the trainer exited early; its last lines: {:?}", seen.iter().rev().take(3).collect::<Vec<_>>())
}

fn trainer_lines(p: &mut Proc) -> anyhow::Result<Lines<BufReader<ChildStdout>>> {
    Ok(BufReader::new(p.0.stdout.take().ok_or_else(|| anyhow!("the trainer has no stdout"))?).lines())
}

/// Runs the sidecar demo in `work_dir` (the agent's socket lives there) and prints what happened.
/// The trainer is killed after step `cfg.steps`; the new one trains `2 * cfg.every` steps further.
pub fn run(cfg: &Config, work_dir: &Path, out: &mut dyn Write) -> anyhow::Result<()> {
    if cfg.steps <= cfg.every {
        return Err(ckptd::Error::Config {
            what: "--steps".into(),
            reason: format!(
                "{} is not above --every {}: the trainer must have saved before it is killed",
                cfg.steps, cfg.every
            ),
        }
        .into());
    }
    let total = cfg.steps + 2 * cfg.every;
    std::fs::create_dir_all(work_dir).with_context(|| format!("cannot create {}", work_dir.display()))?;
    let socket = work_dir.join("agent.sock");
    let arena = Scratch(cfg.arena_dir.clone().unwrap_or_else(|| {
        // Memory-backed when the machine has /dev/shm, as in a pod with a medium: Memory emptyDir.
        let shm = Path::new("/dev/shm");
        if shm.is_dir() { shm.join(format!("ckptd-demo-{}", std::process::id())) } else { work_dir.join("arena") }
    }));
    let mut agent_args = vec!["agent".to_string()];
    for (flag, value) in [
        ("--socket", socket.display().to_string()),
        ("--store", cfg.store.clone()),
        ("--job", cfg.job.clone()),
        ("--arena-dir", arena.0.display().to_string()),
        ("--compression", cfg.compression.to_string()),
        ("--keep", cfg.keep.to_string()),
    ] {
        agent_args.extend([flag.to_string(), value]);
    }
    let mut agent = spawn(&agent_args, Stdio::null())?;
    let started = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if let Some(status) = agent.0.try_wait()? {
            bail!("the agent exited at start-up ({status})");
        }
        ensure!(started.elapsed() < Duration::from_secs(30), "the agent did not listen within 30 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    writeln!(out, "agent pid {} serving {} on {}", agent.0.id(), cfg.job, socket.display())?;

    let mut first = spawn(&trainer_args(cfg, total, &socket, None), Stdio::piped())?;
    let kill_at = format!("step {}", cfg.steps);
    let seen = read_until(&mut trainer_lines(&mut first)?, |l| l == kill_at)?;
    // `step S: save stall U us` lines; every save printed before the kill line was fenced, so the
    // agent owns it.
    let saves: Vec<(u64, u64)> = seen
        .iter()
        .filter_map(|l| {
            let (step, stall) = l.strip_prefix("step ")?.split_once(": save stall ")?;
            Some((step.parse().ok()?, stall.strip_suffix(" us")?.parse().ok()?))
        })
        .collect();
    let last_saved = saves.last().map(|&(step, _)| step);
    first.0.kill().context("cannot kill the trainer")?;
    let killed = Instant::now();
    first.0.wait().context("cannot reap the trainer")?;
    writeln!(out, "trainer pid {} SIGKILLed at step {} after {} saves", first.0.id(), cfg.steps, saves.len())?;

    let mut second = spawn(&trainer_args(cfg, total, &socket, last_saved), Stdio::piped())?;
    let mut lines = trainer_lines(&mut second)?;
    let restored = read_until(&mut lines, |l| l.starts_with("restored"))?.pop().unwrap_or_default();
    let resumed = killed.elapsed();
    read_until(&mut lines, |l| l.starts_with("verified"))?;
    let last = format!("step {total}");
    read_until(&mut lines, |l| l == last)?;
    let status = second.0.wait().context("cannot wait for the trainer")?;
    ensure!(status.success(), "the resumed trainer failed ({status})");
    writeln!(out, "new trainer {restored}; state checked bitwise against a recomputation")?;
    let mut stalls: Vec<u64> = saves.iter().map(|&(_, stall)| stall).collect();
    stalls.sort_unstable();
    let median = stalls.get(stalls.len() / 2).copied().unwrap_or(0);
    let mib = cfg.state_bytes >> 20;
    writeln!(out, "save stall (median of {}): {:.2} ms for {mib} MiB", stalls.len(), median as f64 / 1e3)?;
    writeln!(out, "time from SIGKILL to restored in a new process: {:.0} ms", resumed.as_secs_f64() * 1e3)?;
    writeln!(out, "trained to step {total} like an uninterrupted run; stopping the agent")?;
    // SAFETY: kill(2) on our own child, which has not been reaped.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    agent.0.wait().context("cannot wait for the agent")?;
    Ok(())
}
