//! One rank served by the agent: its arena, its trainer session, and the persist worker that
//! writes its handed-over slots.
//!
//! Each rank has its own persist thread fed by a bounded channel (one entry per arena slot, the
//! only memory a snapshot ever occupies), so that eight ranks of a pod persist in parallel and a
//! slow rank never holds up another.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use ckpt_core::Snapshot;
use ckpt_core::arena::{Arena, SlotState};
use ckptd_proto::v1::{self as pb, trainer_event::Event};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use tokio::sync::{mpsc, watch};

use super::Agent;
use crate::error::{Error, Result};

/// One slot to persist.
#[derive(Debug)]
pub(super) struct PersistJob {
    pub arena: Arc<Arena>,
    pub slot: u32,
    pub step: u64,
    pub world_size: u32,
    pub handed_at: Instant,
    /// Persisted for a trainer that died (or an agent that restarted) without handing it over.
    pub flushed: bool,
}

/// The open session of the rank's trainer.
#[derive(Debug)]
pub(super) struct Session {
    pub id: u64,
    pub pid: u32,
    pub events: mpsc::Sender<Result<pb::TrainerEvent, tonic::Status>>,
}

/// Mutable state of a rank, behind a short-lived lock.
#[derive(Debug, Default)]
pub(super) struct RankInner {
    pub session: Option<Session>,
    pub arena: Option<Arc<Arena>>,
    pub world_size: Option<u32>,
    /// Newest step this agent knows to be committed for the job (from its own persists or a
    /// restore), so that a restarted trainer's load needs no store listing.
    pub committed: Option<u64>,
    pub last_durable: Option<u64>,
    /// Snapshot request sent to the trainer and not answered yet.
    pub pending_request: Option<u64>,
    pub last_heartbeat: Option<(u64, pb::Phase)>,
    /// (step, when first seen) of the newest heartbeat step, for step times.
    pub step_clock: Option<(u64, Instant)>,
    /// The isolator rolled the job back to this step, and the trainer has not loaded it yet:
    /// snapshots of later steps are from the abandoned timeline.
    pub rollback: Option<u64>,
}

/// A rank served by the agent.
#[derive(Debug)]
pub(super) struct Rank {
    pub rank: u32,
    pub arena_path: PathBuf,
    pub inner: Mutex<RankInner>,
    /// Serialises arena (re)creation, restores into the arena and flushes.
    pub staging: tokio::sync::Mutex<()>,
    /// (request, step) of the newest handover, for `SnapshotNow` waiters.
    pub handovers: watch::Sender<(u64, u64)>,
    /// Jobs queued or being persisted; waiters use it to let in-flight saves settle.
    pub in_flight: watch::Sender<u32>,
    metrics: Arc<super::metrics::Metrics>,
    tx: Mutex<Option<Sender<PersistJob>>>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Rank {
    /// Creates the rank and starts its persist thread.
    pub(super) fn start(agent: &Arc<Agent>, rank: u32) -> Result<Arc<Rank>> {
        let (tx, rx) = crossbeam_channel::bounded::<PersistJob>(agent.cfg.slots as usize);
        let r = Arc::new(Rank {
            rank,
            arena_path: agent.cfg.arena_dir.join(format!("{}-rank-{rank}.arena", agent.cfg.job)),
            inner: Mutex::new(RankInner::default()),
            staging: tokio::sync::Mutex::new(()),
            handovers: watch::Sender::new((0, 0)),
            in_flight: watch::Sender::new(0),
            metrics: agent.metrics.clone(),
            tx: Mutex::new(Some(tx)),
            worker: Mutex::new(None),
        });
        let weak = Arc::downgrade(agent);
        let me = r.clone();
        let worker = std::thread::Builder::new()
            .name(format!("ckpt-persist-r{rank}"))
            .spawn(move || persist_loop(weak, me, rx))
            .map_err(|e| ckpt_core::Error::Cancelled { reason: format!("cannot start a persist thread: {e}") })?;
        *r.worker.lock().unwrap_or_else(|p| p.into_inner()) = Some(worker);
        Ok(r)
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, RankInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a slot (already moved to `persisting`) for the persist thread.
    pub(super) fn enqueue(&self, job: PersistJob) -> std::result::Result<(), PersistJob> {
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = guard.as_ref() else { return Err(job) };
        self.in_flight.send_modify(|n| *n += 1);
        self.metrics.queue_depth.inc();
        match tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                self.in_flight.send_modify(|n| *n = n.saturating_sub(1));
                self.metrics.queue_depth.dec();
                Err(job)
            }
        }
    }

    /// Sends an event to the trainer, if one is attached. Never blocks: a trainer that does not
    /// read its events loses them rather than stall the persist thread.
    pub(super) fn notify(&self, event: Event) {
        let tx = self.lock().session.as_ref().map(|s| s.events.clone());
        if let Some(tx) = tx
            && let Err(e) = tx.try_send(Ok(pb::TrainerEvent { event: Some(event) }))
        {
            tracing::warn!(rank = self.rank, error = %e, "cannot deliver an event to the trainer");
        }
    }

    /// Stops accepting jobs and waits for the persist thread to finish the queued ones.
    pub(super) fn stop_and_join(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }

    /// Persists the newest sealed slot that nobody handed over (its trainer died, or the previous
    /// agent did) and frees the slots a dead trainer left half-written. Returns the step queued.
    pub(super) fn flush_abandoned(&self, arena: &Arc<Arena>, world_size: Option<u32>) -> Option<u64> {
        let mut sealed: Vec<(u64, u32)> = Vec::new();
        for slot in 0..arena.slot_count() {
            match arena.state(slot) {
                Some(SlotState::Writing) => arena.release(slot),
                Some(SlotState::Sealed) => match arena.content(slot) {
                    Ok(c) => sealed.push((c.step, slot)),
                    Err(e) => {
                        tracing::warn!(rank = self.rank, slot, error = %e, "dropping an unreadable sealed slot");
                        arena.release(slot);
                    }
                },
                _ => {}
            }
        }
        sealed.sort_unstable();
        let newest = sealed.pop();
        for (_, slot) in sealed {
            arena.transition(slot, SlotState::Sealed, SlotState::Free);
        }
        let (step, slot) = newest?;
        let Some(world_size) = world_size else {
            tracing::error!(rank = self.rank, step, "cannot flush a snapshot: world size unknown (set --world-size)");
            return None;
        };
        if !arena.transition(slot, SlotState::Sealed, SlotState::Persisting) {
            return None;
        }
        let job = PersistJob { arena: arena.clone(), slot, step, world_size, handed_at: Instant::now(), flushed: true };
        match self.enqueue(job) {
            Ok(()) => {
                tracing::warn!(rank = self.rank, step, "persisting the snapshot its trainer left behind");
                Some(step)
            }
            Err(job) => {
                job.arena.transition(job.slot, SlotState::Persisting, SlotState::Sealed);
                tracing::error!(rank = self.rank, step, "cannot queue the abandoned snapshot: the agent is stopping");
                None
            }
        }
    }
}

/// A slot's bytes, shared with the persist pipeline without copying.
struct SlotRegion {
    arena: Arc<Arena>,
    slot: u32,
    len: usize,
}

impl AsRef<[u8]> for SlotRegion {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the slot is in the persisting state, owned by this rank's persist thread; the
        // trainer never writes a slot it does not hold in the writing state, and the slot leaves
        // the persisting state only after the pipeline has dropped every `Bytes` of this region.
        unsafe { &self.arena.slot_bytes(self.slot)[..self.len] }
    }
}

fn persist_loop(agent: std::sync::Weak<Agent>, rank: Arc<Rank>, rx: Receiver<PersistJob>) {
    for job in rx {
        let Some(agent) = agent.upgrade() else { break };
        let step = job.step;
        let started = job.handed_at;
        let flushed = job.flushed;
        let result = persist_one(&agent, &rank, job);
        rank.in_flight.send_modify(|n| *n = n.saturating_sub(1));
        agent.metrics.queue_depth.dec();
        match result {
            Ok(bytes) => {
                agent.metrics.persist_bytes.inc_by(bytes);
                agent.metrics.persist_seconds.observe(started.elapsed().as_secs_f64());
                if flushed {
                    agent.metrics.flushed.inc();
                }
                agent
                    .metrics
                    .last_durable_step
                    .get_or_create(&super::metrics::RankLabel { rank: rank.rank.to_string() })
                    .set(step.min(i64::MAX as u64) as i64);
                {
                    let mut inner = rank.lock();
                    inner.last_durable = Some(inner.last_durable.map_or(step, |s| s.max(step)));
                    inner.committed = Some(inner.committed.map_or(step, |s| s.max(step)));
                }
                tracing::info!(rank = rank.rank, step, bytes, flushed, "step durable and committed");
                rank.notify(Event::Durable(pb::StepDurable { step, committed: true }));
            }
            Err(e) => {
                agent.metrics.persist_failures.inc();
                tracing::error!(rank = rank.rank, step, error = %e, "persist failed");
                rank.notify(Event::SaveFailed(pb::SaveFailed {
                    step,
                    kind: e.kind().as_str().to_string(),
                    message: e.to_string(),
                }));
            }
        }
    }
}

/// Writes the slot's shard, waits for the commit, marks the slot durable. Returns the shard size.
fn persist_one(agent: &Agent, rank: &Rank, job: PersistJob) -> Result<u64> {
    let PersistJob { arena, slot, step, world_size, .. } = job;
    let r = (|| {
        let content = arena.content(slot)?;
        if content.step != step {
            return Err(ckpt_core::Error::Cancelled {
                reason: format!("slot {slot} holds step {} where step {step} was handed over", content.step),
            }
            .into());
        }
        let len = content.table.total_len() as usize;
        let data = Bytes::from_owner(SlotRegion { arena: arena.clone(), slot, len });
        let snap = Snapshot { table: content.table, data, metadata: content.metadata };
        let generation = agent.link.as_ref().map(|l| l.generation());
        let saved = match &agent.link {
            // With an isolator, it commits once every rank voted: write the shard and vote.
            Some(link) => {
                agent.engine.write_shard(&agent.cfg.job, step, rank.rank, world_size, &snap).and_then(|info| {
                    drop(snap);
                    agent.rt.block_on(link.vote_durable(&info, &Default::default())).map(|_| (info, None)).map_err(
                        |e| ckpt_core::Error::Cancelled { reason: format!("vote to the isolator failed: {e}") },
                    )
                })
            }
            None => {
                let r = agent.engine.save(&agent.cfg.job, step, rank.rank, world_size, &snap, Default::default());
                drop(snap);
                r
            }
        };
        let size = match saved {
            Ok((info, _)) => info.size,
            // An earlier agent persisted this step and died before marking the slot durable.
            Err(e)
                if e.kind() == ckpt_core::ErrorKind::Conflict
                    && agent.engine.manifest(&agent.cfg.job, step).is_ok() =>
            {
                0
            }
            Err(e) => return Err(e.into()),
        };
        match (&agent.link, generation) {
            (Some(link), Some(g)) => wait_global_commit(agent, rank, link, g, step)?,
            _ if rank.rank != 0 => crate::client::wait_committed(&agent.engine, &agent.cfg.job, step)?,
            _ => {}
        }
        if rank.rank == 0 && agent.cfg.keep > 0 {
            let policy = ckpt_core::RetentionPolicy { keep: agent.cfg.keep, ..Default::default() };
            if let Err(e) = agent.engine.gc(&agent.cfg.job, &policy) {
                tracing::warn!(step, error = %e, "retention failed; it runs again after the next commit");
            }
        }
        arena.mark_durable(slot)?;
        Ok::<_, Error>(size)
    })();
    if r.is_err() {
        arena.release(slot);
    }
    r
}

/// With an isolator: waits until the isolator has written the step's MANIFEST. A restart (the
/// generation moved on) aborts every step still open, so the wait ends there instead of running
/// into the deadline.
fn wait_global_commit(
    agent: &Agent,
    rank: &Rank,
    link: &crate::isolator::link::IsolatorLink,
    generation: u64,
    step: u64,
) -> Result<()> {
    let deadline = agent.engine.config().commit.deadline;
    let started = Instant::now();
    let mut poll = std::time::Duration::from_millis(10);
    loop {
        match agent.engine.manifest(&agent.cfg.job, step) {
            Ok(_) => return Ok(()),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        if link.generation() > generation || rank.lock().rollback.is_some_and(|rb| step > rb) {
            return Err(ckpt_core::Error::Cancelled {
                reason: format!("step {step} was aborted by the job's restart (generation {})", link.generation()),
            }
            .into());
        }
        if started.elapsed() >= deadline {
            return Err(Error::CommitTimeout { step, waited_ms: started.elapsed().as_millis() as u64 });
        }
        std::thread::sleep(poll);
        poll = (poll * 2).min(std::time::Duration::from_millis(200));
    }
}
