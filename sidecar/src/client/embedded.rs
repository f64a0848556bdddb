//! Embedded mode: the training process owns its arena and persists from its own thread, through
//! the same slot lifecycle as the agent ([`ckpt_core::slots`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ckpt_core::Engine;
use ckpt_core::arena::{self, Arena, ArenaLock, SlotState};
use ckpt_core::restore::ShardHeader;
use ckpt_core::slots::{self, ArenaSpec, CommitPolicy, SlotOwner};

use super::CheckpointerConfig;
use crate::env;
use crate::error::{Error, Result};

/// Store used when neither the caller nor [`env::ENV_STORE`] names one: a directory under the
/// working directory, so a laptop or CI run needs nothing else.
pub const DEFAULT_LOCAL_STORE: &str = "ckptd-store";

/// The embedded checkpointer's engine and arena location.
#[derive(Debug)]
pub(super) struct Embedded {
    pub engine: Engine,
    pub spec: ArenaSpec,
}

impl Embedded {
    pub(super) fn open(cfg: &CheckpointerConfig) -> Result<Embedded> {
        let store = match cfg.store.clone().or_else(|| env::nonempty(env::ENV_STORE)) {
            Some(url) => url,
            None => {
                let dir = std::env::current_dir()
                    .map_err(|e| {
                        Error::unreadable("the working directory (for the default store)", Path::new("."), &e)
                    })?
                    .join(DEFAULT_LOCAL_STORE);
                format!("file://{}", dir.display())
            }
        };
        let engine = Engine::open(&store, cfg.engine.clone())?;
        let dir = cfg
            .arena_dir
            .clone()
            .or_else(|| env::nonempty(env::ENV_ARENA_DIR).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(arena::DEFAULT_ARENA_DIR));
        Ok(Embedded { engine, spec: ArenaSpec::for_rank(dir, &cfg.job, cfg.rank(), cfg.slots) })
    }

    /// Becomes the owner of the arena a predecessor of this rank left on this host, if any, and
    /// recovers what it left (see [`Arena::recover`]): the memory tier is kept, unfinished slots
    /// are freed, and the temporary shard files that killed writers of this rank left are removed.
    /// Fails with [`ckpt_core::Error::ArenaHeld`], naming the holder, while a live
    /// process owns it.
    pub(super) fn claim(&self, cfg: &CheckpointerConfig) -> Result<(Option<ArenaLock>, Option<Arc<Arena>>)> {
        let claimed = self.spec.claim()?;
        let Some((lock, arena)) = claimed else { return Ok((None, None)) };
        slots::remove_stale_temporaries(&self.engine, &cfg.job, cfg.rank());
        if let Some(a) = &arena {
            a.recover();
            tracing::info!(path = %a.path().display(), memory_tier = ?slots::memory_tier_step(a), "took over the arena a previous process left");
        }
        Ok((Some(lock), arena))
    }

    /// Persists a sealed slot and commits its step through storage (the rank that finishes last
    /// writes the MANIFEST, rank 0 stands by); returns when it happened, as this rank saw it.
    pub(super) fn persist(
        &self,
        cfg: &CheckpointerConfig,
        arena: &Arc<Arena>,
        slot: u32,
    ) -> Result<Option<ckpt_core::CommitTimings>> {
        if !arena.transition(slot, SlotState::Sealed, SlotState::Persisting) {
            arena.release(slot);
            return Err(Error::Busy {
                what: "the arena slot",
                reason: format!("slot {slot} was taken before persisting"),
            });
        }
        let owner = SlotOwner { job: &cfg.job, rank: cfg.rank(), world_size: cfg.world_size(), keep: 0 };
        let p = slots::persist::<Error>(&self.engine, arena, slot, owner, CommitPolicy::Storage, false, &|| None)?;
        Ok(p.timings)
    }

    /// The step to load: `step`, or the newest committed step.
    pub(super) fn resolve(&self, job: &str, step: Option<u64>) -> Result<u64> {
        match step {
            Some(s) => Ok(s),
            None => match self.engine.latest(job)? {
                Some(m) => Ok(m.step),
                None => Err(Error::NoCheckpoint { job: job.to_string(), store: self.engine.store().url().to_string() }),
            },
        }
    }

    /// The shard header (tensor table and metadata) of `step` that `who` restores, with the rank
    /// that saved that shard: `who`'s own, or after a resize the replica's its policy names (a
    /// [`ckpt_core::Error::StateMismatch`] when the policy refuses the resize).
    pub(super) fn header(&self, job: &str, step: u64, who: slots::Restorer) -> Result<(u32, ShardHeader)> {
        Ok(self.engine.restore_header(job, step, who.rank, who.world_size, who.resize)?)
    }
}
