//! Reading shards back: header (trailer + index) validation and verified, parallel chunk reads into
//! a caller-provided region.
//!
//! `file://` shards are memory-mapped, so a raw chunk travels from the page cache straight into the
//! destination with one copy. Object-store shards are read with parallel ranged GETs that coalesce
//! neighbouring chunks. Every chunk's crc32c is checked before it is used; a mismatch names the
//! step, rank, chunk and offset.

use std::collections::VecDeque;

use bytes::Bytes;
use object_store::ObjectStoreExt;
use object_store::path::Path;
use tokio::runtime::Handle;

use crate::codec::{self, CODEC_ZSTD};
use crate::error::{Error, Location, Result};
use crate::format::{ChunkSpan, ShardIndex, TRAILER_LEN, Trailer};
use crate::manifest::ShardEntry;
use crate::store::{Store, layout};

/// How shards are read.
#[derive(Debug, Clone)]
pub struct ReadConfig {
    /// Target bytes per ranged GET (neighbouring chunks are coalesced up to this size).
    pub read_size: u64,
    /// Ranged GETs in flight at once.
    pub parallel_reads: usize,
    /// Threads that verify and decompress chunks.
    pub workers: usize,
}

impl Default for ReadConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        ReadConfig { read_size: 16 << 20, parallel_reads: 8, workers: cores.clamp(1, 8) }
    }
}

/// Bytes fetched from the end of a remote shard in the first request, to get the trailer and
/// (usually) the whole index in one round trip.
const TAIL_PREFETCH: u64 = 256 << 10;

/// A shard's validated trailer and index.
#[derive(Debug, Clone)]
pub struct ShardHeader {
    /// The trailer.
    pub trailer: Trailer,
    /// The decoded index.
    pub index: ShardIndex,
    /// Object size in bytes.
    pub size: u64,
}

enum Source {
    Mapped(Bytes),
    Remote { store: Store, path: Path, size: u64 },
}

impl Source {
    fn open(store: &Store, rt: &Handle, path: &Path) -> Result<Source> {
        if let Some(file) = store.local_file(path) {
            let f = std::fs::File::open(&file).map_err(|e| Error::io("open", &file, e))?;
            let len = f.metadata().map_err(|e| Error::io("stat", &file, e))?.len();
            if len == 0 {
                return Ok(Source::Mapped(Bytes::new()));
            }
            // SAFETY: shards are immutable once published (writers only ever rename a complete new
            // file over the name, which leaves this mapping on the old inode). A third party that
            // truncates the file in place could fault the reader; that is outside the format's
            // contract and documented in docs/FORMAT.md.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io("mmap", &file, e))?;
            return Ok(Source::Mapped(Bytes::from_owner(map)));
        }
        let meta = rt.block_on(store.object_store().head(path)).map_err(|e| Error::store("head", path, e))?;
        Ok(Source::Remote { store: store.clone(), path: path.clone(), size: meta.size })
    }

    fn size(&self) -> u64 {
        match self {
            Source::Mapped(b) => b.len() as u64,
            Source::Remote { size, .. } => *size,
        }
    }

    fn read(&self, rt: &Handle, range: std::ops::Range<u64>) -> Result<Bytes> {
        match self {
            Source::Mapped(b) => Ok(b.slice(range.start as usize..range.end as usize)),
            Source::Remote { store, path, .. } => {
                rt.block_on(store.object_store().get_range(path, range)).map_err(|e| Error::store("get range", path, e))
            }
        }
    }
}

/// Which shard to read (an object of the step's directory, which names the rank that wrote it),
/// and what the MANIFEST recorded for it (when it is committed).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ShardRef<'a> {
    pub job: &'a str,
    pub step: u64,
    pub object: &'a str,
    pub expected: Option<&'a ShardEntry>,
}

impl<'a> ShardRef<'a> {
    /// The shard a MANIFEST entry names.
    pub fn committed(job: &'a str, step: u64, entry: &'a ShardEntry) -> ShardRef<'a> {
        ShardRef { job, step, object: &entry.object, expected: Some(entry) }
    }

    /// The object's path relative to the store and the rank whose shard it must hold.
    fn resolve(&self) -> Result<(String, u32)> {
        let rel = layout::object_path(self.job, self.step, self.object);
        match layout::parse_shard_name(self.object) {
            Some(rank) => Ok((rel, rank)),
            None => Err(Error::corrupt(
                Location { object: rel, step: Some(self.step), ..Location::default() },
                "not a shard's name (rank-<r>.<tag>.ckpt)",
            )),
        }
    }
}

/// Reads and validates a shard's trailer and index. With `expected` (the manifest's entry), also
/// checks the size and checksum the commit recorded.
pub(crate) fn read_header(store: &Store, rt: &Handle, r: ShardRef<'_>) -> Result<ShardHeader> {
    let (rel, rank) = r.resolve()?;
    let (step, expected) = (r.step, r.expected);
    let path = store.path(&rel);
    let source = Source::open(store, rt, &path)?;
    header_from(&source, rt, &rel, step, rank, expected)
}

fn header_from(
    source: &Source,
    rt: &Handle,
    rel: &str,
    step: u64,
    rank: u32,
    expected: Option<&ShardEntry>,
) -> Result<ShardHeader> {
    let loc = |offset: Option<u64>| Location {
        object: rel.to_string(),
        step: Some(step),
        rank: Some(rank),
        chunk: None,
        offset,
    };
    let size = source.size();
    if size < TRAILER_LEN as u64 {
        return Err(Error::corrupt(loc(Some(0)), format!("object is {size} bytes, too short for a shard")));
    }
    if let Some(e) = expected
        && e.size != size
    {
        return Err(Error::corrupt(loc(None), format!("object is {size} bytes, the manifest recorded {}", e.size)));
    }
    let tail_start = size.saturating_sub(TAIL_PREFETCH);
    let tail = source.read(rt, tail_start..size)?;
    let trailer_at = (size - tail_start) as usize - TRAILER_LEN;
    let trailer =
        Trailer::decode(&tail[trailer_at..]).map_err(|e| relocate(e, loc(Some(size - TRAILER_LEN as u64))))?;
    if trailer.shard_len() != size {
        return Err(Error::corrupt(
            loc(None),
            format!(
                "trailer describes a {}-byte shard, object is {size} bytes (truncated or appended)",
                trailer.shard_len()
            ),
        ));
    }
    let index_range = trailer.index_offset..trailer.index_offset + trailer.index_len;
    let index_bytes = if index_range.start >= tail_start {
        let s = (index_range.start - tail_start) as usize;
        tail.slice(s..s + trailer.index_len as usize)
    } else {
        source.read(rt, index_range.clone())?
    };
    if crc32c::crc32c(&index_bytes) != trailer.index_crc32c {
        return Err(Error::corrupt(loc(Some(index_range.start)), "index checksum mismatch"));
    }
    if let Some(e) = expected
        && e.index_crc32c != trailer.index_crc32c
    {
        return Err(Error::corrupt(loc(Some(index_range.start)), "index checksum differs from the manifest's"));
    }
    let index = ShardIndex::decode(&index_bytes).map_err(|e| relocate(e, loc(Some(index_range.start))))?;
    if index.step != step || index.rank != rank {
        return Err(Error::corrupt(
            loc(None),
            format!("shard belongs to step {} rank {} (misplaced object)", index.step, index.rank),
        ));
    }
    if index.data_len() != trailer.index_offset {
        return Err(Error::corrupt(
            loc(None),
            format!("chunks occupy {} bytes but the index starts at {}", index.data_len(), trailer.index_offset),
        ));
    }
    if let Some(e) = expected
        && e.region_len != index.table.total_len()
    {
        return Err(Error::corrupt(loc(None), "region length differs from the manifest's"));
    }
    Ok(ShardHeader { trailer, index, size })
}

/// Moves a parser's error onto the shard it came from.
fn relocate(e: Error, location: Location) -> Error {
    match e {
        Error::Corrupt { location: inner, reason } => {
            let offset = match (location.offset, inner.offset) {
                (Some(base), Some(rel)) => Some(base.saturating_add(rel)),
                (base, _) => base,
            };
            Error::Corrupt { location: Location { offset, ..location }, reason: format!("{}: {reason}", inner.object) }
        }
        other => other,
    }
}

/// Reads a shard, verifying every chunk, and writes its region into `dst` when given (`dst` must be
/// exactly the region's length). Without `dst` it only verifies. Blocking.
pub(crate) fn read_shard(
    store: &Store,
    rt: &Handle,
    cfg: &ReadConfig,
    r: ShardRef<'_>,
    dst: Option<&mut [u8]>,
) -> Result<ShardHeader> {
    let (rel, rank) = r.resolve()?;
    let (step, expected) = (r.step, r.expected);
    let path = store.path(&rel);
    let source = Source::open(store, rt, &path)?;
    let header = header_from(&source, rt, &rel, step, rank, expected)?;
    let index = &header.index;
    if let Some(d) = &dst
        && d.len() as u64 != index.table.total_len()
    {
        return Err(Error::InvalidConfig {
            field: "destination",
            reason: format!("buffer is {} bytes, step {step} rank {rank} needs {}", d.len(), index.table.total_len()),
        });
    }
    let spans = index.spans();
    let mut dsts: Vec<Option<&mut [u8]>> = Vec::with_capacity(spans.len());
    match dst {
        Some(mut rest) => {
            for s in &spans {
                let (head, tail) = std::mem::take(&mut rest).split_at_mut((s.raw.end - s.raw.start) as usize);
                dsts.push(Some(head));
                rest = tail;
            }
        }
        None => dsts.resize_with(spans.len(), || None),
    }
    let workers = cfg.workers.max(1).min(spans.len().max(1));
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = crossbeam_channel::bounded::<(ChunkSpan, Bytes, Option<&mut [u8]>)>(workers * 4);
        let (err_tx, err_rx) = crossbeam_channel::bounded::<Error>(workers);
        let rel = rel.as_str();
        for w in 0..workers {
            let rx = rx.clone();
            let err_tx = err_tx.clone();
            std::thread::Builder::new()
                .name(format!("ckpt-verify-{w}"))
                .spawn_scoped(scope, move || {
                    let mut scratch = Vec::new();
                    for (span, stored, dst) in rx {
                        if let Err(e) = check_chunk(index, rel, &span, &stored, dst, &mut scratch) {
                            let _ = err_tx.try_send(e);
                            return;
                        }
                    }
                })
                .map_err(|e| Error::Cancelled { reason: format!("cannot start verify thread: {e}") })?;
        }
        drop(rx);
        drop(err_tx);
        let feed = || -> Result<()> {
            let mut items = spans.iter().cloned().zip(dsts);
            match &source {
                Source::Mapped(all) => {
                    for (span, d) in items {
                        let stored = all.slice(span.stored.start as usize..span.stored.end as usize);
                        if tx.send((span, stored, d)).is_err() {
                            break;
                        }
                    }
                }
                Source::Remote { store, path, .. } => {
                    let mut in_flight = VecDeque::new();
                    let mut groups = group_spans(&spans, cfg.read_size).into_iter();
                    loop {
                        while in_flight.len() < cfg.parallel_reads.max(1) {
                            let Some(g) = groups.next() else { break };
                            let os = store.object_store().clone();
                            let p = path.clone();
                            let range = g.clone();
                            in_flight.push_back((g, rt.spawn(async move { os.get_range(&p, range).await })));
                        }
                        let Some((g, handle)) = in_flight.pop_front() else { break };
                        let bytes = rt
                            .block_on(handle)
                            .map_err(|e| Error::Cancelled { reason: format!("read task failed: {e}") })?
                            .map_err(|e| Error::store("get range", path, e))?;
                        if bytes.len() as u64 != g.end - g.start {
                            return Err(Error::corrupt(
                                Location {
                                    object: rel.to_string(),
                                    step: Some(step),
                                    rank: Some(rank),
                                    chunk: None,
                                    offset: Some(g.start),
                                },
                                format!("store returned {} bytes for a {}-byte range", bytes.len(), g.end - g.start),
                            ));
                        }
                        for (span, d) in items.by_ref() {
                            let s = (span.stored.start - g.start) as usize;
                            let e = (span.stored.end - g.start) as usize;
                            let last = span.stored.end >= g.end;
                            if tx.send((span, bytes.slice(s..e), d)).is_err() {
                                return Ok(());
                            }
                            if last {
                                break;
                            }
                        }
                    }
                }
            }
            Ok(())
        };
        let fed = feed();
        drop(tx);
        // A worker's error explains a failed feed (the channel closed), so it comes first.
        if let Ok(e) = err_rx.recv() {
            return Err(e);
        }
        fed
    })?;
    Ok(header)
}

/// Coalesces consecutive chunks into byte ranges of about `read_size`.
fn group_spans(spans: &[ChunkSpan], read_size: u64) -> Vec<std::ops::Range<u64>> {
    let mut groups: Vec<std::ops::Range<u64>> = Vec::new();
    for s in spans {
        match groups.last_mut() {
            Some(g) if g.end == s.stored.start && s.stored.end - g.start <= read_size.max(1) => g.end = s.stored.end,
            _ => groups.push(s.stored.clone()),
        }
    }
    // Zero-length chunks cannot exist (only empty regions have no bytes, and those have no chunks),
    // so every span lies in exactly one group.
    groups
}

fn check_chunk(
    index: &ShardIndex,
    rel: &str,
    span: &ChunkSpan,
    stored: &[u8],
    dst: Option<&mut [u8]>,
    scratch: &mut Vec<u8>,
) -> Result<()> {
    if crc32c::crc32c(stored) != span.entry.crc32c {
        return Err(index.chunk_error(rel, span, "crc32c mismatch"));
    }
    let raw_len = (span.raw.end - span.raw.start) as usize;
    if span.entry.codec == CODEC_ZSTD {
        let out = match dst {
            Some(d) => d,
            None => {
                scratch.resize(raw_len, 0);
                &mut scratch[..]
            }
        };
        codec::decompress_into(stored, out).map_err(|e| index.chunk_error(rel, span, e.to_string()))
    } else {
        if let Some(d) = dst {
            d.copy_from_slice(stored);
        }
        Ok(())
    }
}

/// Takes a shard's region chunk by chunk: the chunk's offset in the region and its raw bytes.
pub type ChunkSink<'a, E> = dyn FnMut(u64, &[u8]) -> std::result::Result<(), E> + 'a;

/// Reads a shard chunk by chunk in region order, verifying each one, and hands every chunk's raw
/// bytes to `sink` with their offset in the region. Memory stays bounded by one chunk and one read
/// group whatever region length the index claims, so a reader can stream a region larger than
/// memory, and a crafted index that claims one fails on its first bad chunk instead of on an
/// allocation. The first error, the engine's or the sink's, ends the read. Blocking.
pub(crate) fn stream_shard<E: From<Error>>(
    store: &Store,
    rt: &Handle,
    cfg: &ReadConfig,
    r: ShardRef<'_>,
    sink: &mut ChunkSink<'_, E>,
) -> std::result::Result<ShardHeader, E> {
    let (rel, rank) = r.resolve()?;
    let (step, expected) = (r.step, r.expected);
    let path = store.path(&rel);
    let source = Source::open(store, rt, &path)?;
    let header = header_from(&source, rt, &rel, step, rank, expected)?;
    let index = &header.index;
    let spans = index.spans();
    let mut raw = Vec::new();
    let mut scratch = Vec::new();
    let mut i = 0;
    for group in group_spans(&spans, cfg.read_size) {
        let bytes = source.read(rt, group.clone())?;
        if bytes.len() as u64 != group.end - group.start {
            return Err(Error::corrupt(
                Location {
                    object: rel.clone(),
                    step: Some(step),
                    rank: Some(rank),
                    chunk: None,
                    offset: Some(group.start),
                },
                format!("store returned {} bytes for a {}-byte range", bytes.len(), group.end - group.start),
            )
            .into());
        }
        while let Some(span) = spans.get(i).filter(|s| s.stored.end <= group.end) {
            let stored = &bytes[(span.stored.start - group.start) as usize..(span.stored.end - group.start) as usize];
            if span.entry.codec == CODEC_ZSTD {
                raw.resize((span.raw.end - span.raw.start) as usize, 0);
                check_chunk(index, &rel, span, stored, Some(&mut raw[..]), &mut scratch)?;
                sink(span.raw.start, &raw)?;
            } else {
                check_chunk(index, &rel, span, stored, None, &mut scratch)?;
                sink(span.raw.start, stored)?;
            }
            i += 1;
        }
    }
    Ok(header)
}
