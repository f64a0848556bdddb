//! The persist thread: waits for a snapshot's copies and seals its slot. Embedded, it then writes
//! the shard (and, on rank 0, commits the step), marks the slot durable and completes the save's
//! handle. In sidecar mode it hands the sealed slot to the agent instead; the agent's "durable" or
//! "failed" event completes the handle later.

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
    /// Time the caller spent in `save()`, reported to the agent.
    pub stall: Duration,
    /// Sidecar mode: the snapshot request this save answers (0: none).
    pub request: u64,
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
                    let result = match &shared.link {
                        Some(link) => hand_over(link, job),
                        None => run(&shared, job),
                    };
                    match result {
                        Err(e) => {
                            tracing::error!(step = handle.step, error = %e, "checkpoint save failed");
                            handle.state.finish(Err(Arc::new(e)));
                        }
                        // Sidecar mode: the agent's event completes the handle.
                        Ok(()) if shared.link.is_some() => handle.state.mark_handed_over(),
                        Ok(()) => handle.state.finish(Ok(())),
                    }
                }
            })
            .map_err(|e| ckpt_core::Error::Cancelled { reason: format!("cannot start the persist thread: {e}") })?;
        Ok(PersistThread { tx: std::sync::Mutex::new(Some(tx)), thread: std::sync::Mutex::new(Some(thread)) })
    }

    /// Queues a job; gives it back when the thread is gone.
    pub(super) fn submit(&self, job: Job) -> std::result::Result<(), Box<Job>> {
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = guard.as_ref() else { return Err(Box::new(job)) };
        match tx.try_send(job) {
            Ok(()) => Ok(()),
            // The queue holds one job per slot and a job needs a slot, so it is never full for
            // long: wait rather than fail.
            Err(TrySendError::Full(job)) => tx.send(job).map_err(|e| Box::new(e.into_inner())),
            Err(TrySendError::Disconnected(job)) => Err(Box::new(job)),
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

/// Sidecar mode: seal the slot once the copies are done and give it to the agent.
fn hand_over(link: &super::link::Link, job: Job) -> Result<()> {
    let Job { arena, slot, step, table, metadata, tickets, handle, stall, request } = job;
    let sealed = (|| {
        for t in &tickets {
            t.wait()?;
        }
        arena.seal(slot, step, &table, &metadata)?;
        Ok::<_, Error>(())
    })();
    if let Err(e) = sealed {
        arena.release(slot);
        return Err(e);
    }
    if let Err(e) = link.handover(step, slot, stall, handle.state.clone(), request) {
        // The agent did not take it: free the slot unless the agent already did take it over.
        arena.transition(slot, SlotState::Sealed, SlotState::Free);
        return Err(e);
    }
    Ok(())
}

fn run(shared: &Shared, job: Job) -> Result<()> {
    let Job { arena, slot, step, table, metadata, tickets, .. } = job;
    let engine = shared.engine.as_ref().ok_or(Error::Closed)?;
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
        engine.save(&cfg.job, step, cfg.rank, cfg.world_size, &snap, Default::default())?;
        drop(snap);
        if cfg.rank != 0 {
            wait_committed(engine, &cfg.job, step)?;
        }
        arena.mark_durable(slot)?;
        Ok(())
    })();
    if r.is_err() {
        arena.release(slot);
    }
    r
}

/// On ranks other than 0, a save is done when rank 0 has committed the step. The agent waits the
/// same way for the ranks it serves.
pub(crate) fn wait_committed(engine: &ckpt_core::Engine, job: &str, step: u64) -> Result<()> {
    let deadline = engine.config().commit.deadline;
    let started = Instant::now();
    let mut poll = Duration::from_millis(10);
    loop {
        match engine.manifest(job, step) {
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
