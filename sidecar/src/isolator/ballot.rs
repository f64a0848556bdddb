//! The durable-vote tally of one step: every rank votes once that its shard is durable on the
//! store, and the step is ready for its MANIFEST when all `world_size` ranks have voted, or,
//! during an evacuation, when every rank that did not vote is faulty and has a healthy
//! data-parallel replica that did ([`Ballot::replica_cover`]).
//!
//! Pure: the coordinator owns the ballots, decides when the replica rule applies, writes the
//! MANIFEST when the step is complete, and aborts ballots whose deadline passed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use ckpt_core::ShardEntry;
use ckpt_core::store::layout;
use ckptd_proto::v1::DurableVote;

use crate::layout::Layout;
use crate::{Error, Result};

/// Largest shard length a vote may declare (16 TiB): anything above is a hostile or broken peer.
pub const MAX_SHARD_LEN: u64 = 1 << 44;
/// Largest metadata blob a vote may carry.
pub const MAX_METADATA_BYTES: usize = 64 << 10;

/// One rank's validated vote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vote {
    /// The rank.
    pub rank: u32,
    /// The MANIFEST entry of its shard.
    pub entry: ShardEntry,
    /// User metadata (only rank 0's reaches the MANIFEST).
    pub metadata: BTreeMap<String, String>,
}

/// Validates the shard fields of a vote (job, rank and generation are the coordinator's).
/// `metadata` must be empty or a JSON object of strings.
impl TryFrom<&DurableVote> for Vote {
    type Error = Error;

    fn try_from(v: &DurableVote) -> Result<Vote> {
        let bad = |what: &str, reason: String| Error::InvalidRequest { what: format!("vote {what}"), reason };
        // A rank votes for a shard it wrote itself: its own name, a tag, `.ckpt` (nothing else, so no
        // path and no other rank's object).
        if layout::parse_shard_name(&v.shard_key) != Some(v.rank) {
            return Err(bad(
                "shard_key",
                format!(
                    "rank {} must name its own shard `rank-{}.<tag>.ckpt`, not `{:.64}`",
                    v.rank, v.rank, v.shard_key
                ),
            ));
        }
        if v.shard_len == 0 || v.shard_len > MAX_SHARD_LEN {
            return Err(bad("shard_len", format!("{} is outside 1..={MAX_SHARD_LEN}", v.shard_len)));
        }
        if v.region_len > MAX_SHARD_LEN {
            return Err(bad("region_len", format!("{} is above {MAX_SHARD_LEN}", v.region_len)));
        }
        if v.metadata.len() > MAX_METADATA_BYTES {
            return Err(bad("metadata", format!("{} bytes, at most {MAX_METADATA_BYTES}", v.metadata.len())));
        }
        let metadata = if v.metadata.is_empty() {
            BTreeMap::new()
        } else {
            serde_json::from_slice(&v.metadata)
                .map_err(|e| bad("metadata", format!("not a JSON object of strings: {e}")))?
        };
        Ok(Vote {
            rank: v.rank,
            entry: ShardEntry {
                rank: v.rank,
                object: v.shard_key.clone(),
                size: v.shard_len,
                index_crc32c: v.shard_crc32c,
                region_len: v.region_len,
            },
            metadata,
        })
    }
}

/// What adding a vote did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tally {
    /// Recorded; this many ranks are still missing.
    Pending(u32),
    /// Recorded, and every rank has now voted: commit.
    Complete,
    /// The same vote again (a retried call): nothing changed.
    Repeated,
}

/// The votes for one step.
#[derive(Debug)]
pub struct Ballot {
    /// The step.
    pub step: u64,
    /// The job's world size.
    pub world_size: u32,
    /// When the first vote arrived: the commit deadline counts from here.
    pub opened: Instant,
    votes: BTreeMap<u32, Vote>,
}

impl Ballot {
    /// An empty ballot.
    pub fn new(step: u64, world_size: u32, opened: Instant) -> Ballot {
        Ballot { step, world_size, opened, votes: BTreeMap::new() }
    }

    /// Adds one vote. A rank that votes twice with a different shard is refused.
    pub fn add(&mut self, vote: Vote) -> Result<Tally> {
        if vote.rank >= self.world_size {
            return Err(Error::InvalidRequest {
                what: "vote rank".into(),
                reason: format!("rank {} is not below the world size {}", vote.rank, self.world_size),
            });
        }
        if let Some(prev) = self.votes.get(&vote.rank) {
            return if *prev == vote {
                Ok(Tally::Repeated)
            } else {
                Err(Error::InvalidRequest {
                    what: "vote".into(),
                    reason: format!(
                        "rank {} already voted a different shard for step {} (len {}, crc32c {:08x})",
                        vote.rank, self.step, prev.entry.size, prev.entry.index_crc32c
                    ),
                })
            };
        }
        self.votes.insert(vote.rank, vote);
        let missing = self.world_size.saturating_sub(self.votes.len() as u32);
        Ok(if missing == 0 { Tally::Complete } else { Tally::Pending(missing) })
    }

    /// Ranks that have voted.
    pub fn voters(&self) -> Vec<u32> {
        self.votes.keys().copied().collect()
    }

    /// The healthy replicas that complete this ballot for the `faulty` ranks that did not vote:
    /// for each, the lowest replica (per `layout`, [`Layout::replicas`]) that is not faulty and
    /// voted. `None` when a rank that is not faulty has not voted, when a faulty rank that did not
    /// vote has no such replica, when every rank voted (the ballot is complete without replicas),
    /// or when `layout` does not describe the ballot's world size.
    pub fn replica_cover(&self, faulty: &BTreeSet<u32>, layout: &Layout) -> Option<BTreeMap<u32, u32>> {
        if layout.world_size() != u64::from(self.world_size) {
            return None;
        }
        let mut cover = BTreeMap::new();
        for rank in (0..self.world_size).filter(|r| !self.votes.contains_key(r)) {
            if !faulty.contains(&rank) {
                return None;
            }
            let replica = layout.replicas(rank).find(|g| !faulty.contains(g) && self.votes.contains_key(g))?;
            cover.insert(rank, replica);
        }
        (!cover.is_empty()).then_some(cover)
    }

    /// The MANIFEST entries, sorted by rank, and its metadata (rank 0's), for a ballot that every
    /// rank voted or that `cover` ([`Ballot::replica_cover`]) completes: a covered rank's entry is
    /// its replica's, naming the replica's shard, with the covered rank; a covered rank 0's
    /// metadata is its replica's. `None` when a rank has neither a vote nor a cover.
    pub fn manifest(&self, cover: &BTreeMap<u32, u32>) -> Option<(Vec<ShardEntry>, BTreeMap<String, String>)> {
        let vote = |rank: u32| self.votes.get(&rank).or_else(|| self.votes.get(cover.get(&rank)?));
        let entries = (0..self.world_size)
            .map(|rank| vote(rank).map(|v| ShardEntry { rank, ..v.entry.clone() }))
            .collect::<Option<Vec<ShardEntry>>>()?;
        Some((entries, vote(0)?.metadata.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vote(rank: u32, len: u64) -> DurableVote {
        DurableVote {
            job: "j".into(),
            step: 7,
            rank,
            world_size: 2,
            generation: 0,
            shard_key: layout::shard_object(rank, 0xabc),
            shard_len: len,
            shard_crc32c: 0xdead_beef,
            metadata: Vec::new(),
            region_len: len,
        }
    }

    #[test]
    fn completes_once_every_rank_voted_and_repeats_are_harmless() {
        let mut b = Ballot::new(7, 2, Instant::now());
        assert_eq!(b.add(Vote::try_from(&vote(0, 10)).unwrap()).unwrap(), Tally::Pending(1));
        assert_eq!(b.add(Vote::try_from(&vote(0, 10)).unwrap()).unwrap(), Tally::Repeated);
        assert_eq!(b.add(Vote::try_from(&vote(1, 20)).unwrap()).unwrap(), Tally::Complete);
        let (e, _) = b.manifest(&BTreeMap::new()).unwrap();
        assert_eq!((e[0].rank, e[1].rank, e[1].size), (0, 1, 20));
    }

    #[test]
    fn a_faulty_non_voter_is_covered_by_a_healthy_replica_that_voted() {
        let dp2 = Layout::new(2, 1, 1).unwrap();
        let faulty = |r: &[u32]| r.iter().copied().collect::<BTreeSet<u32>>();
        let mut b = Ballot::new(7, 2, Instant::now());
        assert_eq!(b.replica_cover(&faulty(&[0]), &dp2), None, "nobody voted");
        let mut v0 = vote(0, 10);
        v0.metadata = br#"{"lr":"0.1"}"#.to_vec();
        b.add(Vote::try_from(&v0).unwrap()).unwrap();
        assert_eq!(b.manifest(&BTreeMap::new()), None, "rank 1 neither voted nor is covered");
        assert_eq!(b.replica_cover(&faulty(&[]), &dp2), None, "a healthy rank has not voted");
        assert_eq!(b.replica_cover(&faulty(&[0, 1]), &dp2), None, "the only replica is faulty");
        assert_eq!(b.replica_cover(&faulty(&[1]), &Layout::new(1, 2, 1).unwrap()), None, "a tensor neighbour");
        assert_eq!(b.replica_cover(&faulty(&[1]), &Layout::new(4, 1, 1).unwrap()), None, "another world size");
        let cover = b.replica_cover(&faulty(&[1]), &dp2).unwrap();
        assert_eq!(cover, BTreeMap::from([(1, 0)]));
        let (e, meta) = b.manifest(&cover).unwrap();
        assert_eq!((e[1].rank, e[1].object.as_str(), e[1].size), (1, e[0].object.as_str(), 10));
        assert_eq!(meta["lr"], "0.1");
        b.add(Vote::try_from(&vote(1, 20)).unwrap()).unwrap();
        assert_eq!(b.replica_cover(&faulty(&[1]), &dp2), None, "every rank voted");

        // A covered rank 0 brings its replica's metadata.
        let mut b = Ballot::new(7, 2, Instant::now());
        let mut v1 = vote(1, 10);
        v1.metadata = br#"{"lr":"0.2"}"#.to_vec();
        b.add(Vote::try_from(&v1).unwrap()).unwrap();
        let cover = b.replica_cover(&faulty(&[0]), &dp2).unwrap();
        let (e, meta) = b.manifest(&cover).unwrap();
        assert_eq!((e[0].rank, e[0].object.as_str()), (0, e[1].object.as_str()));
        assert_eq!(meta["lr"], "0.2");
    }

    #[test]
    fn conflicting_second_vote_is_refused() {
        let mut b = Ballot::new(7, 2, Instant::now());
        b.add(Vote::try_from(&vote(0, 10)).unwrap()).unwrap();
        let err = b.add(Vote::try_from(&vote(0, 11)).unwrap()).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidRequest);
        assert_eq!(b.voters(), vec![0]);
    }

    #[test]
    fn hostile_fields_are_refused() {
        let mut v = vote(0, 10);
        v.shard_key = "../../etc/passwd".into();
        assert!(Vote::try_from(&v).is_err());
        v.shard_key = layout::shard_object(1, 0xabc);
        assert!(Vote::try_from(&v).is_err(), "a rank votes for another rank's shard");
        v.shard_key = layout::shard_name(0);
        assert!(Vote::try_from(&v).is_ok(), "an old agent's untagged shard");
        assert!(Vote::try_from(&vote(0, 0)).is_err());
        assert!(Vote::try_from(&vote(0, MAX_SHARD_LEN + 1)).is_err());
        let mut v = vote(0, 10);
        v.metadata = b"[1,2]".to_vec();
        assert!(Vote::try_from(&v).is_err());
        v.metadata = vec![b' '; MAX_METADATA_BYTES + 1];
        assert!(Vote::try_from(&v).is_err());
        v.metadata = br#"{"lr":"0.1"}"#.to_vec();
        assert_eq!(Vote::try_from(&v).unwrap().metadata["lr"], "0.1");
        let mut b = Ballot::new(7, 2, Instant::now());
        let mut far = Vote::try_from(&vote(0, 10)).unwrap();
        far.rank = 5;
        assert!(b.add(far).is_err());
    }
}
