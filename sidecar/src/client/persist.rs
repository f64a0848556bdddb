//! The persist thread: waits for a snapshot's copies and seals its slot, then hands it to the
//! mode: embedded, it persists and commits the slot ([`ckpt_core::slots::persist`]) and completes
//! the save's handle; in sidecar mode it hands the sealed slot to the agent, whose "durable" or
//! "failed" event completes the handle later.

use std::sync::Arc;
use std::time::Duration;

use ckpt_core::TensorTable;
use ckpt_core::arena::Arena;
use ckpt_core::copy::CopyTicket;
use crossbeam_channel::{Sender, TrySendError};

use super::handle::SaveHandle;
use super::{Mode, Shared};
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
                // Seal checksums and (embedded) persists run here and in threads it spawns,
                // which inherit the priority.
                shared.cfg.engine.persist.priority.apply_to_current_thread();
                for job in rx {
                    let handle = job.handle.clone();
                    match run(&shared, job) {
                        Err(e) => {
                            tracing::error!(step = handle.step(), error = %e, "checkpoint save failed");
                            handle.state.finish(Err(Arc::new(e)));
                        }
                        // Sidecar mode: the agent's event completes the handle.
                        Ok(()) if matches!(shared.mode, Mode::Sidecar(_)) => handle.state.mark_handed_over(),
                        Ok(()) => handle.state.finish(Ok(())),
                    }
                }
            })
            .map_err(|e| Error::Runtime { what: "start the persist thread", reason: e.to_string() })?;
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

/// Seals the slot once the copies are done, then persists it (embedded) or hands it over.
fn run(shared: &Shared, job: Job) -> Result<()> {
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
    match &shared.mode {
        Mode::Embedded(m) => {
            if let Some(t) = m.persist(&shared.cfg, &arena, slot)? {
                handle.state.set_timings(t);
            }
            Ok(())
        }
        Mode::Sidecar(m) => m.hand_over(&arena, slot, step, stall, handle.state.clone(), request),
    }
}
