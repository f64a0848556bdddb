//! [`Engine`]: the engine's one entry point, tying a store, an I/O runtime and the configuration
//! together.
//!
//! Every method blocks the calling thread: call them from plain threads (the trainer, the CLI) or
//! from `tokio::task::spawn_blocking` (the agent). CPU work runs on bounded pools of named threads;
//! store I/O runs on the engine's own small tokio runtime, so callers need no runtime of their own.

use std::collections::BTreeMap;
use std::sync::Arc;

use object_store::ObjectStoreExt;
use tokio::runtime::{Handle, Runtime};

use crate::catalog::{self, Depth, StepInfo, VerifyReport};
use crate::commit::{self, CommitConfig, CommitRole, Committed};
use crate::error::{Error, Result};
use crate::manifest::{Manifest, Resize, ShardEntry};
use crate::persist::{self, PersistConfig, ShardId, ShardInfo, Snapshot};
use crate::restore::{self, Pieces, ReadConfig, ShardHeader, ShardRef};
use crate::retention::{self, GcReport, RetentionPolicy};
use crate::store::{Store, StoreOptions};

/// Everything the engine can be tuned with.
#[derive(Debug, Clone, Default)]
pub struct EngineConfig {
    /// How stores are opened.
    pub store: StoreOptions,
    /// How shards are written.
    pub persist: PersistConfig,
    /// How shards are read.
    pub read: ReadConfig,
    /// How long a commit may take, and how often the fallback committer looks.
    pub commit: CommitConfig,
    /// Threads of the I/O runtime (0 = 2).
    pub io_threads: usize,
}

#[derive(Debug, Clone)]
enum Rt {
    Owned(Arc<Runtime>),
    Shared(Handle),
}

/// A store plus the machinery to write, commit, list, verify, restore and clean checkpoints on it.
/// What one rank restores from a committed step: the shard the MANIFEST names for it and the
/// shard's validated header ([`Engine::restore_plan`]).
#[derive(Debug, Clone)]
pub struct RestorePlan {
    /// The job.
    pub job: String,
    /// The committed step.
    pub step: u64,
    /// The MANIFEST's entry of the shard to read (`entry.rank` is the rank that saved it).
    pub entry: ShardEntry,
    /// The shard's trailer and index: its tensor table and metadata.
    pub header: ShardHeader,
}

#[derive(Debug, Clone)]
pub struct Engine {
    store: Store,
    rt: Rt,
    cfg: Arc<EngineConfig>,
}

impl Engine {
    /// Opens the store at `url` with its own I/O runtime.
    pub fn open(url: &str, cfg: EngineConfig) -> Result<Engine> {
        let store = Store::open(url, &cfg.store)?;
        Engine::new(store, cfg)
    }

    /// An engine over an already opened store, with its own I/O runtime.
    pub fn new(store: Store, cfg: EngineConfig) -> Result<Engine> {
        cfg.persist.validate()?;
        let threads = if cfg.io_threads == 0 { 2 } else { cfg.io_threads };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("ckpt-io")
            .enable_all()
            .build()
            .map_err(|e| Error::Cancelled { reason: format!("cannot start the I/O runtime: {e}") })?;
        Ok(Engine { store, rt: Rt::Owned(Arc::new(rt)), cfg: Arc::new(cfg) })
    }

    /// An engine that runs its store I/O on an existing runtime (the agent's). Its blocking
    /// methods must still be called off that runtime's worker threads.
    pub fn with_handle(store: Store, cfg: EngineConfig, handle: Handle) -> Result<Engine> {
        cfg.persist.validate()?;
        Ok(Engine { store, rt: Rt::Shared(handle), cfg: Arc::new(cfg) })
    }

    fn rt(&self) -> Handle {
        match &self.rt {
            Rt::Owned(r) => r.handle().clone(),
            Rt::Shared(h) => h.clone(),
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Writes one rank's shard of `step`. The step stays invisible until it is committed.
    pub fn write_shard(&self, job: &str, step: u64, rank: u32, world_size: u32, snap: &Snapshot) -> Result<ShardInfo> {
        persist::write_shard(&self.store, &self.rt(), &self.cfg.persist, ShardId { job, step, rank, world_size }, snap)
    }

    /// Writes the MANIFEST for shards the caller already knows, without reading them. Exactly one
    /// of several racing committers succeeds; the others get [`Error::Conflict`]. A committer that
    /// learned the entries from someone else (the isolator, from votes) uses
    /// [`Engine::commit_verified`] instead, which reads every shard first as the commit rule asks.
    pub fn commit(
        &self,
        job: &str,
        step: u64,
        world_size: u32,
        shards: Vec<ShardEntry>,
        metadata: BTreeMap<String, String>,
    ) -> Result<Manifest> {
        let m = Manifest::new(job, step, world_size, shards, metadata)?;
        commit::write_manifest(&self.store, &self.rt(), &m)?;
        Ok(m)
    }

    /// Commits `step` with the MANIFEST entries others reported (the isolator's global commit from
    /// the ranks' votes), after reading every shard's header from storage: each must exist, be
    /// written for `world_size`, and have exactly the entry's size, index checksum and region
    /// length. A shard that is missing fails with [`Error::NotFound`], one that differs with
    /// [`Error::Corrupt`]; then nothing is written. Exactly one of several racing committers
    /// succeeds; the others get [`Error::Conflict`].
    pub fn commit_verified(
        &self,
        job: &str,
        step: u64,
        world_size: u32,
        shards: Vec<ShardEntry>,
        metadata: BTreeMap<String, String>,
    ) -> Result<Manifest> {
        let m = Manifest::new(job, step, world_size, shards, metadata)?;
        commit::commit_verified(&self.store, &self.rt(), &m)?;
        Ok(m)
    }

    /// Checks one rank's shard entry of an uncommitted (or committed) `step` against the shard on
    /// storage, without a MANIFEST: the shard exists, was written for `world_size`, and has
    /// exactly the entry's size, index checksum and region length. Missing: [`Error::NotFound`];
    /// different: [`Error::Corrupt`] naming the field.
    pub fn verify_shard_entry(&self, job: &str, step: u64, world_size: u32, entry: &ShardEntry) -> Result<()> {
        commit::verify_entry(&self.store, &self.rt(), job, step, world_size, entry)
    }

    /// Waits until every rank's shard of `step` is present and valid, then commits it (a committer
    /// that wrote no shard itself). A step someone else committed is an [`Error::Conflict`]. After
    /// the configured deadline it fails with [`Error::Incomplete`] and the previous step stays
    /// latest.
    pub fn commit_when_complete(
        &self,
        job: &str,
        step: u64,
        world_size: u32,
        metadata: BTreeMap<String, String>,
    ) -> Result<Manifest> {
        self.commit_when_complete_or_abort(job, step, world_size, metadata, &|| None)
    }

    /// [`commit_when_complete`](Engine::commit_when_complete), asking `abort` whenever a look
    /// finds shards missing: `Some(reason)` ends the wait with [`Error::Aborted`] and commits
    /// nothing.
    pub fn commit_when_complete_or_abort(
        &self,
        job: &str,
        step: u64,
        world_size: u32,
        metadata: BTreeMap<String, String>,
        abort: &dyn Fn() -> Option<String>,
    ) -> Result<Manifest> {
        let target = commit::StepTarget { job, step, world_size };
        let who = commit::Waiter { own: None, role: CommitRole::Fallback };
        let (c, by) = commit::commit_or_wait(&self.store, &self.rt(), &self.cfg.commit, target, who, metadata, abort)?;
        match by {
            commit::By::This(_) | commit::By::Same => Ok(c.manifest),
            commit::By::Other => Err(Error::Conflict { job: job.to_string(), step }),
        }
    }

    /// The commit of a step through storage, for the rank whose shard `own` is (see
    /// [`CommitRole`]): with [`CommitRole::IfLast`] or [`CommitRole::Fallback`] it commits the
    /// step when its look after its write finds every rank's shard, then waits for the MANIFEST,
    /// woken by its creation on a `file://` store. The save counts only when the MANIFEST names
    /// `own`: a step committed with another write of this rank fails with
    /// [`Error::Superseded`]. `abort` is asked between looks (`Some(reason)`: [`Error::Aborted`]);
    /// after the commit deadline a waiter fails with [`Error::CommitTimeout`], the fallback
    /// committer with [`Error::Incomplete`].
    pub fn commit_or_wait(
        &self,
        job: &str,
        step: u64,
        world_size: u32,
        own: &ShardEntry,
        role: CommitRole,
        abort: &dyn Fn() -> Option<String>,
    ) -> Result<Committed> {
        let target = commit::StepTarget { job, step, world_size };
        let who = commit::Waiter { own: Some(own), role };
        commit::commit_or_wait(&self.store, &self.rt(), &self.cfg.commit, target, who, BTreeMap::new(), abort)
            .map(|(c, _)| c)
    }

    /// Writes this rank's shard and, on rank 0, commits the step once every shard is present.
    /// Returns the manifest on rank 0 and `None` elsewhere.
    pub fn save(
        &self,
        job: &str,
        step: u64,
        rank: u32,
        world_size: u32,
        snap: &Snapshot,
        metadata: BTreeMap<String, String>,
    ) -> Result<(ShardInfo, Option<Manifest>)> {
        let info = self.write_shard(job, step, rank, world_size, snap)?;
        if rank != 0 {
            return Ok((info, None));
        }
        let m = self.commit_when_complete(job, step, world_size, metadata)?;
        Ok((info, Some(m)))
    }

    /// Every step of `job`, oldest first, committed or not.
    pub fn steps(&self, job: &str) -> Result<Vec<StepInfo>> {
        catalog::list_steps(&self.store, &self.rt(), job)
    }

    /// The MANIFEST of a committed step.
    pub fn manifest(&self, job: &str, step: u64) -> Result<Manifest> {
        catalog::read_manifest(&self.store, &self.rt(), job, step)
    }

    /// The newest committed step whose MANIFEST and shard headers validate (sizes, trailers, index
    /// checksums), falling back past damaged steps. `None` when the job has no sound checkpoint.
    pub fn latest(&self, job: &str) -> Result<Option<Manifest>> {
        catalog::newest_valid(&self.store, &self.rt(), &self.cfg.read, job, Depth::Structure)
    }

    /// Like [`Engine::latest`] but reads and checks every chunk of every shard.
    pub fn latest_valid(&self, job: &str) -> Result<Option<Manifest>> {
        catalog::newest_valid(&self.store, &self.rt(), &self.cfg.read, job, Depth::Full)
    }

    /// Verifies every byte of a committed step, reporting every problem found.
    pub fn verify(&self, job: &str, step: u64) -> Result<VerifyReport> {
        catalog::verify_step(&self.store, &self.rt(), &self.cfg.read, job, step)
    }

    /// The shard header that rank `rank` of a `world_size`-rank job restores from committed `step`,
    /// with the saved rank whose shard it is: `rank` when the step was saved at this world size,
    /// else as `resize` maps it (see [`Manifest::restore_rank`]). One MANIFEST read.
    pub fn restore_header(
        &self,
        job: &str,
        step: u64,
        rank: u32,
        world_size: u32,
        resize: Resize,
    ) -> Result<(u32, ShardHeader)> {
        let plan = self.restore_plan(job, step, rank, world_size, resize)?;
        Ok((plan.entry.rank, plan.header))
    }

    /// What rank `rank` of a `world_size`-rank job restores from committed `step`: the MANIFEST's
    /// entry of the shard (this rank's, or the replica's `resize` names) and its validated header.
    /// [`Engine::restore_pieces`] then reads its data. One MANIFEST read.
    pub fn restore_plan(
        &self,
        job: &str,
        step: u64,
        rank: u32,
        world_size: u32,
        resize: Resize,
    ) -> Result<RestorePlan> {
        let m = self.manifest(job, step)?;
        let source = m.restore_rank(rank, world_size, resize)?;
        let entry = m.shard(source).cloned().ok_or_else(|| Error::NotFound {
            what: format!("rank {source} in step {step} of job `{job}` (world size {})", m.world_size),
        })?;
        let header = restore::read_header(&self.store, &self.rt(), ShardRef::committed(job, step, &entry))?;
        Ok(RestorePlan { job: job.to_string(), step, entry, header })
    }

    /// Reads the data of `plan`'s shard into `pieces` (caller memory, each piece at a byte offset
    /// of the shard's region): only the chunks the pieces overlap are read, each verified whole,
    /// straight into the destination (`pread` on `file://`, ranged GETs on object stores). When
    /// this fails the pieces hold unspecified bytes. The plan's header is not read again.
    pub fn restore_pieces(&self, plan: &RestorePlan, pieces: Pieces<'_>) -> Result<()> {
        let r = ShardRef::committed(&plan.job, plan.step, &plan.entry);
        restore::read_committed_region(&self.store, &self.rt(), &self.cfg.read, r, &plan.header, pieces)
    }

    /// Reads a shard's validated trailer and index (its tensor table and metadata) without its
    /// data.
    pub fn shard_header(&self, job: &str, step: u64, rank: u32) -> Result<ShardHeader> {
        let m = self.manifest(job, step)?;
        let entry = m.shard(rank).ok_or_else(|| Error::NotFound {
            what: format!("rank {rank} in step {step} of job `{job}` (world size {})", m.world_size),
        })?;
        restore::read_header(&self.store, &self.rt(), ShardRef::committed(job, step, entry))
    }

    /// Restores rank `rank` of committed step `step` into `dst`, which must be exactly the shard's
    /// region length (see [`Engine::shard_header`]). Every chunk is verified.
    pub fn restore_into(&self, job: &str, step: u64, rank: u32, dst: &mut [u8]) -> Result<ShardHeader> {
        let m = self.manifest(job, step)?;
        let entry = m.shard(rank).ok_or_else(|| Error::NotFound {
            what: format!("rank {rank} in step {step} of job `{job}` (world size {})", m.world_size),
        })?;
        let r = ShardRef::committed(job, step, entry);
        restore::read_shard(&self.store, &self.rt(), &self.cfg.read, r, Some(Pieces::whole(dst)))
    }

    /// Streams rank `rank` of committed step `step` chunk by chunk: every chunk is verified, then
    /// `sink` gets its offset in the region and its raw bytes, in region order. Memory stays
    /// bounded by one chunk whatever the region's length, so this is the way to read a region
    /// that may not fit in memory (`ckptctl export`). The first error, the engine's or the
    /// sink's, ends the read.
    pub fn restore_stream<E: From<Error>>(
        &self,
        job: &str,
        step: u64,
        rank: u32,
        sink: &mut restore::ChunkSink<'_, E>,
    ) -> std::result::Result<ShardHeader, E> {
        let m = self.manifest(job, step)?;
        let entry = m.shard(rank).ok_or_else(|| Error::NotFound {
            what: format!("rank {rank} in step {step} of job `{job}` (world size {})", m.world_size),
        })?;
        restore::stream_shard(&self.store, &self.rt(), &self.cfg.read, ShardRef::committed(job, step, entry), sink)
    }

    /// Restores rank `rank` of a committed step into a new buffer.
    pub fn restore(&self, job: &str, step: u64, rank: u32) -> Result<(ShardHeader, Vec<u8>)> {
        let header = self.shard_header(job, step, rank)?;
        let mut buf = vec![0u8; header.index.table.total_len() as usize];
        let header = self.restore_into(job, step, rank, &mut buf)?;
        Ok((header, buf))
    }

    /// Deletes every shard of the steps newer than the newest commit that are not committed: what
    /// writers that died mid-save left. The storage-coordinated committer (rank 0) calls it when
    /// it starts, before it commits anything: otherwise, when the job saves the same step number
    /// again, it could commit that step with a dead attempt's shard of another rank next to the
    /// fresh ones. Only the committer may call it, so that no shard disappears under a commit; a
    /// fresh shard another rank wrote before the committer started is deleted too, and that step
    /// then does not commit (the next one does). Returns the steps cleaned.
    pub fn discard_stale_shards(&self, job: &str) -> Result<Vec<u64>> {
        let steps = self.steps(job)?;
        let newest_commit = steps.iter().rev().find(|s| s.state == catalog::StepState::Committed).map(|s| s.step);
        let stale: Vec<(u64, Vec<String>)> = steps
            .iter()
            .filter(|s| s.state == catalog::StepState::Uncommitted && newest_commit.is_none_or(|n| s.step > n))
            .filter(|s| !s.shards.is_empty())
            .map(|s| (s.step, s.shards.iter().map(|l| l.object.clone()).collect()))
            .collect();
        let os = self.store.object_store().clone();
        for (step, objects) in &stale {
            for object in objects {
                let path = self.store.path(&crate::store::layout::object_path(job, *step, object));
                match self.rt().block_on(os.delete(&path)) {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(Error::store("delete", &path, e)),
                }
            }
            tracing::info!(job, step = *step, "removed the shards dead writers left of an uncommitted step");
        }
        Ok(stale.into_iter().map(|(step, _)| step).collect())
    }

    /// Applies retention to `job`.
    pub fn gc(&self, job: &str, policy: &RetentionPolicy) -> Result<GcReport> {
        retention::gc(&self.store, &self.rt(), &self.cfg.read, job, policy)
    }
}
