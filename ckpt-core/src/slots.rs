//! The life of an arena slot, written once for every holder of an arena: the trainer library in
//! embedded mode, and the sidecar agent for the trainers it serves.
//!
//! [`Arena`] is the mechanism: slot records in shared memory, compare-and-swap transitions,
//! checksummed descriptors. This module is the policy on top of it, each step in one place:
//!
//! - where a rank's arena lives and how big it is ([`ArenaSpec`]): the file name is a contract
//!   between the trainer and the agent, and the slot size carries headroom so that a state that
//!   grows a little does not recreate the arena at every save;
//! - taking a slot for a snapshot or a restore ([`take_slot`]): a free slot, else the memory tier,
//!   which the new snapshot is about to replace anyway;
//! - persisting a sealed slot ([`persist`]): write the shard, commit under a [`CommitPolicy`]
//!   (through storage, or by a vote to the isolator), wait for the MANIFEST (cancellable), apply
//!   retention, keep the slot as the memory tier;
//! - staging a committed step from storage into a slot ([`stage`]);
//! - finding the memory tier ([`find_durable`]) and holding a slot while it is read
//!   ([`ReadHold`]).
//!
//! ```text
//!  take_slot ─► writing ─seal─► sealed ─► persisting ─persist()─► durable ─► (freed by a newer one)
//!                  ▲                                                  │ ▲
//!                  └──────────── stage() (restore from storage) ──────┘ └─ ReadHold: reading
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use crate::arena::{self, Arena, ArenaConfig, ArenaLock, SlotContent, SlotState};
use crate::commit::CommitRole;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::persist::{ShardInfo, Snapshot};
use crate::restore::ShardHeader;
use crate::retention::RetentionPolicy;
use crate::tensor::TensorTable;

/// Where a rank's arena lives and how many slots it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArenaSpec {
    /// The memory-backed directory.
    pub dir: PathBuf,
    /// The file name ([`arena::file_name`]).
    pub name: String,
    /// Slots per arena.
    pub slots: u32,
}

impl ArenaSpec {
    /// The arena of `rank` of `job` in `dir`.
    pub fn for_rank(dir: impl Into<PathBuf>, job: &str, rank: u32, slots: u32) -> ArenaSpec {
        ArenaSpec { dir: dir.into(), name: arena::file_name(job, rank), slots }
    }

    /// The arena file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    /// An arena whose slots hold at least `slot_size` bytes: `current` when it has the configured
    /// slot count and is big enough, else a new file that replaces it (a mapped old file stays
    /// valid for whoever still maps it). The caller must not hand out slots of the old arena
    /// afterwards. `lock` is the caller's ownership of the file at the path ([`ArenaSpec::claim`]);
    /// without one, it is taken here (see [`Arena::create`]) and kept in `lock`. Fails with
    /// [`Error::ArenaFull`] when the directory has no room, and with [`Error::ArenaHeld`] when a
    /// live process owns the arena.
    pub fn ensure(
        &self,
        current: Option<&Arc<Arena>>,
        slot_size: u64,
        lock: &mut Option<ArenaLock>,
    ) -> Result<Arc<Arena>> {
        if let Some(a) = current
            && a.slot_size() >= slot_size
            && a.slot_count() == self.slots
            && lock.as_ref().is_some_and(|l| l.holds(a))
        {
            return Ok(a.clone());
        }
        let cfg = ArenaConfig { dir: self.dir.clone(), name: self.name.clone(), slots: self.slots, slot_size };
        let created = Arc::new(Arena::create(&cfg, lock)?);
        tracing::info!(path = %created.path().display(), slot_size = created.slot_size(), slots = created.slot_count(), "arena ready");
        Ok(created)
    }

    /// Becomes the owner of the arena file a predecessor left (a restarted trainer or agent on
    /// the same pod). `Ok(None)`: there is no file. Fails with [`Error::ArenaHeld`], naming the
    /// holder, while a live process owns it. The arena is returned as found, `None` when the file
    /// is not a usable arena ([`ArenaSpec::ensure`] replaces it): the caller recovers what the
    /// previous owner left, as its role requires ([`Arena::recover`] for a trainer).
    pub fn claim(&self) -> Result<Option<(ArenaLock, Option<Arc<Arena>>)>> {
        let path = self.path();
        let Some(lock) = ArenaLock::acquire(&path)? else { return Ok(None) };
        let arena = match Arena::open(&path) {
            Ok(a) if lock.holds(&a) => Some(Arc::new(a)),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unusable arena file");
                None
            }
        };
        Ok(Some((lock, arena)))
    }
}

/// Removes the temporary shard files (`rank-<r>.<tag>.ckpt.tmp-<pid>-…`) that writers of `rank`
/// killed mid-write left in the job's step directories of a `file://` store, committed or not,
/// and the temporary MANIFEST files (`MANIFEST.tmp-…`) in committed steps. Call it as the owner of
/// the rank's arena ([`ArenaSpec::claim`]): no other live process writes the rank's shards then,
/// so every such file is debris. Any rank may commit, so a MANIFEST temporary cannot be told from
/// a live committer's in a step that is not committed yet: those stay until the step commits or
/// retention removes it; in a committed step every one is debris (a committer still about to link
/// it finds its temporary gone and the step committed). Object stores need nothing: an unfinished
/// upload is invisible, and retention aborts it. Returns how many files were removed.
pub fn remove_stale_temporaries(engine: &Engine, job: &str, rank: u32) -> usize {
    let store = engine.store();
    let Some(root) = store.local_file(&store.path(&crate::store::layout::job_dir(job))) else { return 0 };
    // `rank-<r>.` (the dot keeps rank 1 off rank 10's files), then a tag or format 1's `ckpt`.
    let prefix = format!("rank-{rank}.");
    let manifest = format!("{}{}", crate::store::layout::MANIFEST_NAME, crate::store::layout::TMP_MARKER);
    let Ok(steps) = std::fs::read_dir(&root) else { return 0 };
    let mut removed = 0;
    for step_dir in steps.flatten() {
        let Ok(files) = std::fs::read_dir(step_dir.path()) else { continue };
        let committed = step_dir.path().join(crate::store::layout::MANIFEST_NAME).exists();
        for f in files.flatten() {
            let tmp = crate::store::layout::TMP_MARKER;
            let ours = |n: &str| (n.starts_with(&prefix) && n.contains(tmp)) || (committed && n.starts_with(&manifest));
            if f.file_name().to_str().is_some_and(ours) && std::fs::remove_file(f.path()).is_ok() {
                removed += 1;
            }
        }
    }
    if removed > 0 {
        tracing::info!(job, rank, removed, "removed temporary shard files that killed writers left");
    }
    removed
}

/// Bytes per slot to create for a snapshot of `table` with `metadata_len` bytes of metadata: what
/// it needs plus 1/16 and 1 MiB of headroom, so that a state that grows a little (an optimizer's
/// lazily created buffers, a new metadata key) does not recreate the arena at every save.
pub fn slot_size_with_headroom(table: &TensorTable, metadata_len: usize) -> u64 {
    slot_size_for_state(arena::slot_size_for(table, metadata_len))
}

/// Bytes per slot to create, before the state is known, for a state of about `state_bytes`
/// (a size hint): the bytes plus the same headroom as [`slot_size_with_headroom`], which also
/// covers the tensor table and the alignment between tensors of any ordinary state.
pub fn slot_size_for_state(state_bytes: u64) -> u64 {
    state_bytes.saturating_add(state_bytes / 16).saturating_add(1 << 20)
}

/// Takes a slot to write: a free one, else the memory tier (the newest durable slot), which the
/// snapshot or restore about to be written replaces anyway. `None` when every slot is being
/// written, persisted or read.
pub fn take_slot(arena: &Arena) -> Option<u32> {
    if let Some(slot) = arena.acquire() {
        return Some(slot);
    }
    let tier = arena.newest_durable()?;
    arena.transition(tier, SlotState::Durable, SlotState::Writing).then_some(tier)
}

/// The durable slot holding `step`, if the arena has one.
pub fn find_durable(arena: &Arena, step: u64) -> Option<u32> {
    (0..arena.slot_count())
        .filter(|&s| arena.state(s) == Some(SlotState::Durable))
        .find(|&s| arena.content(s).is_ok_and(|c| c.step == step))
}

/// The step of the memory tier (the newest durable slot), if any.
pub fn memory_tier_step(arena: &Arena) -> Option<u64> {
    arena.newest_durable().and_then(|s| arena.content(s).ok()).map(|c| c.step)
}

/// Whether a memory tier holding `tier_step` may answer a load of the newest step: not when
/// storage holds a newer committed step (another rank's commit while this process was down, or a
/// commit that landed after its slot could be made durable). One listing of the store; when it
/// fails, the memory tier is trusted.
pub fn memory_tier_serves(engine: &Engine, job: &str, tier_step: u64) -> bool {
    match engine.steps(job) {
        Ok(steps) => !steps.iter().any(|s| s.state == crate::catalog::StepState::Committed && s.step > tier_step),
        Err(e) => {
            tracing::warn!(job, error = %e, "cannot list committed steps; trusting the memory tier");
            true
        }
    }
}

/// Who restores: rank `rank` of a job of `world_size` ranks, with the job's resize policy.
#[derive(Debug, Clone, Copy)]
pub struct Restorer {
    /// The rank.
    pub rank: u32,
    /// The job's world size now.
    pub world_size: u32,
    /// What the rank loads from a step saved at another world size.
    pub resize: crate::Resize,
}

/// Whether a memory tier holding `tier_step` holds what `who` restores from that step: the rank's
/// own shard, so not when the step was saved at another world size and the resize refuses it or
/// maps the rank to another saved rank (after a resize the arena of rank r may hold another
/// pipeline stage's state). One MANIFEST read; when it fails (the store is away, or retention
/// removed the step), the memory tier is trusted, as [`memory_tier_serves`] trusts it when storage
/// cannot be listed: its slots hold only committed steps.
pub fn memory_tier_holds(engine: &Engine, job: &str, tier_step: u64, who: Restorer) -> bool {
    match engine.manifest(job, tier_step) {
        Ok(m) => m.restore_rank(who.rank, who.world_size, who.resize).is_ok_and(|src| src == who.rank),
        Err(e) => {
            tracing::warn!(job, step = tier_step, error = %e, "cannot read the MANIFEST; trusting the memory tier");
            true
        }
    }
}

/// A durable slot held in the `reading` state, so that no save or restore reuses it while its
/// bytes are copied out. Dropping it makes the slot durable again.
#[derive(Debug)]
pub struct ReadHold {
    arena: Arc<Arena>,
    slot: u32,
    content: SlotContent,
}

impl ReadHold {
    /// Holds durable `slot`, reads its descriptor and verifies its region against the checksum
    /// recorded at seal time. `Ok(None)`: the slot is not durable (any more). A descriptor or
    /// region that does not verify frees the slot (its bytes are not a checkpoint any more) and
    /// fails with [`Error::Corrupt`]: callers restore from storage instead.
    pub fn new(arena: &Arc<Arena>, slot: u32) -> Result<Option<ReadHold>> {
        if !arena.transition(slot, SlotState::Durable, SlotState::Reading) {
            return Ok(None);
        }
        match arena.content(slot).and_then(|content| arena.verify_region(slot).map(|()| content)) {
            Ok(content) => Ok(Some(ReadHold { arena: arena.clone(), slot, content })),
            Err(e) => {
                tracing::warn!(path = %arena.path().display(), slot, error = %e, "memory-tier slot fails verification; dropping it");
                arena.release(slot);
                Err(e)
            }
        }
    }

    /// Holds the durable slot that holds `step`, if any (see [`ReadHold::new`]).
    pub fn of_step(arena: &Arc<Arena>, step: u64) -> Result<Option<ReadHold>> {
        let Some(slot) = find_durable(arena, step) else { return Ok(None) };
        Ok(ReadHold::new(arena, slot)?.filter(|h| h.content.step == step))
    }

    /// What the slot holds.
    pub fn content(&self) -> &SlotContent {
        &self.content
    }

    /// Address of the slot's first byte (the region starts there).
    pub fn addr(&self) -> u64 {
        self.arena.slot_addr(self.slot)
    }
}

impl Drop for ReadHold {
    fn drop(&mut self) {
        self.arena.transition(self.slot, SlotState::Reading, SlotState::Durable);
    }
}

/// A restore that may have passed over damaged steps to reach a sound one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback<T> {
    /// What the restore of the sound step returned.
    pub value: T,
    /// The step restored.
    pub step: u64,
    /// Newer committed steps that were passed over, each with why.
    pub skipped: Vec<(u64, String)>,
}

/// Whether a restore failed because the step's stored data is damaged (a checksum, a missing or
/// unreadable shard, a format this build does not read), so that an older step may still serve.
pub fn is_damage(kind: crate::ErrorKind) -> bool {
    matches!(kind, crate::ErrorKind::Corrupt | crate::ErrorKind::NotFound | crate::ErrorKind::Unsupported)
}

/// Restores `step`, or with `None` the newest committed step whose data is sound: `attempt` runs
/// on the newest committed step, then on older ones while it fails with damage (`damaged` tells
/// which failures are; see [`is_damage`]), so that a corrupt newest step never blocks a restore.
/// Each step passed over is logged with why and returned. With `strict`, damage is an error
/// instead; when no committed step is sound, the newest step's own error is returned. `Ok(None)`:
/// the job has no committed step.
///
/// Each rank decides for its own shard: ranks of a multi-rank job that load `None` agree as long
/// as a damaged step is damaged for all of them, or when they load the step the isolator names.
pub fn newest_sound<T, E: From<Error> + std::fmt::Display>(
    engine: &Engine,
    job: &str,
    step: Option<u64>,
    strict: bool,
    damaged: impl Fn(&E) -> bool,
    mut attempt: impl FnMut(u64) -> std::result::Result<T, E>,
) -> std::result::Result<Option<Fallback<T>>, E> {
    if let Some(step) = step {
        return attempt(step).map(|value| Some(Fallback { value, step, skipped: Vec::new() }));
    }
    let committed: Vec<u64> = engine
        .steps(job)?
        .iter()
        .rev()
        .filter(|s| s.state == crate::catalog::StepState::Committed)
        .map(|s| s.step)
        .collect();
    let mut skipped = Vec::new();
    let mut newest_error = None;
    for step in committed {
        match attempt(step) {
            Ok(value) => return Ok(Some(Fallback { value, step, skipped })),
            Err(e) if !strict && damaged(&e) => {
                tracing::warn!(job, step, error = %e, "committed step is damaged; restoring an older one");
                skipped.push((step, e.to_string()));
                newest_error.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    newest_error.map_or(Ok(None), Err)
}

/// A slot's region as `Bytes` for the persist pipeline, without a copy.
struct SlotRegion {
    arena: Arc<Arena>,
    slot: u32,
    len: usize,
}

impl AsRef<[u8]> for SlotRegion {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `persist` holds the slot in the persisting state while any `Bytes` of this
        // region lives: nobody writes a slot in that state (writers hold slots they took in the
        // writing state), and the slot leaves it only after the snapshot, and so every `Bytes`
        // of it, has been dropped.
        unsafe { &self.arena.slot_bytes(self.slot)[..self.len] }
    }
}

/// Whose snapshot a slot holds, and what to do once it is committed.
#[derive(Debug, Clone, Copy)]
pub struct SlotOwner<'a> {
    /// The job.
    pub job: &'a str,
    /// The rank.
    pub rank: u32,
    /// The job's world size.
    pub world_size: u32,
    /// Committed steps to keep on the store, applied by rank 0 after each commit (0 keeps all).
    pub keep: usize,
}

/// How a step becomes committed once this rank's shard is durable.
pub enum CommitPolicy<'a, E> {
    /// Storage-coordinated: the rank whose look after its write finds every rank's shard present
    /// and valid writes the MANIFEST (the last to finish), rank 0 keeps looking until one does,
    /// and every rank waits until it exists ([`CommitRole`](crate::commit::CommitRole)).
    Storage,
    /// Another writer (the isolator) commits: `vote` tells it this shard is durable, then the
    /// rank waits until the MANIFEST exists.
    Vote(&'a (dyn Fn(&ShardInfo) -> std::result::Result<(), E> + 'a)),
}

impl<E> std::fmt::Debug for CommitPolicy<'_, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CommitPolicy::Storage => "Storage",
            CommitPolicy::Vote(_) => "Vote",
        })
    }
}

/// What [`persist`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Persisted {
    /// The step.
    pub step: u64,
    /// Bytes written to the store (0 when the step was found committed already).
    pub bytes: u64,
    /// The step was committed before this persist started: a predecessor (an agent that died
    /// after committing, before it could mark the slot durable) finished it.
    pub already_committed: bool,
    /// When the shard and the commit happened, as this rank saw them; `None` when the step was
    /// committed already.
    pub timings: Option<CommitTimings>,
}

/// Wall-clock times of one rank's persist, for measurements (a commit's latency is the time
/// from the last rank's `shard_durable` to each rank's `committed`), never for decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitTimings {
    /// This rank's shard became durable (its write returned).
    pub shard_durable: SystemTime,
    /// This rank learned that the step is committed (it wrote the MANIFEST, or saw it).
    pub committed: SystemTime,
    /// This rank wrote the MANIFEST, at this time; `None` when another writer did.
    pub manifest_written: Option<SystemTime>,
}

impl CommitTimings {
    /// `at` in nanoseconds since the Unix epoch, the form these times travel in (the agent's
    /// events, Python); 0 before the epoch.
    pub fn unix_ns(at: SystemTime) -> u64 {
        at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }

    /// The time `ns` nanoseconds after the Unix epoch; `None` for 0 (not known).
    pub fn from_unix_ns(ns: u64) -> Option<SystemTime> {
        (ns != 0).then(|| SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(ns))
    }
}

/// Persists the snapshot in `slot`, which the caller moved to the persisting state: writes the
/// shard, commits the step under `policy` (waiting for the MANIFEST where another writer commits;
/// `abort` is asked between looks and ends the wait with [`Error::Aborted`]), applies retention on
/// rank 0, and keeps the slot as the memory tier. On failure the slot is freed.
///
/// A step that is already committed is not written again: with `resumed` (the slot was left
/// persisting or sealed by a process that died, and may have been committed by it) it is accepted
/// as is; otherwise it is refused with [`Error::Conflict`], because committed bytes never change.
pub fn persist<E: From<Error>>(
    engine: &Engine,
    arena: &Arc<Arena>,
    slot: u32,
    owner: SlotOwner<'_>,
    policy: CommitPolicy<'_, E>,
    resumed: bool,
    abort: &dyn Fn() -> Option<String>,
) -> std::result::Result<Persisted, E> {
    let r = persist_held(engine, arena, slot, owner, policy, resumed, abort);
    if r.is_err() {
        arena.release(slot);
    }
    r
}

fn persist_held<E: From<Error>>(
    engine: &Engine,
    arena: &Arc<Arena>,
    slot: u32,
    owner: SlotOwner<'_>,
    policy: CommitPolicy<'_, E>,
    resumed: bool,
    abort: &dyn Fn() -> Option<String>,
) -> std::result::Result<Persisted, E> {
    if arena.state(slot) != Some(SlotState::Persisting) {
        return Err(Error::Cancelled { reason: format!("slot {slot} is not held for persisting") }.into());
    }
    let content = arena.content(slot)?;
    let step = content.step;
    let SlotOwner { job, rank, world_size, keep } = owner;
    match engine.manifest(job, step) {
        Ok(_) if resumed => {
            tracing::info!(job, rank, step, "step was committed before this persist; keeping it as the memory tier");
            arena.mark_durable(slot)?;
            return Ok(Persisted { step, bytes: 0, already_committed: true, timings: None });
        }
        Ok(_) => return Err(Error::Conflict { job: job.to_string(), step }.into()),
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    let len = content.table.total_len() as usize;
    let data = Bytes::from_owner(SlotRegion { arena: arena.clone(), slot, len });
    let snap = Snapshot { table: content.table, data, metadata: content.metadata };
    let info = engine.write_shard(job, step, rank, world_size, &snap);
    drop(snap);
    let info = info?;
    let shard_durable = SystemTime::now();
    let role = match policy {
        CommitPolicy::Storage if rank == 0 => CommitRole::Fallback,
        CommitPolicy::Storage => CommitRole::IfLast,
        CommitPolicy::Vote(vote) => {
            vote(&info)?;
            CommitRole::Others
        }
    };
    let committed = engine.commit_or_wait(job, step, world_size, &info.entry(), role, abort)?;
    let timings = CommitTimings { shard_durable, committed: committed.learned, manifest_written: committed.written };
    if rank == 0 && keep > 0 {
        let policy = RetentionPolicy { keep, ..Default::default() };
        if let Err(e) = engine.gc(job, &policy) {
            tracing::warn!(job, step, error = %e, "retention failed; it runs again after the next commit");
        }
    }
    arena.mark_durable(slot)?;
    Ok(Persisted { step, bytes: info.size, already_committed: false, timings: Some(timings) })
}

/// Reads committed `step` of `rank` from storage into `slot` (held in the writing state, e.g. from
/// [`take_slot`]) and keeps it as the memory tier; every chunk is verified on the way. `header` is
/// the shard's header ([`Engine::shard_header`]), which says the table the slot must fit. On
/// failure the slot is freed.
pub fn stage(
    engine: &Engine,
    arena: &Arena,
    slot: u32,
    job: &str,
    rank: u32,
    step: u64,
    header: &ShardHeader,
) -> Result<()> {
    let table = &header.index.table;
    let r = (|| {
        if arena.state(slot) != Some(SlotState::Writing) {
            return Err(Error::Cancelled { reason: format!("slot {slot} is not held for writing") });
        }
        if !arena.fits(table, header.index.metadata.len()) {
            return Err(Error::ArenaFull {
                reason: format!(
                    "step {step} needs {} per slot, the arena {} has {}",
                    arena::human_bytes(arena::slot_size_for(table, header.index.metadata.len())),
                    arena.path().display(),
                    arena::human_bytes(arena.slot_size())
                ),
            });
        }
        // SAFETY: we hold the slot in the writing state, so nobody else reads or writes it, and
        // the slice does not outlive this closure.
        let dst = unsafe { &mut arena.slot_bytes_mut(slot)[..table.total_len() as usize] };
        engine.restore_into(job, step, rank, dst)?;
        arena.seal(slot, step, table, &header.index.metadata)?;
        arena.transition(slot, SlotState::Sealed, SlotState::Persisting);
        arena.mark_durable(slot)
    })();
    if r.is_err() {
        arena.release(slot);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::engine::EngineConfig;
    use crate::tensor::TensorMeta;

    fn table() -> TensorTable {
        TensorTable::packed([TensorMeta::new("w", DType::F32, vec![256]).unwrap()], 64).unwrap()
    }

    fn fill(arena: &Arena, slot: u32, step: u64, t: &TensorTable) {
        // SAFETY: the test holds the slot in the writing state.
        let dst = unsafe { arena.slot_bytes_mut(slot) };
        dst[..t.total_len() as usize].fill(step as u8);
        arena.seal(slot, step, t, b"m").unwrap();
        assert!(arena.transition(slot, SlotState::Sealed, SlotState::Persisting));
    }

    #[test]
    fn persist_commits_keeps_the_memory_tier_and_refuses_to_rewrite_a_committed_step() {
        let store = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(&format!("file://{}", store.path().display()), EngineConfig::default()).unwrap();
        let t = table();
        let spec = ArenaSpec::for_rank(dir.path(), "j", 0, 2);
        let arena = spec.ensure(None, slot_size_with_headroom(&t, 1), &mut None).unwrap();
        let owner = SlotOwner { job: "j", rank: 0, world_size: 1, keep: 0 };
        let never = || None;

        let s = take_slot(&arena).unwrap();
        fill(&arena, s, 7, &t);
        let p = persist::<Error>(&engine, &arena, s, owner, CommitPolicy::Storage, false, &never).unwrap();
        assert_eq!((p.step, p.already_committed), (7, false));
        assert!(p.bytes > 0);
        assert!(engine.manifest("j", 7).is_ok());
        assert_eq!(memory_tier_step(&arena), Some(7));

        // The same step again: refused, the slot freed, the memory tier untouched.
        let s2 = take_slot(&arena).unwrap();
        fill(&arena, s2, 7, &t);
        let e = persist::<Error>(&engine, &arena, s2, owner, CommitPolicy::Storage, false, &never).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Conflict);
        assert_eq!(arena.state(s2), Some(SlotState::Free));
        assert_eq!(memory_tier_step(&arena), Some(7));

        // Resumed (a predecessor committed it): accepted without writing.
        let s3 = take_slot(&arena).unwrap();
        fill(&arena, s3, 7, &t);
        let p = persist::<Error>(&engine, &arena, s3, owner, CommitPolicy::Storage, true, &never).unwrap();
        assert_eq!((p.bytes, p.already_committed), (0, true));
        assert_eq!(arena.state(s3), Some(SlotState::Durable));
    }

    #[test]
    fn the_committer_discards_stale_shards_of_uncommitted_steps_only() {
        let store = tempfile::tempdir().unwrap();
        let engine = Engine::open(&format!("file://{}", store.path().display()), EngineConfig::default()).unwrap();
        let t = table();
        let snap = |v: u8| crate::Snapshot {
            table: t.clone(),
            data: bytes::Bytes::from(vec![v; t.total_len() as usize]),
            metadata: Vec::new(),
        };
        // Step 1 committed by both ranks; step 2 left half-done by a dead attempt (both shards,
        // no MANIFEST).
        for rank in 0..2 {
            engine.write_shard("j", 1, rank, 2, &snap(1)).unwrap();
        }
        engine.commit_when_complete("j", 1, 2, Default::default()).unwrap();
        for rank in 0..2 {
            engine.write_shard("j", 2, rank, 2, &snap(2)).unwrap();
        }
        assert_eq!(engine.discard_stale_shards("j").unwrap(), vec![2]);
        let steps = engine.steps("j").unwrap();
        assert_eq!(steps.len(), 1, "step 2 has no shard left: {steps:?}");
        assert_eq!(steps[0].shard_ranks, vec![0, 1], "committed shards stay");
        assert!(engine.discard_stale_shards("j").unwrap().is_empty());
        // A re-save of step 2 by rank 0 cannot be committed with rank 1's stale shard now.
        engine.write_shard("j", 2, 0, 2, &snap(3)).unwrap();
        let mut cfg = EngineConfig::default();
        cfg.commit.deadline = std::time::Duration::from_millis(50);
        let impatient = Engine::new(engine.store().clone(), cfg).unwrap();
        let e = impatient.commit_when_complete("j", 2, 2, Default::default()).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Timeout);
    }

    #[test]
    fn a_new_owner_removes_its_ranks_temporaries_and_manifest_temporaries_of_committed_steps_only() {
        let store = tempfile::tempdir().unwrap();
        let engine = Engine::open(&format!("file://{}", store.path().display()), EngineConfig::default()).unwrap();
        let (done, open) = (store.path().join("j/step-1"), store.path().join("j/step-2"));
        for (dir, names) in [
            (&done, &["MANIFEST", "MANIFEST.tmp-7-0-1", "rank-1.0123456789abcdef.ckpt.tmp-7-1-1"][..]),
            (&open, &["MANIFEST.tmp-8-0-1", "rank-10.0123456789abcdef.ckpt.tmp-8-1-1"][..]),
        ] {
            std::fs::create_dir_all(dir).unwrap();
            for n in names {
                std::fs::write(dir.join(n), b"x").unwrap();
            }
        }
        assert_eq!(remove_stale_temporaries(&engine, "j", 1), 2);
        let left = |d: &std::path::Path| {
            let mut v: Vec<String> =
                std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            v.sort();
            v
        };
        assert_eq!(left(&done), vec!["MANIFEST"]);
        // A step not committed yet: its MANIFEST temporary may be a live committer's (any rank
        // commits), and rank 10's file is not rank 1's.
        assert_eq!(left(&open), vec!["MANIFEST.tmp-8-0-1", "rank-10.0123456789abcdef.ckpt.tmp-8-1-1"]);
    }

    #[test]
    fn a_vote_that_fails_keeps_its_error_and_frees_the_slot() {
        let store = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(&format!("file://{}", store.path().display()), EngineConfig::default()).unwrap();
        let t = table();
        let arena =
            ArenaSpec::for_rank(dir.path(), "j", 1, 1).ensure(None, slot_size_with_headroom(&t, 1), &mut None).unwrap();
        let s = take_slot(&arena).unwrap();
        fill(&arena, s, 3, &t);
        #[derive(Debug, PartialEq)]
        enum VoteError {
            Down,
            Core,
        }
        impl From<Error> for VoteError {
            fn from(_: Error) -> Self {
                VoteError::Core
            }
        }
        let vote = |_: &ShardInfo| Err(VoteError::Down);
        let owner = SlotOwner { job: "j", rank: 1, world_size: 2, keep: 0 };
        let e = persist(&engine, &arena, s, owner, CommitPolicy::Vote(&vote), false, &|| None).unwrap_err();
        assert_eq!(e, VoteError::Down);
        assert_eq!(arena.state(s), Some(SlotState::Free));
    }

    #[test]
    fn an_aborted_wait_says_why() {
        let store = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(&format!("file://{}", store.path().display()), EngineConfig::default()).unwrap();
        let t = table();
        let arena =
            ArenaSpec::for_rank(dir.path(), "j", 1, 1).ensure(None, slot_size_with_headroom(&t, 1), &mut None).unwrap();
        let s = take_slot(&arena).unwrap();
        fill(&arena, s, 3, &t);
        let owner = SlotOwner { job: "j", rank: 1, world_size: 2, keep: 0 };
        let abort = || Some("the job restarted".to_string());
        let e = persist::<Error>(&engine, &arena, s, owner, CommitPolicy::Storage, false, &abort).unwrap_err();
        assert!(matches!(e, Error::Aborted { step: 3, .. }), "{e}");
        assert!(e.to_string().contains("the job restarted"));
    }

    #[test]
    fn the_committer_waiting_for_missing_shards_can_be_aborted_and_commits_nothing() {
        let store = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(&format!("file://{}", store.path().display()), EngineConfig::default()).unwrap();
        let t = table();
        let arena =
            ArenaSpec::for_rank(dir.path(), "j", 0, 1).ensure(None, slot_size_with_headroom(&t, 1), &mut None).unwrap();
        let s = take_slot(&arena).unwrap();
        fill(&arena, s, 4, &t);
        // Rank 0 of two commits through storage; rank 1's shard never comes.
        let owner = SlotOwner { job: "j", rank: 0, world_size: 2, keep: 0 };
        let abort = || Some("its trainer restores".to_string());
        let e = persist::<Error>(&engine, &arena, s, owner, CommitPolicy::Storage, false, &abort).unwrap_err();
        assert!(matches!(e, Error::Aborted { step: 4, .. }), "{e}");
        assert_eq!(engine.latest("j").unwrap(), None, "an aborted commit wrote a MANIFEST");
    }

    #[test]
    fn stage_reads_a_committed_step_and_a_read_hold_protects_it() {
        let store = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(&format!("file://{}", store.path().display()), EngineConfig::default()).unwrap();
        let t = table();
        let owner = SlotOwner { job: "j", rank: 0, world_size: 1, keep: 0 };
        let first =
            ArenaSpec::for_rank(dir.path(), "j", 0, 1).ensure(None, slot_size_with_headroom(&t, 1), &mut None).unwrap();
        let s = take_slot(&first).unwrap();
        fill(&first, s, 9, &t);
        persist::<Error>(&engine, &first, s, owner, CommitPolicy::Storage, false, &|| None).unwrap();

        // Another pod: an empty arena, staged from storage.
        let other = tempfile::tempdir().unwrap();
        let header = engine.shard_header("j", 9, 0).unwrap();
        let spec = ArenaSpec::for_rank(other.path(), "j", 0, 1);
        let mut lock = None;
        let arena = spec
            .ensure(None, slot_size_with_headroom(&header.index.table, header.index.metadata.len()), &mut lock)
            .unwrap();
        let slot = take_slot(&arena).unwrap();
        stage(&engine, &arena, slot, "j", 0, 9, &header).unwrap();
        let hold = ReadHold::of_step(&arena, 9).unwrap().unwrap();
        assert_eq!(hold.content().metadata, b"m");
        // SAFETY: the slot is held for reading; nobody writes it.
        let bytes = unsafe { &arena.slot_bytes(slot)[..t.total_len() as usize] };
        assert!(bytes.iter().all(|&b| b == 9));
        assert_eq!(take_slot(&arena), None, "a held slot is never handed out");
        drop(hold);
        assert_eq!(memory_tier_step(&arena), Some(9));
        assert_eq!(take_slot(&arena), Some(slot), "the memory tier yields to a new snapshot");
        assert!(arena.maps(&spec.path()));
        // While this owner holds the arena, another claim is refused naming it; once the lock is
        // dropped, a claim maps the same file as the previous owner left it (the slot it was
        // writing), and recovery frees that slot.
        let e = spec.claim().unwrap_err();
        assert!(matches!(e, Error::ArenaHeld { .. }), "{e}");
        assert!(e.to_string().contains(&format!("pid {}", std::process::id())), "{e}");
        drop(lock);
        let (_lock, claimed) = spec.claim().unwrap().unwrap();
        let claimed = claimed.expect("a usable arena");
        assert_eq!(claimed.state(slot), Some(SlotState::Writing));
        claimed.recover();
        assert_eq!(claimed.state(slot), Some(SlotState::Free));
    }
}
