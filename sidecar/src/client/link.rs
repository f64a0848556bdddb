//! Sidecar mode: the trainer's session with the agent over its Unix socket.
//!
//! A session is one `Attach` call whose server stream stays open for the life of the
//! checkpointer. The agent pushes events down it (a snapshot request, a step durable, a save
//! failed); a task here routes them to the waiting [`SaveHandle`](super::SaveHandle)s and to
//! [`Link::wait_snapshot_request`]. Closing the stream (this process exiting, even by SIGKILL) is
//! how the agent learns the trainer is gone and flushes its newest sealed snapshot.
//!
//! The calls are blocking (the checkpointer's API is), run on a small runtime owned by the link.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use ckptd_proto::v1::trainer_client::TrainerClient;
use ckptd_proto::v1::{self as pb, trainer_event::Event};
use tonic::transport::Channel;

use super::handle::SaveState;
use crate::error::{Error, ErrorKind, Result};
use crate::rpc;

/// What the agent said when the session opened.
#[derive(Debug, Clone)]
pub(crate) struct Attached {
    pub session: u64,
    pub arena_path: Option<PathBuf>,
}

#[derive(Debug, Default)]
struct Routing {
    /// Saves handed over and not yet durable, by step.
    pending: HashMap<u64, Vec<Arc<SaveState>>>,
    /// Newest snapshot request not yet answered by a handover.
    request: Option<u64>,
    /// Set once the event stream ended: why the agent is gone.
    gone: Option<String>,
    /// The newest restore order (step, generation) not yet taken by the trainer.
    restore: Option<(u64, u64)>,
    /// Why the agent asked the trainer to stop, if it did.
    stop: Option<String>,
    /// An order this process ends on (see [`Order`]), until the script takes it.
    standing: Option<Order>,
    /// The script took a restore order at least once: it acts on orders itself, so the library
    /// ends the process only when the grace period runs out, never at its next call.
    polls: bool,
}

#[derive(Debug)]
struct Shared {
    routing: Mutex<Routing>,
    cv: Condvar,
    socket: PathBuf,
    /// How long an order waits for the script before this process exits (`None`: never).
    grace: Option<Duration>,
}

/// The session with the agent.
pub(crate) struct Link {
    rt: tokio::runtime::Runtime,
    socket: PathBuf,
    client: TrainerClient<Channel>,
    attached: Attached,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("socket", &self.socket).field("session", &self.attached.session).finish()
    }
}

impl Link {
    /// Connects and attaches `rank`; fails with [`Error::AgentUnavailable`] when nothing answers.
    /// `grace`: how long a restart or stop order waits for the script before the event task ends
    /// the process ([`super::orders`]); `None` never ends it.
    pub(crate) fn attach(
        socket: &Path,
        job: &str,
        rank: u32,
        world_size: u32,
        grace: Option<Duration>,
    ) -> Result<Link> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ckpt-agent-link")
            .enable_all()
            .build()
            .map_err(|e| Error::AgentUnavailable { socket: socket.into(), reason: format!("cannot start: {e}") })?;
        let channel = rt.block_on(rpc::unix_channel(socket))?;
        let mut client = TrainerClient::new(channel)
            .max_decoding_message_size(ckptd_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(ckptd_proto::MAX_MESSAGE_BYTES);
        let req = pb::AttachRequest {
            job: job.to_string(),
            rank,
            world_size,
            pid: std::process::id(),
            client_version: crate::VERSION.to_string(),
        };
        let (attached, stream) = rt.block_on(async {
            let mut stream = client.attach(req).await.map_err(|s| rpc::from_status(socket, "attach", s))?.into_inner();
            match stream.message().await {
                Ok(Some(pb::TrainerEvent { event: Some(Event::Attached(a)) })) => Ok((a, stream)),
                Ok(_) => Err(Error::AgentUnavailable {
                    socket: socket.into(),
                    reason: "the agent closed the session before confirming it".into(),
                }),
                Err(s) => Err(rpc::from_status(socket, "attach", s)),
            }
        })?;
        let attached = Attached {
            session: attached.session,
            arena_path: (!attached.arena_path.is_empty()).then(|| PathBuf::from(attached.arena_path)),
        };
        let shared =
            Arc::new(Shared { routing: Mutex::default(), cv: Condvar::new(), socket: socket.to_path_buf(), grace });
        rt.spawn(route_events(stream, shared.clone()));
        Ok(Link { rt, socket: socket.to_path_buf(), client, attached, shared })
    }

    pub(crate) fn attached(&self) -> &Attached {
        &self.attached
    }

    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    fn check_alive(&self) -> Result<()> {
        match &self.shared.routing.lock().unwrap_or_else(|p| p.into_inner()).gone {
            Some(reason) => Err(Error::AgentUnavailable { socket: self.socket.clone(), reason: reason.clone() }),
            None => Ok(()),
        }
    }

    /// Has the agent create or grow this rank's arena; returns its path.
    pub(crate) fn prepare_arena(&self, slot_size: u64) -> Result<PathBuf> {
        self.check_alive()?;
        let mut c = self.client.clone();
        let req = pb::PrepareArenaRequest { session: self.attached.session, slot_size };
        let reply = self
            .rt
            .block_on(c.prepare_arena(req))
            .map_err(|s| rpc::from_status(&self.socket, "prepare_arena", s))?
            .into_inner();
        Ok(PathBuf::from(reply.arena_path))
    }

    /// Hands a sealed slot to the agent. `state` is completed when the agent reports the step
    /// durable or failed. `request` is the snapshot request this save answers (0: none).
    pub(crate) fn handover(
        &self,
        step: u64,
        slot: u32,
        stall: Duration,
        state: Arc<SaveState>,
        request: u64,
    ) -> Result<()> {
        self.check_alive()?;
        self.shared
            .routing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pending
            .entry(step)
            .or_default()
            .push(state.clone());
        let mut c = self.client.clone();
        let req = pb::HandoverRequest {
            session: self.attached.session,
            step,
            slot,
            request,
            stall_us: stall.as_micros().min(u64::MAX as u128) as u64,
        };
        if let Err(s) = self.rt.block_on(c.handover(req)) {
            let mut r = self.shared.routing.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(v) = r.pending.get_mut(&step) {
                v.retain(|x| !Arc::ptr_eq(x, &state));
            }
            if request != 0 {
                r.request.get_or_insert(request);
            }
            return Err(rpc::from_status(&self.socket, "handover", s));
        }
        Ok(())
    }

    /// Asks the agent for `step` (default: the newest committed step whose data verifies; with
    /// `strict`, a damaged newest step is an error) staged in the arena.
    pub(crate) fn locate(&self, step: Option<u64>, strict: bool) -> Result<pb::LocateReply> {
        self.check_alive()?;
        let mut c = self.client.clone();
        let req = pb::LocateRequest { session: self.attached.session, step, strict };
        Ok(self.rt.block_on(c.locate(req)).map_err(|s| rpc::from_status(&self.socket, "locate", s))?.into_inner())
    }

    /// Reports progress; returns the id of a snapshot the agent requested, if any.
    pub(crate) fn heartbeat(&self, step: u64, phase: ckpt_core::Phase) -> Result<Option<u64>> {
        self.check_alive()?;
        let mut c = self.client.clone();
        let req = pb::HeartbeatRequest { session: self.attached.session, step, phase: pb::Phase::from(phase) as i32 };
        let reply = self
            .rt
            .block_on(c.heartbeat(req))
            .map_err(|s| rpc::from_status(&self.socket, "heartbeat", s))?
            .into_inner();
        let mut r = self.shared.routing.lock().unwrap_or_else(|p| p.into_inner());
        if reply.snapshot_request != 0 {
            r.request = Some(r.request.map_or(reply.snapshot_request, |x| x.max(reply.snapshot_request)));
        }
        Ok(r.request)
    }

    /// Takes the newest restore order, if one arrived. From then on this script is known to act
    /// on orders itself.
    pub(crate) fn take_restore_order(&self) -> Option<(u64, u64)> {
        let mut r = self.shared.routing.lock().unwrap_or_else(|p| p.into_inner());
        r.polls = true;
        if matches!(r.standing, Some(Order::Restart { .. })) {
            r.standing = None;
        }
        r.restore.take()
    }

    /// Called from the script's own calls into the library (fence, save, heartbeat): a script
    /// that never takes orders and is still running (not blocked) ends here at once on a standing
    /// order, instead of at the end of the grace period.
    pub(crate) fn act_on_standing_order(&self) {
        if self.shared.grace.is_none() {
            return;
        }
        let order = {
            let r = self.shared.routing.lock().unwrap_or_else(|p| p.into_inner());
            if r.polls {
                return;
            }
            r.standing.clone()
        };
        if let Some(order) = order {
            exit_on(&order, "at its next call into ckptd");
        }
    }

    /// Why the agent asked this trainer to stop, if it did.
    pub(crate) fn stop_requested(&self) -> Option<String> {
        self.shared.routing.lock().unwrap_or_else(|p| p.into_inner()).stop.clone()
    }

    /// Takes the unanswered snapshot request: the save being started answers it, so that no
    /// other save (a background thread's) answers it again.
    pub(crate) fn take_request(&self) -> Option<u64> {
        self.shared.routing.lock().unwrap_or_else(|p| p.into_inner()).request.take()
    }

    /// The unanswered snapshot request, if any.
    pub(crate) fn pending_request(&self) -> Option<u64> {
        self.shared.routing.lock().unwrap_or_else(|p| p.into_inner()).request
    }

    /// Blocks up to `timeout` for a snapshot request; returns it without consuming it.
    pub(crate) fn wait_snapshot_request(&self, timeout: Duration) -> Result<Option<u64>> {
        let r = self.shared.routing.lock().unwrap_or_else(|p| p.into_inner());
        let (r, _) = self
            .shared
            .cv
            .wait_timeout_while(r, timeout, |r| r.request.is_none() && r.gone.is_none())
            .unwrap_or_else(|p| p.into_inner());
        if let Some(reason) = &r.gone {
            return Err(Error::AgentUnavailable { socket: self.socket.clone(), reason: reason.clone() });
        }
        Ok(r.request)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Dropping the runtime cancels the event task, which closes the session's stream.
        fail_all(&self.shared, "the checkpointer closed its session".into());
    }
}

async fn route_events(mut stream: tonic::Streaming<pb::TrainerEvent>, shared: Arc<Shared>) {
    let reason = loop {
        match stream.message().await {
            Ok(Some(pb::TrainerEvent { event: Some(ev) })) => {
                if let Some(order) = route(&shared, ev) {
                    tokio::spawn(act_on(order, shared.clone()));
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => break "the agent ended the session".to_string(),
            Err(s) => break format!("the session with the agent broke: {}", s.message()),
        }
    };
    tracing::error!(reason = %reason, "lost the ckptd agent; saves in flight fail");
    fail_all(&shared, reason);
}

/// An order this process ends on unless the script acts on it first.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Order {
    /// Restart: exit unless the script took the restore order `(step, generation)` meanwhile.
    Restart { step: u64, generation: u64 },
    /// Stop: exit.
    Stop { reason: String },
}

/// Waits out the grace period, then ends the process if the order still stands. Runs on the
/// link's own runtime thread, so it acts while the script's threads are blocked (in a collective,
/// holding the GIL); closing the checkpointer drops the runtime and cancels it.
async fn act_on(order: Order, shared: Arc<Shared>) {
    let Some(grace) = shared.grace else { return };
    tokio::time::sleep(grace).await;
    let standing = shared.routing.lock().unwrap_or_else(|p| p.into_inner()).standing.clone();
    if standing.as_ref() == Some(&order) {
        exit_on(&order, &format!("after waiting {grace:?} for the script to act"));
    }
}

/// Ends the process for `order`; `when` says at which point.
fn exit_on(order: &Order, when: &str) -> ! {
    match order {
        Order::Restart { step, generation } => super::orders::exit_process(
            super::orders::EXIT_RESTART,
            &format!("the job restarts from step {step} (generation {generation}); this worker ends {when}"),
        ),
        Order::Stop { reason } => super::orders::exit_process(
            super::orders::EXIT_STOP,
            &format!("the agent stopped this worker ({}); it ends {when}", crate::text::peer(reason)),
        ),
    }
}

fn route(shared: &Shared, ev: Event) -> Option<Order> {
    let mut r = shared.routing.lock().unwrap_or_else(|p| p.into_inner());
    match ev {
        Event::Attached(_) => {}
        Event::SnapshotRequested(req) => {
            tracing::info!(request = req.request, reason = %req.reason, "the agent requests a snapshot");
            r.request = Some(r.request.map_or(req.request, |x| x.max(req.request)));
            shared.cv.notify_all();
        }
        Event::Durable(d) => {
            // The agent's view of the shard and the MANIFEST; the commit is learned of here.
            let at = ckpt_core::CommitTimings::from_unix_ns;
            let timings = at(d.shard_durable_unix_ns).map(|shard_durable| ckpt_core::CommitTimings {
                shard_durable,
                committed: std::time::SystemTime::now(),
                manifest_written: at(d.manifest_written_unix_ns),
            });
            for s in r.pending.remove(&d.step).unwrap_or_default() {
                if let Some(t) = timings {
                    s.set_timings(t);
                }
                s.finish(Ok(()));
            }
        }
        Event::SaveFailed(f) => {
            let kind = ErrorKind::from_name(&f.kind).unwrap_or(ErrorKind::Core(ckpt_core::ErrorKind::Storage));
            let err = Arc::new(Error::Agent { op: "persist", kind, message: f.message });
            for s in r.pending.remove(&f.step).unwrap_or_default() {
                s.finish(Err(err.clone()));
            }
        }
        Event::Restore(o) => {
            tracing::warn!(step = o.step, generation = o.generation, restart = o.restart, "the agent orders a restore");
            r.restore = Some((o.step, o.generation));
            shared.cv.notify_all();
            let order = o.restart.then_some(Order::Restart { step: o.step, generation: o.generation })?;
            // A stop stands over a restart: the process ends either way, with the stop's code.
            if !matches!(r.standing, Some(Order::Stop { .. })) {
                r.standing = Some(order.clone());
            }
            return Some(order);
        }
        Event::Stop(s) => {
            tracing::warn!(reason = %s.reason, exit = s.exit, "the agent asks this trainer to stop");
            r.stop = Some(s.reason.clone());
            shared.cv.notify_all();
            let order = s.exit.then_some(Order::Stop { reason: s.reason })?;
            r.standing = Some(order.clone());
            return Some(order);
        }
    }
    None
}

fn fail_all(shared: &Shared, reason: String) {
    let mut r = shared.routing.lock().unwrap_or_else(|p| p.into_inner());
    let pending = std::mem::take(&mut r.pending);
    if r.gone.is_none() {
        r.gone = Some(reason.clone());
    }
    drop(r);
    shared.cv.notify_all();
    let err = Arc::new(Error::AgentUnavailable { socket: shared.socket.clone(), reason });
    for s in pending.into_values().flatten() {
        s.finish(Err(err.clone()));
    }
}
