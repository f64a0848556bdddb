//! The agent's gRPC services on the trainer socket: `Trainer` (one session per rank process) and
//! `Admin` (snapshot-now, status). Every request is checked against the caller's session: a
//! client can only touch the rank it attached, and only slots it sealed.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ckpt_core::arena::SlotState;
use ckpt_core::slots;
use ckptd_proto::v1::admin_server::{Admin, AdminServer};
use ckptd_proto::v1::trainer_server::{Trainer, TrainerServer};
use ckptd_proto::v1::{self as pb, trainer_event::Event};
use tokio::sync::mpsc;
use tonic::transport::server::Router;
use tonic::{Code, Request, Response, Status};
use tower::layer::util::{Identity, Stack};

use super::Agent;
use super::incoming::EstablishLayer;
use super::rank::{PersistJob, Rank, Session};
use crate::error::ErrorKind;
use crate::rpc::{refuse, to_status};

/// Events buffered per session; the trainer's event task drains them at once.
const SESSION_EVENTS: usize = 64;
/// Longest `SnapshotNow` wait.
const MAX_SNAPSHOT_WAIT: Duration = Duration::from_secs(600);

/// HTTP/2 pings on an idle connection, and how long the peer has to answer one: a trainer that
/// died without closing its socket (a frozen host, a lost mount namespace) is found this way.
const KEEPALIVE: Duration = Duration::from_secs(20);
/// Requests one connection may have in flight; a trainer needs a handful (its session stream,
/// a heartbeat, a handover, a load).
const REQUESTS_PER_CONNECTION: usize = 64;

/// The router serving both services. Its connections come from [`super::incoming::Incoming`]; the
/// [`EstablishLayer`] tells their gate when each sends its first request.
pub(super) fn router(agent: Arc<Agent>, max_sessions: usize) -> Router<Stack<EstablishLayer, Identity>> {
    let svc = Service { agent, max_sessions, attaching: Arc::new(std::sync::Mutex::new(())) };
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE))
        .concurrency_limit_per_connection(REQUESTS_PER_CONNECTION)
        .layer(EstablishLayer)
        .add_service(
            TrainerServer::new(svc.clone())
                .max_decoding_message_size(ckptd_proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(ckptd_proto::MAX_MESSAGE_BYTES),
        )
        .add_service(
            AdminServer::new(svc)
                .max_decoding_message_size(ckptd_proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(ckptd_proto::MAX_MESSAGE_BYTES),
        )
}

#[derive(Debug, Clone)]
struct Service {
    agent: Arc<Agent>,
    /// The most ranks this agent serves (`--max-sessions`).
    max_sessions: usize,
    /// Held from the session-cap check until the session is recorded, so that concurrent attaches
    /// cannot both take the last place.
    attaching: Arc<std::sync::Mutex<()>>,
}

fn invalid(message: impl Into<String>) -> Status {
    refuse(Code::InvalidArgument, ErrorKind::Core(ckpt_core::ErrorKind::InvalidInput), message)
}

fn precondition(message: impl Into<String>) -> Status {
    refuse(Code::FailedPrecondition, ErrorKind::Core(ckpt_core::ErrorKind::InvalidInput), message)
}

impl Service {
    fn session(&self, id: u64) -> Result<Arc<Rank>, Status> {
        self.agent.by_session(id).ok_or_else(|| {
            refuse(
                Code::PermissionDenied,
                ErrorKind::AgentUnavailable,
                format!("session {id} is not open on this agent: attach first (a restarted agent forgets sessions)"),
            )
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> crate::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        match tokio::task::spawn_blocking(f).await {
            Ok(r) => r.map_err(|e| to_status(&e)),
            Err(e) => Err(Status::internal(format!("agent task failed: {e}"))),
        }
    }
}

/// The session's event stream. Dropping it (the trainer's connection closed) ends the session.
struct SessionStream {
    rx: mpsc::Receiver<Result<pb::TrainerEvent, Status>>,
    agent: Arc<Agent>,
    rank: Arc<Rank>,
    id: u64,
}

impl tokio_stream::Stream for SessionStream {
    type Item = Result<pb::TrainerEvent, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for SessionStream {
    fn drop(&mut self) {
        self.agent.session_ended(self.rank.clone(), self.id);
    }
}

#[tonic::async_trait]
impl Trainer for Service {
    type AttachStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::TrainerEvent, Status>> + Send>>;

    async fn attach(&self, req: Request<pb::AttachRequest>) -> Result<Response<Self::AttachStream>, Status> {
        let peer_pid = req.extensions().get::<super::incoming::Peer>().and_then(|p| p.pid);
        let req = req.into_inner();
        let cfg = &self.agent.cfg;
        if req.job != cfg.job {
            return Err(invalid(format!("this agent serves job `{}`, not `{}`: check CKPTD_JOB", cfg.job, req.job)));
        }
        if req.world_size == 0 || req.rank >= req.world_size {
            return Err(invalid(format!("rank {} is outside world size {}", req.rank, req.world_size)));
        }
        if let Some(w) = cfg.world_size
            && w != req.world_size
        {
            return Err(invalid(format!("world size {} differs from the agent's --world-size {w}", req.world_size)));
        }
        // A rank keeps its arena and persist thread for as long as the agent runs, so the cap
        // counts every rank this agent holds, attached or not; at most one session per rank makes
        // it the cap on sessions too.
        let attaching = self.attaching.lock().unwrap_or_else(|p| p.into_inner());
        let known = self.agent.ranks();
        if known.len() >= self.max_sessions && !known.iter().any(|r| r.rank == req.rank) {
            return Err(refuse(
                Code::ResourceExhausted,
                ErrorKind::Busy,
                format!(
                    "this agent already serves {} ranks, its --max-sessions; rank {} is refused: raise \
                     --max-sessions (CKPTD_MAX_SESSIONS) or attach the rank to its own pod's agent",
                    known.len(),
                    req.rank
                ),
            ));
        }
        let rank = self.agent.rank(req.rank).map_err(|e| to_status(&e))?;
        let (tx, rx) = mpsc::channel(SESSION_EVENTS);
        let id = loop {
            let id = rand::random::<u64>();
            if id != 0 {
                break id;
            }
        };
        let arena_path = {
            let mut inner = rank.lock();
            if let Some(s) = &inner.session {
                return Err(refuse(
                    Code::AlreadyExists,
                    ErrorKind::Core(ckpt_core::ErrorKind::Conflict),
                    format!(
                        "rank {} is already attached by pid {} (session {}); one process per rank",
                        req.rank, s.pid, s.id
                    ),
                ));
            }
            if let Some(a) = &inner.arena {
                // Slots a previous trainer of this rank left half-written cannot complete now, and
                // a `reading` slot is the hold of a load that trainer never finished: the data is
                // intact, give it back to the memory tier.
                for slot in 0..a.slot_count() {
                    a.transition(slot, SlotState::Writing, SlotState::Free);
                    a.transition(slot, SlotState::Reading, SlotState::Durable);
                }
            }
            inner.world_size = Some(req.world_size);
            inner.pending_request = None;
            inner.session = Some(Session { id, pid: req.pid, peer_pid, handed_over: false, events: tx.clone() });
            inner.awaiting_restart = None;
            inner.arena.as_ref().map(|a| a.path().display().to_string()).unwrap_or_default()
        };
        drop(attaching);
        self.agent.metrics.attached.inc();
        let generation = self.agent.link.as_ref().map_or(0, |l| l.generation());
        let attached = pb::Attached { session: id, agent_version: crate::VERSION.into(), arena_path, generation };
        let _ = tx.try_send(Ok(pb::TrainerEvent { event: Some(Event::Attached(attached)) }));
        if let Some(h) = &self.agent.health {
            h.rank_attached(req.rank, None);
        }
        if self.agent.link.is_some() {
            self.agent.register_with_isolator(req.world_size);
        }
        // A trainer that starts after the job's restart order (a rescheduled rank, or one its
        // launcher restarted) gets it too, as news: it is restarted already.
        let order = *self.agent.restore_order.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = order {
            let _ = tx.try_send(Ok(pb::TrainerEvent { event: Some(Event::Restore(o.to_wire(false))) }));
        }
        tracing::info!(rank = req.rank, pid = req.pid, session = id, client = %crate::text::peer(&req.client_version), "trainer attached");
        if rank.lock().committed.is_none() {
            self.agent.spawn_prefetch(rank.clone());
        }
        let stream = SessionStream { rx, agent: self.agent.clone(), rank, id };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn prepare_arena(
        &self,
        req: Request<pb::PrepareArenaRequest>,
    ) -> Result<Response<pb::PrepareArenaReply>, Status> {
        let req = req.into_inner();
        let rank = self.session(req.session)?;
        if req.slot_size == 0 {
            return Err(invalid("slot_size must be positive"));
        }
        let _staging = rank.staging.lock().await;
        self.agent.settle(&rank).await.map_err(|e| to_status(&e))?;
        let agent = self.agent.clone();
        let r = rank.clone();
        let arena = self.blocking(move || agent.ensure_arena(&r, req.slot_size)).await?;
        Ok(Response::new(pb::PrepareArenaReply {
            arena_path: arena.path().display().to_string(),
            slots: arena.slot_count(),
            slot_size: arena.slot_size(),
        }))
    }

    async fn handover(&self, req: Request<pb::HandoverRequest>) -> Result<Response<pb::HandoverReply>, Status> {
        let req = req.into_inner();
        let rank = self.session(req.session)?;
        let (arena, world_size) = {
            let inner = rank.lock();
            (inner.arena.clone(), inner.world_size)
        };
        let arena = arena.ok_or_else(|| precondition("this rank has no arena yet: call PrepareArena first"))?;
        let world_size = world_size.ok_or_else(|| precondition("world size unknown: attach again"))?;
        if req.slot >= arena.slot_count() {
            return Err(invalid(format!(
                "slot {} does not exist: the arena has {} slots",
                req.slot,
                arena.slot_count()
            )));
        }
        let rollback = rank.lock().rollback;
        if let Some(rb) = rollback
            && req.step > rb
        {
            // A snapshot from before the job's restart: the new timeline re-saves these steps.
            arena.transition(req.slot, SlotState::Sealed, SlotState::Free);
            return Err(refuse(
                Code::FailedPrecondition,
                ErrorKind::Stale,
                format!("the job restarts from step {rb}: load it before saving step {}", req.step),
            ));
        }
        if !arena.transition(req.slot, SlotState::Sealed, SlotState::Persisting) {
            let state = arena.state(req.slot).map_or("corrupt".to_string(), |s| format!("{s:?}").to_lowercase());
            return Err(precondition(format!(
                "slot {} is {state}, not sealed: hand over only a slot this rank sealed, once",
                req.slot
            )));
        }
        match arena.content(req.slot) {
            Ok(c) if c.step == req.step => {}
            Ok(c) => {
                arena.transition(req.slot, SlotState::Persisting, SlotState::Sealed);
                return Err(invalid(format!("slot {} holds step {}, not step {}", req.slot, c.step, req.step)));
            }
            Err(e) => {
                arena.release(req.slot);
                return Err(to_status(&e.into()));
            }
        }
        let job = PersistJob {
            arena: arena.clone(),
            slot: req.slot,
            step: req.step,
            world_size,
            handed_at: Instant::now(),
            flushed: false,
            resumed: false,
        };
        if let Err(job) = rank.enqueue(job) {
            job.arena.transition(job.slot, SlotState::Persisting, SlotState::Sealed);
            return Err(refuse(
                Code::Unavailable,
                ErrorKind::Closed,
                "the agent is shutting down, or more snapshots are queued than the arena has slots",
            ));
        }
        self.agent.metrics.save_stall.observe(Duration::from_micros(req.stall_us).as_secs_f64());
        {
            let mut inner = rank.lock();
            if req.request != 0 && inner.pending_request.is_some_and(|p| p <= req.request) {
                inner.pending_request = None;
            }
        }
        rank.handovers.send_replace((req.request, req.step));
        {
            let mut inner = rank.lock();
            inner.prefetched = None;
            if let Some(s) = inner.session.as_mut() {
                s.handed_over = true;
            }
        }
        tracing::debug!(rank = rank.rank, step = req.step, slot = req.slot, "snapshot handed over");
        Ok(Response::new(pb::HandoverReply {}))
    }

    async fn locate(&self, req: Request<pb::LocateRequest>) -> Result<Response<pb::LocateReply>, Status> {
        let req = req.into_inner();
        let rank = self.session(req.session)?;
        {
            let mut inner = rank.lock();
            if !inner.session.as_ref().is_some_and(|s| s.handed_over) {
                inner.restoring_since.get_or_insert_with(Instant::now);
            }
        }
        let settled = async {
            let _staging = rank.staging.lock().await;
            self.agent.settle(&rank).await.map_err(|e| to_status(&e))?;
            self.locate_settled(&rank, req).await
        }
        .await;
        rank.lock().restoring_since = None;
        settled
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatReply>, Status> {
        let req = req.into_inner();
        let rank = self.session(req.session)?;
        let phase = ckptd_proto::phase_from_wire(req.phase).ok();
        self.agent.on_heartbeat(&rank, req.step, phase);
        let mut inner = rank.lock();
        inner.last_heartbeat = Some((req.step, phase));
        Ok(Response::new(pb::HeartbeatReply { snapshot_request: inner.pending_request.unwrap_or(0) }))
    }
}

impl Service {
    /// `Locate`, once the rank's persists have settled (staging lock held by the caller).
    async fn locate_settled(
        &self,
        rank: &Arc<Rank>,
        req: pb::LocateRequest,
    ) -> Result<Response<pb::LocateReply>, Status> {
        let (known, rollback) = {
            let inner = rank.lock();
            (inner.committed, inner.rollback)
        };
        let agent = self.agent.clone();
        let r = rank.clone();
        let (step, staged_from_storage) = self
            .blocking(move || {
                // After a restart order, the newest step is the one the job restarts from, the
                // same for every rank, even if a later step commits meanwhile. Otherwise the
                // memory tier answers for the newest step unless storage holds a newer committed
                // one; strict always looks at storage's newest step.
                let known =
                    known.filter(|&k| !req.strict && slots::memory_tier_serves(&agent.engine, &agent.cfg.job, k));
                match req.step.or(rollback).or(known) {
                    Some(step) => agent.stage(&r, step),
                    None => agent.stage_newest(&r, req.strict)?.ok_or_else(|| crate::Error::NoCheckpoint {
                        job: agent.cfg.job.clone(),
                        store: agent.engine.store().url().to_string(),
                    }),
                }
            })
            .await?;
        let from_storage = {
            // The trainer loaded a committed step: it runs the new timeline, its saves count
            // again, and it needs no restart.
            let mut inner = rank.lock();
            inner.rollback = None;
            inner.awaiting_restart = None;
            // A step the prefetch read from storage came from storage, whoever staged it.
            // Every load of it until the trainer saves (a restore describes, then loads).
            let prefetched = inner.prefetched == Some(step);
            staged_from_storage || prefetched
        };
        let source = if from_storage { "storage" } else { "memory" };
        self.agent.metrics.restores.get_or_create(&super::metrics::SourceLabel { source: source.into() }).inc();
        let (arena, slot) = self.agent.in_memory(rank, step).ok_or_else(|| {
            refuse(
                Code::Aborted,
                ErrorKind::Core(ckpt_core::ErrorKind::Transient),
                format!("step {step} left the arena before it could be read; retry the load"),
            )
        })?;
        tracing::info!(rank = rank.rank, step, source, "restore staged");
        Ok(Response::new(pb::LocateReply { step, slot, arena_path: arena.path().display().to_string(), from_storage }))
    }
}

#[tonic::async_trait]
impl Admin for Service {
    async fn snapshot_now(
        &self,
        req: Request<pb::SnapshotNowRequest>,
    ) -> Result<Response<pb::SnapshotNowReply>, Status> {
        let req = req.into_inner();
        let targets: Vec<Arc<Rank>> = self
            .agent
            .ranks()
            .into_iter()
            .filter(|r| req.rank.is_none_or(|want| want == r.rank))
            .filter(|r| r.lock().session.is_some())
            .collect();
        if targets.is_empty() {
            let who = req.rank.map_or("no trainer is".to_string(), |r| format!("rank {r} is not"));
            return Err(refuse(Code::NotFound, ErrorKind::AgentUnavailable, format!("{who} attached to this agent")));
        }
        let reason = if req.reason.is_empty() { "requested by an operator".to_string() } else { req.reason };
        let mut asked = Vec::with_capacity(targets.len());
        for rank in targets {
            let id = self.agent.next_id();
            rank.lock().pending_request = Some(id);
            rank.notify(Event::SnapshotRequested(pb::SnapshotRequested { request: id, reason: reason.clone() }));
            tracing::info!(rank = rank.rank, request = id, reason = %crate::text::peer(&reason), "snapshot requested");
            asked.push((rank, id));
        }
        let wait = Duration::from_millis(req.timeout_ms).min(MAX_SNAPSHOT_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        let mut ranks = Vec::with_capacity(asked.len());
        for (rank, id) in asked {
            let mut rx = rank.handovers.subscribe();
            let got = tokio::time::timeout_at(deadline, rx.wait_for(|(req, _)| *req >= id)).await;
            let (taken, step) = match got {
                Ok(Ok(v)) => (true, v.1),
                _ => (false, 0),
            };
            ranks.push(pb::RankSnapshot { rank: rank.rank, request: id, taken, step });
        }
        Ok(Response::new(pb::SnapshotNowReply { ranks }))
    }

    async fn health(&self, _req: Request<pb::HealthRequest>) -> Result<Response<pb::HealthReply>, Status> {
        let h = self.agent.health.as_ref().ok_or_else(|| precondition("health monitoring is off in this agent"))?;
        let status = h.status();
        let json = serde_json::to_string(&status).map_err(|e| Status::internal(format!("cannot encode: {e}")))?;
        Ok(Response::new(pb::HealthReply { json, text: status.to_string() }))
    }

    async fn inject(&self, req: Request<pb::InjectRequest>) -> Result<Response<pb::InjectReply>, Status> {
        use crate::health::Injection;
        let h = self.agent.health.as_ref().ok_or_else(|| precondition("health monitoring is off in this agent"))?;
        let injection = match req.into_inner().fault {
            Some(pb::inject_request::Fault::Xid(x)) => Injection::Xid { xid: x.xid, gpu: x.gpu },
            Some(pb::inject_request::Fault::Hang(x)) => Injection::Hang { rank: x.rank },
            Some(pb::inject_request::Fault::IbDown(x)) => Injection::IbDown { port: x.port },
            None => return Err(invalid("say which fault to inject: xid, hang or ib_down")),
        };
        tracing::warn!(?injection, "fault drill");
        h.inject(injection).map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::InjectReply {}))
    }

    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        let ranks = self
            .agent
            .ranks()
            .into_iter()
            .map(|r| {
                let queued = *r.in_flight.borrow();
                let inner = r.lock();
                let tier = inner.arena.as_ref().and_then(|a| slots::memory_tier_step(a));
                pb::RankStatus {
                    rank: r.rank,
                    attached: inner.session.is_some(),
                    arena_path: inner.arena.as_ref().map(|a| a.path().display().to_string()).unwrap_or_default(),
                    has_memory_tier: tier.is_some(),
                    memory_tier_step: tier.unwrap_or(0),
                    has_durable: inner.last_durable.is_some(),
                    last_durable_step: inner.last_durable.unwrap_or(0),
                    queued,
                    last_heartbeat_step: inner.last_heartbeat.map_or(0, |h| h.0),
                }
            })
            .collect();
        Ok(Response::new(pb::StatusReply {
            job: self.agent.cfg.job.clone(),
            store: self.agent.engine.store().url().to_string(),
            ranks,
        }))
    }
}
