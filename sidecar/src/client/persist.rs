//! The embedded-mode persist thread: waits for a snapshot's copies, seals its slot, writes the shard
//! (and, on rank 0, commits the step), marks the slot durable and completes the save's handle.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ckpt_core::arena::{Arena, SlotState};
use ckpt_core::copy::CopyTicket;
use ckpt_core::{Snapshot, TensorTable};
use crossbeam_channel::{Sender, TrySendError};

use super::{SaveHandle, Shared};
use crate::error::{Error, Result};

/// One snapshot to persist.
pub(super) struct Job {
    pub arena: Arc<Arena>,
    pub slot: u32,
    pub step: u64,
    pub table: TensorTable,
    pub metadata: Vec<u8>,
    pub tickets: Vec<Arc<dyn CopyTicket>>,
    pub handle: SaveHandle,
}

/// A slot's region, shared with the persist pipeline without copying.
struct SlotRegion {
    arena: Arc<Arena>,
    slot: u32,
    len: usize,
}

impl AsRef<[u8]> for SlotRegion {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the slot is in the persisting state, owned by the persist thread, and nobody
        // writes it until it is marked durable or released, which happens after the pipeline has
        // dropped every `Bytes` of this region.
        unsafe { &self.arena.slot_bytes(self.slot)[..self.len] }
    }
}

pub(super) struct PersistThread {
    tx: std::sync::Mutex<Option<Sender<Job>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl PersistThread {
    pub(super) fn start(shared: Arc<Shared>) -> Result<PersistThread> {
        // Bounded: at most one queued snapshot per slot (slots themselves bound the memory).
        let (tx, rx) = crossbeam_channel::bounded::<Job>(shared.cfg.slots as usize);
        let thread = std::thread::Builder::new()
            .name("ckpt-persist".into())
            .spawn(move || {
                for job in rx {
                    let handle = job.handle.clone();
                    let result = run(&shared, job);
                    if let Err(e) = &result {
                        tracing::error!(step = handle.step, error = %e, "checkpoint save failed");
                    }
                    handle.state.finish(result.map_err(Arc::new));
                }
            })
            .map_err(|e| ckpt_core::Error::Cancelled { reason: format!("cannot start the persist thread: {e}") })?;
        Ok(PersistThread { tx: std::sync::Mutex::new(Some(tx)), thread: std::sync::Mutex::new(Some(thread)) })
    }

    /// Queues a job; gives it back when the thread is gone.
    pub(super) fn submit(&self, job: Job) -> std::result::Result<(), Job> {
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = guard.as_ref() else { return Err(job) };
        match tx.try_send(job) {
            Ok(()) => Ok(()),
            // The queue holds one job per slot and a job needs a slot, so it is never full for
            // long: wait rather than fail.
            Err(TrySendError::Full(job)) => tx.send(job).map_err(|e| e.into_inner()),
            Err(TrySendError::Disconnected(job)) => Err(job),
        }
    }

    pub(super) fn stop(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take()
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}

fn run(shared: &Shared, job: Job) -> Result<()> {
    let Job { arena, slot, step, table, metadata, tickets, .. } = job;
    let r = (|| {
        for t in &tickets {
            t.wait()?;
        }
        arena.seal(slot, step, &table, &metadata)?;
        if !arena.transition(slot, SlotState::Sealed, SlotState::Persisting) {
            return Err(
                ckpt_core::Error::Cancelled { reason: format!("slot {slot} was taken before persisting") }.into()
            );
        }
        let len = table.total_len() as usize;
        let data = Bytes::from_owner(SlotRegion { arena: arena.clone(), slot, len });
        let snap = Snapshot { table, data, metadata };
        let cfg = &shared.cfg;
        let engine = &shared.engine;
        engine.save(&cfg.job, step, cfg.rank, cfg.world_size, &snap, Default::default())?;
        drop(snap);
        if cfg.rank != 0 {
            wait_committed(shared, step)?;
        }
        arena.mark_durable(slot)?;
        Ok(())
    })();
    if r.is_err() {
        arena.release(slot);
    }
    r
}

/// On ranks other than 0, a save is done when rank 0 has committed the step.
fn wait_committed(shared: &Shared, step: u64) -> Result<()> {
    let deadline = shared.engine.config().commit.deadline;
    let started = Instant::now();
    let mut poll = Duration::from_millis(10);
    loop {
        match shared.engine.manifest(&shared.cfg.job, step) {
            Ok(_) => return Ok(()),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        if started.elapsed() >= deadline {
            return Err(Error::CommitTimeout { step, waited_ms: started.elapsed().as_millis() as u64 });
        }
        std::thread::sleep(poll);
        poll = (poll * 2).min(Duration::from_millis(500));
    }
}
