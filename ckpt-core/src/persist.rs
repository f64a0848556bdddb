//! The persist pipeline: a snapshot region → one shard object on a store.
//!
//! The region is cut into fixed-size chunks. A bounded pool of encoder threads, fed by a bounded
//! crossbeam channel, computes each chunk's crc32c and compresses it when the mode asks. The calling
//! thread puts the chunks back in order and streams them to a sink:
//!
//! - `file://`: pwrite into a temporary file next to the shard, fsync, link create-only (a stale
//!   shard of a step that never committed is replaced, never one of a committed step), fsync the
//!   directory;
//! - object stores: a multipart upload whose parts go up in parallel, or one PUT for a small shard.
//!
//! Memory in flight is bounded by [`PersistConfig::inflight_bytes`] whatever the snapshot's size:
//! half for chunks being encoded or reordered, half for parts being uploaded. Raw chunks are never
//! copied: the sink gets slices of the region itself.
//!
//! A failed write aborts the upload (or removes the temporary file). A shard is only ever visible
//! complete, and even then the step stays invisible until its MANIFEST is committed.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{MultipartUpload, ObjectStoreExt, PutPayload};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::codec::{CODEC_RAW, CODEC_ZSTD, Compression, Encoded, Encoder};
use crate::durable;
use crate::error::{Error, Result};
use crate::format::{self, ChunkEntry, ShardIndex, Trailer};
use crate::manifest::ShardEntry;
use crate::store::{Store, layout};
use crate::tensor::TensorTable;

/// Smallest multipart part S3 accepts (except for the last part).
pub const MIN_PART_SIZE: u64 = 5 << 20;

/// How shards are written.
#[derive(Debug, Clone)]
pub struct PersistConfig {
    /// Raw bytes per chunk.
    pub chunk_size: u32,
    /// Chunk compression.
    pub compression: Compression,
    /// Encoder threads (crc32c + compression).
    pub workers: usize,
    /// Upper bound on bytes held in flight by one shard write (encoded chunks waiting to be
    /// written plus parts being uploaded).
    pub inflight_bytes: u64,
    /// Target size of one multipart part; a shard smaller than this is written with one PUT.
    pub part_size: u64,
}

impl Default for PersistConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        PersistConfig {
            chunk_size: format::DEFAULT_CHUNK_SIZE,
            compression: Compression::None,
            workers: cores.clamp(1, 8),
            inflight_bytes: 256 << 20,
            part_size: 16 << 20,
        }
    }
}

impl PersistConfig {
    /// Checks the settings against the format's and the stores' limits.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason: String| Err(Error::InvalidConfig { field, reason });
        if !(format::MIN_CHUNK_SIZE..=format::MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return bad(
                "chunk_size",
                format!("{} is outside {}..={}", self.chunk_size, format::MIN_CHUNK_SIZE, format::MAX_CHUNK_SIZE),
            );
        }
        if self.workers == 0 || self.workers > 256 {
            return bad("workers", format!("{} is outside 1..=256", self.workers));
        }
        if self.part_size < MIN_PART_SIZE {
            return bad("part_size", format!("{} is below S3's minimum part of {MIN_PART_SIZE} bytes", self.part_size));
        }
        let need = 2 * (u64::from(self.chunk_size) + self.part_size);
        if self.inflight_bytes < need {
            return bad(
                "inflight_bytes",
                format!(
                    "{} bytes cannot hold two chunks and two parts ({need} bytes): raise it or lower chunk_size/part_size",
                    self.inflight_bytes
                ),
            );
        }
        Ok(())
    }

    /// Chunks allowed between encoding and writing.
    fn chunk_window(&self) -> u64 {
        (self.inflight_bytes / 2 / u64::from(self.chunk_size)).max(2)
    }

    /// Parts allowed to upload at once.
    fn parallel_parts(&self) -> usize {
        (self.inflight_bytes / 2 / self.part_size).max(1) as usize
    }
}

/// What one rank persists: a contiguous region, the table that places tensors in it, and opaque
/// user metadata.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Where each tensor lies in `data`.
    pub table: TensorTable,
    /// The region; its length is `table.total_len()`. An arena slot is wrapped with
    /// `Bytes::from_owner`, so nothing is copied.
    pub data: Bytes,
    /// Opaque user metadata stored in the shard index.
    pub metadata: Vec<u8>,
}

impl Snapshot {
    /// Checks that the region matches the table.
    pub fn validate(&self) -> Result<()> {
        if self.data.len() as u64 != self.table.total_len() {
            return Err(Error::InvalidTensor {
                name: "<snapshot>".into(),
                reason: format!("region is {} bytes, the table needs {}", self.data.len(), self.table.total_len()),
            });
        }
        if self.metadata.len() > format::MAX_METADATA_LEN as usize {
            return Err(Error::InvalidConfig {
                field: "metadata",
                reason: format!("{} bytes exceed the {}-byte cap", self.metadata.len(), format::MAX_METADATA_LEN),
            });
        }
        Ok(())
    }
}

/// What a completed shard write produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    /// The step.
    pub step: u64,
    /// The rank.
    pub rank: u32,
    /// The shard's object name in its step directory (`rank-<r>.<tag>.ckpt`).
    pub object: String,
    /// World size recorded in the shard.
    pub world_size: u32,
    /// Object size in bytes.
    pub size: u64,
    /// crc32c of the index: the shard's checksum in the manifest.
    pub index_crc32c: u32,
    /// Raw region size.
    pub region_len: u64,
    /// Chunks stored compressed.
    pub compressed_chunks: u64,
    /// All chunks.
    pub chunks: u64,
}

impl ShardInfo {
    /// The manifest entry for this shard.
    pub fn entry(&self) -> ShardEntry {
        ShardEntry {
            rank: self.rank,
            object: self.object.clone(),
            size: self.size,
            index_crc32c: self.index_crc32c,
            region_len: self.region_len,
        }
    }
}

/// Identity of the shard being written.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ShardId<'a> {
    pub job: &'a str,
    pub step: u64,
    pub rank: u32,
    pub world_size: u32,
}

/// Writes one shard. Blocking: call it from a plain thread or `spawn_blocking`, never from an async
/// task.
pub(crate) fn write_shard(
    store: &Store,
    rt: &Handle,
    cfg: &PersistConfig,
    id: ShardId<'_>,
    snap: &Snapshot,
) -> Result<ShardInfo> {
    cfg.validate()?;
    snap.validate()?;
    if id.world_size == 0 || id.rank >= id.world_size {
        return Err(Error::InvalidConfig {
            field: "rank",
            reason: format!("rank {} is outside world size {}", id.rank, id.world_size),
        });
    }
    layout::validate_job(id.job)?;
    // A committed step is immutable: a retried or late save must not replace a shard under its
    // MANIFEST (the isolator's or rank 0's commit may already have landed).
    let manifest = store.path(&layout::manifest_path(id.job, id.step));
    match rt.block_on(store.object_store().head(&manifest)) {
        Ok(_) => return Err(Error::Conflict { job: id.job.to_string(), step: id.step }),
        Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(Error::store("head", &manifest, e)),
    }
    let object = layout::shard_object(id.rank, layout::new_shard_tag());
    let rel = layout::object_path(id.job, id.step, &object);
    let path = store.path(&rel);
    let mut sink: Box<dyn Sink> = match store.local_file(&path) {
        Some(file) => Box::new(LocalSink::create(file, id.job, id.step)?),
        None => Box::new(ObjectSink::new(store.clone(), rt.clone(), path, cfg)),
    };
    match encode_into(cfg, id, snap, sink.as_mut()) {
        Ok((index, info_tail)) => {
            let (tail, trailer) = info_tail;
            sink.finish(tail)?;
            let compressed_chunks = index.chunks.iter().filter(|c| c.codec == CODEC_ZSTD).count() as u64;
            let info = ShardInfo {
                step: id.step,
                rank: id.rank,
                object,
                world_size: id.world_size,
                size: trailer.shard_len(),
                index_crc32c: trailer.index_crc32c,
                region_len: snap.table.total_len(),
                compressed_chunks,
                chunks: index.chunks.len() as u64,
            };
            tracing::debug!(job = id.job, step = id.step, rank = id.rank, bytes = info.size, "shard written");
            Ok(info)
        }
        Err(e) => {
            sink.abort();
            Err(e)
        }
    }
}

type Tail = (Bytes, Trailer);

fn encode_into(
    cfg: &PersistConfig,
    id: ShardId<'_>,
    snap: &Snapshot,
    sink: &mut dyn Sink,
) -> Result<(ShardIndex, Tail)> {
    let chunk = u64::from(cfg.chunk_size);
    let total = snap.table.total_len();
    let n = crate::format::index_chunk_count(total, cfg.chunk_size);
    let window = cfg.chunk_window();
    let workers = cfg.workers.min(n.max(1) as usize);
    let data = &snap.data;
    let mut entries = Vec::with_capacity(n as usize);

    std::thread::scope(|scope| -> Result<()> {
        let (job_tx, job_rx) = crossbeam_channel::bounded::<u64>(window as usize);
        let (res_tx, res_rx) = crossbeam_channel::bounded::<(u64, Result<Encoded>)>(window as usize);
        for w in 0..workers {
            let job_rx = job_rx.clone();
            let res_tx = res_tx.clone();
            let mode = cfg.compression;
            std::thread::Builder::new()
                .name(format!("ckpt-encode-{w}"))
                .spawn_scoped(scope, move || {
                    let mut encoder = match Encoder::new(mode) {
                        Ok(e) => e,
                        Err(e) => {
                            let _ = res_tx.send((u64::MAX, Err(e)));
                            return;
                        }
                    };
                    for i in job_rx {
                        let start = (i * chunk) as usize;
                        let end = ((i + 1) * chunk).min(total) as usize;
                        if res_tx.send((i, encoder.encode(&data[start..end]))).is_err() {
                            return;
                        }
                    }
                })
                .map_err(|e| Error::Cancelled { reason: format!("cannot start encoder thread: {e}") })?;
        }
        drop(job_rx);
        drop(res_tx);

        let mut next_submit = 0u64;
        let mut next_write = 0u64;
        let mut pending: BTreeMap<u64, Encoded> = BTreeMap::new();
        while next_write < n {
            while next_submit < n && next_submit < next_write + window {
                // Capacity equals the window, so this never blocks for long.
                job_tx.send(next_submit).map_err(|_| Error::Cancelled { reason: "encoder threads exited".into() })?;
                next_submit += 1;
            }
            let (i, res) = res_rx.recv().map_err(|_| Error::Cancelled { reason: "encoder threads exited".into() })?;
            pending.insert(i, res?);
            while let Some(enc) = pending.remove(&next_write) {
                let start = next_write * chunk;
                let end = ((next_write + 1) * chunk).min(total);
                let (bytes, entry) = match enc {
                    Encoded::Raw { crc } => (
                        data.slice(start as usize..end as usize),
                        ChunkEntry { codec: CODEC_RAW, stored_len: (end - start) as u32, crc32c: crc },
                    ),
                    Encoded::Zstd { data: z, crc } => {
                        let len = z.len() as u32;
                        (Bytes::from(z), ChunkEntry { codec: CODEC_ZSTD, stored_len: len, crc32c: crc })
                    }
                };
                sink.write(bytes)?;
                entries.push(entry);
                next_write += 1;
            }
        }
        Ok(())
    })?;

    let index = ShardIndex {
        step: id.step,
        rank: id.rank,
        world_size: id.world_size,
        chunk_size: cfg.chunk_size,
        table: snap.table.clone(),
        chunks: entries,
        metadata: snap.metadata.clone(),
    };
    let index_bytes = index.encode();
    let trailer = Trailer {
        index_offset: index.data_len(),
        index_len: index_bytes.len() as u64,
        index_crc32c: crc32c::crc32c(&index_bytes),
    };
    let mut tail = index_bytes;
    tail.extend_from_slice(&trailer.encode());
    Ok((index, (Bytes::from(tail), trailer)))
}

/// Where encoded chunks go, in order.
trait Sink {
    fn write(&mut self, bytes: Bytes) -> Result<()>;
    fn finish(self: Box<Self>, tail: Bytes) -> Result<()>;
    fn abort(self: Box<Self>);
}

/// `file://`: pwrite into a temporary file, then fsync + create-only link + directory fsync
/// ([`durable::publish`]).
struct LocalSink {
    file: File,
    tmp: PathBuf,
    dest: PathBuf,
    offset: u64,
    job: String,
    step: u64,
}

impl LocalSink {
    fn create(dest: PathBuf, job: &str, step: u64) -> Result<Self> {
        let (file, tmp) = durable::create_tmp(&dest)?;
        Ok(LocalSink { file, tmp, dest, offset: 0, job: job.to_string(), step })
    }
}

impl Sink for LocalSink {
    fn write(&mut self, bytes: Bytes) -> Result<()> {
        self.file.write_all_at(&bytes, self.offset).map_err(|e| Error::io("pwrite", &self.tmp, e))?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn finish(mut self: Box<Self>, tail: Bytes) -> Result<()> {
        if let Err(e) = self.write(tail) {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(e);
        }
        let LocalSink { file, tmp, dest, job, step, .. } = *self;
        // The name is new (its tag), so the link is create-only in fact. A step committed while
        // this shard was written will never count it: say so instead of reporting it durable.
        if dest.with_file_name(layout::MANIFEST_NAME).exists() {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::Conflict { job, step });
        }
        durable::publish(file, &tmp, &dest)
    }

    fn abort(self: Box<Self>) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Object stores: one PUT for a shard smaller than a part, else a multipart upload with parts in
/// parallel.
struct ObjectSink {
    store: Store,
    rt: Handle,
    path: Path,
    part_size: u64,
    max_parallel: usize,
    buffer: Vec<Bytes>,
    buffered: u64,
    upload: Option<Box<dyn MultipartUpload>>,
    in_flight: VecDeque<JoinHandle<object_store::Result<()>>>,
}

impl ObjectSink {
    fn new(store: Store, rt: Handle, path: Path, cfg: &PersistConfig) -> Self {
        ObjectSink {
            store,
            rt,
            path,
            part_size: cfg.part_size,
            max_parallel: cfg.parallel_parts(),
            buffer: Vec::new(),
            buffered: 0,
            upload: None,
            in_flight: VecDeque::new(),
        }
    }

    fn err(&self, op: &'static str, e: object_store::Error) -> Error {
        Error::store(op, &self.path, e)
    }

    fn wait_oldest(&mut self) -> Result<()> {
        if let Some(h) = self.in_flight.pop_front() {
            match self.rt.block_on(h) {
                Ok(r) => r.map_err(|e| self.err("put part", e))?,
                Err(e) => return Err(Error::Cancelled { reason: format!("part upload task failed: {e}") }),
            }
        }
        Ok(())
    }

    fn send_part(&mut self) -> Result<()> {
        if self.upload.is_none() {
            let store = self.store.object_store().clone();
            let up = self.rt.block_on(store.put_multipart(&self.path)).map_err(|e| self.err("create multipart", e))?;
            self.upload = Some(up);
        }
        while self.in_flight.len() >= self.max_parallel {
            self.wait_oldest()?;
        }
        let payload: PutPayload = std::mem::take(&mut self.buffer).into_iter().collect();
        self.buffered = 0;
        let Some(upload) = self.upload.as_mut() else { return Ok(()) };
        let fut = upload.put_part(payload);
        self.in_flight.push_back(self.rt.spawn(fut));
        Ok(())
    }
}

impl Sink for ObjectSink {
    fn write(&mut self, bytes: Bytes) -> Result<()> {
        self.buffered += bytes.len() as u64;
        self.buffer.push(bytes);
        if self.buffered >= self.part_size {
            self.send_part()?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>, tail: Bytes) -> Result<()> {
        self.buffered += tail.len() as u64;
        self.buffer.push(tail);
        if self.upload.is_none() {
            let payload: PutPayload = std::mem::take(&mut self.buffer).into_iter().collect();
            let store = self.store.object_store().clone();
            let res = self.rt.block_on(store.put(&self.path, payload));
            return res.map(|_| ()).map_err(|e| self.err("put", e));
        }
        let result = (|| {
            self.send_part()?;
            while !self.in_flight.is_empty() {
                self.wait_oldest()?;
            }
            let rt = self.rt.clone();
            let upload = self.upload.as_mut().ok_or_else(|| Error::Cancelled { reason: "upload vanished".into() })?;
            rt.block_on(upload.complete()).map(|_| ()).map_err(|e| Error::store("complete multipart", &self.path, e))
        })();
        if result.is_err() {
            self.abort();
        }
        result
    }

    fn abort(mut self: Box<Self>) {
        for h in self.in_flight.drain(..) {
            h.abort();
        }
        if let Some(mut up) = self.upload.take() {
            if let Err(e) = self.rt.block_on(up.abort()) {
                tracing::warn!(path = %self.path, error = %e, "could not abort multipart upload; retention will");
            }
        }
    }
}
