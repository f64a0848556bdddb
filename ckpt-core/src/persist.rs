//! The persist pipeline: a snapshot region → one shard object on a store.
//!
//! The region is cut into fixed-size chunks. A bounded pool of encoder threads, fed by a bounded
//! crossbeam channel, computes each chunk's crc32c and compresses it when the mode asks. The calling
//! thread puts the chunks back in order and streams them to a sink:
//!
//! - `file://`: pwrite into a temporary file next to the shard, fsync, link create-only (a stale
//!   shard of a step that never committed is replaced, never one of a committed step), fsync the
//!   directory. By default ([`FileIo::Direct`]) page-aligned raw chunks go to the disk with
//!   `O_DIRECT` straight from the snapshot's memory (an arena slot is page-aligned), so the persist
//!   costs no page-cache copy and leaves no dirty pages for the kernel to flush on the training
//!   cores; what is not aligned (a last partial block, compressed chunks, the index and trailer)
//!   is written through the page cache after the aligned part, never into the same page;
//! - object stores: a multipart upload whose parts go up in parallel, or one PUT for a small shard.
//!
//! Memory in flight is bounded by [`PersistConfig::inflight_bytes`] whatever the snapshot's size:
//! half for chunks being encoded or reordered, half for parts being uploaded. Raw chunks are never
//! copied: the sink gets slices of the region itself.
//!
//! A failed write aborts the upload (or removes the temporary file). A shard is only ever visible
//! complete, and even then the step stays invisible until its MANIFEST is committed.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
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
use crate::priority::Priority;
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
    /// How `file://` shards reach the disk.
    pub file_io: FileIo,
    /// CPU priority of the encoder threads (the caller's persist thread sets its own with
    /// [`Priority::apply_to_current_thread`]).
    pub priority: Priority,
}

/// How a `file://` shard is written. Every mode ends with the same fsync, create-only link and
/// directory fsync; they differ in the copies and the dirty pages on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FileIo {
    /// `O_DIRECT` writes straight from the snapshot's memory for page-aligned raw chunks; buffered
    /// writes for the rest, for memory that is not page-aligned, on tmpfs (where the page cache is
    /// the storage) and where the file system refuses `O_DIRECT`.
    #[default]
    Direct,
    /// Buffered writes whose writeback starts as each chunk is written (`sync_file_range`), the
    /// pages dropped from the cache once written back, so dirty pages never pile up.
    WriteBehind,
    /// Buffered writes and one fsync at the end.
    Buffered,
}

impl std::fmt::Display for FileIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FileIo::Direct => "direct",
            FileIo::WriteBehind => "write-behind",
            FileIo::Buffered => "buffered",
        })
    }
}

impl std::str::FromStr for FileIo {
    type Err = Error;

    /// Parses `direct`, `write-behind` or `buffered`.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "direct" => Ok(FileIo::Direct),
            "write-behind" => Ok(FileIo::WriteBehind),
            "buffered" => Ok(FileIo::Buffered),
            _ => Err(Error::InvalidConfig {
                field: "file_io",
                reason: format!("`{s:.32}` is not a file write mode: use direct, write-behind or buffered"),
            }),
        }
    }
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
            file_io: FileIo::default(),
            priority: Priority::default(),
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
    /// Bytes written with `O_DIRECT`, past the page cache ([`FileIo::Direct`]); 0 on object stores,
    /// on tmpfs, and where the file system refused it.
    pub direct_bytes: u64,
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
        Some(file) => Box::new(LocalSink::create(file, id.job, id.step, cfg.file_io)?),
        None => Box::new(ObjectSink::new(store.clone(), rt.clone(), path, cfg)),
    };
    match encode_into(cfg, id, snap, sink.as_mut()) {
        Ok((index, info_tail)) => {
            let (tail, trailer) = info_tail;
            let direct_bytes = sink.finish(tail)?;
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
                direct_bytes,
            };
            tracing::debug!(
                job = id.job,
                step = id.step,
                rank = id.rank,
                bytes = info.size,
                direct_bytes,
                "shard written"
            );
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
            let priority = cfg.priority;
            std::thread::Builder::new()
                .name(format!("ckpt-encode-{w}"))
                .spawn_scoped(scope, move || {
                    priority.apply_to_current_thread();
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
    /// Writes the tail and makes the shard durable; returns the bytes written with `O_DIRECT`.
    fn finish(self: Box<Self>, tail: Bytes) -> Result<u64>;
    fn abort(self: Box<Self>);
}

/// Alignment of `O_DIRECT` offsets, lengths and memory: the page size, a multiple of every common
/// logical block size. A file system that needs more refuses the write, and the sink falls back.
pub const DIRECT_ALIGN: u64 = 4096;

/// [`FileIo::WriteBehind`]: bytes whose writeback may still be running before the sink waits for
/// the oldest and drops them from the page cache.
const WRITE_BEHIND_WINDOW: u64 = 64 << 20;

/// `file://`: pwrite into a temporary file, then fsync + create-only link + directory fsync
/// ([`durable::publish`]).
///
/// With [`FileIo::Direct`] a second descriptor of the same file, opened with `O_DIRECT`, takes
/// every write that starts at an aligned offset from aligned memory, up to its last whole block;
/// the rest goes through the buffered descriptor. Writes are sequential, so once a write ends
/// unaligned every later byte is buffered until a write ends aligned again: no page is ever
/// written both ways. fsync of either descriptor covers the file's data and metadata.
struct LocalSink {
    file: File,
    direct: Option<File>,
    io: FileIo,
    tmp: PathBuf,
    dest: PathBuf,
    offset: u64,
    direct_bytes: u64,
    /// [`FileIo::WriteBehind`]: bytes already written back and dropped from the cache.
    settled: u64,
    job: String,
    step: u64,
}

impl LocalSink {
    fn create(dest: PathBuf, job: &str, step: u64, io: FileIo) -> Result<Self> {
        let (file, tmp) = durable::create_tmp(&dest)?;
        let direct = match io {
            FileIo::Direct => open_direct(&file, &tmp),
            FileIo::WriteBehind | FileIo::Buffered => None,
        };
        Ok(LocalSink {
            file,
            direct,
            io,
            tmp,
            dest,
            offset: 0,
            direct_bytes: 0,
            settled: 0,
            job: job.to_string(),
            step,
        })
    }

    /// Writes the aligned head of `buf` with `O_DIRECT` when it can; returns how many bytes it
    /// wrote. Falls back to buffered writes for good when the file system refuses.
    fn write_direct(&mut self, buf: &[u8]) -> Result<usize> {
        let Some(direct) = &self.direct else { return Ok(0) };
        let aligned = (buf.len() as u64 / DIRECT_ALIGN * DIRECT_ALIGN) as usize;
        if aligned == 0 || self.offset % DIRECT_ALIGN != 0 || (buf.as_ptr() as u64) % DIRECT_ALIGN != 0 {
            return Ok(0);
        }
        match direct.write_all_at(&buf[..aligned], self.offset) {
            Ok(()) => {
                self.offset += aligned as u64;
                self.direct_bytes += aligned as u64;
                Ok(aligned)
            }
            // Refused (a file system without O_DIRECT, a block size above DIRECT_ALIGN, or a short
            // write that left the next offset unaligned): nothing past `offset` counts, and the
            // buffered write that follows rewrites it.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(path = %self.tmp.display(), error = %e, "the file system refuses O_DIRECT writes; writing through the page cache");
                self.direct = None;
                Ok(0)
            }
            Err(e) => Err(Error::io("pwrite (O_DIRECT)", &self.tmp, e)),
        }
    }

    fn write_buffered(&mut self, buf: &[u8]) -> Result<()> {
        self.file.write_all_at(buf, self.offset).map_err(|e| Error::io("pwrite", &self.tmp, e))?;
        let start = self.offset;
        self.offset += buf.len() as u64;
        if self.io == FileIo::WriteBehind {
            self.write_behind(start)?;
        }
        Ok(())
    }

    /// Starts writeback of what was just written; once more than two windows are in flight,
    /// waits for all but the newest window and drops those pages from the cache.
    fn write_behind(&mut self, start: u64) -> Result<()> {
        let fd = self.file.as_raw_fd();
        let len = (self.offset - start) as libc::off64_t;
        // SAFETY: fd is our open file; sync_file_range only schedules writeback of its pages.
        if unsafe { libc::sync_file_range(fd, start as libc::off64_t, len, libc::SYNC_FILE_RANGE_WRITE) } != 0 {
            return Err(Error::io("sync_file_range", &self.tmp, std::io::Error::last_os_error()));
        }
        if self.offset - self.settled <= 2 * WRITE_BEHIND_WINDOW {
            return Ok(());
        }
        let end = self.offset - WRITE_BEHIND_WINDOW;
        let (from, len) = (self.settled as libc::off64_t, (end - self.settled) as libc::off64_t);
        let wait = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: as above; this waits for the range's writeback to finish.
        if unsafe { libc::sync_file_range(fd, from, len, wait) } != 0 {
            return Err(Error::io("sync_file_range", &self.tmp, std::io::Error::last_os_error()));
        }
        // SAFETY: fd is our open file; DONTNEED only drops clean cached pages of the range.
        unsafe { libc::posix_fadvise(fd, from, len, libc::POSIX_FADV_DONTNEED) };
        self.settled = end;
        Ok(())
    }
}

/// A second, `O_DIRECT` descriptor of the temporary file, unless the file lives on tmpfs (its
/// page cache is the storage: `O_DIRECT` there is a buffered copy by another name) or the file
/// system refuses it.
fn open_direct(file: &File, tmp: &std::path::Path) -> Option<File> {
    // SAFETY: statfs is plain old data; all-zero is a valid value for fstatfs to overwrite.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open for the duration of the call and `fs` is a valid out-pointer.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 || fs.f_type == libc::TMPFS_MAGIC {
        return None;
    }
    match OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(tmp) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::info!(path = %tmp.display(), error = %e, "the file system refuses O_DIRECT; writing through the page cache");
            None
        }
    }
}

impl Sink for LocalSink {
    fn write(&mut self, bytes: Bytes) -> Result<()> {
        let done = self.write_direct(&bytes)?;
        if done < bytes.len() {
            self.write_buffered(&bytes[done..])?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>, tail: Bytes) -> Result<u64> {
        if let Err(e) = self.write(tail) {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(e);
        }
        let LocalSink { file, direct, tmp, dest, job, step, direct_bytes, .. } = *self;
        drop(direct);
        // The name is new (its tag), so the link is create-only in fact. A step committed while
        // this shard was written will never count it: say so instead of reporting it durable.
        if dest.with_file_name(layout::MANIFEST_NAME).exists() {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::Conflict { job, step });
        }
        durable::publish(file, &tmp, &dest)?;
        Ok(direct_bytes)
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

    fn finish(mut self: Box<Self>, tail: Bytes) -> Result<u64> {
        self.buffered += tail.len() as u64;
        self.buffer.push(tail);
        if self.upload.is_none() {
            let payload: PutPayload = std::mem::take(&mut self.buffer).into_iter().collect();
            let store = self.store.object_store().clone();
            let res = self.rt.block_on(store.put(&self.path, payload));
            return res.map(|_| 0).map_err(|e| self.err("put", e));
        }
        let result = (|| {
            self.send_part()?;
            while !self.in_flight.is_empty() {
                self.wait_oldest()?;
            }
            let rt = self.rt.clone();
            let upload = self.upload.as_mut().ok_or_else(|| Error::Cancelled { reason: "upload vanished".into() })?;
            rt.block_on(upload.complete()).map(|_| 0).map_err(|e| Error::store("complete multipart", &self.path, e))
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
