//! The arena: a file in a memory-backed directory holding a header page and N snapshot slots, mapped
//! by the trainer (and, in sidecar mode, by the agent) so that a snapshot crosses the process
//! boundary without a copy.
//!
//! ```text
//! 0        4096                         4096 + slot_stride             ...
//! +--------+------------------------------+------------------------------+
//! | header | slot 0: region | descriptor  | slot 1: region | descriptor  | ...
//! +--------+------------------------------+------------------------------+
//! ```
//!
//! Each slot moves through `free → writing → sealed → persisting → durable → free`. Transitions are
//! compare-and-swap on an atomic word in the shared header, so two processes never disagree on who
//! owns a slot. The newest durable slot is kept as the **memory tier**: a restarted trainer (same
//! pod, same arena file) restores from it without reading storage. Its descriptor (tensor table and
//! user metadata, checksummed) lives in the slot after the region.
//!
//! Host memory stays bounded by `slots × slot_stride + one page`; nothing else grows with the state.
//!
//! **Ownership.** One process owns an arena file (the trainer in embedded mode, the agent in
//! sidecar mode; a sidecar trainer only maps the agent's arena): it holds an exclusive `flock` on
//! its own open of the file ([`ArenaLock`]), which the kernel releases when the process dies or
//! drops the lock, and it records its pid and start time in the header for messages. Only the
//! owner replaces the file at the path (a grown arena is renamed over the one it locks); a new
//! arena where none exists is published create-only (`link(2)`), so two processes racing to
//! create it cannot both own one. A process that becomes the owner of an existing arena recovers
//! what the previous owner left ([`Arena::recover`], or the agent's own adoption).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::error::{Error, Location, Result};
use crate::format::wire::Reader;
use crate::tensor::TensorTable;

/// Default directory of arenas: memory-backed on every Linux host and in Kubernetes pods (mount a
/// `medium: Memory` emptyDir there; the runtime's 64 MiB default is far too small).
pub const DEFAULT_ARENA_DIR: &str = "/dev/shm/ckptd";
/// Default number of slots: one copy of the state in host memory. A save waits while the
/// previous one still persists; two slots let one be written while the other persists.
pub const DEFAULT_SLOTS: u32 = 1;
/// Most slots an arena may have.
pub const MAX_SLOTS: u32 = 32;

const MAGIC: [u8; 8] = *b"CKPTAREN";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 4096;
/// Header offsets of the owner's pid and start time (clock ticks after boot, `/proc/<pid>/stat`).
const OWNER_PID_AT: usize = 24;
const OWNER_START_AT: usize = 32;
const SLOT_RECORDS_AT: usize = 64;
const SLOT_RECORD_LEN: usize = 64;
const DESCRIPTOR_MAGIC: u32 = 0x4b44_5343; // "CSDK"
/// Largest pinning call (cudaHostRegister) made at once.
pub const PIN_CHUNK: u64 = 1 << 30;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// The state of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum SlotState {
    /// Unused; may be acquired.
    Free = 0,
    /// A snapshot is being copied in.
    Writing = 1,
    /// Copies finished; the snapshot is complete and waits to be persisted.
    Sealed = 2,
    /// Being written to storage.
    Persisting = 3,
    /// Committed to storage; kept as the memory tier until a newer one is durable.
    Durable = 4,
    /// A durable slot being read by a restore; it returns to durable when the read ends, and a
    /// reader that died leaves it readable again at the next start (see [`Arena::create`]).
    Reading = 5,
}

impl SlotState {
    fn from_u32(v: u32) -> Option<SlotState> {
        [
            SlotState::Free,
            SlotState::Writing,
            SlotState::Sealed,
            SlotState::Persisting,
            SlotState::Durable,
            SlotState::Reading,
        ]
        .into_iter()
        .find(|s| *s as u32 == v)
    }
}

/// The arena file name of `rank` of `job`: the contract between a trainer and the agent that
/// serves it (both derive the path from the arena directory, the job and the rank).
pub fn file_name(job: &str, rank: u32) -> String {
    format!("{job}-rank-{rank}.arena")
}

/// How to create an arena.
#[derive(Debug, Clone)]
pub struct ArenaConfig {
    /// Memory-backed directory that holds the arena file.
    pub dir: PathBuf,
    /// File name (one arena per rank: e.g. `<job>-rank-<r>.arena`).
    pub name: String,
    /// Number of slots.
    pub slots: u32,
    /// Bytes per slot: the largest region plus its descriptor.
    pub slot_size: u64,
}

/// What a sealed or durable slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotContent {
    /// Slot number.
    pub slot: u32,
    /// The step of the snapshot.
    pub step: u64,
    /// The tensors and region size.
    pub table: TensorTable,
    /// User metadata recorded with the snapshot.
    pub metadata: Vec<u8>,
}

/// Something that can page-lock host memory for fast device copies (CUDA's `cudaHostRegister`).
pub trait HostPinner: Send + Sync + std::fmt::Debug {
    /// Page-locks `[addr, addr + len)`.
    fn pin(&self, addr: u64, len: u64) -> Result<()>;
    /// Undoes [`HostPinner::pin`] for a range pinned earlier.
    fn unpin(&self, addr: u64) -> Result<()>;
}

/// A mapped arena.
#[derive(Debug)]
pub struct Arena {
    map: memmap2::MmapRaw,
    path: PathBuf,
    /// (device, inode) of the mapped file, to tell it from a file that later replaced it.
    file_id: (u64, u64),
    slots: u32,
    slot_size: u64,
    /// Whether [`Arena::prepare`] has finished with this mapping (pages faulted in, pinned).
    prepared: std::sync::atomic::AtomicBool,
}

fn file_id(file: &std::fs::File) -> std::io::Result<(u64, u64)> {
    let m = file.metadata()?;
    Ok((m.dev(), m.ino()))
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    v.checked_next_multiple_of(a)
}

/// Free bytes of the file system holding `dir`, and whether it is memory-backed.
pub fn free_space(dir: &Path) -> Result<(u64, bool)> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::InvalidConfig { field: "arena_dir", reason: "path contains a NUL byte".into() })?;
    let mut vfs = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    let mut fs = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated path and both out-pointers point to properly sized,
    // writable structures that outlive the calls.
    let (rv, rf) = unsafe { (libc::statvfs(c.as_ptr(), vfs.as_mut_ptr()), libc::statfs(c.as_ptr(), fs.as_mut_ptr())) };
    if rv != 0 {
        return Err(Error::io("statvfs", dir, std::io::Error::last_os_error()));
    }
    // SAFETY: statvfs returned 0, so it initialised the structure.
    let vfs = unsafe { vfs.assume_init() };
    // The field types differ between platforms (u32 on some 32-bit targets).
    #[allow(clippy::unnecessary_cast)]
    let free = (vfs.f_bavail as u64).saturating_mul(vfs.f_frsize as u64);
    // SAFETY: read only when statfs returned 0 and so initialised it.
    let memory = rf == 0 && i64::from(unsafe { fs.assume_init() }.f_type as i32) == TMPFS_MAGIC;
    Ok((free, memory))
}

/// Makes `dir` ready to hold arenas, which hold the training state and must be readable by this
/// user alone: creates it with mode 0700 when missing, tightens an existing directory of this user
/// to 0700, and refuses one that is world-writable or owned by another user (anyone who can write
/// it can swap an arena file under the trainer).
pub fn prepare_dir(dir: &Path) -> Result<()> {
    let refuse = |reason: String| Error::InvalidConfig { field: "arena_dir", reason };
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io("chmod 0700", dir, e))?;
    }
    let meta = std::fs::metadata(dir).map_err(|e| Error::io("stat", dir, e))?;
    if !meta.is_dir() {
        return Err(refuse(format!("{} is not a directory", dir.display())));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(refuse(format!(
            "{} is owned by uid {}, not by this process's uid {me}: arenas hold the training state, so their \
             directory must belong to the user that runs ckptd (use a directory of its own, e.g. /dev/shm/ckptd)",
            dir.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o002 != 0 {
        return Err(refuse(format!(
            "{} is world-writable (mode {:o}): anyone could replace an arena under the trainer; use a \
             directory of its own, e.g. /dev/shm/ckptd, which ckptd creates with mode 0700",
            dir.display(),
            meta.mode() & 0o7777
        )));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io("chmod 0700", dir, e))?;
    }
    Ok(())
}

/// Formats a byte count for messages.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// The exclusive right to own an arena file: an `flock(LOCK_EX)` on an open of the file that
/// belongs to this value alone, so that it is released when the value is dropped or the process
/// dies, whatever other handles (mappings, `Arc<Arena>` clones on helper threads) still exist.
#[derive(Debug)]
pub struct ArenaLock {
    _file: File,
    id: (u64, u64),
    path: PathBuf,
}

/// Outcome of a non-blocking `flock`.
fn try_flock(file: &File) -> std::io::Result<bool> {
    // SAFETY: the descriptor is open for the duration of the call; flock has no memory effects.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock { Ok(false) } else { Err(e) }
}

/// This process's start time in clock ticks after boot (field 22 of `/proc/self/stat`), which
/// tells a recorded pid from a later process that reused it; 0 when unknown.
fn own_start_time() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Who owns the arena file at `path`, as its header records it, for messages.
fn recorded_holder(path: &Path) -> String {
    use std::os::unix::fs::FileExt;
    let mut h = [0u8; 40];
    let read = File::open(path).and_then(|f| f.read_exact_at(&mut h, 0));
    let pid = u64::from_le_bytes(h[OWNER_PID_AT..OWNER_PID_AT + 8].try_into().unwrap_or_default());
    match read {
        Ok(()) if h[0..8] == MAGIC && pid != 0 => format!("pid {pid}"),
        _ => "another process".to_string(),
    }
}

impl ArenaLock {
    /// Takes the lock of the arena file at `path`. `Ok(None)`: there is no file. Fails with
    /// [`Error::ArenaHeld`], naming the holder, when a live process owns it. The lock is checked
    /// to still refer to the file at `path` (an owner may have replaced it by a rename meanwhile).
    pub fn acquire(path: &Path) -> Result<Option<ArenaLock>> {
        for _ in 0..64 {
            let file = match OpenOptions::new().read(true).open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(Error::io("open", path, e)),
            };
            if !try_flock(&file).map_err(|e| Error::io("flock", path, e))? {
                return Err(Error::ArenaHeld { path: path.to_path_buf(), holder: recorded_holder(path) });
            }
            let id = file_id(&file).map_err(|e| Error::io("stat", path, e))?;
            match std::fs::metadata(path) {
                Ok(m) if (m.dev(), m.ino()) == id => {
                    return Ok(Some(ArenaLock { _file: file, id, path: path.to_path_buf() }));
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(Error::io("stat", path, e)),
            }
        }
        Err(Error::ArenaHeld { path: path.to_path_buf(), holder: "a process that keeps replacing it".into() })
    }

    /// Whether this lock is on the file `arena` maps.
    pub fn holds(&self, arena: &Arena) -> bool {
        self.id == arena.file_id
    }

    /// Removes the arena file this lock holds (a clean close), then releases the lock. Mappings
    /// that still exist stay valid until they are dropped.
    pub fn remove(self) -> Result<()> {
        let ours = std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if ours {
            std::fs::remove_file(&self.path).map_err(|e| Error::io("remove", &self.path, e))?;
        }
        Ok(())
    }
}

impl Arena {
    /// Creates the arena file as its owner, or reuses an existing one with the same geometry
    /// (which keeps its durable slot: the memory tier survives a trainer restart). `lock` is the
    /// caller's lock on the file at the path (`None`: the caller holds none yet, and takes it here
    /// when a file exists, failing with [`Error::ArenaHeld`] when a live process owns it; an
    /// existing arena whose lock is taken here is recovered with [`Arena::recover`]). On success
    /// `lock` holds the returned arena's file. Checks first that the directory has room, and says
    /// what to change when it has not.
    pub fn create(cfg: &ArenaConfig, lock: &mut Option<ArenaLock>) -> Result<Arena> {
        for _ in 0..8 {
            if let Some(arena) = Arena::create_once(cfg, lock)? {
                return Ok(arena);
            }
        }
        let path = cfg.dir.join(&cfg.name);
        Err(Error::ArenaHeld { path: path.clone(), holder: recorded_holder(&path) })
    }

    /// One attempt of [`Arena::create`]; `Ok(None)`: another process created the file first.
    fn create_once(cfg: &ArenaConfig, lock: &mut Option<ArenaLock>) -> Result<Option<Arena>> {
        if cfg.slots == 0 || cfg.slots > MAX_SLOTS {
            return Err(Error::InvalidConfig {
                field: "slots",
                reason: format!("{} is outside 1..={MAX_SLOTS}", cfg.slots),
            });
        }
        if cfg.name.is_empty() || cfg.name.contains('/') {
            return Err(Error::InvalidConfig {
                field: "arena name",
                reason: format!("`{}` is not a file name", cfg.name),
            });
        }
        let slot_size = align_up(cfg.slot_size.max(4096), 4096)
            .ok_or_else(|| Error::InvalidConfig { field: "slot_size", reason: "overflows".into() })?;
        let total = slot_size
            .checked_mul(u64::from(cfg.slots))
            .and_then(|v| v.checked_add(HEADER_LEN))
            .ok_or_else(|| Error::InvalidConfig { field: "slot_size", reason: "arena size overflows".into() })?;
        prepare_dir(&cfg.dir)?;
        let path = cfg.dir.join(&cfg.name);
        if lock.as_ref().is_some_and(|l| l.path != path) {
            *lock = None;
        }
        let fresh = lock.is_none();
        if fresh {
            *lock = ArenaLock::acquire(&path)?;
        }
        if let Some(l) = lock.as_ref()
            && let Ok(existing) = Arena::open(&path)
            && l.holds(&existing)
            && existing.slots == cfg.slots
            && existing.slot_size == slot_size
        {
            if fresh {
                existing.recover();
            }
            existing.record_owner();
            return Ok(Some(existing));
        }
        let existing_len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let (free, memory) = free_space(&cfg.dir)?;
        if free.saturating_add(existing_len) < total {
            return Err(Error::ArenaFull {
                reason: format!(
                    "{} has {} free, the arena needs {} ({} slots of {}): mount a larger memory-backed volume \
                     (Kubernetes: an emptyDir with medium: Memory and a sizeLimit of at least {}) or lower the slot count",
                    cfg.dir.display(),
                    human_bytes(free.saturating_add(existing_len)),
                    human_bytes(total),
                    cfg.slots,
                    human_bytes(slot_size),
                    human_bytes(total)
                ),
            });
        }
        if !memory {
            tracing::warn!(dir = %cfg.dir.display(), "arena directory is not memory-backed (tmpfs); snapshots will go through the page cache of a disk");
        }
        let tmp = crate::durable::tmp_path(&path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| Error::io("create", &tmp, e))?;
        let cleanup = |e: Error| {
            let _ = std::fs::remove_file(&tmp);
            e
        };
        // The lock lives on an open of its own: a mapping keeps the open it was made from alive,
        // and a lock on that one would outlive the lock's owner. Nobody else knows the temporary
        // name, so the lock is ours before the file is visible.
        let lock_file = File::open(&tmp).map_err(|e| cleanup(Error::io("open", &tmp, e)))?;
        if !try_flock(&lock_file).map_err(|e| cleanup(Error::io("flock", &tmp, e)))? {
            return Err(cleanup(Error::ArenaHeld { path: tmp.clone(), holder: "another process".into() }));
        }
        file.set_len(total).map_err(|e| cleanup(Error::io("truncate", &tmp, e)))?;
        let map = memmap2::MmapOptions::new().map_raw(&file).map_err(|e| cleanup(Error::io("mmap", &tmp, e)))?;
        let file_id = file_id(&file).map_err(|e| cleanup(Error::io("stat", &tmp, e)))?;
        let arena =
            Arena { map, path: path.clone(), file_id, slots: cfg.slots, slot_size, prepared: Default::default() };
        arena.write_header();
        arena.record_owner();
        if lock.is_some() {
            // We own the file at the path: replace it (its mappings stay valid for their holders).
            std::fs::rename(&tmp, &path).map_err(|e| cleanup(Error::io("rename", &path, e)))?;
        } else {
            // No file was there: publish create-only, so that of two racing creators one wins.
            let linked = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(None),
                Err(e) => return Err(Error::io("link", &path, e)),
            }
        }
        *lock = Some(ArenaLock { _file: lock_file, id: file_id, path });
        Ok(Some(arena))
    }

    /// Maps an existing arena (the agent maps the trainer's, a restarted trainer its own).
    pub fn open(path: &Path) -> Result<Arena> {
        let bad = |reason: String| {
            Error::corrupt(Location { object: path.display().to_string(), ..Location::default() }, reason)
        };
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| Error::io("open", path, e))?;
        let len = file.metadata().map_err(|e| Error::io("stat", path, e))?.len();
        let id = file_id(&file).map_err(|e| Error::io("stat", path, e))?;
        if len < HEADER_LEN {
            return Err(bad(format!("{len} bytes is too short for an arena")));
        }
        let map = memmap2::MmapOptions::new().map_raw(&file).map_err(|e| Error::io("mmap", path, e))?;
        // SAFETY: the mapping is at least HEADER_LEN bytes long (checked above) and lives as long as
        // this slice is used (until the end of this function).
        let header = unsafe { std::slice::from_raw_parts(map.as_ptr(), HEADER_LEN as usize) };
        let mut r = Reader::new(header, "arena header");
        if r.array::<8>()? != MAGIC {
            return Err(bad("not a ckptd arena".into()));
        }
        let version = r.u32()?;
        if version != VERSION {
            return Err(Error::UnsupportedVersion { what: "arena", found: version, supported: VERSION });
        }
        let slots = r.u32()?;
        let slot_size = r.u64()?;
        if slots == 0 || slots > MAX_SLOTS || slot_size % 4096 != 0 {
            return Err(bad(format!("bad geometry: {slots} slots of {slot_size} bytes")));
        }
        let need = slot_size.checked_mul(u64::from(slots)).and_then(|v| v.checked_add(HEADER_LEN));
        if need != Some(len) {
            return Err(bad(format!("file is {len} bytes, its header describes {need:?}")));
        }
        Ok(Arena { map, path: path.to_path_buf(), file_id: id, slots, slot_size, prepared: Default::default() })
    }

    /// Whether the file at `path` is the one this arena maps, and not a newer file that replaced
    /// it (an arena grown by another process).
    pub fn maps(&self, path: &Path) -> bool {
        std::fs::File::open(path).and_then(|f| file_id(&f)).is_ok_and(|id| id == self.file_id)
    }

    fn write_header(&self) {
        let mut h = [0u8; 24];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.slots.to_le_bytes());
        h[16..24].copy_from_slice(&self.slot_size.to_le_bytes());
        // SAFETY: the mapping holds at least HEADER_LEN bytes and nobody else knows the file yet
        // (it still has its temporary name).
        unsafe { std::ptr::copy_nonoverlapping(h.as_ptr(), self.map.as_mut_ptr(), h.len()) };
    }

    /// Records this process as the owner in the header (for the messages of processes refused).
    fn record_owner(&self) {
        self.header_word(OWNER_PID_AT).store(u64::from(std::process::id()), Ordering::Relaxed);
        self.header_word(OWNER_START_AT).store(own_start_time(), Ordering::Relaxed);
    }

    /// The pid recorded by the arena's owner (0: none recorded).
    pub fn owner_pid(&self) -> u64 {
        self.header_word(OWNER_PID_AT).load(Ordering::Relaxed)
    }

    fn header_word(&self, at: usize) -> &AtomicU64 {
        // SAFETY: `at` is 8-byte aligned and below SLOT_RECORDS_AT, inside the page-aligned header
        // of a mapping that lives as long as `self`; processes access it only atomically.
        unsafe { &*(self.map.as_mut_ptr().add(at) as *const AtomicU64) }
    }

    /// What a new embedded owner does with the slots a dead owner left: half-written (writing),
    /// sealed and persisting slots are freed (their step may be uncommitted, or committed from
    /// another snapshot of the same step number, so their bytes are not trusted as the memory
    /// tier), durable slots are kept, and a slot a dead reader held is durable again. Call it only
    /// as the owner ([`ArenaLock`]) of a file nobody else writes; the agent adopts what a dead
    /// agent left its own way (it persists sealed slots again).
    pub fn recover(&self) {
        for i in 0..self.slots {
            match self.state(i) {
                Some(SlotState::Durable | SlotState::Free) => {}
                Some(SlotState::Reading) => self.word(i).store(SlotState::Durable as u32, Ordering::Release),
                Some(SlotState::Writing | SlotState::Sealed | SlotState::Persisting) | None => {
                    self.word(i).store(SlotState::Free as u32, Ordering::Release)
                }
            }
        }
    }

    /// Path of the arena file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of slots.
    pub fn slot_count(&self) -> u32 {
        self.slots
    }

    /// Bytes per slot (region plus descriptor).
    pub fn slot_size(&self) -> u64 {
        self.slot_size
    }

    /// Total mapped bytes.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Whether the arena maps no slot bytes (never true for a valid arena).
    pub fn is_empty(&self) -> bool {
        self.map.len() as u64 <= HEADER_LEN
    }

    fn record(&self, slot: u32) -> *mut u8 {
        assert!(slot < self.slots, "slot {slot} out of range");
        // SAFETY: slot < slots ≤ MAX_SLOTS, so the record lies inside the header page.
        unsafe { self.map.as_mut_ptr().add(SLOT_RECORDS_AT + slot as usize * SLOT_RECORD_LEN) }
    }

    fn word(&self, slot: u32) -> &AtomicU32 {
        // SAFETY: the record is 64-byte aligned inside a page-aligned shared mapping that lives as
        // long as `self`; all processes access this word only atomically.
        unsafe { &*(self.record(slot) as *const AtomicU32) }
    }

    fn field(&self, slot: u32, at: usize) -> &AtomicU64 {
        // SAFETY: `at` is one of the 8-byte-aligned offsets 8, 16, 24, 32, 40 inside the 64-byte record;
        // see `word`.
        unsafe { &*(self.record(slot).add(at) as *const AtomicU64) }
    }

    /// The state of `slot`, or `None` when the shared word holds garbage.
    pub fn state(&self, slot: u32) -> Option<SlotState> {
        SlotState::from_u32(self.word(slot).load(Ordering::Acquire))
    }

    /// Moves `slot` from `from` to `to` if it is in `from`. Returns whether it did.
    pub fn transition(&self, slot: u32, from: SlotState, to: SlotState) -> bool {
        self.word(slot).compare_exchange(from as u32, to as u32, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Claims a free slot for writing.
    pub fn acquire(&self) -> Option<u32> {
        (0..self.slots).find(|&i| self.transition(i, SlotState::Free, SlotState::Writing))
    }

    /// Address of the first byte of `slot`.
    pub fn slot_addr(&self, slot: u32) -> u64 {
        assert!(slot < self.slots, "slot {slot} out of range");
        self.map.as_ptr() as u64 + HEADER_LEN + u64::from(slot) * self.slot_size
    }

    /// The bytes of `slot`.
    ///
    /// # Safety
    /// The caller must own the slot in a state where nobody writes it (sealed, persisting,
    /// durable), and must not hold the slice past a transition that gives the slot away.
    pub unsafe fn slot_bytes(&self, slot: u32) -> &[u8] {
        // SAFETY: the slot lies inside the mapping; the caller guarantees no concurrent writer.
        unsafe { std::slice::from_raw_parts(self.slot_addr(slot) as *const u8, self.slot_size as usize) }
    }

    /// The bytes of `slot`, writable.
    ///
    /// # Safety
    /// The caller must own the slot in the `writing` state, and no other reference to it may exist.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slot_bytes_mut(&self, slot: u32) -> &mut [u8] {
        // SAFETY: as above, and the caller guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.slot_addr(slot) as *mut u8, self.slot_size as usize) }
    }

    /// Largest region a slot can hold for a table of this shape (slot size minus its descriptor).
    pub fn fits(&self, table: &TensorTable, metadata_len: usize) -> bool {
        descriptor_at(table.total_len())
            .and_then(|at| at.checked_add(descriptor_len(table, metadata_len)))
            .is_some_and(|end| end <= self.slot_size)
    }

    /// Records what `slot` holds and moves it from writing to sealed. The caller's copies into the
    /// region must have completed.
    pub fn seal(&self, slot: u32, step: u64, table: &TensorTable, metadata: &[u8]) -> Result<()> {
        if self.state(slot) != Some(SlotState::Writing) {
            return Err(Error::Cancelled { reason: format!("slot {slot} is not being written") });
        }
        if !self.fits(table, metadata.len()) {
            return Err(Error::InvalidConfig {
                field: "slot_size",
                reason: format!(
                    "a {} snapshot does not fit a {} slot",
                    human_bytes(table.total_len()),
                    human_bytes(self.slot_size)
                ),
            });
        }
        let mut d = Vec::with_capacity(descriptor_len(table, metadata.len()) as usize);
        d.extend_from_slice(&DESCRIPTOR_MAGIC.to_le_bytes());
        d.extend_from_slice(&step.to_le_bytes());
        d.extend_from_slice(&table.total_len().to_le_bytes());
        d.extend_from_slice(&(table.len() as u32).to_le_bytes());
        d.extend_from_slice(&(metadata.len() as u32).to_le_bytes());
        crate::format::encode_tensors(table, &mut d);
        d.extend_from_slice(metadata);
        let crc = crc32c::crc32c(&d);
        let at = descriptor_at(table.total_len()).unwrap_or(0);
        // SAFETY: we own the slot in the writing state, and `fits` checked that the descriptor ends
        // inside it.
        unsafe {
            std::ptr::copy_nonoverlapping(d.as_ptr(), (self.slot_addr(slot) + at) as *mut u8, d.len());
        }
        // SAFETY: we own the slot in the writing state and the caller's copies into it completed;
        // the region lies inside the slot (`fits` checked it).
        let region = unsafe { &self.slot_bytes(slot)[..table.total_len() as usize] };
        self.field(slot, 40).store(REGION_CRC_SET | u64::from(region_crc(region)), Ordering::Relaxed);
        self.field(slot, 8).store(step, Ordering::Relaxed);
        self.field(slot, 16).store(d.len() as u64 | (u64::from(crc) << 32), Ordering::Relaxed);
        self.field(slot, 24).store(table.total_len(), Ordering::Relaxed);
        let seq = self.next_seq();
        self.field(slot, 32).store(seq, Ordering::Relaxed);
        if !self.transition(slot, SlotState::Writing, SlotState::Sealed) {
            return Err(Error::Cancelled { reason: format!("slot {slot} was taken while sealing") });
        }
        Ok(())
    }

    fn next_seq(&self) -> u64 {
        (0..self.slots).map(|i| self.field(i, 32).load(Ordering::Relaxed)).max().unwrap_or(0) + 1
    }

    /// Reads what a sealed, persisting or durable slot holds, checking its descriptor.
    pub fn content(&self, slot: u32) -> Result<SlotContent> {
        let bad = |reason: String| {
            Error::corrupt(
                Location { object: format!("{} slot {slot}", self.path.display()), ..Location::default() },
                reason,
            )
        };
        let step = self.field(slot, 8).load(Ordering::Relaxed);
        let packed = self.field(slot, 16).load(Ordering::Relaxed);
        let region_len = self.field(slot, 24).load(Ordering::Relaxed);
        let (len, crc) = (packed & 0xffff_ffff, (packed >> 32) as u32);
        let at = descriptor_at(region_len).ok_or_else(|| bad("region length overflows".into()))?;
        if at.checked_add(len).is_none_or(|end| end > self.slot_size) {
            return Err(bad(format!("descriptor of {len} bytes at {at} lies outside the slot")));
        }
        // SAFETY: the range lies inside the slot (checked above); descriptors are written before
        // the release-store that seals the slot, and readers hold the slot in a non-writing state.
        let d = unsafe { std::slice::from_raw_parts((self.slot_addr(slot) + at) as *const u8, len as usize) };
        if crc32c::crc32c(d) != crc {
            return Err(bad("descriptor checksum mismatch".into()));
        }
        let mut r = Reader::new(d, "slot descriptor");
        if r.u32()? != DESCRIPTOR_MAGIC || r.u64()? != step || r.u64()? != region_len {
            return Err(bad("descriptor does not match its slot record".into()));
        }
        let count = r.u32()?;
        let meta_len = r.u32()? as usize;
        let table = crate::format::decode_tensors(&mut r, count, region_len)?;
        let metadata = r.bytes(meta_len)?.to_vec();
        Ok(SlotContent { slot, step, table, metadata })
    }

    /// Checks the region of a sealed, persisting, durable or reading slot against the checksum
    /// recorded when it was sealed: a byte changed in shared memory since (a stray write, a
    /// hostile process, bad memory) fails with [`Error::Corrupt`] naming the slot. A slot sealed by
    /// a build that recorded no checksum passes.
    pub fn verify_region(&self, slot: u32) -> Result<()> {
        let region_len = self.field(slot, 24).load(Ordering::Relaxed);
        let recorded = self.field(slot, 40).load(Ordering::Relaxed);
        if recorded & REGION_CRC_SET == 0 {
            return Ok(());
        }
        let location = || Location { object: format!("{} slot {slot}", self.path.display()), ..Location::default() };
        if region_len > self.slot_size {
            return Err(Error::corrupt(location(), format!("region of {region_len} bytes exceeds the slot")));
        }
        // SAFETY: the caller holds the slot in a state nobody writes (see `slot_bytes`), and the
        // length was checked against the slot.
        let region = unsafe { &self.slot_bytes(slot)[..region_len as usize] };
        let found = region_crc(region);
        if u64::from(found) != recorded & 0xffff_ffff {
            return Err(Error::corrupt(
                location(),
                format!(
                    "region checksum {found:#010x} differs from {:#010x} recorded when the snapshot was sealed",
                    recorded & 0xffff_ffff
                ),
            ));
        }
        Ok(())
    }

    /// Marks a persisted slot durable; the previous durable slot (an older memory tier) is freed.
    pub fn mark_durable(&self, slot: u32) -> Result<()> {
        if !self.transition(slot, SlotState::Persisting, SlotState::Durable) {
            return Err(Error::Cancelled { reason: format!("slot {slot} is not being persisted") });
        }
        let seq = self.field(slot, 32).load(Ordering::Relaxed);
        for i in (0..self.slots).filter(|&i| i != slot) {
            if self.field(i, 32).load(Ordering::Relaxed) < seq {
                self.transition(i, SlotState::Durable, SlotState::Free);
            }
        }
        Ok(())
    }

    /// The newest durable slot (the memory tier), if any.
    pub fn newest_durable(&self) -> Option<u32> {
        (0..self.slots)
            .filter(|&i| self.state(i) == Some(SlotState::Durable))
            .max_by_key(|&i| self.field(i, 32).load(Ordering::Relaxed))
    }

    /// Gives a slot back (a failed or abandoned snapshot) whatever its state.
    pub fn release(&self, slot: u32) {
        self.word(slot).store(SlotState::Free as u32, Ordering::Release);
    }

    /// Faults every page in and, when `pinner` is given, page-locks the slots in pieces of at most
    /// [`PIN_CHUNK`] bytes. Runs on the calling thread: call it from a background thread, never
    /// on the save path.
    pub fn prepare(&self, pinner: Option<&dyn HostPinner>) -> Result<()> {
        let base = self.map.as_ptr() as u64 + HEADER_LEN;
        let len = self.slot_size * u64::from(self.slots);
        // SAFETY: the range is inside our shared mapping; MADV_POPULATE_WRITE only faults pages in
        // and never changes their content. Kernels before 5.14 reject it, which is harmless.
        let _ = unsafe {
            libc::madvise(base as *mut libc::c_void, len as usize, 23 /* MADV_POPULATE_WRITE */)
        };
        if let Some(p) = pinner {
            let mut off = 0;
            while off < len {
                let n = PIN_CHUNK.min(len - off);
                p.pin(base + off, n)?;
                off += n;
            }
        }
        self.prepared.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Whether [`Arena::prepare`] has finished: the slots' pages are resident (and pinned, when
    /// it was given a pinner), so a copy into a slot touches no fresh memory.
    pub fn is_prepared(&self) -> bool {
        self.prepared.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Set in a slot record's checksum field when the region's crc32c was recorded at seal time.
const REGION_CRC_SET: u64 = 1 << 32;
/// Bytes each thread checksums at once when a region is large.
const CRC_PIECE: usize = 64 << 20;

/// crc32c of a slot region, in pieces over a few threads for large regions, combined in order.
fn region_crc(region: &[u8]) -> u32 {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
    if region.len() <= CRC_PIECE || threads == 1 {
        return crc32c::crc32c(region);
    }
    let per_thread = region.len().div_ceil(threads).next_multiple_of(CRC_PIECE);
    let parts: Vec<(u32, usize)> = std::thread::scope(|scope| {
        let handles: Vec<_> =
            region.chunks(per_thread).map(|part| scope.spawn(move || (crc32c::crc32c(part), part.len()))).collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    if parts.iter().map(|p| p.1).sum::<usize>() != region.len() {
        // A checksum thread died (it cannot panic, but a lost piece must never pass).
        return crc32c::crc32c(region);
    }
    parts.into_iter().fold(0u32, |acc, (crc, len)| crc32c::crc32c_combine(acc, crc, len))
}

/// Where a slot's descriptor starts: after the region, 64-byte aligned.
fn descriptor_at(region_len: u64) -> Option<u64> {
    align_up(region_len, 64)
}

/// Bytes a descriptor needs.
fn descriptor_len(table: &TensorTable, metadata_len: usize) -> u64 {
    let tensors: u64 =
        table.entries().iter().map(|e| 2 + e.meta.name.len() as u64 + 2 + 8 * e.meta.shape.len() as u64 + 8).sum();
    4 + 8 + 8 + 4 + 4 + tensors + metadata_len as u64
}

/// Slot size needed for a snapshot of `table` with `metadata_len` bytes of metadata.
pub fn slot_size_for(table: &TensorTable, metadata_len: usize) -> u64 {
    descriptor_at(table.total_len()).unwrap_or(u64::MAX).saturating_add(descriptor_len(table, metadata_len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::tensor::TensorMeta;

    fn table() -> TensorTable {
        TensorTable::packed(
            [TensorMeta::new("w", DType::F32, vec![1000]).unwrap(), TensorMeta::new("s", DType::I64, vec![]).unwrap()],
            64,
        )
        .unwrap()
    }

    #[test]
    fn state_machine_and_memory_tier() {
        let dir = tempfile::tempdir().unwrap();
        let t = table();
        let cfg = ArenaConfig { dir: dir.path().into(), name: "a".into(), slots: 2, slot_size: slot_size_for(&t, 16) };
        let mut lock = None;
        let arena = Arena::create(&cfg, &mut lock).unwrap();
        assert_eq!(arena.owner_pid(), u64::from(std::process::id()));
        let s0 = arena.acquire().unwrap();
        let s1 = arena.acquire().unwrap();
        assert_ne!(s0, s1);
        assert_eq!(arena.acquire(), None, "two slots, both taken");
        arena.seal(s0, 5, &t, b"meta-5").unwrap();
        assert!(arena.transition(s0, SlotState::Sealed, SlotState::Persisting));
        arena.mark_durable(s0).unwrap();
        assert_eq!(arena.newest_durable(), Some(s0));
        arena.seal(s1, 6, &t, b"meta-6").unwrap();
        assert!(arena.transition(s1, SlotState::Sealed, SlotState::Persisting));
        arena.mark_durable(s1).unwrap();
        assert_eq!(arena.newest_durable(), Some(s1));
        assert_eq!(arena.state(s0), Some(SlotState::Free), "older durable slot is freed");
        let c = arena.content(s1).unwrap();
        assert_eq!((c.step, c.metadata.as_slice()), (6, b"meta-6".as_slice()));
        assert_eq!(c.table, t);

        // Another process maps the same file and sees the same memory tier; a create by another
        // would-be owner is refused while the lock is held, and once it is released a create with
        // the same geometry keeps the memory tier and frees unfinished slots.
        let other = Arena::open(&dir.path().join("a")).unwrap();
        assert_eq!(other.newest_durable(), Some(s1));
        let s = other.acquire().unwrap();
        drop(other);
        let e = Arena::create(&cfg, &mut None).unwrap_err();
        assert!(matches!(e, Error::ArenaHeld { .. }), "{e}");
        drop(lock);
        let again = Arena::create(&cfg, &mut None).unwrap();
        assert_eq!(again.newest_durable(), Some(s1));
        assert_eq!(again.state(s), Some(SlotState::Free));
    }

    #[test]
    fn arenas_are_private_to_their_user() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("arenas");
        let t = table();
        let cfg = ArenaConfig { dir: dir.clone(), name: "p".into(), slots: 1, slot_size: slot_size_for(&t, 0) };
        let arena = Arena::create(&cfg, &mut None).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700, "a new arena directory is 0700");
        assert_eq!(mode(arena.path()), 0o600, "an arena file is 0600");

        // An existing directory of this user that others may read is tightened.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);

        // A world-writable one is refused with what to do.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = Arena::create(&cfg, &mut None).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("world-writable"), "{e}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();

        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // As root (CI): another user cannot read the weights, and a directory owned by another
            // user is refused.
            use std::os::unix::process::CommandExt;
            let read = std::process::Command::new("cat")
                .arg(arena.path())
                .uid(65534)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(!read.success(), "uid 65534 read the arena");
            let theirs = root.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let e = prepare_dir(&theirs).unwrap_err();
            assert!(e.to_string().contains("owned by uid 65534"), "{e}");
        } else {
            // Not root: the kernel already keeps a 0600 file from other users; check our own
            // access is intact.
            assert!(std::fs::File::open(arena.path()).is_ok());
        }
    }

    #[test]
    fn a_changed_byte_fails_region_verification() {
        let dir = tempfile::tempdir().unwrap();
        let t = table();
        let cfg = ArenaConfig { dir: dir.path().into(), name: "v".into(), slots: 1, slot_size: slot_size_for(&t, 0) };
        let arena = Arena::create(&cfg, &mut None).unwrap();
        let s = arena.acquire().unwrap();
        arena.seal(s, 1, &t, &[]).unwrap();
        arena.verify_region(s).unwrap();
        // SAFETY: the test owns the arena; nobody else maps it.
        unsafe { *(arena.slot_addr(s) as *mut u8).add(100) ^= 0x40 };
        let e = arena.verify_region(s).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Corrupt);
        assert!(e.to_string().contains("slot 0"), "{e}");
        assert_eq!(region_crc(&vec![7u8; 3 * CRC_PIECE + 5]), crc32c::crc32c(&vec![7u8; 3 * CRC_PIECE + 5]));
    }

    #[test]
    fn too_little_space_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ArenaConfig { dir: dir.path().into(), name: "big".into(), slots: 2, slot_size: u64::MAX / 4 };
        let e = Arena::create(&cfg, &mut None).unwrap_err().to_string();
        assert!(e.contains("the arena needs") && e.contains("medium: Memory"), "{e}");
    }

    #[test]
    fn snapshot_that_does_not_fit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = table();
        let cfg = ArenaConfig { dir: dir.path().into(), name: "s".into(), slots: 1, slot_size: 8192 };
        let arena = Arena::create(&cfg, &mut None).unwrap();
        let s = arena.acquire().unwrap();
        let big = TensorTable::packed([TensorMeta::new("w", DType::F32, vec![5000]).unwrap()], 64).unwrap();
        assert!(!arena.fits(&big, 0));
        assert!(arena.seal(s, 1, &big, &[]).is_err());
        assert!(arena.fits(&t, 0));
    }
}
