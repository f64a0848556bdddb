//! The shard index: which step and rank the shard belongs to, the tensor table, the chunk table and
//! the user metadata.

use super::{MAX_CHUNK_SIZE, MAX_METADATA_LEN, MAX_TENSORS, MIN_CHUNK_SIZE};
use crate::codec::{CODEC_RAW, CODEC_ZSTD};
use crate::dtype::DType;
use crate::error::{Error, Location, Result};
use crate::format::wire::Reader;
use crate::tensor::{MAX_NAME_LEN, MAX_NDIM, TensorEntry, TensorMeta, TensorTable};

/// One stored chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    /// [`CODEC_RAW`] or [`CODEC_ZSTD`].
    pub codec: u8,
    /// Bytes the chunk occupies in the shard.
    pub stored_len: u32,
    /// crc32c of the stored bytes.
    pub crc32c: u32,
}

/// Where chunk `index` lives in the shard (`stored`) and in the snapshot region (`raw`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkSpan {
    /// Chunk number.
    pub index: u64,
    /// Byte range inside the shard object.
    pub stored: std::ops::Range<u64>,
    /// Byte range inside the snapshot region.
    pub raw: std::ops::Range<u64>,
    /// The chunk's codec and checksum.
    pub entry: ChunkEntry,
}

/// The decoded index of a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardIndex {
    /// The checkpoint step.
    pub step: u64,
    /// The rank that wrote this shard.
    pub rank: u32,
    /// World size of the job when the shard was written.
    pub world_size: u32,
    /// Raw bytes per chunk (the last chunk may be shorter).
    pub chunk_size: u32,
    /// The tensors and the size of the region that holds them.
    pub table: TensorTable,
    /// One entry per chunk, in region order.
    pub chunks: Vec<ChunkEntry>,
    /// Opaque user metadata (the trainer's extra state); never interpreted here.
    pub metadata: Vec<u8>,
}

/// Appends the tensor records of `table` (docs/FORMAT.md, section 3.2).
pub(crate) fn encode_tensors(table: &TensorTable, out: &mut Vec<u8>) {
    for e in table.entries() {
        out.extend_from_slice(&(e.meta.name.len() as u16).to_le_bytes());
        out.extend_from_slice(e.meta.name.as_bytes());
        out.push(e.meta.dtype.code());
        out.push(e.meta.shape.len() as u8);
        for d in &e.meta.shape {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&e.offset.to_le_bytes());
    }
}

/// Reads `count` tensor records and checks them against a region of `region_len` bytes.
pub(crate) fn decode_tensors(r: &mut Reader<'_>, count: u32, region_len: u64) -> Result<TensorTable> {
    if count > MAX_TENSORS {
        return Err(r.error(format!("{count} tensors exceed the cap of {MAX_TENSORS}")));
    }
    if u64::from(count).saturating_mul(12) > r.remaining() as u64 {
        return Err(r.error("tensor count exceeds the bytes present".to_string()));
    }
    let mut entries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let name_len = r.u16()? as usize;
        if name_len == 0 || name_len > MAX_NAME_LEN {
            return Err(r.error(format!("tensor name length {name_len} outside 1..={MAX_NAME_LEN}")));
        }
        let name =
            std::str::from_utf8(r.bytes(name_len)?).map_err(|_| r.error("tensor name is not UTF-8"))?.to_string();
        let code = r.u8()?;
        let dtype = DType::from_code(code).ok_or_else(|| r.error(format!("unknown dtype code {code}")))?;
        let ndim = r.u8()? as usize;
        if ndim > MAX_NDIM {
            return Err(r.error(format!("{ndim} dimensions exceed the cap of {MAX_NDIM}")));
        }
        let mut shape = Vec::with_capacity(ndim);
        for _ in 0..ndim {
            shape.push(r.u64()?);
        }
        let offset = r.u64()?;
        let meta = TensorMeta { name, dtype, shape };
        let len = meta.byte_len().map_err(|e| r.error(e.to_string()))?;
        entries.push(TensorEntry { meta, offset, len });
    }
    TensorTable::from_entries(entries, region_len).map_err(|e| r.error(e.to_string()))
}

/// Fixed header bytes before the tensor table.
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 4 + 4 + 8 + 4;
/// Bytes per chunk entry.
const CHUNK_ENTRY_LEN: usize = 1 + 4 + 4;

/// Number of chunks that cover `region_len` bytes.
pub(crate) fn chunk_count(region_len: u64, chunk_size: u32) -> u64 {
    region_len.div_ceil(u64::from(chunk_size.max(1)))
}

impl ShardIndex {
    /// Serialises the index (docs/FORMAT.md, "Index").
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.table.len() * 64 + self.chunks.len() * CHUNK_ENTRY_LEN);
        out.extend_from_slice(&self.step.to_le_bytes());
        out.extend_from_slice(&self.rank.to_le_bytes());
        out.extend_from_slice(&self.world_size.to_le_bytes());
        out.extend_from_slice(&self.table.total_len().to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&(self.table.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u32).to_le_bytes());
        encode_tensors(&self.table, &mut out);
        for c in &self.chunks {
            out.push(c.codec);
            out.extend_from_slice(&c.stored_len.to_le_bytes());
            out.extend_from_slice(&c.crc32c.to_le_bytes());
        }
        out.extend_from_slice(&self.metadata);
        out
    }

    /// Parses and checks an index: every count against the bytes present, every tensor against
    /// the region, every chunk against the chunk size. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<ShardIndex> {
        let mut r = Reader::new(bytes, "shard index");
        let step = r.u64()?;
        let rank = r.u32()?;
        let world_size = r.u32()?;
        let region_len = r.u64()?;
        let chunk_size = r.u32()?;
        let tensor_count = r.u32()?;
        let chunk_count_field = r.u64()?;
        let meta_len = r.u32()?;
        if world_size == 0 || rank >= world_size {
            return Err(r.error(format!("rank {rank} is outside world size {world_size}")));
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(r.error(format!("chunk size {chunk_size} outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")));
        }
        if tensor_count > MAX_TENSORS {
            return Err(r.error(format!("{tensor_count} tensors exceed the cap of {MAX_TENSORS}")));
        }
        if meta_len > MAX_METADATA_LEN {
            return Err(r.error(format!("metadata of {meta_len} bytes exceeds the cap of {MAX_METADATA_LEN}")));
        }
        if chunk_count_field != chunk_count(region_len, chunk_size) {
            return Err(r.error(format!(
                "{chunk_count_field} chunks cannot cover {region_len} bytes in chunks of {chunk_size}"
            )));
        }
        // Each tensor needs at least 12 bytes and each chunk 9: reject counts the buffer cannot hold
        // before allocating for them.
        let min_needed = u64::from(tensor_count)
            .checked_mul(12)
            .and_then(|t| chunk_count_field.checked_mul(CHUNK_ENTRY_LEN as u64).and_then(|c| c.checked_add(t)))
            .and_then(|v| v.checked_add(u64::from(meta_len)));
        if min_needed.is_none_or(|n| n > r.remaining() as u64) {
            return Err(r.error("counts exceed the index length".to_string()));
        }
        let table = decode_tensors(&mut r, tensor_count, region_len)?;
        let mut chunks = Vec::with_capacity(chunk_count_field as usize);
        let mut raw_left = region_len;
        for i in 0..chunk_count_field {
            let codec = r.u8()?;
            let stored_len = r.u32()?;
            let crc32c = r.u32()?;
            let raw_len = raw_left.min(u64::from(chunk_size));
            raw_left -= raw_len;
            match codec {
                CODEC_RAW if u64::from(stored_len) != raw_len => {
                    return Err(r.error(format!("raw chunk {i} stores {stored_len} bytes, expected {raw_len}")));
                }
                CODEC_ZSTD
                    if stored_len == 0 || stored_len as usize > zstd::zstd_safe::compress_bound(raw_len as usize) =>
                {
                    return Err(r.error(format!("zstd chunk {i} of {raw_len} bytes cannot store {stored_len} bytes")));
                }
                CODEC_RAW | CODEC_ZSTD => {}
                other => return Err(r.error(format!("chunk {i} has unknown codec {other}"))),
            }
            chunks.push(ChunkEntry { codec, stored_len, crc32c });
        }
        let metadata = r.bytes(meta_len as usize)?.to_vec();
        if r.remaining() != 0 {
            return Err(r.error(format!("{} unexpected bytes after the metadata", r.remaining())));
        }
        Ok(ShardIndex { step, rank, world_size, chunk_size, table, chunks, metadata })
    }

    /// Total stored bytes of all chunks: where the index must start.
    pub fn data_len(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.stored_len)).sum()
    }

    /// Every chunk with its stored and raw ranges.
    pub fn spans(&self) -> Vec<ChunkSpan> {
        let mut stored = 0u64;
        let mut raw = 0u64;
        let total = self.table.total_len();
        self.chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let raw_len = (total - raw).min(u64::from(self.chunk_size));
                let span = ChunkSpan {
                    index: i as u64,
                    stored: stored..stored + u64::from(c.stored_len),
                    raw: raw..raw + raw_len,
                    entry: *c,
                };
                stored += u64::from(c.stored_len);
                raw += raw_len;
                span
            })
            .collect()
    }

    /// Error for a chunk of this shard that fails verification.
    pub(crate) fn chunk_error(&self, object: &str, span: &ChunkSpan, reason: impl Into<String>) -> Error {
        Error::corrupt(
            Location {
                object: object.to_string(),
                step: Some(self.step),
                rank: Some(self.rank),
                chunk: Some(span.index),
                offset: Some(span.stored.start),
            },
            reason,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> ShardIndex {
        let table = TensorTable::packed(
            [
                TensorMeta::new("model.w", DType::BF16, vec![3, 700]).unwrap(),
                TensorMeta::new("step", DType::I64, vec![]).unwrap(),
                TensorMeta::new("empty", DType::F32, vec![0]).unwrap(),
            ],
            64,
        )
        .unwrap();
        let n = chunk_count(table.total_len(), 1024);
        let chunks = (0..n)
            .map(|i| {
                let raw = (table.total_len() - i * 1024).min(1024) as u32;
                ChunkEntry { codec: CODEC_RAW, stored_len: raw, crc32c: i as u32 }
            })
            .collect();
        ShardIndex {
            step: 7,
            rank: 1,
            world_size: 4,
            chunk_size: 1024,
            table,
            chunks,
            metadata: b"{\"lr\":0.1}".to_vec(),
        }
    }

    #[test]
    fn round_trip() {
        let idx = sample();
        let bytes = idx.encode();
        assert_eq!(ShardIndex::decode(&bytes).unwrap(), idx);
        let spans = idx.spans();
        assert_eq!(spans.last().unwrap().raw.end, idx.table.total_len());
        assert_eq!(spans.last().unwrap().stored.end, idx.data_len());
    }

    #[test]
    fn truncation_and_garbage_are_rejected() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(ShardIndex::decode(&bytes[..cut]).is_err(), "prefix of {cut} bytes accepted");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(ShardIndex::decode(&extra).is_err());
    }

    #[test]
    fn hostile_counts_do_not_allocate() {
        let mut bytes = sample().encode();
        bytes[28..32].copy_from_slice(&MAX_TENSORS.to_le_bytes());
        let e = ShardIndex::decode(&bytes).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Corrupt);
    }
}
