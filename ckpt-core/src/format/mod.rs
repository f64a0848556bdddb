//! Format v1 of a rank's shard: data chunks, then an index, then a fixed-size trailer.
//!
//! docs/FORMAT.md is the specification; this module implements it. Every parser here takes
//! untrusted bytes: it uses checked arithmetic and size caps, and returns an error instead of
//! panicking on any input (the fuzz targets in `ckpt-core/fuzz` hold it to that).

mod index;
mod trailer;
pub(crate) mod wire;

pub use index::{ChunkEntry, ChunkSpan, ShardIndex};
pub use trailer::Trailer;

pub(crate) use index::{chunk_count as index_chunk_count, decode_tensors, encode_tensors};

/// The shard format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Magic bytes at the start of the trailer.
pub const TRAILER_MAGIC: [u8; 8] = *b"CKPTSHRD";
/// Size of the trailer in bytes.
pub const TRAILER_LEN: usize = 48;
/// Smallest chunk size a shard may declare.
pub const MIN_CHUNK_SIZE: u32 = 512;
/// Largest chunk size a shard may declare.
pub const MAX_CHUNK_SIZE: u32 = 1 << 30;
/// Default chunk size: large enough for full-speed I/O, small enough for parallelism.
pub const DEFAULT_CHUNK_SIZE: u32 = 8 << 20;
/// Largest index a reader accepts.
pub const MAX_INDEX_LEN: u64 = 1 << 30;
/// Largest user metadata blob in an index.
pub const MAX_METADATA_LEN: u32 = 64 << 20;
/// Most tensors one shard may hold.
pub const MAX_TENSORS: u32 = 10_000_000;
