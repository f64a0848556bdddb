//! Committing a step: the create-only MANIFEST write, the rank-0 committer that waits for every
//! shard of a step to be present and valid, and the check of a shard entry someone else reports
//! (the isolator's votes) against the shard on storage.
//!
//! Exactly one writer can create a MANIFEST: object stores get `PutMode::Create` (S3 `If-None-Match:
//! *`), `file://` gets tmp + fsync + link + directory fsync ([`crate::durable::publish`]). The loser
//! of a race gets [`Error::Conflict`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use object_store::{ObjectStoreExt, PutMode, PutOptions};
use tokio::runtime::Handle;

use crate::catalog;
use crate::durable;
use crate::error::{Error, Result};
use crate::manifest::{Manifest, ShardEntry};
use crate::restore::{self, ShardRef};
use crate::store::{Store, layout};

/// Writes `manifest` create-only. Fails with [`Error::Conflict`] when the step is already
/// committed by someone else.
///
/// A create-only PUT whose response was lost (the store kept the object, the connection dropped)
/// is retried by the client and then refused because the object exists. So a refusal is checked:
/// when the stored MANIFEST is byte-for-byte ours (it carries our creation time and shard
/// checksums), our commit did land and this returns `Ok`.
pub(crate) fn write_manifest(store: &Store, rt: &Handle, manifest: &Manifest) -> Result<()> {
    let rel = layout::manifest_path(&manifest.job, manifest.step);
    let path = store.path(&rel);
    let bytes = manifest.encode();
    if let Some(file) = store.local_file(&path) {
        match durable::write_new(&file, &bytes) {
            Err(e) if e.kind() == crate::ErrorKind::Conflict => {}
            other => return other,
        }
    } else {
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        let os = store.object_store().clone();
        match rt.block_on(os.put_opts(&path, bytes.clone().into(), opts)) {
            Ok(_) => return Ok(()),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {}
            Err(e) => return Err(Error::store("put manifest", &path, e)),
        }
    }
    let os = store.object_store().clone();
    let existing = rt.block_on(async { os.get(&path).await?.bytes().await });
    match existing {
        Ok(existing) if existing.as_ref() == bytes.as_slice() => {
            tracing::info!(job = %manifest.job, step = manifest.step, "create-only put was refused but the stored manifest is ours");
            Ok(())
        }
        Ok(_) => Err(Error::Conflict { job: manifest.job.clone(), step: manifest.step }),
        Err(e) => Err(Error::store("get manifest", &path, e)),
    }
}

/// Reads the shard of `entry.rank` of `step` from storage and checks that it is the shard `entry`
/// describes: it exists, its header validates, it was written for `world_size`, and its size,
/// index checksum and region length are the entry's. A shard that is missing stays
/// [`Error::NotFound`]; one that differs is [`Error::Corrupt`] and says which field differs.
pub(crate) fn verify_entry(
    store: &Store,
    rt: &Handle,
    job: &str,
    step: u64,
    world_size: u32,
    entry: &ShardEntry,
) -> Result<()> {
    let rank = entry.rank;
    let named = layout::parse_shard_name(&entry.object);
    if named.is_none_or(|n| n >= world_size) {
        return Err(Error::InvalidConfig {
            field: "shard object",
            reason: format!(
                "rank {rank} must name a shard of this step (rank-<r>.<tag>.ckpt, r below {world_size}), not `{:.64}`",
                entry.object
            ),
        });
    }
    let h = restore::read_header(store, rt, ShardRef { job, step, object: &entry.object, expected: None })?;
    let differs = |what: &str, stored: String, claimed: String| {
        let location = crate::error::Location {
            object: layout::object_path(job, step, &entry.object),
            step: Some(step),
            rank: Some(rank),
            chunk: None,
            offset: None,
        };
        Err(Error::Corrupt {
            location,
            reason: format!("the stored shard has {what} {stored}, the commit was asked for {claimed}"),
        })
    };
    if h.index.world_size != world_size {
        return differs("world size", h.index.world_size.to_string(), world_size.to_string());
    }
    if h.size != entry.size {
        return differs("length", h.size.to_string(), entry.size.to_string());
    }
    if h.trailer.index_crc32c != entry.index_crc32c {
        return differs(
            "index crc32c",
            format!("{:08x}", h.trailer.index_crc32c),
            format!("{:08x}", entry.index_crc32c),
        );
    }
    let region_len = h.index.table.total_len();
    if region_len != entry.region_len {
        return differs("region length", region_len.to_string(), entry.region_len.to_string());
    }
    Ok(())
}

/// Checks every entry of `manifest` against its shard on storage ([`verify_entry`]), then writes
/// the MANIFEST create-only. The first shard that does not match fails the commit and nothing is
/// written.
pub(crate) fn commit_verified(store: &Store, rt: &Handle, manifest: &Manifest) -> Result<()> {
    let checked = catalog::parallel_map(&manifest.shards, 16, |e| {
        verify_entry(store, rt, &manifest.job, manifest.step, manifest.world_size, e)
    });
    for r in checked {
        r?;
    }
    write_manifest(store, rt, manifest)
}

/// How long the committer waits for shards, and how often it looks.
#[derive(Debug, Clone)]
pub struct CommitConfig {
    /// Give up on a step after this long; the previous step stays latest.
    pub deadline: Duration,
    /// First polling interval; it doubles up to `max_poll`.
    pub poll: Duration,
    /// Longest polling interval.
    pub max_poll: Duration,
}

impl Default for CommitConfig {
    fn default() -> Self {
        CommitConfig {
            deadline: Duration::from_secs(600),
            poll: Duration::from_millis(20),
            max_poll: Duration::from_secs(2),
        }
    }
}

/// Longest pause between two looks for a MANIFEST written by another committer: a rank's save
/// completes at most this long after its step is committed.
const MAX_MANIFEST_POLL: Duration = Duration::from_millis(200);

/// Waits until `step` is committed by another writer (rank 0, or the isolator), up to the commit
/// deadline. `abort` is asked between looks; `Some(reason)` ends the wait with
/// [`Error::Aborted`]. Blocking.
pub(crate) fn wait_committed(
    store: &Store,
    rt: &Handle,
    cfg: &CommitConfig,
    job: &str,
    step: u64,
    abort: &dyn Fn() -> Option<String>,
) -> Result<Manifest> {
    let started = Instant::now();
    let mut poll = cfg.poll.min(MAX_MANIFEST_POLL);
    loop {
        match catalog::read_manifest(store, rt, job, step) {
            Ok(m) => return Ok(m),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        if let Some(reason) = abort() {
            return Err(Error::Aborted { job: job.to_string(), step, reason });
        }
        let waited = started.elapsed();
        if waited >= cfg.deadline {
            return Err(Error::CommitTimeout { job: job.to_string(), step, waited_ms: waited.as_millis() as u64 });
        }
        std::thread::sleep(poll.min(cfg.deadline - waited));
        poll = (poll * 2).min(cfg.max_poll.min(MAX_MANIFEST_POLL));
    }
}

/// The step a commit is for: `job`'s `step`, written by `world_size` ranks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepTarget<'a> {
    pub job: &'a str,
    pub step: u64,
    pub world_size: u32,
}

/// Waits until every rank's shard of `step` is present and its header validates, then writes the
/// MANIFEST. Blocking.
pub(crate) fn commit_when_complete(
    store: &Store,
    rt: &Handle,
    cfg: &CommitConfig,
    target: StepTarget<'_>,
    metadata: BTreeMap<String, String>,
    abort: &dyn Fn() -> Option<String>,
) -> Result<Manifest> {
    let StepTarget { job, step, world_size } = target;
    let started = Instant::now();
    let mut entries: BTreeMap<u32, ShardEntry> = BTreeMap::new();
    let mut poll = cfg.poll;
    loop {
        let steps = catalog::list_steps(store, rt, job)?;
        let listed = steps.iter().find(|s| s.step == step);
        if listed.is_some_and(|s| s.state == catalog::StepState::Committed) {
            return Err(Error::Conflict { job: job.to_string(), step });
        }
        // Every rank still missing, with its shard objects newest first: a rank's newest valid
        // write counts (an older one is what an attempt that died left).
        let present: Vec<(u32, Vec<String>)> = listed
            .map(|s| {
                let mut by_rank: BTreeMap<u32, Vec<String>> = BTreeMap::new();
                for l in s.shards.iter().filter(|l| l.rank < world_size && !entries.contains_key(&l.rank)) {
                    by_rank.entry(l.rank).or_default().insert(0, l.object.clone());
                }
                by_rank.into_iter().collect()
            })
            .unwrap_or_default();
        let checked = catalog::parallel_map(&present, 16, |(rank, objects)| {
            let mut last = None;
            for object in objects {
                match restore::read_header(store, rt, ShardRef { job, step, object, expected: None }) {
                    Ok(h) if h.index.world_size == world_size => {
                        return Some(ShardEntry {
                            rank: *rank,
                            object: object.clone(),
                            size: h.size,
                            index_crc32c: h.trailer.index_crc32c,
                            region_len: h.index.table.total_len(),
                        });
                    }
                    Ok(h) => tracing::warn!(
                        job,
                        step,
                        rank,
                        object,
                        found = h.index.world_size,
                        world_size,
                        "shard has another world size; ignoring it"
                    ),
                    // Removed since the listing, or damaged: look at the next one, and again next round.
                    Err(e) => last = Some(e),
                }
            }
            if let Some(e) = last {
                tracing::debug!(job, step, rank, error = %e, "shard not valid yet");
            }
            None
        });
        for entry in checked.into_iter().flatten() {
            entries.insert(entry.rank, entry);
        }
        if entries.len() == world_size as usize {
            let manifest = Manifest::new(job, step, world_size, entries.into_values().collect(), metadata)?;
            write_manifest(store, rt, &manifest)?;
            tracing::info!(job, step, world_size, "step committed");
            return Ok(manifest);
        }
        if let Some(reason) = abort() {
            return Err(Error::Aborted { job: job.to_string(), step, reason });
        }
        let waited = started.elapsed();
        if waited >= cfg.deadline {
            let missing = (0..world_size).filter(|r| !entries.contains_key(r)).collect();
            return Err(Error::Incomplete {
                job: job.to_string(),
                step,
                missing,
                waited_ms: waited.as_millis() as u64,
            });
        }
        std::thread::sleep(poll.min(cfg.deadline - waited));
        poll = (poll * 2).min(cfg.max_poll);
    }
}
