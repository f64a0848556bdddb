//! How `file://` shards reach the disk ([`FileIo`]): every mode writes the same bytes, restores
//! bitwise and verifies; `O_DIRECT` is really taken on a disk file system for page-aligned raw
//! chunks, and never on tmpfs or for memory that is not page-aligned.
//!
//! The disk case writes under `CARGO_TARGET_TMPDIR` (the build directory, on a disk); the tmpfs
//! case under `/dev/shm`. A case whose directory is not of the expected kind says so and checks
//! only correctness.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use ckpt_core::{
    Compression, DType, Engine, EngineConfig, FileIo, PersistConfig, ShardInfo, Snapshot, TensorMeta, TensorTable,
};

const CHUNK: u32 = 64 << 10;
const ALIGN: u64 = ckpt_core::persist::DIRECT_ALIGN;
const JOB: &str = "direct";

/// The file system under `dir`: `Some(true)` for tmpfs, `Some(false)` for a disk file system
/// known to take `O_DIRECT` (ext4, xfs, btrfs), `None` for anything else.
fn tmpfs(dir: &Path) -> Option<bool> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statfs is plain old data; all-zero is a valid value for statfs to overwrite.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `fs` a valid out-pointer for the call's duration.
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut fs) }, 0, "statfs {}", dir.display());
    match fs.f_type {
        libc::TMPFS_MAGIC => Some(true),
        libc::EXT4_SUPER_MAGIC | libc::XFS_SUPER_MAGIC | libc::BTRFS_SUPER_MAGIC => Some(false),
        _ => None,
    }
}

/// `bytes` copied into page-aligned memory, as an arena slot holds a snapshot.
fn page_aligned(bytes: &[u8]) -> Bytes {
    let mut map = memmap2::MmapMut::map_anon(bytes.len().max(1)).unwrap();
    map[..bytes.len()].copy_from_slice(bytes);
    Bytes::from_owner(map).slice(..bytes.len())
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A snapshot of `len` region bytes: a zero-length tensor, a scalar, and one byte tensor holding
/// the rest (half compressible, half noise).
fn snapshot(len: u64, aligned: bool) -> Snapshot {
    let metas = if len == 0 {
        vec![TensorMeta::new("empty", DType::F32, vec![0, 4]).unwrap()]
    } else {
        vec![
            TensorMeta::new("empty", DType::F32, vec![0, 4]).unwrap(),
            TensorMeta::new("bytes", DType::U8, vec![len]).unwrap(),
        ]
    };
    let table = TensorTable::packed(metas, 64).unwrap();
    let total = table.total_len() as usize;
    let mut data = noise(total, len ^ 0x5eed);
    data[..total / 2].iter_mut().enumerate().for_each(|(i, b)| *b = (i / 512) as u8);
    let data = if aligned { page_aligned(&data) } else { Bytes::from(data) };
    Snapshot { table, data, metadata: format!("len={len}").into_bytes() }
}

fn engine(dir: &Path, file_io: FileIo, compression: Compression) -> Engine {
    let persist = PersistConfig {
        chunk_size: CHUNK,
        compression,
        workers: 2,
        inflight_bytes: 4 * (u64::from(CHUNK) + (5 << 20)),
        part_size: 5 << 20,
        file_io,
        ..PersistConfig::default()
    };
    Engine::open(&format!("file://{}", dir.display()), EngineConfig { persist, ..EngineConfig::default() }).unwrap()
}

/// Saves, verifies and restores `snap` as `step`; returns the shard's info and file bytes.
fn round_trip(engine: &Engine, dir: &Path, step: u64, snap: &Snapshot) -> (ShardInfo, Vec<u8>) {
    let (info, manifest) = engine.save(JOB, step, 0, 1, snap, BTreeMap::new()).unwrap();
    assert!(manifest.is_some(), "a one-rank save commits");
    let report = engine.verify(JOB, step).unwrap();
    assert!(report.ok(), "step {step}: {:?}", report.problems);
    let (header, data) = engine.restore(JOB, step, 0).unwrap();
    assert_eq!(header.index.table, snap.table, "step {step}: table");
    assert_eq!(header.index.metadata, snap.metadata, "step {step}: metadata");
    assert!(data == snap.data, "step {step}: restored bytes differ");
    let file = dir.join(JOB).join(format!("step-{step}")).join(&info.object);
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(bytes.len() as u64, info.size);
    (info, bytes)
}

/// Region sizes around every boundary: a block, a chunk, several chunks.
fn sizes() -> Vec<u64> {
    let c = u64::from(CHUNK);
    vec![0, 1, ALIGN - 1, ALIGN, ALIGN + 1, c - 1, c, c + 1, 3 * c + 5]
}

/// Every mode and compression writes the same shard bytes for the same snapshot (the format does
/// not depend on how the file was written), and `O_DIRECT` carries exactly the region's whole
/// blocks when the region is raw and page-aligned on a disk.
fn check_dir(dir: &Path, expect_direct: Option<bool>) {
    let mut step = 0;
    for compression in [Compression::None, Compression::Zstd(1), Compression::Auto] {
        for len in sizes() {
            let snap = snapshot(len, true);
            let mut files = Vec::new();
            step += 1;
            for file_io in [FileIo::Direct, FileIo::WriteBehind, FileIo::Buffered] {
                let store = dir.join(format!("{file_io}"));
                let (info, bytes) = round_trip(&engine(&store, file_io, compression), &store, step, &snap);
                let region = snap.table.total_len();
                let whole_blocks = region / ALIGN * ALIGN;
                match (file_io, compression, expect_direct) {
                    (FileIo::Direct, Compression::None, Some(true)) => {
                        assert_eq!(
                            info.direct_bytes, whole_blocks,
                            "{len} bytes: O_DIRECT must carry every whole block"
                        )
                    }
                    (FileIo::Direct, _, None) => {}
                    (FileIo::Direct, _, Some(true)) => assert!(info.direct_bytes <= whole_blocks),
                    _ => assert_eq!(info.direct_bytes, 0, "{file_io} {compression} {len} bytes"),
                }
                files.push(bytes);
            }
            assert!(files.windows(2).all(|w| w[0] == w[1]), "{compression} {len} bytes: modes wrote different shards");
        }
    }
}

fn disk_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

#[test]
#[allow(clippy::print_stderr)]
fn o_direct_on_a_disk_writes_the_same_shards_and_is_taken() {
    let dir = disk_dir();
    let expect = match tmpfs(dir.path()) {
        Some(false) => Some(true),
        Some(true) => Some(false),
        None => {
            eprintln!(
                "{} is neither tmpfs nor a known disk file system: checking correctness only",
                dir.path().display()
            );
            None
        }
    };
    check_dir(dir.path(), expect);
}

#[test]
#[allow(clippy::print_stderr)]
fn tmpfs_falls_back_to_buffered_writes() {
    let shm = PathBuf::from("/dev/shm");
    if tmpfs(&shm) != Some(true) {
        eprintln!("/dev/shm is not tmpfs here: nothing to check");
        return;
    }
    let dir = tempfile::tempdir_in(&shm).unwrap();
    check_dir(dir.path(), Some(false));
}

#[test]
fn memory_that_is_not_page_aligned_is_written_buffered() {
    let dir = disk_dir();
    let len = 3 * u64::from(CHUNK) + 5;
    // A Vec's heap pointer is not page-aligned in general; an offset of one byte makes sure.
    let aligned = snapshot(len, true);
    let mut shifted = vec![0u8; aligned.data.len() + 1];
    shifted[1..].copy_from_slice(&aligned.data);
    let snap = Snapshot { data: page_aligned(&shifted).slice(1..), ..aligned.clone() };
    assert_ne!(snap.data.as_ptr() as u64 % ALIGN, 0);
    let e = engine(dir.path(), FileIo::Direct, Compression::None);
    let (info, unaligned_file) = round_trip(&e, dir.path(), 1, &snap);
    assert_eq!(info.direct_bytes, 0);
    let (info, aligned_file) = round_trip(&e, dir.path(), 2, &aligned);
    if tmpfs(dir.path()) == Some(false) {
        assert!(info.direct_bytes > 0, "page-aligned memory on a disk must take O_DIRECT");
    }
    // Same content, same shard, but for the step number in the index (and so its checksums).
    assert_eq!(unaligned_file.len(), aligned_file.len());
    assert!(unaligned_file[..len as usize] == aligned_file[..len as usize]);
}
