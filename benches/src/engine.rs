//! The engine benchmark: ckptd save and restore on a `file://` store, next to what the machine
//! can do with the same bytes in the same directory: a plain sequential write + fsync, a plain
//! read, and memcpy (one thread and every core).
//!
//! Reads are measured twice: warm (right after the write, with the file in the page cache) and
//! cold (after `posix_fadvise(DONTNEED)` on every file, which needs no root; it cannot evict
//! anything on tmpfs, and a virtual machine's host may still cache the disk).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use bytes::Bytes;
use ckpt_core::{DType, Engine, EngineConfig, FileIo, Snapshot, TensorMeta, TensorTable};
use rustix::fs::Advice;

use crate::machine;
use crate::units::human;

/// Block size of the plain write and read baselines.
const IO_BLOCK: usize = 8 << 20;
/// Room kept free on top of the data, in host memory and on disk.
const SLACK: u64 = 256 << 20;
/// Most repetitions accepted.
const MAX_REPS: usize = 100;
const JOB: &str = "bench";

/// What the benchmark runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Bytes per snapshot.
    pub size: u64,
    /// Repetitions of every measurement.
    pub reps: usize,
    /// Directory in which a temporary working directory is made.
    pub dir: PathBuf,
    /// Directory for `engine.json`, if any.
    pub out: Option<PathBuf>,
}

/// Why the benchmark stopped.
#[derive(Debug)]
pub enum Failure {
    /// The configuration cannot work (exit 64).
    Config(String),
    /// A measurement failed (exit 1).
    Run(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Run(e)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Run(e.into())
    }
}

/// One measured operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Memcpy1,
    MemcpyAll,
    PlainWrite,
    PlainWriteDirect,
    CkptdSave,
    CkptdSaveWriteBehind,
    CkptdSaveBuffered,
    PlainReadWarm,
    CkptdRestoreWarm,
    PlainReadCold,
    CkptdRestoreCold,
}

impl Op {
    const ALL: [Op; 11] = [
        Op::Memcpy1,
        Op::MemcpyAll,
        Op::PlainWrite,
        Op::PlainWriteDirect,
        Op::CkptdSave,
        Op::CkptdSaveWriteBehind,
        Op::CkptdSaveBuffered,
        Op::PlainReadWarm,
        Op::CkptdRestoreWarm,
        Op::PlainReadCold,
        Op::CkptdRestoreCold,
    ];

    fn label(self, cores: usize) -> String {
        match self {
            Op::Memcpy1 => "memcpy, 1 thread".into(),
            Op::MemcpyAll => format!("memcpy, {cores} threads"),
            Op::PlainWrite => "plain write + fsync".into(),
            Op::PlainWriteDirect => "plain O_DIRECT write + fsync".into(),
            Op::CkptdSave => "ckptd save (shard + commit)".into(),
            Op::CkptdSaveWriteBehind => "ckptd save, write-behind".into(),
            Op::CkptdSaveBuffered => "ckptd save, buffered".into(),
            Op::PlainReadWarm => "plain read, warm cache".into(),
            Op::CkptdRestoreWarm => "ckptd restore, warm cache".into(),
            Op::PlainReadCold => "plain read, cold cache".into(),
            Op::CkptdRestoreCold => "ckptd restore, cold cache".into(),
        }
    }

    fn key(self) -> &'static str {
        match self {
            Op::Memcpy1 => "memcpy_1",
            Op::MemcpyAll => "memcpy_all",
            Op::PlainWrite => "plain_write_fsync",
            Op::PlainWriteDirect => "plain_write_direct_fsync",
            Op::CkptdSave => "ckptd_save",
            Op::CkptdSaveWriteBehind => "ckptd_save_write_behind",
            Op::CkptdSaveBuffered => "ckptd_save_buffered",
            Op::PlainReadWarm => "plain_read_warm",
            Op::CkptdRestoreWarm => "ckptd_restore_warm",
            Op::PlainReadCold => "plain_read_cold",
            Op::CkptdRestoreCold => "ckptd_restore_cold",
        }
    }
}

/// Ratios of two operations' throughputs, paired within each repetition.
const RATIOS: [(&str, Op, Op); 10] = [
    ("ckptd save / plain write+fsync", Op::CkptdSave, Op::PlainWrite),
    ("ckptd save / plain O_DIRECT write+fsync", Op::CkptdSave, Op::PlainWriteDirect),
    ("ckptd save, write-behind / plain write+fsync", Op::CkptdSaveWriteBehind, Op::PlainWrite),
    ("ckptd save, buffered / plain write+fsync", Op::CkptdSaveBuffered, Op::PlainWrite),
    ("ckptd restore / plain read (warm)", Op::CkptdRestoreWarm, Op::PlainReadWarm),
    ("ckptd restore / plain read (cold)", Op::CkptdRestoreCold, Op::PlainReadCold),
    ("ckptd save / memcpy 1 thread", Op::CkptdSave, Op::Memcpy1),
    ("ckptd restore (warm) / memcpy 1 thread", Op::CkptdRestoreWarm, Op::Memcpy1),
    ("ckptd save / memcpy all threads", Op::CkptdSave, Op::MemcpyAll),
    ("ckptd restore (warm) / memcpy all threads", Op::CkptdRestoreWarm, Op::MemcpyAll),
];

/// The save variants: the default file write mode first, then the others on the same snapshot.
const SAVES: [(Op, FileIo); 3] = [
    (Op::CkptdSave, FileIo::Direct),
    (Op::CkptdSaveWriteBehind, FileIo::WriteBehind),
    (Op::CkptdSaveBuffered, FileIo::Buffered),
];

/// Runs the benchmark and prints its table to `out`.
pub fn run(cfg: &Config, out: &mut dyn Write) -> Result<(), Failure> {
    let (dir, size) = check(cfg)?;
    let cores = machine::cores();
    let mount = machine::mount_of(&dir);
    let work = tempfile::Builder::new().prefix("ckptd-bench-").tempdir_in(&dir).context("create the work directory")?;
    let ecfg = EngineConfig::default();

    let fs = match &mount {
        Some(m) => format!("{} ({} on {})", m.fs_type, m.source, m.point.display()),
        None => "an unknown file system (/proc/mounts unreadable)".into(),
    };
    writeln!(out, "ckptd engine benchmark: {}, {} reps", human(size as u64), cfg.reps)?;
    writeln!(out, "  dir   {} on {fs}", work.path().display())?;
    writeln!(
        out,
        "  host  {cores} cores ({}), {} RAM",
        machine::cpu_model().unwrap_or_else(|| "unknown CPU".into()),
        machine::meminfo("MemTotal").map_or_else(|| "unknown".into(), human),
    )?;
    writeln!(
        out,
        "  ckptd file:// store, {} writes, compression {}, {} chunks, {} encoder threads, {} read workers",
        ecfg.persist.file_io,
        ecfg.persist.compression,
        human(u64::from(ecfg.persist.chunk_size)),
        ecfg.persist.workers,
        ecfg.read.workers,
    )?;
    if mount.as_ref().is_some_and(machine::Mount::memory_backed) {
        writeln!(out, "  note  {fs} is memory-backed: writes never reach a disk and cold reads are warm")?;
    }
    out.flush()?;

    // Page-aligned, as an arena slot is (O_DIRECT writes need it).
    let data = page_aligned(&noise(size))?;
    let table = TensorTable::packed(
        [TensorMeta::new("bench.data", DType::U8, vec![size as u64]).context("describe the tensor")?],
        64,
    )
    .context("lay out the tensor")?;
    let snap = Snapshot { table, data: data.clone(), metadata: Vec::new() };
    let mut dst = vec![0u8; size];
    prefault(&mut dst);

    let mut samples: BTreeMap<Op, Vec<Duration>> = BTreeMap::new();
    let mut cpu: BTreeMap<Op, Vec<Duration>> = BTreeMap::new();
    let mut record = |op, d| samples.entry(op).or_default().push(d);
    for rep in 0..cfg.reps {
        record(Op::Memcpy1, timed(|| dst.copy_from_slice(&data)));
        std::hint::black_box(&mut dst);
        record(Op::MemcpyAll, timed(|| parallel_copy(&data, &mut dst, cores)));
        std::hint::black_box(&mut dst);

        let store = work.path().join(format!("store-{rep}"));
        let url = store.to_str().context("the work directory's path is not UTF-8")?;
        let step = rep as u64 + 1;
        for (op, file_io) in SAVES.into_iter().rev() {
            if file_io == ecfg.persist.file_io {
                continue;
            }
            let other = work.path().join(format!("store-{rep}-{file_io}"));
            let url = other.to_str().context("the work directory's path is not UTF-8")?;
            let mut c = ecfg.clone();
            c.persist.file_io = file_io;
            let engine = Engine::open(url, c).context("open the file:// store")?;
            let (t, used) = (Instant::now(), cpu_time());
            engine.save(JOB, step, 0, 1, &snap, BTreeMap::new()).context("ckptd save")?;
            record(op, t.elapsed());
            cpu.entry(op).or_default().push(cpu_time().saturating_sub(used));
            drop(engine);
            std::fs::remove_dir_all(&other).with_context(|| format!("remove {}", other.display()))?;
        }
        let engine = Engine::open(url, ecfg.clone()).context("open the file:// store")?;
        let (t, used) = (Instant::now(), cpu_time());
        engine.save(JOB, step, 0, 1, &snap, BTreeMap::new()).context("ckptd save")?;
        record(Op::CkptdSave, t.elapsed());
        cpu.entry(Op::CkptdSave).or_default().push(cpu_time().saturating_sub(used));
        dst.fill(0);
        let t = Instant::now();
        engine.restore_into(JOB, step, 0, &mut dst).context("ckptd restore")?;
        record(Op::CkptdRestoreWarm, t.elapsed());
        if dst[..] != data[..] {
            return Err(anyhow!("ckptd restore returned different bytes than were saved").into());
        }
        evict_tree(&store)?;
        let t = Instant::now();
        engine.restore_into(JOB, step, 0, &mut dst).context("ckptd restore")?;
        record(Op::CkptdRestoreCold, t.elapsed());
        drop(engine);
        std::fs::remove_dir_all(&store).with_context(|| format!("remove {}", store.display()))?;

        let plain = work.path().join("plain.bin");
        record(Op::PlainWriteDirect, timed_io(|| write_file_direct(&plain, &data))?);
        std::fs::remove_file(&plain).with_context(|| format!("remove {}", plain.display()))?;
        record(Op::PlainWrite, timed_io(|| write_file(&plain, &data))?);
        record(Op::PlainReadWarm, timed_io(|| read_file(&plain, &mut dst))?);
        evict(&plain)?;
        record(Op::PlainReadCold, timed_io(|| read_file(&plain, &mut dst))?);
        std::fs::remove_file(&plain).with_context(|| format!("remove {}", plain.display()))?;
    }

    report(out, &samples, size as u64, cores)?;
    writeln!(out)?;
    writeln!(out, "{:<34} {:>12} {:>16}", "CPU of the save (user+sys)", "median s", "per GB of state")?;
    for (op, _) in SAVES {
        let secs: Vec<f64> = cpu.get(&op).map(|v| v.iter().map(Duration::as_secs_f64).collect()).unwrap_or_default();
        let (m, _, _) = spread(&secs);
        writeln!(out, "{:<34} {:>12.3} {:>16.3}", op.label(cores), m, m / (size as f64 / 1e9))?;
    }
    if let Some(dir) = &cfg.out {
        let json = to_json(cfg, &samples, size as u64, cores, mount.as_ref(), ecfg.persist.chunk_size);
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let path = dir.join("engine.json");
        let text = serde_json::to_string_pretty(&json).context("encode the results")?;
        std::fs::write(&path, text + "\n").with_context(|| format!("write {}", path.display()))?;
        writeln!(out, "wrote {}", path.display())?;
    }
    Ok(())
}

/// Checks the settings against the machine: repetitions, the directory, host memory and disk.
fn check(cfg: &Config) -> Result<(PathBuf, usize), Failure> {
    let bad = |s: String| Err(Failure::Config(s));
    if !(1..=MAX_REPS).contains(&cfg.reps) {
        return bad(format!("--reps {} is outside 1..={MAX_REPS}", cfg.reps));
    }
    let Ok(size) = usize::try_from(cfg.size) else { return bad(format!("--size {} does not fit in memory", cfg.size)) };
    let dir = match cfg.dir.canonicalize() {
        Ok(d) if d.is_dir() => d,
        Ok(d) => return bad(format!("--dir {} is not a directory", d.display())),
        Err(e) => return bad(format!("--dir {}: {e}", cfg.dir.display())),
    };
    // The source bytes and the destination buffer are resident; the page cache is reclaimable.
    let need = cfg.size.saturating_mul(2).saturating_add(SLACK);
    if let Some(avail) = machine::meminfo("MemAvailable").filter(|&a| a < need) {
        return bad(format!(
            "--size {} needs about {} of host memory and {} is available: lower --size",
            human(cfg.size),
            human(need),
            human(avail)
        ));
    }
    if let Ok(vfs) = rustix::fs::statvfs(&dir) {
        let free = vfs.f_bavail.saturating_mul(vfs.f_frsize);
        let need = cfg.size.saturating_add(SLACK);
        if free < need {
            return bad(format!(
                "--dir {} has {} free and the benchmark writes {}: pass --dir on a larger file system",
                dir.display(),
                human(free),
                human(need)
            ));
        }
    }
    Ok((dir, size))
}

pub(crate) fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

pub(crate) fn timed_io(f: impl FnOnce() -> std::io::Result<()>) -> anyhow::Result<Duration> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed())
}

/// The plain baseline: a new file, sequential 8 MiB writes, one fsync.
pub(crate) fn write_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    for block in data.chunks(IO_BLOCK) {
        f.write_all(block)?;
    }
    f.sync_all()
}

/// The disk's own limit without the page cache: a new file, sequential 8 MiB `O_DIRECT` writes
/// from page-aligned memory (a last partial block buffered), one fsync. Buffered everywhere on a
/// file system that refuses `O_DIRECT`.
fn write_file_direct(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = File::create(path)?;
    let direct = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path);
    let whole = data.len() / 4096 * 4096;
    let mut at = 0;
    if let Ok(d) = &direct {
        for block in data[..whole].chunks(IO_BLOCK) {
            d.write_all_at(block, at as u64)?;
            at += block.len();
        }
    }
    f.write_all_at(&data[at..], at as u64)?;
    f.sync_all()
}

/// The plain baseline: sequential 8 MiB reads into a preallocated buffer.
pub(crate) fn read_file(path: &Path, dst: &mut [u8]) -> std::io::Result<()> {
    let mut f = File::open(path)?;
    for block in dst.chunks_mut(IO_BLOCK) {
        f.read_exact(block)?;
    }
    Ok(())
}

/// Drops a file's clean pages from the page cache.
pub(crate) fn evict(path: &Path) -> anyhow::Result<()> {
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    rustix::fs::fadvise(&f, 0, None, Advice::DontNeed).with_context(|| format!("fadvise {}", path.display()))
}

pub(crate) fn evict_tree(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() { evict_tree(&path)? } else { evict(&path)? }
    }
    Ok(())
}

pub(crate) fn parallel_copy(src: &[u8], dst: &mut [u8], threads: usize) {
    let piece = src.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let mut pieces = src.chunks(piece).zip(dst.chunks_mut(piece));
        let first = pieces.next();
        for (a, b) in pieces {
            s.spawn(move || b.copy_from_slice(a));
        }
        if let Some((a, b)) = first {
            b.copy_from_slice(a);
        }
    });
}

/// Incompressible bytes (splitmix64), so that no layer can shortcut the work.
pub(crate) fn noise(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for c in v.chunks_mut(8) {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        c.copy_from_slice(&z.to_le_bytes()[..c.len()]);
    }
    v
}

/// The process's CPU time so far, user and system.
fn cpu_time() -> Duration {
    // SAFETY: rusage is plain old data; all-zero is a valid value for getrusage to overwrite.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid out-pointer for the call's duration.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// `bytes` in page-aligned memory, as an arena slot holds a snapshot.
pub(crate) fn page_aligned(bytes: &[u8]) -> anyhow::Result<Bytes> {
    let mut map = memmap2::MmapMut::map_anon(bytes.len().max(1)).context("map anonymous memory")?;
    map[..bytes.len()].copy_from_slice(bytes);
    Ok(Bytes::from_owner(map).slice(..bytes.len()))
}

/// Touches every page, so that the first measurement does not pay for page faults.
pub(crate) fn prefault(buf: &mut [u8]) {
    buf.fill(1);
    std::hint::black_box(&mut *buf);
    buf.fill(0);
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9) / 1e9
}

/// Median (mean of the middle two for an even count), min and max.
pub(crate) fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return (0.0, 0.0, 0.0);
    }
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    (median, v[0], v[n - 1])
}

fn rates(samples: &BTreeMap<Op, Vec<Duration>>, op: Op, bytes: u64) -> Vec<f64> {
    samples.get(&op).map(|v| v.iter().map(|d| gbps(bytes, *d)).collect()).unwrap_or_default()
}

fn ratios(samples: &BTreeMap<Op, Vec<Duration>>, a: Op, b: Op, bytes: u64) -> Vec<f64> {
    rates(samples, a, bytes).iter().zip(rates(samples, b, bytes)).map(|(x, y)| x / y).collect()
}

fn report(out: &mut dyn Write, samples: &BTreeMap<Op, Vec<Duration>>, bytes: u64, cores: usize) -> std::io::Result<()> {
    writeln!(out)?;
    writeln!(out, "{:<34} {:>12} {:>16} {:>10}", "operation", "median GB/s", "min-max GB/s", "median s")?;
    for op in Op::ALL {
        let (m, lo, hi) = spread(&rates(samples, op, bytes));
        let secs: Vec<f64> =
            samples.get(&op).map(|v| v.iter().map(Duration::as_secs_f64).collect()).unwrap_or_default();
        let (ms, _, _) = spread(&secs);
        writeln!(out, "{:<34} {:>12.2} {:>16} {:>10.3}", op.label(cores), m, format!("{lo:.2}-{hi:.2}"), ms)?;
    }
    writeln!(out)?;
    writeln!(out, "{:<44} {:>8} {:>14}", "ratio (paired per rep)", "median", "min-max")?;
    for (label, a, b) in RATIOS {
        let (m, lo, hi) = spread(&ratios(samples, a, b, bytes));
        writeln!(out, "{label:<44} {m:>8.2} {:>14}", format!("{lo:.2}-{hi:.2}"))?;
    }
    writeln!(out)?;
    writeln!(out, "GB = 1e9 bytes. warm: read right after the write, with the file in the page cache.")?;
    writeln!(out, "cold: after posix_fadvise(DONTNEED) on every file (a VM's host may still cache the disk).")?;
    Ok(())
}

fn to_json(
    cfg: &Config,
    samples: &BTreeMap<Op, Vec<Duration>>,
    bytes: u64,
    cores: usize,
    mount: Option<&machine::Mount>,
    chunk_size: u32,
) -> serde_json::Value {
    let ops: serde_json::Map<String, serde_json::Value> = Op::ALL
        .iter()
        .map(|&op| {
            let secs: Vec<f64> =
                samples.get(&op).map(|v| v.iter().map(Duration::as_secs_f64).collect()).unwrap_or_default();
            let (m, lo, hi) = spread(&rates(samples, op, bytes));
            let v = serde_json::json!({ "seconds": secs, "median_gbps": m, "min_gbps": lo, "max_gbps": hi });
            (op.key().to_string(), v)
        })
        .collect();
    let ratio: serde_json::Map<String, serde_json::Value> = RATIOS
        .iter()
        .map(|&(label, a, b)| {
            let (m, lo, hi) = spread(&ratios(samples, a, b, bytes));
            (
                format!("{}/{}", a.key(), b.key()),
                serde_json::json!({ "label": label, "median": m, "min": lo, "max": hi }),
            )
        })
        .collect();
    serde_json::json!({
        "benchmark": "engine",
        "bytes": bytes,
        "reps": cfg.reps,
        "chunk_size": chunk_size,
        "machine": {
            "cores": cores,
            "cpu": machine::cpu_model(),
            "mem_total": machine::meminfo("MemTotal"),
            "dir": cfg.dir.display().to_string(),
            "fs_type": mount.map(|m| m.fs_type.clone()),
            "fs_source": mount.map(|m| m.source.clone()),
            "mount_point": mount.map(|m| m.point.display().to_string()),
        },
        "operations": ops,
        "ratios": ratio,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_middle() {
        assert_eq!(spread(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(spread(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
        assert_eq!(spread(&[]), (0.0, 0.0, 0.0));
    }

    #[test]
    fn a_tiny_run_measures_everything_and_writes_json() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config { size: 3 << 20, reps: 2, dir: dir.path().into(), out: Some(dir.path().join("out")) };
        let mut out = Vec::new();
        run(&cfg, &mut out).map_err(|e| format!("{e:?}")).unwrap();
        let text = String::from_utf8(out).unwrap();
        for op in Op::ALL {
            assert!(text.contains(&op.label(machine::cores())), "{op:?} missing:\n{text}");
        }
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/engine.json")).unwrap()).unwrap();
        assert_eq!(json["operations"]["ckptd_save"]["seconds"].as_array().unwrap().len(), 2);
        // The work directory is gone: only `out` is left.
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("out")]);
    }

    #[test]
    fn bad_settings_are_config_failures() {
        let dir = tempfile::tempdir().unwrap();
        let ok = Config { size: 1 << 20, reps: 1, dir: dir.path().into(), out: None };
        for cfg in [
            Config { reps: 0, ..ok.clone() },
            Config { dir: dir.path().join("missing"), ..ok.clone() },
            Config { size: u64::MAX / 2, ..ok.clone() },
        ] {
            assert!(matches!(run(&cfg, &mut Vec::new()), Err(Failure::Config(_))), "{cfg:?}");
        }
    }
}
