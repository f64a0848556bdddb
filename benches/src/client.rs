//! ckptd measured through its own Rust client (`ckptd::client::Checkpointer`), in embedded and
//! sidecar mode, so that `compare` has ckptd rows on any machine, with or without torch.
//!
//! Each system and size runs in a child process (this binary's hidden `client-child` subcommand),
//! so that its peak RSS is its own, as `compare.py` does for the Python systems. The child holds a
//! training state of host tensors and measures, on a `file://` store in `--dir`:
//!
//! - `save_stall`: the `save()` call; `copy_done`: until the copies have read the tensors
//!   (`fence`); `durable`: until the save's handle says durable (committed);
//! - `restore_memory`: `load()` of the newest step, answered by the arena;
//! - `restore_storage`: `load()` by a new embedded checkpointer with an empty arena, after the
//!   store's files were dropped from the page cache (what a replacement node sees);
//! - peak RSS over the state: `VmHWM` after the saves, less `VmRSS` before the first save (the
//!   arena's touched pages count: they are host memory the trainer maps).
//!
//! Sidecar mode starts `ckptd agent` from the same target directory, with the flags `compare.py`
//! gives it.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child as Process, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ckpt_core::copy::Device;
use ckpt_core::{DType, FileIo, Priority};
use ckptd::client::{Checkpointer, CheckpointerConfig, TensorRef};
use serde_json::{Value, json};

use crate::engine::{evict_tree, noise, prefault, spread};

/// The Rust-client systems: (key, what the child runs).
pub const SYSTEMS: [&str; 2] = ["ckptd-rust", "ckptd-sidecar-rust"];
/// Tensors the state is cut into.
const TENSORS: usize = 4;
const JOB: &str = "bench";
/// A step number no timed save uses: the restores read it.
const KEEP_STEP: u64 = 1000;
/// How long the agent may take to listen.
const AGENT_START: Duration = Duration::from_secs(30);

/// What one child measures.
#[derive(Debug, Clone, clap::Args)]
pub struct ChildArgs {
    /// `ckptd-rust` or `ckptd-sidecar-rust`.
    #[arg(long)]
    pub system: String,
    /// State bytes.
    #[arg(long)]
    pub size: u64,
    /// Repetitions of every measurement.
    #[arg(long)]
    pub reps: usize,
    /// Where the store and the work files go.
    #[arg(long)]
    pub dir: PathBuf,
    /// Where `ckptd` is (sidecar mode).
    #[arg(long)]
    pub bin_dir: PathBuf,
    /// Where the records go (JSON).
    #[arg(long)]
    pub result: PathBuf,
}

/// A training state: `TENSORS` byte tensors in one host buffer, every page touched.
pub(crate) struct State {
    buf: Vec<u8>,
}

impl State {
    pub(crate) fn new(size: u64) -> anyhow::Result<State> {
        let n = usize::try_from(size).context("the state does not fit in memory")?;
        Ok(State { buf: noise(n) })
    }

    pub(crate) fn len(&self) -> u64 {
        self.buf.len() as u64
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The tensors, as the client sees them.
    pub(crate) fn refs(&mut self) -> Vec<TensorRef> {
        let n = self.buf.len();
        let piece = n.div_ceil(TENSORS).max(1);
        let base = self.buf.as_mut_ptr() as u64;
        (0..n.div_ceil(piece))
            .map(|i| {
                let start = i * piece;
                let len = piece.min(n - start);
                TensorRef {
                    name: format!("layer{i}.weight"),
                    dtype: DType::U8,
                    shape: vec![len as u64],
                    addr: base + start as u64,
                    device: Device::Cpu,
                }
            })
            .collect()
    }

    fn crc(&self) -> u32 {
        crc32c::crc32c(&self.buf)
    }
}

/// The times of one save.
pub(crate) struct Saved {
    pub call: Duration,
    pub copied: Duration,
    pub durable: Duration,
}

/// Saves `state` as `step` and waits until it is durable.
pub(crate) fn save_once(ck: &Checkpointer, refs: &[TensorRef], step: u64) -> anyhow::Result<Saved> {
    let t = Instant::now();
    // SAFETY: `refs` point into a live `State` that nothing writes until `wait` returns below.
    let handle = unsafe { ck.save(refs, step, Vec::new(), None) }.context("save")?;
    let call = t.elapsed();
    ck.fence(None).context("fence")?;
    let copied = t.elapsed();
    handle.wait().context("wait for the save to be durable")?;
    Ok(Saved { call, copied, durable: t.elapsed() })
}

/// An embedded checkpointer's configuration on the `file://` store at `store`.
pub(crate) fn embedded(store: &Path, arena_dir: &Path) -> CheckpointerConfig {
    let mut cfg = CheckpointerConfig::new(JOB);
    cfg.store = Some(format!("file://{}", store.display()));
    cfg.rank = Some(0);
    cfg.world_size = Some(1);
    cfg.arena_dir = Some(arena_dir.to_path_buf());
    cfg
}

/// A fresh arena directory in `/dev/shm` (memory-backed, as in production), unique to this process.
pub(crate) fn arena_dir(tag: &str) -> PathBuf {
    PathBuf::from(format!("/dev/shm/ckptd-bench-{}-{tag}", std::process::id()))
}

/// `ckptd agent` serving one job on `socket`; stopped (SIGTERM, then waited for) on drop.
struct Agent {
    process: Process,
}

impl Agent {
    fn start(bin_dir: &Path, socket: &Path, store: &Path, arena_dir: &Path, log: &Path) -> anyhow::Result<Agent> {
        let binary = bin_dir.join("ckptd");
        if !binary.exists() {
            bail!(
                "{} is missing: build it with `cargo build --release -p ckptd --bins` or set CKPTD_BIN_DIR",
                binary.display()
            );
        }
        let log = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let process = Command::new(&binary)
            .arg("agent")
            .arg("--socket")
            .arg(socket)
            .arg("--store")
            .arg(format!("file://{}", store.display()))
            .args(["--job", JOB])
            .arg("--arena-dir")
            .arg(arena_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let mut agent = Agent { process };
        let deadline = Instant::now() + AGENT_START;
        while UnixStream::connect(socket).is_err() {
            if let Some(status) = agent.process.try_wait()? {
                bail!("the ckptd agent exited at start-up ({status})");
            }
            if Instant::now() > deadline {
                bail!("the ckptd agent did not listen on {} within {AGENT_START:?}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(agent)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.process.id()) {
            // SAFETY: kill has no memory effects; the pid is our own child, not yet waited for.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = self.process.wait();
    }
}

/// `/proc/self/status` field `key` in bytes.
pub(crate) fn proc_status(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))?;
    let kb: u64 = line[key.len() + 1..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// Resets `VmHWM` to the current RSS; false where the kernel does not allow it.
fn reset_hwm() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Runs one system at one size in a child process; returns its records, or why it could not run.
pub fn measure(system: &str, size: u64, reps: usize, dir: &Path, bin_dir: &Path) -> Result<Vec<Value>, String> {
    run_self(|cmd, result| {
        cmd.args(["client-child", "--system", system, "--size", &size.to_string(), "--reps", &reps.to_string()])
            .arg("--dir")
            .arg(dir)
            .arg("--bin-dir")
            .arg(bin_dir)
            .arg("--result")
            .arg(result);
    })
}

/// Runs this executable as a child with the arguments `args` adds (given the path of the result
/// file it must write), with none of the `CKPTD_` settings that would change what it measures
/// (the child chooses its mode and settings itself), and returns the records it wrote, or why it
/// could not run (its last line on stderr).
fn run_self(args: impl FnOnce(&mut Command, &Path)) -> Result<Vec<Value>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let result = tempfile::NamedTempFile::new().map_err(|e| format!("cannot create a result file: {e}"))?;
    let mut cmd = Command::new(&exe);
    args(&mut cmd, result.path());
    let out = cmd
        .env_remove("CKPTD_SOCKET")
        .env_remove("CKPTD_PERSIST_PRIORITY")
        .env_remove("CKPTD_PERSIST_IO")
        .env_remove("CKPTD_COPY_THREADS")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(err.lines().last().unwrap_or("failed without a message").to_string());
    }
    let text = std::fs::read_to_string(result.path()).map_err(|e| format!("read the child's result: {e}"))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("the child's result is not JSON: {e}"))?;
    Ok(v["records"].as_array().cloned().unwrap_or_default())
}

/// The child: measures `args.system` and writes its records to `args.result`.
pub fn child(args: &ChildArgs) -> anyhow::Result<()> {
    let sidecar = match args.system.as_str() {
        "ckptd-rust" => false,
        "ckptd-sidecar-rust" => true,
        other => bail!("unknown system {other}: use one of {}", SYSTEMS.join(", ")),
    };
    let work = tempfile::Builder::new().prefix("ckptd-client-").tempdir_in(&args.dir).context("create a work dir")?;
    let store = work.path().join("store");
    let arena = arena_dir(&args.system);
    let result = run_child(args, sidecar, work.path(), &store, &arena);
    let _ = std::fs::remove_dir_all(&arena);
    let records = result?;
    let text = serde_json::to_string(&json!({ "records": records }))?;
    std::fs::write(&args.result, text).with_context(|| format!("write {}", args.result.display()))
}

fn run_child(args: &ChildArgs, sidecar: bool, work: &Path, store: &Path, arena: &Path) -> anyhow::Result<Vec<Value>> {
    let mut state = State::new(args.size)?;
    let refs = state.refs();
    let want = state.crc();
    let rss0 = proc_status("VmRSS");
    let hwm = reset_hwm();
    let mut samples: Vec<(&str, Vec<f64>)> = [
        "save_stall",
        "copy_done",
        "durable",
        "restore_memory",
        "restore_storage",
        "first_durable",
        "first_durable_hint",
    ]
    .map(|m| (m, Vec::new()))
    .into();
    let mut add = |metric: &str, d: Duration| {
        if let Some((_, v)) = samples.iter_mut().find(|(m, _)| *m == metric) {
            v.push(d.as_secs_f64());
        }
    };

    let mut cfg = embedded(store, arena);
    // Declared before the checkpointer so that it outlives it (drops run in reverse).
    let _agent = if sidecar {
        let socket = work.join("agent.sock");
        let agent = Agent::start(&args.bin_dir, &socket, store, arena, &work.join("agent.log"))?;
        cfg.socket = Some(socket);
        Some(agent)
    } else {
        None
    };
    let ck = Checkpointer::new(cfg).context("open the checkpointer")?;
    // The first save creates the arena: timed apart (`first_durable`), not among the steady saves.
    let first = save_once(&ck, &refs, 1)?;
    add("first_durable", first.durable);
    for rep in 0..args.reps {
        let s = save_once(&ck, &refs, 2 + rep as u64)?;
        add("save_stall", s.call);
        add("copy_done", s.copied);
        add("durable", s.durable);
    }
    let peak = match (hwm, rss0, proc_status("VmHWM")) {
        (true, Some(before), Some(high)) => Some(high.saturating_sub(before)),
        _ => None,
    };
    save_once(&ck, &refs, KEEP_STEP)?;
    for _ in 0..args.reps {
        let t = Instant::now();
        // SAFETY: `refs` point into `state`, which nothing else touches during the load.
        let loaded = unsafe { ck.load(&refs, Some(KEEP_STEP), None) }.context("load from the memory tier")?;
        let d = t.elapsed();
        if loaded.from_memory {
            add("restore_memory", d);
        }
    }
    anyhow::ensure!(state.crc() == want, "a load from the memory tier returned other bytes than were saved");
    ck.close().context("close the checkpointer")?;
    drop(ck);
    drop(_agent);

    // From storage: a new embedded checkpointer with an empty arena, the store's pages dropped.
    // The sidecar's store is read the same way: storage restores take the same engine path.
    // The host memory a restore from storage takes beyond the tensors it fills (the highest of
    // the repetitions, each from a fresh checkpointer).
    let mut restore_peak: Option<u64> = None;
    for rep in 0..args.reps {
        let fresh = arena_dir(&format!("{}-cold{rep}", args.system));
        let ck = Checkpointer::new(embedded(store, &fresh)).context("open a fresh checkpointer")?;
        evict_tree(store)?;
        let before = proc_status("VmRSS").filter(|_| reset_hwm());
        let t = Instant::now();
        // SAFETY: as above.
        let loaded = unsafe { ck.load(&refs, Some(KEEP_STEP), None) }.context("load from storage")?;
        let d = t.elapsed();
        if let (Some(before), Some(high)) = (before, proc_status("VmHWM")) {
            restore_peak = Some(restore_peak.unwrap_or(0).max(high.saturating_sub(before)));
        }
        ck.close().context("close the checkpointer")?;
        drop(ck);
        let _ = std::fs::remove_dir_all(&fresh);
        if !loaded.from_memory {
            add("restore_storage", d);
        }
        anyhow::ensure!(state.crc() == want, "a load from storage returned other bytes than were saved");
    }
    // Embedded with a size hint: the arena is made and faulted in at construction (the script
    // builds its model meanwhile; here we wait for it), so the first save is timed against a
    // prepared arena.
    if !sidecar {
        let hinted_store = work.join("store-hint");
        let hinted_arena = arena_dir(&format!("{}-hint", args.system));
        let mut cfg = embedded(&hinted_store, &hinted_arena);
        cfg.size_hint = Some(state.len());
        let ck = Checkpointer::new(cfg).context("open a checkpointer with a size hint")?;
        let t = Instant::now();
        while !ck.arena_ready() {
            anyhow::ensure!(t.elapsed() < Duration::from_secs(600), "the hinted arena was not prepared in 10 minutes");
            std::thread::sleep(Duration::from_millis(10));
        }
        add("first_durable_hint", save_once(&ck, &refs, 1)?.durable);
        ck.close().context("close the hinted checkpointer")?;
        drop(ck);
        let _ = std::fs::remove_dir_all(&hinted_arena);
        let _ = std::fs::remove_dir_all(&hinted_store);
    }

    Ok(samples
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(metric, v)| {
            let (median, min, max) = spread(&v);
            let mut r = json!({
                "system": args.system, "size_bytes": state.len(), "metric": metric,
                "median_s": median, "min_s": min, "max_s": max, "n": v.len(),
            });
            match (metric, peak, restore_peak) {
                ("save_stall", Some(p), _) | ("restore_storage", _, Some(p)) => r["peak_rss_bytes"] = json!(p),
                _ => {}
            }
            r
        })
        .collect())
}

/// The training-step stall: what a CPU-bound training step pays while a save is in flight.
pub mod stall {
    use super::*;

    /// Settings compared: (priority, file write mode). Normal priority with buffered writes is how
    /// ckptd persisted before `O_DIRECT` and the priority option; write-behind at the default
    /// priority is the alternative to `O_DIRECT`.
    pub const VARIANTS: [(Priority, FileIo); 5] = [
        (Priority::Normal, FileIo::Buffered),
        (Priority::Normal, FileIo::Direct),
        (Priority::Nice, FileIo::Direct),
        (Priority::Idle, FileIo::Direct),
        (Priority::Nice, FileIo::WriteBehind),
    ];
    /// The step's target length: a few ms of arithmetic, like a small CPU training step.
    const STEP_TARGET: Duration = Duration::from_millis(10);
    /// Bytes the step works over (fits in a core's L2, so the step is compute, not memory).
    const STEP_BUFFER: usize = 256 << 10;
    /// Steps timed without a save before the first one (the step's own time, reported).
    const BASELINE_STEPS: usize = 60;
    /// Steps between one save's durability and the next save.
    const GAP_STEPS: usize = 10;

    /// The system key of a variant's records.
    pub fn system(priority: Priority, io: FileIo) -> String {
        format!("step-stall:{priority}:{io}")
    }

    /// What one step-stall child measures.
    #[derive(Debug, Clone, clap::Args)]
    pub struct StallArgs {
        /// State bytes.
        #[arg(long)]
        pub size: u64,
        /// Saves measured.
        #[arg(long)]
        pub reps: usize,
        /// Where the store goes.
        #[arg(long)]
        pub dir: PathBuf,
        /// Persist priority: normal, nice or idle.
        #[arg(long)]
        pub priority: String,
        /// File write mode: direct, write-behind or buffered.
        #[arg(long)]
        pub file_io: String,
        /// Where the records go (JSON).
        #[arg(long)]
        pub result: PathBuf,
    }

    /// One training step: `passes` rounds of integer arithmetic over `buf`, on this thread.
    fn step(buf: &mut [u64], passes: usize) {
        for p in 0..passes {
            let mut acc = p as u64;
            for x in buf.iter_mut() {
                acc = acc.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(*x);
                *x = acc ^ (acc >> 29);
            }
        }
        std::hint::black_box(buf);
    }

    fn timed_step(buf: &mut [u64], passes: usize) -> Duration {
        let t = Instant::now();
        step(buf, passes);
        t.elapsed()
    }

    /// Runs one variant at one size in a child process; returns its records, or why not.
    pub fn measure(size: u64, reps: usize, dir: &Path, priority: Priority, io: FileIo) -> Result<Vec<Value>, String> {
        run_self(|cmd, result| {
            cmd.args(["step-stall-child", "--size", &size.to_string(), "--reps", &reps.to_string()])
                .args(["--priority", &priority.to_string(), "--file-io", &io.to_string()])
                .arg("--dir")
                .arg(dir)
                .arg("--result")
                .arg(result);
        })
    }

    /// The child: a step loop timed without saves, then with a save in flight.
    ///
    /// For each save, the slowdown is the `save()` call plus the time of every step that ran while
    /// the save was in flight (until its handle said durable), less the time of as many steps run
    /// right after it with nothing in flight. It is reported in seconds per save, with one memcpy of the state measured in the
    /// same process for scale.
    pub fn child(args: &StallArgs) -> anyhow::Result<()> {
        let priority: Priority = args.priority.parse()?;
        let io: FileIo = args.file_io.parse()?;
        let work =
            tempfile::Builder::new().prefix("ckptd-stall-").tempdir_in(&args.dir).context("create a work dir")?;
        let arena = arena_dir(&format!("stall-{priority}-{io}"));
        let result = run(args, priority, io, &work.path().join("store"), &arena);
        let _ = std::fs::remove_dir_all(&arena);
        let records = result?;
        let text = serde_json::to_string(&json!({ "records": records }))?;
        std::fs::write(&args.result, text).with_context(|| format!("write {}", args.result.display()))
    }

    fn run(args: &StallArgs, priority: Priority, io: FileIo, store: &Path, arena: &Path) -> anyhow::Result<Vec<Value>> {
        let mut state = State::new(args.size)?;
        let refs = state.refs();
        let mut copy = vec![0u8; state.bytes().len()];
        prefault(&mut copy);
        let mut memcpy = Vec::new();
        for _ in 0..args.reps.max(3) {
            let t = Instant::now();
            copy.copy_from_slice(state.bytes());
            memcpy.push(t.elapsed().as_secs_f64());
            std::hint::black_box(&mut copy);
        }
        drop(copy);

        let mut buf: Vec<u64> = (0..STEP_BUFFER / 8).map(|i| i as u64).collect();
        let one = (0..5).map(|_| timed_step(&mut buf, 1)).min().unwrap_or(Duration::from_micros(100));
        let passes = (STEP_TARGET.as_secs_f64() / one.as_secs_f64().max(1e-6)).ceil().max(1.0) as usize;

        let mut cfg = embedded(store, arena);
        cfg.engine.persist.priority = priority;
        cfg.engine.persist.file_io = io;
        let ck = Checkpointer::new(cfg).context("open the checkpointer")?;
        save_once(&ck, &refs, 1)?; // creates the arena
        let mut base: Vec<f64> = (0..BASELINE_STEPS).map(|_| timed_step(&mut buf, passes).as_secs_f64()).collect();

        let (mut slowdown, mut calls, mut windows, mut overlapped) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for rep in 0..args.reps {
            let t = Instant::now();
            // SAFETY: `refs` point into `state`, which the step never writes; the handle says
            // done only once the copies have read it and the save is durable.
            let handle = unsafe { ck.save(&refs, 2 + rep as u64, Vec::new(), None) }.context("save")?;
            let call = t.elapsed().as_secs_f64();
            let mut during = 0.0;
            let mut steps = 0usize;
            while !handle.done() {
                during += timed_step(&mut buf, passes).as_secs_f64();
                steps += 1;
            }
            handle.wait().context("wait for the save to be durable")?;
            windows.push(t.elapsed().as_secs_f64());
            // The control: as many steps right after, with nothing in flight. Paired in time, it
            // cancels the load other processes put on the host, which drifts over seconds.
            let control: Vec<f64> = (0..steps).map(|_| timed_step(&mut buf, passes).as_secs_f64()).collect();
            // Not clamped at zero: noise either way is part of the spread.
            slowdown.push(call + during - control.iter().sum::<f64>());
            base.extend(control);
            calls.push(call);
            overlapped.push(steps as f64);
            for _ in 0..GAP_STEPS {
                step(&mut buf, passes);
            }
        }
        ck.wait_all().context("wait for the saves")?;
        ck.close().context("close the checkpointer")?;

        let system = system(priority, io);
        let rec = |metric: &str, v: &[f64]| {
            let (median, min, max) = spread(v);
            json!({
                "system": system, "size_bytes": state.len(), "metric": metric,
                "median_s": median, "min_s": min, "max_s": max, "n": v.len(),
            })
        };
        Ok(vec![
            rec("slowdown", &slowdown),
            rec("save_call", &calls),
            rec("window", &windows),
            rec("step", &base),
            rec("memcpy", &memcpy),
            // Not seconds: the number of steps that overlapped a save.
            rec("steps_overlapped", &overlapped),
        ])
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_child_times_steps_with_and_without_a_save_in_flight() {
            let dir = tempfile::tempdir().unwrap();
            let result = dir.path().join("r.json");
            let args = StallArgs {
                size: 4 << 20,
                reps: 2,
                dir: dir.path().into(),
                priority: "nice".into(),
                file_io: "direct".into(),
                result: result.clone(),
            };
            child(&args).unwrap();
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
            let recs = v["records"].as_array().unwrap();
            let metric = |m: &str| recs.iter().find(|r| r["metric"] == m).unwrap_or_else(|| panic!("{m}: {v}"));
            for m in ["slowdown", "save_call", "window", "step", "memcpy", "steps_overlapped"] {
                assert_eq!(metric(m)["system"], "step-stall:nice:direct");
                assert_eq!(metric(m)["size_bytes"], 4 << 20);
            }
            assert_eq!(metric("slowdown")["n"], 2, "one figure per save");
            // The baseline, then the control steps that followed each save.
            assert!(metric("step")["n"].as_u64().unwrap() >= BASELINE_STEPS as u64);
            assert!(metric("window")["min_s"].as_f64().unwrap() > 0.0);
            let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert_eq!(left, vec![std::ffi::OsString::from("r.json")], "the work dir is removed");
        }

        #[test]
        fn a_step_is_deterministic_work_that_scales_with_passes() {
            let mut a: Vec<u64> = (0..1024).collect();
            let mut b = a.clone();
            step(&mut a, 3);
            step(&mut b, 3);
            assert_eq!(a, b);
            let mut c: Vec<u64> = (0..1024).collect();
            step(&mut c, 1);
            assert_ne!(a, c, "more passes, other result: the work is not skipped");
        }
    }
}

/// Prints the headline of a child's records: the time to durable, or the step time lost per save.
pub fn summary(out: &mut dyn Write, records: &[Value]) -> std::io::Result<()> {
    let find = |m: &str| records.iter().find(|r| r["metric"] == m).and_then(|r| r["median_s"].as_f64());
    match (find("durable"), find("slowdown"), find("memcpy")) {
        (Some(d), _, _) => writeln!(out, "    durable in {:.1} ms (median)", d * 1e3),
        (None, Some(s), Some(c)) if c > 0.0 => writeln!(
            out,
            "    {:.1} ms of step time per save (median), {:.0}% of one copy ({:.1} ms)",
            s * 1e3,
            100.0 * s / c,
            c * 1e3
        ),
        _ => writeln!(out, "    no headline figure in the records"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(system: &str, bin_dir: &Path) -> anyhow::Result<Vec<Value>> {
        let dir = tempfile::tempdir().unwrap();
        let result = dir.path().join("r.json");
        let args = ChildArgs {
            system: system.into(),
            size: 2 << 20,
            reps: 2,
            dir: dir.path().into(),
            bin_dir: bin_dir.into(),
            result: result.clone(),
        };
        child(&args)?;
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&result)?)?;
        Ok(v["records"].as_array().cloned().unwrap_or_default())
    }

    #[test]
    fn the_embedded_child_measures_saves_and_both_restores() {
        let recs = run("ckptd-rust", Path::new("/nonexistent")).unwrap();
        let metrics: Vec<&str> = recs.iter().filter_map(|r| r["metric"].as_str()).collect();
        // restore_memory only counts loads the arena answered, restore_storage only loads that
        // read the store: a missing one means the load took the other path.
        assert_eq!(
            metrics,
            [
                "save_stall",
                "copy_done",
                "durable",
                "restore_memory",
                "restore_storage",
                "first_durable",
                "first_durable_hint"
            ]
        );
        for r in &recs {
            // The first saves are one each; the rest are the repetitions.
            let n = if r["metric"].as_str().is_some_and(|m| m.starts_with("first_")) { 1 } else { 2 };
            assert_eq!(
                (r["system"].as_str(), r["size_bytes"].as_u64(), r["n"].as_u64()),
                (Some("ckptd-rust"), Some(2 << 20), Some(n))
            );
        }
        let stall = &recs[0];
        if std::path::Path::new("/proc/self/clear_refs").exists() {
            assert!(stall["peak_rss_bytes"].as_u64().unwrap() > 0, "the arena's pages count: {stall}");
            assert!(recs[4]["peak_rss_bytes"].is_u64(), "the storage restore's memory is measured: {}", recs[4]);
        }
    }

    #[test]
    fn a_sidecar_child_without_the_agent_binary_says_how_to_build_it() {
        let e = run("ckptd-sidecar-rust", Path::new("/nonexistent")).unwrap_err();
        assert!(format!("{e:#}").contains("cargo build --release -p ckptd --bins"), "{e:#}");
    }

    #[test]
    fn the_state_is_cut_into_tensors_that_cover_it() {
        let mut s = State::new(10_001).unwrap();
        let refs = s.refs();
        assert_eq!(refs.len(), TENSORS);
        let total: u64 = refs.iter().map(|r| r.shape[0]).sum();
        assert_eq!(total, 10_001);
        assert!(refs.windows(2).all(|w| w[0].addr + w[0].shape[0] == w[1].addr), "contiguous, in order");
    }
}
