//! One rank served by the agent: its arena, its trainer session, and the persist worker that
//! writes its handed-over slots.
//!
//! Each rank has its own persist thread fed by a bounded channel (one entry per arena slot, the
//! only memory a snapshot ever occupies), so that eight ranks of a pod persist in parallel and a
//! slow rank never holds up another. The thread exits once the rank has no session and nothing
//! to persist for [`IDLE_EXIT`], and starts again with the next job: a trainer that attached
//! once holds no thread after it is gone.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ckpt_core::arena::{Arena, ArenaLock, SlotState};
use ckpt_core::slots::{self, ArenaSpec, CommitPolicy, SlotOwner};
use ckpt_core::{CommitTimings, ShardInfo};
use ckptd_proto::v1::{self as pb, trainer_event::Event};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use tokio::sync::{mpsc, watch};

use super::Agent;
use crate::error::{Error, Result};

/// How long a rank's persist thread waits, idle and with no trainer attached, before it exits.
pub(super) const IDLE_EXIT: Duration = Duration::from_secs(5);

/// The rank's persist thread, when one runs.
#[derive(Debug, Default)]
struct Worker {
    tx: Option<Sender<PersistJob>>,
    handle: Option<std::thread::JoinHandle<()>>,
    /// The agent is stopping: no thread starts again.
    stopped: bool,
}

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
    /// A previous agent was persisting the slot when it died: the step may be committed already,
    /// by that agent, with these very bytes.
    pub resumed: bool,
}

/// How long a restarted trainer's load lets this rank's pending commits wait for the other
/// ranks' shards before they are given up (see [`RankInner::restoring_since`]).
pub(super) const RESTORE_PATIENCE: Duration = Duration::from_secs(2);

/// The open session of the rank's trainer.
#[derive(Debug)]
pub(super) struct Session {
    pub id: u64,
    /// The pid the trainer reported (in its own pid namespace; diagnostics only).
    pub pid: u32,
    /// The trainer's pid from the socket's peer credentials, when visible from the agent.
    pub peer_pid: Option<i32>,
    /// Whether this session handed over a snapshot: from then on it is training, and its loads
    /// are queries, not a restart's restore (see [`RankInner::restoring_since`]).
    pub handed_over: bool,
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
    pub last_heartbeat: Option<(u64, Option<ckpt_core::Phase>)>,
    /// (step, when first seen) of the newest heartbeat step, for step times.
    pub step_clock: Option<(u64, Instant)>,
    /// The isolator rolled the job back to this step, and the trainer has not loaded it yet:
    /// snapshots of later steps are from the abandoned timeline.
    pub rollback: Option<u64>,
    /// The session that was ordered to restart and has neither restored nor detached yet.
    pub awaiting_restart: Option<u64>,
    /// Since when a trainer that has not saved yet in its session (a restarted one) has been
    /// waiting to restore (its load waits for this rank's persists to settle). A commit still
    /// waiting for other ranks' shards [`RESTORE_PATIENCE`] later is given up: after a restart
    /// those shards may never come. A training session's loads and queries never give one up.
    pub restoring_since: Option<Instant>,
    /// A step the prefetch read from storage into the arena before any trainer asked: loads of it
    /// report storage as their source, since that is where its bytes came from, until the
    /// trainer's first save.
    pub prefetched: Option<u64>,
}

/// A rank served by the agent.
#[derive(Debug)]
pub(super) struct Rank {
    pub rank: u32,
    pub spec: ArenaSpec,
    pub inner: Mutex<RankInner>,
    /// The agent's ownership of the rank's arena file ([`ArenaLock`]), held until the agent
    /// exits; the trainers it serves only map the arena.
    pub owner: Mutex<Option<ArenaLock>>,
    /// Serialises arena (re)creation, restores into the arena and flushes.
    pub staging: tokio::sync::Mutex<()>,
    /// (request, step) of the newest handover, for `SnapshotNow` waiters.
    pub handovers: watch::Sender<(u64, u64)>,
    /// Jobs queued or being persisted; waiters use it to let in-flight saves settle.
    pub in_flight: watch::Sender<u32>,
    metrics: Arc<super::metrics::Metrics>,
    slots: u32,
    agent: Weak<Agent>,
    me: Weak<Rank>,
    worker: Mutex<Worker>,
}

impl Rank {
    /// Creates the rank and starts its persist thread.
    pub(super) fn start(agent: &Arc<Agent>, rank: u32) -> Result<Arc<Rank>> {
        let r = Arc::new_cyclic(|me| Rank {
            rank,
            spec: ArenaSpec::for_rank(&agent.cfg.arena_dir, &agent.cfg.job, rank, agent.cfg.slots),
            inner: Mutex::new(RankInner::default()),
            owner: Mutex::new(None),
            staging: tokio::sync::Mutex::new(()),
            handovers: watch::Sender::new((0, 0)),
            in_flight: watch::Sender::new(0),
            metrics: agent.metrics.clone(),
            slots: agent.cfg.slots,
            agent: Arc::downgrade(agent),
            me: me.clone(),
            worker: Mutex::new(Worker::default()),
        });
        r.spawn_worker(&mut r.worker.lock().unwrap_or_else(|p| p.into_inner()))?;
        Ok(r)
    }

    /// Starts the persist thread; returns its queue.
    fn spawn_worker(&self, w: &mut Worker) -> Result<Sender<PersistJob>> {
        let (tx, rx) = crossbeam_channel::bounded::<PersistJob>(self.slots as usize);
        let (agent, me) = (self.agent.clone(), self.me.clone());
        let handle = std::thread::Builder::new()
            .name(format!("ckpt-persist-r{}", self.rank))
            .spawn(move || {
                if let Some(a) = agent.upgrade() {
                    a.engine.config().persist.priority.apply_to_current_thread();
                }
                if let Some(me) = me.upgrade() {
                    persist_loop(agent, me, rx);
                }
            })
            .map_err(|e| Error::Runtime { what: "start a persist thread", reason: e.to_string() })?;
        w.tx = Some(tx.clone());
        w.handle = Some(handle);
        Ok(tx)
    }

    /// The persist thread leaves when the rank has been idle, with no trainer, for
    /// [`IDLE_EXIT`]: unless a job arrived meanwhile, its queue is dropped (the next job starts a
    /// new thread). Returns whether it should exit.
    fn retire_if_idle(&self, rx: &Receiver<PersistJob>) -> bool {
        if self.lock().session.is_some() || *self.in_flight.borrow() != 0 {
            return false;
        }
        let mut w = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        if !rx.is_empty() {
            return false;
        }
        w.tx = None;
        // This thread is the one exiting: nobody joins it.
        w.handle = None;
        true
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, RankInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a slot (already moved to `persisting`) for the persist thread.
    pub(super) fn enqueue(&self, job: PersistJob) -> std::result::Result<(), PersistJob> {
        let mut w = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        if w.stopped {
            return Err(job);
        }
        let tx = match w.tx.clone() {
            Some(tx) => tx,
            None => match self.spawn_worker(&mut w) {
                Ok(tx) => tx,
                Err(e) => {
                    tracing::error!(rank = self.rank, error = %e, "cannot start the persist thread");
                    return Err(job);
                }
            },
        };
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
        let handle = {
            let mut w = self.worker.lock().unwrap_or_else(|p| p.into_inner());
            w.stopped = true;
            w.tx = None;
            w.handle.take()
        };
        if let Some(t) = handle {
            let _ = t.join();
        }
    }

    /// Persists the newest sealed slot that nobody handed over (its trainer died, or the previous
    /// agent did) and frees the slots a dead trainer left half-written. `resumed` are the slots a
    /// previous agent was persisting. Returns the step queued.
    pub(super) fn flush_abandoned(&self, arena: &Arc<Arena>, world_size: Option<u32>, resumed: &[u32]) -> Option<u64> {
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
        let job = PersistJob {
            arena: arena.clone(),
            slot,
            step,
            world_size,
            handed_at: Instant::now(),
            flushed: true,
            resumed: resumed.contains(&slot),
        };
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

fn persist_loop(agent: Weak<Agent>, rank: Arc<Rank>, rx: Receiver<PersistJob>) {
    loop {
        let job = match rx.recv_timeout(IDLE_EXIT) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) if rank.retire_if_idle(&rx) => {
                tracing::debug!(rank = rank.rank, "persist thread idle without a trainer; exiting");
                break;
            }
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let Some(agent) = agent.upgrade() else { break };
        let step = job.step;
        let started = job.handed_at;
        let flushed = job.flushed;
        let result = persist_one(&agent, &rank, job);
        if result.is_ok() {
            // Before the job leaves `in_flight`: a load that waited for persists to settle must
            // find this step committed, or it would stage an older one over it.
            let mut inner = rank.lock();
            inner.last_durable = Some(inner.last_durable.map_or(step, |s| s.max(step)));
            inner.committed = Some(inner.committed.map_or(step, |s| s.max(step)));
        }
        rank.in_flight.send_modify(|n| *n = n.saturating_sub(1));
        agent.metrics.queue_depth.dec();
        match result {
            Ok(persisted) => {
                let bytes = persisted.bytes;
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
                tracing::info!(rank = rank.rank, step, bytes, flushed, "step durable and committed");
                let t = persisted.timings;
                let ns = |at: Option<std::time::SystemTime>| at.map_or(0, CommitTimings::unix_ns);
                rank.notify(Event::Durable(pb::StepDurable {
                    step,
                    committed: true,
                    shard_durable_unix_ns: ns(t.map(|t| t.shard_durable)),
                    manifest_written_unix_ns: ns(t.and_then(|t| t.manifest_written)),
                }));
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

/// Persists the slot through the slot lifecycle: with an isolator the shard is voted on and the
/// isolator commits; without one, the step commits through storage (the rank that finishes last
/// writes the MANIFEST, rank 0 stands by). A restart (the generation moved
/// on, or a rollback below this step) abandons the wait for the MANIFEST. Returns what was
/// written and when.
fn persist_one(agent: &Agent, rank: &Rank, job: PersistJob) -> Result<slots::Persisted> {
    let PersistJob { arena, slot, step, world_size, resumed, .. } = job;
    let owner = SlotOwner { job: &agent.cfg.job, rank: rank.rank, world_size, keep: agent.cfg.keep };
    // A restarted trainer waiting to restore, or a restart order below this step: the wait for
    // this step's commit ends (the step stays uncommitted unless every shard is already there).
    let restoring = || {
        let inner = rank.lock();
        if let Some(rb) = inner.rollback.filter(|&rb| step > rb) {
            return Some(format!("the job restarts from step {rb}"));
        }
        inner.restoring_since.filter(|t| t.elapsed() >= RESTORE_PATIENCE).map(|_| {
            format!(
                "this rank's trainer restarted and restores; other ranks' shards did not arrive within {RESTORE_PATIENCE:?}"
            )
        })
    };
    let persisted = match &agent.link {
        Some(link) => {
            let generation = link.generation();
            let abort = || {
                if link.generation() > generation {
                    return Some(format!("the job restarted (generation {})", link.generation()));
                }
                restoring()
            };
            // The vote carries the generation the snapshot belongs to: a snapshot of the timeline
            // a restart abandoned is never voted at the new generation (which would commit it).
            let vote = |info: &ShardInfo| {
                if let Some(reason) = abort() {
                    return Err(Error::StepAborted { job: agent.cfg.job.clone(), step, reason });
                }
                agent.rt.block_on(link.vote_durable_at(info, &Default::default(), generation)).map(drop)
            };
            slots::persist(&agent.engine, &arena, slot, owner, CommitPolicy::Vote(&vote), resumed, &abort)?
        }
        None => {
            slots::persist::<Error>(&agent.engine, &arena, slot, owner, CommitPolicy::Storage, resumed, &restoring)?
        }
    };
    Ok(persisted)
}
