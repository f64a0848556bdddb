//! Chunk compression and checksums.
//!
//! Every chunk is stored either raw or as one zstd frame, and carries the crc32c (Castagnoli) of
//! its stored bytes. `auto` compresses only when that saves at least 10%, and first tries a small
//! sample so that incompressible data (most bf16 weights) costs almost nothing.

use crate::error::{Error, Result};

/// Per-chunk codec code: stored bytes are the raw bytes.
pub const CODEC_RAW: u8 = 0;
/// Per-chunk codec code: stored bytes are one zstd frame.
pub const CODEC_ZSTD: u8 = 1;

/// zstd level used by `auto`.
pub const AUTO_LEVEL: i32 = 1;
/// Bytes compressed as a sample before `auto` commits to a whole chunk.
pub const AUTO_SAMPLE: usize = 64 * 1024;

/// How chunks are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Store raw bytes.
    #[default]
    None,
    /// Always zstd at this level (1-22; negative levels are the fast modes).
    Zstd(i32),
    /// zstd level 1 where it saves at least 10%, raw elsewhere.
    Auto,
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Zstd(l) => write!(f, "zstd:{l}"),
            Compression::Auto => f.write_str("auto"),
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = Error;

    /// Parses `none`, `auto`, `zstd` (level 3) or `zstd:<level>`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidConfig {
            field: "compression",
            reason: format!("`{s}` is not a compression mode: use none, auto, zstd or zstd:<level> with level -7..=22"),
        };
        match s {
            "none" | "raw" => Ok(Compression::None),
            "auto" => Ok(Compression::Auto),
            "zstd" => Ok(Compression::Zstd(3)),
            _ => {
                let level: i32 = s.strip_prefix("zstd:").ok_or_else(bad)?.parse().map_err(|_| bad())?;
                if !(-7..=22).contains(&level) {
                    return Err(bad());
                }
                Ok(Compression::Zstd(level))
            }
        }
    }
}

/// Whether `stored` bytes save at least 10% over `raw` bytes.
pub fn worth_it(stored: usize, raw: usize) -> bool {
    (stored as u128) * 10 <= (raw as u128) * 9
}

/// A chunk ready to be stored.
#[derive(Debug)]
pub enum Encoded {
    /// Store the raw bytes unchanged (no copy was made).
    Raw {
        /// crc32c of the raw bytes.
        crc: u32,
    },
    /// Store this zstd frame.
    Zstd {
        /// The compressed frame.
        data: Vec<u8>,
        /// crc32c of `data`.
        crc: u32,
    },
}

/// Per-thread compression state, reused across chunks.
pub struct Encoder {
    mode: Compression,
    ctx: Option<zstd::bulk::Compressor<'static>>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").field("mode", &self.mode).finish()
    }
}

impl Encoder {
    /// An encoder for `mode`.
    pub fn new(mode: Compression) -> Result<Self> {
        let ctx = match mode {
            Compression::None => None,
            Compression::Zstd(level) => Some(level),
            Compression::Auto => Some(AUTO_LEVEL),
        }
        .map(|level| zstd::bulk::Compressor::new(level).map_err(|cause| Error::Codec { cause }))
        .transpose()?;
        Ok(Encoder { mode, ctx })
    }

    /// Encodes one chunk.
    pub fn encode(&mut self, raw: &[u8]) -> Result<Encoded> {
        let Some(ctx) = self.ctx.as_mut() else {
            return Ok(Encoded::Raw { crc: crc32c::crc32c(raw) });
        };
        if self.mode == Compression::Auto && raw.len() > AUTO_SAMPLE {
            let sample = ctx.compress(&raw[..AUTO_SAMPLE]).map_err(|cause| Error::Codec { cause })?;
            if !worth_it(sample.len(), AUTO_SAMPLE) {
                return Ok(Encoded::Raw { crc: crc32c::crc32c(raw) });
            }
        }
        let data = ctx.compress(raw).map_err(|cause| Error::Codec { cause })?;
        if self.mode == Compression::Auto && !worth_it(data.len(), raw.len()) {
            return Ok(Encoded::Raw { crc: crc32c::crc32c(raw) });
        }
        let crc = crc32c::crc32c(&data);
        Ok(Encoded::Zstd { data, crc })
    }
}

/// Decompresses one zstd frame into `dst`, which must be exactly the chunk's raw length.
pub fn decompress_into(stored: &[u8], dst: &mut [u8]) -> Result<()> {
    let n = zstd::bulk::decompress_to_buffer(stored, dst).map_err(|cause| Error::Codec { cause })?;
    if n != dst.len() {
        return Err(Error::Codec {
            cause: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("zstd frame holds {n} bytes, the index says {}", dst.len()),
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_modes() {
        assert_eq!("none".parse::<Compression>().unwrap(), Compression::None);
        assert_eq!("auto".parse::<Compression>().unwrap(), Compression::Auto);
        assert_eq!("zstd:9".parse::<Compression>().unwrap(), Compression::Zstd(9));
        assert_eq!("zstd".parse::<Compression>().unwrap(), Compression::Zstd(3));
        for bad in ["zstd:99", "zstd:x", "lz4", ""] {
            let e = bad.parse::<Compression>().unwrap_err().to_string();
            assert!(e.contains("zstd:<level>"), "{e}");
        }
    }

    #[test]
    fn auto_keeps_incompressible_raw_and_compresses_zeros() {
        let mut enc = Encoder::new(Compression::Auto).unwrap();
        let mut noise = vec![0u8; 200_000];
        let mut x = 0x9e3779b97f4a7c15u64;
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        assert!(matches!(enc.encode(&noise).unwrap(), Encoded::Raw { .. }));
        let zeros = vec![0u8; 200_000];
        match enc.encode(&zeros).unwrap() {
            Encoded::Zstd { data, crc } => {
                assert_eq!(crc, crc32c::crc32c(&data));
                let mut back = vec![1u8; zeros.len()];
                decompress_into(&data, &mut back).unwrap();
                assert_eq!(back, zeros);
                let mut short = vec![0u8; zeros.len() + 1];
                assert!(decompress_into(&data, &mut short).is_err());
            }
            other => panic!("zeros were not compressed: {other:?}"),
        }
    }

    #[test]
    fn threshold_is_ten_percent() {
        assert!(worth_it(90, 100));
        assert!(!worth_it(91, 100));
    }
}
