//! Committing a step: the create-only MANIFEST write, the commit through storage (the rank that
//! finishes last commits, rank 0 stands by as the fallback committer, the others are woken by the
//! MANIFEST), and the check of a shard entry someone else reports (the isolator's votes) against
//! the shard on storage.
//!
//! Exactly one writer can create a MANIFEST: object stores get `PutMode::Create` (S3 `If-None-Match:
//! *`), `file://` gets tmp + fsync + link + directory fsync ([`crate::durable::publish`]). The loser
//! of a race gets [`Error::Conflict`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use object_store::{ObjectStoreExt, PutMode, PutOptions};
use tokio::runtime::Handle;

use crate::catalog;
use crate::durable;
use crate::error::{Error, Result};
use crate::manifest::{Manifest, ShardEntry};
use crate::restore::{self, ShardRef};
use crate::store::{Store, layout};
use crate::watch::DirWatch;

/// What a create-only MANIFEST write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    /// This write created it.
    Created,
    /// The store refused it, and holds byte-for-byte the same MANIFEST: a committer that took the
    /// same shards at the same time (two ranks finishing together), or our own PUT whose response
    /// was lost.
    Identical,
}

/// Writes `manifest` create-only. Fails with [`Error::Conflict`] when the step is already
/// committed with another MANIFEST.
///
/// A create-only PUT whose response was lost (the store kept the object, the connection dropped)
/// is retried by the client and then refused because the object exists. So a refusal is checked:
/// when the stored MANIFEST is byte-for-byte ours (the same shards, metadata and creation time),
/// the step is committed as we would have committed it, and this returns
/// [`Written::Identical`].
pub(crate) fn write_manifest(store: &Store, rt: &Handle, manifest: &Manifest) -> Result<Written> {
    let rel = layout::manifest_path(&manifest.job, manifest.step);
    let path = store.path(&rel);
    let bytes = manifest.encode();
    if let Some(file) = store.local_file(&path) {
        match durable::write_new(&file, &bytes) {
            Err(e) if e.kind() == crate::ErrorKind::Conflict => {}
            // Our temporary file was removed before its link: a new owner of some rank cleared
            // the temporaries of a step it found committed (see `remove_stale_temporaries`).
            Err(Error::Io { op: "link", cause, .. }) if cause.kind() == std::io::ErrorKind::NotFound => {}
            other => return other.map(|()| Written::Created),
        }
    } else {
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        let os = store.object_store().clone();
        match rt.block_on(os.put_opts(&path, bytes.clone().into(), opts)) {
            Ok(_) => return Ok(Written::Created),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {}
            Err(e) => return Err(Error::store("put manifest", &path, e)),
        }
    }
    let os = store.object_store().clone();
    let existing = rt.block_on(async { os.get(&path).await?.bytes().await });
    match existing {
        Ok(existing) if existing.as_ref() == bytes.as_slice() => {
            tracing::info!(job = %manifest.job, step = manifest.step, "create-only write was refused but the stored manifest is the same");
            Ok(Written::Identical)
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
    write_manifest(store, rt, manifest).map(drop)
}

/// How long a commit may take, and how often the fallback committer looks for shards.
#[derive(Debug, Clone)]
pub struct CommitConfig {
    /// Give up on a step after this long; the previous step stays latest.
    pub deadline: Duration,
    /// First interval between the fallback committer's looks for missing shards; it doubles up to
    /// `max_poll`.
    pub poll: Duration,
    /// Longest interval between two looks, for shards and for the MANIFEST alike.
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

/// First pause between two looks for a MANIFEST that no watch announces (object stores, or a
/// directory inotify cannot watch); it grows by half up to [`MAX_UNWATCHED_POLL`].
const FIRST_UNWATCHED_POLL: Duration = Duration::from_millis(5);

/// Longest pause between two looks for a MANIFEST that no watch announces: a waiting rank learns
/// of a commit at most this late, and costs the store at most 1 s / this GETs a second.
const MAX_UNWATCHED_POLL: Duration = Duration::from_millis(50);

/// Pause between two looks for a MANIFEST while inotify watches its directory. The watch wakes the
/// waiter when the MANIFEST is linked by a process on this host; the look catches a commit made
/// by another host of a network file system, which inotify does not report.
const WATCHED_POLL: Duration = Duration::from_millis(100);

/// Who may write the MANIFEST of a step a rank waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitRole {
    /// Another writer commits (the isolator, from votes): never write it.
    Others,
    /// Commit if this rank's one look after its write finds every rank's shard present and valid:
    /// the rank that finishes last commits. Then wait for the MANIFEST.
    IfLast,
    /// As [`CommitRole::IfLast`], and keep looking for the missing shards until the deadline (rank
    /// 0): a step whose last rank could not commit (it died after its write, or its commit failed)
    /// is still committed.
    Fallback,
}

/// How a rank's wait for its step's commit ended.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The step's MANIFEST.
    pub manifest: Manifest,
    /// When this rank learned of the commit (wall clock; for measurements, never for decisions).
    pub learned: SystemTime,
    /// When this rank wrote the MANIFEST itself; `None` when another writer did.
    pub written: Option<SystemTime>,
}

/// The step a commit is for: `job`'s `step`, written by `world_size` ranks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepTarget<'a> {
    pub job: &'a str,
    pub step: u64,
    pub world_size: u32,
}

/// Who waits for a commit: the rank whose write `own` is (`None`: a committer that wrote no
/// shard), in `role`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Waiter<'a> {
    pub own: Option<&'a ShardEntry>,
    pub role: CommitRole,
}

/// Who committed a step, as a look saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum By {
    /// This look's write created the MANIFEST, at that time.
    This(SystemTime),
    /// The stored MANIFEST is byte-for-byte the one this look wrote ([`Written::Identical`]).
    Same,
    /// Someone else, with a MANIFEST this look did not write (or this caller wrote none).
    Other,
}

/// What one look at a step found.
enum Look {
    /// The step is committed.
    Committed(Manifest, By),
    /// Not committed; these ranks have no valid shard yet (empty: not looked for).
    Missing(Vec<u32>),
}

/// Waits until `step` is committed, committing it where `role` allows, and checks that the
/// MANIFEST names `own` (this rank's write, when the caller is a rank): a rank's save counts only
/// if the committed step holds its shard, not an older write of its rank (an attempt that died),
/// else [`Error::Superseded`].
///
/// - With [`CommitRole::IfLast`] and [`CommitRole::Fallback`], the first look lists the step and
///   commits when every rank's newest valid shard is there (with `own` for this rank). Whichever
///   rank links its shard last sees every shard, because its listing comes after every other
///   link, so a step commits as soon as its last shard is durable; racing committers are settled
///   by the create-only write.
/// - Then the MANIFEST is waited for: woken by inotify on a `file://` step directory (checked
///   every [`WATCHED_POLL`] too), else looked for every 5 ms growing to [`MAX_UNWATCHED_POLL`].
/// - With [`CommitRole::Fallback`] the step is listed again every `cfg.poll`, doubling to
///   `cfg.max_poll`, and committed once complete.
///
/// `abort` is asked between looks: `Some(reason)` ends the wait with [`Error::Aborted`]. After
/// `cfg.deadline` the fallback committer fails with [`Error::Incomplete`] naming the missing
/// ranks, any other with [`Error::CommitTimeout`]. Returns, with the commit, who wrote it as this
/// caller saw it. Blocking.
pub(crate) fn commit_or_wait(
    store: &Store,
    rt: &Handle,
    cfg: &CommitConfig,
    target: StepTarget<'_>,
    who: Waiter<'_>,
    metadata: BTreeMap<String, String>,
    abort: &dyn Fn() -> Option<String>,
) -> Result<(Committed, By)> {
    let StepTarget { job, step, .. } = target;
    let Waiter { own, role } = who;
    let started = Instant::now();
    let mut known: BTreeMap<u32, ShardEntry> = BTreeMap::new();
    if let Some(o) = own {
        known.insert(o.rank, o.clone());
    }
    let commits = role != CommitRole::Others;
    let falls_back = role == CommitRole::Fallback;
    // Watch before the first look, so a MANIFEST linked between a look and the wait still wakes.
    let watch = store.local_file(&store.path(&layout::step_dir(job, step))).and_then(|d| DirWatch::new(&d));
    let max_poll = cfg.max_poll.max(Duration::from_millis(1));
    let mut wait_poll = if watch.is_some() { WATCHED_POLL } else { FIRST_UNWATCHED_POLL }.min(max_poll);
    let mut list_every = cfg.poll.min(max_poll);
    let mut next_list = commits.then_some(started);
    let mut missing = Vec::new();
    loop {
        let now = Instant::now();
        let look = match next_list {
            Some(at) if now >= at => {
                next_list = falls_back.then(|| now + list_every);
                list_every = (list_every * 2).min(max_poll);
                look_and_commit(store, rt, target, &mut known, &metadata)?
            }
            _ => match catalog::read_manifest(store, rt, job, step) {
                Ok(m) => Look::Committed(m, By::Other),
                Err(e) if e.is_not_found() => Look::Missing(Vec::new()),
                Err(e) => return Err(e),
            },
        };
        let (manifest, by) = match look {
            Look::Committed(m, by) => (m, by),
            Look::Missing(m) => {
                if !m.is_empty() {
                    missing = m;
                }
                if let Some(reason) = abort() {
                    return Err(Error::Aborted { job: job.to_string(), step, reason });
                }
                let waited = started.elapsed();
                if waited >= cfg.deadline {
                    let waited_ms = waited.as_millis() as u64;
                    return Err(if falls_back {
                        Error::Incomplete { job: job.to_string(), step, missing, waited_ms }
                    } else {
                        Error::CommitTimeout { job: job.to_string(), step, waited_ms }
                    });
                }
                let mut pause = wait_poll.min(cfg.deadline - waited);
                if let Some(at) = next_list {
                    pause = pause.min(at.saturating_duration_since(Instant::now()));
                }
                match &watch {
                    Some(w) => {
                        w.wait_for(layout::MANIFEST_NAME, pause);
                    }
                    None => {
                        std::thread::sleep(pause);
                        wait_poll = (wait_poll * 3 / 2).min(MAX_UNWATCHED_POLL).min(max_poll);
                    }
                }
                continue;
            }
        };
        let learned = SystemTime::now();
        let written = match by {
            By::This(at) => Some(at),
            By::Same | By::Other => None,
        };
        let Some(own) = own else { return Ok((Committed { manifest, learned, written }, by)) };
        if written.is_none()
            && let Some(dir) = store.local_file(&store.path(&layout::step_dir(job, step)))
        {
            // The committer fsyncs the directory after its link; a waiter woken by the link could
            // report the save durable before that fsync. Its own fsync closes the window.
            durable::sync_dir(&dir)?;
        }
        return match manifest.shard(own.rank) {
            Some(e) if e.object == own.object => Ok((Committed { manifest, learned, written }, by)),
            committed => Err(Error::Superseded {
                job: job.to_string(),
                step,
                rank: own.rank,
                ours: own.object.clone(),
                committed: committed.map(|e| e.object.clone()),
            }),
        };
    }
}

/// One look at `step`: its MANIFEST when it is committed; else every rank's newest valid shard
/// not already in `known` (this rank's own write is), and, when every rank has one, the commit.
fn look_and_commit(
    store: &Store,
    rt: &Handle,
    target: StepTarget<'_>,
    known: &mut BTreeMap<u32, ShardEntry>,
    metadata: &BTreeMap<String, String>,
) -> Result<Look> {
    let StepTarget { job, step, world_size } = target;
    let listed = catalog::list_step(store, rt, job, step)?;
    if listed.as_ref().is_some_and(|s| s.state == catalog::StepState::Committed) {
        return Ok(Look::Committed(catalog::read_manifest(store, rt, job, step)?, By::Other));
    }
    // Every rank still missing, with its shard objects newest first: a rank's newest valid write
    // counts (an older one is what an attempt that died left).
    let present: Vec<(u32, Vec<String>)> = listed
        .map(|s| {
            let mut by_rank: BTreeMap<u32, Vec<String>> = BTreeMap::new();
            for l in s.shards.iter().filter(|l| l.rank < world_size && !known.contains_key(&l.rank)) {
                by_rank.entry(l.rank).or_default().insert(0, l.object.clone());
            }
            by_rank.into_iter().collect()
        })
        .unwrap_or_default();
    let checked =
        catalog::parallel_map(&present, 16, |(rank, objects)| newest_valid_shard(store, rt, target, *rank, objects));
    for entry in checked.into_iter().flatten() {
        known.insert(entry.rank, entry);
    }
    if known.len() < world_size as usize {
        return Ok(Look::Missing((0..world_size).filter(|r| !known.contains_key(r)).collect()));
    }
    let manifest = Manifest::new(job, step, world_size, known.values().cloned().collect(), metadata.clone())?;
    match write_manifest(store, rt, &manifest) {
        Ok(Written::Created) => {
            tracing::info!(job, step, world_size, "step committed");
            Ok(Look::Committed(manifest, By::This(SystemTime::now())))
        }
        // Another rank took the same shards at the same time, and its write landed first.
        Ok(Written::Identical) => Ok(Look::Committed(manifest, By::Same)),
        // Another rank finished at the same time and committed first.
        Err(e) if e.kind() == crate::ErrorKind::Conflict => {
            Ok(Look::Committed(catalog::read_manifest(store, rt, job, step)?, By::Other))
        }
        Err(e) => Err(e),
    }
}

/// The entry of the first of `objects` (one rank's shards, newest first) whose header validates
/// with the step's world size.
fn newest_valid_shard(
    store: &Store,
    rt: &Handle,
    target: StepTarget<'_>,
    rank: u32,
    objects: &[String],
) -> Option<ShardEntry> {
    let StepTarget { job, step, world_size } = target;
    let mut last = None;
    for object in objects {
        match restore::read_header(store, rt, ShardRef { job, step, object, expected: None }) {
            Ok(h) if h.index.world_size == world_size => {
                return Some(ShardEntry {
                    rank,
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
}
