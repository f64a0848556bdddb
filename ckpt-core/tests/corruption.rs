//! Damaged checkpoints: every single-bit flip in a shard or a MANIFEST, truncation, appended
//! bytes, misplaced and deleted shards, and a future format version.
//!
//! Each test builds two committed steps of two ranks on a `file://` store, with 512-byte chunks so
//! that a shard is about a kilobyte and holds both zstd and raw chunks, damages step 2 on disk and
//! checks what the engine says: `verify` reports the problem, `restore` fails with an error that
//! says where, and `latest_valid` (and, for damage outside the data chunks, `latest`) falls back to
//! step 1.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use ckpt_core::format::TRAILER_LEN;
use ckpt_core::{
    CommitConfig, Compression, DType, Engine, EngineConfig, Error, ErrorKind, Location, PersistConfig, ReadConfig,
    ShardEntry, ShardIndex, Snapshot, StepState, TensorMeta, TensorTable, Trailer,
};

const JOB: &str = "job";
const WORLD: u32 = 2;
const CHUNK: u32 = 512;

fn config() -> EngineConfig {
    EngineConfig {
        persist: PersistConfig {
            chunk_size: CHUNK,
            compression: Compression::Auto,
            workers: 2,
            inflight_bytes: 4 * (u64::from(CHUNK) + (5 << 20)),
            part_size: 5 << 20,
            ..PersistConfig::default()
        },
        commit: CommitConfig { deadline: Duration::from_secs(20), ..CommitConfig::default() },
        // Shards of four chunks gain nothing from parallel verification; fewer threads keep the
        // thousands of reads below fast.
        read: ReadConfig { workers: 1, ..ReadConfig::default() },
        io_threads: 1,
        ..EngineConfig::default()
    }
}

/// About 1.8 KiB in four chunks: the first kilobyte compresses, the rest is noise.
fn snapshot(step: u64, rank: u32) -> Snapshot {
    let metas = vec![
        TensorMeta::new("model.w", DType::F32, vec![16, 12]).unwrap(),
        TensorMeta::new("model.step", DType::I64, vec![]).unwrap(),
        TensorMeta::new("model.empty", DType::F32, vec![0]).unwrap(),
        TensorMeta::new("optim.b", DType::BF16, vec![512]).unwrap(),
    ];
    let table = TensorTable::packed(metas, 64).unwrap();
    let mut data = vec![0u8; table.total_len() as usize];
    let mut x = (step * 1000 + u64::from(rank)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for (i, b) in data.iter_mut().enumerate() {
        *b = if i < 1024 {
            (i / 64) as u8 ^ step as u8
        } else {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
    }
    Snapshot { table, data: Bytes::from(data), metadata: format!("{{\"step\":{step},\"rank\":{rank}}}").into_bytes() }
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    engine: Engine,
}

impl Fixture {
    /// Steps 1 and 2, two ranks each, committed.
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let engine = Engine::open(&format!("file://{}", root.display()), config()).unwrap();
        for step in [1, 2] {
            let info = engine.write_shard(JOB, step, 1, WORLD, &snapshot(step, 1)).unwrap();
            assert!(info.compressed_chunks > 0 && info.compressed_chunks < info.chunks, "{info:?}");
            let (info, m) = engine.save(JOB, step, 0, WORLD, &snapshot(step, 0), BTreeMap::new()).unwrap();
            assert!(info.compressed_chunks > 0 && info.compressed_chunks < info.chunks, "{info:?}");
            assert_eq!(m.map(|m| m.step), Some(step));
        }
        let f = Fixture { _dir: dir, root, engine };
        f.assert_sound();
        f
    }

    fn shard(&self, step: u64, rank: u32) -> PathBuf {
        let dir = self.root.join(format!("{JOB}/step-{step}"));
        common::shard_file::shard_file(&dir, rank)
            .unwrap_or_else(|| panic!("no shard of rank {rank} in {}", dir.display()))
    }

    fn manifest(&self, step: u64) -> PathBuf {
        self.root.join(format!("{JOB}/step-{step}/MANIFEST"))
    }

    fn latest(&self) -> Option<u64> {
        self.engine.latest(JOB).unwrap().map(|m| m.step)
    }

    fn latest_valid(&self) -> Option<u64> {
        self.engine.latest_valid(JOB).unwrap().map(|m| m.step)
    }

    /// Everything about step 2 is fine: a test that damages it must see the damage, not noise.
    fn assert_sound(&self) {
        assert_eq!(self.latest(), Some(2));
        assert_eq!(self.latest_valid(), Some(2));
        for step in [1, 2] {
            let report = self.engine.verify(JOB, step).unwrap();
            assert!(report.ok(), "{report:?}");
            for rank in 0..WORLD {
                let (header, data) = self.engine.restore(JOB, step, rank).unwrap();
                let want = snapshot(step, rank);
                assert_eq!(header.index.table, want.table);
                assert_eq!(header.index.metadata, want.metadata);
                assert!(data == want.data, "step {step} rank {rank} differs");
            }
        }
    }

    /// `verify` of step 2 finds a problem (or fails outright); returns the problems.
    fn verify_fails(&self, what: &str) -> Vec<String> {
        match self.engine.verify(JOB, 2) {
            Ok(report) => {
                assert!(!report.ok(), "{what}: verify reports step 2 sound: {report:?}");
                report.problems
            }
            Err(e) => vec![e.to_string()],
        }
    }

    /// `restore` of step 2 rank `rank` fails; returns the error.
    fn restore_fails(&self, rank: u32, what: &str) -> Error {
        match self.engine.restore(JOB, 2, rank) {
            Ok(_) => panic!("{what}: step 2 rank {rank} restored"),
            Err(e) => e,
        }
    }
}

/// The location of a `Corrupt` error, which must name step 2 and `rank`.
fn corrupt_location(e: &Error, rank: u32, what: &str) -> Location {
    match e {
        Error::Corrupt { location, .. } => {
            assert_eq!(location.step, Some(2), "{what}: {e}");
            assert_eq!(location.rank, Some(rank), "{what}: {e}");
            assert!(location.object.starts_with(&format!("{JOB}/step-2/rank-{rank}.")), "{what}: {e}");
            assert_eq!(
                ckpt_core::store::layout::parse_shard_name(location.object.rsplit('/').next().unwrap_or("")),
                Some(rank),
                "{what}: {e}"
            );
            location.clone()
        }
        other => panic!("{what}: expected a corruption error, got {other:?}"),
    }
}

#[test]
fn every_bit_flip_in_a_shard_is_caught() {
    let f = Fixture::new();
    let rank = 0;
    let spans_checked;
    {
        let path = f.shard(2, rank);
        let original = std::fs::read(&path).unwrap();
        let header = f.engine.shard_header(JOB, 2, rank).unwrap();
        let spans = header.index.spans();
        let data_len = header.trailer.index_offset;
        assert!(spans.len() >= 3, "{spans:?}");
        assert!(original.len() < 4096, "shard is {} bytes; keep it small", original.len());
        spans_checked = original.len() as u64;
        for pos in 0..original.len() {
            let bit = pos % 8;
            let what = format!("rank {rank} byte {pos} bit {bit}");
            let mut damaged = original.clone();
            damaged[pos] ^= 1 << bit;
            std::fs::write(&path, &damaged).unwrap();

            let problems = f.verify_fails(&what);
            let e = f.restore_fails(rank, &what);
            let location = corrupt_location(&e, rank, &what);
            if (pos as u64) < data_len {
                let span = spans.iter().find(|s| s.stored.contains(&(pos as u64))).unwrap();
                assert_eq!(location.chunk, Some(span.index), "{what}: {e}");
                assert_eq!(location.offset, Some(span.stored.start), "{what}: {e}");
                let msg = e.to_string();
                for part in ["step 2", &format!("rank {rank}"), &format!("chunk {}", span.index)] {
                    assert!(msg.contains(part), "{what}: `{msg}` does not name {part}");
                }
                assert!(msg.contains(&format!("offset {}", span.stored.start)), "{what}: `{msg}`");
                assert!(
                    problems.iter().any(|p| p.contains(&format!("chunk {}", span.index))),
                    "{what}: verify does not name the chunk: {problems:?}"
                );
                // A load into the caller's tensors (one piece per tensor) is refused the same way.
                let plan = f.engine.restore_plan(JOB, 2, rank, WORLD, Default::default()).unwrap();
                let table = &plan.header.index.table;
                let mut bufs: Vec<Vec<u8>> = table.entries().iter().map(|e| vec![0; e.len as usize]).collect();
                let pieces = table.entries().iter().zip(bufs.iter_mut()).map(|(e, b)| (e.offset, &mut b[..])).collect();
                let e = f.engine.restore_pieces(&plan, ckpt_core::Pieces::new(pieces)).unwrap_err();
                assert_eq!(corrupt_location(&e, rank, &what).chunk, Some(span.index), "{what}: {e}");
                // Only the chunks are damaged: the structure still validates.
                assert_eq!(f.latest(), Some(2), "{what}");
            } else {
                assert_eq!(location.chunk, None, "{what}: {e}");
                assert_eq!(f.latest(), Some(1), "{what}");
            }
            assert_eq!(f.latest_valid(), Some(1), "{what}");
        }
        std::fs::write(&path, &original).unwrap();
    }
    f.assert_sound();
    common::reliability::record("corruption", "shard bit flip", spans_checked);
}

#[test]
fn every_bit_flip_in_a_manifest_is_caught() {
    let f = Fixture::new();
    let path = f.manifest(2);
    let original = std::fs::read(&path).unwrap();
    for pos in 0..original.len() {
        let bit = pos % 8;
        let what = format!("MANIFEST byte {pos} bit {bit}");
        let mut damaged = original.clone();
        damaged[pos] ^= 1 << bit;
        std::fs::write(&path, &damaged).unwrap();

        match f.engine.verify(JOB, 2) {
            Ok(report) => assert!(!report.ok() && !report.manifest_ok, "{what}: {report:?}"),
            Err(e) => assert_ne!(e.kind(), ErrorKind::NotFound, "{what}: {e}"),
        }
        for rank in 0..WORLD {
            match f.restore_fails(rank, &what) {
                Error::Corrupt { location, .. } => {
                    assert_eq!(location.step, Some(2), "{what}");
                    assert_eq!(location.object, format!("{JOB}/step-2/MANIFEST"), "{what}");
                }
                other => panic!("{what}: expected a corruption error, got {other:?}"),
            }
        }
        assert_eq!(f.latest(), Some(1), "{what}");
        assert_eq!(f.latest_valid(), Some(1), "{what}");
    }
    std::fs::write(&path, &original).unwrap();
    f.assert_sound();
    common::reliability::record("corruption", "manifest bit flip", original.len() as u64);
}

/// The checks for damage that makes step 2 rank `rank` structurally invalid.
fn assert_structure_damage_caught(f: &Fixture, rank: u32, what: &str) -> Error {
    f.verify_fails(what);
    let e = f.restore_fails(rank, what);
    assert_eq!(f.latest(), Some(1), "{what}");
    assert_eq!(f.latest_valid(), Some(1), "{what}");
    e
}

#[test]
fn truncated_shard_is_caught() {
    let f = Fixture::new();
    let path = f.shard(2, 0);
    let original = std::fs::read(&path).unwrap();
    let n = original.len();
    for keep in [n - 1, n - TRAILER_LEN, n - TRAILER_LEN - 1, n / 2, TRAILER_LEN, TRAILER_LEN - 1, 0] {
        let what = format!("truncated to {keep} of {n} bytes");
        std::fs::write(&path, &original[..keep]).unwrap();
        let e = assert_structure_damage_caught(&f, 0, &what);
        corrupt_location(&e, 0, &what);
    }
    std::fs::write(&path, &original).unwrap();
    f.assert_sound();
    common::reliability::record("corruption", "truncated shard", 7);
}

#[test]
fn appended_bytes_are_caught() {
    let f = Fixture::new();
    let path = f.shard(2, 0);
    let original = std::fs::read(&path).unwrap();
    let trailer = original[original.len() - TRAILER_LEN..].to_vec();
    // One byte; a second copy of the trailer (the object still ends in a valid trailer); a page.
    for extra in [vec![0u8], trailer, vec![0xa5; 4096]] {
        let what = format!("{} bytes appended", extra.len());
        let mut longer = original.clone();
        longer.extend_from_slice(&extra);
        std::fs::write(&path, &longer).unwrap();
        let e = assert_structure_damage_caught(&f, 0, &what);
        corrupt_location(&e, 0, &what);
    }
    std::fs::write(&path, &original).unwrap();
    f.assert_sound();
    common::reliability::record("corruption", "appended bytes", 3);
}

/// The manifest entry that describes the shard file at `path` as it is.
fn entry_for(path: &Path, rank: u32) -> ShardEntry {
    let bytes = std::fs::read(path).unwrap();
    let trailer = Trailer::decode(&bytes[bytes.len() - TRAILER_LEN..]).unwrap();
    let start = trailer.index_offset as usize;
    let index = ShardIndex::decode(&bytes[start..start + trailer.index_len as usize]).unwrap();
    ShardEntry {
        rank,
        object: path.file_name().unwrap().to_str().unwrap().to_string(),
        size: bytes.len() as u64,
        index_crc32c: trailer.index_crc32c,
        region_len: index.table.total_len(),
    }
}

#[test]
fn misplaced_shards_are_caught() {
    let f = Fixture::new();

    // Another step's shard, and another rank's shard, under step 2 rank 0's name.
    let path = f.shard(2, 0);
    let original = std::fs::read(&path).unwrap();
    for (from, what) in [(f.shard(1, 0), "step 1 rank 0 copied over step 2 rank 0"), (f.shard(2, 1), "rank 1 copied")] {
        std::fs::copy(&from, &path).unwrap();
        let e = assert_structure_damage_caught(&f, 0, what);
        corrupt_location(&e, 0, what);
    }
    std::fs::write(&path, &original).unwrap();
    f.assert_sound();

    // Step 1's shards copied into a new step 3: the committer must not accept them...
    std::fs::create_dir(f.root.join(format!("{JOB}/step-3"))).unwrap();
    for rank in 0..WORLD {
        let from = f.shard(1, rank);
        std::fs::copy(&from, f.root.join(format!("{JOB}/step-3")).join(from.file_name().unwrap())).unwrap();
    }
    let cfg = config();
    let commit = CommitConfig { deadline: Duration::from_millis(200), ..cfg.commit };
    let impatient = Engine::new(f.engine.store().clone(), EngineConfig { commit, ..cfg }).unwrap();
    let e = impatient.commit_when_complete(JOB, 3, WORLD, BTreeMap::new()).unwrap_err();
    match &e {
        Error::Incomplete { step: 3, missing, .. } => assert_eq!(missing, &[0, 1], "{e}"),
        other => panic!("misplaced shards were committed or the wrong error came back: {other:?}"),
    }

    // ...and a MANIFEST that records their true sizes and checksums still does not make them
    // step 3: the shard index names step 1.
    let entries = (0..WORLD).map(|r| entry_for(&f.shard(3, r), r)).collect();
    f.engine.commit(JOB, 3, WORLD, entries, BTreeMap::new()).unwrap();
    assert_eq!(f.latest(), Some(2));
    assert_eq!(f.latest_valid(), Some(2));
    let report = f.engine.verify(JOB, 3).unwrap();
    assert!(!report.ok(), "{report:?}");
    let e = f.engine.restore(JOB, 3, 0).unwrap_err();
    match &e {
        Error::Corrupt { location, reason } => {
            assert_eq!((location.step, location.rank), (Some(3), Some(0)), "{e}");
            assert!(reason.contains("misplaced"), "{e}");
        }
        other => panic!("expected a corruption error, got {other:?}"),
    }
    common::reliability::record("corruption", "misplaced shard", 2);
}

#[test]
fn deleted_shard_of_committed_step_falls_back() {
    let f = Fixture::new();
    std::fs::remove_file(f.shard(2, 1)).unwrap();
    let steps = f.engine.steps(JOB).unwrap();
    let step2 = steps.iter().find(|s| s.step == 2).unwrap();
    assert_eq!((step2.state, step2.shard_ranks.as_slice()), (StepState::Committed, &[0u32][..]));

    let problems = f.verify_fails("rank 1 deleted");
    assert!(problems.iter().any(|p| p.contains("/rank-1.")), "{problems:?}");
    let report = f.engine.verify(JOB, 2).unwrap();
    assert!(report.shards[0].error.is_none() && report.shards[1].error.is_some(), "{report:?}");
    let e = f.restore_fails(1, "rank 1 deleted");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert_eq!(f.latest(), Some(1));
    assert_eq!(f.latest_valid(), Some(1));
    let (_, data) = f.engine.restore(JOB, 1, 1).unwrap();
    assert!(data == snapshot(1, 1).data);
    common::reliability::record("corruption", "missing shard", 1);
}

#[test]
fn future_shard_version_is_unsupported() {
    let f = Fixture::new();
    let path = f.shard(2, 0);
    let mut bytes = std::fs::read(&path).unwrap();
    let t = bytes.len() - TRAILER_LEN;
    bytes[t + 8..t + 12].copy_from_slice(&2u32.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[t..t + 40]);
    bytes[t + 40..t + 44].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();

    let problems = f.verify_fails("shard version 2");
    assert!(problems.iter().any(|p| p.contains("upgrade")), "{problems:?}");
    let e = assert_structure_damage_caught(&f, 0, "shard version 2");
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(matches!(e, Error::UnsupportedVersion { what: "shard", found: 2, supported: 1 }), "{e:?}");
    assert!(e.to_string().contains("upgrade"), "the message must say to upgrade: {e}");
    common::reliability::record("corruption", "unsupported shard version", 1);
}

#[test]
fn future_manifest_version_is_unsupported() {
    let f = Fixture::new();
    let path = f.manifest(2);
    let text = std::fs::read_to_string(&path).unwrap();
    let body = text.rsplit_once("crc32c=").unwrap().0;
    let mut json: serde_json::Value = serde_json::from_str(body).unwrap();
    json["version"] = serde_json::Value::from(ckpt_core::manifest::MANIFEST_VERSION + 1);
    let mut bytes = serde_json::to_vec_pretty(&json).unwrap();
    bytes.push(b'\n');
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(format!("crc32c={crc:08x}\n").as_bytes());
    std::fs::write(&path, &bytes).unwrap();

    let problems = f.verify_fails("a future manifest version");
    assert!(problems.iter().any(|p| p.contains("upgrade")), "{problems:?}");
    let e = assert_structure_damage_caught(&f, 0, "a future manifest version");
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("upgrade"), "the message must say to upgrade: {e}");
    common::reliability::record("corruption", "unsupported manifest version", 1);
}
