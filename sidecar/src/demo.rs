//! `ckptd demo`: the whole embedded-mode path in one process, with nothing to set up (no GPU, no
//! cluster, no server).
//!
//! A synthetic trainer mutates a few hundred MiB of mixed-dtype tensors step by step. Every K steps
//! it copies them into a staging buffer (that copy, and any wait for a free buffer, is the stall a
//! real trainer would see) and hands the copy to a background thread that persists and commits it
//! with [`Engine::save`] while training goes on. Then the trainer "crashes": its state is dropped,
//! a fresh [`Engine`] finds the newest committed step, restores it into fresh tensors, and the
//! result is compared bitwise with the state re-derived from the seed, so the check does not trust
//! the saved bytes. Finally training resumes from the restored state and must continue exactly
//! like an uninterrupted run.
//!
//! Host memory stays at about twice the state: the live tensors plus one staging buffer, which the
//! persist thread hands back once its step is durable.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ckpt_core::store::Backend;
use ckpt_core::tensor::DEFAULT_ALIGN;
use ckpt_core::{
    Compression, DType, Engine, EngineConfig, PersistConfig, RetentionPolicy, Snapshot, Store, TensorMeta, TensorTable,
};

/// Directory name of the default store, created in the current directory.
pub const DEFAULT_STORE_DIR: &str = "ckptd-demo-store";

/// Smallest state the demo accepts, in MiB.
pub const MIN_STATE_MIB: u64 = 1;
/// Largest state the demo accepts, in MiB (1 TiB); host memory is checked separately.
pub const MAX_STATE_MIB: u64 = 1 << 20;

/// Bytes each copy task moves; small enough to balance across threads, large enough that handing
/// out tasks costs nothing.
const COPY_PIECE: usize = 4 << 20;
/// Elements per mutation block.
const BLOCK_ELEMS: usize = 1024;
/// A step touches one block in this many, so a step costs a fraction of a pass over the state.
const PHASES: usize = 16;
/// Width of every matrix in the synthetic model.
const DIM: u64 = 1024;
/// Layers of the synthetic model.
const LAYERS: u64 = 4;
/// Samples per step, for the data-loader position.
const BATCH: i64 = 1024;

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Store URL (`file:///dir`, `s3://bucket/prefix`, `memory://`, ...) or a bare local path.
    pub store: String,
    /// Job name in the store.
    pub job: String,
    /// Approximate size of the training state in bytes.
    pub state_bytes: u64,
    /// Training steps to run before the simulated crash.
    pub steps: u64,
    /// Checkpoint every this many steps.
    pub every: u64,
    /// Chunk compression of the persisted shards.
    pub compression: Compression,
    /// Simulated forward + backward time per step: the window in which persisting overlaps
    /// training. Real steps take hundreds of milliseconds or more.
    pub compute: Duration,
    /// Committed steps retention keeps (0 keeps everything).
    pub keep: usize,
    /// Seed of the synthetic state; the restore check re-derives the state from it.
    pub seed: u64,
    /// Threads of the staging copy (0 = every core).
    pub copy_threads: usize,
}

impl Config {
    /// The demo's defaults against `store`.
    pub fn new(store: impl Into<String>) -> Config {
        Config {
            store: store.into(),
            job: "demo".into(),
            state_bytes: 256 << 20,
            steps: 30,
            every: 5,
            compression: Compression::None,
            compute: Duration::from_millis(100),
            keep: 2,
            seed: 0x636b_7074_6420_6465,
            copy_threads: 0,
        }
    }

    /// Checks every setting before anything is allocated or written.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |reason: String| Err(Error::Config { reason });
        ckpt_core::store::layout::validate_job(&self.job).or_else(|e| bad(e.to_string()))?;
        let mib = self.state_bytes >> 20;
        if !(MIN_STATE_MIB..=MAX_STATE_MIB).contains(&mib) {
            return bad(format!("--state-mib {mib} is outside {MIN_STATE_MIB}..={MAX_STATE_MIB}"));
        }
        if self.every == 0 || self.steps == 0 {
            return bad("--steps and --every must be at least 1".into());
        }
        if self.steps < self.every {
            return bad(format!(
                "--steps {} is less than --every {}: no checkpoint would be taken; raise --steps or lower --every",
                self.steps, self.every
            ));
        }
        if self.compute > Duration::from_secs(60) {
            return bad(format!("--compute-ms {} is above the 60000 ms cap", self.compute.as_millis()));
        }
        if let Some(available) = mem_available() {
            // The live tensors plus the staging buffer (or, after the crash, the restored tensors
            // plus the re-derived ones), and some room for the engine.
            let need = self.state_bytes.saturating_mul(2).saturating_add(256 << 20);
            if need > available {
                return bad(format!(
                    "the demo needs about {} MiB of host memory for a {mib} MiB state and {} MiB is available: \
                     lower --state-mib",
                    need >> 20,
                    available >> 20
                ));
            }
        }
        Ok(())
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

/// Why the demo failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The configuration cannot work (bad store URL, sizes, job name); the binary exits with 64.
    Config {
        /// What is wrong and what to do.
        reason: String,
    },
    /// An engine call failed.
    Engine {
        /// What the demo was doing (`persist`, `find the newest step`, ...).
        op: &'static str,
        /// The step involved, when there is one.
        step: Option<u64>,
        /// What the engine said.
        source: Box<ckpt_core::Error>,
    },
    /// The restored state is not the state that was saved.
    Verify {
        /// The restored step.
        step: u64,
        /// Every difference found, one entry each.
        problems: Vec<String>,
    },
    /// A demo thread died or could not start.
    Thread {
        /// Which thread and what happened.
        reason: String,
    },
    /// The report could not be written (stdout closed).
    Output {
        /// The write error.
        source: std::io::Error,
    },
}

impl Error {
    /// Whether the failure is a configuration problem (exit code 64) rather than a failed run.
    pub fn is_config(&self) -> bool {
        matches!(self, Error::Config { .. })
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Config { reason } => f.write_str(reason),
            Error::Engine { op, step: Some(step), source } => write!(f, "{op} of step {step} failed: {source}"),
            Error::Engine { op, step: None, source } => write!(f, "{op} failed: {source}"),
            Error::Verify { step, problems } => {
                write!(f, "verification of step {step} failed: {}", problems.join("; "))
            }
            Error::Thread { reason } => f.write_str(reason),
            Error::Output { source } => write!(f, "cannot write the report: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Engine { source, .. } => Some(source.as_ref()),
            Error::Output { source } => Some(source),
            _ => None,
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(source: std::io::Error) -> Self {
        Error::Output { source }
    }
}

fn engine_err(op: &'static str, step: Option<u64>) -> impl FnOnce(ckpt_core::Error) -> Error {
    move |source| Error::Engine { op, step, source: Box::new(source) }
}

/// What a successful demo proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The step restored after the crash (the last checkpoint of the run).
    pub restored_step: u64,
    /// Size of the restored region in bytes.
    pub state_bytes: u64,
    /// Checkpoints taken.
    pub saves: usize,
}

/// Runs the demo and writes its report to `out`.
pub fn run(cfg: &Config, out: &mut dyn Write) -> Result<Outcome, Error> {
    cfg.validate()?;
    let specs = specs(cfg.state_bytes);
    let metas: Vec<TensorMeta> = specs.iter().map(|(m, _)| m.clone()).collect();
    let table = TensorTable::packed(metas.clone(), DEFAULT_ALIGN).map_err(engine_err("lay out the tensors", None))?;
    let total = table.total_len();
    let threads = copy_threads(cfg.copy_threads);

    let engine = open_engine(cfg)?;
    let store = engine.store().clone();
    let base = engine.steps(&cfg.job).map_err(engine_err("list the job's steps", None))?.last().map_or(0, |s| s.step);
    let dtypes: Vec<&str> = {
        let mut d: Vec<DType> = metas.iter().map(|m| m.dtype).collect();
        d.sort();
        d.dedup();
        d.iter().map(|d| d.name()).collect()
    };
    writeln!(out, "ckptd demo: job `{}` on {}", cfg.job, engine.store().url())?;
    writeln!(
        out,
        "state: {:.1} MiB in {} tensors ({}); {} steps of {} ms, a checkpoint every {}, compression {}",
        mib(total),
        metas.len(),
        dtypes.join(", "),
        cfg.steps,
        cfg.compute.as_millis(),
        cfg.every,
        cfg.compression
    )?;
    if base > 0 {
        writeln!(
            out,
            "note: the store already holds steps of this job up to {base}; this run numbers its steps after it"
        )?;
    }

    // Train and checkpoint.
    let mut state = State::init(&specs, cfg.seed);
    let mut staging = vec![0u8; total as usize];
    prefault(&mut staging);
    let mut trainer = Trainer::start(engine, cfg, table.clone(), staging)?;
    for _ in 0..cfg.steps {
        state.advance();
        std::thread::sleep(cfg.compute);
        trainer.poll(out)?;
        if state.step % cfg.every == 0 {
            trainer.save(&state, base, cfg.seed, threads, out)?;
        }
    }
    let stats = trainer.finish(out)?;
    let last_local = cfg.steps - cfg.steps % cfg.every;
    let last_step = base + last_local;

    // Crash: the trainer's tensors and buffers are gone; only the store remains.
    drop(state);
    writeln!(out, "crash: dropped the trainer's state and its engine; restoring with a fresh engine")?;

    let engine = reopen(cfg, &store)?;
    let r = recover(&engine, cfg, &specs, last_step, last_local, threads)?;
    let step = r.step;
    let cache = if matches!(store.backend(), Backend::Local { .. }) { ", page cache warm" } else { "" };
    let committed: Vec<u64> = engine
        .steps(&cfg.job)
        .map_err(engine_err("list the job's steps", None))?
        .into_iter()
        .filter(|s| s.state == ckpt_core::StepState::Committed)
        .map(|s| s.step)
        .collect();

    let copy_bytes = total * stats.stalls.len() as u64;
    let copy_time: Duration = stats.copies.iter().sum();
    writeln!(out, "summary:")?;
    writeln!(
        out,
        "  save stall   median {:.1} ms, max {:.1} ms over {} saves; copy {:.2} GB/s on {threads} threads; \
         waiting for the previous persist: median {:.1} ms, max {:.1} ms",
        ms(median(&stats.stalls)),
        ms(max(&stats.stalls)),
        stats.stalls.len(),
        gbps(copy_bytes, copy_time),
        ms(median(&stats.waits)),
        ms(max(&stats.waits)),
    )?;
    let rates: Vec<f64> = stats.durable.iter().map(|d| gbps(d.region, d.write)).collect();
    let to_durable: Vec<Duration> = stats.durable.iter().map(|d| d.after_handoff).collect();
    writeln!(
        out,
        "  persist      median {:.2} GB/s (write + fsync + commit); time to durable median {:.0} ms, max {:.0} ms",
        median_f64(&rates),
        ms(median(&to_durable)),
        ms(max(&to_durable)),
    )?;
    writeln!(
        out,
        "  restore      {:.1} MiB in {:.0} ms ({:.2} GB/s, every chunk verified{cache}) after finding step {step} in \
         {:.1} ms; loaded into fresh tensors in {:.0} ms",
        mib(total),
        ms(r.restore),
        gbps(total, r.restore),
        ms(r.find),
        ms(r.load),
    )?;
    writeln!(
        out,
        "  verify       {} tensors bitwise identical to the state re-derived from the seed ({:.0} ms to re-derive); \
         {} more steps from the restored state match an uninterrupted run",
        metas.len(),
        ms(r.derive),
        cfg.every,
    )?;
    let kept = if cfg.keep == 0 { "retention off".to_string() } else { format!("retention keeps {}", cfg.keep) };
    writeln!(out, "  store        committed steps {committed:?} ({kept})")?;
    writeln!(out, "demo ok: restored step {step} ({:.1} MiB) bitwise identical", mib(total))?;
    Ok(Outcome { restored_step: step, state_bytes: total, saves: stats.stalls.len() })
}

/// Timings of a successful recovery.
#[derive(Debug, Clone, Copy)]
struct Recovery {
    step: u64,
    /// `Engine::latest`.
    find: Duration,
    /// `Engine::restore_into`.
    restore: Duration,
    /// Copying the restored region into fresh tensors.
    load: Duration,
    /// Re-deriving the expected state from the seed.
    derive: Duration,
}

/// The restart after the crash: finds the newest committed step with `engine`, restores it into
/// fresh tensors and checks them bitwise against the state re-derived from the seed, then checks
/// that training resumed from them continues like an uninterrupted run.
fn recover(
    engine: &Engine,
    cfg: &Config,
    specs: &[(TensorMeta, Rule)],
    last_step: u64,
    last_local: u64,
    threads: usize,
) -> Result<Recovery, Error> {
    let metas: Vec<TensorMeta> = specs.iter().map(|(m, _)| m.clone()).collect();
    let t = Instant::now();
    let manifest = engine
        .latest(&cfg.job)
        .map_err(engine_err("find the newest committed step", None))?
        .ok_or_else(|| Error::Verify { step: last_step, problems: vec!["the store has no committed step".into()] })?;
    let find = t.elapsed();
    let step = manifest.step;
    if step != last_step {
        return Err(Error::Verify {
            step,
            problems: vec![format!("the newest committed step is {step}, the run's last checkpoint was {last_step}")],
        });
    }
    let header = engine.shard_header(&cfg.job, step, 0).map_err(engine_err("read the shard header", Some(step)))?;
    let problems = header.index.table.mismatches(&metas);
    if !problems.is_empty() {
        return Err(Error::Verify { step, problems });
    }
    let local = saved_local_step(&header.index.metadata).ok_or_else(|| Error::Verify {
        step,
        problems: vec!["the shard's metadata has no readable demo step".into()],
    })?;
    if local != last_local {
        return Err(Error::Verify {
            step,
            problems: vec![format!("the shard holds training step {local}, expected {last_local}")],
        });
    }
    let mut region = vec![0u8; header.index.table.total_len() as usize];
    prefault(&mut region);
    let t = Instant::now();
    engine.restore_into(&cfg.job, step, 0, &mut region).map_err(engine_err("restore", Some(step)))?;
    let restore = t.elapsed();
    let mut restored = State::empty(specs, cfg.seed);
    let t = Instant::now();
    restored.load(&header.index.table, &region, local, threads);
    let load = t.elapsed();
    drop(region);

    // The independent copy: the same seed and the same number of steps, from scratch.
    let t = Instant::now();
    let mut expected = State::init(specs, cfg.seed);
    while expected.step < local {
        expected.advance();
    }
    let derive = t.elapsed();
    let problems = restored.diff(&expected);
    if !problems.is_empty() {
        return Err(Error::Verify { step, problems });
    }
    for _ in 0..cfg.every {
        restored.advance();
        expected.advance();
    }
    let problems = restored.diff(&expected);
    if !problems.is_empty() {
        let problems = problems.into_iter().map(|p| format!("after resuming {} steps: {p}", cfg.every)).collect();
        return Err(Error::Verify { step, problems });
    }
    Ok(Recovery { step, restore, find, load, derive })
}

fn engine_config(cfg: &Config) -> EngineConfig {
    EngineConfig {
        persist: PersistConfig { compression: cfg.compression, ..PersistConfig::default() },
        ..EngineConfig::default()
    }
}

fn open_engine(cfg: &Config) -> Result<Engine, Error> {
    Engine::open(&cfg.store, engine_config(cfg)).map_err(|e| Error::Config { reason: e.to_string() })
}

/// A fresh engine for the restore: the store opened again from its URL, except `memory://`, whose
/// contents live only in the store object that the crash is taken to spare (like a remote store).
fn reopen(cfg: &Config, store: &Store) -> Result<Engine, Error> {
    if matches!(store.backend(), Backend::Memory) {
        return Engine::new(store.clone(), engine_config(cfg)).map_err(engine_err("open the store again", None));
    }
    open_engine(cfg)
}

fn copy_threads(wanted: usize) -> usize {
    if wanted > 0 {
        return wanted;
    }
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// The training step recorded in a demo shard's metadata.
fn saved_local_step(metadata: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(metadata).ok()?;
    v.get("demo")?.get("local_step")?.as_u64()
}

// ---------------------------------------------------------------------------------------------
// The trainer side: staging copies and the persist thread.

/// One checkpoint handed to the persist thread.
struct Handoff {
    step: u64,
    snapshot: Snapshot,
    at: Instant,
}

/// A step that became durable.
#[derive(Debug, Clone, Copy)]
struct Durable {
    step: u64,
    region: u64,
    shard: u64,
    /// Duration of `Engine::save`: shard write, fsync and commit.
    write: Duration,
    /// From the hand-off to the commit, queueing included.
    after_handoff: Duration,
}

enum Report {
    Done { buf: Vec<u8>, durable: Durable },
    Failed(Error),
}

#[derive(Debug, Default)]
struct Stats {
    stalls: Vec<Duration>,
    waits: Vec<Duration>,
    copies: Vec<Duration>,
    durable: Vec<Durable>,
}

/// The embedded-mode checkpointer of the demo: one staging buffer and one persist thread.
struct Trainer {
    table: TensorTable,
    free: Option<Vec<u8>>,
    tx: Option<SyncSender<Handoff>>,
    rx: Receiver<Report>,
    thread: Option<JoinHandle<()>>,
    stats: Stats,
}

impl Trainer {
    fn start(engine: Engine, cfg: &Config, table: TensorTable, staging: Vec<u8>) -> Result<Trainer, Error> {
        // At most one checkpoint waits while another is written; with a single staging buffer the
        // queue is in fact never used, but it is bounded all the same.
        let (tx, jobs) = mpsc::sync_channel::<Handoff>(1);
        let (reports, rx) = mpsc::sync_channel::<Report>(2);
        let job = cfg.job.clone();
        let keep = cfg.keep;
        let thread = std::thread::Builder::new()
            .name("ckptd-demo-persist".into())
            .spawn(move || persist_loop(&engine, &job, keep, &jobs, &reports))
            .map_err(|e| Error::Thread { reason: format!("cannot start the persist thread: {e}") })?;
        Ok(Trainer { table, free: Some(staging), tx: Some(tx), rx, thread: Some(thread), stats: Stats::default() })
    }

    /// Takes in what the persist thread finished, without waiting.
    fn poll(&mut self, out: &mut dyn Write) -> Result<(), Error> {
        loop {
            match self.rx.try_recv() {
                Ok(report) => self.absorb(report, out)?,
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => return Err(self.died()),
            }
        }
    }

    fn absorb(&mut self, report: Report, out: &mut dyn Write) -> Result<(), Error> {
        match report {
            Report::Done { buf, durable } => {
                writeln!(
                    out,
                    "step {:>4}: durable {:.0} ms after hand-off ({:.1} MiB shard written and committed at {:.2} GB/s)",
                    durable.step,
                    ms(durable.after_handoff),
                    mib(durable.shard),
                    gbps(durable.region, durable.write),
                )?;
                self.stats.durable.push(durable);
                self.free = Some(buf);
                Ok(())
            }
            Report::Failed(e) => Err(e),
        }
    }

    fn died(&mut self) -> Error {
        let reason = match self.thread.take().map(JoinHandle::join) {
            Some(Err(_)) => "the persist thread panicked",
            _ => "the persist thread exited early",
        };
        Error::Thread { reason: reason.into() }
    }

    /// Stages `state` and hands it to the persist thread; the time spent here is the stall.
    fn save(&mut self, state: &State, base: u64, seed: u64, threads: usize, out: &mut dyn Write) -> Result<(), Error> {
        let step = base + state.step;
        let t0 = Instant::now();
        let mut buf = loop {
            if let Some(buf) = self.free.take() {
                break buf;
            }
            match self.rx.recv() {
                Ok(report) => self.absorb(report, out)?,
                Err(_) => return Err(self.died()),
            }
        };
        let waited = t0.elapsed();
        stage(state, &self.table, &mut buf, threads);
        let copied = t0.elapsed() - waited;
        let metadata = serde_json::json!({ "demo": { "local_step": state.step, "seed": seed, "base": base } });
        let snapshot = Snapshot { table: self.table.clone(), data: buf.into(), metadata: metadata.to_string().into() };
        let tx = self.tx.as_ref().ok_or_else(|| Error::Thread { reason: "the persist queue is closed".into() })?;
        if tx.send(Handoff { step, snapshot, at: Instant::now() }).is_err() {
            // The thread is gone; its last report says why.
            self.poll(out)?;
            return Err(self.died());
        }
        let stall = t0.elapsed();
        tracing::info!(step, bytes = self.table.total_len(), stall_us = stall.as_micros() as u64, "checkpoint staged");
        writeln!(
            out,
            "step {step:>4}: staged in {:.1} ms (copy {:.1} ms at {:.2} GB/s, waited {:.1} ms for the previous persist)",
            ms(stall),
            ms(copied),
            gbps(self.table.total_len(), copied),
            ms(waited),
        )?;
        self.stats.stalls.push(stall);
        self.stats.waits.push(waited);
        self.stats.copies.push(copied);
        Ok(())
    }

    /// Closes the queue and waits until the last checkpoint is durable.
    fn finish(mut self, out: &mut dyn Write) -> Result<Stats, Error> {
        drop(self.tx.take());
        while let Ok(report) = self.rx.recv() {
            self.absorb(report, out)?;
        }
        match self.thread.take().map(JoinHandle::join) {
            Some(Err(_)) => Err(Error::Thread { reason: "the persist thread panicked".into() }),
            _ => Ok(std::mem::take(&mut self.stats)),
        }
    }
}

fn persist_loop(engine: &Engine, job: &str, keep: usize, jobs: &Receiver<Handoff>, reports: &SyncSender<Report>) {
    let policy = RetentionPolicy { keep, ..RetentionPolicy::default() };
    let meta = BTreeMap::from([("producer".to_string(), "ckptd demo".to_string())]);
    for h in jobs {
        let started = Instant::now();
        match engine.save(job, h.step, 0, 1, &h.snapshot, meta.clone()) {
            Ok((info, _)) => {
                let durable = Durable {
                    step: h.step,
                    region: info.region_len,
                    shard: info.size,
                    write: started.elapsed(),
                    after_handoff: h.at.elapsed(),
                };
                tracing::info!(step = h.step, bytes = info.size, "checkpoint durable");
                let buf = reclaim(h.snapshot);
                if reports.send(Report::Done { buf, durable }).is_err() {
                    return;
                }
            }
            Err(source) => {
                let _ = reports.send(Report::Failed(engine_err("persist", Some(h.step))(source)));
                return;
            }
        }
        if keep > 0 {
            match engine.gc(job, &policy) {
                Ok(r) => tracing::debug!(deleted = ?r.deleted_committed, "retention pass"),
                Err(e) => tracing::warn!(error = %e, "retention failed; the next pass retries"),
            }
        }
    }
}

/// Takes the staging buffer back from a persisted snapshot, without copying when the engine kept
/// no reference to it (it keeps none once `save` returns).
fn reclaim(snapshot: Snapshot) -> Vec<u8> {
    match snapshot.data.try_into_mut() {
        Ok(buf) => buf.into(),
        Err(shared) => {
            tracing::warn!(bytes = shared.len(), "staging buffer still shared after persist; allocating a new one");
            let mut buf = vec![0u8; shared.len()];
            prefault(&mut buf);
            buf
        }
    }
}

/// Touches every page so that later copies measure copying, not page faults (the real arena is
/// allocated and pinned once, off the critical path).
fn prefault(buf: &mut [u8]) {
    buf.fill(1);
    std::hint::black_box(&mut *buf);
    buf.fill(0);
}

/// Copies every tensor of `state` to its place in `region` on up to `threads` threads.
fn stage(state: &State, table: &TensorTable, region: &mut [u8], threads: usize) {
    let mut pairs = Vec::with_capacity(state.tensors.len());
    let mut rest = region;
    let mut consumed = 0usize;
    for (entry, tensor) in table.entries().iter().zip(&state.tensors) {
        let r = entry.range();
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(r.start - consumed);
        let (dst, tail) = tail.split_at_mut(r.len());
        rest = tail;
        consumed = r.end;
        pairs.push((tensor.data.as_slice(), dst));
    }
    parallel_copy(pairs, threads);
}

/// Copies each `(src, dst)` pair (equal lengths) in pieces that `threads` threads take from one
/// queue. A thread that cannot start leaves its share to the others.
fn parallel_copy(pairs: Vec<(&[u8], &mut [u8])>, threads: usize) {
    let mut pieces = Vec::new();
    for (src, dst) in pairs {
        pieces.extend(src.chunks(COPY_PIECE).zip(dst.chunks_mut(COPY_PIECE)));
    }
    let helpers = threads.min(pieces.len()).saturating_sub(1);
    let queue = Mutex::new(pieces);
    let work = || {
        loop {
            let piece = match queue.lock() {
                Ok(mut q) => q.pop(),
                Err(poisoned) => poisoned.into_inner().pop(),
            };
            let Some((src, dst)) = piece else { return };
            dst.copy_from_slice(src);
        }
    };
    std::thread::scope(|s| {
        for i in 0..helpers {
            if std::thread::Builder::new().name(format!("ckptd-demo-copy-{i}")).spawn_scoped(s, work).is_err() {
                break;
            }
        }
        work();
    });
}

// ---------------------------------------------------------------------------------------------
// The synthetic training state.

/// How a tensor changes from one step to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// float32 weights: decay plus noise, one block in [`PHASES`] per step.
    Weight,
    /// bfloat16 embeddings: the same rule, rounded to bfloat16.
    Embedding,
    /// float16 norm scales in [0.5, 1), every element every step.
    Norm,
    /// int64 optimizer step counters.
    StepCounter,
    /// int64 scalar: samples the data loader has consumed.
    Position,
    /// float32 scalar: the mixed-precision loss scale.
    LossScale,
    /// uint8 data-loader shuffle state, one block in [`PHASES`] per step.
    Shuffle,
    /// bool pruning mask (0 or 1), one block in [`PHASES`] per step.
    Mask,
}

/// The tensors of a synthetic model of about `state_bytes`, with the rule that drives each.
fn specs(state_bytes: u64) -> Vec<(TensorMeta, Rule)> {
    // Shares of the state: embeddings 1/4, layer weights 1/2, shuffle state 3/20, mask 1/10.
    let rows = |num: u64, den: u64, elem: u64| (state_bytes / den * num / (DIM * elem)).max(1);
    let meta = |name: String, dtype, shape: Vec<u64>| TensorMeta { name, dtype, shape };
    let mut s = vec![(meta("model.embed.weight".into(), DType::BF16, vec![rows(1, 4, 2), DIM]), Rule::Embedding)];
    for l in 0..LAYERS {
        let w = rows(1, 2 * LAYERS, 4);
        s.push((meta(format!("model.layers.{l}.mlp.weight"), DType::F32, vec![w, DIM]), Rule::Weight));
        s.push((meta(format!("model.layers.{l}.norm.weight"), DType::F16, vec![DIM]), Rule::Norm));
    }
    s.push((meta("optim.step".into(), DType::I64, vec![LAYERS]), Rule::StepCounter));
    s.push((meta("amp.loss_scale".into(), DType::F32, vec![]), Rule::LossScale));
    s.push((meta("data.position".into(), DType::I64, vec![]), Rule::Position));
    s.push((meta("data.shuffle".into(), DType::U8, vec![rows(3, 20, 1), DIM]), Rule::Shuffle));
    s.push((meta("model.prune_mask".into(), DType::Bool, vec![rows(1, 10, 1), DIM]), Rule::Mask));
    s
}

#[derive(Debug, Clone)]
struct Tensor {
    meta: TensorMeta,
    rule: Rule,
    data: Vec<u8>,
}

/// The live training state: separate tensors, like a model's parameters and optimizer state.
#[derive(Debug, Clone)]
struct State {
    seed: u64,
    /// Training steps taken since initialisation.
    step: u64,
    tensors: Vec<Tensor>,
}

impl State {
    /// The state before the first step, a pure function of `seed`.
    fn init(specs: &[(TensorMeta, Rule)], seed: u64) -> State {
        let tensors = specs
            .iter()
            .enumerate()
            .map(|(t, (meta, rule))| {
                // The specs come from `specs`, whose shapes fit in memory by `Config::validate`.
                let len = meta.byte_len().unwrap_or(0) as usize;
                let mut data = vec![0u8; len];
                let key = stream_key(seed, t, 0);
                match rule {
                    Rule::Weight => for_f32(&mut data, 0, key, |_, h| unit(h) * 0.02),
                    Rule::Embedding => for_bf16(&mut data, 0, key, |_, h| unit(h) * 0.02),
                    Rule::Norm => data.chunks_exact_mut(2).for_each(|c| c.copy_from_slice(&0x3c00u16.to_le_bytes())),
                    Rule::LossScale => data.copy_from_slice(&65536f32.to_le_bytes()),
                    Rule::StepCounter | Rule::Position => {}
                    Rule::Shuffle => data.iter_mut().enumerate().for_each(|(i, b)| *b = elem_hash(key, i) as u8),
                    Rule::Mask => data.fill(1),
                }
                Tensor { meta: meta.clone(), rule: *rule, data }
            })
            .collect();
        State { seed, step: 0, tensors }
    }

    /// A state whose tensors are allocated and paged in but hold zeros, ready to be loaded into
    /// (like a model built before its checkpoint is loaded).
    fn empty(specs: &[(TensorMeta, Rule)], seed: u64) -> State {
        let tensors = specs
            .iter()
            .map(|(meta, rule)| {
                let mut data = vec![0u8; meta.byte_len().unwrap_or(0) as usize];
                prefault(&mut data);
                Tensor { meta: meta.clone(), rule: *rule, data }
            })
            .collect();
        State { seed, step: 0, tensors }
    }

    /// Loads every tensor from a restored region and sets the step.
    fn load(&mut self, table: &TensorTable, region: &[u8], step: u64, threads: usize) {
        // `run` checked the table against the specs, so every name is there with the same length.
        let pairs = self
            .tensors
            .iter_mut()
            .filter_map(|t| table.get(&t.meta.name).map(|e| (&region[e.range()], t.data.as_mut_slice())))
            .collect();
        parallel_copy(pairs, threads);
        self.step = step;
    }

    /// One training step: a deterministic function of the previous state, the seed and the step.
    fn advance(&mut self) {
        self.step += 1;
        let step = self.step;
        let phase = (step % PHASES as u64) as usize;
        for (t, tensor) in self.tensors.iter_mut().enumerate() {
            let key = stream_key(self.seed, t, step);
            let size = tensor.meta.dtype.size();
            let data = &mut tensor.data;
            match tensor.rule {
                Rule::Weight => {
                    for (range, first) in phase_blocks(data.len() / size, phase) {
                        for_f32(&mut data[range.start * 4..range.end * 4], first, key, |w, h| {
                            w * 0.999 + unit(h) * 0.01
                        });
                    }
                }
                Rule::Embedding => {
                    for (range, first) in phase_blocks(data.len() / size, phase) {
                        for_bf16(&mut data[range.start * 2..range.end * 2], first, key, |w, h| {
                            w * 0.999 + unit(h) * 0.01
                        });
                    }
                }
                Rule::Norm => {
                    for (i, c) in data.chunks_exact_mut(2).enumerate() {
                        let old = u16::from_le_bytes([c[0], c[1]]);
                        let bits = 0x3800 | ((old ^ elem_hash(key, i) as u16) & 0x03ff);
                        c.copy_from_slice(&bits.to_le_bytes());
                    }
                }
                Rule::StepCounter => {
                    data.chunks_exact_mut(8).for_each(|c| c.copy_from_slice(&(step as i64).to_le_bytes()));
                }
                Rule::Position => data.copy_from_slice(&(step as i64 * BATCH).to_le_bytes()),
                Rule::LossScale => data.copy_from_slice(&((1u32 << (16 - step % 8)) as f32).to_le_bytes()),
                Rule::Shuffle => {
                    for (range, first) in phase_blocks(data.len(), phase) {
                        for (i, b) in data[range].iter_mut().enumerate() {
                            *b ^= elem_hash(key, first + i) as u8;
                        }
                    }
                }
                Rule::Mask => {
                    for (range, first) in phase_blocks(data.len(), phase) {
                        for (i, b) in data[range].iter_mut().enumerate() {
                            *b = (elem_hash(key, first + i) >> 63) as u8;
                        }
                    }
                }
            }
        }
    }

    /// Every tensor that differs from `other`'s, with its first differing byte.
    fn diff(&self, other: &State) -> Vec<String> {
        let mut problems = Vec::new();
        if self.step != other.step {
            problems.push(format!("at training step {}, expected {}", self.step, other.step));
        }
        for (a, b) in self.tensors.iter().zip(&other.tensors) {
            if a.data != b.data {
                let first = a.data.iter().zip(&b.data).position(|(x, y)| x != y).unwrap_or(a.data.len());
                let count = a.data.iter().zip(&b.data).filter(|(x, y)| x != y).count();
                problems.push(format!("`{}`: {count} bytes differ, the first at byte {first}", a.meta.name));
            }
        }
        problems
    }
}

/// The element ranges of the blocks a step in `phase` touches, each with its first element.
fn phase_blocks(elems: usize, phase: usize) -> impl Iterator<Item = (std::ops::Range<usize>, usize)> {
    (phase * BLOCK_ELEMS..elems).step_by(BLOCK_ELEMS * PHASES).map(move |s| (s..(s + BLOCK_ELEMS).min(elems), s))
}

/// Rewrites little-endian float32 elements; `first` is the index of the slice's first element.
fn for_f32(bytes: &mut [u8], first: usize, key: u64, f: impl Fn(f32, u64) -> f32) {
    for (i, c) in bytes.chunks_exact_mut(4).enumerate() {
        let old = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        c.copy_from_slice(&f(old, elem_hash(key, first + i)).to_le_bytes());
    }
}

/// Rewrites little-endian bfloat16 elements, computing in float32.
fn for_bf16(bytes: &mut [u8], first: usize, key: u64, f: impl Fn(f32, u64) -> f32) {
    for (i, c) in bytes.chunks_exact_mut(2).enumerate() {
        let old = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
        c.copy_from_slice(&bf16_bits(f(old, elem_hash(key, first + i))).to_le_bytes());
    }
}

/// float32 → bfloat16 with round-to-nearest-even, as torch converts.
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x0040;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// splitmix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn stream_key(seed: u64, tensor: usize, step: u64) -> u64 {
    mix(seed ^ mix(((tensor as u64) << 40) ^ step))
}

fn elem_hash(key: u64, i: usize) -> u64 {
    mix(key.wrapping_add((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

/// A float in [-1, 1) from a hash.
fn unit(h: u64) -> f32 {
    (h >> 40) as f32 * (1.0 / (1u64 << 23) as f32) - 1.0
}

// ---------------------------------------------------------------------------------------------
// Reporting helpers.

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
    match v.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2,
    }
}

fn median_f64(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn max(v: &[Duration]) -> Duration {
    v.iter().copied().max().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(store: &str) -> Config {
        Config { state_bytes: 2 << 20, steps: 6, every: 3, compute: Duration::ZERO, keep: 0, ..Config::new(store) }
    }

    #[test]
    fn state_is_deterministic_and_every_step_changes_it() {
        let specs = specs(1 << 20);
        let mut a = State::init(&specs, 7);
        let mut b = State::init(&specs, 7);
        assert!(a.diff(&b).is_empty());
        a.advance();
        assert!(!a.diff(&b).is_empty(), "a step must change the state");
        b.advance();
        assert!(a.diff(&b).is_empty());
        let other = State::init(&specs, 8);
        assert!(!other.diff(&State::init(&specs, 7)).is_empty(), "the seed must matter");
        // Over PHASES steps every block of every large tensor is touched.
        let start = State::init(&specs, 7);
        for _ in 0..PHASES {
            a.advance();
        }
        for (x, y) in a.tensors.iter().zip(&start.tensors) {
            let same = x.data.chunks(BLOCK_ELEMS).zip(y.data.chunks(BLOCK_ELEMS)).filter(|(p, q)| p == q).count();
            assert_eq!(same, 0, "`{}` has untouched blocks", x.meta.name);
        }
    }

    #[test]
    fn specs_cover_the_dtypes_and_the_requested_size() {
        for mib in [1u64, 8, 256] {
            let table = TensorTable::packed(specs(mib << 20).into_iter().map(|(m, _)| m), DEFAULT_ALIGN).unwrap();
            let total = table.total_len();
            assert!(total <= (mib << 20) + (64 << 10) && total >= (mib << 20) * 9 / 10, "{mib} MiB → {total}");
        }
        let dtypes: std::collections::BTreeSet<DType> = specs(1 << 20).iter().map(|(m, _)| m.dtype).collect();
        for d in [DType::F32, DType::BF16, DType::F16, DType::I64, DType::U8, DType::Bool] {
            assert!(dtypes.contains(&d), "{d} missing");
        }
        assert!(specs(1 << 20).iter().any(|(m, _)| m.shape.is_empty()), "no scalar");
    }

    #[test]
    fn stage_then_load_round_trips_with_any_thread_count() {
        let specs = specs(1 << 20);
        let mut state = State::init(&specs, 3);
        state.advance();
        let table = TensorTable::packed(specs.iter().map(|(m, _)| m.clone()), DEFAULT_ALIGN).unwrap();
        for threads in [1, 2, 5] {
            let mut region = vec![0xAAu8; table.total_len() as usize];
            stage(&state, &table, &mut region, threads);
            for (e, t) in table.entries().iter().zip(&state.tensors) {
                assert_eq!(&region[e.range()], t.data.as_slice());
            }
            let mut back = State::empty(&specs, 3);
            back.load(&table, &region, state.step, threads);
            assert!(back.diff(&state).is_empty());
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80, "tie rounds to even");
        assert_eq!(bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82, "tie rounds to even");
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert!(f32::from_bits(u32::from(bf16_bits(f32::NAN)) << 16).is_nan());
    }

    #[test]
    fn the_staging_buffer_comes_back_without_a_copy() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path().to_str().unwrap(), EngineConfig::default()).unwrap();
        let specs = specs(1 << 20);
        let table = TensorTable::packed(specs.iter().map(|(m, _)| m.clone()), DEFAULT_ALIGN).unwrap();
        let buf = vec![0u8; table.total_len() as usize];
        let ptr = buf.as_ptr();
        let snap = Snapshot { table, data: buf.into(), metadata: Vec::new() };
        engine.save("j", 1, 0, 1, &snap, BTreeMap::new()).unwrap();
        let back = reclaim(snap);
        assert_eq!(back.as_ptr(), ptr);
    }

    #[test]
    fn runs_end_to_end_on_memory_and_file_stores() {
        let mut out = Vec::new();
        let outcome = run(&small("memory://"), &mut out).unwrap();
        assert_eq!((outcome.restored_step, outcome.saves), (6, 2));
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("demo ok: restored step 6 ("), "{text}");

        // A second run on the same store numbers its steps after the first one's.
        let dir = tempfile::tempdir().unwrap();
        let store = format!("file://{}", dir.path().display());
        run(&small(&store), &mut Vec::new()).unwrap();
        let mut out = Vec::new();
        let outcome = run(&Config { keep: 1, ..small(&store) }, &mut out).unwrap();
        assert_eq!(outcome.restored_step, 12);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("committed steps [12]"), "{text}");
    }

    #[test]
    fn bad_settings_are_config_errors() {
        let ok = small("memory://");
        for cfg in [
            Config { steps: 2, ..ok.clone() },
            Config { every: 0, ..ok.clone() },
            Config { state_bytes: 0, ..ok.clone() },
            Config { job: "a/b".into(), ..ok.clone() },
            Config { store: "ftp://x".into(), ..ok.clone() },
        ] {
            let err = run(&cfg, &mut Vec::new()).unwrap_err();
            assert!(err.is_config(), "{err}");
            assert!(!err.to_string().contains('\n'), "{err}");
        }
    }

    #[test]
    fn a_diverging_state_names_the_tensor() {
        let specs = specs(1 << 20);
        let a = State::init(&specs, 1);
        let mut b = a.clone();
        b.tensors[3].data[10] ^= 1;
        let p = a.diff(&b);
        assert_eq!(p.len(), 1);
        assert!(p[0].contains(&format!("`{}`: 1 bytes differ, the first at byte 10", a.tensors[3].meta.name)), "{p:?}");
    }
}
