//! The trainer side: [`Checkpointer`], what a training script calls to save and load its state.
//!
//! Two modes, one API. In **embedded mode** the copy into the arena happens in the training
//! process, and a background persist thread in the same process writes the shard and commits the
//! step. In **sidecar mode** (a socket is given, or `CKPTD_SOCKET` is set) the agent creates the
//! arena, the trainer still copies into it, and a sealed slot is handed over to the agent, which
//! persists and commits it out of process; loads come from the agent's memory tier, which it fills
//! from storage when needed. An unreachable agent is an error ([`Error::AgentUnavailable`]), never
//! a silent fall-back to embedded mode.
//!
//! The save path is: pack the tensor table → take a free arena slot → enqueue the copies (host
//! threads for CPU tensors, CUDA copy streams for GPU tensors, ordered after the caller's stream) →
//! return a [`SaveHandle`]. Nothing on that path touches storage or waits for a copy. The training
//! loop must call [`Checkpointer::fence`] before it next writes the saved tensors (the optimizer
//! step); the Python helper `ckptd.torch.fence_before_step` registers that as an optimizer hook.

mod link;
mod persist;

#[cfg(feature = "server")]
pub(crate) use persist::wait_committed;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ckpt_core::arena::{self, Arena, ArenaConfig, SlotState};
use ckpt_core::copy::cuda::{CudaCopy, CudaPinner, cuda_available};
use ckpt_core::copy::host::HostCopy;
use ckpt_core::copy::{CopyEngine, CopyTicket, Device, Direction, Region};
use ckpt_core::{DType, Engine, EngineConfig, TensorMeta, TensorTable};
pub use ckptd_proto::v1::Phase;

use crate::error::{Error, Result};

/// Environment variable: the agent's Unix socket; when set, the checkpointer runs in sidecar mode.
pub const ENV_SOCKET: &str = "CKPTD_SOCKET";
/// Environment variable: the default store URL.
pub const ENV_STORE: &str = "CKPTD_STORE";
/// Environment variable: the arena directory (default [`arena::DEFAULT_ARENA_DIR`]).
pub const ENV_ARENA_DIR: &str = "CKPTD_ARENA_DIR";
/// Store used when neither the caller nor [`ENV_STORE`] names one: a directory under the working
/// directory, so a laptop or CI run needs nothing else.
pub const DEFAULT_LOCAL_STORE: &str = "ckptd-store";

/// How a [`Checkpointer`] is set up.
#[derive(Debug, Clone)]
pub struct CheckpointerConfig {
    /// The job name (one directory on the store).
    pub job: String,
    /// Store URL; `None` means [`ENV_STORE`] or `./ckptd-store`.
    pub store: Option<String>,
    /// This process's global rank.
    pub rank: u32,
    /// Number of ranks.
    pub world_size: u32,
    /// Agent socket for sidecar mode; `None` means [`ENV_SOCKET`], or embedded mode when unset.
    pub socket: Option<PathBuf>,
    /// Arena directory; `None` means [`ENV_ARENA_DIR`] or `/dev/shm/ckptd`.
    pub arena_dir: Option<PathBuf>,
    /// Arena slots (at least 1; 2 lets one snapshot persist while the next is copied).
    pub slots: u32,
    /// Engine settings (compression, chunk size, retries, commit deadline).
    pub engine: EngineConfig,
}

impl CheckpointerConfig {
    /// Defaults for a single-process job.
    pub fn new(job: impl Into<String>) -> Self {
        CheckpointerConfig {
            job: job.into(),
            store: None,
            rank: 0,
            world_size: 1,
            socket: None,
            arena_dir: None,
            slots: arena::DEFAULT_SLOTS,
            engine: EngineConfig::default(),
        }
    }
}

/// One tensor of the live training state: where its bytes are and what they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    /// The tensor's key path in the state.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// Address of the first byte (host or device); the data must be contiguous.
    pub addr: u64,
    /// Where the bytes live.
    pub device: Device,
}

/// What a load brought back besides the tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The step loaded.
    pub step: u64,
    /// The user metadata saved with it.
    pub metadata: Vec<u8>,
    /// Whether it came from the arena (memory tier) rather than storage.
    pub from_memory: bool,
}

/// What the step and its tensor table are, without the tensor data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    /// The step.
    pub step: u64,
    /// The stored tensor table.
    pub table: TensorTable,
    /// The user metadata saved with it.
    pub metadata: Vec<u8>,
}

#[derive(Debug, Default)]
struct SaveState {
    outcome: Mutex<Option<std::result::Result<(), Arc<Error>>>>,
    cv: Condvar,
    /// Set once a caller has seen this save's failure, so `close` does not raise it again.
    reported: std::sync::atomic::AtomicBool,
    /// Sidecar mode: the slot is sealed and the agent accepted it (it survives this process).
    handed_over: std::sync::atomic::AtomicBool,
}

impl SaveState {
    fn finish(&self, r: std::result::Result<(), Arc<Error>>) {
        let mut o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        *o = Some(r);
        self.cv.notify_all();
    }

    fn mark_handed_over(&self) {
        let _o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        self.handed_over.store(true, std::sync::atomic::Ordering::Release);
        self.cv.notify_all();
    }

    /// Waits until the agent owns the snapshot, or the save ended.
    fn wait_handed_over(&self) {
        let mut o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        while o.is_none() && !self.handed_over.load(std::sync::atomic::Ordering::Acquire) {
            o = self.cv.wait(o).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A save in progress.
#[derive(Debug, Clone)]
pub struct SaveHandle {
    step: u64,
    state: Arc<SaveState>,
}

impl SaveHandle {
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
                    self.state.reported.store(true, std::sync::atomic::Ordering::Relaxed);
                    return Err(Error::SaveFailed { step: self.step, source: e.clone() });
                }
                None => o = self.state.cv.wait(o).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }

    /// Still running, or failed without anyone having seen the failure.
    fn needs_attention(&self) -> bool {
        match &*self.state.outcome.lock().unwrap_or_else(|p| p.into_inner()) {
            None => true,
            Some(Ok(())) => false,
            Some(Err(_)) => !self.state.reported.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Whether the save finished (successfully or not).
    pub fn done(&self) -> bool {
        self.state.outcome.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

struct Shared {
    cfg: CheckpointerConfig,
    /// Embedded mode: the engine that persists and restores in this process.
    engine: Option<Engine>,
    /// Sidecar mode: the session with the agent.
    link: Option<link::Link>,
    arena_path: PathBuf,
    arena: Mutex<Option<Arc<Arena>>>,
    /// Sidecar mode: (device, inode) of the mapped arena file, to notice when the agent replaced it.
    arena_file: Mutex<Option<(u64, u64)>>,
    host: Arc<HostCopy>,
    cuda: Mutex<HashMap<u32, Arc<CudaCopy>>>,
    /// Copies of the newest save, for `fence`.
    last_copies: Mutex<Vec<Arc<dyn CopyTicket>>>,
    /// The newest save, for `fence` in sidecar mode.
    last_save: Mutex<Option<Arc<SaveState>>>,
    /// Saves whose persist has not finished, oldest first.
    in_flight: Mutex<Vec<SaveHandle>>,
}

/// Saves and loads a training state; see the module documentation.
pub struct Checkpointer {
    shared: Arc<Shared>,
    persist: persist::PersistThread,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Checkpointer");
        d.field("job", &self.shared.cfg.job).field("rank", &self.shared.cfg.rank);
        match (&self.shared.engine, &self.shared.link) {
            (Some(e), _) => d.field("store", &e.store().url()),
            (None, Some(l)) => d.field("socket", &l.socket()),
            (None, None) => d.field("mode", &"closed"),
        };
        d.finish()
    }
}

fn env_nonempty(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

impl Checkpointer {
    /// Opens the store and prepares the checkpointer. The arena is created at the first save,
    /// sized from the state.
    pub fn new(cfg: CheckpointerConfig) -> Result<Checkpointer> {
        ckpt_core::store::layout::validate_job(&cfg.job)?;
        if cfg.world_size == 0 || cfg.rank >= cfg.world_size {
            return Err(ckpt_core::Error::InvalidConfig {
                field: "rank",
                reason: format!("rank {} is outside world size {}", cfg.rank, cfg.world_size),
            }
            .into());
        }
        if cfg.slots == 0 || cfg.slots > arena::MAX_SLOTS {
            return Err(ckpt_core::Error::InvalidConfig {
                field: "slots",
                reason: format!("{} is outside 1..={}", cfg.slots, arena::MAX_SLOTS),
            }
            .into());
        }
        let socket = cfg.socket.clone().or_else(|| env_nonempty(ENV_SOCKET).map(PathBuf::from));
        if let Some(socket) = socket {
            // Sidecar mode: never fall back silently to embedded mode when the agent is missing.
            let link = link::Link::attach(&socket, &cfg.job, cfg.rank, cfg.world_size)?;
            let arena_path = link.attached().arena_path.clone().unwrap_or_default();
            return Self::start(cfg, None, Some(link), arena_path);
        }
        let store = match cfg.store.clone().or_else(|| env_nonempty(ENV_STORE)) {
            Some(url) => url,
            None => {
                let dir = std::env::current_dir()
                    .map_err(|e| ckpt_core::Error::Io { op: "getcwd", path: ".".into(), source: e })?
                    .join(DEFAULT_LOCAL_STORE);
                format!("file://{}", dir.display())
            }
        };
        let engine = Engine::open(&store, cfg.engine.clone())?;
        let dir = cfg
            .arena_dir
            .clone()
            .or_else(|| env_nonempty(ENV_ARENA_DIR).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(arena::DEFAULT_ARENA_DIR));
        let arena_path = dir.join(format!("{}-rank-{}.arena", cfg.job, cfg.rank));
        Self::start(cfg, Some(engine), None, arena_path)
    }

    fn start(
        cfg: CheckpointerConfig,
        engine: Option<Engine>,
        link: Option<link::Link>,
        arena_path: PathBuf,
    ) -> Result<Checkpointer> {
        let shared = Arc::new(Shared {
            engine,
            link,
            arena_path,
            arena: Mutex::new(None),
            arena_file: Mutex::new(None),
            host: Arc::new(HostCopy::with_default_threads()?),
            cuda: Mutex::new(HashMap::new()),
            last_copies: Mutex::new(Vec::new()),
            last_save: Mutex::new(None),
            in_flight: Mutex::new(Vec::new()),
            cfg,
        });
        let persist = persist::PersistThread::start(shared.clone())?;
        Ok(Checkpointer { shared, persist })
    }

    /// The engine underneath (store, listing, verification); `None` in sidecar mode, where the
    /// agent owns storage.
    pub fn engine(&self) -> Option<&Engine> {
        self.shared.engine.as_ref()
    }

    /// Whether this checkpointer runs against an agent.
    pub fn is_sidecar(&self) -> bool {
        self.shared.link.is_some()
    }

    /// Reports training progress (sidecar mode; a no-op embedded). Returns the id of a snapshot
    /// the agent requested, if one is pending: the next `save` answers it.
    pub fn heartbeat(&self, step: u64, phase: Phase) -> Result<Option<u64>> {
        match &self.shared.link {
            Some(link) => link.heartbeat(step, phase),
            None => Ok(None),
        }
    }

    /// Takes the isolator's newest restore order `(step, generation)`, if one arrived: the trainer
    /// should load that step (`load(Some(step))`) and continue from it. Always `None` embedded.
    pub fn take_restore_order(&self) -> Option<(u64, u64)> {
        self.shared.link.as_ref().and_then(link::Link::take_restore_order)
    }

    /// Why the agent asked this trainer to stop (its node is being isolated), if it did.
    pub fn stop_requested(&self) -> Option<String> {
        self.shared.link.as_ref().and_then(link::Link::stop_requested)
    }

    /// The pending snapshot request, if any (always `None` embedded).
    pub fn snapshot_requested(&self) -> Option<u64> {
        self.shared.link.as_ref().and_then(link::Link::pending_request)
    }

    /// Blocks up to `timeout` until the agent requests a snapshot; returns the request, or `None`
    /// on timeout. Embedded mode never gets requests: it waits out the timeout.
    pub fn wait_snapshot_request(&self, timeout: Duration) -> Result<Option<u64>> {
        match &self.shared.link {
            Some(link) => link.wait_snapshot_request(timeout),
            None => {
                std::thread::sleep(timeout);
                Ok(None)
            }
        }
    }

    fn embedded(&self) -> Result<&Engine> {
        self.shared.engine.as_ref().ok_or(Error::Closed)
    }

    /// The path of this rank's arena file.
    pub fn arena_path(&self) -> &std::path::Path {
        &self.shared.arena_path
    }

    /// Starts saving `tensors` as `step` and returns once the copies are enqueued. `stream` is the
    /// caller's current CUDA stream (raw `CUstream`) for GPU tensors.
    ///
    /// # Safety
    /// Every tensor's `addr` must point to `byte_len` readable bytes that stay allocated, and are not
    /// written, until [`Checkpointer::fence`] returns (or, for GPU tensors, until work enqueued on
    /// the fenced stream runs).
    pub unsafe fn save(
        &self,
        tensors: &[TensorRef],
        step: u64,
        metadata: Vec<u8>,
        stream: Option<u64>,
    ) -> Result<SaveHandle> {
        let table = table_of(tensors)?;
        if metadata.len() > ckpt_core::format::MAX_METADATA_LEN as usize {
            return Err(ckpt_core::Error::InvalidConfig {
                field: "metadata",
                reason: format!("{} bytes exceed the cap of {}", metadata.len(), ckpt_core::format::MAX_METADATA_LEN),
            }
            .into());
        }
        let started = Instant::now();
        let (arena, slot) = self.slot_for(&table, metadata.len())?;
        let base = arena.slot_addr(slot);
        let tickets = match self.copy(tensors, &table, base, Direction::ToHost, stream) {
            Ok(t) => t,
            Err(e) => {
                arena.release(slot);
                return Err(e);
            }
        };
        *self.shared.last_copies.lock().unwrap_or_else(|p| p.into_inner()) = tickets.clone();
        let handle = SaveHandle { step, state: Arc::new(SaveState::default()) };
        {
            let mut in_flight = self.shared.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            // Finished saves leave the list unless their failure has not been seen yet, so it stays
            // bounded by the saves actually in flight.
            in_flight.retain(SaveHandle::needs_attention);
            in_flight.push(handle.clone());
        }
        *self.shared.last_save.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle.state.clone());
        let stall = started.elapsed();
        let request = self.shared.link.as_ref().and_then(link::Link::take_request).unwrap_or(0);
        let job = persist::Job { arena, slot, step, table, metadata, tickets, handle: handle.clone(), stall, request };
        if let Err(job) = self.persist.submit(job) {
            job.arena.release(job.slot);
            handle.state.finish(Err(Arc::new(Error::Closed)));
            return Err(Error::Closed);
        }
        Ok(handle)
    }

    /// Waits until the copies of the newest save have finished reading the tensors. With `stream`,
    /// GPU copies are fenced on that stream instead (the host does not block).
    pub fn fence(&self, stream: Option<u64>) -> Result<()> {
        let tickets = self.shared.last_copies.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for t in tickets {
            match stream {
                Some(s) => t.fence_stream(s)?,
                None => t.wait()?,
            }
        }
        // Sidecar mode: once the host has waited, also wait for the agent to own the snapshot, so
        // that a trainer that dies after the fence still gets it persisted.
        if stream.is_none()
            && self.shared.link.is_some()
            && let Some(last) = self.shared.last_save.lock().unwrap_or_else(|p| p.into_inner()).clone()
        {
            last.wait_handed_over();
        }
        Ok(())
    }

    /// Waits for every save in flight to be durable; returns the first failure that no caller has
    /// seen yet through [`SaveHandle::wait`].
    pub fn wait_all(&self) -> Result<()> {
        let handles = std::mem::take(&mut *self.shared.in_flight.lock().unwrap_or_else(|p| p.into_inner()));
        let mut first = None;
        for h in handles {
            let seen = h.state.reported.load(std::sync::atomic::Ordering::Relaxed);
            if let Err(e) = h.wait()
                && !seen
            {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// The newest committed step that validates, if any.
    pub fn latest_step(&self) -> Result<Option<u64>> {
        if let Some(link) = &self.shared.link {
            return match link.locate(None) {
                Ok(r) => Ok(Some(r.step)),
                Err(e) if e.kind() == crate::ErrorKind::NoCheckpoint => Ok(None),
                Err(e) => Err(e),
            };
        }
        Ok(self.embedded()?.latest(&self.shared.cfg.job)?.map(|m| m.step))
    }

    /// The tensor table and metadata of `step` (default: the newest committed step), without
    /// reading tensor data in embedded mode; in sidecar mode the agent stages the step in the arena
    /// (so the `load` that usually follows reads memory).
    pub fn describe(&self, step: Option<u64>) -> Result<Description> {
        if self.shared.link.is_some() {
            let (arena, slot, _) = self.staged(step)?;
            let content = arena.content(slot)?;
            return Ok(Description { step: content.step, table: content.table, metadata: content.metadata });
        }
        let engine = self.embedded()?;
        let step = self.resolve_embedded(step)?;
        let header = engine.shard_header(&self.shared.cfg.job, step, self.shared.cfg.rank)?;
        Ok(Description { step, table: header.index.table, metadata: header.index.metadata })
    }

    fn resolve_embedded(&self, step: Option<u64>) -> Result<u64> {
        let cfg = &self.shared.cfg;
        let engine = self.embedded()?;
        match step {
            Some(s) => Ok(s),
            None => match engine.latest(&cfg.job)? {
                Some(m) => Ok(m.step),
                None => Err(Error::NoCheckpoint { job: cfg.job.clone(), store: engine.store().url().to_string() }),
            },
        }
    }

    /// Sidecar mode: has the agent stage `step` in the arena and maps the arena; returns the slot
    /// and whether the agent had to read storage.
    fn staged(&self, step: Option<u64>) -> Result<(Arc<Arena>, u32, bool)> {
        let link = self.shared.link.as_ref().ok_or(Error::Closed)?;
        let reply = link.locate(step)?;
        let arena = self.map_agent_arena(std::path::Path::new(&reply.arena_path))?;
        Ok((arena, reply.slot, reply.from_storage))
    }

    /// Maps the arena the agent made at `path`, unless the one mapped already is that file.
    fn map_agent_arena(&self, path: &std::path::Path) -> Result<Arc<Arena>> {
        let id = file_id(path)?;
        let mut guard = self.shared.arena.lock().unwrap_or_else(|p| p.into_inner());
        let mut mapped = self.shared.arena_file.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = guard.as_ref()
            && *mapped == Some(id)
        {
            return Ok(a.clone());
        }
        let arena = Arc::new(Arena::open(path)?);
        self.prepare_in_background(arena.clone());
        *guard = Some(arena.clone());
        *mapped = Some(id);
        Ok(arena)
    }

    /// Fills `tensors` in place from `step` (default: the newest committed step), from the arena
    /// when it holds that step, else from the store. Every mismatch of name, dtype or shape is
    /// reported at once.
    ///
    /// # Safety
    /// Every tensor's `addr` must point to `byte_len` writable bytes that nobody else reads or
    /// writes until this returns.
    pub unsafe fn load(&self, tensors: &[TensorRef], step: Option<u64>, stream: Option<u64>) -> Result<Loaded> {
        if self.shared.link.is_some() {
            // SAFETY: the caller's contract is this function's.
            return unsafe { self.load_from_agent(tensors, step, stream) };
        }
        let cfg = &self.shared.cfg;
        let engine = self.embedded()?;
        let step = self.resolve_embedded(step)?;
        let header = engine.shard_header(&cfg.job, step, cfg.rank)?;
        let stored = &header.index.table;
        let wanted: Vec<TensorMeta> = tensors
            .iter()
            .map(|t| TensorMeta { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() })
            .collect();
        let problems = stored.mismatches(&wanted);
        if !problems.is_empty() {
            return Err(ckpt_core::Error::StateMismatch { step, problems }.into());
        }
        // Memory tier: the arena's newest durable slot, when it holds exactly this step.
        if let Some((arena, slot)) = self.memory_tier(step, stored) {
            let tickets = self.copy(tensors, stored, arena.slot_addr(slot), Direction::FromHost, stream)?;
            for t in tickets {
                t.wait()?;
            }
            return Ok(Loaded { step, metadata: header.index.metadata, from_memory: true });
        }
        let (arena, slot) = self.slot_for(stored, header.index.metadata.len())?;
        let result = (|| {
            // SAFETY: we own the slot in the writing state; nobody else touches it.
            let dst = unsafe { &mut arena.slot_bytes_mut(slot)[..stored.total_len() as usize] };
            engine.restore_into(&cfg.job, step, cfg.rank, dst)?;
            let tickets = self.copy(tensors, stored, arena.slot_addr(slot), Direction::FromHost, stream)?;
            for t in tickets {
                t.wait()?;
            }
            // The slot now holds a committed step: keep it as the memory tier.
            arena.seal(slot, step, stored, &header.index.metadata)?;
            arena.transition(slot, SlotState::Sealed, SlotState::Persisting);
            arena.mark_durable(slot)?;
            Ok::<_, Error>(())
        })();
        if let Err(e) = result {
            arena.release(slot);
            return Err(e);
        }
        Ok(Loaded { step, metadata: header.index.metadata, from_memory: false })
    }

    /// Sidecar mode of [`Checkpointer::load`]: the agent stages the step in the arena (from its
    /// memory tier, else from storage), and the tensors are filled from the slot.
    ///
    /// # Safety
    /// As for [`Checkpointer::load`].
    unsafe fn load_from_agent(&self, tensors: &[TensorRef], step: Option<u64>, stream: Option<u64>) -> Result<Loaded> {
        let (arena, slot, from_storage) = self.staged(step)?;
        // Hold the slot while reading it, so that neither a save nor the agent reuses it.
        if !arena.transition(slot, SlotState::Durable, SlotState::Persisting) {
            return Err(ckpt_core::Error::Cancelled {
                reason: format!("arena slot {slot} changed before it could be read; retry the load"),
            }
            .into());
        }
        let result = (|| {
            let content = arena.content(slot)?;
            let wanted: Vec<TensorMeta> = tensors
                .iter()
                .map(|t| TensorMeta { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() })
                .collect();
            let problems = content.table.mismatches(&wanted);
            if !problems.is_empty() {
                return Err(ckpt_core::Error::StateMismatch { step: content.step, problems }.into());
            }
            let tickets = self.copy(tensors, &content.table, arena.slot_addr(slot), Direction::FromHost, stream)?;
            for t in tickets {
                t.wait()?;
            }
            Ok(Loaded { step: content.step, metadata: content.metadata, from_memory: !from_storage })
        })();
        arena.transition(slot, SlotState::Persisting, SlotState::Durable);
        result
    }

    /// Waits for every save in flight, then stops the persist thread.
    pub fn close(&self) -> Result<()> {
        let r = self.wait_all();
        self.persist.stop();
        r
    }

    fn memory_tier(&self, step: u64, table: &TensorTable) -> Option<(Arc<Arena>, u32)> {
        // Embedded mode only: in sidecar mode the agent says where the step is.
        let mut guard = self.shared.arena.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() && self.shared.arena_path.exists() {
            // A restarted trainer finds the arena its predecessor left in the same pod.
            match Arena::open(&self.shared.arena_path) {
                Ok(a) => *guard = Some(Arc::new(a)),
                Err(e) => {
                    tracing::warn!(path = %self.shared.arena_path.display(), error = %e, "ignoring unusable arena")
                }
            }
        }
        let arena = guard.clone()?;
        drop(guard);
        let slot = arena.newest_durable()?;
        // Hold the slot while reading it, so a concurrent save cannot reuse it.
        if !arena.transition(slot, SlotState::Durable, SlotState::Persisting) {
            return None;
        }
        let ok = arena.content(slot).is_ok_and(|c| c.step == step && &c.table == table);
        arena.transition(slot, SlotState::Persisting, SlotState::Durable);
        ok.then_some((arena, slot))
    }

    /// A writable slot big enough for `table`, creating or growing the arena when needed. Blocks
    /// while every slot is busy persisting (back-pressure: a save never queues unbounded memory).
    fn slot_for(&self, table: &TensorTable, metadata_len: usize) -> Result<(Arc<Arena>, u32)> {
        let needed = arena::slot_size_for(table, metadata_len);
        let arena = {
            let mut guard = self.shared.arena.lock().unwrap_or_else(|p| p.into_inner());
            let fits = guard.as_ref().is_some_and(|a| a.fits(table, metadata_len));
            if !fits {
                // Growing replaces the file: drain saves that still use the old one first.
                drop(guard);
                self.wait_all()?;
                guard = self.shared.arena.lock().unwrap_or_else(|p| p.into_inner());
                let dir = self.shared.arena_path.parent().map(PathBuf::from).unwrap_or_default();
                let name =
                    self.shared.arena_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                // Headroom, so that a state that grows a little (an optimizer's lazily created
                // buffers, a new metadata key) does not recreate the arena at every save.
                let slot_size = needed.saturating_add(needed / 16).saturating_add(1 << 20);
                *guard = None;
                if let Some(link) = &self.shared.link {
                    // The agent owns the arena: it creates (or replaces) the file, we map it.
                    drop(guard);
                    let path = link.prepare_arena(slot_size)?;
                    self.map_agent_arena(&path)?;
                    guard = self.shared.arena.lock().unwrap_or_else(|p| p.into_inner());
                } else {
                    let cfg = ArenaConfig { dir, name, slots: self.shared.cfg.slots, slot_size };
                    let created = Arena::create(&cfg).map_err(|e| match e {
                        ckpt_core::Error::InvalidConfig { field: "arena_dir", reason } => Error::ArenaFull { reason },
                        other => Error::Core(other),
                    })?;
                    let created = Arc::new(created);
                    self.prepare_in_background(created.clone());
                    *guard = Some(created);
                }
            }
            guard.clone().ok_or(Error::Closed)?
        };
        let mut backoff = Duration::from_micros(50);
        let started = Instant::now();
        loop {
            if let Some(slot) = arena.acquire() {
                return Ok((arena, slot));
            }
            // Every slot is in flight or holds the memory tier. The memory tier yields first: a
            // newer snapshot is about to replace it anyway.
            if let Some(tier) = arena.newest_durable()
                && arena.transition(tier, SlotState::Durable, SlotState::Writing)
            {
                return Ok((arena, tier));
            }
            let oldest = self.shared.in_flight.lock().unwrap_or_else(|p| p.into_inner()).first().cloned();
            match oldest {
                Some(h) => {
                    let _ = h.wait();
                    self.shared
                        .in_flight
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .retain(|x| !Arc::ptr_eq(&x.state, &h.state));
                }
                None => {
                    if started.elapsed() > Duration::from_secs(60) {
                        return Err(Error::ArenaFull {
                            reason: format!(
                                "all {} slots of {} stay busy with no save in flight: another process uses this arena",
                                arena.slot_count(),
                                self.shared.arena_path.display()
                            ),
                        });
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                }
            }
        }
    }

    fn prepare_in_background(&self, arena: Arc<Arena>) {
        let gpu = cuda_available();
        let spawned = std::thread::Builder::new().name("ckpt-arena-prep".into()).spawn(move || {
            // Registration is portable to every context, so device 0's primary context serves all.
            let pinner = match gpu.then(|| CudaPinner::new(0)) {
                Some(Ok(p)) => Some(p),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "cannot create the CUDA pinner; device copies will be slower");
                    None
                }
                None => None,
            };
            if let Err(e) = arena.prepare(pinner.as_ref().map(|p| p as &dyn arena::HostPinner)) {
                tracing::warn!(error = %e, "arena pinning failed; device copies will be slower");
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the arena preparation thread");
        }
    }

    fn copy(
        &self,
        tensors: &[TensorRef],
        table: &TensorTable,
        base: u64,
        direction: Direction,
        stream: Option<u64>,
    ) -> Result<Vec<Arc<dyn CopyTicket>>> {
        let mut by_device: HashMap<Device, Vec<Region>> = HashMap::new();
        for t in tensors {
            let entry = table.get(&t.name).ok_or_else(|| ckpt_core::Error::InvalidTensor {
                name: t.name.clone(),
                reason: "not in the snapshot table".into(),
            })?;
            if entry.len == 0 {
                continue;
            }
            let slot_addr = base + entry.offset;
            let (src, dst) = match direction {
                Direction::ToHost => (t.addr, slot_addr),
                Direction::FromHost => (slot_addr, t.addr),
            };
            by_device.entry(t.device).or_default().push(Region { src, dst, len: entry.len as usize });
        }
        let mut tickets: Vec<Arc<dyn CopyTicket>> = Vec::with_capacity(by_device.len());
        for (device, regions) in by_device {
            let engine: Arc<dyn CopyEngine> = match device {
                Device::Cpu => self.shared.host.clone(),
                Device::Cuda(n) => match self.cuda(n) {
                    Ok(e) => e,
                    Err(e) => {
                        wait_quietly(&tickets);
                        return Err(e);
                    }
                },
            };
            // SAFETY: the caller of save/load vouched for the tensors' addresses; the slot side lies
            // inside the slot we own, sized by the table.
            let submitted = unsafe { engine.submit(direction, device, &regions, stream) };
            match submitted {
                Ok(t) => tickets.push(t),
                Err(e) => {
                    wait_quietly(&tickets);
                    return Err(e.into());
                }
            }
        }
        Ok(tickets)
    }

    fn cuda(&self, device: u32) -> Result<Arc<dyn CopyEngine>> {
        let mut map = self.shared.cuda.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get(&device) {
            return Ok(e.clone());
        }
        let e = Arc::new(CudaCopy::new(device, 2)?);
        map.insert(device, e.clone());
        Ok(e)
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(error = %e, "a save failed before the checkpointer was dropped");
        }
    }
}

/// Copies already started on another device still read the tensors and write the slot: let them
/// finish before an error lets the caller free either.
fn wait_quietly(tickets: &[Arc<dyn CopyTicket>]) {
    for t in tickets {
        let _ = t.wait();
    }
}

/// (device, inode) of a file, to tell a replaced arena file from the mapped one.
fn file_id(path: &std::path::Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|e| ckpt_core::Error::Io {
        op: "stat arena",
        path: path.to_path_buf(),
        source: e,
    })?;
    Ok((m.dev(), m.ino()))
}

/// Packs tensors into a snapshot table (64-byte aligned), checking names, shapes and devices.
fn table_of(tensors: &[TensorRef]) -> Result<TensorTable> {
    let metas = tensors.iter().map(|t| TensorMeta { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() });
    Ok(TensorTable::packed(metas, ckpt_core::tensor::DEFAULT_ALIGN)?)
}
