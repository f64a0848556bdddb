//! `ckptd demo`: the checkpoint path end to end through [`Checkpointer`], the API a training script
//! uses, with nothing to set up (no GPU, no cluster, no server).
//!
//! A synthetic trainer ([`state`]) trains and saves every K steps. `save()` returns once the
//! copies into the arena are enqueued, so its duration is the stall a trainer sees; `fence()`
//! before the next optimizer step waits for the copies. Then the trainer "crashes" (its state and
//! its checkpointer are dropped). A fresh checkpointer restores the newest step from the memory
//! tier (the arena, which outlives the process), and after the arena is removed, as when the node
//! is lost, another one restores it from the store. Each restore is compared bitwise with the state
//! recomputed from the seed, and training resumed from it must continue exactly like an
//! uninterrupted run. [`sidecar`] runs the same trainer against a real agent process.

pub mod sidecar;
pub mod state;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, ensure};
use ckpt_core::{Compression, RetentionPolicy};
use ckptd::client::{Checkpointer, CheckpointerConfig, SaveHandle};
use state::State;

/// Directory name of the default store, created in the current directory.
pub const DEFAULT_STORE_DIR: &str = "ckptd-demo-store";
/// Seed of the synthetic state.
pub const SEED: u64 = 0x636b_7074_6420_6465;

/// Smallest state the demo accepts, in MiB.
const MIN_STATE_MIB: u64 = 1;
/// Largest state the demo accepts, in MiB (1 TiB); host memory is checked separately.
const MAX_STATE_MIB: u64 = 1 << 20;

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Store URL (`file:///dir`, `s3://bucket/prefix`, ...) or a bare local path.
    pub store: String,
    /// Job name in the store.
    pub job: String,
    /// Arena directory; `None` is the checkpointer's default (`/dev/shm/ckptd`).
    pub arena_dir: Option<PathBuf>,
    /// Approximate size of the training state in bytes.
    pub state_bytes: u64,
    /// Training steps before the simulated crash.
    pub steps: u64,
    /// Checkpoint every this many steps.
    pub every: u64,
    /// Chunk compression of the persisted shards.
    pub compression: Compression,
    /// Simulated forward + backward time per step, which the checkpoint copies overlap.
    pub compute: Duration,
    /// Committed steps retention keeps (0 keeps everything).
    pub keep: usize,
}

impl Config {
    /// Checks every setting before anything is allocated or written; the error is one line.
    pub fn validate(&self) -> Result<(), String> {
        ckpt_core::store::layout::validate_job(&self.job).map_err(|e| e.to_string())?;
        let mib = self.state_bytes >> 20;
        if !(MIN_STATE_MIB..=MAX_STATE_MIB).contains(&mib) {
            return Err(format!("--state-mib {mib} is outside {MIN_STATE_MIB}..={MAX_STATE_MIB}"));
        }
        if self.every == 0 || self.steps < self.every {
            return Err(format!(
                "--steps {} is less than --every {}: no checkpoint would be taken; raise --steps or lower --every",
                self.steps, self.every
            ));
        }
        if self.compute > Duration::from_secs(60) {
            return Err(format!("--compute-ms {} is above the 60000 ms cap", self.compute.as_millis()));
        }
        // The live state, then the restored state and the recomputed one, plus room for the engine.
        let need = self.state_bytes.saturating_mul(2).saturating_add(256 << 20);
        match mem_available() {
            Some(available) if need > available => Err(format!(
                "the demo needs about {} MiB of host memory for a {mib} MiB state and {} MiB is available: \
                 lower --state-mib",
                need >> 20,
                available >> 20
            )),
            _ => Ok(()),
        }
    }

    fn checkpointer(&self) -> CheckpointerConfig {
        let mut c = CheckpointerConfig::new(self.job.clone());
        c.store = Some(self.store.clone());
        c.arena_dir.clone_from(&self.arena_dir);
        c.engine.persist.compression = self.compression;
        c
    }
}

/// The default store: `./ckptd-demo-store` as an absolute `file://` URL (a bare absolute path
/// when the directory's name would need escaping in a URL).
pub fn default_store(cwd: &Path) -> String {
    let dir = cwd.join(DEFAULT_STORE_DIR);
    match dir.to_str() {
        Some(s) if s.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'%' | b'#' | b'?')) => {
            format!("file://{s}")
        }
        _ => dir.display().to_string(),
    }
}

/// Whether `e` is a configuration problem (exit code 64) rather than a failed run.
pub fn is_config(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ckptd::Error>().is_some_and(|e| e.kind() == ckptd::ErrorKind::Config)
}

/// Runs the embedded demo and writes its report to `out`.
pub fn run(cfg: &Config, out: &mut dyn Write) -> anyhow::Result<()> {
    if cfg.store.starts_with("memory:") {
        let reason = "memory:// dies with the checkpointer that crashes, so nothing could be restored: use a \
                      file:// or object store URL, or --mode sidecar, where the agent holds the store";
        return Err(ckptd::Error::Config { what: "--store".into(), reason: reason.into() }.into());
    }
    let specs = state::specs(cfg.state_bytes);
    let ck = Checkpointer::new(cfg.checkpointer()).map_err(|e| match e.kind() {
        ckptd::ErrorKind::Core(ckpt_core::ErrorKind::InvalidInput) => {
            anyhow!(ckptd::Error::Config { what: "--store".into(), reason: e.to_string() })
        }
        _ => anyhow!(e),
    })?;
    let _arena = Scratch(ck.arena_path().to_path_buf());
    let base = ck.latest_step()?.unwrap_or(0);
    let mut live = State::init(&specs, SEED);
    let total = live.bytes();
    writeln!(out, "ckptd demo: job `{}` in {}, arena {}", cfg.job, cfg.store, ck.arena_path().display())?;
    writeln!(
        out,
        "state: {:.1} MiB in {} tensors (f32, bf16, f16, i64, u8, bool); {} steps of {} ms, a checkpoint every {}, \
         compression {}",
        mib(total),
        specs.len(),
        cfg.steps,
        cfg.compute.as_millis(),
        cfg.every,
        cfg.compression
    )?;
    if base > 0 {
        writeln!(out, "note: the store holds steps of this job up to {base}; this run numbers its steps after it")?;
    }

    let saves = train(&ck, &mut live, cfg, base, cfg.steps, out, &|_, _| Ok(()))?;
    for s in &saves {
        writeln!(out, "step {}: durable {:.0} ms after save() returned", s.step, ms(s.durable))?;
    }
    let kept = match ck.engine() {
        Some(engine) if cfg.keep > 0 => {
            let policy = RetentionPolicy { keep: cfg.keep, ..RetentionPolicy::default() };
            format!("committed steps {:?} (retention keeps {})", engine.gc(&cfg.job, &policy)?.kept, cfg.keep)
        }
        _ => "retention off".into(),
    };
    let last_local = cfg.steps - cfg.steps % cfg.every;
    let last = base + last_local;
    let arena = ck.arena_path().to_path_buf();
    // A crashed process never closes: its arena stays for the next start, as kept here.
    ck.close_keeping_arena()?;
    drop(ck);
    drop(live);
    writeln!(out, "crash: dropped the trainer's state and its checkpointer; the arena and the store remain")?;

    let t = Instant::now();
    let mut expected = State::derive(&specs, SEED, last_local);
    let derive = t.elapsed();
    let mut restored = State::poisoned(&specs, SEED);
    let memory = restore(cfg, &mut restored, &expected, last, true)?;
    // The restoring checkpointer removed its arena when it closed; make sure none is left.
    match std::fs::remove_file(&arena) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove the arena {}", arena.display())),
    }
    writeln!(out, "node lost: removed the arena; restoring from the store")?;
    restored.poison();
    let store = restore(cfg, &mut restored, &expected, last, false)?;
    for _ in 0..cfg.every {
        restored.advance();
        expected.advance();
    }
    verify(&restored, &expected, &format!("{} steps after the restore", cfg.every))?;

    let stalls: Vec<Duration> = saves.iter().map(|s| s.stall).collect();
    let durable: Vec<Duration> = saves.iter().map(|s| s.durable).collect();
    writeln!(out, "summary:")?;
    writeln!(
        out,
        "  save stall   median {:.2} ms, max {:.2} ms over {} saves (time inside save(); the copy overlaps compute)",
        ms(median(&stalls)),
        ms(max(&stalls)),
        saves.len()
    )?;
    writeln!(
        out,
        "  persist      durable median {:.0} ms, max {:.0} ms after save() returned ({:.2} GB/s at the median)",
        ms(median(&durable)),
        ms(max(&durable)),
        gbps(total, median(&durable))
    )?;
    writeln!(
        out,
        "  restore      {:.1} MiB of step {last}: memory tier {:.0} ms ({:.2} GB/s), store {:.0} ms ({:.2} GB/s, \
         every chunk verified)",
        mib(total),
        ms(memory),
        gbps(total, memory),
        ms(store),
        gbps(total, store)
    )?;
    writeln!(
        out,
        "  verify       both restores bitwise identical to the state recomputed from the seed ({:.0} ms to \
         recompute); {} more steps from the restored state match an uninterrupted run",
        ms(derive),
        cfg.every
    )?;
    writeln!(out, "  store        {kept}")?;
    writeln!(out, "demo ok: restored step {last} ({:.1} MiB) bitwise identical", mib(total))?;
    Ok(())
}

/// Restores `step` into `into` with a fresh checkpointer, checks that it came from the expected
/// tier and equals `expected`; returns the time `load` took.
fn restore(cfg: &Config, into: &mut State, expected: &State, step: u64, from_memory: bool) -> anyhow::Result<Duration> {
    let ck = Checkpointer::new(cfg.checkpointer())?;
    let found = ck.describe(None)?;
    ensure!(found.step == step, "the newest committed step is {}, the run's last checkpoint was {step}", found.step);
    let local = local_step(&found.metadata)?;
    let t = Instant::now();
    // SAFETY: `into` owns the tensors, nothing else reads or writes them, and `load` has finished
    // with them when it returns.
    let loaded = unsafe { ck.load(&into.refs(), Some(step), None) }?;
    let took = t.elapsed();
    ck.close()?;
    ensure!(loaded.from_memory == from_memory, "step {step} was loaded from_memory={}", loaded.from_memory);
    into.step = local;
    verify(into, expected, &format!("step {step} restored from {}", if from_memory { "memory" } else { "the store" }))?;
    Ok(took)
}

/// One checkpoint taken by [`train`].
#[derive(Debug, Clone, Copy)]
struct Save {
    step: u64,
    /// Time inside `save()`.
    stall: Duration,
    /// From `save()` returning to the step being durable and committed.
    durable: Duration,
}

/// Trains `state` up to local step `until`, saving it as step `base + s` at every multiple `s` of
/// `cfg.every`; `on_step` runs after each step's update, before its save. Returns once every save
/// is durable.
fn train(
    ck: &Checkpointer,
    state: &mut State,
    cfg: &Config,
    base: u64,
    until: u64,
    out: &mut dyn Write,
    on_step: &dyn Fn(u64, &mut dyn Write) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Save>> {
    std::thread::scope(|s| {
        // Saves complete in order, so one thread waiting on each in turn times every one of them.
        let (tx, rx) = mpsc::sync_channel::<(u64, Duration, SaveHandle, Instant)>(4);
        let watcher = std::thread::Builder::new().name("ckptd-demo-durable".into()).spawn_scoped(s, move || {
            rx.into_iter()
                .map(|(step, stall, h, at)| h.wait().map(|()| Save { step, stall, durable: at.elapsed() }))
                .collect::<ckptd::Result<Vec<Save>>>()
        })?;
        let trained = (|| {
            for step in state.step + 1..=until {
                // Forward and backward read the weights while the previous save's copies run.
                std::thread::sleep(cfg.compute);
                ck.fence(None)?;
                state.advance();
                on_step(step, out)?;
                if step % cfg.every == 0 {
                    let metadata = serde_json::json!({ "demo": { "seed": SEED, "step": step } }).to_string();
                    let started = Instant::now();
                    // SAFETY: the tensors live in `state`, which outlives the copies: `train`
                    // fences before it returns, on every path. Nothing writes them before the
                    // `fence` of the next step.
                    let handle = unsafe { ck.save(&state.refs(), base + step, metadata.into_bytes(), None) }?;
                    let stall = started.elapsed();
                    writeln!(out, "step {}: save stall {} us", base + step, stall.as_micros())?;
                    tx.send((base + step, stall, handle, Instant::now()))
                        .map_err(|_| anyhow!("the durability watcher stopped"))?;
                }
            }
            Ok::<_, anyhow::Error>(())
        })();
        let fenced = ck.fence(None);
        drop(tx);
        let saves = watcher.join().map_err(|_| anyhow!("the durability watcher panicked"))??;
        trained?;
        fenced?;
        Ok(saves)
    })
}

/// The training step a demo checkpoint's metadata records.
fn local_step(metadata: &[u8]) -> anyhow::Result<u64> {
    let v: serde_json::Value = serde_json::from_slice(metadata).context("the checkpoint's metadata is not JSON")?;
    ensure!(v["demo"]["seed"].as_u64() == Some(SEED), "the checkpoint is not from this demo: its metadata is {v}");
    v["demo"]["step"].as_u64().ok_or_else(|| anyhow!("the checkpoint's metadata has no step: {v}"))
}

fn verify(got: &State, want: &State, what: &str) -> anyhow::Result<()> {
    let problems = got.diff(want);
    ensure!(problems.is_empty(), "{what}: the state differs from the recomputed one: {}", problems.join("; "));
    Ok(())
}

/// A file or directory that the demo removes when it ends, however it ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0).or_else(|_| std::fs::remove_dir_all(&self.0));
    }
}

fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Decimal gigabytes per second.
fn gbps(bytes: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 { bytes as f64 / s / 1e9 } else { f64::INFINITY }
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn max(v: &[Duration]) -> Duration {
    v.iter().copied().max().unwrap_or_default()
}
