//! One suite, two modes: every scenario here runs against the embedded checkpointer (persist
//! threads in this process) and against the sidecar checkpointer (a real `ckptd agent` process on
//! a Unix socket), the way object_store's integration suite runs one set of functions against
//! every store. A scenario is a function of [`Mode`]; `in_both_modes!` turns it into the tests
//! `embedded::<scenario>` and `sidecar::<scenario>`, so a difference between the modes shows up as
//! one test of a pair failing.
//!
//! Only the public API is used: `Checkpointer`, its config, `TensorRef` on host memory, and the
//! engine for looking at what storage holds.

#[path = "support/agent_proc.rs"]
mod agent_proc;
#[path = "../../ckpt-core/tests/common/reliability.rs"]
mod reliability;
#[path = "../../ckpt-core/tests/common/shard_file.rs"]
mod shard_file;
use shard_file::shard_file;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ckpt_core::copy::Device;
use ckpt_core::{DType, Engine};
use ckptd::client::{Checkpointer, CheckpointerConfig, Loaded, TensorRef};

const JOB: &str = "modes";
/// Longest a test waits for something another thread or process does; never asserted as a
/// duration, only a bound on polling so that a hang fails instead of blocking the suite.
const PATIENCE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Training state: typed host buffers whose values derive from a seed, so any process can rebuild
// what was saved and compare bit for bit.

/// A tensor's buffer, in its element type (16-bit floats as their raw bit patterns).
enum Data {
    F32(Vec<f32>),
    Half(Vec<u16>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl Data {
    fn generate(dtype: DType, len: usize, mut next: impl FnMut() -> u64) -> Data {
        match dtype {
            DType::F32 => Data::F32((0..len).map(|_| (next() % 2_000_000) as f32 * 0.001 - 1000.0).collect()),
            DType::BF16 | DType::F16 => Data::Half((0..len).map(|_| (next() >> 48) as u16).collect()),
            DType::I64 => Data::I64((0..len).map(|_| next() as i64).collect()),
            DType::F64 => Data::F64((0..len).map(|_| (next() >> 11) as f64 / 3.0).collect()),
            other => panic!("the suite has no buffers of {other}"),
        }
    }

    fn zeroed(dtype: DType, len: usize) -> Data {
        match dtype {
            DType::F32 => Data::F32(vec![0.0; len]),
            DType::BF16 | DType::F16 => Data::Half(vec![0; len]),
            DType::I64 => Data::I64(vec![0; len]),
            DType::F64 => Data::F64(vec![0.0; len]),
            other => panic!("the suite has no buffers of {other}"),
        }
    }

    /// Writes `other`'s values into this buffer, in place (as a training step does).
    fn copy_from(&mut self, other: &Data) {
        match (self, other) {
            (Data::F32(a), Data::F32(b)) => a.copy_from_slice(b),
            (Data::Half(a), Data::Half(b)) => a.copy_from_slice(b),
            (Data::I64(a), Data::I64(b)) => a.copy_from_slice(b),
            (Data::F64(a), Data::F64(b)) => a.copy_from_slice(b),
            _ => panic!("buffers of different types"),
        }
    }

    fn addr(&mut self) -> u64 {
        match self {
            Data::F32(v) => v.as_mut_ptr() as u64,
            Data::Half(v) => v.as_mut_ptr() as u64,
            Data::I64(v) => v.as_mut_ptr() as u64,
            Data::F64(v) => v.as_mut_ptr() as u64,
        }
    }

    /// Little-endian bytes, as the host copy lays them out.
    fn bytes(&self) -> Vec<u8> {
        match self {
            Data::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::Half(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

struct Tensor {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
    data: Data,
}

/// (name, dtype, shape) of each tensor of a state.
type Spec = &'static [(&'static str, DType, &'static [u64])];

/// A small state with every kind the suite covers: f32 weights, bf16, an i64 vector and a 0-d
/// f64 scalar (about 200 KiB).
const STANDARD: Spec = &[
    ("model/w", DType::F32, &[64, 512]),
    ("model/emb", DType::BF16, &[32_768]),
    ("optim/step_count", DType::I64, &[128]),
    ("rng/scale", DType::F64, &[]),
];

/// The standard state after growth: larger tensors and one more (about 2.5 MiB), more than an
/// arena sized for [`STANDARD`] (plus its headroom) holds.
const GROWN: Spec = &[
    ("model/w", DType::F32, &[256, 1024]),
    ("model/emb", DType::BF16, &[262_144]),
    ("optim/step_count", DType::I64, &[128]),
    ("rng/scale", DType::F64, &[]),
    ("optim/exp_avg", DType::F32, &[256, 1024]),
];

struct State {
    tensors: Vec<Tensor>,
}

impl State {
    /// Values derived from `seed` (splitmix64), different for every tensor and element.
    fn generate(spec: Spec, seed: u64) -> State {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5DEE_CE66_D1CE_4E5B;
        let mut next = move || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        State::build(spec, |dtype, len| Data::generate(dtype, len, &mut next))
    }

    /// Zero-filled buffers of the names, dtypes and shapes of `spec`.
    fn zeroed(spec: Spec) -> State {
        State::build(spec, Data::zeroed)
    }

    fn build(spec: Spec, mut data: impl FnMut(DType, usize) -> Data) -> State {
        let tensors = spec
            .iter()
            .map(|&(name, dtype, shape)| Tensor {
                name: name.into(),
                dtype,
                shape: shape.to_vec(),
                data: data(dtype, shape.iter().product::<u64>() as usize),
            })
            .collect();
        State { tensors }
    }

    /// Writes the values of `State::generate(spec, seed)` into these buffers, in place: what a
    /// training step does to the tensors after the fence.
    fn overwrite(&mut self, spec: Spec, seed: u64) {
        let fresh = State::generate(spec, seed);
        for (t, f) in self.tensors.iter_mut().zip(&fresh.tensors) {
            t.data.copy_from(&f.data);
        }
    }

    /// References to the buffers, for `save` and `load`.
    fn refs(&mut self) -> Vec<TensorRef> {
        self.tensors
            .iter_mut()
            .map(|t| TensorRef {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                addr: t.data.addr(),
                device: Device::Cpu,
            })
            .collect()
    }
}

/// Fails naming the first tensor whose bytes differ (rather than printing megabytes).
fn assert_same(got: &State, want: &State, what: &str) {
    let names = |s: &State| s.tensors.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "{what}: tensor names");
    for (g, w) in got.tensors.iter().zip(&want.tensors) {
        assert!(g.data.bytes() == w.data.bytes(), "{what}: bytes of `{}` differ from the expected values", g.name);
    }
}

/// What storage holds for (step, rank) equals `want`, tensor by tensor.
fn assert_stored(engine: &Engine, step: u64, rank: u32, want: &State) {
    let (header, bytes) = engine.restore(JOB, step, rank).unwrap_or_else(|e| panic!("restore step {step}: {e}"));
    for t in &want.tensors {
        let e = header.index.table.get(&t.name).unwrap_or_else(|| panic!("step {step}: `{}` not stored", t.name));
        assert!(bytes[e.range()] == t.data.bytes()[..], "step {step} rank {rank}: stored `{}` differs", t.name);
    }
}

/// Saves `state` as `step` and fences: the buffers may be written once this returns.
fn save_and_fence(ck: &Checkpointer, state: &mut State, step: u64, metadata: &[u8]) -> ckptd::client::SaveHandle {
    // SAFETY: the buffers of `state` stay allocated and unwritten until `fence` below returns.
    let h = unsafe { ck.save(&state.refs(), step, metadata.to_vec(), None) }.unwrap();
    ck.fence(None).unwrap();
    h
}

/// Loads into `into`.
fn load(ck: &Checkpointer, into: &mut State, step: Option<u64>) -> ckptd::Result<Loaded> {
    // SAFETY: `into` is borrowed mutably for the whole call: nothing else reads or writes it.
    unsafe { ck.load(&into.refs(), step, None) }
}

// ---------------------------------------------------------------------------------------------
// The fixture: a store and an arena directory per test, and in sidecar mode an agent process.

/// Which checkpointer a scenario runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Persist threads in this process, arena in a memory-backed directory.
    Embedded,
    /// A `ckptd agent` process owns the arena and persists; the checkpointer talks to its socket.
    Sidecar,
}

/// What a scenario needs from the setup.
#[derive(Debug, Clone, Copy)]
struct Options {
    slots: u32,
    world_size: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options { slots: 2, world_size: 1 }
    }
}

/// Everything a checkpointer of either mode needs to be configured; also what a child process
/// receives (encoded in [`CHILD_ENV`]).
#[derive(Debug, Clone)]
struct Target {
    mode: Mode,
    store_url: String,
    arena_dir: PathBuf,
    socket: Option<PathBuf>,
    slots: u32,
    world_size: u32,
}

impl Target {
    fn config(&self, rank: u32) -> CheckpointerConfig {
        let mut cfg = CheckpointerConfig::new(JOB);
        cfg.store = Some(self.store_url.clone());
        cfg.rank = Some(rank);
        cfg.world_size = Some(self.world_size);
        cfg.socket = self.socket.clone();
        cfg.arena_dir = Some(self.arena_dir.clone());
        cfg.slots = self.slots;
        cfg.engine.commit.deadline = PATIENCE;
        cfg
    }

    /// Opens a checkpointer for `rank`. In sidecar mode a session of the same rank that just
    /// closed may still be open on the agent (it learns of the close asynchronously, from the
    /// stream ending); the attach is retried on that conflict only, within [`PATIENCE`].
    fn checkpointer(&self, rank: u32) -> Checkpointer {
        let started = Instant::now();
        loop {
            match Checkpointer::new(self.config(rank)) {
                Ok(ck) => {
                    assert_eq!(ck.is_sidecar(), self.mode == Mode::Sidecar, "the checkpointer runs in the wrong mode");
                    return ck;
                }
                Err(e)
                    if self.mode == Mode::Sidecar
                        && e.kind() == ckptd::ErrorKind::Core(ckpt_core::ErrorKind::Conflict)
                        && started.elapsed() < PATIENCE =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot open the {:?} checkpointer of rank {rank}: {e}", self.mode),
            }
        }
    }

    fn encode(&self) -> String {
        let socket = self.socket.as_ref().map_or(String::new(), |s| s.display().to_string());
        format!(
            "{:?}|{}|{}|{}|{}|{}",
            self.mode,
            self.store_url,
            self.arena_dir.display(),
            socket,
            self.slots,
            self.world_size
        )
    }

    fn decode(s: &str) -> Target {
        let f: Vec<&str> = s.split('|').collect();
        assert_eq!(f.len(), 6, "bad child target {s}");
        Target {
            mode: if f[0] == "Sidecar" { Mode::Sidecar } else { Mode::Embedded },
            store_url: f[1].into(),
            arena_dir: f[2].into(),
            socket: (!f[3].is_empty()).then(|| PathBuf::from(f[3])),
            slots: f[4].parse().unwrap(),
            world_size: f[5].parse().unwrap(),
        }
    }
}

/// A running `ckptd agent`, killed (SIGKILL) when dropped.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn start(dir: &Path, target: &Target) -> Agent {
        let socket = target.socket.as_ref().expect("sidecar target has a socket");
        let log = dir.join("agent.log");
        let child = agent_proc::start(
            Command::new(env!("CARGO_BIN_EXE_ckptd"))
                .arg("agent")
                .args(["--socket", socket.to_str().unwrap(), "--store", &target.store_url, "--job", JOB])
                .args(["--arena-dir", target.arena_dir.to_str().unwrap()])
                .args(["--slots", &target.slots.to_string(), "--world-size", &target.world_size.to_string()])
                .args(["--commit-timeout", "60s", "--grace-period", "5s"])
                .env("CKPTD_LOG", "ckptd=info"),
            &log,
            socket,
            PATIENCE,
        );
        Agent { child, log }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let _ = writeln!(std::io::stderr(), "--- agent log ---\n{log}");
        }
    }
}

/// One scenario's world: a `file://` store in a temporary directory, an arena directory on tmpfs
/// (`/dev/shm` when present) and, in sidecar mode, the agent serving them.
struct Fixture {
    target: Target,
    store_dir: PathBuf,
    // Dropped first: the agent goes before the directories it uses.
    agent: Option<Agent>,
    agent_dir: PathBuf,
    _arena: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

impl Mode {
    fn start(self, opts: Options) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let shm = Path::new("/dev/shm");
        let arena = if shm.is_dir() {
            tempfile::Builder::new().prefix("ckptd-modes-").tempdir_in(shm).unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let store_dir = dir.path().join("store");
        let target = Target {
            mode: self,
            store_url: format!("file://{}", store_dir.display()),
            arena_dir: arena.path().to_path_buf(),
            socket: (self == Mode::Sidecar).then(|| dir.path().join("agent.sock")),
            slots: opts.slots,
            world_size: opts.world_size,
        };
        let agent = (self == Mode::Sidecar).then(|| Agent::start(dir.path(), &target));
        Fixture { target, store_dir, agent, agent_dir: dir.path().to_path_buf(), _arena: arena, _dir: dir }
    }
}

impl Fixture {
    fn checkpointer(&self, rank: u32) -> Checkpointer {
        self.target.checkpointer(rank)
    }

    /// A reader of the store, independent of both modes.
    fn engine(&self) -> Engine {
        Engine::open(&self.target.store_url, Default::default()).unwrap()
    }

    /// The pod is lost and replaced: the arena directory is emptied and, in sidecar mode, a new
    /// agent starts, so the next load can only come from storage.
    fn lose_pod(&mut self) {
        drop(self.agent.take());
        for entry in std::fs::read_dir(&self.target.arena_dir).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
        if self.target.mode == Mode::Sidecar {
            self.agent = Some(Agent::start(&self.agent_dir, &self.target));
        }
    }

    /// Flips one byte of the first data chunk of `rank`'s stored shard of `step`.
    fn damage_stored_shard(&self, step: u64, rank: u32) {
        use std::os::unix::fs::FileExt;
        let path = shard_file(&self.store_dir.join(JOB).join(format!("step-{step}")), rank).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, 100).unwrap();
        byte[0] ^= 0x01;
        file.write_all_at(&byte, 100).unwrap();
    }

    /// Moves the store directory away until the guard drops: any storage read fails meanwhile.
    fn hide_store(&self) -> HiddenStore {
        let away = self.store_dir.with_file_name("store-away");
        std::fs::rename(&self.store_dir, &away).unwrap();
        HiddenStore { home: self.store_dir.clone(), away }
    }
}

struct HiddenStore {
    home: PathBuf,
    away: PathBuf,
}

impl Drop for HiddenStore {
    fn drop(&mut self) {
        let _ = std::fs::rename(&self.away, &self.home);
    }
}

macro_rules! in_both_modes {
    ($($scenario:ident),+ $(,)?) => {
        mod embedded {
            $(#[test] fn $scenario() { super::$scenario(super::Mode::Embedded) })+
        }
        mod sidecar {
            $(#[test] fn $scenario() { super::$scenario(super::Mode::Sidecar) })+
        }
    };
}

in_both_modes!(
    round_trip_restores_the_values_at_save_time,
    restart_loads_from_memory_without_storage,
    back_pressure_with_one_slot,
    back_pressure_with_two_slots,
    growing_state_grows_the_arena,
    multi_rank_commit,
    kill_after_seal,
    changed_memory_byte_falls_back_to_storage,
    damaged_newest_step_falls_back_to_the_previous_one,
);

// ---------------------------------------------------------------------------------------------
// Scenarios.

/// save → fence → the training step overwrites the tensors → wait → load into zeroed buffers: the
/// values at save time come back, with the step and metadata; describe agrees; a state that
/// differs in shape, dtype and names fails with one error naming every offending tensor, and
/// writes nothing.
fn round_trip_restores_the_values_at_save_time(mode: Mode) {
    let fx = mode.start(Options::default());
    let ck = fx.checkpointer(0);
    let mut live = State::generate(STANDARD, 1);
    let at_save = State::generate(STANDARD, 1);
    let h = save_and_fence(&ck, &mut live, 5, b"epoch=3");
    live.overwrite(STANDARD, 99);
    assert!(
        live.tensors.iter().zip(&at_save.tensors).all(|(l, a)| l.data.bytes() != a.data.bytes()),
        "the overwrite left a tensor as it was saved"
    );
    h.wait().unwrap();
    assert!(h.done());
    assert_eq!(ck.latest_step().unwrap(), Some(5));

    let mut out = State::zeroed(STANDARD);
    let loaded = load(&ck, &mut out, None).unwrap();
    assert_eq!((loaded.step, loaded.metadata.as_slice()), (5, b"epoch=3".as_slice()));
    assert_same(&out, &at_save, "load after save");
    assert_stored(&fx.engine(), 5, 0, &at_save);

    let d = ck.describe(None).unwrap();
    assert_eq!((d.step, d.metadata.as_slice()), (5, b"epoch=3".as_slice()));
    let described: Vec<(String, DType, Vec<u64>)> =
        d.table.entries().iter().map(|e| (e.meta.name.clone(), e.meta.dtype, e.meta.shape.clone())).collect();
    let spec: Vec<(String, DType, Vec<u64>)> = STANDARD.iter().map(|&(n, t, s)| (n.into(), t, s.to_vec())).collect();
    assert_eq!(described, spec);

    // Wrong shape, wrong dtype, a renamed tensor (missing + unexpected) and one correct tensor.
    const WRONG: Spec = &[
        ("model/w", DType::F32, &[512, 64]),
        ("model/emb", DType::F16, &[32_768]),
        ("optim/steps", DType::I64, &[128]),
        ("rng/scale", DType::F64, &[]),
    ];
    let mut wrong = State::zeroed(WRONG);
    let refs = wrong.refs();
    // SAFETY: `wrong` is not touched by anything else during the call.
    let err = unsafe { ck.load(&refs, Some(5), None) }.expect_err("a mismatched state must not load");
    assert_eq!(err.kind(), ckptd::ErrorKind::Core(ckpt_core::ErrorKind::Mismatch), "{err}");
    let ckptd::Error::Core(ckpt_core::Error::StateMismatch { step, problems }) = &err else {
        panic!("expected a state mismatch, got {err:?}")
    };
    assert_eq!(*step, 5);
    assert_eq!(problems.len(), 4, "one problem per offending tensor: {problems:?}");
    let message = err.to_string();
    for name in ["`model/w`", "`model/emb`", "`optim/steps`", "`optim/step_count`"] {
        assert!(message.contains(name), "the error does not name {name}: {message}");
    }
    assert!(!message.contains("`rng/scale`"), "the matching tensor is not a problem: {message}");
    assert!(
        wrong.tensors.iter().all(|t| t.data.bytes().iter().all(|&b| b == 0)),
        "a failed load wrote into the caller's buffers"
    );
    ck.close().unwrap();
}

/// After a committed save, a new checkpointer of the same rank (embedded: same arena directory;
/// sidecar: a new session with the same agent) loads the step from memory: it works with the
/// store directory moved away, and says `from_memory`.
fn restart_loads_from_memory_without_storage(mode: Mode) {
    let fx = mode.start(Options::default());
    let saved = State::generate(STANDARD, 2);
    {
        let ck = fx.checkpointer(0);
        let mut live = State::generate(STANDARD, 2);
        save_and_fence(&ck, &mut live, 8, b"before restart").wait().unwrap();
        ck.close_keeping_arena().unwrap();
    }
    assert!(fx.engine().manifest(JOB, 8).is_ok(), "step 8 was committed before the restart");

    let ck = fx.checkpointer(0);
    let mut out = State::zeroed(STANDARD);
    let loaded = {
        let _hidden = fx.hide_store();
        load(&ck, &mut out, None)
    };
    let loaded = loaded.unwrap_or_else(|e| panic!("load from the memory tier with the store away failed: {e}"));
    assert_eq!((loaded.step, loaded.metadata.as_slice()), (8, b"before restart".as_slice()));
    assert!(loaded.from_memory, "the restarted checkpointer's load did not come from memory");
    assert_same(&out, &saved, "memory-tier load");
    ck.close().unwrap();
}

/// A byte of the memory tier changed in shared memory after the save (a stray write, bad memory):
/// the restarted checkpointer's load notices it, drops the slot, and restores the same step from
/// storage, bit for bit.
fn changed_memory_byte_falls_back_to_storage(mode: Mode) {
    use std::os::unix::fs::FileExt;
    let fx = mode.start(Options::default());
    let saved = State::generate(STANDARD, 3);
    let arena_path = {
        let ck = fx.checkpointer(0);
        let mut live = State::generate(STANDARD, 3);
        save_and_fence(&ck, &mut live, 9, b"flip").wait().unwrap();
        let path = ck.arena_path();
        ck.close_keeping_arena().unwrap();
        path
    };
    let arena = ckpt_core::arena::Arena::open(&arena_path).unwrap();
    let slot = arena.newest_durable().expect("step 9 is the memory tier");
    let region_start = 4096 + u64::from(slot) * arena.slot_size();
    drop(arena);
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&arena_path).unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, region_start + 1000).unwrap();
    byte[0] ^= 0x10;
    file.write_all_at(&byte, region_start + 1000).unwrap();
    drop(file);

    let ck = fx.checkpointer(0);
    let mut out = State::zeroed(STANDARD);
    let loaded = load(&ck, &mut out, None).unwrap_or_else(|e| panic!("load after a changed memory byte failed: {e}"));
    assert_eq!((loaded.step, loaded.metadata.as_slice()), (9, b"flip".as_slice()));
    assert!(!loaded.from_memory, "a memory tier that fails verification must not be used");
    assert_same(&out, &saved, "load after the memory tier failed verification");
    ck.close().unwrap();
}

/// One flipped byte in the newest committed step on storage, and no memory tier (the pod was
/// replaced): a load restores the previous step instead of failing, a strict checkpointer refuses,
/// and retention keeps the sound step even when the damaged one fills the quota.
fn damaged_newest_step_falls_back_to_the_previous_one(mode: Mode) {
    let mut fx = mode.start(Options::default());
    let older = State::generate(STANDARD, 5);
    {
        let ck = fx.checkpointer(0);
        let mut live = State::generate(STANDARD, 5);
        save_and_fence(&ck, &mut live, 5, b"sound").wait().unwrap();
        let mut live = State::generate(STANDARD, 10);
        save_and_fence(&ck, &mut live, 10, b"damaged").wait().unwrap();
        ck.close().unwrap();
    }
    fx.damage_stored_shard(10, 0);
    fx.lose_pod();

    {
        let mut cfg = fx.target.config(0);
        cfg.strict_restore = true;
        let ck = Checkpointer::new(cfg).unwrap();
        let e = load(&ck, &mut State::zeroed(STANDARD), None).expect_err("a strict load of a damaged step");
        assert_eq!(e.kind(), ckptd::ErrorKind::Core(ckpt_core::ErrorKind::Corrupt), "{e}");
        assert!(e.to_string().contains("step-10") || e.to_string().contains("step 10"), "{e}");
        ck.close().unwrap();
    }

    let ck = fx.checkpointer(0);
    let mut out = State::zeroed(STANDARD);
    let loaded = load(&ck, &mut out, None).unwrap_or_else(|e| panic!("load past a damaged step failed: {e}"));
    assert_eq!((loaded.step, loaded.metadata.as_slice()), (5, b"sound".as_slice()));
    if mode == Mode::Embedded {
        // (The new agent may have prefetched step 5 from storage into its memory before the load.)
        assert!(!loaded.from_memory);
    }
    assert_same(&out, &older, "fallback to step 5");
    ck.close().unwrap();

    let report = fx.engine().gc(JOB, &ckpt_core::RetentionPolicy { keep: 1, ..Default::default() }).unwrap();
    assert!(report.kept.contains(&5), "retention deleted the newest sound step: {report:?}");
    assert!(fx.engine().manifest(JOB, 5).is_ok());
}

fn back_pressure_with_one_slot(mode: Mode) {
    back_pressure(mode, 1);
}

fn back_pressure_with_two_slots(mode: Mode) {
    back_pressure(mode, 2);
}

/// More saves in a row than there are slots, none waited for: every save completes, every step is
/// stored with its own values (a slot reused while persisting would corrupt an older one), and the
/// newest step loads.
fn back_pressure(mode: Mode, slots: u32) {
    const SAVES: u64 = 8;
    let fx = mode.start(Options { slots, ..Options::default() });
    let ck = fx.checkpointer(0);
    let mut live = State::zeroed(STANDARD);
    let mut handles = Vec::new();
    for step in 1..=SAVES {
        // The training step between two saves, after the previous fence.
        live.overwrite(STANDARD, 100 + step);
        handles.push(save_and_fence(&ck, &mut live, step, format!("step {step}").as_bytes()));
    }
    live.overwrite(STANDARD, 7);
    ck.wait_all().unwrap();
    for h in &handles {
        h.wait().unwrap_or_else(|e| panic!("save of step {} failed: {e}", h.step()));
    }
    assert_eq!(ck.latest_step().unwrap(), Some(SAVES));
    let engine = fx.engine();
    for step in 1..=SAVES {
        assert!(engine.manifest(JOB, step).is_ok(), "step {step} was not committed");
        assert_stored(&engine, step, 0, &State::generate(STANDARD, 100 + step));
    }
    let mut out = State::zeroed(STANDARD);
    let loaded = load(&ck, &mut out, None).unwrap();
    assert_eq!((loaded.step, loaded.metadata.as_slice()), (SAVES, format!("step {SAVES}").as_bytes()));
    assert_same(&out, &State::generate(STANDARD, 100 + SAVES), "newest step after back-pressure");
    ck.close().unwrap();
}

/// A small state, then a larger one with more tensors (the arena must grow): the newest loads
/// with its bytes, and the older, smaller step still loads by number, from storage since the
/// grown arena no longer holds it.
fn growing_state_grows_the_arena(mode: Mode) {
    let fx = mode.start(Options::default());
    let ck = fx.checkpointer(0);
    let mut small = State::generate(STANDARD, 3);
    save_and_fence(&ck, &mut small, 1, b"small").wait().unwrap();
    let mut big = State::generate(GROWN, 4);
    save_and_fence(&ck, &mut big, 2, b"big").wait().unwrap();

    let mut out = State::zeroed(GROWN);
    let loaded = load(&ck, &mut out, None).unwrap();
    assert_eq!((loaded.step, loaded.metadata.as_slice()), (2, b"big".as_slice()));
    assert_same(&out, &State::generate(GROWN, 4), "newest (grown) step");

    let mut old = State::zeroed(STANDARD);
    let loaded = load(&ck, &mut old, Some(1)).unwrap();
    assert_eq!((loaded.step, loaded.metadata.as_slice()), (1, b"small".as_slice()));
    assert!(!loaded.from_memory, "step 1 cannot be in the grown arena: it must come from storage");
    assert_same(&old, &State::generate(STANDARD, 3), "older step after growth");
    ck.close().unwrap();
}

/// Two ranks of one job save the same step from two threads: once both handles are done the
/// step's MANIFEST lists both shards, and each rank loads its own values.
fn multi_rank_commit(mode: Mode) {
    const STEP: u64 = 6;
    let fx = mode.start(Options { world_size: 2, ..Options::default() });
    let seed = |rank: u32| 1000 + u64::from(rank);
    let opened: Vec<(u32, Checkpointer)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2u32)
            .map(|rank| {
                let fx = &fx;
                s.spawn(move || {
                    let ck = fx.checkpointer(rank);
                    let mut live = State::generate(STANDARD, seed(rank));
                    let h = save_and_fence(&ck, &mut live, STEP, format!("rank {rank}").as_bytes());
                    h.wait().unwrap_or_else(|e| panic!("rank {rank}: save failed: {e}"));
                    (rank, ck)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let manifest = fx.engine().manifest(JOB, STEP).expect("both saves are done: the step is committed");
    assert_eq!(manifest.world_size, 2);
    assert_eq!(manifest.shards.len(), 2, "{manifest:?}");
    for (rank, ck) in &opened {
        let mut out = State::zeroed(STANDARD);
        let loaded = load(ck, &mut out, None).unwrap();
        assert_eq!((loaded.step, loaded.metadata), (STEP, format!("rank {rank}").into_bytes()));
        assert_same(&out, &State::generate(STANDARD, seed(*rank)), &format!("rank {rank}'s own state"));
        assert_stored(&fx.engine(), STEP, *rank, &State::generate(STANDARD, seed(*rank)));
    }
    for (_, ck) in opened {
        ck.close().unwrap();
    }
}

/// A trainer process saves step N-1 (waited), then step N and is SIGKILLed: in sidecar mode right
/// after `fence` returns (the agent owns the sealed slot and must still commit it), in embedded
/// mode after `wait` (its persist threads die with it). A fresh checkpointer then loads step N as
/// the newest step, bit for bit.
fn kill_after_seal(mode: Mode) {
    const STEP: u64 = 12;
    let fx = mode.start(Options::default());
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_trainer", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{STEP}|{}", fx.target.encode()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = wait_for_line(stdout, "sealed");
    assert_eq!(line, format!("sealed {STEP}"));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let ck = fx.checkpointer(0);
    let mut out = State::zeroed(STANDARD);
    let loaded = load(&ck, &mut out, None).unwrap_or_else(|e| panic!("load after the kill failed: {e}"));
    assert_eq!((loaded.step, loaded.metadata), (STEP, format!("step {STEP}").into_bytes()));
    assert_same(&out, &State::generate(STANDARD, STEP), "step saved by the killed trainer");
    assert!(fx.engine().manifest(JOB, STEP).is_ok(), "step {STEP} is committed on storage");
    assert_stored(&fx.engine(), STEP, 0, &State::generate(STANDARD, STEP));
    ck.close().unwrap();
    reliability::record("sigkill", "trainer after seal (two-mode suite)", 1);
}

/// Reads the child's stdout until a line containing `prefix`, for at most [`PATIENCE`]; returns the
/// line from `prefix` on (libtest prints `test child_trainer ... ` before it on the same line).
fn wait_for_line(stdout: std::process::ChildStdout, prefix: &str) -> String {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(at) = line.find(prefix) {
                    return line[at..].trim().to_string();
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("the child never printed `{prefix}`"),
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the child exited before printing `{prefix}`"),
        }
    }
}

/// Environment variable that turns [`child_trainer`] into a trainer process: `<step>|<target>`.
const CHILD_ENV: &str = "CKPTD_MODES_CHILD";

/// The trainer process of [`kill_after_seal`].
///
/// Crash tests need a process to kill, and the simplest one with this crate's code in it is this
/// test binary: the parent re-executes `std::env::current_exe()` with `--exact child_trainer
/// --nocapture`, passing what to do in [`CHILD_ENV`]. In a normal run the variable is unset and
/// this test returns at once (it is listed as passing, and does nothing).
///
/// It saves `step - 1` and waits for it, saves `step` and fences (and, embedded, waits: the persist
/// threads are in this process), prints `sealed <step>` and blocks until the parent kills it.
#[test]
fn child_trainer() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let (step, target) = spec.split_once('|').expect("`<step>|<target>`");
    let step: u64 = step.parse().unwrap();
    let target = Target::decode(target);
    let ck = target.checkpointer(0);
    let mut earlier = State::generate(STANDARD, step - 1);
    save_and_fence(&ck, &mut earlier, step - 1, format!("step {}", step - 1).as_bytes()).wait().unwrap();
    let mut live = State::generate(STANDARD, step);
    let h = save_and_fence(&ck, &mut live, step, format!("step {step}").as_bytes());
    if target.mode == Mode::Embedded {
        h.wait().unwrap();
    }
    // The training step may overwrite the state now; in sidecar mode the agent owns the snapshot.
    live.overwrite(STANDARD, step + 1);
    let mut out = std::io::stdout();
    writeln!(out, "sealed {step}").unwrap();
    out.flush().unwrap();
    loop {
        std::thread::park();
    }
}
