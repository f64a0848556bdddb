//! [`Coordinator`]: the isolator's state, shared by the gRPC handlers and its background tasks.
//!
//! It owns every job (ranks, ballots, state, generation, command subscribers), writes MANIFESTs
//! when a ballot completes, runs the coordinated restore and asks the [`NodeFencer`] to isolate
//! nodes within the circuit breaker's limits. The job map sits behind one `std::sync::Mutex` that is
//! never held across an `.await`; store and cluster calls happen outside it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ckpt_core::{Engine, EngineConfig, ShardEntry};
use ckptd_proto::v1::{
    Command, FaultAck, FaultAction, HeartbeatAck, JobStatus, RegisterReply, RestoreCommand, SnapshotNowCommand,
    StopCommand, command,
};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::ballot::{Ballot, Tally};
use super::breaker::{Breaker, BreakerConfig};
use super::faults::{FaultRecord, FaultSink, Stage, now_ms};
use super::fencer::{Isolation, NodeFencer, Notice, PodRef, Subject, taint_value};
use super::handling::{self, Rule};
use super::metrics::Metrics;
use super::repair::{self, Repair, RepairRequest, Repairer};
use super::request::{Fault, Heartbeat, Registration, ShardVote, Subscription, check_name};
use super::state::{Event, JobState};
use super::straggler::Detector;
use crate::health::Action;
use crate::layout::Layout;
use crate::{Error, Result};

/// Most steps of one job with open ballots at once; more means ranks race far apart or a peer is
/// hostile.
pub const MAX_OPEN_BALLOTS: usize = 16;
/// Aborted steps remembered per job (so that late votes of the same generation get a clear
/// answer).
const ABORTED_MEMORY: usize = 64;
/// Capacity of each agent's command queue.
pub const COMMAND_QUEUE: usize = 32;
/// Most fault records of one job's recovery in progress kept in memory (older ones are already
/// written with their detection).
const OPEN_RECORDS: usize = 256;

/// Timing and policy of the coordinator, and its repair hook.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A step whose ballot stays incomplete this long after its first vote is aborted.
    pub commit_deadline: Duration,
    /// How long healthy ranks get to finish their emergency snapshot.
    pub snapshot_timeout: Duration,
    /// Straggler threshold factor (× median step time).
    pub straggler_k: f64,
    /// Consecutive windows over the threshold before a rank is a straggler.
    pub straggler_windows: u32,
    /// Length of one straggler window.
    pub straggler_window: Duration,
    /// Store URL for every job, overriding the one agents register with.
    pub store_override: Option<String>,
    /// Circuit breaker limits.
    pub breaker: BreakerConfig,
    /// An alert for a fault already reported on the same node (same kind) within this window is
    /// not acted on again, and neither is an agent's report of a fault an alert already reported.
    pub dedupe_window: Duration,
    /// Where repairs of nodes isolated for hardware faults are requested (`--repair-url`).
    pub repair: Option<Repairer>,
}

/// A node reported repaired and released ([`Coordinator::repaired`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairDone {
    /// The fault record of the repair, when this isolator requested it.
    pub record: Option<String>,
    /// That record's job.
    pub job: Option<String>,
    /// When the node was released (Unix milliseconds).
    pub at: u64,
}

/// Most recent faults remembered for deduplication.
const RECENT_FAULTS: usize = 4096;

/// A fault acted on recently, by (node, kind).
#[derive(Debug, Clone, Copy)]
struct Seen {
    at: Instant,
    action: Action,
    from_alert: bool,
}

/// An alert mapped to a finding on a known node, for [`Coordinator::report_alert`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertFault {
    /// The node.
    pub node: String,
    /// The finding kind.
    pub kind: String,
    /// The policy's action.
    pub action: Action,
    /// `alertmanager` or `aliyun`.
    pub source: String,
    /// The evidence line.
    pub evidence: String,
}

/// What became of an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertOutcome {
    /// It went to every job with ranks on the node, as an agent's report would.
    Acted,
    /// The same fault on the node was reported within the dedupe window: nothing done.
    Duplicate,
    /// The policy says `ignore`.
    Ignored,
    /// No registered job has a rank on the node: recorded, nothing done.
    NoJob,
}

impl AlertOutcome {
    /// The name in the intake's answer.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertOutcome::Acted => "acted",
            AlertOutcome::Duplicate => "duplicate",
            AlertOutcome::Ignored => "ignored",
            AlertOutcome::NoJob => "no-job",
        }
    }
}

/// The coordinator's answer to one alert: the outcome, and for each job it went to, the job and
/// the ack an agent would have got.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertReply {
    /// What happened.
    pub outcome: AlertOutcome,
    /// (job, ack) per job with ranks on the node.
    pub jobs: Vec<(String, FaultAck)>,
    /// Why, in words.
    pub note: String,
}

#[derive(Debug, Clone)]
struct Rank {
    node: String,
    pod: String,
    namespace: String,
    step_ms: u64,
    /// The step of the last heartbeat.
    step: Option<u64>,
    /// The phase of the last heartbeat that said one.
    phase: Option<ckpt_core::Phase>,
}

#[derive(Debug)]
struct Subscriber {
    ranks: Vec<u32>,
    tx: mpsc::Sender<Command>,
}

#[derive(Debug)]
struct Job {
    world_size: u32,
    store: String,
    state: JobState,
    generation: u64,
    ranks: BTreeMap<u32, Rank>,
    ballots: BTreeMap<u64, Ballot>,
    committing: BTreeSet<u64>,
    committed: Option<u64>,
    /// (step, generation it was aborted at, why).
    aborted: VecDeque<(u64, u64, String)>,
    subscribers: Vec<Subscriber>,
    pending_restore: Option<RestoreCommand>,
    faulty: BTreeSet<u32>,
    restored: BTreeSet<u32>,
    detector: Detector,
    /// The layout the job's agents last registered with (`ckptd.io/parallel`), shown by `ckptctl jobs`.
    parallel: Option<crate::layout::Layout>,
    /// Records of the faults in the recovery in progress, stamped at restart and resume.
    records: Vec<FaultRecord>,
    /// Whether the lookup of the job's owner (PyTorchJob, JobSet, Job) was queued.
    owner_asked: bool,
    /// Set by a fault during `checkpoint-save` (why, in words) until the restart: no step other
    /// than the committed one is admitted, so neither the interrupted step nor an emergency
    /// snapshot commits, and the restore uses the last committed step.
    hold: Option<String>,
}

impl Job {
    fn check_generation(&self, job: &str, got: u64) -> Result<()> {
        if got < self.generation {
            return Err(Error::StaleGeneration { job: job.to_string(), got, current: self.generation });
        }
        if got > self.generation {
            return Err(Error::InvalidRequest {
                what: "generation".into(),
                reason: format!("{got} is ahead of the job's generation {}", self.generation),
            });
        }
        Ok(())
    }

    fn check_rank(&self, rank: u32) -> Result<()> {
        if rank >= self.world_size {
            return Err(Error::InvalidRequest {
                what: "rank".into(),
                reason: format!("rank {rank} is not below the world size {}", self.world_size),
            });
        }
        Ok(())
    }

    fn abort(&mut self, job: &str, step: u64, reason: String) {
        if self.ballots.remove(&step).is_some() {
            tracing::warn!(job, step, reason = %reason, "step aborted; the previous committed step stays latest");
        }
        if self.aborted.len() >= ABORTED_MEMORY {
            self.aborted.pop_front();
        }
        self.aborted.push_back((step, self.generation, reason));
    }

    /// Whether a vote for `step` at the job's generation may be counted: the step was not aborted
    /// at this generation (a restarted job may save the step number again, replacing the stale
    /// shards), is not older than the committed step, and either is the committed step
    /// ([`Admission::Committed`]: a retried vote) or may open or join a ballot.
    fn admit(&self, job: &str, v: &ShardVote) -> Result<Admission> {
        self.check_rank(v.vote.rank)?;
        if v.world_size != self.world_size {
            return Err(Error::InvalidRequest {
                what: "world_size".into(),
                reason: format!("job `{job}` has world size {}, not {}", self.world_size, v.world_size),
            });
        }
        self.check_generation(job, v.generation)?;
        if let Some(why) = &self.hold
            && self.committed != Some(v.step)
        {
            return Err(Error::StepAborted { job: job.to_string(), step: v.step, reason: why.clone() });
        }
        if let Some((_, _, why)) = self.aborted.iter().rev().find(|(s, g, _)| *s == v.step && *g == self.generation) {
            return Err(Error::StepAborted { job: job.to_string(), step: v.step, reason: why.clone() });
        }
        if let Some(c) = self.committed {
            if v.step == c {
                return Ok(Admission::Committed);
            }
            if v.step < c {
                return Err(Error::StepAborted {
                    job: job.to_string(),
                    step: v.step,
                    reason: format!("step {c} is already committed"),
                });
            }
        }
        if !self.ballots.contains_key(&v.step) && self.ballots.len() >= MAX_OPEN_BALLOTS {
            return Err(Error::InvalidRequest {
                what: "step".into(),
                reason: format!("{MAX_OPEN_BALLOTS} steps are already open: ranks are too far apart"),
            });
        }
        Ok(Admission::Open)
    }

    /// The declared layout, when the replica rule applies: the job evacuates, its commits are not
    /// held, and the layout has more than one data-parallel replica and describes the job's world
    /// size. Once the restore is ordered (Restoring, a new generation) it no longer applies.
    fn replica_layout(&self) -> Option<Layout> {
        let l = self.parallel?;
        let applies = self.state == JobState::Evacuating
            && self.hold.is_none()
            && l.dp > 1
            && l.world_size() == u64::from(self.world_size);
        applies.then_some(l)
    }

    /// Whether every faulty rank has a data-parallel replica that is not faulty, under the
    /// replica rule: a step that the healthy ranks save can then still complete.
    fn replicas_cover_faulty(&self) -> bool {
        self.replica_layout().is_some_and(|l| {
            !self.faulty.is_empty() && self.faulty.iter().all(|&f| l.replicas(f).any(|g| !self.faulty.contains(&g)))
        })
    }

    /// Claims `step` for its commit (`committing`) when its ballot is ready: `complete` (every
    /// rank voted), or complete by the replica rule (every rank that did not vote is faulty and
    /// a healthy data-parallel replica of it voted, [`Ballot::replica_cover`]). `None` when the
    /// step is not ready or is being committed already.
    fn claim_commit(&mut self, step: u64, complete: bool) -> Option<Ready> {
        if self.committing.contains(&step) {
            return None;
        }
        let ballot = self.ballots.get(&step)?;
        let cover = if complete {
            BTreeMap::new()
        } else {
            let layout = self.replica_layout()?;
            ballot.replica_cover(&self.faulty, &layout)?
        };
        let (shards, metadata) = ballot.manifest(&cover)?;
        self.committing.insert(step);
        Some(Ready { step, shards, metadata, cover })
    }

    /// Sends `cmd` to the subscribers `pick` selects; drops those whose agent went away.
    fn send(&mut self, cmd: &Command, pick: impl Fn(&Subscriber) -> bool) {
        self.subscribers.retain(|s| !s.tx.is_closed());
        for s in self.subscribers.iter().filter(|s| pick(s)) {
            if let Err(e) = s.tx.try_send(cmd.clone()) {
                tracing::warn!(ranks = ?s.ranks, error = %e, "cannot queue a command for an agent; it resynchronises on reconnect");
            }
        }
    }
}

/// A step claimed for its commit ([`Job::claim_commit`]).
#[derive(Debug)]
struct Ready {
    step: u64,
    /// The MANIFEST entries, one per rank.
    shards: Vec<ShardEntry>,
    /// The MANIFEST metadata.
    metadata: BTreeMap<String, String>,
    /// Faulty rank → the healthy replica whose shard its entry names (empty: every rank voted).
    cover: BTreeMap<u32, u32>,
}

/// What [`Job::admit`] decided about a vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// The vote's step is the job's committed step: a retried vote, answered "committed" once its
    /// shard is checked to be the committed one.
    Committed,
    /// The vote may open or join its step's ballot.
    Open,
}

/// Turns the failed check of a vote's shard against storage into the answer the voter gets: a
/// shard that is missing or differs from the vote is an invalid vote (or, for a committed step, a
/// conflict with the committed shard); a store failure is passed on as it is.
fn refuse_vote(v: &ShardVote, committed: bool, e: ckpt_core::Error) -> Error {
    use ckpt_core::ErrorKind as K;
    let rank = v.vote.rank;
    match e.kind() {
        K::NotFound | K::Corrupt | K::Unsupported | K::InvalidInput if committed => {
            tracing::warn!(job = %v.job, step = v.step, rank, error = %e, "vote for a committed step does not match its shard");
            Error::Core(ckpt_core::Error::Conflict { job: v.job.clone(), step: v.step })
        }
        K::NotFound => Error::InvalidRequest {
            what: "vote".into(),
            reason: format!(
                "rank {rank}'s shard of step {} does not exist on the store: vote only once the shard is durable",
                v.step
            ),
        },
        K::Corrupt | K::Unsupported | K::InvalidInput => Error::InvalidRequest {
            what: "vote".into(),
            reason: format!("rank {rank}'s shard of step {} does not match the vote: {e}", v.step),
        },
        _ => Error::Core(e),
    }
}

/// Whether the evacuation of `job` is over: a step newer than `base` committed, or no open step
/// can still complete (some faulty rank has not voted for it and has no healthy data-parallel
/// replica to cover it, and it is not being committed).
fn snapshots_settled(job: &Job, base: Option<u64>) -> bool {
    if job.committed > base {
        return true;
    }
    if !job.committing.is_empty() {
        return false;
    }
    if job.hold.is_some() {
        // An interrupted save: no step can commit before the restart.
        return true;
    }
    if job.faulty.is_empty() || job.replicas_cover_faulty() {
        // Every rank may still snapshot a new step, or the healthy replicas complete any step
        // the healthy ranks save: only a commit or the bound ends the wait.
        return false;
    }
    !job.ballots.values().any(|b| {
        let voters = b.voters();
        job.faulty.iter().all(|r| voters.contains(r))
    })
}

/// The isolator's shared state. Cheap to share as `Arc<Coordinator>`.
#[derive(Debug)]
pub struct Coordinator {
    jobs: Mutex<HashMap<String, Job>>,
    engines: Mutex<HashMap<String, Engine>>,
    isolated: Mutex<BTreeMap<String, String>>,
    breaker: Mutex<Breaker>,
    recent: Mutex<HashMap<(String, String), Seen>>,
    fencer: Arc<dyn NodeFencer>,
    faults: FaultSink,
    fault_seq: AtomicU64,
    metrics: Arc<Metrics>,
    settings: Settings,
    leader: watch::Receiver<bool>,
    holder: watch::Receiver<String>,
    settled: Notify,
    cancel: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Coordinator {
    /// A coordinator acting through `fencer`, recording faults through `faults`, while `leader`
    /// says this replica leads.
    pub fn new(
        settings: Settings,
        fencer: Arc<dyn NodeFencer>,
        faults: FaultSink,
        metrics: Arc<Metrics>,
        leader: watch::Receiver<bool>,
        holder: watch::Receiver<String>,
        cancel: CancellationToken,
    ) -> Arc<Coordinator> {
        Arc::new(Coordinator {
            jobs: Mutex::new(HashMap::new()),
            engines: Mutex::new(HashMap::new()),
            isolated: Mutex::new(BTreeMap::new()),
            breaker: Mutex::new(Breaker::new(settings.breaker)),
            recent: Mutex::new(HashMap::new()),
            fencer,
            faults,
            fault_seq: AtomicU64::new(0),
            metrics,
            settings,
            leader,
            holder,
            settled: Notify::new(),
            cancel,
        })
    }

    fn ensure_leader(&self) -> Result<()> {
        if *self.leader.borrow() {
            Ok(())
        } else {
            let h = self.holder.borrow().clone();
            Err(Error::NotLeader { holder: if h.is_empty() { "nobody".into() } else { h } })
        }
    }

    fn publish(&self, name: &str, job: &Job) {
        self.metrics.job(name, job.state, job.generation, job.committed, job.detector.stragglers().len());
    }

    async fn engine(&self, url: &str) -> Result<Engine> {
        if let Some(e) = lock(&self.engines).get(url) {
            return Ok(e.clone());
        }
        let u = url.to_string();
        // Store I/O runs on the isolator's runtime: an engine with a runtime of its own could not
        // be dropped from async code.
        let handle = tokio::runtime::Handle::current();
        let engine = tokio::task::spawn_blocking(move || {
            let cfg = EngineConfig::default();
            let store = ckpt_core::Store::open(&u, &cfg.store)?;
            Engine::with_handle(store, cfg, handle)
        })
        .await
        .map_err(|e| Error::Runtime { what: "open the store", reason: e.to_string() })??;
        lock(&self.engines).insert(url.to_string(), engine.clone());
        Ok(engine)
    }

    /// Registers one rank. The first rank of a job fixes its world size and store, and the
    /// newest committed step is read from the store.
    pub async fn register(&self, r: Registration) -> Result<RegisterReply> {
        self.ensure_leader()?;
        let store = self.settings.store_override.clone().unwrap_or_else(|| r.store.clone());
        if store.is_empty() {
            return Err(Error::InvalidRequest {
                what: "store".into(),
                reason: "empty: the agent must send its store URL (or start the isolator with --store)".into(),
            });
        }
        let known = lock(&self.jobs).contains_key(&r.job);
        let latest = if known {
            None
        } else {
            let engine = self.engine(&store).await?;
            let job = r.job.clone();
            let latest = tokio::task::spawn_blocking(move || engine.latest(&job))
                .await
                .map_err(|e| Error::Runtime { what: "read the store", reason: e.to_string() })??;
            Some(latest.map(|m| m.step))
        };
        let mut jobs = lock(&self.jobs);
        let job = jobs.entry(r.job.clone()).or_insert_with(|| Job {
            world_size: r.world_size,
            store: store.clone(),
            state: JobState::Running,
            generation: 0,
            ranks: BTreeMap::new(),
            ballots: BTreeMap::new(),
            committing: BTreeSet::new(),
            committed: latest.flatten(),
            aborted: VecDeque::new(),
            subscribers: Vec::new(),
            pending_restore: None,
            faulty: BTreeSet::new(),
            restored: BTreeSet::new(),
            detector: Detector::new(self.settings.straggler_k, self.settings.straggler_windows),
            parallel: None,
            records: Vec::new(),
            owner_asked: false,
            hold: None,
        });
        if job.world_size != r.world_size {
            return Err(Error::InvalidRequest {
                what: "world_size".into(),
                reason: format!("job `{}` has world size {}, not {}", r.job, job.world_size, r.world_size),
            });
        }
        if job.store != store {
            return Err(Error::InvalidRequest {
                what: "store".into(),
                reason: format!("job `{}` writes to another store than this rank", r.job),
            });
        }
        if r.generation > job.generation && job.pending_restore.is_none() {
            // A new leader learns the generation from the agents that re-register.
            tracing::warn!(job = %r.job, rank = r.rank, generation = r.generation, "adopting the generation an agent reports");
            job.generation = r.generation;
        }
        if r.parallel.is_some() {
            job.parallel = r.parallel;
        }
        if !job.owner_asked && !r.pod.is_empty() && !r.namespace.is_empty() {
            job.owner_asked = self.faults.pod(&r.job, PodRef { namespace: r.namespace.clone(), name: r.pod.clone() });
        }
        job.ranks.insert(
            r.rank,
            Rank { node: r.node, pod: r.pod, namespace: r.namespace, step_ms: 0, step: None, phase: None },
        );
        tracing::info!(job = %r.job, rank = r.rank, world_size = r.world_size, generation = job.generation, "rank registered");
        let reply = RegisterReply {
            generation: job.generation,
            has_committed: job.committed.is_some(),
            committed_step: job.committed.unwrap_or(0),
        };
        self.publish(&r.job, job);
        Ok(reply)
    }

    fn with_job<T>(&self, name: &str, f: impl FnOnce(&mut Job) -> Result<T>) -> Result<T> {
        let mut jobs = lock(&self.jobs);
        let job = jobs.get_mut(name).ok_or_else(|| Error::UnknownJob { job: format!("{name:.253}") })?;
        let out = f(job);
        self.publish(name, job);
        out
    }

    /// Records a rank's progress; during a restore, a heartbeat at the new generation counts as
    /// that rank being back.
    pub fn heartbeat(&self, h: Heartbeat) -> Result<HeartbeatAck> {
        self.ensure_leader()?;
        let mut resumed = Vec::new();
        let ack = self.with_job(&h.job, |job| {
            job.check_rank(h.rank)?;
            job.check_generation(&h.job, h.generation)?;
            if let Some(r) = job.ranks.get_mut(&h.rank) {
                // A heartbeat repeating the step is a phase change: it measured no step.
                if r.step != Some(h.step) {
                    r.step_ms = u64::try_from(h.step_time.as_millis()).unwrap_or(u64::MAX);
                }
                r.step = Some(h.step);
                if h.phase.is_some() {
                    r.phase = h.phase;
                }
            }
            if job.state == JobState::Restoring {
                job.restored.insert(h.rank);
                if job.restored.len() as u64 >= u64::from(job.world_size)
                    && let Some(next) = job.state.on(Event::AllRanksRestored)
                {
                    job.state = next;
                    job.pending_restore = None;
                    job.restored.clear();
                    resumed = std::mem::take(&mut job.records);
                    tracing::warn!(job = %h.job, generation = job.generation, "every rank restored: running");
                }
            }
            Ok(HeartbeatAck { generation: job.generation })
        })?;
        let at = now_ms();
        for mut rec in resumed {
            rec.resumed_at = Some(at);
            self.faults.send(&rec, Stage::Resumed);
        }
        Ok(ack)
    }

    /// Takes a fault report: isolates the node when the action asks for it (within the circuit
    /// breaker), and starts a coordinated restore when the job was running. A report of a fault
    /// that an alert already reported on the node (same kind, within the dedupe window, no
    /// stronger action) is acknowledged without acting again.
    pub async fn report_fault(self: &Arc<Self>, f: Fault) -> Result<FaultAck> {
        self.ensure_leader()?;
        self.with_job(&f.job, |job| {
            for &r in &f.ranks {
                job.check_rank(r)?;
            }
            job.check_generation(&f.job, f.generation)
        })?;
        if !f.node.is_empty()
            && let Err(seen) = self.claim(&f.node, &f.kind, f.action, false)
        {
            let note = format!(
                "already acted on: an alert reported {} on node {} {} s ago",
                crate::text::peer(&f.kind),
                f.node,
                seen.at.elapsed().as_secs()
            );
            tracing::info!(job = %f.job, node = %f.node, kind = %crate::text::peer(&f.kind), "fault report deduplicated against an alert");
            return Ok(FaultAck { action: FaultAction::from(seen.action) as i32, note });
        }
        self.act(f).await
    }

    /// Records that `kind` on `node` is being acted on, unless a fault it duplicates was: within
    /// the dedupe window, an alert is a duplicate of any earlier report of the fault, an agent's
    /// report only of an earlier alert, and a stronger action is never a duplicate.
    fn claim(&self, node: &str, kind: &str, action: Action, from_alert: bool) -> std::result::Result<(), Seen> {
        let now = Instant::now();
        let window = self.settings.dedupe_window;
        let mut recent = lock(&self.recent);
        let key = (node.to_string(), kind.to_string());
        if let Some(seen) = recent.get(&key)
            && now.duration_since(seen.at) < window
            && seen.action >= action
            && (from_alert || seen.from_alert)
        {
            return Err(*seen);
        }
        if recent.len() >= RECENT_FAULTS {
            recent.retain(|_, s| now.duration_since(s.at) < window);
            if recent.len() >= RECENT_FAULTS
                && let Some(oldest) = recent.iter().min_by_key(|(_, s)| s.at).map(|(k, _)| k.clone())
            {
                recent.remove(&oldest);
            }
        }
        recent.insert(key, Seen { at: now, action, from_alert });
        Ok(())
    }

    /// The node whose provider id names the cloud instance `instance`, if any.
    pub async fn node_of_instance(&self, instance: &str) -> Result<Option<String>> {
        self.fencer.node_of_instance(instance).await
    }

    /// Takes a firing alert already mapped to a node and a finding: it goes, as an agent's report
    /// of the same finding would, to every job with ranks on the node, unless it duplicates a
    /// fault reported on the node within the dedupe window.
    pub async fn report_alert(self: &Arc<Self>, a: AlertFault) -> Result<AlertReply> {
        self.ensure_leader()?;
        let reply = |outcome, note: String| AlertReply { outcome, jobs: Vec::new(), note };
        if a.action == Action::Ignore {
            return Ok(reply(AlertOutcome::Ignored, format!("the policy ignores {}", a.kind)));
        }
        let faults: Vec<Fault> = {
            let jobs = lock(&self.jobs);
            let mut names: Vec<&String> = jobs.keys().collect();
            names.sort();
            names
                .into_iter()
                .filter_map(|name| {
                    let job = &jobs[name];
                    let on_node: Vec<(&u32, &Rank)> = job.ranks.iter().filter(|(_, r)| r.node == a.node).collect();
                    let first = on_node.first()?.1;
                    Some(Fault {
                        job: name.clone(),
                        ranks: on_node.iter().map(|(r, _)| **r).collect(),
                        generation: job.generation,
                        node: a.node.clone(),
                        pod: first.pod.clone(),
                        source: a.source.clone(),
                        kind: a.kind.clone(),
                        action: a.action,
                        evidence: a.evidence.clone(),
                        phase: None,
                    })
                })
                .collect()
        };
        if faults.is_empty() {
            tracing::warn!(node = %a.node, kind = %a.kind, source = %a.source, "alert for a node without registered ranks: recorded, not acted on");
            return Ok(reply(AlertOutcome::NoJob, format!("no registered job has a rank on node {}", a.node)));
        }
        if let Err(seen) = self.claim(&a.node, &a.kind, a.action, true) {
            let by = if seen.from_alert { "an alert" } else { "an agent" };
            tracing::info!(node = %a.node, kind = %a.kind, source = %a.source, "alert deduplicated");
            return Ok(reply(
                AlertOutcome::Duplicate,
                format!("{by} reported {} on node {} {} s ago", a.kind, a.node, seen.at.elapsed().as_secs()),
            ));
        }
        tracing::warn!(node = %a.node, kind = %a.kind, action = %a.action, source = %a.source, jobs = faults.len(), "alert acted on");
        let mut jobs = Vec::with_capacity(faults.len());
        for f in faults {
            let job = f.job.clone();
            let ack = match self.act(f).await {
                Ok(ack) => ack,
                Err(e) => FaultAck { action: FaultAction::Unspecified as i32, note: format!("not acted on: {e}") },
            };
            jobs.push((job, ack));
        }
        Ok(AlertReply { outcome: AlertOutcome::Acted, jobs, note: String::new() })
    }

    /// Acts on a validated fault of a registered job (see [`report_fault`](Self::report_fault)).
    async fn act(self: &Arc<Self>, f: Fault) -> Result<FaultAck> {
        let hardware = repair::is_hardware_class(&f.kind);
        let detected = now_ms();
        let (start_cycle, joined, phase, pod, handling, rule_note, rank_phase) = self.with_job(&f.job, |job| {
            for &r in &f.ranks {
                job.check_rank(r)?;
            }
            job.check_generation(&f.job, f.generation)?;
            let pod = job
                .ranks
                .values()
                .find(|r| !f.pod.is_empty() && r.pod == f.pod)
                .or_else(|| f.ranks.first().and_then(|r| job.ranks.get(r)))
                .filter(|r| !r.pod.is_empty() && !r.namespace.is_empty())
                .map(|r| PodRef { namespace: r.namespace.clone(), name: r.pod.clone() });
            let rank_phase = f
                .phase
                .or_else(|| handling::fault_phase(f.ranks.iter().map(|r| job.ranks.get(r).and_then(|r| r.phase))));
            let handling = handling::decide(f.action, rank_phase, hardware);
            let action = handling.action;
            let phase = job.state.name();
            let next = job.state.on(Event::Fault(action));
            let joined = next.is_some() || job.state != JobState::Running;
            if joined {
                job.faulty.extend(f.ranks.iter().copied());
            }
            let rule_note = match handling.rule {
                Rule::Policy => None,
                Rule::StartWithoutHardware => Some(format!(
                    "fault during {} without hardware evidence: restart without isolating ({} asked)",
                    rank_phase.map_or("start-up", ckpt_core::Phase::as_str),
                    f.action
                )),
                Rule::InterruptedSave if joined => Some(Self::hold_commits(&f, job)),
                Rule::InterruptedSave => None,
            };
            if let Some(next) = next {
                tracing::warn!(job = %crate::text::peer(&f.job), kind = %crate::text::peer(&f.kind), node = %f.node, action = ?action, phase = ?rank_phase, "fault: {} -> {}", job.state.name(), next.name());
                job.state = next;
            }
            Ok((next.is_some(), joined, phase, pod, handling, rule_note, rank_phase))
        })?;
        let action = handling.action;
        let seq = self.fault_seq.fetch_add(1, Ordering::Relaxed);
        let mut rec = FaultRecord::new(
            seq,
            detected,
            &f.job,
            &f.ranks,
            &f.node,
            &f.source,
            &f.kind,
            &f.evidence,
            phase,
            f.action,
        );
        rec.fault_phase = rank_phase.map(|p| p.as_str().to_string()).unwrap_or_default();
        if let Some(p) = &pod {
            rec.pod.clone_from(&p.name);
            rec.namespace.clone_from(&p.namespace);
        }
        let mut taken = action;
        let mut note = String::new();
        let mut repair_request = None;
        if handling.isolate {
            let iso = Isolation {
                node: f.node.clone(),
                reason: taint_value(&f.kind),
                job: f.job.clone(),
                source: f.source.clone(),
                evidence: f.evidence.clone(),
                pod,
            };
            match self.isolate(&iso).await {
                Ok(true) => {
                    rec.isolated_at = Some(now_ms());
                    note = format!("node {} isolated", f.node);
                    repair_request = self.repair_request(&mut rec, action).await;
                }
                Ok(false) => {
                    taken = Action::RestartJob;
                    note = format!("circuit breaker open: node {} not isolated, alert only", f.node);
                }
                Err(e) => {
                    taken = Action::RestartJob;
                    tracing::error!(node = %f.node, error = %e, "isolation failed");
                    note = format!("isolation of node {} failed: {e}", f.node);
                }
            }
        } else if !start_cycle && action != Action::Ignore {
            note = "folded into the restore in progress".into();
        }
        if let Some(rule) = rule_note {
            note = if note.is_empty() { rule } else { format!("{rule}; {note}") };
        }
        rec.decision = taken;
        rec.note.clone_from(&note);
        if joined {
            let _ = self.with_job(&f.job, |job| {
                if job.records.len() >= OPEN_RECORDS {
                    job.records.remove(0);
                }
                job.records.push(rec.clone());
                Ok(())
            });
        }
        self.faults.send(&rec, Stage::Detected);
        if let (Some(req), Some(r)) = (repair_request, &self.settings.repair)
            && !r.submit(req, rec.repair.as_ref().and_then(|r| r.requested_at).unwrap_or(detected))
        {
            let mut failed = Repair::requested(action, detected);
            failed.outcome = repair::RepairOutcome::Unreachable;
            failed.note = "the repair request queue was full".into();
            self.faults.repair(&rec.job, &rec.id, failed);
        }
        if start_cycle {
            let span = tracing::info_span!("isolator-restore", job = %f.job);
            tokio::spawn(self.clone().recover(f.job.clone()).instrument(span));
        }
        Ok(FaultAck { action: FaultAction::from(taken) as i32, note })
    }

    /// A fault during `checkpoint-save` ([`Rule::InterruptedSave`]): aborts every open ballot not
    /// already being committed (a ballot being committed has a voted shard for every rank, its own
    /// or a healthy replica's: that step was saved, not interrupted) and the steps the faulty ranks
    /// were saving, and holds the job's commits until the restart, so the restore uses the last
    /// committed step. Returns the note.
    fn hold_commits(f: &Fault, job: &mut Job) -> String {
        let committed = job.committed;
        let mut steps: BTreeSet<u64> = job.ballots.keys().filter(|s| !job.committing.contains(s)).copied().collect();
        steps.extend(f.ranks.iter().filter_map(|r| job.ranks.get(r)?.step).filter(|s| Some(*s) > committed));
        let steps: Vec<u64> = steps.into_iter().collect();
        let last = committed.map_or_else(
            || "no step is committed: the restore starts from scratch".to_string(),
            |c| format!("the restore uses the last committed step {c}"),
        );
        let why = format!("a fault during checkpoint-save interrupted steps {steps:?}");
        for &step in &steps {
            job.abort(&f.job, step, why.clone());
        }
        if job.hold.is_none() {
            job.hold = Some(format!("{why}: no step commits before the restart"));
        }
        format!("fault during checkpoint-save: steps {steps:?} never commit, {last}")
    }

    /// Decides on a repair request for `rec`'s node, just isolated for a fault that asked for
    /// `action`: only for hardware classes ([`repair::is_hardware`]), with `--repair-url`, when no
    /// repair of the node is in flight, and within the breaker. Notes the decision in the record
    /// and returns the request to send once the record is queued.
    async fn repair_request(&self, rec: &mut FaultRecord, action: Action) -> Option<RepairRequest> {
        let repairer = self.settings.repair.as_ref()?;
        if !repair::is_hardware(&rec.kind, action) || repairer.is_pending(&rec.node) {
            return None;
        }
        let nodes = match self.fencer.node_count().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot count the nodes: the repair limit counts one");
                1
            }
        };
        if !lock(&self.breaker).try_acquire_repair(Instant::now().into_std(), nodes) {
            tracing::error!(node = %rec.node, record = %rec.id, "circuit breaker: repair request refused");
            rec.repair = Some(Repair::rate_limited(action));
            return None;
        }
        rec.repair = Some(Repair::requested(action, now_ms()));
        Some(RepairRequest::new(rec, action))
    }

    /// Isolates a node through the fencer, within the breaker. `Ok(false)`: the breaker refused.
    pub async fn isolate(&self, iso: &Isolation) -> Result<bool> {
        let again = lock(&self.isolated).contains_key(&iso.node);
        if !again {
            let nodes = self.fencer.node_count().await?;
            let allowed = lock(&self.breaker).try_acquire(Instant::now().into_std(), nodes);
            if !allowed {
                self.metrics.circuit_open(true);
                tracing::error!(node = %iso.node, reason = %iso.reason, "circuit breaker open: isolation refused, alert only");
                let notice = Notice {
                    subject: Subject::Node(iso.node.clone()),
                    reason: "IsolationRefused".into(),
                    message: format!(
                        "ckptd circuit breaker: too many nodes isolated recently; not isolating ({}: {:.256})",
                        iso.reason, iso.evidence
                    ),
                };
                if let Err(e) = self.fencer.notice(&notice).await {
                    tracing::warn!(error = %e, "cannot record the refused isolation as an Event");
                }
                return Ok(false);
            }
            self.metrics.circuit_open(false);
        }
        self.fencer.isolate(iso).await?;
        let n = {
            let mut isolated = lock(&self.isolated);
            isolated.insert(iso.node.clone(), iso.job.clone());
            isolated.len()
        };
        self.metrics.isolated_nodes(n);
        Ok(true)
    }

    /// Undoes an isolation (operator's `ckptctl release`); a repair of the node in flight is
    /// forgotten, so the node's next hardware fault requests a new one.
    pub async fn release(&self, node: &str) -> Result<bool> {
        self.ensure_leader()?;
        check_name("node", node, true)?;
        let released = self.release_node(node).await?;
        if let Some(r) = &self.settings.repair {
            r.forget(node);
        }
        Ok(released)
    }

    /// The repair system reports `node` fixed: releases it as [`release`](Self::release) does
    /// and stamps the repair time on the fault record of the repair (requested by this isolator,
    /// or by an earlier leader: then found in the stored records).
    /// `Ok(None)` when the node is not isolated by ckptd. A `ticket` other than the one the repair
    /// system answered with is refused.
    pub async fn repaired(&self, node: &str, ticket: Option<&str>) -> Result<Option<RepairDone>> {
        self.ensure_leader()?;
        check_name("node", node, true)?;
        let pending = match self.settings.repair.as_ref().and_then(|r| r.pending(node)) {
            Some(p) => Some(p),
            None => repair::find_stored_repair(self.faults.log().as_ref(), node).await,
        };
        if let (Some(got), Some(want)) = (ticket, pending.as_ref().and_then(|p| p.ticket.as_deref()))
            && got != want
        {
            return Err(Error::InvalidRequest {
                what: "ticket".into(),
                reason: format!("`{}` is not the ticket of node {node}'s repair", crate::text::capped(got, 128)),
            });
        }
        if !self.release_node(node).await? {
            return Ok(None);
        }
        let at = now_ms();
        let pending = self.settings.repair.as_ref().and_then(|r| r.forget(node)).or(pending);
        if let Some(p) = &pending {
            self.faults.repaired(&p.job, &p.record, at);
        }
        tracing::warn!(node, record = ?pending.as_ref().map(|p| &p.record), "node repaired and released");
        Ok(Some(RepairDone { record: pending.as_ref().map(|p| p.record.clone()), job: pending.map(|p| p.job), at }))
    }

    async fn release_node(&self, node: &str) -> Result<bool> {
        let on_node = self.fencer.release(node).await?;
        let n = {
            let mut isolated = lock(&self.isolated);
            let ours = isolated.remove(node).is_some();
            (ours || on_node, isolated.len())
        };
        self.metrics.isolated_nodes(n.1);
        Ok(n.0)
    }

    /// The coordinated restore of one job, from Degraded to Restoring.
    async fn recover(self: Arc<Self>, name: String) {
        // Degraded: the isolation ran before this task started (or was refused or not needed).
        let snapshot = self.with_job(&name, |job| {
            let Some(next) = job.state.on(Event::Isolated) else { return Ok(None) };
            job.state = next;
            let faulty = job.faulty.clone();
            if job.hold.is_none() {
                let deadline_ms = self.settings.snapshot_timeout.as_millis() as u64;
                let snap = Command {
                    command: Some(command::Command::SnapshotNow(SnapshotNowCommand {
                        reason: format!("fault on ranks {faulty:?}"),
                        deadline_ms,
                    })),
                };
                job.send(&snap, |s| s.ranks.iter().any(|r| !faulty.contains(r)));
            }
            let stop = Command {
                command: Some(command::Command::Stop(StopCommand { reason: "this rank's node is faulty".into() })),
            };
            job.send(&stop, |s| !s.ranks.is_empty() && s.ranks.iter().all(|r| faulty.contains(r)));
            tracing::warn!(job = %name, "evacuating: healthy ranks snapshot now");
            // A step that the healthy ranks voted before the fault may be complete by the replica
            // rule already: the newest such step commits now, since no vote may come for it.
            let steps: Vec<u64> = job.ballots.keys().rev().copied().collect();
            let ready = steps.into_iter().find_map(|s| job.claim_commit(s, false));
            Ok(Some((job.committed, job.store.clone(), job.world_size, ready)))
        });
        let Ok(Some((base, store, world, ready))) = snapshot else { return };
        if let Some(ready) = ready {
            let step = ready.step;
            let committed = match self.engine(&store).await {
                Ok(engine) => self.commit(&name, engine, world, ready).await,
                Err(e) => {
                    let _ = self.with_job(&name, |job| {
                        job.committing.remove(&step);
                        Ok(())
                    });
                    Err(e)
                }
            };
            if let Err(e) = committed {
                tracing::error!(job = %name, step, error = %e, "cannot commit the step its healthy replicas completed");
            }
        }
        // Evacuating: the emergency snapshots can only commit a step that every faulty rank
        // already voted for, or that healthy data-parallel replicas complete (section "Handling
        // by layout" of docs/ISOLATOR.md), or, with no faulty rank, any new step. Wait, with a
        // bound, until a newer step commits or no such step can complete any more.
        let until = Instant::now() + self.settings.snapshot_timeout;
        loop {
            let notified = self.settled.notified();
            let settled = lock(&self.jobs).get(&name).is_none_or(|j| snapshots_settled(j, base));
            if settled {
                break;
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(until) => break,
                () = self.cancel.cancelled() => return,
            }
        }
        let restarted = self.with_job(&name, |job| {
            let Some(next) = job.state.on(Event::SnapshotsSettled) else { return Ok(Vec::new()) };
            job.state = next;
            let generation = job.generation.saturating_add(1);
            // Aborted at the old generation: the restarted job may save these step numbers again.
            let open: Vec<u64> = job.ballots.keys().copied().collect();
            for step in open {
                job.abort(&name, step, format!("the job restarts at generation {generation}"));
            }
            job.generation = generation;
            job.faulty.clear();
            job.restored.clear();
            job.hold = None;
            for r in job.ranks.values_mut() {
                // Unknown until each rank heartbeats at the new generation.
                r.phase = None;
            }
            let restore = RestoreCommand {
                step: job.committed.unwrap_or(0),
                generation,
                from_scratch: job.committed.is_none(),
            };
            tracing::warn!(job = %name, generation, step = restore.step, from_scratch = restore.from_scratch, "restoring every rank");
            job.pending_restore = Some(restore);
            let cmd = Command { command: Some(command::Command::Restore(restore)) };
            job.send(&cmd, |_| true);
            let at = now_ms();
            for r in job.records.iter_mut().filter(|r| r.restart_at.is_none()) {
                r.restart_at = Some(at);
                r.generation = Some(generation);
            }
            Ok(job.records.clone())
        });
        self.settled.notify_waiters();
        for rec in restarted.unwrap_or_default() {
            self.faults.send(&rec, Stage::Restarted);
        }
    }

    /// Counts a durable vote; the vote that completes the step writes its MANIFEST. Returns
    /// whether the step is committed.
    ///
    /// A vote is counted only once the shard it names has been read from the store and matches
    /// it (exists, written for the job's world size, same length, index crc32c and region
    /// length); a vote that does not is refused and changes nothing, so a lying peer can neither
    /// commit a step nor open or abort a ballot. The MANIFEST is written only after every shard is
    /// read again ([`ckpt_core::Engine::commit_verified`]).
    pub async fn vote(&self, v: ShardVote) -> Result<bool> {
        self.ensure_leader()?;
        let (store, admission) = self.with_job(&v.job, |job| Ok((job.store.clone(), job.admit(&v.job, &v)?)))?;
        let engine = self.engine(&store).await?;
        let checked = {
            let (engine, job, step, world, entry) =
                (engine.clone(), v.job.clone(), v.step, v.world_size, v.vote.entry.clone());
            tokio::task::spawn_blocking(move || engine.verify_shard_entry(&job, step, world, &entry))
                .await
                .map_err(|e| Error::Runtime { what: "read a voted shard", reason: e.to_string() })?
        };
        if let Err(e) = checked {
            let err = refuse_vote(&v, admission == Admission::Committed, e);
            tracing::warn!(job = %v.job, step = v.step, rank = v.vote.rank, error = %err, "vote refused");
            return Err(err);
        }
        // The job may have moved while the shard was read: admit the vote again before counting.
        let ready = self.with_job(&v.job, |job| {
            if job.admit(&v.job, &v)? == Admission::Committed {
                return Ok(None);
            }
            let world = job.world_size;
            let ballot =
                job.ballots.entry(v.step).or_insert_with(|| Ballot::new(v.step, world, Instant::now().into_std()));
            let complete = ballot.add(v.vote.clone())? == Tally::Complete;
            Ok(Some(job.claim_commit(v.step, complete)))
        })?;
        match ready {
            None => Ok(true),
            Some(None) => Ok(false),
            Some(Some(ready)) => self.commit(&v.job, engine, v.world_size, ready).await,
        }
    }

    /// Writes the MANIFEST of a step claimed by [`Job::claim_commit`], re-reading every shard
    /// ([`ckpt_core::Engine::commit_verified`]); on success older open steps are aborted, on
    /// failure the step is. A step completed by replicas is noted in the recovery's fault records.
    async fn commit(&self, name: &str, engine: Engine, world: u32, ready: Ready) -> Result<bool> {
        let Ready { step, shards, metadata, cover } = ready;
        let job = name.to_string();
        let outcome = tokio::task::spawn_blocking(move || engine.commit_verified(&job, step, world, shards, metadata))
            .await
            .map_err(|e| Error::Runtime { what: "commit the step", reason: e.to_string() })
            .and_then(|r| r.map_err(Error::from));
        let result = self.with_job(name, |job| {
            job.committing.remove(&step);
            match outcome {
                Ok(_) => {
                    job.ballots.remove(&step);
                    job.committed = Some(job.committed.map_or(step, |c| c.max(step)));
                    let older: Vec<u64> = job.ballots.range(..step).map(|(s, _)| *s).collect();
                    for s in older {
                        job.abort(name, s, format!("the newer step {step} committed first"));
                    }
                    if cover.is_empty() {
                        tracing::info!(job = %name, step, "step committed globally");
                    } else {
                        let from: Vec<String> = cover.iter().map(|(f, g)| format!("rank {f} from rank {g}")).collect();
                        let note = format!(
                            "step {step} committed with faulty ranks' shards from healthy data-parallel replicas ({})",
                            from.join(", ")
                        );
                        tracing::warn!(job = %name, step, cover = ?cover, "step committed globally, faulty ranks' shards taken from their data-parallel replicas");
                        for rec in job.records.iter_mut().filter(|r| r.restart_at.is_none()) {
                            rec.note = if rec.note.is_empty() { note.clone() } else { format!("{}; {note}", rec.note) };
                        }
                    }
                    Ok(true)
                }
                Err(e) => {
                    job.abort(name, step, format!("commit failed: {e}"));
                    Err(e)
                }
            }
        });
        self.settled.notify_waiters();
        result
    }

    /// Subscribes an agent to the commands for its ranks. An agent behind the job's generation
    /// first gets the pending restore, so a reconnect never misses it.
    pub fn subscribe(&self, req: Subscription) -> Result<mpsc::Receiver<Command>> {
        self.ensure_leader()?;
        self.with_job(&req.job, |job| {
            for &r in &req.ranks {
                job.check_rank(r)?;
            }
            if req.generation > job.generation {
                return Err(Error::InvalidRequest {
                    what: "generation".into(),
                    reason: format!("{} is ahead of the job's generation {}", req.generation, job.generation),
                });
            }
            let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
            if let Some(restore) = job.pending_restore
                && req.generation < restore.generation
            {
                let _ = tx.try_send(Command { command: Some(command::Command::Restore(restore)) });
            }
            job.subscribers.retain(|s| !s.tx.is_closed());
            job.subscribers.push(Subscriber { ranks: req.ranks.clone(), tx });
            Ok(rx)
        })
    }

    /// The stored fault records of `job`, oldest first (`ckptctl faults`). Read from the log, not
    /// from this replica's memory, so any replica answers and a new leader sees its
    /// predecessors' records.
    pub async fn faults(&self, job: &str) -> Result<Vec<FaultRecord>> {
        check_name("job", job, true)?;
        self.faults.log().list(job).await
    }

    /// Every job's status, for `ckptctl jobs`.
    pub fn list(&self) -> Vec<JobStatus> {
        let isolated = lock(&self.isolated).clone();
        let jobs = lock(&self.jobs);
        let mut out: Vec<JobStatus> = jobs
            .iter()
            .map(|(name, j)| JobStatus {
                job: name.clone(),
                state: j.state.name().to_string(),
                generation: j.generation,
                has_committed: j.committed.is_some(),
                committed_step: j.committed.unwrap_or(0),
                world_size: j.world_size,
                registered: j.ranks.len() as u32,
                isolated_nodes: isolated.iter().filter(|(_, job)| *job == name).map(|(n, _)| n.clone()).collect(),
                stragglers: j.detector.stragglers(),
                connected_agents: j.subscribers.iter().filter(|s| !s.tx.is_closed()).count() as u32,
                parallel: j.parallel.map(Into::into),
            })
            .collect();
        out.sort_by(|a, b| a.job.cmp(&b.job));
        out
    }

    /// Aborts every ballot older than the commit deadline. Returns how many were aborted.
    pub fn sweep_deadlines(&self) -> usize {
        let deadline = self.settings.commit_deadline;
        let now = Instant::now().into_std();
        let mut n = 0;
        {
            let mut jobs = lock(&self.jobs);
            for (name, job) in jobs.iter_mut() {
                let late: Vec<(u64, Vec<u32>)> = job
                    .ballots
                    .iter()
                    .filter(|(s, b)| !job.committing.contains(s) && now.duration_since(b.opened) >= deadline)
                    .map(|(s, b)| (*s, b.voters()))
                    .collect();
                for (step, voters) in late {
                    let missing: Vec<u32> = (0..job.world_size).filter(|r| !voters.contains(r)).take(16).collect();
                    job.abort(name, step, format!("deadline of {deadline:?} passed; ranks missing: {missing:?}"));
                    n += 1;
                }
            }
        }
        if n > 0 {
            self.settled.notify_waiters();
        }
        n
    }

    /// Closes one straggler window of every running job and reports new stragglers.
    pub async fn straggler_window(&self) {
        let mut notices = Vec::new();
        {
            let mut jobs = lock(&self.jobs);
            for (name, job) in jobs.iter_mut() {
                if job.state != JobState::Running {
                    continue;
                }
                let times: BTreeMap<u32, u64> = job.ranks.iter().map(|(r, i)| (*r, i.step_ms)).collect();
                for rank in job.detector.window(&times) {
                    let Some(info) = job.ranks.get(&rank) else { continue };
                    tracing::warn!(job = %name, rank, node = %info.node, step_ms = info.step_ms, "straggler");
                    let subject = if info.pod.is_empty() || info.namespace.is_empty() {
                        Subject::Node(info.node.clone())
                    } else {
                        Subject::Pod(PodRef { namespace: info.namespace.clone(), name: info.pod.clone() })
                    };
                    notices.push(Notice {
                        subject,
                        reason: "Straggler".into(),
                        message: format!(
                            "rank {rank} of job {name} on node {} runs {} ms per step, over {}x the job median for {} windows",
                            info.node, info.step_ms, self.settings.straggler_k, self.settings.straggler_windows
                        ),
                    });
                }
                self.publish(name, job);
            }
        }
        if !*self.leader.borrow() {
            return;
        }
        for n in notices {
            if let Err(e) = self.fencer.notice(&n).await {
                tracing::warn!(error = %e, "cannot record a straggler Event");
            }
        }
    }

    /// The background loops: deadline sweeps and straggler windows, until shutdown.
    pub async fn run_background(self: Arc<Self>) {
        let sweep_every = (self.settings.commit_deadline / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
        let mut sweep = tokio::time::interval(sweep_every);
        let mut window = tokio::time::interval(self.settings.straggler_window.max(Duration::from_millis(10)));
        window.tick().await;
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => return,
                _ = sweep.tick() => { self.sweep_deadlines(); }
                _ = window.tick() => self.straggler_window().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ckptd_proto::v1::{DurableVote, FaultReport, RegisterRequest};

    use super::*;
    use crate::isolator::faults::MemoryFaultLog;
    use crate::isolator::fencer::MemoryFencer;

    fn settings(max_isolated: u32, store: &str) -> Settings {
        Settings {
            commit_deadline: Duration::from_secs(60),
            snapshot_timeout: Duration::from_secs(60),
            straggler_k: 1.5,
            straggler_windows: 3,
            straggler_window: Duration::from_secs(30),
            store_override: Some(store.into()),
            breaker: BreakerConfig { max_isolated, max_fraction: 1.0, window: Duration::from_secs(3600) },
            dedupe_window: Duration::from_secs(300),
            repair: None,
        }
    }

    fn coordinator(leads: bool, fencer: Arc<MemoryFencer>, max_isolated: u32) -> Arc<Coordinator> {
        coordinator_on(leads, fencer, max_isolated, "memory://")
    }

    fn coordinator_on(leads: bool, fencer: Arc<MemoryFencer>, max_isolated: u32, store: &str) -> Arc<Coordinator> {
        let (_l, leader) = watch::channel(leads);
        let (_h, holder) = watch::channel("other".to_string());
        let faults = FaultSink::spawn(Arc::new(MemoryFaultLog::new()), 50, None, CancellationToken::new());
        Coordinator::new(
            settings(max_isolated, store),
            fencer,
            faults,
            Arc::new(Metrics::new()),
            leader,
            holder,
            CancellationToken::new(),
        )
    }

    async fn register(c: &Coordinator, job: &str, rank: u32, world: u32, node: &str) {
        let r = RegisterRequest {
            job: job.into(),
            rank,
            world_size: world,
            node: node.into(),
            pod: format!("{job}-{rank}"),
            namespace: "ns".into(),
            ..Default::default()
        };
        c.register(Registration::try_from(&r).unwrap()).await.unwrap();
    }

    fn drain(job: &str, node: &str) -> Fault {
        let f = FaultReport {
            job: job.into(),
            ranks: vec![0],
            node: node.into(),
            kind: "xid-79".into(),
            action: FaultAction::DrainNode as i32,
            ..Default::default()
        };
        Fault::try_from(&f).unwrap()
    }

    #[tokio::test]
    async fn isolation_goes_through_the_fencer_within_the_breaker() {
        let fencer = Arc::new(MemoryFencer::new(8));
        let c = coordinator(true, fencer.clone(), 1);
        register(&c, "a", 0, 1, "n1").await;
        register(&c, "b", 0, 1, "n2").await;
        let ack = c.report_fault(drain("a", "n1")).await.unwrap();
        assert_eq!(ack.action, FaultAction::DrainNode as i32);
        assert_eq!(c.list()[0].state, "Degraded");
        let rec = fencer.record();
        assert!(rec.isolated.contains_key("n1"));
        assert!(rec.deleted_pods.contains(&PodRef { namespace: "ns".into(), name: "a-0".into() }));
        // The second node exceeds the breaker: alert only, and the job still restarts.
        let ack = c.report_fault(drain("b", "n2")).await.unwrap();
        assert_eq!(ack.action, FaultAction::RestartJob as i32, "{}", ack.note);
        let rec = fencer.record();
        assert!(!rec.isolated.contains_key("n2"));
        assert_eq!(rec.notices.len(), 1);
        assert_eq!(rec.notices[0].reason, "IsolationRefused");
        // Repeating the first isolation is not a new one for the breaker.
        let again = c.isolate(&rec.isolated["n1"]).await.unwrap();
        assert!(again);
        assert_eq!(fencer.record().isolations, 1);
        assert!(c.release("n1").await.unwrap());
        assert!(c.list().iter().all(|j| j.isolated_nodes.is_empty()));
    }

    #[tokio::test]
    async fn a_fault_is_recorded_from_detection_to_resume() {
        let fencer = Arc::new(MemoryFencer::new(8));
        let log = Arc::new(MemoryFaultLog::new());
        let (_l, leader) = watch::channel(true);
        let (_h, holder) = watch::channel(String::new());
        let sink = FaultSink::spawn(log.clone(), 50, None, CancellationToken::new());
        let c = Coordinator::new(
            settings(4, "memory://"),
            fencer,
            sink,
            Arc::new(Metrics::new()),
            leader,
            holder,
            CancellationToken::new(),
        );
        register(&c, "a", 0, 2, "n1").await;
        register(&c, "a", 1, 2, "n2").await;
        let ack = c.report_fault(drain("a", "n1")).await.unwrap();
        assert_eq!(ack.action, FaultAction::DrainNode as i32);
        let stored = |want: fn(&FaultRecord) -> bool| {
            let c = c.clone();
            async move {
                for _ in 0..10_000 {
                    let r = c.faults("a").await.unwrap();
                    if r.first().is_some_and(want) {
                        return r;
                    }
                    tokio::task::yield_now().await;
                }
                panic!("the record never reached that stage: {:?}", c.faults("a").await.unwrap())
            }
        };
        let r = stored(|r| r.restart_at.is_some()).await;
        assert_eq!(r.len(), 1);
        let r = &r[0];
        assert_eq!((r.job.as_str(), r.node.as_str(), r.kind.as_str()), ("a", "n1", "xid-79"));
        assert_eq!((r.pod.as_str(), r.namespace.as_str(), r.phase.as_str()), ("a-0", "ns", "Running"));
        assert_eq!((r.requested, r.decision, r.generation), (Action::DrainNode, Action::DrainNode, Some(1)));
        assert!(r.isolated_at >= r.detected_at && r.restart_at >= r.isolated_at, "{r:?}");
        assert!(r.resumed_at.is_none());
        for rank in [0, 1] {
            let hb = Heartbeat {
                job: "a".into(),
                rank,
                generation: 1,
                step: 1,
                step_time: Duration::from_millis(5),
                phase: None,
            };
            c.heartbeat(hb).unwrap();
        }
        let r = stored(|r| r.resumed_at.is_some()).await;
        assert!(r[0].resumed_at >= r[0].restart_at);
        assert_eq!(c.list()[0].state, "Running");
        assert_eq!(c.faults("").await.unwrap_err().kind(), crate::ErrorKind::InvalidRequest);
    }

    /// A repair endpoint on 127.0.0.1 that answers every request with a ticket `T-<n>` and passes
    /// each body on.
    async fn repair_endpoint() -> (String, mpsc::Receiver<serde_json::Value>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/repair", l.local_addr().unwrap());
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut s, _)) = l.accept().await {
                n += 1;
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.ends_with(b"}") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => got.extend_from_slice(&buf[..k]),
                    }
                }
                let answer = format!("{{\"ticket\": \"T-{n}\"}}");
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", answer.len());
                let _ = s.write_all(format!("{head}{answer}").as_bytes()).await;
                let text = String::from_utf8_lossy(&got).to_string();
                let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
                let _ = tx.send(serde_json::from_str(&body).unwrap_or_default()).await;
            }
        });
        (url, rx)
    }

    #[tokio::test]
    async fn hardware_isolations_request_a_repair_and_the_done_report_releases_the_node() {
        let (url, mut requests) = repair_endpoint().await;
        let fencer = Arc::new(MemoryFencer::new(8));
        let log = Arc::new(MemoryFaultLog::new());
        let cancel = CancellationToken::new();
        let sink = FaultSink::spawn(log.clone(), 50, None, cancel.clone());
        let hook = crate::isolator::hook::Hook::new("--repair-url", &url, None).unwrap();
        let repairer = Repairer::spawn(hook, sink.clone(), cancel.clone());
        let mut s = settings(4, "memory://");
        s.repair = Some(repairer.clone());
        let (_l, leader) = watch::channel(true);
        let (_h, holder) = watch::channel(String::new());
        let c = Coordinator::new(s, fencer.clone(), sink, Arc::new(Metrics::new()), leader, holder, cancel.clone());
        register(&c, "a", 0, 1, "n1").await;
        register(&c, "b", 0, 1, "n2").await;
        // A hang isolates nothing and requests no repair.
        let hang = FaultReport {
            job: "b".into(),
            ranks: vec![0],
            node: "n2".into(),
            kind: "hang".into(),
            action: FaultAction::RestartJob as i32,
            ..Default::default()
        };
        c.report_fault(Fault::try_from(&hang).unwrap()).await.unwrap();
        c.report_fault(drain("a", "n1")).await.unwrap();
        let sent = requests.recv().await.unwrap();
        assert_eq!(
            (&sent["node"], &sent["class"], &sent["action"]),
            (&"n1".into(), &"xid-79".into(), &"drain-node".into())
        );
        let id = sent["record"].as_str().unwrap().to_string();
        let mut stored = None;
        for _ in 0..10_000 {
            stored =
                c.faults("a").await.unwrap().into_iter().find(|r| r.repair.as_ref().is_some_and(Repair::is_settled));
            if stored.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let rec = stored.expect("the repair answer reaches the record");
        assert_eq!(rec.id, id);
        assert_eq!(rec.repair.as_ref().and_then(|r| r.ticket.as_deref()), Some("T-1"));
        let hang_rec = c.faults("b").await.unwrap();
        assert!(hang_rec.iter().all(|r| r.repair.is_none()), "{hang_rec:?}");
        // While the repair is in flight, another hardware fault on the node asks for none.
        let mut again = drain("a", "n1");
        again.kind = "ecc-dbe".into();
        again.generation = c.list()[0].generation;
        let _ = c.report_fault(again).await;
        // The done report: a wrong ticket is refused, an unknown node is not ours, the right one
        // releases the node and stamps the record.
        for _ in 0..10_000 {
            if repairer.pending("n1").and_then(|p| p.ticket).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let e = c.repaired("n1", Some("T-2")).await.unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidRequest);
        assert!(fencer.record().isolated.contains_key("n1"), "a refused report releases nothing");
        assert_eq!(c.repaired("n9", None).await.unwrap(), None);
        let done = c.repaired("n1", Some("T-1")).await.unwrap().expect("n1 was isolated");
        assert_eq!((done.record.as_deref(), done.job.as_deref()), (Some(id.as_str()), Some("a")));
        assert!(!fencer.record().isolated.contains_key("n1"));
        let mut repaired = None;
        for _ in 0..10_000 {
            repaired = c.faults("a").await.unwrap().into_iter().find(|r| r.id == id && r.repaired_at.is_some());
            if repaired.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(repaired.expect("the repair time is stamped").repaired_at, Some(done.at));
        assert!(requests.try_recv().is_err(), "one repair request in all");
        assert_eq!(c.repaired("n1", None).await.unwrap(), None, "released already");
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_replica_without_the_lease_refuses_to_act() {
        let fencer = Arc::new(MemoryFencer::new(8));
        let c = coordinator(false, fencer.clone(), 4);
        let r = RegisterRequest { job: "a".into(), world_size: 1, node: "n".into(), ..Default::default() };
        let err = c.register(Registration::try_from(&r).unwrap()).await.unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::NotLeader);
        assert!(err.to_string().contains("other"), "{err}");
        assert_eq!(c.release("n").await.unwrap_err().kind(), crate::ErrorKind::NotLeader);
        assert_eq!(fencer.record().isolations, 0);
    }

    #[tokio::test]
    async fn the_declared_layout_is_kept_and_listed() {
        let c = coordinator(true, Arc::new(MemoryFencer::new(8)), 4);
        let r = |rank, parallel| {
            let r = RegisterRequest {
                job: "a".into(),
                rank,
                world_size: 4,
                node: "n".into(),
                parallel,
                ..Default::default()
            };
            Registration::try_from(&r).unwrap()
        };
        c.register(r(0, None)).await.unwrap();
        assert_eq!(c.list()[0].parallel, None, "nothing declared");
        let declared = crate::layout::Layout { dp: 2, tp: 2, pp: 1 };
        c.register(r(1, Some(declared.into()))).await.unwrap();
        c.register(r(2, None)).await.unwrap();
        assert_eq!(c.list()[0].parallel, Some(declared.into()), "kept when a later rank declares none");
    }

    #[tokio::test]
    async fn after_a_takeover_the_job_resumes_at_the_generation_its_agents_report() {
        let c = coordinator(true, Arc::new(MemoryFencer::new(8)), 4);
        let r = |rank, generation| {
            let r = RegisterRequest {
                job: "a".into(),
                rank,
                world_size: 2,
                node: "n".into(),
                generation,
                ..Default::default()
            };
            Registration::try_from(&r).unwrap()
        };
        assert_eq!(c.register(r(0, 0)).await.unwrap().generation, 0, "a fresh pod");
        assert_eq!(c.register(r(1, 3)).await.unwrap().generation, 3);
        let hb = |rank, generation| Heartbeat {
            job: "a".into(),
            rank,
            generation,
            step: 1,
            step_time: Duration::from_millis(5),
            phase: None,
        };
        assert_eq!(c.heartbeat(hb(1, 3)).unwrap().generation, 3);
        assert_eq!(c.heartbeat(hb(0, 0)).unwrap_err().kind(), crate::ErrorKind::Stale);
    }

    #[tokio::test(start_paused = true)]
    async fn a_ballot_past_its_deadline_is_aborted() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let fencer = Arc::new(MemoryFencer::new(8));
        let c = coordinator_on(true, fencer, 4, &url);
        register(&c, "a", 0, 2, "n").await;
        let info = tokio::task::spawn_blocking(move || {
            let engine = Engine::open(&url, EngineConfig::default()).unwrap();
            let table = ckpt_core::TensorTable::packed(
                [ckpt_core::TensorMeta::new("w", ckpt_core::DType::F32, vec![4]).unwrap()],
                64,
            )
            .unwrap();
            let data = bytes::Bytes::from(vec![7u8; table.total_len() as usize]);
            engine.write_shard("a", 3, 0, 2, &ckpt_core::Snapshot { table, data, metadata: Vec::new() }).unwrap()
        })
        .await
        .unwrap();
        let vote = DurableVote {
            job: "a".into(),
            step: 3,
            rank: 0,
            world_size: 2,
            shard_key: info.object.clone(),
            shard_len: info.size,
            shard_crc32c: info.index_crc32c,
            region_len: info.region_len,
            ..Default::default()
        };
        let vote = ShardVote::try_from(&vote).unwrap();
        assert!(!c.vote(vote.clone()).await.unwrap());
        assert_eq!(c.sweep_deadlines(), 0);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(c.sweep_deadlines(), 1);
        let err = c.vote(vote).await.unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Stale);
    }

    fn alert(node: &str, kind: &str, action: Action) -> AlertFault {
        AlertFault {
            node: node.into(),
            kind: kind.into(),
            action,
            source: "alertmanager".into(),
            evidence: "alertmanager firing: alertname=GpuXidError err_code=79".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_alert_acts_once_and_dedupes_against_agent_reports() {
        let fencer = Arc::new(MemoryFencer::new(8));
        let c = coordinator(true, fencer.clone(), 4);
        register(&c, "a", 0, 2, "n1").await;
        register(&c, "a", 1, 2, "n2").await;
        let r = c.report_alert(alert("n2", "xid-79", Action::DrainNode)).await.unwrap();
        assert_eq!(r.outcome, AlertOutcome::Acted);
        assert_eq!(r.jobs.len(), 1);
        assert_eq!(r.jobs[0].0, "a");
        assert_eq!(r.jobs[0].1.action, FaultAction::DrainNode as i32, "{}", r.jobs[0].1.note);
        let rec = fencer.record();
        assert_eq!(rec.isolations, 1);
        assert_eq!(rec.isolated["n2"].source, "alertmanager");
        assert!(rec.deleted_pods.contains(&PodRef { namespace: "ns".into(), name: "a-1".into() }));
        assert_eq!(c.list()[0].state, "Degraded");

        // The same alert again, and the agent's report of the same fault: nothing more.
        let again = c.report_alert(alert("n2", "xid-79", Action::DrainNode)).await.unwrap();
        assert_eq!(again.outcome, AlertOutcome::Duplicate, "{}", again.note);
        let f = FaultReport {
            job: "a".into(),
            ranks: vec![1],
            node: "n2".into(),
            kind: "xid-79".into(),
            action: FaultAction::DrainNode as i32,
            ..Default::default()
        };
        let ack = c.report_fault(Fault::try_from(&f).unwrap()).await.unwrap();
        assert!(ack.note.contains("already acted on"), "{}", ack.note);
        assert_eq!(fencer.record().isolations, 1);
        assert_eq!(fencer.record().deleted_pods.len(), 1);

        // Another kind on the node is another fault; past the window the same one counts again.
        let other = c.report_alert(alert("n2", "ecc-dbe", Action::ResetGpu)).await.unwrap();
        assert_eq!(other.outcome, AlertOutcome::Acted);
        tokio::time::advance(Duration::from_secs(301)).await;
        let later = c.report_alert(alert("n2", "xid-79", Action::DrainNode)).await.unwrap();
        assert_eq!(later.outcome, AlertOutcome::Acted);
    }

    #[tokio::test]
    async fn an_alert_after_the_agents_report_is_a_duplicate_unless_stronger() {
        let fencer = Arc::new(MemoryFencer::new(8));
        let c = coordinator(true, fencer.clone(), 4);
        register(&c, "a", 0, 1, "n1").await;
        c.report_fault(drain("a", "n1")).await.unwrap();
        let r = c.report_alert(alert("n1", "xid-79", Action::DrainNode)).await.unwrap();
        assert_eq!(r.outcome, AlertOutcome::Duplicate);
        assert!(r.note.contains("an agent"), "{}", r.note);
        let r = c.report_alert(alert("n1", "xid-79", Action::RebootNode)).await.unwrap();
        assert_eq!(r.outcome, AlertOutcome::Acted, "a stronger action is not a duplicate");
        assert_eq!(fencer.record().isolations, 1, "the node was isolated once");
        // An agent repeating its own report is not deduplicated here (agents dedupe themselves).
        let f = FaultReport {
            job: "a".into(),
            ranks: vec![0],
            kind: "hang".into(),
            action: FaultAction::RestartJob as i32,
            node: "n1".into(),
            ..Default::default()
        };
        let first = c.report_fault(Fault::try_from(&f).unwrap()).await.unwrap();
        let second = c.report_fault(Fault::try_from(&f).unwrap()).await.unwrap();
        assert!(
            !first.note.contains("already") && !second.note.contains("already"),
            "{} / {}",
            first.note,
            second.note
        );
    }

    #[tokio::test]
    async fn alerts_without_a_job_on_the_node_or_ignored_by_the_policy_do_nothing() {
        let fencer = Arc::new(MemoryFencer::new(8));
        let c = coordinator(true, fencer.clone(), 4);
        register(&c, "a", 0, 1, "n1").await;
        let r = c.report_alert(alert("n9", "xid-79", Action::DrainNode)).await.unwrap();
        assert_eq!(r.outcome, AlertOutcome::NoJob);
        assert!(r.note.contains("n9"));
        let r = c.report_alert(alert("n1", "xid-45", Action::Ignore)).await.unwrap();
        assert_eq!(r.outcome, AlertOutcome::Ignored);
        assert_eq!(fencer.record().isolations, 0);
        assert_eq!(c.list()[0].state, "Running");
        let follower = coordinator(false, fencer, 4);
        let e = follower.report_alert(alert("n1", "xid-79", Action::DrainNode)).await.unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::NotLeader);
    }

    /// Writes rank `rank`'s shard of `step` (world size 2) to the store at `url` and returns its
    /// vote at generation 0.
    async fn durable_vote(url: &str, step: u64, rank: u32) -> ShardVote {
        durable_vote_in(url, step, rank, 2).await
    }

    /// [`durable_vote`] for a job of `world` ranks.
    async fn durable_vote_in(url: &str, step: u64, rank: u32, world: u32) -> ShardVote {
        let url = url.to_string();
        let info = tokio::task::spawn_blocking(move || {
            let engine = Engine::open(&url, EngineConfig::default()).unwrap();
            let table = ckpt_core::TensorTable::packed(
                [ckpt_core::TensorMeta::new("w", ckpt_core::DType::F32, vec![4]).unwrap()],
                64,
            )
            .unwrap();
            let data = bytes::Bytes::from(vec![rank as u8; table.total_len() as usize]);
            engine
                .write_shard("a", step, rank, world, &ckpt_core::Snapshot { table, data, metadata: Vec::new() })
                .unwrap()
        })
        .await
        .unwrap();
        let vote = DurableVote {
            job: "a".into(),
            step,
            rank,
            world_size: world,
            shard_key: info.object.clone(),
            shard_len: info.size,
            shard_crc32c: info.index_crc32c,
            region_len: info.region_len,
            ..Default::default()
        };
        ShardVote::try_from(&vote).unwrap()
    }

    /// One row of the handling-by-phase table (docs/ISOLATOR.md, "Handling by phase").
    struct PhaseRow {
        /// The faulty rank's phase, as its heartbeat said (`None`: an agent that does not say).
        phase: Option<ckpt_core::Phase>,
        kind: &'static str,
        asked: FaultAction,
        /// Whether the faulty node is isolated.
        isolate: bool,
        /// The action the ack says was taken.
        taken: FaultAction,
        /// Whether step 2, which the faulty rank was saving (its shard already voted), commits
        /// from the healthy rank's emergency snapshot; the restore then uses it, else step 1.
        commits: bool,
        /// In the ack's and the record's note.
        note: &'static str,
    }

    #[tokio::test]
    async fn faults_are_handled_by_the_faulty_ranks_phase() {
        use FaultAction::{DrainNode, RestartJob};
        use ckpt_core::Phase::*;
        let start = "without hardware evidence: restart without isolating (drain-node asked)";
        let saving = "fault during checkpoint-save: steps [2] never commit, the restore uses the last committed step 1";
        #[rustfmt::skip]
        let rows = [
            // A fault during init or checkpoint-load with no hardware evidence restarts without isolating.
            PhaseRow { phase: Some(Init), kind: "hang", asked: DrainNode, isolate: false, taken: RestartJob, commits: true, note: start },
            PhaseRow { phase: Some(CheckpointLoad), kind: "nccl-timeout", asked: DrainNode, isolate: false, taken: RestartJob, commits: true, note: start },
            PhaseRow { phase: Some(Init), kind: "xid-79", asked: DrainNode, isolate: true, taken: DrainNode, commits: true, note: "node n2 isolated" },
            // A fault during checkpoint-save keeps the last committed step and never commits the interrupted one.
            PhaseRow { phase: Some(CheckpointSave), kind: "hang", asked: RestartJob, isolate: false, taken: RestartJob, commits: false, note: saving },
            PhaseRow { phase: Some(CheckpointSave), kind: "xid-79", asked: DrainNode, isolate: true, taken: DrainNode, commits: false, note: saving },
            // Otherwise, the policy's action.
            PhaseRow { phase: Some(Step), kind: "xid-79", asked: DrainNode, isolate: true, taken: DrainNode, commits: true, note: "node n2 isolated" },
            PhaseRow { phase: Some(Step), kind: "hang", asked: RestartJob, isolate: false, taken: RestartJob, commits: true, note: "" },
            PhaseRow { phase: None, kind: "hang", asked: DrainNode, isolate: true, taken: DrainNode, commits: true, note: "node n2 isolated" },
        ];
        for row in rows {
            let what = format!("{} asking {:?} in {:?}", row.kind, row.asked, row.phase);
            let dir = tempfile::tempdir().unwrap();
            let url = format!("file://{}", dir.path().display());
            let fencer = Arc::new(MemoryFencer::new(8));
            let log = Arc::new(MemoryFaultLog::new());
            let (_l, leader) = watch::channel(true);
            let (_h, holder) = watch::channel(String::new());
            let cancel = CancellationToken::new();
            let sink = FaultSink::spawn(log, 50, None, cancel.clone());
            let c = Coordinator::new(
                settings(4, &url),
                fencer.clone(),
                sink,
                Arc::new(Metrics::new()),
                leader,
                holder,
                cancel.clone(),
            );
            register(&c, "a", 0, 2, "n1").await;
            register(&c, "a", 1, 2, "n2").await;
            assert!(!c.vote(durable_vote(&url, 1, 0).await).await.unwrap());
            assert!(c.vote(durable_vote(&url, 1, 1).await).await.unwrap(), "step 1 commits");
            let mut healthy = c.subscribe(Subscription { job: "a".into(), ranks: vec![0], generation: 0 }).unwrap();
            let hb = |rank, phase| Heartbeat {
                job: "a".into(),
                rank,
                generation: 0,
                step: 2,
                step_time: Duration::from_millis(5),
                phase,
            };
            c.heartbeat(hb(0, Some(Step))).unwrap();
            c.heartbeat(hb(1, row.phase)).unwrap();
            // Rank 1's shard of step 2 is durable and voted when the fault comes.
            assert!(!c.vote(durable_vote(&url, 2, 1).await).await.unwrap());
            let f = FaultReport {
                job: "a".into(),
                ranks: vec![1],
                node: "n2".into(),
                kind: row.kind.into(),
                action: row.asked as i32,
                ..Default::default()
            };
            let ack = c.report_fault(Fault::try_from(&f).unwrap()).await.unwrap();
            assert_eq!(ack.action, row.taken as i32, "{what}: {}", ack.note);
            assert!(ack.note.contains(row.note), "{what}: {}", ack.note);
            assert_eq!(fencer.record().isolated.contains_key("n2"), row.isolate, "{what}");
            // The healthy rank's emergency snapshot of step 2.
            let snapshot = c.vote(durable_vote(&url, 2, 0).await).await;
            match &snapshot {
                Ok(done) => assert!(row.commits && *done, "{what}: step 2 committed"),
                Err(e) => {
                    assert!(!row.commits, "{what}: {e}");
                    assert_eq!(e.kind(), crate::ErrorKind::Stale, "{what}: {e}");
                }
            }
            let mut snapshot_now = false;
            let restore = loop {
                let cmd = tokio::time::timeout(Duration::from_secs(60), healthy.recv())
                    .await
                    .expect("the restore is sent")
                    .expect("the command stream stays open");
                match cmd.command {
                    Some(command::Command::SnapshotNow(_)) => snapshot_now = true,
                    Some(command::Command::Restore(r)) => break r,
                    other => panic!("{what}: unexpected {other:?}"),
                }
            };
            let last = if row.commits { 2 } else { 1 };
            assert_eq!((restore.step, restore.generation, restore.from_scratch), (last, 1, false), "{what}");
            assert_eq!(snapshot_now, row.commits, "{what}: an interrupted save asks for no emergency snapshot");
            assert_eq!(c.list()[0].committed_step, last, "{what}");
            let mut rec = None;
            for _ in 0..10_000 {
                rec = c.faults("a").await.unwrap().into_iter().next();
                if rec.is_some() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let rec = rec.expect("the fault is recorded");
            assert_eq!(
                (rec.requested, rec.decision),
                (Action::try_from(row.asked).unwrap(), Action::try_from(row.taken).unwrap()),
                "{what}"
            );
            assert!(rec.note.contains(row.note), "{what}: {}", rec.note);
            // After the restart the job commits again, the interrupted step number included.
            if !row.commits {
                let again = |rank| {
                    let url = url.clone();
                    async move {
                        let mut v = durable_vote(&url, 2, rank).await;
                        v.generation = 1;
                        v
                    }
                };
                assert!(!c.vote(again(0).await).await.unwrap());
                assert!(c.vote(again(1).await).await.unwrap(), "{what}: step 2 commits at generation 1");
            }
            cancel.cancel();
        }
    }

    /// One row of the replica rule's table (docs/ISOLATOR.md, "Handling by layout"): a job at
    /// step 2 (step 1 committed) has a fault on `faulty`; `before` voted step 2 before the fault,
    /// `after` vote it as their emergency snapshot.
    struct ReplicaRow {
        what: &'static str,
        /// The declared layout (dp, tp); `None`: none declared.
        layout: Option<(u32, u32)>,
        world: u32,
        faulty: &'static [u32],
        /// The faulty ranks' phase.
        phase: ckpt_core::Phase,
        before: &'static [u32],
        after: &'static [u32],
        /// Per rank, the rank whose shard its MANIFEST entry of step 2 names; empty: step 2 does
        /// not commit and the restore uses step 1.
        sources: &'static [u32],
    }

    async fn next(commands: &mut mpsc::Receiver<Command>) -> Option<command::Command> {
        let cmd = tokio::time::timeout(Duration::from_secs(600), commands.recv()).await;
        cmd.expect("a command is sent").expect("the command stream stays open").command
    }

    #[tokio::test(start_paused = true)]
    async fn faulty_ranks_are_covered_by_healthy_data_parallel_replicas() {
        use ckpt_core::Phase::{CheckpointSave, Step};
        #[rustfmt::skip]
        let rows = [
            ReplicaRow { what: "dp=2: rank 1 faulty, its replica 0 snapshots", layout: Some((2, 1)), world: 2, faulty: &[1], phase: Step, before: &[], after: &[0], sources: &[0, 0] },
            ReplicaRow { what: "dp=2: the replica voted before the fault (a normal save needs both)", layout: Some((2, 1)), world: 2, faulty: &[1], phase: Step, before: &[0], after: &[], sources: &[0, 0] },
            ReplicaRow { what: "no layout declared", layout: None, world: 2, faulty: &[1], phase: Step, before: &[], after: &[0], sources: &[] },
            ReplicaRow { what: "dp=2: a faulty rank that voted keeps its own shard", layout: Some((2, 1)), world: 2, faulty: &[1], phase: Step, before: &[1], after: &[0], sources: &[0, 1] },
            ReplicaRow { what: "dp=2: an interrupted save holds every commit", layout: Some((2, 1)), world: 2, faulty: &[1], phase: CheckpointSave, before: &[0], after: &[], sources: &[] },
            ReplicaRow { what: "dp=2,tp=2: rank 1's replica is 3, not its tensor neighbour 0", layout: Some((2, 2)), world: 4, faulty: &[1], phase: Step, before: &[], after: &[0, 2, 3], sources: &[0, 3, 2, 3] },
            ReplicaRow { what: "dp=2,tp=2: rank 1's only replica 3 is faulty too (it voted)", layout: Some((2, 2)), world: 4, faulty: &[1, 3], phase: Step, before: &[0, 2, 3], after: &[], sources: &[] },
            ReplicaRow { what: "dp=2,tp=2: rank 1's replica 3 is healthy but did not vote", layout: Some((2, 2)), world: 4, faulty: &[1], phase: Step, before: &[], after: &[0, 2], sources: &[] },
            ReplicaRow { what: "dp=2,tp=2: healthy rank 2 did not vote", layout: Some((2, 2)), world: 4, faulty: &[1], phase: Step, before: &[], after: &[0, 3], sources: &[] },
        ];
        for row in rows {
            let what = row.what;
            let dir = tempfile::tempdir().unwrap();
            let url = format!("file://{}", dir.path().display());
            let fencer = Arc::new(MemoryFencer::new(8));
            let (_l, leader) = watch::channel(true);
            let (_h, holder) = watch::channel(String::new());
            let cancel = CancellationToken::new();
            let sink = FaultSink::spawn(Arc::new(MemoryFaultLog::new()), 50, None, cancel.clone());
            let c = Coordinator::new(
                settings(4, &url),
                fencer,
                sink,
                Arc::new(Metrics::new()),
                leader,
                holder,
                cancel.clone(),
            );
            let parallel = row.layout.map(|(dp, tp)| crate::layout::Layout::new(dp, tp, 1).unwrap().into());
            for rank in 0..row.world {
                let r = RegisterRequest {
                    job: "a".into(),
                    rank,
                    world_size: row.world,
                    node: format!("n{rank}"),
                    pod: format!("a-{rank}"),
                    namespace: "ns".into(),
                    parallel,
                    ..Default::default()
                };
                c.register(Registration::try_from(&r).unwrap()).await.unwrap();
            }
            let vote = |step, rank| {
                let url = url.clone();
                async move { durable_vote_in(&url, step, rank, row.world).await }
            };
            for rank in 0..row.world {
                let done = c.vote(vote(1, rank).await).await.unwrap();
                assert_eq!(done, rank + 1 == row.world, "{what}: step 1 commits with every vote");
            }
            let healthy: Vec<u32> = (0..row.world).filter(|r| !row.faulty.contains(r)).collect();
            let mut commands =
                c.subscribe(Subscription { job: "a".into(), ranks: healthy.clone(), generation: 0 }).unwrap();
            for rank in 0..row.world {
                let phase = if row.faulty.contains(&rank) { row.phase } else { Step };
                let hb = Heartbeat {
                    job: "a".into(),
                    rank,
                    generation: 0,
                    step: 2,
                    step_time: Duration::from_millis(5),
                    phase: Some(phase),
                };
                c.heartbeat(hb).unwrap();
            }
            for &rank in row.before {
                assert!(!c.vote(vote(2, rank).await).await.unwrap(), "{what}: a normal save needs every rank");
            }
            let f = FaultReport {
                job: "a".into(),
                ranks: row.faulty.to_vec(),
                node: format!("n{}", row.faulty[0]),
                kind: "xid-79".into(),
                action: FaultAction::DrainNode as i32,
                ..Default::default()
            };
            c.report_fault(Fault::try_from(&f).unwrap()).await.unwrap();
            let mut pending = None;
            if row.phase != CheckpointSave {
                // The emergency snapshot is asked for; the restore may follow at once when nothing
                // can complete.
                match next(&mut commands).await {
                    Some(command::Command::SnapshotNow(_)) => {}
                    Some(command::Command::Restore(r)) => pending = Some(r),
                    other => panic!("{what}: unexpected {other:?}"),
                }
            }
            for &rank in row.after {
                match c.vote(vote(2, rank).await).await {
                    Ok(done) => assert!(!done || !row.sources.is_empty(), "{what}: step 2 committed"),
                    Err(e) => assert_eq!(e.kind(), crate::ErrorKind::Stale, "{what}: {e}"),
                }
            }
            let restore = match pending {
                Some(r) => r,
                None => loop {
                    match next(&mut commands).await {
                        Some(command::Command::Restore(r)) => break r,
                        Some(command::Command::SnapshotNow(_)) => {}
                        other => panic!("{what}: unexpected {other:?}"),
                    }
                },
            };
            let commits = !row.sources.is_empty();
            let last = if commits { 2 } else { 1 };
            assert_eq!((restore.step, restore.generation, restore.from_scratch), (last, 1, false), "{what}");
            assert_eq!(c.list()[0].committed_step, last, "{what}");
            let u = url.clone();
            let manifest = tokio::task::spawn_blocking(move || {
                Engine::open(&u, EngineConfig::default()).unwrap().manifest("a", 2)
            })
            .await
            .unwrap();
            let mut covered = Vec::new();
            match manifest {
                Ok(m) => {
                    assert!(commits, "{what}: step 2 committed");
                    let got: Vec<(u32, u32)> =
                        m.shards.iter().map(|e| (e.rank, ckpt_core::Manifest::source_rank(e))).collect();
                    let want: Vec<(u32, u32)> = row.sources.iter().copied().zip(0..).map(|(s, r)| (r, s)).collect();
                    assert_eq!(got, want, "{what}: the ranks whose shards the entries name");
                    covered = want.into_iter().filter(|(r, s)| r != s).collect();
                }
                Err(e) => {
                    assert!(!commits, "{what}: {e}");
                    assert_eq!(e.kind(), ckpt_core::ErrorKind::NotFound, "{what}: {e}");
                }
            }
            // The record says which rank's shard came from which replica.
            let mut rec = None;
            for _ in 0..10_000 {
                rec = c.faults("a").await.unwrap().into_iter().next().filter(|r| r.restart_at.is_some());
                if rec.is_some() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let rec = rec.expect("the restart is recorded");
            assert_eq!(rec.note.contains("replicas"), !covered.is_empty(), "{what}: {}", rec.note);
            for (r, s) in covered {
                assert!(rec.note.contains(&format!("rank {r} from rank {s}")), "{what}: {}", rec.note);
            }
            cancel.cancel();
        }
    }
}
