//! The store conformance suite: the same checks against `memory://`, `file://` and the loopback S3
//! server (moto, started by `scripts/test.sh`).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};

use bytes::Bytes;
use ckpt_core::{
    CommitConfig, CommitRole, Compression, DType, Engine, EngineConfig, ErrorKind, PersistConfig, RetentionPolicy,
    Snapshot, StepState, TensorMeta, TensorTable,
};

/// Small chunks so that every test spans many chunks; 5 MiB parts (S3's minimum).
fn config(compression: Compression) -> EngineConfig {
    let persist = PersistConfig {
        chunk_size: 64 << 10,
        compression,
        workers: 2,
        inflight_bytes: 4 * ((64 << 10) + (5 << 20)),
        part_size: 5 << 20,
        ..PersistConfig::default()
    };
    let commit = CommitConfig { deadline: std::time::Duration::from_secs(20), ..CommitConfig::default() };
    EngineConfig { persist, commit, ..EngineConfig::default() }
}

enum Backend {
    Memory,
    File,
    S3,
}

struct Fixture {
    engine: Engine,
    _dir: Option<tempfile::TempDir>,
}

fn open(backend: &Backend, compression: Compression) -> Option<Fixture> {
    let cfg = config(compression);
    match backend {
        Backend::Memory => Some(Fixture { engine: Engine::open("memory://", cfg).unwrap(), _dir: None }),
        Backend::File => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("file://{}", dir.path().display());
            Some(Fixture { engine: Engine::open(&url, cfg).unwrap(), _dir: Some(dir) })
        }
        Backend::S3 => {
            if !common::s3::s3_available() {
                return None;
            }
            let url = format!("s3://{}/{}", common::s3::bucket(), common::s3::unique_prefix("conformance"));
            Some(Fixture { engine: Engine::open(&url, cfg).unwrap(), _dir: None })
        }
    }
}

/// A deterministic snapshot of mixed dtypes (zero-size tensors and scalars included), about
/// `approx_bytes` large, half compressible and half noise.
fn snapshot(seed: u64, approx_bytes: usize) -> Snapshot {
    let per = (approx_bytes / 4).max(16) as u64;
    let metas = vec![
        TensorMeta::new("model.embed", DType::BF16, vec![per / 2]).unwrap(),
        TensorMeta::new("model.scalar", DType::F64, vec![]).unwrap(),
        TensorMeta::new("model.empty", DType::F32, vec![3, 0]).unwrap(),
        TensorMeta::new("optim.exp_avg", DType::F32, vec![per / 4]).unwrap(),
        TensorMeta::new("optim.step", DType::I64, vec![1]).unwrap(),
        TensorMeta::new("rng", DType::U8, vec![per]).unwrap(),
        TensorMeta::new("mask", DType::Bool, vec![17]).unwrap(),
        TensorMeta::new("c", DType::C128, vec![2, 2]).unwrap(),
    ];
    let table = TensorTable::packed(metas, 64).unwrap();
    let mut data = vec![0u8; table.total_len() as usize];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let half = data.len() / 2;
    for (i, b) in data.iter_mut().enumerate() {
        if i < half {
            *b = (i / 1024) as u8;
        } else {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    Snapshot { table, data: Bytes::from(data), metadata: format!("{{\"seed\":{seed}}}").into_bytes() }
}

fn round_trip(backend: Backend, compression: Compression) {
    let Some(f) = open(&backend, compression) else { return };
    let snap = snapshot(1, 600_000);
    let (info, m) = f.engine.save("job", 10, 0, 1, &snap, BTreeMap::from([("k".into(), "v".into())])).unwrap();
    let m = m.expect("rank 0 commits");
    assert_eq!(m.world_size, 1);
    assert_eq!(m.shards[0].size, info.size);
    assert_eq!(m.metadata.get("k").map(String::as_str), Some("v"));
    if compression == Compression::None {
        assert_eq!(info.compressed_chunks, 0);
    } else if compression == Compression::Auto {
        assert!(info.compressed_chunks > 0, "the compressible half should compress");
        assert!(info.compressed_chunks < info.chunks, "the noise half should stay raw under auto");
    } else {
        assert_eq!(info.compressed_chunks, info.chunks, "zstd mode compresses every chunk");
    }
    let (header, back) = f.engine.restore("job", 10, 0).unwrap();
    assert_eq!(header.index.table, snap.table);
    assert_eq!(header.index.metadata, snap.metadata);
    assert!(back == snap.data, "restored bytes differ");
    assert_eq!(f.engine.latest("job").unwrap().map(|m| m.step), Some(10));
    assert_eq!(f.engine.latest_valid("job").unwrap().map(|m| m.step), Some(10));
    assert!(f.engine.verify("job", 10).unwrap().ok());
}

fn concurrent_commit_has_one_winner(backend: Backend) {
    let Some(f) = open(&backend, Compression::None) else { return };
    let snap = snapshot(2, 10_000);
    let info = f.engine.write_shard("job", 5, 0, 1, &snap).unwrap();
    let racers = 6;
    let barrier = Arc::new(Barrier::new(racers));
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..racers)
            .map(|i| {
                let barrier = barrier.clone();
                let engine = f.engine.clone();
                let entry = info.entry();
                s.spawn(move || {
                    barrier.wait();
                    engine.commit("job", 5, 1, vec![entry], BTreeMap::from([("writer".into(), i.to_string())]))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "exactly one committer must win: {results:?}");
    for r in &results {
        if let Err(e) = r {
            assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        }
    }
    let stored = f.engine.manifest("job", 5).unwrap();
    assert_eq!(&stored, winners[0], "the stored manifest is the winner's");
    // A committed step is immutable: a late or retried shard write is refused.
    let e = f.engine.write_shard("job", 5, 0, 1, &snapshot(3, 10_000)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    let (_, back) = f.engine.restore("job", 5, 0).unwrap();
    assert!(back == snap.data);
}

fn uncommitted_is_invisible(backend: Backend) {
    let Some(f) = open(&backend, Compression::None) else { return };
    let snap = snapshot(3, 50_000);
    f.engine.save("job", 1, 0, 1, &snap, BTreeMap::new()).unwrap();
    // Step 2: both shards of a 2-rank step written, never committed.
    f.engine.write_shard("job", 2, 0, 2, &snap).unwrap();
    f.engine.write_shard("job", 2, 1, 2, &snap).unwrap();
    assert_eq!(f.engine.latest("job").unwrap().map(|m| m.step), Some(1));
    let steps = f.engine.steps("job").unwrap();
    assert_eq!(
        steps.iter().map(|s| (s.step, s.state)).collect::<Vec<_>>(),
        vec![(1, StepState::Committed), (2, StepState::Uncommitted)]
    );
    assert_eq!(f.engine.manifest("job", 2).unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(f.engine.restore("job", 2, 0).unwrap_err().kind(), ErrorKind::NotFound);
    // A job with nothing committed has no latest step.
    assert_eq!(f.engine.latest("other").unwrap(), None);
}

fn retention_keeps_newest(backend: Backend) {
    let Some(f) = open(&backend, Compression::None) else { return };
    let snap = snapshot(4, 20_000);
    for step in [10, 20, 30, 40] {
        f.engine.save("job", step, 0, 1, &snap, BTreeMap::new()).unwrap();
    }
    // Debris: an uncommitted step older than the newest commit, and one newer (in progress).
    f.engine.write_shard("job", 35, 0, 2, &snap).unwrap();
    f.engine.write_shard("job", 50, 0, 2, &snap).unwrap();

    let dry = f.engine.gc("job", &RetentionPolicy { keep: 2, dry_run: true, ..Default::default() }).unwrap();
    assert_eq!(dry.deleted_committed, vec![10, 20]);
    assert_eq!(f.engine.steps("job").unwrap().len(), 6, "a dry run deletes nothing");

    let report = f.engine.gc("job", &RetentionPolicy { keep: 2, ..Default::default() }).unwrap();
    assert_eq!(report.kept, vec![30, 40]);
    assert_eq!(report.deleted_committed, vec![10, 20]);
    assert_eq!(report.deleted_debris, vec![35]);
    let left: Vec<_> = f.engine.steps("job").unwrap().iter().map(|s| s.step).collect();
    assert_eq!(left, vec![30, 40, 50]);

    // keep=1 never deletes the newest committed step, and keep=0 is refused.
    let report = f.engine.gc("job", &RetentionPolicy { keep: 1, ..Default::default() }).unwrap();
    assert_eq!(report.kept, vec![40]);
    assert_eq!(f.engine.latest("job").unwrap().map(|m| m.step), Some(40));
    let (_, back) = f.engine.restore("job", 40, 0).unwrap();
    assert!(back == snap.data);
    let e = f.engine.gc("job", &RetentionPolicy { keep: 0, ..Default::default() }).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
}

fn multipart_checkpoint(backend: Backend) {
    let Some(f) = open(&backend, Compression::None) else { return };
    // About 18 MiB with 5 MiB parts: at least three parts.
    let snap = snapshot(5, 24 << 20);
    let (info, _) = f.engine.save("job", 7, 0, 1, &snap, BTreeMap::new()).unwrap();
    assert!(info.size > 3 * (5 << 20), "shard is {} bytes", info.size);
    let (_, back) = f.engine.restore("job", 7, 0).unwrap();
    assert!(back == snap.data, "multipart round trip differs");
    assert!(f.engine.verify("job", 7).unwrap().ok());
}

fn multi_rank_commit_and_deadline(backend: Backend) {
    let Some(f) = open(&backend, Compression::Auto) else { return };
    let world = 4u32;
    let snaps: Vec<_> = (0..world).map(|r| snapshot(100 + u64::from(r), 30_000)).collect();
    std::thread::scope(|s| {
        for r in (0..world).rev() {
            let engine = f.engine.clone();
            let snap = &snaps[r as usize];
            s.spawn(move || engine.save("job", 1, r, world, snap, BTreeMap::new()).unwrap());
        }
    });
    let m = f.engine.latest("job").unwrap().expect("step 1 committed");
    assert_eq!((m.step, m.world_size, m.shards.len()), (1, 4, 4));
    for r in 0..world {
        let (_, back) = f.engine.restore("job", 1, r).unwrap();
        assert!(back == snaps[r as usize].data, "rank {r} differs");
    }

    // Step 2: rank 3 dies before writing. Rank 0's committer gives up at the deadline.
    let mut cfg = config(Compression::Auto);
    cfg.commit.deadline = std::time::Duration::from_millis(300);
    let engine = Engine::new(f.engine.store().clone(), cfg).unwrap();
    for r in 1..3 {
        engine.write_shard("job", 2, r, world, &snaps[r as usize]).unwrap();
    }
    let e = engine.save("job", 2, 0, world, &snaps[0], BTreeMap::new()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("[3]"), "{e}");
    assert_eq!(engine.latest("job").unwrap().map(|m| m.step), Some(1));
}

/// Every shard write gets a name of its own, so a MANIFEST's shard can never be written over: a
/// second write of the same step and rank (a writer whose MANIFEST check raced the commit, or an
/// attempt that died and came back) lands beside it. The storage committer takes a rank's newest
/// valid write.
fn committed_shards_are_never_replaced(backend: Backend) {
    let Some(f) = open(&backend, Compression::None) else { return };
    let (first, late, other) = (snapshot(20, 40_000), snapshot(21, 40_000), snapshot(22, 40_000));
    let a = f.engine.write_shard("job", 5, 0, 2, &first).unwrap();
    let b = f.engine.write_shard("job", 5, 1, 2, &other).unwrap();
    let a2 = f.engine.write_shard("job", 5, 0, 2, &late).unwrap();
    assert_ne!(a.object, a2.object, "a second write of step 5 rank 0 took the first one's name");
    // The commit (an isolator's, from the votes) names the first write.
    f.engine.commit("job", 5, 2, vec![a.entry(), b.entry()], BTreeMap::new()).unwrap();
    let (_, back) = f.engine.restore("job", 5, 0).unwrap();
    assert!(back == first.data, "the committed shard of rank 0 changed under its MANIFEST");
    assert!(f.engine.verify("job", 5).unwrap().ok());
    let listed = f.engine.steps("job").unwrap();
    assert_eq!(listed[0].shards.len(), 3, "both writes of rank 0 stay: {:?}", listed[0].shards);

    // Rank 1 wrote step 6 twice (the first attempt died); rank 0's storage commit takes the newer.
    f.engine.write_shard("job", 6, 1, 2, &first).unwrap();
    // The tag's high bits are the clock in milliseconds: let it tick so the order is the clock's.
    std::thread::sleep(std::time::Duration::from_millis(3));
    let newer = f.engine.write_shard("job", 6, 1, 2, &late).unwrap();
    let (_, m) = f.engine.save("job", 6, 0, 2, &other, BTreeMap::new()).unwrap();
    assert_eq!(m.expect("rank 0 commits").shards[1].object, newer.object);
    let (_, back) = f.engine.restore("job", 6, 1).unwrap();
    assert!(back == late.data, "the committer took rank 1's older write");
}

/// Reading into pieces of caller memory (the way a load fills the caller's tensors): every tensor
/// into its own buffer, in any order, comes back bitwise; a piece that covers part of a tensor
/// across a chunk boundary gets exactly those bytes; overlapping pieces and pieces past the region
/// are refused before anything is read.
fn pieces_get_exactly_their_bytes(backend: Backend, compression: Compression) {
    let Some(f) = open(&backend, compression) else { return };
    let snap = snapshot(7, 600_000);
    f.engine.save("job", 3, 0, 1, &snap, BTreeMap::new()).unwrap();
    let plan = f.engine.restore_plan("job", 3, 0, 1, Default::default()).unwrap();
    assert_eq!(plan.entry.rank, 0);
    assert_eq!(plan.header.index.table, snap.table);
    let entries = snap.table.entries();
    let mut bufs: Vec<Vec<u8>> = entries.iter().map(|e| vec![0xA5; e.len as usize]).collect();
    // Last tensor first: the order the caller gives must not matter.
    let pieces = entries.iter().zip(bufs.iter_mut()).rev().map(|(e, b)| (e.offset, &mut b[..])).collect();
    f.engine.restore_pieces(&plan, ckpt_core::Pieces::new(pieces)).unwrap();
    for (e, b) in entries.iter().zip(&bufs) {
        let want = &snap.data[e.offset as usize..(e.offset + e.len) as usize];
        assert!(b[..] == *want, "tensor {} differs after a read into pieces", e.meta.name);
    }
    // Part of the biggest tensor, across the 64 KiB chunk boundaries.
    let rng = entries.iter().find(|e| e.meta.name == "rng").unwrap();
    let from = rng.offset + (64 << 10) - 100;
    let mut part = vec![0u8; 80_000];
    f.engine.restore_pieces(&plan, ckpt_core::Pieces::new(vec![(from, &mut part[..])])).unwrap();
    assert!(part[..] == snap.data[from as usize..from as usize + part.len()], "a partial piece got other bytes");
    // Overlapping pieces, and a piece past the end of the region.
    let (mut a, mut b) = (vec![0u8; 100], vec![0u8; 100]);
    let err =
        f.engine.restore_pieces(&plan, ckpt_core::Pieces::new(vec![(0, &mut a[..]), (50, &mut b[..])])).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    let end = snap.table.total_len() - 10;
    let err = f.engine.restore_pieces(&plan, ckpt_core::Pieces::new(vec![(end, &mut a[..])])).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
}

/// A hook for `commit_or_wait`'s `abort`: it never aborts, and says (once) that the wait's first
/// look is done, so a test can order what other ranks do after it.
fn looked(tx: std::sync::mpsc::Sender<u32>, rank: u32) -> impl Fn() -> Option<String> {
    let once = std::sync::Once::new();
    move || {
        once.call_once(|| tx.send(rank).unwrap());
        None
    }
}

/// The names under one step directory.
fn step_objects(engine: &Engine, step: u64) -> Vec<String> {
    let steps = engine.steps("job").unwrap();
    steps
        .iter()
        .find(|s| s.step == step)
        .map(|s| s.objects.iter().map(|o| o.name.clone()).collect())
        .unwrap_or_default()
}

/// The rank that finishes last commits; every other rank learns of the commit without writing a
/// MANIFEST, and each one's save counts because the MANIFEST names its own write.
fn the_last_rank_to_finish_commits(backend: Backend) {
    let Some(f) = open(&backend, Compression::None) else { return };
    let world = 4u32;
    let snaps: Vec<_> = (0..world).map(|r| snapshot(40 + u64::from(r), 20_000)).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        // Ranks 1 and 2 finish first: their one look finds shards missing, then they wait.
        let early: Vec<_> = [1u32, 2]
            .into_iter()
            .map(|r| {
                let (engine, snap, hook) = (f.engine.clone(), &snaps[r as usize], looked(tx.clone(), r));
                s.spawn(move || {
                    let info = engine.write_shard("job", 1, r, world, snap).unwrap();
                    let c = engine.commit_or_wait("job", 1, world, &info.entry(), CommitRole::IfLast, &hook).unwrap();
                    (info, c)
                })
            })
            .collect();
        let mut first_looks = [rx.recv().unwrap(), rx.recv().unwrap()];
        first_looks.sort_unstable();
        assert_eq!(first_looks, [1, 2]);
        // Rank 0 writes but does not look yet; rank 3 finishes last and commits.
        let zero = f.engine.write_shard("job", 1, 0, world, &snaps[0]).unwrap();
        let three = f.engine.write_shard("job", 1, 3, world, &snaps[3]).unwrap();
        let last = f.engine.commit_or_wait("job", 1, world, &three.entry(), CommitRole::IfLast, &|| None).unwrap();
        assert!(last.written.is_some(), "the last rank to finish did not commit");
        for h in early {
            let (info, c) = h.join().unwrap();
            assert!(c.written.is_none(), "rank {} wrote a MANIFEST although it was not last", info.rank);
            assert_eq!(c.manifest, last.manifest, "rank {} learned another MANIFEST", info.rank);
            assert_eq!(c.manifest.shard(info.rank).unwrap().object, info.object);
        }
        // Rank 0, the fallback committer, looks after the commit: it finds it and writes nothing.
        let c = f.engine.commit_or_wait("job", 1, world, &zero.entry(), CommitRole::Fallback, &|| None).unwrap();
        assert!(c.written.is_none(), "rank 0 wrote a MANIFEST over a committed step");
        assert_eq!(c.manifest.shard(0).unwrap().object, zero.object);
        assert_eq!(c.manifest.shard(3).unwrap().object, three.object);
    });
    let names = step_objects(&f.engine, 1);
    assert_eq!(names.iter().filter(|n| n.starts_with("MANIFEST")).count(), 1, "one MANIFEST and no debris: {names:?}");
    for r in 0..world {
        let (_, back) = f.engine.restore("job", 1, r).unwrap();
        assert!(back == snaps[r as usize].data, "rank {r} differs");
    }
}

/// Ranks that wrote their shard and then died (or whose one look raced another's) leave the step
/// to rank 0's fallback committer, which keeps looking and commits it with every rank's write.
fn the_fallback_committer_commits_what_the_last_rank_left(backend: Backend) {
    let Some(f) = open(&backend, Compression::None) else { return };
    let world = 3u32;
    let snaps: Vec<_> = (0..world).map(|r| snapshot(50 + u64::from(r), 20_000)).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let (engine, snap, hook) = (f.engine.clone(), &snaps[0], looked(tx, 0));
        let zero = s.spawn(move || {
            let info = engine.write_shard("job", 2, 0, world, snap).unwrap();
            let c = engine.commit_or_wait("job", 2, world, &info.entry(), CommitRole::Fallback, &hook).unwrap();
            (info, c)
        });
        assert_eq!(rx.recv().unwrap(), 0, "rank 0's first look");
        let others: Vec<_> =
            (1..world).map(|r| f.engine.write_shard("job", 2, r, world, &snaps[r as usize]).unwrap()).collect();
        let (info, c) = zero.join().unwrap();
        assert!(c.written.is_some(), "rank 0 did not commit the complete step");
        assert_eq!(c.manifest.shard(0).unwrap().object, info.object);
        for o in &others {
            assert_eq!(c.manifest.shard(o.rank).unwrap().object, o.object);
        }
    });
    assert!(f.engine.verify("job", 2).unwrap().ok());
}

/// A save counts only when the committed MANIFEST names its own write: a step committed with an
/// older write of the rank (an attempt that died) fails the newer save as superseded, and another
/// rank's wait is answered with the MANIFEST.
fn a_save_the_manifest_does_not_name_is_superseded(backend: Backend) {
    let Some(f) = open(&backend, Compression::None) else { return };
    let old = f.engine.write_shard("job", 3, 1, 2, &snapshot(60, 20_000)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(3));
    let new = f.engine.write_shard("job", 3, 1, 2, &snapshot(61, 20_000)).unwrap();
    let zero = f.engine.write_shard("job", 3, 0, 2, &snapshot(62, 20_000)).unwrap();
    // Another committer (an isolator, from an earlier vote) names the old write.
    let m = f.engine.commit("job", 3, 2, vec![zero.entry(), old.entry()], BTreeMap::new()).unwrap();
    let e = f.engine.commit_or_wait("job", 3, 2, &new.entry(), CommitRole::Others, &|| None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(matches!(&e, ckpt_core::Error::Superseded { rank: 1, .. }), "{e}");
    assert!(e.to_string().contains(&old.object) && e.to_string().contains(&new.object), "{e}");
    let c = f.engine.commit_or_wait("job", 3, 2, &zero.entry(), CommitRole::IfLast, &|| None).unwrap();
    assert_eq!((c.manifest, c.written), (m.clone(), None));
}

macro_rules! suite {
    ($($backend:ident => $module:ident),* $(,)?) => {$(
        mod $module {
            use super::*;
            #[test]
            fn round_trip_raw() { round_trip(Backend::$backend, Compression::None) }
            #[test]
            fn round_trip_auto() { round_trip(Backend::$backend, Compression::Auto) }
            #[test]
            fn round_trip_zstd() { round_trip(Backend::$backend, Compression::Zstd(3)) }
            #[test]
            fn concurrent_commit() { concurrent_commit_has_one_winner(Backend::$backend) }
            #[test]
            fn uncommitted_invisible() { uncommitted_is_invisible(Backend::$backend) }
            #[test]
            fn retention() { retention_keeps_newest(Backend::$backend) }
            #[test]
            fn multipart() { multipart_checkpoint(Backend::$backend) }
            #[test]
            fn multi_rank() { multi_rank_commit_and_deadline(Backend::$backend) }
            #[test]
            fn never_replaced() { committed_shards_are_never_replaced(Backend::$backend) }
            #[test]
            fn pieces_raw() { pieces_get_exactly_their_bytes(Backend::$backend, Compression::None) }
            #[test]
            fn pieces_zstd() { pieces_get_exactly_their_bytes(Backend::$backend, Compression::Zstd(3)) }
            #[test]
            fn last_commits() { the_last_rank_to_finish_commits(Backend::$backend) }
            #[test]
            fn fallback_commits() { the_fallback_committer_commits_what_the_last_rank_left(Backend::$backend) }
            #[test]
            fn superseded() { a_save_the_manifest_does_not_name_is_superseded(Backend::$backend) }
        }
    )*};
}

suite!(Memory => memory, File => file, S3 => s3);

/// A step written before manifest version 2 (untagged `rank-<r>.ckpt` shards, a version 1
/// MANIFEST) still lists, validates, verifies and restores.
#[test]
fn a_version_1_checkpoint_still_restores() {
    let Some(f) = open(&Backend::File, Compression::Auto) else { return };
    let dir = f._dir.as_ref().unwrap().path().join("job/step-3");
    let snaps: Vec<_> = (0..2).map(|r| snapshot(30 + r, 30_000)).collect();
    let mut entries = Vec::new();
    for (r, snap) in snaps.iter().enumerate() {
        let info = f.engine.write_shard("job", 3, r as u32, 2, snap).unwrap();
        let old = ckpt_core::store::layout::shard_name(r as u32);
        std::fs::rename(dir.join(&info.object), dir.join(&old)).unwrap();
        entries.push(ckpt_core::ShardEntry { object: old, ..info.entry() });
    }
    let mut m = ckpt_core::Manifest::new("job", 3, 2, entries, BTreeMap::new()).unwrap();
    m.version = ckpt_core::manifest::MANIFEST_VERSION_UNTAGGED;
    std::fs::write(dir.join("MANIFEST"), m.encode()).unwrap();

    assert_eq!(f.engine.latest_valid("job").unwrap().map(|m| (m.step, m.version)), Some((3, 1)));
    assert!(f.engine.verify("job", 3).unwrap().ok());
    for (r, snap) in snaps.iter().enumerate() {
        let (_, back) = f.engine.restore("job", 3, r as u32).unwrap();
        assert!(back == snap.data, "rank {r} of the version 1 step differs");
    }
    // The next save lands beside it under the new names, and a version 2 MANIFEST.
    let (_, next) = f.engine.save("job", 4, 0, 1, &snaps[0], BTreeMap::new()).unwrap();
    assert_eq!(next.map(|m| m.version), Some(ckpt_core::manifest::MANIFEST_VERSION));
}

/// A waiter blocked on its step directory is woken by the MANIFEST's creation and returns it.
#[test]
fn a_waiter_is_woken_by_the_manifest() {
    let Some(f) = open(&Backend::File, Compression::None) else { return };
    let snaps: Vec<_> = (0..2).map(|r| snapshot(70 + r, 20_000)).collect();
    let infos: Vec<_> = (0..2u32).map(|r| f.engine.write_shard("job", 4, r, 2, &snaps[r as usize]).unwrap()).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let (engine, own, hook) = (f.engine.clone(), infos[1].entry(), looked(tx, 1));
        let waiter = s.spawn(move || engine.commit_or_wait("job", 4, 2, &own, CommitRole::Others, &hook));
        assert_eq!(rx.recv().unwrap(), 1, "the waiter's first look");
        let m = f.engine.commit("job", 4, 2, infos.iter().map(|i| i.entry()).collect(), BTreeMap::new()).unwrap();
        let c = waiter.join().unwrap().unwrap();
        assert_eq!((c.manifest, c.written), (m, None));
    });
}

/// A shard still being written (its temporary file, whole or not) does not count: a rank that
/// lists the step then does not commit it, and waits.
#[test]
fn a_shard_being_written_does_not_complete_a_step() {
    let Some(f) = open(&Backend::File, Compression::None) else { return };
    let dir = f._dir.as_ref().unwrap().path().join("job/step-5");
    let one = f.engine.write_shard("job", 5, 1, 2, &snapshot(80, 20_000)).unwrap();
    // Rank 1's bytes are all there, under the temporary name a writer uses before its link.
    std::fs::rename(dir.join(&one.object), dir.join(format!("{}.tmp-999-0-0", one.object))).unwrap();
    let zero = f.engine.write_shard("job", 5, 0, 2, &snapshot(81, 20_000)).unwrap();
    let mut cfg = config(Compression::None);
    cfg.commit.deadline = std::time::Duration::from_millis(200);
    let impatient = Engine::new(f.engine.store().clone(), cfg).unwrap();
    let e = impatient.commit_or_wait("job", 5, 2, &zero.entry(), CommitRole::Fallback, &|| None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("[1]"), "rank 1 is named missing: {e}");
    let e = impatient.commit_or_wait("job", 5, 2, &zero.entry(), CommitRole::IfLast, &|| None).unwrap_err();
    assert!(matches!(e, ckpt_core::Error::CommitTimeout { .. }), "{e}");
    assert!(!step_objects(&f.engine, 5).iter().any(|n| n == "MANIFEST"), "a step with a shard mid-write was committed");
}
