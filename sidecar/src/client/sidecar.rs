//! Sidecar mode: the agent owns the arena file, storage and commits. The trainer maps the arena
//! the agent made, copies into slots it took, and hands sealed slots over; loads come from a slot
//! the agent staged (from its memory tier, else from storage).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ckpt_core::arena::{Arena, SlotState};
use ckpt_core::slots::ReadHold;

use super::handle::SaveState;
use super::link::Link;
use crate::error::Result;

/// The session with the agent.
#[derive(Debug)]
pub(super) struct Sidecar {
    pub link: Link,
}

/// A step the agent staged in the arena, held for reading.
pub(super) struct Staged {
    pub hold: ReadHold,
    /// Whether the agent had to read storage to stage it.
    pub from_storage: bool,
}

impl Sidecar {
    /// Attaches `rank`; `grace` is how long an order may wait for the script before the process
    /// exits (`None`: never; see [`super::orders`]).
    pub(super) fn attach(
        socket: &Path,
        job: &str,
        rank: u32,
        world_size: u32,
        grace: Option<Duration>,
    ) -> Result<Sidecar> {
        Ok(Sidecar { link: Link::attach(socket, job, rank, world_size, grace)? })
    }

    /// The arena the agent reported at attach (empty before the agent made one).
    pub(super) fn arena_path(&self) -> PathBuf {
        self.link.attached().arena_path.clone().unwrap_or_default()
    }

    /// Has the agent create or grow the arena to `slot_size` bytes per slot; returns its path.
    pub(super) fn prepare_arena(&self, slot_size: u64) -> Result<PathBuf> {
        self.link.prepare_arena(slot_size)
    }

    /// Gives a sealed slot to the agent, which persists and commits it; `state` completes when
    /// the agent reports the step durable or failed. A refused slot is freed unless the agent
    /// took it after all.
    pub(super) fn hand_over(
        &self,
        arena: &Arena,
        slot: u32,
        step: u64,
        stall: Duration,
        state: Arc<SaveState>,
        request: u64,
    ) -> Result<()> {
        if let Err(e) = self.link.handover(step, slot, stall, state, request) {
            arena.transition(slot, SlotState::Sealed, SlotState::Free);
            return Err(e);
        }
        Ok(())
    }

    /// Has the agent stage `step` (default: the newest committed step), maps the arena with
    /// `map`, and holds the staged slot for reading. A slot whose bytes fail verification is
    /// dropped (the hold frees it), and the agent is asked once more: it then stages the step
    /// from storage.
    pub(super) fn stage(
        &self,
        step: Option<u64>,
        strict: bool,
        map: impl Fn(&Path) -> Result<Arc<Arena>>,
    ) -> Result<Staged> {
        let mut retried = false;
        loop {
            let reply = self.link.locate(step, strict)?;
            let arena = map(Path::new(&reply.arena_path))?;
            match ReadHold::new(&arena, reply.slot) {
                Ok(Some(hold)) if hold.content().step == reply.step => {
                    return Ok(Staged { hold, from_storage: reply.from_storage });
                }
                Err(e) if !retried && e.kind() == ckpt_core::ErrorKind::Corrupt => retried = true,
                Err(e) => return Err(e.into()),
                Ok(_) => {
                    return Err(crate::Error::Busy {
                        what: "the arena slot",
                        reason: format!("slot {} changed before it could be read; retry the load", reply.slot),
                    });
                }
            }
        }
    }
}
