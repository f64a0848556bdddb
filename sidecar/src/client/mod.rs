//! The trainer side: [`Checkpointer`], what a training script calls to save and load its state.
//!
//! Two modes, one API ([`Mode`]). In **embedded mode** ([`embedded`]) the copy into the arena
//! happens in the training process, and a background persist thread in the same process writes
//! the shard and commits the step. In **sidecar mode** ([`sidecar`]; a socket is given, or
//! `CKPTD_SOCKET` is set) the agent creates the arena, the trainer still copies into it, and a
//! sealed slot is handed over to the agent, which persists and commits it out of process; loads
//! come from a slot the agent staged, from its memory tier or from storage. An unreachable agent
//! is an error ([`Error::AgentUnavailable`]), never a silent fall-back to embedded mode. Both
//! modes walk a slot through the same lifecycle, [`ckpt_core::slots`].
//!
//! The save path is: pack the tensor table → take a free arena slot → enqueue the copies (host
//! threads for CPU tensors, CUDA copy streams for GPU tensors, ordered after the caller's stream) →
//! return a [`SaveHandle`]. Nothing on that path touches storage or waits for a copy. The training
//! loop must call [`Checkpointer::fence`] before it next writes the saved tensors (the optimizer
//! step); the Python helper `ckptd.torch.fence_before_step` registers that as an optimizer hook.

mod embedded;
mod handle;
mod link;
mod orders;
mod persist;
mod sidecar;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use ckpt_core::Phase;
use ckpt_core::arena::{self, Arena, ArenaLock};
use ckpt_core::copy::cuda::{CudaCopy, CudaPinner, cuda_available};
use ckpt_core::copy::host::HostCopy;
use ckpt_core::copy::{CopyEngine, CopyTicket, Device, Direction, Region};
use ckpt_core::slots::{self, ReadHold};
use ckpt_core::{DType, Engine, EngineConfig, Resize, TensorMeta, TensorTable};

pub use self::embedded::DEFAULT_LOCAL_STORE;
pub use self::handle::SaveHandle;
pub use self::orders::{DEFAULT_RESTART_GRACE, EXIT_RESTART, EXIT_STOP, OrderExit};
use crate::env;
use crate::error::{Error, Result};

/// How a [`Checkpointer`] is set up.
#[derive(Debug, Clone)]
pub struct CheckpointerConfig {
    /// The job name (one directory on the store).
    pub job: String,
    /// Store URL; `None` means `CKPTD_STORE` or `./ckptd-store`.
    pub store: Option<String>,
    /// This process's global rank; `None` means `RANK` (set by torchrun), else 0.
    pub rank: Option<u32>,
    /// Number of ranks; `None` means `WORLD_SIZE` (set by torchrun), else 1.
    pub world_size: Option<u32>,
    /// Agent socket for sidecar mode; `None` means `CKPTD_SOCKET`, or embedded mode when unset.
    pub socket: Option<PathBuf>,
    /// Arena directory; `None` means `CKPTD_ARENA_DIR` or `/dev/shm/ckptd`.
    pub arena_dir: Option<PathBuf>,
    /// Arena slots (at least 1). One (the default) holds one copy of the state: a save waits
    /// while the previous one still persists ([`Checkpointer::stats`] counts how often). Two let
    /// one snapshot persist while the next is copied, and keep the memory tier while a save is
    /// copied, for twice the host memory.
    pub slots: u32,
    /// Bytes the saved state will take, about (embedded mode): when given, the arena is created
    /// at construction and its pages faulted in (and pinned for device copies) in the background,
    /// so that the first save is not slower than the next ones. An arena left by a predecessor
    /// is kept as it is (it holds the memory tier), and a state that outgrows the hint gets a
    /// bigger arena at its first save, as without one.
    pub size_hint: Option<u64>,
    /// Threads that copy host tensors into the arena and back; `None` means
    /// [`env::ENV_COPY_THREADS`], else half the cores (at least 1, at most 8): the training step
    /// keeps the other half while a snapshot is copied in the background.
    pub copy_threads: Option<usize>,
    /// Engine settings (compression, chunk size, retries, commit deadline).
    pub engine: EngineConfig,
    /// A load of the newest step fails when that step's data is damaged, instead of falling back
    /// to the newest sound step (the default, logged as a warning).
    pub strict_restore: bool,
    /// Sidecar mode: whether this library ends the process ([`EXIT_RESTART`], [`EXIT_STOP`]) when
    /// the agent orders a restart or a stop and the script has not acted on it in time (see
    /// [`OrderExit`]; default: `CKPTD_RESTART_GRACE`, else after 3 s).
    pub order_exit: OrderExit,
    /// What a load does with a step saved by another number of ranks (embedded mode; the agent
    /// has its own `--on-resize`); `None` means `CKPTD_ON_RESIZE` with the layout in
    /// `CKPTD_PARALLEL` (see [`crate::resize`]), else [`Resize::Wait`]: refused.
    pub resize: Option<Resize>,
}

impl CheckpointerConfig {
    /// Defaults: a single-process job, or the rank and world size a launcher (torchrun) put in
    /// the environment.
    pub fn new(job: impl Into<String>) -> Self {
        CheckpointerConfig {
            job: job.into(),
            store: None,
            rank: None,
            world_size: None,
            socket: None,
            arena_dir: None,
            slots: arena::DEFAULT_SLOTS,
            size_hint: None,
            copy_threads: None,
            engine: EngineConfig::default(),
            strict_restore: false,
            order_exit: OrderExit::default(),
            resize: None,
        }
    }
}

impl CheckpointerConfig {
    /// The rank, once [`Checkpointer::new`] resolved it.
    pub(crate) fn rank(&self) -> u32 {
        self.rank.unwrap_or(0)
    }

    /// The world size, once [`Checkpointer::new`] resolved it.
    pub(crate) fn world_size(&self) -> u32 {
        self.world_size.unwrap_or(1)
    }

    /// Fills in the rank and world size the caller left out from `lookup` (the environment:
    /// [`env::ENV_LAUNCHER_RANK`], [`env::ENV_LAUNCHER_WORLD_SIZE`]), else 0 and 1, and checks them.
    /// [`env::ENV_PERSIST_PRIORITY`] and [`env::ENV_PERSIST_IO`], when set, override the engine
    /// settings: an operator can change them without touching the training script.
    fn resolve_ranks(&mut self, lookup: &dyn Fn(&str) -> Option<String>) -> Result<()> {
        let read = |var: &str| -> Result<Option<u32>> {
            lookup(var)
                .map(|v| {
                    v.trim().parse::<u32>().map_err(|_| Error::Config {
                        what: var.into(),
                        reason: format!("`{v:.32}` in the environment is not a non-negative integer"),
                    })
                })
                .transpose()
        };
        let rank = match self.rank {
            Some(r) => r,
            None => read(env::ENV_LAUNCHER_RANK)?.unwrap_or(0),
        };
        let world_size = match self.world_size {
            Some(w) => w,
            None => read(env::ENV_LAUNCHER_WORLD_SIZE)?.unwrap_or(1),
        };
        if world_size == 0 || rank >= world_size {
            return Err(Error::Config {
                what: "rank".into(),
                reason: format!(
                    "rank {rank} is outside world size {world_size} (from the arguments, else RANK and WORLD_SIZE)"
                ),
            });
        }
        (self.rank, self.world_size) = (Some(rank), Some(world_size));
        if let Some(v) = lookup(env::ENV_PERSIST_PRIORITY) {
            self.engine.persist.priority = v
                .parse()
                .map_err(|e| Error::Config { what: env::ENV_PERSIST_PRIORITY.into(), reason: format!("{e}") })?;
        }
        if self.copy_threads.is_none()
            && let Some(v) = lookup(env::ENV_COPY_THREADS)
        {
            let n = v.trim().parse::<usize>().ok().filter(|n| (1..=64).contains(n)).ok_or_else(|| Error::Config {
                what: env::ENV_COPY_THREADS.into(),
                reason: format!("`{v:.32}` is not a whole number of threads from 1 to 64"),
            })?;
            self.copy_threads = Some(n);
        }
        if let Some(v) = lookup(env::ENV_PERSIST_IO) {
            self.engine.persist.file_io =
                v.parse().map_err(|e| Error::Config { what: env::ENV_PERSIST_IO.into(), reason: format!("{e}") })?;
        }
        if self.resize.is_none() {
            let on_resize = lookup(env::ENV_ON_RESIZE);
            let resize = crate::resize::parse(on_resize.as_deref(), lookup(env::ENV_PARALLEL).as_deref())
                .map_err(|reason| Error::Config { what: env::ENV_ON_RESIZE.into(), reason })?;
            self.resize = Some(resize);
        }
        Ok(())
    }

    /// This process as a restorer: its rank, the world size and the resize policy.
    pub(crate) fn restorer(&self) -> slots::Restorer {
        slots::Restorer { rank: self.rank(), world_size: self.world_size(), resize: self.resize.unwrap_or_default() }
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

impl TensorRef {
    fn meta(&self) -> TensorMeta {
        TensorMeta { name: self.name.clone(), dtype: self.dtype, shape: self.shape.clone() }
    }
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

impl Description {
    fn of_slot(c: &ckpt_core::arena::SlotContent) -> Description {
        Description { step: c.step, table: c.table.clone(), metadata: c.metadata.clone() }
    }
}

/// How the checkpointer reaches storage: by itself, or through the agent.
#[derive(Debug)]
enum Mode {
    Embedded(embedded::Embedded),
    Sidecar(sidecar::Sidecar),
}

struct Shared {
    cfg: CheckpointerConfig,
    mode: Mode,
    /// The arena mapped now: created here (embedded) or by the agent (sidecar).
    arena: Mutex<Option<Arc<Arena>>>,
    /// Embedded: this process's ownership of the arena file (see [`arena::ArenaLock`]), taken at
    /// construction when the file exists, else when the arena is first created. Never in sidecar
    /// mode, where the agent owns the arena.
    owner: Mutex<Option<ArenaLock>>,
    /// Where the arena is (or will be) before one is mapped.
    arena_path: PathBuf,
    host: Arc<HostCopy>,
    cuda: Mutex<HashMap<u32, Arc<CudaCopy>>>,
    /// Copies of the newest save, for `fence`.
    last_copies: Mutex<Vec<Arc<dyn CopyTicket>>>,
    /// The newest save, for `fence` in sidecar mode.
    last_save: Mutex<Option<SaveHandle>>,
    /// Saves whose persist has not finished, oldest first.
    in_flight: Mutex<Vec<SaveHandle>>,
    /// How often saves waited for a slot, and for how long.
    stats: Mutex<SaveStats>,
}

/// How the saves of a [`Checkpointer`] went: how many had to wait for a slot because every slot
/// was still persisting an earlier save (with one slot, a save interval shorter than the
/// persist time), and the time they waited, which is part of their stall.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SaveStats {
    /// Saves started.
    pub saves: u64,
    /// Saves that waited for a slot.
    pub waited: u64,
    /// Total time those saves waited.
    pub wait_time: Duration,
}

/// Saves and loads a training state; see the module documentation.
pub struct Checkpointer {
    shared: Arc<Shared>,
    persist: persist::PersistThread,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Checkpointer");
        d.field("job", &self.shared.cfg.job).field("rank", &self.shared.cfg.rank());
        match &self.shared.mode {
            Mode::Embedded(m) => d.field("store", &m.engine.store().url()),
            Mode::Sidecar(m) => d.field("socket", &m.link.socket()),
        };
        d.finish()
    }
}

impl Checkpointer {
    /// Opens the store (embedded) or attaches to the agent (sidecar) and prepares the
    /// checkpointer. The arena is created at the first save, sized from the state.
    pub fn new(mut cfg: CheckpointerConfig) -> Result<Checkpointer> {
        ckpt_core::store::layout::validate_job(&cfg.job)?;
        cfg.resolve_ranks(&env::nonempty)?;
        if cfg.slots == 0 || cfg.slots > arena::MAX_SLOTS {
            return Err(Error::Config {
                what: "slots".into(),
                reason: format!("{} is outside 1..={}", cfg.slots, arena::MAX_SLOTS),
            });
        }
        let socket = cfg.socket.clone().or_else(|| env::nonempty(env::ENV_SOCKET).map(PathBuf::from));
        let (mode, arena_path, owner, arena) = match socket {
            Some(socket) => {
                let grace = cfg.order_exit.resolve(&env::nonempty)?;
                let m = sidecar::Sidecar::attach(&socket, &cfg.job, cfg.rank(), cfg.world_size(), grace)?;
                let path = m.arena_path();
                (Mode::Sidecar(m), path, None, None)
            }
            None => {
                let m = embedded::Embedded::open(&cfg)?;
                let path = m.spec.path();
                // A second process of this job and rank is refused here when the arena exists,
                // else when it first creates one (create-only: one of two racing creators wins).
                let (owner, arena) = m.claim(&cfg)?;
                (Mode::Embedded(m), path, owner, arena)
            }
        };
        let shared = Arc::new(Shared {
            mode,
            arena: Mutex::new(arena),
            owner: Mutex::new(owner),
            arena_path,
            host: Arc::new(match cfg.copy_threads {
                Some(n) => HostCopy::new(n)?,
                None => HostCopy::with_default_threads()?,
            }),
            cuda: Mutex::new(HashMap::new()),
            last_copies: Mutex::new(Vec::new()),
            last_save: Mutex::new(None),
            in_flight: Mutex::new(Vec::new()),
            stats: Mutex::new(SaveStats::default()),
            cfg,
        });
        let persist = persist::PersistThread::start(shared.clone())?;
        let ck = Checkpointer { shared, persist };
        if let (Some(bytes), Mode::Embedded(_)) = (ck.shared.cfg.size_hint, &ck.shared.mode)
            && ck.embedded_arena().is_none()
        {
            ck.arena_of(None, slots::slot_size_for_state(bytes))?;
        }
        Ok(ck)
    }

    /// Whether the arena exists and its pages are faulted in (and pinned, with a GPU): the next
    /// save copies into resident memory. With a [`CheckpointerConfig::size_hint`] this becomes
    /// true in the background after construction; without one, after the first save.
    pub fn arena_ready(&self) -> bool {
        self.shared.arena.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|a| a.is_prepared())
    }

    /// How the saves went so far (see [`SaveStats`]).
    pub fn stats(&self) -> SaveStats {
        *self.shared.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The engine underneath (store, listing, verification); `None` in sidecar mode, where the
    /// agent owns storage.
    pub fn engine(&self) -> Option<&Engine> {
        match &self.shared.mode {
            Mode::Embedded(m) => Some(&m.engine),
            Mode::Sidecar(_) => None,
        }
    }

    /// Whether this checkpointer runs against an agent.
    pub fn is_sidecar(&self) -> bool {
        matches!(self.shared.mode, Mode::Sidecar(_))
    }

    fn link(&self) -> Option<&link::Link> {
        match &self.shared.mode {
            Mode::Sidecar(m) => Some(&m.link),
            Mode::Embedded(_) => None,
        }
    }

    /// Reports training progress (sidecar mode; a no-op embedded). Returns the id of a snapshot
    /// the agent requested, if one is pending: the next `save` answers it.
    pub fn heartbeat(&self, step: u64, phase: Phase) -> Result<Option<u64>> {
        self.act_on_standing_order();
        self.link().map_or(Ok(None), |l| l.heartbeat(step, phase))
    }

    /// Takes the isolator's newest restore order `(step, generation)`, if one arrived: the trainer
    /// should load that step (`load(Some(step))`) and continue from it. Always `None` embedded.
    pub fn take_restore_order(&self) -> Option<(u64, u64)> {
        self.link().and_then(link::Link::take_restore_order)
    }

    /// Why the agent asked this trainer to stop (its node is being isolated), if it did.
    pub fn stop_requested(&self) -> Option<String> {
        self.link().and_then(link::Link::stop_requested)
    }

    /// The pending snapshot request, if any (always `None` embedded).
    pub fn snapshot_requested(&self) -> Option<u64> {
        self.link().and_then(link::Link::pending_request)
    }

    /// Blocks up to `timeout` until the agent requests a snapshot; returns the request, or `None`
    /// on timeout. Embedded mode never gets requests: it waits out the timeout.
    pub fn wait_snapshot_request(&self, timeout: Duration) -> Result<Option<u64>> {
        match self.link() {
            Some(link) => link.wait_snapshot_request(timeout),
            None => {
                std::thread::sleep(timeout);
                Ok(None)
            }
        }
    }

    /// The path of this rank's arena file (in sidecar mode, once the agent made one).
    pub fn arena_path(&self) -> PathBuf {
        match &*self.shared.arena.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(a) => a.path().to_path_buf(),
            None => self.shared.arena_path.clone(),
        }
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
        let table = TensorTable::packed(tensors.iter().map(TensorRef::meta), ckpt_core::tensor::DEFAULT_ALIGN)?;
        if metadata.len() > ckpt_core::format::MAX_METADATA_LEN as usize {
            return Err(Error::Config {
                what: "metadata".into(),
                reason: format!("{} bytes exceed the cap of {}", metadata.len(), ckpt_core::format::MAX_METADATA_LEN),
            });
        }
        self.act_on_standing_order();
        let started = Instant::now();
        let (arena, slot) = self.slot_for(&table, metadata.len())?;
        let tickets = match self.copy(tensors, &table, arena.slot_addr(slot), Direction::ToHost, stream) {
            Ok(t) => t,
            Err(e) => {
                arena.release(slot);
                return Err(e);
            }
        };
        *self.shared.last_copies.lock().unwrap_or_else(|p| p.into_inner()) = tickets.clone();
        let handle = SaveHandle::new(step);
        {
            let mut in_flight = self.shared.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            // Finished saves leave the list unless their failure has not been seen yet, so it stays
            // bounded by the saves actually in flight.
            in_flight.retain(SaveHandle::needs_attention);
            in_flight.push(handle.clone());
        }
        *self.shared.last_save.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle.clone());
        let stall = started.elapsed();
        let request = self.link().and_then(link::Link::take_request).unwrap_or(0);
        let job = persist::Job { arena, slot, step, table, metadata, tickets, handle: handle.clone(), stall, request };
        if let Err(job) = self.persist.submit(job) {
            job.arena.release(job.slot);
            handle.state.finish(Err(Arc::new(Error::Closed)));
            return Err(Error::Closed);
        }
        Ok(handle)
    }

    /// Sidecar mode: a restart or stop order the script has not taken ends the process here (see
    /// [`OrderExit`]); a script that takes restore orders itself is left alone.
    fn act_on_standing_order(&self) {
        if let Some(l) = self.link() {
            l.act_on_standing_order();
        }
    }

    /// Waits until the copies of the newest save have finished reading the tensors. With `stream`,
    /// GPU copies are fenced on that stream instead (the host does not block). A restart or stop
    /// order the script does not take itself ends the process here (sidecar mode, see
    /// [`OrderExit`]): the optimizer-step hook calls this every step.
    pub fn fence(&self, stream: Option<u64>) -> Result<()> {
        self.act_on_standing_order();
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
            && self.is_sidecar()
            && let Some(last) = self.shared.last_save.lock().unwrap_or_else(|p| p.into_inner()).clone()
        {
            last.state.wait_handed_over();
        }
        Ok(())
    }

    /// Waits for every save in flight to be durable; returns the first failure that no caller has
    /// seen yet through [`SaveHandle::wait`].
    pub fn wait_all(&self) -> Result<()> {
        let handles = std::mem::take(&mut *self.shared.in_flight.lock().unwrap_or_else(|p| p.into_inner()));
        let mut first = None;
        for h in handles {
            let seen = h.reported();
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
        match &self.shared.mode {
            Mode::Sidecar(m) => match m.link.locate(None, false) {
                Ok(r) => Ok(Some(r.step)),
                Err(e) if e.kind() == crate::ErrorKind::NoCheckpoint => Ok(None),
                Err(e) => Err(e),
            },
            Mode::Embedded(m) => Ok(m.engine.latest(&self.shared.cfg.job)?.map(|m| m.step)),
        }
    }

    /// The tensor table and metadata of `step` (default: the newest committed step), without
    /// reading tensor data in embedded mode; in sidecar mode the agent stages the step in the arena
    /// (so the `load` that usually follows reads memory).
    pub fn describe(&self, step: Option<u64>) -> Result<Description> {
        let cfg = &self.shared.cfg;
        match &self.shared.mode {
            Mode::Sidecar(m) => {
                let staged = m.stage(step, cfg.strict_restore, |p| self.map_agent_arena(p))?;
                Ok(Description::of_slot(staged.hold.content()))
            }
            Mode::Embedded(m) => {
                let step = m.resolve(&cfg.job, step)?;
                let (_, header) = m.header(&cfg.job, step, cfg.restorer())?;
                Ok(Description { step, table: header.index.table, metadata: header.index.metadata })
            }
        }
    }

    /// Fills `tensors` in place from `step` (default: the newest committed step), from the arena
    /// when it holds that step, else from the store. Every mismatch of name, dtype or shape is
    /// reported at once.
    ///
    /// # Safety
    /// Every tensor's `addr` must point to `byte_len` writable bytes that nobody else reads or
    /// writes until this returns.
    pub unsafe fn load(&self, tensors: &[TensorRef], step: Option<u64>, stream: Option<u64>) -> Result<Loaded> {
        // SAFETY: the caller's contract is this function's.
        unsafe { self.load_checked(tensors, step, stream, &|_| Vec::new()) }
    }

    /// [`Checkpointer::load`] with `check`, which sees the step's description before any tensor is
    /// written and returns further problems (a caller's scalars that the metadata lacks): they are
    /// reported together with the tensor mismatches, and nothing is written when there are any.
    /// The step is resolved, and its header read or staged, once.
    ///
    /// # Safety
    /// As for [`Checkpointer::load`].
    pub unsafe fn load_checked(
        &self,
        tensors: &[TensorRef],
        step: Option<u64>,
        stream: Option<u64>,
        check: &dyn Fn(&Description) -> Vec<String>,
    ) -> Result<Loaded> {
        let cfg = &self.shared.cfg;
        let wanted: Vec<TensorMeta> = tensors.iter().map(TensorRef::meta).collect();
        let verdict = |d: &Description| {
            let mut problems = d.table.mismatches(&wanted);
            problems.extend(check(d));
            if problems.is_empty() {
                Ok(())
            } else {
                Err(Error::from(ckpt_core::Error::StateMismatch { step: d.step, problems }))
            }
        };
        let (hold, from_memory) = match &self.shared.mode {
            Mode::Sidecar(m) => {
                let staged = m.stage(step, cfg.strict_restore, |p| self.map_agent_arena(p))?;
                verdict(&Description::of_slot(staged.hold.content()))?;
                (staged.hold, !staged.from_storage)
            }
            Mode::Embedded(m) => {
                // The memory tier first: a restarted process finds its newest committed step in
                // the arena and reads no storage data. Asked for the newest step, it serves only
                // when no newer step is committed (a process that died after its step was
                // committed but before its slot became durable leaves an older memory tier); that
                // is settled before the slot is held and its checksum verified.
                let arena = self.embedded_arena();
                let tier_step = match step {
                    Some(s) => Some(s),
                    None => arena
                        .as_ref()
                        .and_then(|a| slots::memory_tier_step(a))
                        .filter(|&t| slots::memory_tier_serves(&m.engine, &cfg.job, t)),
                }
                .filter(|&t| slots::memory_tier_holds(&m.engine, &cfg.job, t, cfg.restorer()));
                // A slot that fails verification is dropped (and logged): the load reads storage.
                let tier = arena.zip(tier_step).and_then(|(a, s)| ReadHold::of_step(&a, s).ok().flatten());
                match tier {
                    Some(hold) => {
                        verdict(&Description::of_slot(hold.content()))?;
                        (hold, true)
                    }
                    // From storage into host tensors: straight into them, no slot in between.
                    None if tensors.iter().all(|t| t.device == Device::Cpu) => {
                        // SAFETY: the caller's contract is this function's.
                        return unsafe { self.load_direct(m, tensors, step, &verdict) };
                    }
                    None => {
                        // From storage through a slot (device tensors: the slot is pinned host
                        // memory the copy engine reads), which then stays the memory tier. The
                        // newest step whose data verifies, unless one was named.
                        let restored = slots::newest_sound(
                            &m.engine,
                            &cfg.job,
                            step,
                            cfg.strict_restore,
                            Error::is_damage,
                            |step| {
                                let (source, header) = m.header(&cfg.job, step, cfg.restorer())?;
                                let (table, metadata) = (header.index.table.clone(), header.index.metadata.clone());
                                verdict(&Description { step, table, metadata })?;
                                self.stage_embedded(m, step, source, &header)
                            },
                        )?;
                        let restored = restored.ok_or_else(|| self.no_checkpoint(m))?;
                        (restored.value, false)
                    }
                }
            }
        };
        let c = hold.content();
        let tickets = self.copy(tensors, &c.table, hold.addr(), Direction::FromHost, stream)?;
        for t in tickets {
            t.wait()?;
        }
        Ok(Loaded { step: c.step, metadata: c.metadata.clone(), from_memory })
    }

    /// Embedded, host tensors only: reads `step` (default: the newest step whose data verifies)
    /// from storage straight into `tensors`, each chunk verified where it lands; no arena slot is
    /// used, so a load costs no host memory beyond the tensors. The memory tier is left as it is
    /// and filled by the next save. When the newest step turns out damaged, the next older one is
    /// read into the same tensors (which hold unspecified bytes until a read succeeds).
    ///
    /// # Safety
    /// As for [`Checkpointer::load`]; every tensor is host memory.
    unsafe fn load_direct(
        &self,
        m: &embedded::Embedded,
        tensors: &[TensorRef],
        step: Option<u64>,
        verdict: &dyn Fn(&Description) -> Result<()>,
    ) -> Result<Loaded> {
        let cfg = &self.shared.cfg;
        let restored = slots::newest_sound(&m.engine, &cfg.job, step, cfg.strict_restore, Error::is_damage, |step| {
            let who = cfg.restorer();
            let plan = m.engine.restore_plan(&cfg.job, step, who.rank, who.world_size, who.resize)?;
            let index = &plan.header.index;
            verdict(&Description { step, table: index.table.clone(), metadata: index.metadata.clone() })?;
            let mut pieces = Vec::with_capacity(tensors.len());
            for t in tensors {
                // The verdict checked every tensor against the table.
                let Some(entry) = index.table.get(&t.name) else { continue };
                if entry.len == 0 {
                    continue;
                }
                // SAFETY: the caller vouched that `addr` is `byte_len` (= the entry's length, the
                // verdict checked dtype and shape) writable host bytes nobody else touches until
                // this returns; the slice does not outlive the read.
                let dst = unsafe { std::slice::from_raw_parts_mut(t.addr as *mut u8, entry.len as usize) };
                pieces.push((entry.offset, dst));
            }
            m.engine.restore_pieces(&plan, ckpt_core::Pieces::new(pieces))?;
            Ok::<_, Error>(plan.header.index.metadata)
        })?;
        let restored = restored.ok_or_else(|| self.no_checkpoint(m))?;
        Ok(Loaded { step: restored.step, metadata: restored.value, from_memory: false })
    }

    fn no_checkpoint(&self, m: &embedded::Embedded) -> Error {
        Error::NoCheckpoint { job: self.shared.cfg.job.clone(), store: m.engine.store().url().to_string() }
    }

    /// Embedded: the arena mapped now: created by this process, or the one a predecessor left on
    /// this pod, claimed at construction (a restarted trainer finds its memory tier there).
    fn embedded_arena(&self) -> Option<Arc<Arena>> {
        let Mode::Embedded(_) = &self.shared.mode else { return None };
        self.shared.arena.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Embedded: reads `step` from storage into a slot, which stays the memory tier.
    /// Reads `source`'s shard of `step` (this rank's, or the replica's it restores after a resize)
    /// into a free slot and holds it for reading.
    fn stage_embedded(
        &self,
        m: &embedded::Embedded,
        step: u64,
        source: u32,
        header: &ckpt_core::ShardHeader,
    ) -> Result<ReadHold> {
        let cfg = &self.shared.cfg;
        let (arena, slot) = self.slot_for(&header.index.table, header.index.metadata.len())?;
        slots::stage(&m.engine, &arena, slot, &cfg.job, source, step, header)?;
        ReadHold::new(&arena, slot)?.ok_or_else(|| Error::Busy {
            what: "the arena slot",
            reason: format!("slot {slot} changed before it could be read"),
        })
    }

    /// Waits for every save in flight, then stops the persist thread. Embedded, the arena file
    /// is removed: a clean close hands its memory back, and a process that restarts on purpose
    /// calls [`Checkpointer::close_keeping_arena`] instead. A process that dies never gets here,
    /// so its arena stays for the memory tier of the next start (which recovers what it left).
    pub fn close(&self) -> Result<()> {
        self.shut_down(false)
    }

    /// [`Checkpointer::close`], but an embedded arena stays on this host with its memory tier, for
    /// a planned restart of the process that should load without reading storage. The same as
    /// `close` in sidecar mode, where the agent owns the arena.
    pub fn close_keeping_arena(&self) -> Result<()> {
        self.shut_down(true)
    }

    fn shut_down(&self, keep_arena: bool) -> Result<()> {
        let r = self.wait_all();
        self.persist.stop();
        let owner = self.shared.owner.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(lock) = owner {
            self.shared.arena.lock().unwrap_or_else(|p| p.into_inner()).take();
            if !keep_arena && let Err(e) = lock.remove() {
                tracing::warn!(error = %e, "cannot remove the arena at close");
            }
        }
        r
    }

    /// Maps the arena the agent made at `path`, unless the one mapped already is that file.
    fn map_agent_arena(&self, path: &Path) -> Result<Arc<Arena>> {
        let mut guard = self.shared.arena.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = guard.as_ref()
            && a.maps(path)
        {
            return Ok(a.clone());
        }
        let arena = Arc::new(Arena::open(path)?);
        prepare_in_background(arena.clone());
        *guard = Some(arena.clone());
        Ok(arena)
    }

    /// A writable slot big enough for `table`, creating or growing the arena when needed. Blocks
    /// while every slot is busy persisting (back-pressure: a save never queues unbounded memory).
    fn slot_for(&self, table: &TensorTable, metadata_len: usize) -> Result<(Arc<Arena>, u32)> {
        let arena = {
            let current = self.shared.arena.lock().unwrap_or_else(|p| p.into_inner()).clone();
            match current {
                Some(a) if a.fits(table, metadata_len) => a,
                current => self.arena_of(current, slots::slot_size_with_headroom(table, metadata_len))?,
            }
        };
        let mut backoff = Duration::from_micros(50);
        let started = Instant::now();
        let mut waited = false;
        let count = |waited: bool| {
            let mut stats = self.shared.stats.lock().unwrap_or_else(|p| p.into_inner());
            stats.saves += 1;
            if waited {
                stats.waited += 1;
                stats.wait_time += started.elapsed();
            }
        };
        loop {
            if let Some(slot) = slots::take_slot(&arena) {
                count(waited);
                if waited {
                    tracing::debug!(waited_ms = started.elapsed().as_millis() as u64, "the save waited for a slot");
                }
                return Ok((arena, slot));
            }
            waited = true;
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
                        return Err(ckpt_core::Error::ArenaFull {
                            reason: format!(
                                "all {} slots of {} stay busy with no save in flight: another process uses this arena",
                                arena.slot_count(),
                                arena.path().display()
                            ),
                        }
                        .into());
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                }
            }
        }
    }

    /// An arena with slots of `slot_size` bytes, replacing `current` (the one mapped now, too
    /// small): created by this process (embedded) or by the agent (sidecar), mapped, and its
    /// pages faulted in the background.
    fn arena_of(&self, current: Option<Arc<Arena>>, slot_size: u64) -> Result<Arc<Arena>> {
        // Growing replaces the file: drain saves that still use the old one first.
        if current.is_some() {
            self.wait_all()?;
        }
        match &self.shared.mode {
            // The agent owns the arena: it creates (or replaces) the file, we map it.
            Mode::Sidecar(m) => {
                let path = m.prepare_arena(slot_size)?;
                self.map_agent_arena(&path)
            }
            Mode::Embedded(m) => {
                // With nothing mapped yet, `ensure` creates the file create-only, or takes over
                // one that appeared since construction (recovering it).
                let arena = {
                    let mut owner = self.shared.owner.lock().unwrap_or_else(|p| p.into_inner());
                    m.spec.ensure(current.as_ref(), slot_size, &mut owner)?
                };
                let mut guard = self.shared.arena.lock().unwrap_or_else(|p| p.into_inner());
                if !guard.as_ref().is_some_and(|g| Arc::ptr_eq(g, &arena)) {
                    prepare_in_background(arena.clone());
                    *guard = Some(arena.clone());
                }
                Ok(arena)
            }
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

/// Faults the arena's pages in and pins them for device copies, off the save path.
fn prepare_in_background(arena: Arc<Arena>) {
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

/// Copies already started on another device still read the tensors and write the slot: let them
/// finish before an error lets the caller free either.
fn wait_quietly(tickets: &[Arc<dyn CopyTicket>]) {
    for t in tickets {
        let _ = t.wait();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ckpt_core::{FileIo, Priority};

    use super::*;

    fn resolved(vars: &[(&str, &str)]) -> Result<CheckpointerConfig> {
        let vars: BTreeMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut cfg = CheckpointerConfig::new("job");
        cfg.engine.persist.priority = Priority::Normal;
        cfg.resolve_ranks(&|k| vars.get(k).cloned())?;
        Ok(cfg)
    }

    #[test]
    fn the_environment_sets_the_persist_priority_and_file_io_when_it_names_them() {
        let cfg = resolved(&[]).unwrap();
        assert_eq!(cfg.engine.persist.priority, Priority::Normal, "unset: the configured value stays");
        assert_eq!(cfg.engine.persist.file_io, FileIo::default());
        let cfg = resolved(&[(env::ENV_PERSIST_PRIORITY, "idle"), (env::ENV_PERSIST_IO, "buffered")]).unwrap();
        assert_eq!(cfg.engine.persist.priority, Priority::Idle);
        assert_eq!(cfg.engine.persist.file_io, FileIo::Buffered);
        let e = resolved(&[(env::ENV_PERSIST_PRIORITY, "urgent")]).unwrap_err();
        assert!(e.to_string().contains(env::ENV_PERSIST_PRIORITY), "{e}");
        let e = resolved(&[(env::ENV_PERSIST_IO, "mmap")]).unwrap_err();
        assert!(e.to_string().contains(env::ENV_PERSIST_IO), "{e}");
    }

    #[test]
    fn the_environment_sets_the_copy_threads_unless_the_script_did() {
        assert_eq!(resolved(&[]).unwrap().copy_threads, None);
        assert_eq!(resolved(&[(env::ENV_COPY_THREADS, " 3 ")]).unwrap().copy_threads, Some(3));
        for bad in ["0", "65", "two"] {
            let e = resolved(&[(env::ENV_COPY_THREADS, bad)]).unwrap_err();
            assert!(e.to_string().contains(env::ENV_COPY_THREADS), "{e}");
        }
        let vars = BTreeMap::from([(env::ENV_COPY_THREADS.to_string(), "3".to_string())]);
        let mut cfg = CheckpointerConfig::new("job");
        cfg.copy_threads = Some(1);
        cfg.resolve_ranks(&|k| vars.get(k).cloned()).unwrap();
        assert_eq!(cfg.copy_threads, Some(1), "the script's own setting wins");
    }
}
