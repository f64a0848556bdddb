//! The fixed-size trailer at the end of every shard.

use super::{FORMAT_VERSION, MAX_INDEX_LEN, TRAILER_LEN, TRAILER_MAGIC};
use crate::error::{Error, Location, Result};
use crate::format::wire::Reader;

/// The last [`TRAILER_LEN`] bytes of a shard: where the index is and its checksum.
///
/// ```text
/// offset size field
///  0      8   magic "CKPTSHRD"
///  8      4   version (u32 LE) = 1
/// 12      4   flags (u32 LE) = 0
/// 16      8   index_offset (u64 LE): first byte of the index = total stored chunk bytes
/// 24      8   index_len (u64 LE)
/// 32      4   index_crc32c (u32 LE)
/// 36      4   reserved = 0
/// 40      4   trailer_crc32c (u32 LE) of bytes 0..40
/// 44      4   end magic "SHRD"
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// Offset of the index, which is also the length of the chunk data.
    pub index_offset: u64,
    /// Length of the index in bytes.
    pub index_len: u64,
    /// crc32c of the index bytes. The manifest records it as the shard's checksum: the index holds
    /// every chunk's crc, so this one value covers the whole shard.
    pub index_crc32c: u32,
}

const END_MAGIC: [u8; 4] = *b"SHRD";

impl Trailer {
    /// Serialises the trailer.
    pub fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut out = [0u8; TRAILER_LEN];
        out[0..8].copy_from_slice(&TRAILER_MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&0u32.to_le_bytes());
        out[16..24].copy_from_slice(&self.index_offset.to_le_bytes());
        out[24..32].copy_from_slice(&self.index_len.to_le_bytes());
        out[32..36].copy_from_slice(&self.index_crc32c.to_le_bytes());
        let crc = crc32c::crc32c(&out[0..40]);
        out[40..44].copy_from_slice(&crc.to_le_bytes());
        out[44..48].copy_from_slice(&END_MAGIC);
        out
    }

    /// Parses and checks a trailer: magics, checksum, version, flags and reserved bytes.
    pub fn decode(bytes: &[u8]) -> Result<Trailer> {
        let bad =
            |reason: String| Error::corrupt(Location { object: "shard trailer".into(), ..Location::default() }, reason);
        if bytes.len() != TRAILER_LEN {
            return Err(bad(format!("trailer is {} bytes, expected {TRAILER_LEN}", bytes.len())));
        }
        let mut r = Reader::new(bytes, "shard trailer");
        if r.array::<8>()? != TRAILER_MAGIC || bytes[44..48] != END_MAGIC {
            return Err(bad("bad magic: this is not a ckptd shard, or it was cut short".into()));
        }
        let stored_crc = u32::from_le_bytes([bytes[40], bytes[41], bytes[42], bytes[43]]);
        if crc32c::crc32c(&bytes[0..40]) != stored_crc {
            return Err(bad("trailer checksum mismatch".into()));
        }
        let version = r.u32()?;
        if version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion { what: "shard", found: version, supported: FORMAT_VERSION });
        }
        let flags = r.u32()?;
        if flags != 0 {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        let index_offset = r.u64()?;
        let index_len = r.u64()?;
        let index_crc32c = r.u32()?;
        if r.u32()? != 0 {
            return Err(bad("reserved bytes are not zero".into()));
        }
        if index_len > MAX_INDEX_LEN {
            return Err(bad(format!("index length {index_len} exceeds the {MAX_INDEX_LEN}-byte cap")));
        }
        if index_offset.checked_add(index_len).and_then(|v| v.checked_add(TRAILER_LEN as u64)).is_none() {
            return Err(bad("index position overflows".into()));
        }
        Ok(Trailer { index_offset, index_len, index_crc32c })
    }

    /// Total size of the shard this trailer ends.
    pub fn shard_len(&self) -> u64 {
        // Checked in decode; a trailer built in memory has small values.
        self.index_offset.saturating_add(self.index_len).saturating_add(TRAILER_LEN as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_byte_flip_is_caught() {
        let t = Trailer { index_offset: 123_456, index_len: 789, index_crc32c: 0xdead_beef };
        let bytes = t.encode();
        assert_eq!(Trailer::decode(&bytes).unwrap(), t);
        assert_eq!(t.shard_len(), 123_456 + 789 + 48);
        for i in 0..TRAILER_LEN {
            for bit in 0..8 {
                let mut b = bytes;
                b[i] ^= 1 << bit;
                assert!(Trailer::decode(&b).is_err(), "flip of byte {i} bit {bit} was accepted");
            }
        }
    }

    #[test]
    fn future_version_is_reported_as_unsupported() {
        let mut b = Trailer { index_offset: 0, index_len: 10, index_crc32c: 1 }.encode();
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..40]);
        b[40..44].copy_from_slice(&crc.to_le_bytes());
        let e = Trailer::decode(&b).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
        assert!(e.to_string().contains("upgrade ckptd"), "{e}");
    }
}
