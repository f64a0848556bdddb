//! `ckptd demo --mode sidecar`: the sidecar path end to end on one machine. It starts a real agent
//! process and a trainer process, SIGKILLs the trainer mid-run, starts a new trainer that restores
//! from the agent's memory, checks the restored state bitwise and prints the time from the kill
//! to training resumed.
//!
//! The trainer is this binary again (`ckptd demo-trainer`, hidden). Its state at step `s` is a pure
//! function of `s`, so the new trainer checks what it restored against a recomputation, without
//! trusting the saved bytes.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ckpt_core::DType;
use ckpt_core::copy::Device;

use crate::client::{Checkpointer, CheckpointerConfig, Phase, TensorRef};
use crate::error::{Error, Result};

/// Settings of the sidecar demo.
#[derive(Debug, Clone)]
pub struct Config {
    /// Store URL for the agent.
    pub store: String,
    /// Job name.
    pub job: String,
    /// State size in bytes.
    pub state_bytes: u64,
    /// Steps before the trainer is killed.
    pub kill_after: u64,
    /// Steps of the whole run.
    pub steps: u64,
    /// Checkpoint every this many steps.
    pub every: u64,
    /// Simulated compute per step.
    pub compute: Duration,
    /// Working directory for the socket and the arena.
    pub work_dir: PathBuf,
}

/// Settings of one demo trainer process.
#[derive(Debug, Clone)]
pub struct TrainerConfig {
    /// The agent's socket.
    pub socket: PathBuf,
    /// Job name.
    pub job: String,
    /// State size in bytes.
    pub state_bytes: u64,
    /// Last step to train.
    pub steps: u64,
    /// Checkpoint every this many steps.
    pub every: u64,
    /// Simulated compute per step.
    pub compute: Duration,
    /// Restore the newest committed step first.
    pub resume: bool,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| ckpt_core::Error::Io { op, path, source }.into()
}

/// The value of element `i` of the state after `step` (a cheap, well-mixed function).
fn value(step: u64, i: usize) -> f32 {
    let mut z = step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^= z >> 31;
    z = z.wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z >> 40) as f32) / (1u64 << 24) as f32
}

struct Model {
    weights: Vec<f32>,
    step: Vec<i64>,
}

impl Model {
    fn new(bytes: u64) -> Model {
        Model { weights: vec![0.0; (bytes / 4).max(1) as usize], step: vec![0] }
    }

    fn train_to(&mut self, step: u64) {
        for (i, w) in self.weights.iter_mut().enumerate() {
            *w = value(step, i);
        }
        self.step[0] = step as i64;
    }

    fn is_at(&self, step: u64) -> bool {
        self.step[0] == step as i64
            && self.weights.iter().enumerate().all(|(i, w)| w.to_bits() == value(step, i).to_bits())
    }

    fn refs(&mut self) -> Vec<TensorRef> {
        vec![
            TensorRef {
                name: "model/weights".into(),
                dtype: DType::F32,
                shape: vec![self.weights.len() as u64],
                addr: self.weights.as_mut_ptr() as u64,
                device: Device::Cpu,
            },
            TensorRef {
                name: "step".into(),
                dtype: DType::I64,
                shape: vec![],
                addr: self.step.as_mut_ptr() as u64,
                device: Device::Cpu,
            },
        ]
    }
}

/// Runs one trainer: prints `step N`, `saved N stall_us U`, `restored N memory=B load_ms M` and
/// `verified N` lines on `out`.
pub fn trainer(cfg: &TrainerConfig, out: &mut dyn Write) -> Result<()> {
    let mut ck_cfg = CheckpointerConfig::new(cfg.job.clone());
    ck_cfg.socket = Some(cfg.socket.clone());
    let ck = Checkpointer::new(ck_cfg)?;
    let mut model = Model::new(cfg.state_bytes);
    let mut start = 1;
    let line = |out: &mut dyn Write, s: String| {
        writeln!(out, "{s}").and_then(|()| out.flush()).map_err(io("write", Path::new("stdout")))
    };
    if cfg.resume {
        ck.heartbeat(0, Phase::CheckpointLoad)?;
        let t = Instant::now();
        // SAFETY: `model` is ours alone during the load.
        let loaded = unsafe { ck.load(&model.refs(), None, None) }?;
        line(
            out,
            format!(
                "restored {} memory={} load_ms {:.1}",
                loaded.step,
                loaded.from_memory,
                t.elapsed().as_secs_f64() * 1e3
            ),
        )?;
        if !model.is_at(loaded.step) {
            return Err(ckpt_core::Error::Cancelled {
                reason: format!("restored state differs from step {}", loaded.step),
            }
            .into());
        }
        line(out, format!("verified {}", loaded.step))?;
        start = loaded.step + 1;
    }
    for step in start..=cfg.steps {
        ck.fence(None)?;
        std::thread::sleep(cfg.compute);
        model.train_to(step);
        ck.heartbeat(step, Phase::Step)?;
        line(out, format!("step {step}"))?;
        if step % cfg.every == 0 {
            let t = Instant::now();
            // SAFETY: `model` is written again only after the `fence` at the top of the next step.
            unsafe { ck.save(&model.refs(), step, Vec::new(), None) }?;
            let stall = t.elapsed();
            line(out, format!("saved {step} stall_us {}", stall.as_micros()))?;
        }
    }
    ck.close()
}

struct Proc {
    child: Child,
    what: &'static str,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn(what: &'static str, args: &[String], stdout: Stdio) -> Result<Proc> {
    let exe = std::env::current_exe().map_err(io("locate the ckptd binary", Path::new("ckptd")))?;
    let child =
        Command::new(&exe).args(args).stdout(stdout).stderr(Stdio::inherit()).spawn().map_err(io("start", &exe))?;
    Ok(Proc { child, what })
}

fn trainer_args(cfg: &Config, socket: &Path, resume: bool) -> Vec<String> {
    let mut a = vec![
        "demo-trainer".to_string(),
        "--socket".into(),
        socket.display().to_string(),
        "--job".into(),
        cfg.job.clone(),
        "--state-bytes".into(),
        cfg.state_bytes.to_string(),
        "--steps".into(),
        cfg.steps.to_string(),
        "--every".into(),
        cfg.every.to_string(),
        "--compute-ms".into(),
        cfg.compute.as_millis().to_string(),
    ];
    if resume {
        a.push("--resume".into());
    }
    a
}

/// Reads the trainer's lines until `done` says stop; returns the lines read.
fn read_until(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    what: &str,
    mut done: impl FnMut(&str) -> bool,
) -> Result<Vec<String>> {
    let mut seen = Vec::new();
    for l in lines {
        let l = l.map_err(io("read the trainer's output", Path::new("pipe")))?;
        let stop = done(&l);
        seen.push(l);
        if stop {
            return Ok(seen);
        }
    }
    Err(ckpt_core::Error::Cancelled { reason: format!("the trainer exited before {what}") }.into())
}

/// Runs the sidecar demo and prints what happened.
pub fn run(cfg: &Config, out: &mut dyn Write) -> Result<()> {
    if cfg.every == 0 || cfg.kill_after <= cfg.every || cfg.kill_after >= cfg.steps {
        return Err(Error::Config {
            what: "demo steps".into(),
            reason: format!(
                "need every ({}) < kill point ({}) < steps ({}): the trainer must have saved before it is killed",
                cfg.every, cfg.kill_after, cfg.steps
            ),
        });
    }
    let p = |out: &mut dyn Write, s: String| writeln!(out, "{s}").map_err(io("write", Path::new("stdout")));
    std::fs::create_dir_all(&cfg.work_dir).map_err(io("create", &cfg.work_dir))?;
    let socket = cfg.work_dir.join("agent.sock");
    // Memory-backed when the machine has /dev/shm, as in a pod with a medium: Memory emptyDir.
    let shm = Path::new("/dev/shm");
    let arena =
        if shm.is_dir() { shm.join(format!("ckptd-demo-{}", std::process::id())) } else { cfg.work_dir.join("arena") };
    let agent_args: Vec<String> = [
        "agent",
        "--socket",
        &socket.display().to_string(),
        "--store",
        &cfg.store,
        "--job",
        &cfg.job,
        "--arena-dir",
        &arena.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut agent = spawn("agent", &agent_args, Stdio::null())?;
    let started = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if let Ok(Some(status)) = agent.child.try_wait() {
            return Err(
                ckpt_core::Error::Cancelled { reason: format!("the agent exited at start-up ({status})") }.into()
            );
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(ckpt_core::Error::Cancelled { reason: "the agent did not listen within 30 s".into() }.into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    p(out, format!("agent pid {} serving {} on {}", agent.child.id(), cfg.job, socket.display()))?;

    let mut first = spawn("trainer", &trainer_args(cfg, &socket, false), Stdio::piped())?;
    let stdout = first.child.stdout.take().ok_or(Error::Closed)?;
    let mut lines = BufReader::new(stdout).lines();
    let kill_at = format!("step {}", cfg.kill_after);
    let seen = read_until(&mut lines, &kill_at, |l| l == kill_at)?;
    let stalls: Vec<u64> =
        seen.iter().filter_map(|l| l.split(" stall_us ").nth(1).and_then(|v| v.parse().ok())).collect();
    let saved: Vec<&str> = seen.iter().filter(|l| l.starts_with("saved")).map(|l| l.as_str()).collect();
    first.child.kill().map_err(io("kill the trainer", Path::new(first.what)))?;
    let killed = Instant::now();
    let _ = first.child.wait();
    p(
        out,
        format!("trainer pid {} SIGKILLed at step {} after {} saves", first.child.id(), cfg.kill_after, saved.len()),
    )?;

    let mut second = spawn("trainer", &trainer_args(cfg, &socket, true), Stdio::piped())?;
    let stdout = second.child.stdout.take().ok_or(Error::Closed)?;
    let mut lines = BufReader::new(stdout).lines();
    let restored = read_until(&mut lines, "restoring", |l| l.starts_with("restored"))?.pop().unwrap_or_default();
    let resumed = killed.elapsed();
    read_until(&mut lines, "verifying", |l| l.starts_with("verified"))?;
    let last = format!("step {}", cfg.steps);
    read_until(&mut lines, &last, |l| l == last)?;
    let status = second.child.wait().map_err(io("wait for the trainer", Path::new(second.what)))?;
    if !status.success() {
        return Err(ckpt_core::Error::Cancelled { reason: format!("the resumed trainer failed ({status})") }.into());
    }
    p(out, format!("new trainer {restored}; state checked bitwise against a recomputation"))?;
    let median_stall = {
        let mut s = stalls.clone();
        s.sort_unstable();
        s.get(s.len() / 2).copied().unwrap_or(0)
    };
    p(
        out,
        format!(
            "save stall (median of {}): {:.2} ms for {} MiB",
            stalls.len(),
            median_stall as f64 / 1e3,
            cfg.state_bytes >> 20
        ),
    )?;
    p(out, format!("time from SIGKILL to restored in a new process: {:.0} ms", resumed.as_secs_f64() * 1e3))?;
    p(out, format!("trained to step {}; stopping the agent", cfg.steps))?;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) };
    let _ = agent.child.wait();
    let _ = std::fs::remove_dir_all(&arena);
    Ok(())
}
