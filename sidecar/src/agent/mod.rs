//! The per-pod agent, `ckptd agent`: serves every rank process of its pod over a Unix socket,
//! persists their snapshots out of process, keeps the newest durable snapshot of each rank in
//! memory, and still persists a snapshot whose trainer died.
//!
//! Why a separate process: in embedded mode a crashed trainer takes its unsaved snapshot with it,
//! and persist threads compete with training for CPU and the GIL. Here the trainer only copies
//! into its arena (a shared-memory file the agent created) and hands the sealed slot over; the
//! agent writes the shard, commits through storage as embedded mode does, and answers the next
//! load from the arena — filled from storage first when a pod restart emptied it.
//!
//! Layout: [`service`] implements the gRPC services (`Trainer`, `Admin` in `ckptd.v1`), [`rank`]
//! holds one rank's arena, session and persist thread, [`metrics`] the Prometheus endpoint. The
//! protocol and the slot state machine are described in docs/PROTOCOL.md.

mod incoming;
mod metrics;
mod rank;
mod service;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ckpt_core::arena::{self, Arena, SlotState};
use ckpt_core::slots;
use ckpt_core::{Compression, Engine, EngineConfig};
use tokio_util::sync::CancellationToken;

pub use metrics::Metrics;
use rank::Rank;

use crate::env::*;
use crate::error::{Error, Result};

/// Command-line flags of `ckptd agent`; each is also an environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Unix socket to serve trainers on (created with mode 0600).
    #[arg(long, env = ENV_SOCKET)]
    pub socket: PathBuf,
    /// Memory-backed directory for the ranks' arenas (an emptyDir with medium: Memory in Kubernetes).
    #[arg(long, env = ENV_ARENA_DIR, default_value = arena::DEFAULT_ARENA_DIR)]
    pub arena_dir: PathBuf,
    /// Store URL: file:///path, s3://bucket/prefix, oss://, gs://, az:// or memory://.
    #[arg(long, env = ENV_STORE, hide_env_values = true)]
    pub store: String,
    /// Job name (one directory on the store); trainers must attach with the same name.
    #[arg(long, env = ENV_JOB)]
    pub job: String,
    /// Arena slots per rank (2 lets one snapshot persist while the next is copied).
    #[arg(long, env = ENV_SLOTS, default_value_t = arena::DEFAULT_SLOTS)]
    pub slots: u32,
    /// Address for Prometheus `/metrics` and `/healthz` (e.g. 0.0.0.0:9101); off when unset.
    #[arg(long, env = ENV_METRICS_ADDR)]
    pub metrics_addr: Option<SocketAddr>,
    /// Ranks this pod runs (e.g. `0-7` or `0,2,4`): their newest committed step is prefetched into
    /// memory at start-up. Without it, a rank is prefetched when its trainer attaches.
    #[arg(long, env = ENV_RANKS, value_parser = parse_ranks)]
    pub ranks: Option<RankList>,
    /// The job's world size; checked against what trainers report.
    #[arg(long, env = ENV_WORLD_SIZE)]
    pub world_size: Option<u32>,
    /// The job's parallel layout, e.g. `dp=8,tp=4,pp=2` (also `data=`, `tensor=`, `pipeline=`; an
    /// omitted factor is 1). Its product must be `--world-size`; it is reported to the isolator.
    #[arg(long, env = ENV_PARALLEL)]
    pub parallel: Option<crate::layout::Layout>,
    /// What a rank restores from a step saved by another number of ranks: `wait` (refused: the job
    /// waits for its ranks) or `replicas` (its data-parallel replicas hold the same state: a rank
    /// restores the shard of the saved rank at its tensor- and pipeline-parallel position, taken
    /// from `--parallel`). Set by the webhook from `ckptd.io/on-resize`.
    #[arg(long, env = ENV_ON_RESIZE, default_value = "wait")]
    pub on_resize: String,
    /// The most ranks this agent serves, each with at most one trainer session; an attach beyond it
    /// is refused (ResourceExhausted). A rank keeps its arena and persist thread after its trainer
    /// detaches, so every rank served counts. Default: `--world-size`, else the number of
    /// `--ranks`, else 256.
    #[arg(long, env = ENV_MAX_SESSIONS)]
    pub max_sessions: Option<usize>,
    /// How long a SIGTERM waits for in-flight persists.
    #[arg(long, env = ENV_GRACE_PERIOD, default_value = "30s")]
    pub grace_period: humantime::Duration,
    /// Chunk compression: none, auto, zstd or zstd:<level>.
    #[arg(long, env = ENV_COMPRESSION, default_value = "none")]
    pub compression: String,
    /// CPU priority of the persist and encoder threads: normal, nice (nice 10) or idle
    /// (SCHED_IDLE). See docs/OPERATIONS.md.
    #[arg(long, env = ENV_PERSIST_PRIORITY, default_value = "nice")]
    pub persist_priority: String,
    /// How file:// shards are written: direct (O_DIRECT from the arena, buffered where refused),
    /// write-behind or buffered.
    #[arg(long, env = ENV_PERSIST_IO, default_value = "direct")]
    pub persist_io: String,
    /// How long a rank's shard waits for the step's commit (rank 0's agent sees every shard).
    #[arg(long, env = ENV_COMMIT_TIMEOUT, default_value = "10m")]
    pub commit_timeout: humantime::Duration,
    /// Committed steps to keep on the store (rank 0's agent applies it after each commit); 0 keeps all.
    #[arg(long, env = ENV_KEEP, default_value_t = 0)]
    pub keep: usize,
    /// The node isolator (`http://host:7443` or `https://...`). With it, steps are committed by the
    /// isolator once every rank voted, faults are reported to it and its commands reach trainers.
    #[arg(long, env = ENV_ISOLATOR)]
    pub isolator: Option<String>,
    /// File holding the bearer token the isolator expects.
    #[arg(long, env = ENV_ISOLATOR_TOKEN_FILE)]
    pub isolator_token_file: Option<PathBuf>,
    /// CA bundle (PEM) that signs the isolator's certificate.
    #[arg(long, env = ENV_ISOLATOR_CA)]
    pub isolator_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS to the isolator.
    #[arg(long, env = ENV_ISOLATOR_CERT, requires = "isolator_key")]
    pub isolator_cert: Option<PathBuf>,
    /// Client key (PEM) for mTLS to the isolator.
    #[arg(long, env = ENV_ISOLATOR_KEY, requires = "isolator_cert")]
    pub isolator_key: Option<PathBuf>,
    /// This node's name (downward API `spec.nodeName`), for fault reports.
    #[arg(long, env = ENV_NODE_NAME, default_value = "")]
    pub node: String,
    /// This pod's name (downward API `metadata.name`).
    #[arg(long, env = ENV_POD_NAME, default_value = "")]
    pub pod: String,
    /// This pod's namespace (downward API `metadata.namespace`).
    #[arg(long, env = ENV_POD_NAMESPACE, default_value = "")]
    pub namespace: String,
    /// After a restart or stop order, how long a trainer may stay attached without restoring
    /// before the agent sends it SIGKILL (the last resort for a process whose own exit did not
    /// happen: stopped, or wedged in the kernel). Needs the trainer's pid visible to the agent
    /// (`shareProcessNamespace: true` in Kubernetes); `0s` never signals.
    #[arg(long, env = ENV_RESTART_KILL_AFTER, default_value = "10s")]
    pub restart_kill_after: humantime::Duration,
    /// Health monitoring (NVML, kernel log, progress, NCCL, InfiniBand) and its policy.
    #[command(flatten)]
    pub health: crate::health::HealthArgs,
}

/// A set of ranks, parsed from `0-7`, `0,2,4` or `0-3,8`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankList(pub Vec<u32>);

/// The widest rank range one agent serves (`--ranks 0-4095`).
pub const MAX_RANKS_PER_AGENT: u32 = 4096;

/// Parses a [`RankList`].
pub fn parse_ranks(s: &str) -> std::result::Result<RankList, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("`{part}` is not a rank or a range like 0-7");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
                if a > b || b - a >= MAX_RANKS_PER_AGENT {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    if out.is_empty() {
        return Err("no ranks given (e.g. 0-7)".into());
    }
    out.sort_unstable();
    out.dedup();
    Ok(RankList(out))
}

/// A heartbeat to forward to the isolator.
#[derive(Debug, Clone, Copy)]
struct Forward {
    step: u64,
    step_time: Duration,
    phase: Option<ckpt_core::Phase>,
}

/// The agent's validated settings.
#[derive(Debug, Clone)]
pub(crate) struct AgentConfig {
    pub job: String,
    pub node: String,
    pub pod: String,
    pub namespace: String,
    pub arena_dir: PathBuf,
    pub slots: u32,
    pub world_size: Option<u32>,
    /// `--on-resize`, with the layout's model-parallel sizes.
    pub resize: ckpt_core::Resize,
    pub keep: usize,
    /// `--restart-kill-after`; `None` never signals.
    pub restart_kill_after: Option<Duration>,
}

/// A restart of the job from `step` (`None`: from scratch, nothing is committed) at `generation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RestoreOrder {
    pub step: Option<u64>,
    pub generation: u64,
}

impl RestoreOrder {
    /// The trainer event; `restart` when the receiving process runs the abandoned timeline.
    pub(crate) fn to_wire(self, restart: bool) -> ckptd_proto::v1::RestoreOrder {
        ckptd_proto::v1::RestoreOrder {
            step: self.step.unwrap_or(0),
            generation: self.generation,
            restart,
            from_scratch: self.step.is_none(),
        }
    }
}

/// The agent's shared state.
#[derive(Debug)]
pub(crate) struct Agent {
    pub cfg: AgentConfig,
    pub engine: Engine,
    pub metrics: Arc<Metrics>,
    /// Health controller, fed with trainer heartbeats.
    pub health: Option<crate::health::Health>,
    /// The isolator, when one is configured.
    pub link: Option<crate::isolator::link::IsolatorLink>,
    /// Whether the isolator command stream runs.
    commands_started: std::sync::atomic::AtomicBool,
    /// The phase last forwarded to the isolator, per rank.
    sent_phase: Mutex<BTreeMap<u32, ckpt_core::Phase>>,
    /// Heartbeats waiting to be forwarded to the isolator, the newest per rank. One task sends
    /// them, in order: two changes of a rank's phase sent by two tasks could arrive swapped and
    /// leave the isolator with the older one.
    forward: Mutex<BTreeMap<u32, Forward>>,
    forward_wake: Arc<tokio::sync::Notify>,
    forward_started: std::sync::atomic::AtomicBool,
    /// The newest restore order (the isolator's, or this agent's own without one), replayed to
    /// trainers that attach after it.
    pub restore_order: Mutex<Option<RestoreOrder>>,
    ranks: Mutex<BTreeMap<u32, Arc<Rank>>>,
    next_id: AtomicU64,
    /// Generations of this agent's own restart orders (no isolator).
    local_generation: AtomicU64,
    rt: tokio::runtime::Handle,
}

fn config_error(what: &str, reason: impl std::fmt::Display) -> Error {
    Error::Config { what: what.into(), reason: reason.to_string() }
}

/// Runs the agent until SIGTERM or SIGINT, then finishes in-flight persists within the grace
/// period.
pub fn run(args: AgentArgs) -> Result<()> {
    ckpt_core::store::layout::validate_job(&args.job).map_err(|e| config_error("--job", e))?;
    if args.slots == 0 || args.slots > arena::MAX_SLOTS {
        return Err(config_error("--slots", format!("{} is outside 1..={}", args.slots, arena::MAX_SLOTS)));
    }
    if args.world_size == Some(0) {
        return Err(config_error("--world-size", "must be at least 1"));
    }
    if let (Some(w), Some(r)) = (args.world_size, &args.ranks)
        && let Some(bad) = r.0.iter().find(|&&r| r >= w)
    {
        return Err(config_error("--ranks", format!("rank {bad} is outside world size {w}")));
    }
    if let (Some(w), Some(layout)) = (args.world_size, &args.parallel)
        && let Some(why) = layout.mismatch(u64::from(w))
    {
        return Err(config_error(
            "--parallel",
            format!("{why} (--world-size): fix the ckptd.io/parallel annotation or the job's size"),
        ));
    }
    let max_sessions = max_sessions(&args)?;
    let compression: Compression = args.compression.parse().map_err(|e| config_error("--compression", e))?;
    let mut ecfg = EngineConfig::default();
    ecfg.persist.compression = compression;
    ecfg.persist.priority = args.persist_priority.parse().map_err(|e| config_error("--persist-priority", e))?;
    ecfg.persist.file_io = args.persist_io.parse().map_err(|e| config_error("--persist-io", e))?;
    ecfg.commit.deadline = args.commit_timeout.into();
    let engine = Engine::open(&args.store, ecfg).map_err(|e| match e.kind() {
        ckpt_core::ErrorKind::InvalidInput => config_error("--store", e),
        _ => Error::Core(e),
    })?;
    arena::prepare_dir(&args.arena_dir).map_err(|e| config_error("--arena-dir", e))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ckptd-agent")
        .enable_all()
        .build()
        .map_err(|e| Error::Runtime { what: "start the agent runtime", reason: e.to_string() })?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut registry);
    let shutdown = CancellationToken::new();
    let node = if args.node.is_empty() { hostname() } else { args.node.clone() };
    let (health, decisions) =
        crate::health::Health::start(&args.health, node.clone(), &mut registry, rt.handle(), shutdown.clone())?;
    let link = match &args.isolator {
        Some(url) => Some(rt.block_on(connect_isolator(url, &args))?),
        None => None,
    };
    let agent = Arc::new(Agent {
        cfg: AgentConfig {
            job: args.job.clone(),
            node,
            pod: args.pod.clone(),
            namespace: args.namespace.clone(),
            arena_dir: args.arena_dir.clone(),
            slots: args.slots,
            world_size: args.world_size,
            resize: crate::resize::parse(Some(&args.on_resize), args.parallel.map(|l| l.to_string()).as_deref())
                .map_err(|reason| config_error("--on-resize", reason))?,
            keep: args.keep,
            restart_kill_after: Some(args.restart_kill_after.into()).filter(|d: &Duration| !d.is_zero()),
        },
        engine,
        metrics,
        health: Some(health),
        link,
        commands_started: std::sync::atomic::AtomicBool::new(false),
        sent_phase: Mutex::new(BTreeMap::new()),
        forward: Mutex::new(BTreeMap::new()),
        forward_wake: Arc::new(tokio::sync::Notify::new()),
        forward_started: std::sync::atomic::AtomicBool::new(false),
        restore_order: Mutex::new(None),
        ranks: Mutex::new(BTreeMap::new()),
        next_id: AtomicU64::new(1),
        local_generation: AtomicU64::new(0),
        rt: rt.handle().clone(),
    });
    rt.spawn(handle_decisions(agent.clone(), decisions));
    let result = rt.block_on(serve(agent.clone(), args, max_sessions, Arc::new(registry), shutdown));
    // Persist threads may still hold the engine; stop them before the runtime goes.
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Sessions served without `--max-sessions`, `--world-size` or `--ranks`.
const DEFAULT_MAX_SESSIONS: usize = 256;
/// Trainer-socket connections beyond one per session: `ckptctl`, probes, a trainer reconnecting.
const SPARE_CONNECTIONS: usize = 64;

/// `--max-sessions`, or its default; at least every rank of `--ranks`, which the agent serves from
/// the start.
fn max_sessions(args: &AgentArgs) -> Result<usize> {
    let named = args.ranks.as_ref().map(|r| r.0.len());
    match args.max_sessions {
        Some(0) => Err(config_error("--max-sessions", "must be at least 1")),
        Some(m) if named.is_some_and(|n| n > m) => Err(config_error(
            "--max-sessions",
            format!("{m} is fewer than the {} ranks of --ranks", named.unwrap_or_default()),
        )),
        Some(m) => Ok(m),
        None => Ok(args.world_size.map(|w| w as usize).or(named).unwrap_or(DEFAULT_MAX_SESSIONS)),
    }
}

async fn serve(
    agent: Arc<Agent>,
    args: AgentArgs,
    max_sessions: usize,
    registry: Arc<prometheus_client::registry::Registry>,
    shutdown: CancellationToken,
) -> Result<()> {
    let listener = bind_socket(&args.socket)?;
    let metrics_task = match args.metrics_addr {
        Some(addr) => Some(metrics::serve(addr, registry, shutdown.clone()).await?),
        None => None,
    };
    tracing::info!(socket = %args.socket.display(), job = %agent.cfg.job, store = %agent.engine.store().url(), "agent serving");
    // Ranks named up front: adopt arenas left by a previous agent and prefetch from storage.
    for &r in args.ranks.as_ref().map(|l| l.0.as_slice()).unwrap_or(&[]) {
        match agent.rank(r) {
            Ok(rank) => agent.spawn_prefetch(rank),
            Err(e) => tracing::error!(rank = r, error = %e, "cannot prepare rank"),
        }
    }
    if args.ranks.is_some()
        && let Some(w) = agent.cfg.world_size
    {
        agent.register_with_isolator(w);
    }
    let signals = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down: finishing in-flight persists");
            shutdown.cancel();
        })
    };
    let stop = shutdown.clone();
    let agent_for_stop = agent.clone();
    // One connection per session plus spares; at the bound, a connection that has sent no request
    // yet is evicted for the newcomer, so `ckptctl agent-status` is answered while idle peers pile up.
    let gate = crate::gate::Gate::new(max_sessions.saturating_add(SPARE_CONNECTIONS));
    let server = service::router(agent.clone(), max_sessions).serve_with_incoming_shutdown(
        incoming::Incoming::new(listener, gate),
        async move {
            stop.cancelled().await;
            // Sessions are endless streams: end them, or the server waits for them forever.
            agent_for_stop.end_all_sessions();
        },
    );
    let served = server.await;
    signals.abort();
    shutdown.cancel();
    let _ = std::fs::remove_file(&args.socket);
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    let grace: Duration = args.grace_period.into();
    let ranks: Vec<Arc<Rank>> = agent.ranks.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
    let drain = tokio::task::spawn_blocking(move || {
        for r in ranks {
            r.stop_and_join();
        }
    });
    match tokio::time::timeout(grace, drain).await {
        Ok(_) => tracing::info!("every persist finished"),
        Err(_) => {
            tracing::error!(
                grace_s = grace.as_secs(),
                "persists still running at the end of the grace period; exiting"
            );
            return Err(Error::Timeout {
                what: "the persists of the grace period".into(),
                waited_ms: grace.as_millis() as u64,
            });
        }
    }
    served.map_err(|e| Error::Serve { what: "the trainer socket", reason: e.to_string() })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot watch signals; the agent stops only when killed");
            std::future::pending::<()>().await;
        }
    }
}

/// Binds the trainer socket with mode 0600, refusing to steal it from a live agent.
fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let what = "--socket";
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| config_error(what, format!("cannot create {}: {e}", dir.display())))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(config_error(what, format!("another agent is serving {}", path.display())));
        }
        std::fs::remove_file(path)
            .map_err(|e| config_error(what, format!("cannot remove the stale socket {}: {e}", path.display())))?;
    }
    // Bind under a temporary name, restrict it, then move it into place: no window in which
    // another user could connect.
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = tokio::net::UnixListener::bind(&tmp)
        .map_err(|e| config_error(what, format!("cannot listen on {}: {e}", path.display())))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        config_error(what, format!("cannot set up {}: {e}", path.display()))
    })?;
    Ok(listener)
}

impl Agent {
    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers every rank this agent knows with the isolator (again, when one more attached),
    /// then starts following its commands.
    fn register_with_isolator(self: &Arc<Self>, world_size: u32) {
        let Some(link) = self.link.clone() else { return };
        let agent = self.clone();
        self.rt.spawn(async move {
            let mut ranks: Vec<u32> = agent.ranks().iter().map(|r| r.rank).collect();
            if ranks.is_empty() {
                return;
            }
            ranks.sort_unstable();
            let cfg = &agent.cfg;
            let store = agent.engine.store().url().to_string();
            // Retried with backoff: an isolator that is down (a leader change, a rollout) must not
            // leave the agent without commits or commands until the next trainer attaches.
            let mut backoff = Duration::from_millis(500);
            let registered = loop {
                match link.register(&cfg.job, &ranks, world_size, &cfg.node, &cfg.pod, &cfg.namespace, &store).await {
                    Err(e) if e.kind() != crate::ErrorKind::Config => {
                        tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot register with the isolator");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                    other => break other,
                }
            };
            match registered {
                Ok(reply) => {
                    tracing::info!(?ranks, generation = reply.generation, "registered with the isolator");
                    // A pod started after a restart (a rescheduled rank): its trainer restores the
                    // step the rest of the job restarted from.
                    // Its trainers are new processes: the order is news to them, not a restart.
                    let known = agent.restore_order.lock().unwrap_or_else(|p| p.into_inner()).is_some();
                    if reply.generation > 0 && reply.has_committed && !known {
                        let order = RestoreOrder { step: Some(reply.committed_step), generation: reply.generation };
                        agent.order_restore(order, false);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot register with the isolator");
                    return;
                }
            }
            if !agent.commands_started.swap(true, Ordering::AcqRel) {
                let mut commands = link.commands();
                let a = agent.clone();
                tokio::spawn(async move {
                    while let Some(cmd) = commands.recv().await {
                        a.on_command(cmd);
                    }
                });
            }
        });
    }

    /// An isolator command: forwarded to every attached trainer.
    fn on_command(self: &Arc<Self>, cmd: ckptd_proto::v1::Command) {
        use ckptd_proto::v1::{self as pb, command::Command as C, trainer_event::Event};
        match cmd.command {
            Some(C::SnapshotNow(s)) => {
                for rank in self.ranks().into_iter().filter(|r| r.lock().session.is_some()) {
                    let id = self.next_id();
                    rank.lock().pending_request = Some(id);
                    tracing::warn!(rank = rank.rank, request = id, reason = %crate::text::peer(&s.reason), "isolator requests a snapshot");
                    rank.notify(Event::SnapshotRequested(pb::SnapshotRequested {
                        request: id,
                        reason: s.reason.clone(),
                    }));
                }
            }
            Some(C::Stop(s)) => {
                for rank in self.ranks() {
                    tracing::warn!(rank = rank.rank, reason = %crate::text::peer(&s.reason), "isolator stops the trainer");
                    rank.notify(Event::Stop(pb::StopOrder { reason: s.reason.clone(), exit: true }));
                    let session = rank.lock().session.as_ref().map(|s| s.id);
                    if let Some(id) = session {
                        self.kill_if_still_attached(&rank, id, false);
                    }
                }
            }
            Some(C::Restore(r)) => {
                let step = (!r.from_scratch).then_some(r.step);
                self.order_restore(RestoreOrder { step, generation: r.generation }, true);
            }
            None => {}
        }
    }

    /// The job restarts from `order.step` at its generation: every trainer is told, and snapshots
    /// of later steps (the abandoned timeline) are dropped until the trainer has loaded a step.
    /// With `restart`, the attached trainers run the abandoned timeline: their library ends them
    /// ([`crate::client::EXIT_RESTART`]) for their launcher to restart, and a trainer still
    /// attached without having restored after `--restart-kill-after` gets SIGKILL.
    fn order_restore(self: &Arc<Self>, order: RestoreOrder, restart: bool) {
        use ckptd_proto::v1::trainer_event::Event;
        *self.restore_order.lock().unwrap_or_else(|p| p.into_inner()) = Some(order);
        // The ranks' phases are unknown until their trainers name one again, as on the isolator:
        // a fault meanwhile is not reported in the phase of the abandoned timeline, and the next
        // phase named is forwarded whatever it is.
        self.sent_phase.lock().unwrap_or_else(|e| e.into_inner()).clear();
        for rank in self.ranks() {
            let session = {
                let mut inner = rank.lock();
                inner.rollback = order.step;
                let session = inner.session.as_ref().map(|s| s.id).filter(|_| restart);
                inner.awaiting_restart = session;
                session
            };
            tracing::warn!(rank = rank.rank, step = ?order.step, generation = order.generation, restart, "restore ordered");
            rank.notify(Event::Restore(order.to_wire(restart)));
            if let Some(id) = session {
                self.kill_if_still_attached(&rank, id, true);
            }
        }
    }

    /// The last resort after an order to end: when session `id` of `rank` is still attached after
    /// `--restart-kill-after` (and, for a restart, has not restored meanwhile), its process gets
    /// SIGKILL. Its library should have ended it after its own, shorter grace; a process that did
    /// not is stopped (SIGSTOP), or wedged where its threads cannot run. The pid comes from the
    /// socket's peer credentials: while the session's connection is open, that process is alive,
    /// so the pid names it and no other.
    fn kill_if_still_attached(self: &Arc<Self>, rank: &Arc<Rank>, id: u64, restart: bool) {
        let Some(after) = self.cfg.restart_kill_after else { return };
        let rank = rank.clone();
        self.rt.spawn(async move {
            tokio::time::sleep(after).await;
            let target = {
                let inner = rank.lock();
                let attached = inner.session.as_ref().filter(|s| s.id == id);
                let pending = !restart || inner.awaiting_restart == Some(id);
                attached.filter(|_| pending).map(|s| (s.peer_pid, s.pid))
            };
            match target {
                None => {}
                Some((Some(pid), _)) if pid != std::process::id() as i32 => {
                    tracing::error!(rank = rank.rank, pid, after = ?after, "the trainer did not end on its order: sending SIGKILL");
                    // SAFETY: `kill` takes plain integers; `pid` is positive (never a process
                    // group or every process) and is the live peer of this session's connection.
                    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
                        let e = std::io::Error::last_os_error();
                        tracing::error!(rank = rank.rank, pid, error = %e, "cannot signal the trainer");
                    }
                }
                Some((_, reported)) => tracing::error!(
                    rank = rank.rank,
                    reported_pid = reported,
                    "the trainer did not end on its order, and its process is not visible to this agent \
                     (share the pod's process namespace to let the agent end it)"
                ),
            }
        });
    }

    /// A trainer heartbeat: feeds the health controller and, rate-limited to step and phase
    /// changes, the isolator (with the time the last step took, and the phase).
    fn on_heartbeat(self: &Arc<Self>, rank: &Rank, step: u64, phase: Option<ckpt_core::Phase>) {
        if let Some(h) = &self.health {
            h.heartbeat(rank.rank, step, phase);
        }
        let Some(link) = self.link.clone() else { return };
        let stepped = {
            let mut inner = rank.lock();
            let now = std::time::Instant::now();
            match inner.step_clock {
                Some((s, _)) if s == step => None,
                Some((s, at)) if step > s => {
                    let dt = now.duration_since(at) / u32::try_from(step - s).unwrap_or(u32::MAX).max(1);
                    inner.step_clock = Some((step, now));
                    Some(dt)
                }
                _ => {
                    inner.step_clock = Some((step, now));
                    Some(Duration::ZERO)
                }
            }
        };
        let phase_changed = phase.is_some_and(|p| {
            let mut sent = self.sent_phase.lock().unwrap_or_else(|e| e.into_inner());
            sent.insert(rank.rank, p) != Some(p)
        });
        // A phase change within a step is forwarded with the step repeated; the isolator then
        // keeps the step time it has.
        let Some(step_time) = stepped.or(phase_changed.then_some(Duration::ZERO)) else { return };
        {
            let mut pending = self.forward.lock().unwrap_or_else(|e| e.into_inner());
            // A newer heartbeat replaces one not sent yet, keeping its step time for the same step.
            let kept = pending.get(&rank.rank).filter(|f| f.step == step).map_or(Duration::ZERO, |f| f.step_time);
            pending.insert(rank.rank, Forward { step, step_time: step_time.max(kept), phase });
        }
        if !self.forward_started.swap(true, std::sync::atomic::Ordering::AcqRel) {
            let (agent, wake) = (Arc::downgrade(self), self.forward_wake.clone());
            self.rt.spawn(async move {
                loop {
                    let Some(a) = agent.upgrade() else { return };
                    let batch = std::mem::take(&mut *a.forward.lock().unwrap_or_else(|e| e.into_inner()));
                    drop(a);
                    if batch.is_empty() {
                        // A heartbeat queued after the take left a permit: this returns at once.
                        wake.notified().await;
                        continue;
                    }
                    for (r, f) in batch {
                        if let Err(e) = link.heartbeat_in(r, f.step, f.step_time, f.phase).await {
                            tracing::debug!(rank = r, error = %e, "isolator heartbeat failed");
                        }
                    }
                }
            });
        }
        self.forward_wake.notify_one();
    }

    /// The rank's state, created (with its persist thread) on first use. A rank whose arena file
    /// exists from an earlier agent (or a dead embedded trainer) is claimed ([`slots::ArenaSpec::claim`];
    /// refused while a live process owns it) and adopted: its memory tier is kept, and a snapshot
    /// sealed but never made durable is persisted now.
    fn rank(self: &Arc<Self>, r: u32) -> Result<Arc<Rank>> {
        let mut ranks = self.ranks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rank) = ranks.get(&r) {
            return Ok(rank.clone());
        }
        let rank = Rank::start(self, r)?;
        let claimed = match rank.spec.claim() {
            Ok(c) => c,
            Err(e) => {
                rank.stop_and_join();
                return Err(e.into());
            }
        };
        let Some((lock, existing)) = claimed else {
            ranks.insert(r, rank.clone());
            return Ok(rank);
        };
        *rank.owner.lock().unwrap_or_else(|p| p.into_inner()) = Some(lock);
        slots::remove_stale_temporaries(&self.engine, &self.cfg.job, r);
        if let Some(a) = existing {
            let durable = slots::memory_tier_step(&a);
            {
                let mut inner = rank.lock();
                inner.arena = Some(a.clone());
                inner.world_size = self.cfg.world_size;
                inner.committed = durable;
                inner.last_durable = durable;
            }
            // A previous agent died while persisting: persist those slots again.
            let resumed: Vec<u32> = (0..a.slot_count())
                .filter(|&slot| a.transition(slot, SlotState::Persisting, SlotState::Sealed))
                .collect();
            rank.flush_abandoned(&a, self.cfg.world_size, &resumed);
            tracing::info!(rank = r, path = %a.path().display(), memory_tier = ?durable, "adopted an existing arena");
        }
        ranks.insert(r, rank.clone());
        Ok(rank)
    }

    fn ranks(&self) -> Vec<Arc<Rank>> {
        self.ranks.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// The rank whose trainer holds `session`.
    fn by_session(&self, session: u64) -> Option<Arc<Rank>> {
        self.ranks().into_iter().find(|r| r.lock().session.as_ref().is_some_and(|s| s.id == session))
    }

    /// Ends every trainer session (shutdown), flushing what they left sealed.
    fn end_all_sessions(&self) {
        for rank in self.ranks() {
            let (session, arena, world) = {
                let mut inner = rank.lock();
                (inner.session.take(), inner.arena.clone(), inner.world_size)
            };
            if let Some(s) = session {
                self.metrics.attached.dec();
                let stop = ckptd_proto::v1::StopOrder { reason: "the agent is shutting down".into(), exit: false };
                let _ = s.events.try_send(Ok(ckptd_proto::v1::TrainerEvent {
                    event: Some(ckptd_proto::v1::trainer_event::Event::Stop(stop)),
                }));
            }
            if let Some(a) = arena {
                rank.flush_abandoned(&a, world, &[]);
            }
        }
    }

    /// The trainer of `rank` closed session `id` (it exited or died): persist its newest sealed
    /// snapshot and free what it left half-written.
    fn session_ended(self: &Arc<Self>, rank: Arc<Rank>, id: u64) {
        let ended = {
            let mut inner = rank.lock();
            if inner.session.as_ref().is_some_and(|s| s.id == id) {
                inner.session = None;
                true
            } else {
                false
            }
        };
        if !ended {
            return;
        }
        self.metrics.attached.dec();
        if let Some(h) = &self.health {
            h.rank_detached(rank.rank);
        }
        tracing::info!(rank = rank.rank, session = id, "trainer detached");
        self.rt.spawn(async move {
            let _staging = rank.staging.lock().await;
            let (arena, world) = {
                let inner = rank.lock();
                (inner.arena.clone(), inner.world_size)
            };
            if let Some(a) = arena {
                rank.flush_abandoned(&a, world, &[]);
            }
        });
    }

    /// Waits until the rank has no persist queued or running (bounded by the commit deadline).
    async fn settle(&self, rank: &Rank) -> Result<()> {
        let mut rx = rank.in_flight.subscribe();
        let limit = self.engine.config().commit.deadline + Duration::from_secs(60);
        match tokio::time::timeout(limit, rx.wait_for(|n| *n == 0)).await {
            Ok(_) => Ok(()),
            Err(_) => Err(Error::Timeout {
                what: format!("rank {}'s persists", rank.rank),
                waited_ms: limit.as_millis() as u64,
            }),
        }
    }

    /// Starts filling the rank's memory tier with the newest committed step, unless it holds it.
    fn spawn_prefetch(self: &Arc<Self>, rank: Arc<Rank>) {
        let agent = self.clone();
        self.rt.spawn(async move {
            let _staging = rank.staging.lock().await;
            if rank.lock().committed.is_some() {
                return; // the arena already holds a committed step
            }
            let a = agent.clone();
            let r = rank.clone();
            let staged = tokio::task::spawn_blocking(move || a.stage_newest(&r, false)).await;
            match staged {
                Ok(Ok(Some((step, from_storage)))) => {
                    if from_storage {
                        rank.lock().prefetched = Some(step);
                    }
                    tracing::info!(rank = rank.rank, step, from_storage, "memory tier ready")
                }
                Ok(Ok(None)) => tracing::info!(rank = rank.rank, "no committed step to prefetch"),
                Ok(Err(e)) => tracing::warn!(rank = rank.rank, error = %e, "prefetch failed; loads will retry"),
                Err(e) => tracing::warn!(rank = rank.rank, error = %e, "prefetch task failed"),
            }
        });
    }

    /// Makes the rank's arena hold slots of at least `slot_size` bytes. Call with the staging lock
    /// held and no persist in flight.
    fn ensure_arena(&self, rank: &Rank, slot_size: u64) -> Result<Arc<Arena>> {
        let current = rank.lock().arena.clone();
        let arena = {
            let mut owner = rank.owner.lock().unwrap_or_else(|p| p.into_inner());
            rank.spec.ensure(current.as_ref(), slot_size, &mut owner)?
        };
        if !current.is_some_and(|c| Arc::ptr_eq(&c, &arena)) {
            let mut inner = rank.lock();
            inner.arena = Some(arena.clone());
            inner.committed = None;
        }
        Ok(arena)
    }

    /// Stages `step` of the rank in its arena as the memory tier: from memory when a durable slot
    /// holds it, else by reading the shard from storage. Returns the step and whether storage was
    /// read. Blocking; call with the staging lock held.
    fn stage(&self, rank: &Rank, step: u64) -> Result<(u64, bool)> {
        // A slot of this agent holds what this rank restores: its own save, at the world size the
        // agent serves, or what an earlier stage read under the same resize policy.
        if self.in_memory(rank, step).is_some() {
            return Ok((step, false));
        }
        // The rank whose shard this rank restores: its own, or after a resize its replica's. A
        // world size not known yet (a prefetch before any attach, no --world-size) is the step's.
        let world_size = rank.lock().world_size.or(self.cfg.world_size);
        let (source, header) = match world_size {
            Some(w) => self.engine.restore_header(&self.cfg.job, step, rank.rank, w, self.cfg.resize)?,
            None => (rank.rank, self.engine.shard_header(&self.cfg.job, step, rank.rank)?),
        };
        let needed = slots::slot_size_with_headroom(&header.index.table, header.index.metadata.len());
        let current = rank.lock().arena.clone();
        let arena = match current {
            Some(a) if a.fits(&header.index.table, header.index.metadata.len()) && a.slot_count() == self.cfg.slots => {
                a
            }
            _ => self.ensure_arena(rank, needed)?,
        };
        let slot = slots::take_slot(&arena).ok_or_else(|| ckpt_core::Error::ArenaFull {
            reason: format!(
                "every slot of {} is busy; retry the load once saves have finished",
                arena.path().display()
            ),
        })?;
        slots::stage(&self.engine, &arena, slot, &self.cfg.job, source, step, &header)?;
        let mut inner = rank.lock();
        inner.committed = Some(inner.committed.map_or(step, |s| s.max(step)));
        Ok((step, true))
    }

    /// Stages the newest committed step whose data verifies, passing over damaged newer ones (each
    /// logged and counted in `ckptd_restore_damaged_steps`), unless `strict`. `Ok(None)`: the job
    /// has no committed step. Blocking; call with the staging lock held.
    fn stage_newest(&self, rank: &Rank, strict: bool) -> Result<Option<(u64, bool)>> {
        let staged = slots::newest_sound(&self.engine, &self.cfg.job, None, strict, Error::is_damage, |step| {
            self.stage(rank, step)
        })?;
        Ok(staged.map(|s| {
            self.metrics.damaged_steps.inc_by(s.skipped.len() as u64);
            s.value
        }))
    }

    /// The durable slot holding `step`, if the rank's arena has one.
    fn in_memory(&self, rank: &Rank, step: u64) -> Option<(Arc<Arena>, u32)> {
        let arena = rank.lock().arena.clone()?;
        slots::find_durable(&arena, step).map(|slot| (arena, slot))
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

fn read_file(flag: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| config_error(flag, format!("cannot read {}: {e}", path.display())))
}

/// Connects to the isolator with the configured credentials.
async fn connect_isolator(url: &str, args: &AgentArgs) -> Result<crate::isolator::link::IsolatorLink> {
    use crate::isolator::link::LinkCredentials;
    let token = match &args.isolator_token_file {
        Some(p) => Some(String::from_utf8_lossy(&read_file("--isolator-token-file", p)?).trim().to_string()),
        None => None,
    };
    let ca = match &args.isolator_ca {
        Some(p) => Some(read_file("--isolator-ca", p)?),
        None => None,
    };
    let mut creds = match (&args.isolator_cert, &args.isolator_key, token) {
        (Some(c), Some(k), token) => {
            let m = LinkCredentials::mtls(
                read_file("--isolator-cert", c)?,
                read_file("--isolator-key", k)?,
                ca.clone().unwrap_or_default(),
            );
            match token {
                Some(t) => LinkCredentials::token(t).merge_tls(m),
                None => m,
            }
        }
        (_, _, Some(t)) => LinkCredentials::token(t),
        _ => {
            return Err(config_error(
                "--isolator",
                "needs credentials: --isolator-token-file, or --isolator-cert with --isolator-key",
            ));
        }
    };
    if let Some(ca) = ca {
        creds = creds.with_ca(ca);
    }
    Ok(crate::isolator::link::IsolatorLink::connect(url, creds).await?.with_parallel(args.parallel))
}

/// Acts on the health controller's decisions: reports each to the isolator (which isolates and
/// restarts), or, without one, restarts this pod's trainers from the newest committed step.
async fn handle_decisions(agent: Arc<Agent>, mut rx: tokio::sync::mpsc::Receiver<crate::health::Decision>) {
    while let Some(d) = rx.recv().await {
        let ranks: Vec<u32> = agent.ranks().iter().map(|r| r.rank).collect();
        tracing::error!(
            source = d.finding.source.as_str(),
            kind = %d.finding.kind,
            action = ?d.action,
            evidence = %d.finding.evidence,
            "health fault"
        );
        let Some(link) = &agent.link else {
            agent.restart_locally(&d).await;
            continue;
        };
        // The ranks' phase now, as the trainers last named it: the isolator's copy (forwarded
        // heartbeats) may lag behind or, after a leader change, be missing.
        let phase = {
            let sent = agent.sent_phase.lock().unwrap_or_else(|e| e.into_inner());
            crate::isolator::handling::fault_phase(ranks.iter().map(|r| sent.get(r).copied()))
        };
        let report = d.to_report(&agent.cfg.job, ranks, link.generation(), &agent.cfg.pod, phase);
        match link.report_fault(report).await {
            Ok(ack) => {
                tracing::warn!(action = ack.action, note = %crate::text::peer(&ack.note), "fault reported to the isolator")
            }
            Err(e) => tracing::error!(error = %e, "cannot report the fault to the isolator"),
        }
    }
}

impl Agent {
    /// A fault without an isolator: every trainer of this pod restarts from the newest committed
    /// step (its memory tier, when it holds it). Nothing can be isolated from here; the node stays
    /// as it is, and a decision beyond restart-job is logged as such.
    async fn restart_locally(self: &Arc<Self>, d: &crate::health::Decision) {
        use crate::health::Action;
        if d.action == Action::Ignore {
            return;
        }
        if d.action != Action::RestartJob {
            tracing::error!(action = ?d.action, "no isolator to act on the node: restarting this pod's trainers only");
        }
        let agent = self.clone();
        let latest =
            tokio::task::spawn_blocking(move || agent.engine.latest(&agent.cfg.job).map_err(|e| e.to_string()))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
        let step = match latest {
            Ok(m) => m.map(|m| m.step),
            Err(e) => {
                tracing::error!(error = %e, "cannot list the committed steps: no restart ordered");
                return;
            }
        };
        let generation = self.local_generation.fetch_add(1, Ordering::AcqRel) + 1;
        tracing::warn!(step = ?step, generation, kind = %d.finding.kind, "restarting this pod's trainers (no isolator)");
        self.order_restore(RestoreOrder { step, generation }, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_lists() {
        assert_eq!(parse_ranks("0-3").unwrap().0, vec![0, 1, 2, 3]);
        assert_eq!(parse_ranks("4, 0-1,1").unwrap().0, vec![0, 1, 4]);
        for bad in ["", "a", "3-1", "0-99999", "1-", "-"] {
            assert!(parse_ranks(bad).is_err(), "`{bad}` should be refused");
        }
    }

    #[test]
    fn a_layout_is_parsed_by_the_flag_and_checked_against_the_world_size() {
        use clap::{Args, Command, FromArgMatches};
        let parse = |extra: &[&str]| {
            let mut argv = vec!["--socket", "/nonexistent/agent.sock", "--store", "memory://", "--job", "j"];
            argv.extend_from_slice(extra);
            AgentArgs::augment_args(Command::new("agent").no_binary_name(true))
                .try_get_matches_from(argv)
                .map_err(|e| e.to_string())
                .map(|m| AgentArgs::from_arg_matches(&m).unwrap())
        };
        let e = parse(&["--parallel", "dp=0"]).unwrap_err();
        assert!(e.contains("--parallel") && e.contains("at least 1"), "{e}");
        let args = parse(&["--parallel", "data=2,tensor=4"]).unwrap();
        assert_eq!(args.parallel, Some(crate::layout::Layout { dp: 2, tp: 4, pp: 1 }));

        // Refused before anything is opened or bound: the daemon exits 64 with this line.
        let e = run(parse(&["--world-size", "16", "--parallel", "dp=2,tp=4"]).unwrap()).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Config);
        let msg = e.to_string();
        assert!(msg.contains("--parallel") && msg.contains("describes 8 ranks, but the job has 16"), "{msg}");
    }
}
