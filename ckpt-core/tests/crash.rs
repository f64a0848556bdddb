//! Crash consistency: a child process saves checkpoints in an endless loop and is killed with
//! SIGKILL at a random point; after every kill a fresh reader checks what the store holds.
//!
//! The test binary is its own child. The parent re-executes it with
//! `--exact crash_child --nocapture --test-threads=1` and [`CHILD_DIR_ENV`] (a `file://` store) or
//! [`CHILD_URL_ENV`] (any store URL) set; without either variable `crash_child` returns at once.
//! The child resumes after the newest committed step, as a restarted trainer would, and saves step
//! after step with two ranks on two threads (rank 0 commits), running retention every few steps so
//! that deletions are interrupted too. The store accumulates across kills.
//!
//! After each kill the parent opens a new [`Engine`] and requires that:
//! - `latest()` is the newest step listed as committed, and `latest_valid()` agrees;
//! - every committed step verifies fully and restores, for every rank, bitwise equal to the
//!   deterministic snapshot of that (step, rank), with the same tensor table and metadata;
//! - an uncommitted step is invisible (its manifest and shards are not found);
//! - once a step has been committed, `latest()` is never `None` again and its step never goes
//!   down (retention deletes old steps but never the newest committed one).
//!
//! The kill delays come from a seeded generator: a failure prints the seed, and
//! `CKPTD_CRASH_SEED=<seed>` replays the same delays (the child's timing still varies).

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::RangeInclusive;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use ckpt_core::store::s3_uploads;
use ckpt_core::{
    CommitConfig, Compression, DType, Engine, EngineConfig, ErrorKind, PersistConfig, RetentionPolicy, Snapshot,
    StepState, Store, StoreOptions, TensorMeta, TensorTable,
};
use rand::{Rng, SeedableRng};

/// Child mode: the directory of the `file://` store to save into.
const CHILD_DIR_ENV: &str = "CKPTD_CRASH_CHILD_DIR";
/// Child mode: the URL of any store to save into (the S3 variant).
const CHILD_URL_ENV: &str = "CKPTD_CRASH_CHILD_URL";
/// Number of kills of the `file://` test (default [`DEFAULT_ITERATIONS`]).
const ITERATIONS_ENV: &str = "CKPTD_CRASH_ITERATIONS";
/// Number of kills of the S3 test (default [`DEFAULT_S3_ITERATIONS`]).
const S3_ITERATIONS_ENV: &str = "CKPTD_CRASH_S3_ITERATIONS";
/// Seed of the kill delays; random when unset.
const SEED_ENV: &str = "CKPTD_CRASH_SEED";

const DEFAULT_ITERATIONS: u32 = 150;
const DEFAULT_S3_ITERATIONS: u32 = 8;
/// The child's test name, for `--exact`.
const CHILD_TEST: &str = "crash_child";
const JOB: &str = "crash";
const WORLD: u32 = 2;
/// The child runs retention after every step divisible by this.
const GC_EVERY: u64 = 3;
/// Committed steps retention keeps.
const KEEP: usize = 2;

/// Shard sizes: small ones for `file://`; on S3, every other step larger than a 5 MiB part so
/// that multipart uploads are interrupted too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Profile {
    Small,
    Multipart,
}

impl Profile {
    fn of_url(url: &str) -> Profile {
        if url.starts_with("file://") { Profile::Small } else { Profile::Multipart }
    }

    fn region_len(self, step: u64, rank: u32) -> usize {
        let vary = ((step * 7 + u64::from(rank) * 13) % 5) as usize;
        match self {
            Profile::Multipart if step % 2 == 0 => (6 << 20) + vary * (1 << 20),
            _ => (160 << 10) + vary * (40 << 10),
        }
    }
}

fn compression(step: u64) -> Compression {
    match step % 3 {
        0 => Compression::None,
        1 => Compression::Auto,
        _ => Compression::Zstd(1),
    }
}

/// 64 KiB chunks, 5 MiB parts (S3's minimum), a committer that polls quickly.
fn engine_config(compression: Compression) -> EngineConfig {
    EngineConfig {
        persist: PersistConfig {
            chunk_size: 64 << 10,
            compression,
            workers: 2,
            inflight_bytes: 4 * ((64 << 10) + (5 << 20)),
            part_size: 5 << 20,
            ..PersistConfig::default()
        },
        commit: CommitConfig {
            deadline: Duration::from_secs(120),
            poll: Duration::from_millis(1),
            max_poll: Duration::from_millis(10),
        },
        ..EngineConfig::default()
    }
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// The snapshot rank `rank` saves at `step`: a fixed tensor table over a region whose first part
/// is compressible and whose rest is noise, both derived from (step, rank) alone.
fn snapshot(step: u64, rank: u32, profile: Profile) -> Snapshot {
    let len = profile.region_len(step, rank) as u64;
    let metas = vec![
        TensorMeta::new("model.embed", DType::BF16, vec![len / 8]).unwrap(),
        TensorMeta::new("model.scalar", DType::F64, vec![]).unwrap(),
        TensorMeta::new("model.empty", DType::F32, vec![0, 3]).unwrap(),
        TensorMeta::new("optim.exp_avg", DType::F32, vec![len / 16]).unwrap(),
        TensorMeta::new("optim.step", DType::I64, vec![1]).unwrap(),
        TensorMeta::new("rng", DType::U8, vec![len / 4]).unwrap(),
    ];
    let table = TensorTable::packed(metas, 64).unwrap();
    let mut data = vec![0u8; table.total_len() as usize];
    // 0, 1/4, 2/4 or 3/4 of the region compresses; the rest is noise.
    let compressible = data.len() / 4 * ((step + u64::from(rank)) % 4) as usize;
    let (head, tail) = data.split_at_mut(compressible);
    for (i, block) in head.chunks_mut(512).enumerate() {
        block.fill((step as u8).wrapping_add(i as u8 / 8).wrapping_add(rank as u8));
    }
    let mut x =
        (step.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(rank + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9)) | 1;
    for word in tail.chunks_mut(8) {
        let v = xorshift(&mut x).to_le_bytes();
        word.copy_from_slice(&v[..word.len()]);
    }
    let metadata = format!("{{\"step\":{step},\"rank\":{rank}}}").into_bytes();
    // Page-aligned, as an arena slot is, so that file:// shards take the O_DIRECT path.
    let mut map = memmap2::MmapMut::map_anon(data.len()).unwrap();
    map.copy_from_slice(&data);
    Snapshot { table, data: Bytes::from_owner(map), metadata }
}

/// Whether `dir` is on a disk file system that takes O_DIRECT (ext4, xfs, btrfs).
fn direct_capable(dir: &Path) -> bool {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statfs is plain old data; all-zero is a valid value for statfs to overwrite.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `fs` a valid out-pointer for the call's duration.
    let ok = unsafe { libc::statfs(c.as_ptr(), &mut fs) } == 0;
    ok && matches!(fs.f_type, libc::EXT4_SUPER_MAGIC | libc::XFS_SUPER_MAGIC | libc::BTRFS_SUPER_MAGIC)
}

fn manifest_metadata(step: u64) -> BTreeMap<String, String> {
    BTreeMap::from([("step".to_string(), step.to_string())])
}

/// The store the child saves into, when this process is a child.
fn child_url() -> Option<String> {
    if let Some(dir) = std::env::var_os(CHILD_DIR_ENV) {
        return Some(format!("file://{}", Path::new(&dir).display()));
    }
    std::env::var(CHILD_URL_ENV).ok()
}

/// The child: saves step after step until it is killed (or its parent is gone). It is the entry
/// point the parent re-executes, not a check of its own: in a normal run it returns at once.
#[test]
fn crash_child() {
    let Some(url) = child_url() else { return };
    let profile = Profile::of_url(&url);
    let parent = std::os::unix::process::parent_id();
    let store = Store::open(&url, &StoreOptions::default()).unwrap();
    let engines: Vec<Engine> =
        (0..3).map(|s| Engine::new(store.clone(), engine_config(compression(s))).unwrap()).collect();
    let start = engines[0].latest(JOB).unwrap().map_or(1, |m| m.step + 1);
    // Raw shards on a disk are written with O_DIRECT: the kills interrupt that path too.
    let direct = std::env::var_os(CHILD_DIR_ENV).is_some_and(|d| direct_capable(Path::new(&d)));
    // What the committer (rank 0) does before it commits anything (the trainer library does it
    // when it opens): shards killed predecessors left of steps that never committed go, or a
    // re-save of such a step could be committed with a stale shard of another rank.
    engines[0].discard_stale_shards(JOB).unwrap();
    for step in start.. {
        // A parent that died without killing us must not leave us running forever.
        if std::os::unix::process::parent_id() != parent {
            return;
        }
        let engine = &engines[(step % 3) as usize];
        std::thread::scope(|s| {
            for rank in 0..WORLD {
                s.spawn(move || {
                    let snap = snapshot(step, rank, profile);
                    let (info, m) = engine.save(JOB, step, rank, WORLD, &snap, manifest_metadata(step)).unwrap();
                    assert_eq!((info.step, info.rank), (step, rank));
                    if direct && compression(step) == Compression::None {
                        assert!(
                            info.direct_bytes > 0,
                            "step {step}: a raw shard on a disk was not written with O_DIRECT"
                        );
                    }
                    assert_eq!(m.is_some(), rank == 0, "rank 0 and only rank 0 commits");
                });
            }
        });
        if step % GC_EVERY == 0 {
            engine.gc(JOB, &RetentionPolicy { keep: KEEP, ..RetentionPolicy::default() }).unwrap();
        }
    }
}

/// Checks what a fresh reader sees; returns the latest step.
fn check_store(url: &str, profile: Profile, previous: Option<u64>) -> anyhow::Result<Option<u64>> {
    let engine = Engine::open(url, EngineConfig::default())?;
    let steps = engine.steps(JOB)?;
    let committed: Vec<u64> = steps.iter().filter(|s| s.state == StepState::Committed).map(|s| s.step).collect();
    let latest = engine.latest(JOB)?.map(|m| m.step);
    ensure!(
        latest == committed.last().copied(),
        "latest() is {latest:?}, the newest committed step is {:?}; steps: {steps:?}",
        committed.last()
    );
    let latest_valid = engine.latest_valid(JOB)?.map(|m| m.step);
    ensure!(latest_valid == latest, "latest_valid() is {latest_valid:?}, latest() is {latest:?}");
    if let Some(prev) = previous {
        ensure!(latest.is_some_and(|l| l >= prev), "latest() went from step {prev} to {latest:?}; steps: {steps:?}");
    }
    for &step in &committed {
        let report = engine.verify(JOB, step)?;
        ensure!(report.ok(), "committed step {step} fails verification: {:?}", report.problems);
        let m = engine.manifest(JOB, step)?;
        ensure!(m.world_size == WORLD, "step {step} has world size {}", m.world_size);
        ensure!(m.metadata == manifest_metadata(step), "step {step} has metadata {:?}", m.metadata);
        for rank in 0..WORLD {
            let (header, data) = engine.restore(JOB, step, rank).with_context(|| format!("restore step {step}"))?;
            let want = snapshot(step, rank, profile);
            ensure!(header.index.table == want.table, "step {step} rank {rank}: tensor table differs");
            ensure!(header.index.metadata == want.metadata, "step {step} rank {rank}: metadata differs");
            ensure!(data.len() == want.data.len(), "step {step} rank {rank}: {} bytes restored", data.len());
            ensure!(data == want.data, "step {step} rank {rank}: restored bytes differ");
        }
    }
    for s in steps.iter().filter(|s| s.state == StepState::Uncommitted) {
        let e = engine.restore(JOB, s.step, 0).err().with_context(|| format!("uncommitted {s:?} restored"))?;
        ensure!(e.kind() == ErrorKind::NotFound, "restore of uncommitted step {}: {e}", s.step);
    }
    Ok(latest)
}

/// Multipart uploads still pending under the job, when the store is S3.
fn pending_uploads(url: &str) -> anyhow::Result<Vec<s3_uploads::PendingUpload>> {
    let store = Store::open(url, &StoreOptions::default())?;
    let prefix = format!("{}/", store.path(JOB));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    Ok(rt.block_on(s3_uploads::list_pending(&store, &prefix))?)
}

struct Run<'a> {
    url: &'a str,
    /// The child's environment variable and its value.
    child_env: (&'static str, String),
    iterations: u32,
    kill_after_ms: RangeInclusive<u64>,
    seed: u64,
    log: &'a Path,
}

/// Spawns, kills and checks `run.iterations` times; returns the final latest step.
fn run_kills(run: &Run<'_>) -> anyhow::Result<Option<u64>> {
    let profile = Profile::of_url(run.url);
    let exe = std::env::current_exe()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(run.seed);
    let mut latest = None;
    for i in 0..run.iterations {
        let log = File::create(run.log)?;
        let mut child = Command::new(&exe)
            .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
            .env_remove(CHILD_DIR_ENV)
            .env_remove(CHILD_URL_ENV)
            .env(run.child_env.0, &run.child_env.1)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let delay = rng.random_range(run.kill_after_ms.clone());
        std::thread::sleep(Duration::from_millis(delay));
        let exited = match child.try_wait()? {
            Some(status) => Some(status),
            None => {
                child.kill()?;
                Some(child.wait()?).filter(|status| status.signal() != Some(libc::SIGKILL))
            }
        };
        let output = std::fs::read_to_string(run.log)?;
        if let Some(status) = exited {
            bail!("iteration {i}: the child exited on its own ({status}) before the kill at {delay} ms:\n{output}");
        }
        // A panic that was still unwinding (or printing its backtrace) when the kill came.
        ensure!(!output.contains("panicked"), "iteration {i}: the child panicked before the kill:\n{output}");
        latest =
            check_store(run.url, profile, latest).with_context(|| format!("iteration {i}, killed after {delay} ms"))?;
    }
    let store = if run.url.starts_with("s3://") { "engine (s3)" } else { "engine (file)" };
    common::reliability::record("sigkill", store, u64::from(run.iterations));
    Ok(latest)
}

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

fn seed() -> u64 {
    std::env::var(SEED_ENV).ok().and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        now.as_nanos() as u64 ^ u64::from(std::process::id())
    })
}

#[test]
fn file_store_survives_sigkill() {
    // On the build directory's disk, not /tmp (often tmpfs), so that shards go through O_DIRECT.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store_dir = dir.path().join("store");
    std::fs::create_dir(&store_dir).unwrap();
    let url = format!("file://{}", store_dir.display());
    let log = dir.path().join("child.log");
    let seed = seed();
    let iterations = env_u32(ITERATIONS_ENV, DEFAULT_ITERATIONS);
    let run = Run {
        url: &url,
        child_env: (CHILD_DIR_ENV, store_dir.display().to_string()),
        iterations,
        kill_after_ms: 20..=400,
        seed,
        log: &log,
    };
    let latest = run_kills(&run).unwrap_or_else(|e| panic!("{e:#}\n(reproduce with {SEED_ENV}={seed})"));
    // The child must have got somewhere, or the checks above checked nothing.
    let latest = latest.unwrap_or(0);
    assert!(latest >= 10, "only {latest} steps committed in {iterations} runs ({SEED_ENV}={seed})");
}

#[test]
fn s3_store_survives_sigkill() {
    if !common::s3::s3_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!("s3://{}/{}", common::s3::bucket(), common::s3::unique_prefix("crash"));
    let log = dir.path().join("child.log");
    let seed = seed();
    let iterations = env_u32(S3_ITERATIONS_ENV, DEFAULT_S3_ITERATIONS);
    let run = Run {
        url: &url,
        child_env: (CHILD_URL_ENV, url.clone()),
        iterations,
        kill_after_ms: 200..=2500,
        seed,
        log: &log,
    };
    let fail = |e: anyhow::Error| -> ! { panic!("{e:#}\n(reproduce with {SEED_ENV}={seed})") };
    let latest = run_kills(&run).unwrap_or_else(|e| fail(e)).unwrap_or(0);
    assert!(latest >= 2, "only {latest} steps committed in {iterations} runs ({SEED_ENV}={seed})");

    // Retention aborts the uploads the kills left behind, except those of steps newer than the
    // newest commit, which may still be in progress.
    let engine = Engine::open(&url, EngineConfig::default()).unwrap();
    engine.gc(JOB, &RetentionPolicy { keep: KEEP, ..RetentionPolicy::default() }).unwrap();
    let left = pending_uploads(&url).unwrap_or_else(|e| fail(e));
    let stale: Vec<_> = left
        .iter()
        .filter(|u| {
            let step = u.key.rsplit('/').nth(1).and_then(ckpt_core::store::layout::parse_step_dir);
            step.is_none_or(|s| s <= latest)
        })
        .collect();
    assert!(stale.is_empty(), "retention left superseded uploads: {stale:?} (latest step {latest})");
    check_store(&url, Profile::Multipart, Some(latest)).unwrap_or_else(|e| fail(e));
}
