//! Property tests: random snapshots survive a save and restore through the [`Engine`] bit for bit,
//! and the shard index, trailer and MANIFEST codecs round-trip and never panic on hostile bytes.
//!
//! Each property runs [`DEFAULT_CASES`] cases so the file finishes in seconds; `PROPTEST_CASES`
//! overrides that as usual.

use std::collections::BTreeMap;

use bytes::Bytes;
use ckpt_core::codec::{CODEC_RAW, CODEC_ZSTD};
use ckpt_core::format::{ChunkEntry, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, TRAILER_LEN};
use ckpt_core::{
    Compression, DType, Engine, EngineConfig, Manifest, PersistConfig, ShardEntry, ShardIndex, Snapshot, TensorMeta,
    TensorTable, Trailer,
};
use proptest::prelude::*;
use proptest::sample::Index;

const DEFAULT_CASES: u32 = 48;

/// `PROPTEST_CASES` when set, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

fn config() -> ProptestConfig {
    ProptestConfig { cases: cases(DEFAULT_CASES), ..ProptestConfig::default() }
}

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

/// Scalars, small shapes (some with zero dims), zero-size tensors and long vectors that span many
/// chunks.
fn shape() -> impl Strategy<Value = Vec<u64>> {
    prop_oneof![
        1 => Just(Vec::new()),
        4 => prop::collection::vec(0u64..=12, 0..=3),
        1 => prop::collection::vec(0u64..=5, 1..=5).prop_map(|mut s| {
            s[0] = 0;
            s
        }),
        2 => (1u64..=20_000).prop_map(|n| vec![n]),
    ]
}

/// 0-12 tensors with unique names, packed at a random power-of-two alignment, with random
/// padding after the last one.
fn table() -> impl Strategy<Value = TensorTable> {
    let metas = prop::collection::vec((dtype(), shape(), "[a-z][a-z0-9_.]{0,16}"), 0..=12);
    (metas, prop::sample::select(vec![1u64, 2, 8, 64, 256]), 0u64..=100).prop_map(|(metas, align, pad)| {
        let metas =
            metas.into_iter().enumerate().map(|(i, (d, s, n))| TensorMeta::new(format!("t{i}.{n}"), d, s).unwrap());
        let packed = TensorTable::packed(metas, align).unwrap();
        TensorTable::from_entries(packed.entries().to_vec(), packed.total_len() + pad).unwrap()
    })
}

fn compression() -> impl Strategy<Value = Compression> {
    prop_oneof![Just(Compression::None), Just(Compression::Auto), (1i32..=5).prop_map(Compression::Zstd)]
}

/// How the region is filled: noise, zeros, or runs with noise in between.
#[derive(Debug, Clone, Copy)]
enum Fill {
    Noise,
    Zeros,
    Mixed,
}

fn fill(len: usize, seed: u64, how: Fill) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut x = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    match how {
        Fill::Zeros => {}
        Fill::Noise => data.chunks_mut(8).for_each(|w| w.copy_from_slice(&next().to_le_bytes()[..w.len()])),
        Fill::Mixed => {
            for block in data.chunks_mut(300) {
                let v = next();
                if v % 3 == 0 {
                    block.iter_mut().for_each(|b| *b = next() as u8);
                } else {
                    block.fill(v as u8);
                }
            }
        }
    }
    data
}

fn snapshot() -> impl Strategy<Value = Snapshot> {
    let how = prop_oneof![Just(Fill::Noise), Just(Fill::Zeros), Just(Fill::Mixed)];
    (table(), any::<u64>(), how, prop::collection::vec(any::<u8>(), 0..=300)).prop_map(
        |(table, seed, how, metadata)| {
            let data = fill(table.total_len() as usize, seed, how);
            Snapshot { table, data: Bytes::from(data), metadata }
        },
    )
}

/// A job name: 1-30 characters of `[A-Za-z0-9._-]`, never `.` or `..`.
fn job() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-][A-Za-z0-9._-]{0,29}"
}

fn user_metadata() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(any::<String>(), any::<String>(), 0..4)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn engine_round_trip(
        snap in snapshot(),
        chunk_size in prop_oneof![MIN_CHUNK_SIZE..=4096u32, MIN_CHUNK_SIZE..=(64 << 10)],
        compression in compression(),
        job in job(),
        step in any::<u64>(),
        metadata in user_metadata(),
    ) {
        let persist = PersistConfig {
            chunk_size,
            compression,
            workers: 2,
            inflight_bytes: 4 * (u64::from(chunk_size) + (5 << 20)),
            part_size: 5 << 20,
            ..PersistConfig::default()
        };
        let cfg = EngineConfig { persist, ..EngineConfig::default() };
        let engine = Engine::open("memory://", cfg).unwrap();
        let (info, m) = engine.save(&job, step, 0, 1, &snap, metadata.clone()).unwrap();
        let region = snap.table.total_len();
        prop_assert_eq!(info.region_len, region);
        prop_assert_eq!(info.chunks, region.div_ceil(u64::from(chunk_size)));
        match compression {
            Compression::None => prop_assert_eq!(info.compressed_chunks, 0),
            Compression::Zstd(_) => prop_assert_eq!(info.compressed_chunks, info.chunks),
            Compression::Auto => prop_assert!(info.compressed_chunks <= info.chunks),
        }
        let m = m.unwrap();
        prop_assert_eq!(&m.metadata, &metadata);

        // A fresh engine on the same store: nothing may come from the writer's memory.
        let reader = Engine::new(engine.store().clone(), EngineConfig::default()).unwrap();
        prop_assert_eq!(reader.latest(&job).unwrap(), Some(m.clone()));
        prop_assert_eq!(reader.manifest(&job, step).unwrap(), m);
        let (header, back) = reader.restore(&job, step, 0).unwrap();
        prop_assert_eq!(&header.index.table, &snap.table);
        prop_assert_eq!(&header.index.metadata, &snap.metadata);
        prop_assert_eq!(header.index.chunk_size, chunk_size);
        prop_assert_eq!(back.len(), snap.data.len());
        prop_assert!(back == snap.data, "restored bytes differ");
        prop_assert!(reader.verify(&job, step).unwrap().ok());
    }
}

/// Chunk sizes from the smallest to the largest a shard may declare.
fn chunk_size() -> impl Strategy<Value = u32> {
    prop_oneof![MIN_CHUNK_SIZE..=(64 << 10), Just(MAX_CHUNK_SIZE), MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE]
}

/// A valid index: a chunk table that covers the region, raw chunks at their raw length and zstd
/// chunks of 1..=raw bytes.
fn index() -> impl Strategy<Value = ShardIndex> {
    (table(), chunk_size(), 1u32..=1024, any::<u64>(), prop::collection::vec(any::<u8>(), 0..=200)).prop_flat_map(
        |(table, chunk_size, world_size, step, metadata)| {
            let n = table.total_len().div_ceil(u64::from(chunk_size)) as usize;
            let chunks = prop::collection::vec((any::<bool>(), any::<Index>(), any::<u32>()), n);
            (0..world_size, chunks).prop_map(move |(rank, chunks)| {
                let total = table.total_len();
                let chunks = chunks
                    .into_iter()
                    .enumerate()
                    .map(|(i, (zstd, len, crc32c))| {
                        let raw = (total - i as u64 * u64::from(chunk_size)).min(u64::from(chunk_size)) as usize;
                        if zstd {
                            ChunkEntry { codec: CODEC_ZSTD, stored_len: len.index(raw) as u32 + 1, crc32c }
                        } else {
                            ChunkEntry { codec: CODEC_RAW, stored_len: raw as u32, crc32c }
                        }
                    })
                    .collect();
                ShardIndex {
                    step,
                    rank,
                    world_size,
                    chunk_size,
                    table: table.clone(),
                    chunks,
                    metadata: metadata.clone(),
                }
            })
        },
    )
}

fn manifest() -> impl Strategy<Value = Manifest> {
    let shard = (any::<u64>(), any::<u32>(), any::<u64>());
    (job(), any::<u64>(), prop::collection::vec(shard, 1..=64), user_metadata()).prop_map(
        |(job, step, shards, metadata)| {
            let world = shards.len() as u32;
            let shards = shards
                .into_iter()
                .enumerate()
                .map(|(r, (size, index_crc32c, region_len))| ShardEntry {
                    rank: r as u32,
                    object: ckpt_core::store::layout::shard_object(r as u32, size),
                    size,
                    index_crc32c,
                    region_len,
                })
                .collect();
            Manifest::new(&job, step, world, shards, metadata).unwrap()
        },
    )
}

fn trailer() -> impl Strategy<Value = Trailer> {
    (0u64..=1 << 50, 0u64..=1 << 30, any::<u32>()).prop_map(|(index_offset, index_len, index_crc32c)| Trailer {
        index_offset,
        index_len,
        index_crc32c,
    })
}

/// Up to 8 byte edits and an optional truncation.
fn edits() -> impl Strategy<Value = (Vec<(Index, u8)>, Option<Index>)> {
    (prop::collection::vec((any::<Index>(), any::<u8>()), 1..=8), prop::option::weighted(0.2, any::<Index>()))
}

fn apply(mut bytes: Vec<u8>, (edits, cut): &(Vec<(Index, u8)>, Option<Index>)) -> Vec<u8> {
    if !bytes.is_empty() {
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = *value;
        }
    }
    if let Some(cut) = cut {
        bytes.truncate(cut.index(bytes.len() + 1));
    }
    bytes
}

/// Replaces a MANIFEST's checksum line with the right one for its (edited) body, so that edits
/// reach the JSON parser and the validation behind the checksum.
fn reseal_manifest(mut body: Vec<u8>) -> Vec<u8> {
    let crc = crc32c::crc32c(&body);
    body.extend_from_slice(format!("crc32c={crc:08x}\n").as_bytes());
    body
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn index_round_trips(idx in index()) {
        let bytes = idx.encode();
        prop_assert_eq!(ShardIndex::decode(&bytes).unwrap(), idx);
    }

    #[test]
    fn manifest_round_trips(m in manifest()) {
        prop_assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn trailer_round_trips(t in trailer()) {
        prop_assert_eq!(Trailer::decode(&t.encode()).unwrap(), t);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..=600)) {
        let _ = ShardIndex::decode(&bytes);
        let _ = Manifest::decode(&bytes);
        let _ = Trailer::decode(&bytes);
        if bytes.len() >= TRAILER_LEN {
            let _ = Trailer::decode(&bytes[..TRAILER_LEN]);
        }
        let _ = Manifest::decode(&reseal_manifest(bytes));
    }

    /// Edited valid indexes reach deep into the parser. Whatever it accepts is canonical: it
    /// encodes back to the very bytes it came from.
    #[test]
    fn edited_index_never_panics(idx in index(), edits in edits()) {
        let bytes = apply(idx.encode(), &edits);
        if let Ok(decoded) = ShardIndex::decode(&bytes) {
            prop_assert_eq!(decoded.encode(), bytes);
        }
    }

    #[test]
    fn edited_manifest_never_panics(m in manifest(), edits in edits()) {
        let mut bytes = m.encode();
        let body_len = bytes.len() - "crc32c=00000000\n".len();
        bytes.truncate(body_len);
        let bytes = reseal_manifest(apply(bytes, &edits));
        if let Ok(decoded) = Manifest::decode(&bytes) {
            prop_assert_eq!(Manifest::decode(&decoded.encode()).unwrap(), decoded);
        }
    }

    #[test]
    fn edited_trailer_never_panics(t in trailer(), edits in edits()) {
        let mut bytes = apply(t.encode().to_vec(), &edits);
        if bytes.len() == TRAILER_LEN {
            // Reseal, so that the edits get past the checksum.
            let crc = crc32c::crc32c(&bytes[..40]);
            bytes[40..44].copy_from_slice(&crc.to_le_bytes());
        }
        if let Ok(decoded) = Trailer::decode(&bytes) {
            prop_assert_eq!(decoded.encode().to_vec(), bytes);
        }
    }
}
