//! Reading shards back: header (trailer + index) validation and verified, parallel chunk reads into
//! a caller-provided region.
//!
//! `file://` shards are read with `pread` straight into the destination (one copy, from the page
//! cache), and only their headers and verify-only reads go through a memory map. Object-store shards are read with parallel ranged GETs that coalesce
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
            // SAFETY: shards are immutable once published (every write gets a name of its own and
            // is linked into place create-only; nothing is ever written over a published name). A third party that
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

/// Where one chunk's raw bytes go: pieces of caller memory, each at its offset in the chunk, in
/// order and without overlap. Bytes of the chunk that no piece covers are read and verified but
/// kept nowhere.
type ChunkDest<'a> = Vec<(usize, &'a mut [u8])>;

/// Caller memory that a shard's region is read into: pieces, each starting at a byte offset of
/// the region. Only the chunks that some piece overlaps are read (and each of those is verified
/// whole). The pieces must lie inside the region and must not overlap.
pub struct Pieces<'a> {
    pieces: Vec<(u64, &'a mut [u8])>,
}

impl std::fmt::Debug for Pieces<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.pieces.iter().map(|(o, d)| (o, d.len()))).finish()
    }
}

impl<'a> Pieces<'a> {
    /// The whole region in one buffer.
    pub fn whole(dst: &'a mut [u8]) -> Pieces<'a> {
        Pieces { pieces: vec![(0, dst)] }
    }

    /// `pieces`: (offset in the region, destination), in any order.
    pub fn new(mut pieces: Vec<(u64, &'a mut [u8])>) -> Pieces<'a> {
        pieces.retain(|(_, d)| !d.is_empty());
        pieces.sort_by_key(|(o, _)| *o);
        Pieces { pieces }
    }

    /// Splits the pieces along the chunks of `spans`: for every chunk that a piece overlaps, the
    /// chunk and the parts of the pieces inside it. Fails when a piece overlaps another or lies
    /// outside the region.
    fn per_chunk(self, spans: Vec<ChunkSpan>, region_len: u64) -> Result<Vec<(ChunkSpan, Option<ChunkDest<'a>>)>> {
        let mut end = 0u64;
        for (o, d) in &self.pieces {
            let piece_end = o.checked_add(d.len() as u64).filter(|&e| e <= region_len);
            if *o < end || piece_end.is_none() {
                return Err(Error::InvalidConfig {
                    field: "destination",
                    reason: format!(
                        "a piece of {} bytes at region offset {o} overlaps another or ends past the {region_len}-byte region",
                        d.len()
                    ),
                });
            }
            end = piece_end.unwrap_or(end);
        }
        let mut out = Vec::new();
        let mut pieces = self.pieces.into_iter().peekable();
        // The part of the current piece not yet given to a chunk, and its region offset.
        let mut current: Option<(u64, &'a mut [u8])> = None;
        for span in spans {
            let mut dest: ChunkDest<'a> = Vec::new();
            loop {
                if current.is_none() {
                    match pieces.peek() {
                        Some((o, _)) if *o < span.raw.end => current = pieces.next(),
                        _ => break,
                    }
                }
                let Some((o, d)) = current.take() else { break };
                let fits = (span.raw.end - o) as usize;
                let at = (o - span.raw.start) as usize;
                if d.len() <= fits {
                    dest.push((at, d));
                } else {
                    let (head, tail) = d.split_at_mut(fits);
                    dest.push((at, head));
                    current = Some((span.raw.end, tail));
                    break;
                }
            }
            if !dest.is_empty() {
                out.push((span, Some(dest)));
            }
        }
        Ok(out)
    }
}

/// Reads a shard, verifying every chunk it reads, into `dst` when given: only the chunks that
/// `dst`'s pieces overlap are read. Without `dst` it reads and verifies every chunk. A `file://`
/// shard is read with `pread` straight into the destination (one copy, from the page cache),
/// verified there; an object store's with parallel ranged GETs. Blocking.
///
/// When a chunk fails verification, the pieces it was read into hold its unverified bytes (and
/// pieces of other chunks may already be written): the caller must not use the destination after
/// an error.
pub(crate) fn read_shard(
    store: &Store,
    rt: &Handle,
    cfg: &ReadConfig,
    r: ShardRef<'_>,
    dst: Option<Pieces<'_>>,
) -> Result<ShardHeader> {
    let (rel, rank) = r.resolve()?;
    let (step, expected) = (r.step, r.expected);
    let path = store.path(&rel);
    let source = Source::open(store, rt, &path)?;
    let header = header_from(&source, rt, &rel, step, rank, expected)?;
    read_region(store, rt, cfg, Shard { rel: &rel, path: &path, step, rank }, &source, &header, dst)?;
    Ok(header)
}

/// Reads the region of a committed shard whose header the caller already read and validated
/// against its MANIFEST entry ([`read_header`] with the entry): as [`read_shard`], without reading
/// and validating the header again (names are never reused, so the object is the one the header
/// came from). Blocking.
pub(crate) fn read_committed_region(
    store: &Store,
    rt: &Handle,
    cfg: &ReadConfig,
    r: ShardRef<'_>,
    header: &ShardHeader,
    dst: Pieces<'_>,
) -> Result<()> {
    let (rel, rank) = r.resolve()?;
    let path = store.path(&rel);
    let source = match store.local_file(&path) {
        Some(_) => Source::open(store, rt, &path)?,
        None => Source::Remote { store: store.clone(), path: path.clone(), size: header.size },
    };
    read_region(store, rt, cfg, Shard { rel: &rel, path: &path, step: r.step, rank }, &source, header, Some(dst))
}

/// Where a shard is, for reads and error locations.
#[derive(Clone, Copy)]
struct Shard<'a> {
    rel: &'a str,
    path: &'a Path,
    step: u64,
    rank: u32,
}

/// Reads (and verifies) the chunks of `header`'s shard that `dst` needs, or every chunk without a
/// destination; see [`read_shard`].
fn read_region(
    store: &Store,
    rt: &Handle,
    cfg: &ReadConfig,
    shard: Shard<'_>,
    source: &Source,
    header: &ShardHeader,
    dst: Option<Pieces<'_>>,
) -> Result<()> {
    let Shard { rel, path, step, rank } = shard;
    let index = &header.index;
    let spans = index.spans();
    let work: Vec<(ChunkSpan, Option<ChunkDest<'_>>)> = match dst {
        Some(pieces) => pieces.per_chunk(spans, index.table.total_len())?,
        None => spans.into_iter().map(|s| (s, None)).collect(),
    };
    // A local shard with a destination is read with pread into it: no mapping, no extra copy.
    let file = match store.local_file(path) {
        Some(file) if work.iter().any(|(_, d)| d.is_some()) => {
            let f = std::fs::File::open(&file).map_err(|e| Error::io("open", &file, e))?;
            advise_sequential(&f);
            Some(f)
        }
        _ => None,
    };
    let workers = cfg.workers.max(1).min(work.len().max(1));
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = crossbeam_channel::bounded::<(ChunkSpan, Option<Bytes>, Option<ChunkDest<'_>>)>(workers * 4);
        let (err_tx, err_rx) = crossbeam_channel::bounded::<Error>(workers);
        let file = file.as_ref();
        for w in 0..workers {
            let rx = rx.clone();
            let err_tx = err_tx.clone();
            std::thread::Builder::new()
                .name(format!("ckpt-verify-{w}"))
                .spawn_scoped(scope, move || {
                    let mut scratch = Vec::new();
                    let mut stored_buf = Vec::new();
                    for (span, stored, mut dst) in rx {
                        let checked = match (stored, file) {
                            (Some(stored), _) => check_chunk(index, rel, &span, &stored, dst.as_mut(), &mut scratch),
                            (None, Some(file)) => {
                                pread_chunk(file, index, rel, &span, dst.as_mut(), &mut scratch, &mut stored_buf)
                            }
                            (None, None) => Err(Error::Cancelled { reason: "a chunk came without its bytes".into() }),
                        };
                        if let Err(e) = checked {
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
            let mut items = work.into_iter();
            match &source {
                Source::Mapped(_) if file.is_some() => {
                    for (span, d) in items {
                        if tx.send((span, None, d)).is_err() {
                            break;
                        }
                    }
                }
                Source::Mapped(all) => {
                    for (span, d) in items {
                        let stored = all.slice(span.stored.start as usize..span.stored.end as usize);
                        if tx.send((span, Some(stored), d)).is_err() {
                            break;
                        }
                    }
                }
                Source::Remote { store, path, .. } => {
                    let spans: Vec<ChunkSpan> = items.as_slice().iter().map(|(s, _)| s.clone()).collect();
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
                            if tx.send((span, Some(bytes.slice(s..e)), d)).is_err() {
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
    })
}

/// Tells the kernel a shard file is about to be read front to back (a larger readahead window).
fn advise_sequential(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: `f` is an open file for the duration of the call; the advice changes no memory.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
    if rc != 0 {
        tracing::debug!(rc, "posix_fadvise(SEQUENTIAL) failed; reading without the hint");
    }
}

/// Reads one chunk of a local shard: an uncompressed chunk with `pread` straight into its pieces
/// (the bytes no piece wants into `scratch`), its crc32c computed over what was read; a compressed
/// one into `stored_buf`, then verified and decompressed as [`check_chunk`] does.
fn pread_chunk(
    file: &std::fs::File,
    index: &ShardIndex,
    rel: &str,
    span: &ChunkSpan,
    dst: Option<&mut ChunkDest<'_>>,
    scratch: &mut Vec<u8>,
    stored_buf: &mut Vec<u8>,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let read_at = |buf: &mut [u8], at: u64| {
        file.read_exact_at(buf, at).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => index.chunk_error(rel, span, "shard ends inside this chunk"),
            _ => Error::io("pread", std::path::Path::new(rel), e),
        })
    };
    let stored_len = (span.stored.end - span.stored.start) as usize;
    if span.entry.codec == CODEC_ZSTD || dst.is_none() {
        stored_buf.resize(stored_len, 0);
        read_at(stored_buf, span.stored.start)?;
        return check_chunk(index, rel, span, stored_buf, dst, scratch);
    }
    let Some(dst) = dst else { return Ok(()) };
    let mut crc = 0u32;
    let mut covered = 0usize;
    let gap = |from: usize, to: usize, crc: &mut u32, scratch: &mut Vec<u8>| -> Result<()> {
        if to > from {
            scratch.resize(to - from, 0);
            read_at(scratch, span.stored.start + from as u64)?;
            *crc = crc32c::crc32c_append(*crc, scratch);
        }
        Ok(())
    };
    for (at, d) in dst.iter_mut() {
        gap(covered, *at, &mut crc, scratch)?;
        read_at(d, span.stored.start + *at as u64)?;
        crc = crc32c::crc32c_append(crc, d);
        covered = *at + d.len();
    }
    gap(covered, stored_len, &mut crc, scratch)?;
    if crc != span.entry.crc32c {
        return Err(index.chunk_error(rel, span, "crc32c mismatch"));
    }
    Ok(())
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
    dst: Option<&mut ChunkDest<'_>>,
    scratch: &mut Vec<u8>,
) -> Result<()> {
    if crc32c::crc32c(stored) != span.entry.crc32c {
        return Err(index.chunk_error(rel, span, "crc32c mismatch"));
    }
    let raw_len = (span.raw.end - span.raw.start) as usize;
    if span.entry.codec == CODEC_ZSTD {
        match dst {
            // One piece that is the whole chunk: decompress straight into it.
            Some(d) if d.len() == 1 && d[0].0 == 0 && d[0].1.len() == raw_len => {
                codec::decompress_into(stored, d[0].1).map_err(|e| index.chunk_error(rel, span, e.to_string()))
            }
            d => {
                scratch.resize(raw_len, 0);
                codec::decompress_into(stored, &mut scratch[..])
                    .map_err(|e| index.chunk_error(rel, span, e.to_string()))?;
                for (at, piece) in d.into_iter().flatten() {
                    piece.copy_from_slice(&scratch[*at..*at + piece.len()]);
                }
                Ok(())
            }
        }
    } else {
        if stored.len() != raw_len {
            return Err(index.chunk_error(rel, span, "an uncompressed chunk's stored and raw lengths differ"));
        }
        for (at, piece) in dst.into_iter().flatten() {
            piece.copy_from_slice(&stored[*at..*at + piece.len()]);
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
                check_chunk(index, &rel, span, stored, Some(&mut vec![(0, &mut raw[..])]), &mut scratch)?;
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
