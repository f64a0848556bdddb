//! [`SaveHandle`]: a save in progress, completed by the persist thread (embedded) or by the
//! agent's event (sidecar).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use ckpt_core::CommitTimings;

use crate::error::{Error, Result};

/// The outcome of one save, shared by its handles and whoever completes it.
#[derive(Debug, Default)]
pub(crate) struct SaveState {
    outcome: Mutex<Option<std::result::Result<(), Arc<Error>>>>,
    cv: Condvar,
    /// Set once a caller has seen this save's failure, so `close` does not raise it again.
    reported: AtomicBool,
    /// Sidecar mode: the slot is sealed and the agent accepted it (it survives this process).
    handed_over: AtomicBool,
    /// When the shard became durable and the commit was learned of, once the save succeeded.
    timings: Mutex<Option<CommitTimings>>,
}

impl SaveState {
    /// Records when the save's shard became durable and its step committed; set before
    /// [`SaveState::finish`], so that a caller whose `wait()` returned finds them.
    pub(crate) fn set_timings(&self, t: CommitTimings) {
        *self.timings.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
    }

    pub(crate) fn finish(&self, r: std::result::Result<(), Arc<Error>>) {
        let mut o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        *o = Some(r);
        self.cv.notify_all();
    }

    pub(crate) fn mark_handed_over(&self) {
        let _o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        self.handed_over.store(true, Ordering::Release);
        self.cv.notify_all();
    }

    /// Waits until the agent owns the snapshot, or the save ended.
    pub(crate) fn wait_handed_over(&self) {
        let mut o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        while o.is_none() && !self.handed_over.load(Ordering::Acquire) {
            o = self.cv.wait(o).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A save in progress.
#[derive(Debug, Clone)]
pub struct SaveHandle {
    step: u64,
    pub(crate) state: Arc<SaveState>,
}

impl SaveHandle {
    pub(crate) fn new(step: u64) -> SaveHandle {
        SaveHandle { step, state: Arc::new(SaveState::default()) }
    }

    /// The step being saved.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Blocks until the step is durable and committed (on every rank), or failed.
    pub fn wait(&self) -> Result<()> {
        let mut o = self.state.outcome.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match &*o {
                Some(Ok(())) => return Ok(()),
                Some(Err(e)) => {
                    self.state.reported.store(true, Ordering::Relaxed);
                    return Err(Error::SaveFailed { step: self.step, source: e.clone() });
                }
                None => o = self.state.cv.wait(o).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }

    /// When this rank's shard became durable, when this process learned that the step is
    /// committed, and when it wrote the MANIFEST if it did (wall-clock times; in sidecar mode as
    /// the agent saw them, with `committed` when this process received the agent's event).
    /// `None` until the save succeeded, and for a step the agent found committed already. For
    /// measurements: a step's commit latency is the latest `committed` of its ranks minus their
    /// latest `shard_durable`.
    pub fn timings(&self) -> Option<CommitTimings> {
        *self.state.timings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the save finished (successfully or not).
    pub fn done(&self) -> bool {
        self.state.outcome.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Still running, or failed without anyone having seen the failure.
    pub(crate) fn needs_attention(&self) -> bool {
        match &*self.state.outcome.lock().unwrap_or_else(|p| p.into_inner()) {
            None => true,
            Some(Ok(())) => false,
            Some(Err(_)) => !self.state.reported.load(Ordering::Relaxed),
        }
    }

    /// Whether a caller has already seen this save's failure through [`SaveHandle::wait`].
    pub(crate) fn reported(&self) -> bool {
        self.state.reported.load(Ordering::Relaxed)
    }
}
