//! The per-step MANIFEST: the commit record of a checkpoint step.
//!
//! A step exists only once its MANIFEST exists. The MANIFEST is UTF-8 JSON followed by one line
//! `crc32c=<8 lowercase hex digits>\n` that covers every byte before it, so any damaged byte is
//! detected while the file stays readable with `cat`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Location, Result};
use crate::store::layout;

/// The manifest format version this build writes. It reads this one and version 1.
pub const MANIFEST_VERSION: u32 = 2;
/// Version 1: every entry names `rank-<r>.ckpt`, its own rank's untagged shard.
pub const MANIFEST_VERSION_UNTAGGED: u32 = 1;
/// The `format` field's value.
pub const MANIFEST_FORMAT: &str = "ckptd.manifest";
/// Largest manifest a reader accepts.
pub const MAX_MANIFEST_LEN: usize = 64 << 20;
/// Largest world size a manifest may declare.
pub const MAX_WORLD_SIZE: u32 = 1 << 20;

/// One rank's shard as committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// The rank.
    pub rank: u32,
    /// Object name inside the step directory: `rank-<s>.<tag>.ckpt` (version 2) or `rank-<r>.ckpt`
    /// (version 1). In version 2, `s` may be another rank whose shard holds this rank's state (a
    /// data-parallel replica); readers restore that shard for this rank.
    pub object: String,
    /// Total size of the shard object in bytes.
    pub size: u64,
    /// The shard's checksum: the crc32c of its index, which holds every chunk's crc32c.
    pub index_crc32c: u32,
    /// Size of the rank's snapshot region (uncompressed bytes).
    pub region_len: u64,
}

/// The commit record of one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// [`MANIFEST_VERSION`] when written by this build; [`MANIFEST_VERSION_UNTAGGED`] is read too.
    pub version: u32,
    /// The job name.
    pub job: String,
    /// The step.
    pub step: u64,
    /// Number of ranks; `shards` has exactly one entry per rank.
    pub world_size: u32,
    /// Commit time in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The shards, sorted by rank.
    pub shards: Vec<ShardEntry>,
    /// User metadata (free-form key/value pairs).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// What a reader running with another number of ranks than the step was saved by does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resize {
    /// Refuse: the job waits until it runs with the ranks it saved with (a replacement node).
    #[default]
    Wait,
    /// The job's data-parallel replicas hold the same state: a rank loads the shard of a saved
    /// rank with its own tensor- and pipeline-parallel position (ranks ordered tensor-parallel
    /// fastest, then data-parallel, then pipeline: `rank = t + tp × (d + dp × p)`), so the job
    /// resumes at another data-parallel size. Each rank's user metadata is that replica's.
    Replicas {
        /// Tensor-parallel size (the same before and after).
        tp: u32,
        /// Pipeline-parallel size (the same before and after).
        pp: u32,
    },
}

impl Resize {
    /// The saved rank whose shard `rank` of a `world_size`-rank job loads from a step saved by
    /// `saved` ranks, or why it cannot.
    pub fn source_rank(self, rank: u32, world_size: u32, saved: u32) -> std::result::Result<u32, String> {
        if world_size == saved {
            return Ok(rank);
        }
        let sizes = format!("the step was saved by {saved} ranks and this job runs {world_size}");
        match self {
            Resize::Wait => Err(format!(
                "{sizes}: it waits for its {saved} ranks (resize policy `wait`); if its data-parallel replicas hold the same state (DDP, not ZeRO/FSDP sharding), set ckptd.io/on-resize=replicas (CKPTD_ON_RESIZE=replicas) to resume at {world_size}"
            )),
            Resize::Replicas { tp, pp } => {
                let mp = u64::from(tp) * u64::from(pp);
                if mp == 0 || u64::from(saved) % mp != 0 || u64::from(world_size) % mp != 0 {
                    return Err(format!(
                        "{sizes}, and a model-parallel group of tp={tp} x pp={pp} ranks does not divide both: only the data-parallel size may change"
                    ));
                }
                let (dp_new, dp_old) = (u64::from(world_size) / mp, u64::from(saved) / mp);
                let (r, tp) = (u64::from(rank), u64::from(tp));
                let (t, d, p) = (r % tp, (r / tp) % dp_new, r / (tp * dp_new));
                let src = t + tp * ((d % dp_old) + dp_old * p);
                u32::try_from(src).map_err(|_| format!("{sizes}: rank {rank} has no replica"))
            }
        }
    }
}

#[derive(Deserialize)]
struct VersionProbe {
    format: Option<String>,
    version: Option<u32>,
}

impl Manifest {
    /// A manifest for `shards`, which must cover every rank once.
    pub fn new(
        job: &str,
        step: u64,
        world_size: u32,
        mut shards: Vec<ShardEntry>,
        metadata: BTreeMap<String, String>,
    ) -> Result<Manifest> {
        shards.sort_by_key(|s| s.rank);
        let created_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let m = Manifest {
            format: MANIFEST_FORMAT.to_string(),
            version: MANIFEST_VERSION,
            job: job.to_string(),
            step,
            world_size,
            created_unix_ms,
            shards,
            metadata,
        };
        m.validate().map_err(|reason| Error::InvalidConfig { field: "manifest", reason })?;
        Ok(m)
    }

    /// Serialises the manifest with its checksum line.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain structs of strings and integers cannot fail.
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(format!("crc32c={crc:08x}\n").as_bytes());
        out
    }

    /// Parses and checks a manifest: size cap, checksum, version, and that the shards cover each
    /// rank exactly once.
    pub fn decode(bytes: &[u8]) -> Result<Manifest> {
        let bad =
            |reason: String| Error::corrupt(Location { object: "MANIFEST".into(), ..Location::default() }, reason);
        if bytes.len() > MAX_MANIFEST_LEN {
            return Err(bad(format!("{} bytes exceed the {MAX_MANIFEST_LEN}-byte cap", bytes.len())));
        }
        const CRC_LINE: usize = "crc32c=00000000\n".len();
        let split = bytes.len().checked_sub(CRC_LINE).ok_or_else(|| bad("too short to hold a checksum line".into()))?;
        let (body, line) = bytes.split_at(split);
        let hex = line
            .strip_prefix(b"crc32c=")
            .and_then(|l| l.strip_suffix(b"\n"))
            .filter(|h| h.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| bad("missing or malformed `crc32c=` line".into()))?;
        if crc32c::crc32c(body) != hex {
            return Err(bad("checksum mismatch".into()));
        }
        let probe: VersionProbe = serde_json::from_slice(body).map_err(|e| bad(format!("not a JSON manifest: {e}")))?;
        if probe.format.as_deref() != Some(MANIFEST_FORMAT) {
            return Err(bad(format!("`format` is not \"{MANIFEST_FORMAT}\"")));
        }
        match probe.version {
            Some(MANIFEST_VERSION | MANIFEST_VERSION_UNTAGGED) => {}
            Some(found) => {
                return Err(Error::UnsupportedVersion { what: "manifest", found, supported: MANIFEST_VERSION });
            }
            None => return Err(bad("missing `version`".into())),
        }
        let m: Manifest = serde_json::from_slice(body).map_err(|e| bad(format!("invalid manifest: {e}")))?;
        m.validate().map_err(bad)?;
        Ok(m)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        layout::validate_job(&self.job).map_err(|e| e.to_string())?;
        if self.world_size == 0 || self.world_size > MAX_WORLD_SIZE {
            return Err(format!("world size {} outside 1..={MAX_WORLD_SIZE}", self.world_size));
        }
        if self.shards.len() != self.world_size as usize {
            return Err(format!("{} shards for world size {}", self.shards.len(), self.world_size));
        }
        for (i, s) in self.shards.iter().enumerate() {
            if s.rank as usize != i {
                return Err(format!("shard list is missing rank {i} or repeats a rank"));
            }
            let named = layout::parse_shard_name(&s.object);
            let fits = match self.version {
                MANIFEST_VERSION_UNTAGGED => s.object == layout::shard_name(s.rank),
                _ => named.is_some_and(|n| n < self.world_size),
            };
            if !fits {
                return Err(format!("rank {} names object `{:.80}`", s.rank, s.object));
            }
        }
        Ok(())
    }

    /// The rank whose shard the entry of `rank` names: `rank` itself, or the data-parallel replica
    /// that covers it.
    pub fn source_rank(entry: &ShardEntry) -> u32 {
        layout::parse_shard_name(&entry.object).unwrap_or(entry.rank)
    }

    /// The shard entry of `rank`.
    pub fn shard(&self, rank: u32) -> Option<&ShardEntry> {
        self.shards.get(rank as usize)
    }

    /// The saved rank whose entry rank `rank` of a `world_size`-rank job restores, under
    /// `resize` when the step was saved by another number of ranks; a
    /// [`Error::StateMismatch`] that says what to do otherwise.
    pub fn restore_rank(&self, rank: u32, world_size: u32, resize: Resize) -> Result<u32> {
        let mismatch = |reason: String| Error::StateMismatch { step: self.step, problems: vec![reason] };
        if rank >= world_size {
            return Err(mismatch(format!("rank {rank} is outside world size {world_size}")));
        }
        resize.source_rank(rank, world_size, self.world_size).map_err(mismatch)
    }

    /// Total stored bytes of the step.
    pub fn total_size(&self) -> u64 {
        self.shards.iter().map(|s| s.size).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let shards = (0..3)
            .map(|r| ShardEntry {
                rank: r,
                object: layout::shard_object(r, 0x1234_0000 + u64::from(r)),
                size: 1000 + u64::from(r),
                index_crc32c: 0xabc0 + r,
                region_len: 900,
            })
            .collect();
        Manifest::new("job-a", 12, 3, shards, BTreeMap::from([("lr".to_string(), "3e-4".to_string())])).unwrap()
    }

    #[test]
    fn round_trip_and_every_byte_flip_is_caught() {
        let m = sample();
        let bytes = m.encode();
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            assert!(Manifest::decode(&b).is_err(), "flip at byte {i} accepted");
        }
    }

    #[test]
    fn incomplete_shard_lists_are_rejected() {
        let mut m = sample();
        m.shards.remove(1);
        assert!(Manifest::new("j", 1, 3, m.shards.clone(), BTreeMap::new()).is_err());
        let bytes = m.encode();
        assert!(Manifest::decode(&bytes).unwrap_err().to_string().contains("shards for world size"));
    }

    #[test]
    fn object_names_follow_the_version() {
        let mut m = sample();
        // A replica's shard may stand in for another rank.
        m.shards[2].object = m.shards[0].object.clone();
        assert_eq!(Manifest::decode(&m.encode()).unwrap().shards[2].object, m.shards[0].object);
        assert_eq!(Manifest::source_rank(&m.shards[2]), 0);
        for bad in ["rank-3.0000000000000001.ckpt", "rank-1.ckpt.tmp-9", "../rank-1.ckpt", "MANIFEST"] {
            let mut m = sample();
            m.shards[1].object = bad.into();
            assert!(Manifest::decode(&m.encode()).is_err(), "{bad} accepted");
        }
        // Version 1 (written before tags) names exactly `rank-<r>.ckpt`, and still reads.
        let mut v1 = sample();
        v1.version = MANIFEST_VERSION_UNTAGGED;
        assert!(Manifest::decode(&v1.encode()).is_err(), "tagged names in a version 1 manifest");
        for s in &mut v1.shards {
            s.object = layout::shard_name(s.rank);
        }
        assert_eq!(Manifest::decode(&v1.encode()).unwrap(), v1);
        v1.shards[2].object = layout::shard_name(0);
        assert!(Manifest::decode(&v1.encode()).is_err(), "version 1 has no replica cover");
    }

    #[test]
    fn a_resize_maps_ranks_to_replicas_with_their_model_parallel_position() {
        let map = |resize: Resize, world: u32, saved: u32| -> Vec<u32> {
            (0..world).map(|r| resize.source_rank(r, world, saved).unwrap()).collect()
        };
        let dp = Resize::Replicas { tp: 1, pp: 1 };
        assert_eq!(map(dp, 2, 4), [0, 1], "a smaller data-parallel size");
        assert_eq!(map(dp, 4, 2), [0, 1, 0, 1], "a larger one");
        assert_eq!(map(Resize::Wait, 3, 3), [0, 1, 2], "the same size needs no policy");
        // tp=2, pp=2: saved dp=2 (8 ranks), resumed at dp=1 (4 ranks). Rank = t + 2(d + dp·p).
        let mp = Resize::Replicas { tp: 2, pp: 2 };
        assert_eq!(map(mp, 4, 8), [0, 1, 4, 5], "pipeline stage 1 is ranks 4, 5 of the saved job");
        assert_eq!(map(mp, 12, 8), [0, 1, 2, 3, 0, 1, 4, 5, 6, 7, 4, 5], "dp 3 from dp 2");
        let e = Resize::Wait.source_rank(0, 2, 4).unwrap_err();
        assert!(e.contains("saved by 4 ranks") && e.contains("ckptd.io/on-resize=replicas"), "{e}");
        let e = mp.source_rank(0, 6, 8).unwrap_err();
        assert!(e.contains("only the data-parallel size may change"), "{e}");
        let m = sample();
        assert_eq!(m.restore_rank(1, 2, dp).unwrap(), 1);
        assert_eq!(m.restore_rank(2, 2, dp).unwrap_err().kind(), crate::ErrorKind::Mismatch);
        assert_eq!(m.restore_rank(0, 2, Resize::Wait).unwrap_err().kind(), crate::ErrorKind::Mismatch);
    }

    #[test]
    fn future_version_is_unsupported() {
        let mut m = sample();
        m.version = 9;
        let e = Manifest::decode(&m.encode()).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
    }
}
