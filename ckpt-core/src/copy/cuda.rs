//! The CUDA copy engine: chunked asynchronous copies on dedicated copy streams, ordered after the
//! caller's stream by an event, so a snapshot overlaps the next forward and backward passes.
//!
//! It talks to the CUDA driver API through `cudarc`, loaded at run time: the same binary runs on
//! machines without a GPU. `cudarc` panics when the driver library or one of its symbols is
//! missing, so nothing here calls into CUDA before [`cuda_available`] has checked the library,
//! every symbol this module uses, `cuInit` and the device count, once per process.
//!
//! Work runs in the device's **primary context**, the one torch and the CUDA runtime use, so the
//! caller's streams and device pointers are valid here. Each call makes that context current on the
//! calling thread and restores the thread's previous context afterwards, so a caller's current
//! device never changes behind its back.
//!
//! Host regions should be page-locked ([`CudaPinner`], through `Arena::prepare`): copies to or from
//! pageable memory are correct but block the submitting thread until they finish.

use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use cudarc::driver::result::DriverError;
use cudarc::driver::sys;

use super::host::HostCopy;
use super::{CopyEngine, CopyTicket, Device, Direction, Region};
use crate::arena::HostPinner;
use crate::error::{Error, Result};

/// Largest single asynchronous copy; bigger regions are cut into pieces spread over the streams.
pub const CHUNK: usize = 64 << 20;

/// Most copy streams one engine may own.
pub const MAX_STREAMS: usize = 32;

/// Every driver entry point this module (and so any call that follows a successful probe) uses.
/// `cudarc` panics on a missing symbol, so the probe checks them all up front.
const SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuStreamWaitEvent",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventQuery",
    "cuEventSynchronize",
    "cuEventDestroy_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuMemHostRegister_v2",
    "cuMemHostUnregister",
    "cuGetErrorName",
    "cuGetErrorString",
];

/// What the one-time probe found: the number of visible devices, or why CUDA cannot be used.
fn probe() -> &'static std::result::Result<u32, String> {
    static PROBE: OnceLock<std::result::Result<u32, String>> = OnceLock::new();
    PROBE.get_or_init(|| {
        // Last line of defence: the checks below are meant to keep cudarc from panicking (it does
        // on a missing library or symbol), but a panic in this first contact with an unknown
        // driver must still become "CUDA is not available", never a crash of the trainer.
        std::panic::catch_unwind(probe_driver)
            .unwrap_or_else(|_| Err("loading the CUDA driver library panicked (see the message above)".into()))
    })
}

fn probe_driver() -> std::result::Result<u32, String> {
    // SAFETY: loading libcuda runs its initialisers, which are sound to run in any process; the
    // library is only opened here, no function of it is called.
    if !unsafe { sys::is_culib_present() } {
        return Err("no libcuda found (install the NVIDIA driver; in a container, run it with the NVIDIA \
                    container runtime)"
            .into());
    }
    // SAFETY: `culib` opens the library that `is_culib_present` just found (same candidate order),
    // so it does not panic; `get` only looks symbols up and nothing is called through them here.
    let lib = unsafe { sys::culib() };
    for name in SYMBOLS {
        // SAFETY: as above; the symbol is looked up as an opaque pointer and never used.
        if unsafe { lib.get::<*const c_void>(name.as_bytes()) }.is_err() {
            return Err(format!("libcuda lacks {name}: the NVIDIA driver is too old, upgrade it"));
        }
    }
    // SAFETY: the library and every symbol we use are present (checked above); cuInit takes flags
    // 0 and has no other precondition.
    unsafe { sys::cuInit(0) }.result().map_err(|e| format!("cuInit failed: {}", describe(e)))?;
    let mut count = 0i32;
    // SAFETY: cuInit succeeded and `count` is a valid out-pointer for the duration of the call.
    unsafe { sys::cuDeviceGetCount(&mut count) }
        .result()
        .map_err(|e| format!("cuDeviceGetCount failed: {}", describe(e)))?;
    if count <= 0 {
        return Err("the driver sees no CUDA device (check CUDA_VISIBLE_DEVICES and the GPUs given to the \
                    container)"
            .into());
    }
    Ok(count as u32)
}

/// Whether CUDA can be used: the driver library is present with every entry point this engine
/// needs, `cuInit` succeeds and at least one device is visible. Probed once per process; never
/// panics, so callers can use it to choose between this engine and the host one.
pub fn cuda_available() -> bool {
    probe().is_ok()
}

/// Number of CUDA devices visible to this process (0 when CUDA is not available).
pub fn device_count() -> u32 {
    probe().as_ref().map(|n| *n).unwrap_or(0)
}

/// Fails with advice when CUDA cannot be used, or when `device` does not exist.
fn require(device: u32, field: &'static str) -> Result<()> {
    match probe() {
        Err(why) => Err(Error::InvalidConfig {
            field,
            reason: format!("CUDA is not available: {why} — use the host copy engine"),
        }),
        Ok(n) if device >= *n => Err(Error::InvalidConfig {
            field,
            reason: format!("CUDA device {device} does not exist: {n} device(s) are visible (numbered from 0)"),
        }),
        Ok(_) => Ok(()),
    }
}

/// `NAME (description)` of a driver error. Only called once the library is known to be present.
fn describe(e: DriverError) -> String {
    let name =
        e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("CUresult {}", e.0 as i32));
    match e.error_string() {
        Ok(s) => format!("{name} ({})", s.to_string_lossy()),
        Err(_) => name,
    }
}

/// Turns a failed driver call into an error that names the call, the device and the CUDA error.
fn check(r: sys::CUresult, op: &'static str, device: u32) -> Result<()> {
    r.result().map_err(|e| Error::Device { op, device, reason: describe(e) })
}

/// A raw stream handle from the seam (0 = the legacy default stream).
fn stream_handle(s: u64) -> sys::CUstream {
    s as usize as sys::CUstream
}

/// A retained primary context. Shared (through `Arc`) by the engine, its tickets and pinners, so
/// the context outlives every event and stream made in it.
#[derive(Debug)]
struct PrimaryCtx {
    ordinal: u32,
    device: sys::CUdevice,
    ctx: sys::CUcontext,
}

// SAFETY: a CUcontext is an opaque handle that the driver API accepts from any thread; this type
// never dereferences it, and the driver is thread-safe.
unsafe impl Send for PrimaryCtx {}
// SAFETY: see `Send`; no method mutates the struct.
unsafe impl Sync for PrimaryCtx {}

impl PrimaryCtx {
    fn retain(ordinal: u32, field: &'static str) -> Result<Arc<PrimaryCtx>> {
        require(ordinal, field)?;
        let mut device: sys::CUdevice = 0;
        // SAFETY: the probe succeeded (library, symbols, cuInit) and `ordinal` < device count;
        // `device` is a valid out-pointer.
        check(unsafe { sys::cuDeviceGet(&mut device, ordinal as i32) }, "cuDeviceGet", ordinal)?;
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: `device` came from cuDeviceGet; `ctx` is a valid out-pointer. Balanced by the
        // release in Drop.
        check(unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, device) }, "cuDevicePrimaryCtxRetain", ordinal)?;
        Ok(Arc::new(PrimaryCtx { ordinal, device, ctx }))
    }

    /// Makes this context current on the calling thread until the returned scope drops.
    fn enter(&self) -> Result<CtxScope> {
        let mut prev: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: the driver is initialised (a PrimaryCtx exists only after a successful probe);
        // `prev` is a valid out-pointer.
        check(unsafe { sys::cuCtxGetCurrent(&mut prev) }, "cuCtxGetCurrent", self.ordinal)?;
        if prev == self.ctx {
            return Ok(CtxScope { prev, restore: false });
        }
        // SAFETY: `self.ctx` is a primary context we hold a reference on, so it is alive.
        check(unsafe { sys::cuCtxSetCurrent(self.ctx) }, "cuCtxSetCurrent", self.ordinal)?;
        Ok(CtxScope { prev, restore: true })
    }
}

impl Drop for PrimaryCtx {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `PrimaryCtx::retain`; every event and stream made in the
        // context is gone by now (they hold this Arc).
        let _ = unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.device) };
    }
}

/// Restores the thread's previous current context when dropped. Not `Send` (it holds a raw
/// pointer), so it drops on the thread that made it.
struct CtxScope {
    prev: sys::CUcontext,
    restore: bool,
}

impl Drop for CtxScope {
    fn drop(&mut self) {
        if self.restore {
            // SAFETY: `prev` was current on this thread a moment ago (or null, which unbinds);
            // restoring it leaves the thread as the caller had it.
            let _ = unsafe { sys::cuCtxSetCurrent(self.prev) };
        }
    }
}

/// An owned CUDA event, destroyed on drop (the driver defers the release until it completes).
#[derive(Debug)]
struct Event(sys::CUevent);

// SAFETY: an event handle may be used from any thread; the driver API is thread-safe and this
// type never dereferences the handle.
unsafe impl Send for Event {}
// SAFETY: see `Send`.
unsafe impl Sync for Event {}

impl Event {
    /// Creates an event in the current context (the caller holds a `CtxScope`).
    fn new(flags: u32, device: u32) -> Result<Event> {
        let mut ev: sys::CUevent = std::ptr::null_mut();
        // SAFETY: a context is current (caller's scope); `ev` is a valid out-pointer.
        check(unsafe { sys::cuEventCreate(&mut ev, flags) }, "cuEventCreate", device)?;
        Ok(Event(ev))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the event was created by cuEventCreate and is destroyed exactly once; destroying
        // an event that has not completed is allowed.
        let _ = unsafe { sys::cuEventDestroy_v2(self.0) };
    }
}

/// An owned non-blocking copy stream.
#[derive(Debug)]
struct Stream(sys::CUstream);

// SAFETY: a stream handle may be used from any thread; the driver API is thread-safe and this
// type never dereferences the handle.
unsafe impl Send for Stream {}
// SAFETY: see `Send`.
unsafe impl Sync for Stream {}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: created by cuStreamCreate and destroyed once; the driver releases it after any
        // work still queued on it (the engine synchronises its streams before dropping them).
        let _ = unsafe { sys::cuStreamDestroy_v2(self.0) };
    }
}

/// Completion of a batch of device copies: one event per copy stream the batch used.
#[derive(Debug)]
pub struct CudaTicket {
    ctx: Arc<PrimaryCtx>,
    events: Vec<Event>,
}

impl CopyTicket for CudaTicket {
    fn wait(&self) -> Result<()> {
        if self.events.is_empty() {
            return Ok(());
        }
        let _scope = self.ctx.enter()?;
        for ev in &self.events {
            // SAFETY: the event is alive (owned by self) and was recorded in submit.
            check(unsafe { sys::cuEventSynchronize(ev.0) }, "cuEventSynchronize", self.ctx.ordinal)?;
        }
        Ok(())
    }

    /// True once every copy finished. Also true when the driver reports an error for the batch
    /// (the copies will never finish successfully): call [`CopyTicket::wait`] for the outcome.
    fn is_done(&self) -> bool {
        if self.events.is_empty() {
            return true;
        }
        let Ok(_scope) = self.ctx.enter() else { return true };
        self.events.iter().all(|ev| {
            // SAFETY: the event is alive (owned by self) and was recorded in submit.
            let r = unsafe { sys::cuEventQuery(ev.0) };
            r != sys::CUresult::CUDA_ERROR_NOT_READY
        })
    }

    fn fence_stream(&self, stream: u64) -> Result<()> {
        if self.events.is_empty() {
            return Ok(());
        }
        let _scope = self.ctx.enter()?;
        for ev in &self.events {
            // SAFETY: the event is alive and recorded; the stream is the caller's (a raw CUstream
            // of this device, or 0). The wait captures the event's current record, so it stays
            // correct even if this ticket is dropped right after.
            let r = unsafe { sys::cuStreamWaitEvent(stream_handle(stream), ev.0, 0) };
            check(r, "cuStreamWaitEvent", self.ctx.ordinal)?;
        }
        Ok(())
    }
}

impl Drop for CudaTicket {
    fn drop(&mut self) {
        // Destroy the events with their context current, then let the context reference go.
        let _scope = self.ctx.enter();
        self.events.clear();
    }
}

/// Device↔host copies on dedicated non-blocking streams of one CUDA device; host↔host copies
/// (CPU tensors of a GPU job) go to an internal [`HostCopy`].
#[derive(Debug)]
pub struct CudaCopy {
    ctx: Arc<PrimaryCtx>,
    streams: Vec<Stream>,
    next: AtomicUsize,
    host: HostCopy,
}

impl CudaCopy {
    /// An engine for CUDA device `device` with `streams` copy streams (1 to [`MAX_STREAMS`]; 2 to 4
    /// keep both copy engines of a GPU busy). Fails, with advice, when CUDA is not available.
    pub fn new(device: u32, streams: usize) -> Result<CudaCopy> {
        if streams == 0 || streams > MAX_STREAMS {
            return Err(Error::InvalidConfig {
                field: "copy_streams",
                reason: format!("{streams} is outside 1..={MAX_STREAMS}"),
            });
        }
        let ctx = PrimaryCtx::retain(device, "copy_engine")?;
        let host = HostCopy::with_default_threads()?;
        let scope = ctx.enter()?;
        let mut owned = Vec::with_capacity(streams);
        for _ in 0..streams {
            let mut s: sys::CUstream = std::ptr::null_mut();
            let flags = sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
            // SAFETY: the primary context is current (scope); `s` is a valid out-pointer.
            let r = unsafe { sys::cuStreamCreate(&mut s, flags) };
            check(r, "cuStreamCreate", device)?;
            owned.push(Stream(s));
        }
        drop(scope);
        tracing::debug!(device, streams, "cuda copy engine ready");
        Ok(CudaCopy { ctx, streams: owned, next: AtomicUsize::new(0), host })
    }

    /// The CUDA device this engine copies from and to.
    pub fn device(&self) -> u32 {
        self.ctx.ordinal
    }

    /// A pinner for host memory, sharing this engine's context.
    pub fn pinner(&self) -> CudaPinner {
        CudaPinner { ctx: self.ctx.clone() }
    }

    /// Makes streams `first..first + used` (modulo the stream count) wait for `start`, then
    /// enqueues `pieces` round-robin over them.
    ///
    /// # Safety
    /// As [`CopyEngine::submit`]; the context must be current.
    unsafe fn enqueue(
        &self,
        direction: Direction,
        pieces: &[Region],
        start: &Event,
        first: usize,
        used: usize,
    ) -> Result<()> {
        let dev = self.ctx.ordinal;
        let n = self.streams.len();
        for k in 0..used {
            let s = &self.streams[(first + k) % n];
            // SAFETY: stream and event are alive; the event was just recorded.
            check(unsafe { sys::cuStreamWaitEvent(s.0, start.0, 0) }, "cuStreamWaitEvent", dev)?;
        }
        for (i, p) in pieces.iter().enumerate() {
            let s = self.streams[(first + i % used) % n].0;
            match direction {
                Direction::ToHost => {
                    // SAFETY: the caller guarantees `src` is device memory of this context and
                    // `dst` writable host memory for `len` bytes until the ticket completes.
                    let r = unsafe { sys::cuMemcpyDtoHAsync_v2(p.dst as usize as *mut c_void, p.src, p.len, s) };
                    check(r, "cuMemcpyDtoHAsync", dev)?;
                }
                Direction::FromHost => {
                    // SAFETY: the caller guarantees `src` readable host memory and `dst` device
                    // memory of this context for `len` bytes until the ticket completes.
                    let r = unsafe { sys::cuMemcpyHtoDAsync_v2(p.dst, p.src as usize as *const c_void, p.len, s) };
                    check(r, "cuMemcpyHtoDAsync", dev)?;
                }
            }
        }
        Ok(())
    }
}

impl Drop for CudaCopy {
    fn drop(&mut self) {
        // Copies still in flight keep writing their destinations: wait for them, so nothing
        // changes memory after the engine is gone.
        let scope = self.ctx.enter();
        for s in &self.streams {
            // SAFETY: the stream is alive until the clear below.
            let _ = unsafe { sys::cuStreamSynchronize(s.0) };
        }
        self.streams.clear();
        drop(scope);
    }
}

/// Cuts regions into pieces of at most `max` bytes, dropping empty ones.
fn split(regions: &[Region], max: usize) -> Result<Vec<Region>> {
    let mut pieces = Vec::with_capacity(regions.iter().map(|r| r.len.div_ceil(max)).sum());
    for r in regions {
        let end = u64::try_from(r.len).ok();
        if end.and_then(|l| r.src.checked_add(l)).is_none() || end.and_then(|l| r.dst.checked_add(l)).is_none() {
            return Err(Error::InvalidConfig {
                field: "region",
                reason: format!("region {:#x}→{:#x} of {} bytes wraps around the address space", r.src, r.dst, r.len),
            });
        }
        let mut off = 0usize;
        while off < r.len {
            let len = max.min(r.len - off);
            pieces.push(Region { src: r.src + off as u64, dst: r.dst + off as u64, len });
            off += len;
        }
    }
    Ok(pieces)
}

impl CopyEngine for CudaCopy {
    fn name(&self) -> &'static str {
        "cuda"
    }

    unsafe fn submit(
        &self,
        direction: Direction,
        device: Device,
        regions: &[Region],
        stream: Option<u64>,
    ) -> Result<Arc<dyn CopyTicket>> {
        match device {
            // SAFETY: forwarded unchanged; the caller upholds submit's contract.
            Device::Cpu => return unsafe { self.host.submit(direction, device, regions, stream) },
            Device::Cuda(n) if n != self.ctx.ordinal => {
                return Err(Error::InvalidConfig {
                    field: "device",
                    reason: format!(
                        "this CUDA copy engine serves device {}, not device {n}: use one engine per device",
                        self.ctx.ordinal
                    ),
                });
            }
            Device::Cuda(_) => {}
        }
        let pieces = split(regions, CHUNK)?;
        if pieces.is_empty() {
            return Ok(Arc::new(CudaTicket { ctx: self.ctx.clone(), events: Vec::new() }));
        }
        let dev = self.ctx.ordinal;
        let _scope = self.ctx.enter()?;
        let start = Event::new(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32, dev)?;
        // SAFETY: the event is alive; the stream is the caller's raw CUstream of this device (or 0,
        // the legacy default stream), as submit's contract requires.
        check(unsafe { sys::cuEventRecord(start.0, stream_handle(stream.unwrap_or(0))) }, "cuEventRecord", dev)?;
        let n = self.streams.len();
        let used = n.min(pieces.len());
        let first = self.next.fetch_add(used, Ordering::Relaxed) % n;
        // Completion events block (rather than spin) a waiting thread: a checkpoint copy lasts
        // milliseconds to seconds, so a waiter should not burn a core.
        let done_flags =
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32 | sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32;
        // SAFETY: the caller upholds submit's contract for every region; the context is current.
        let enqueued = unsafe { self.enqueue(direction, &pieces, &start, first, used) }.and_then(|()| {
            (0..used)
                .map(|k| {
                    let ev = Event::new(done_flags, dev)?;
                    // SAFETY: event and stream are alive.
                    check(unsafe { sys::cuEventRecord(ev.0, self.streams[(first + k) % n].0) }, "cuEventRecord", dev)?;
                    Ok(ev)
                })
                .collect::<Result<Vec<_>>>()
        });
        match enqueued {
            Ok(events) => Ok(Arc::new(CudaTicket { ctx: self.ctx.clone(), events })),
            Err(e) => {
                // Some copies may be queued: finish them before reporting the failure, so the
                // caller can reuse its buffers once submit returned.
                for k in 0..used {
                    // SAFETY: the stream is alive.
                    let _ = unsafe { sys::cuStreamSynchronize(self.streams[(first + k) % n].0) };
                }
                Err(e)
            }
        }
    }
}

/// Page-locks host memory (`cuMemHostRegister`, portable to every context) so device copies to and
/// from it run asynchronously at full bandwidth. Used by `Arena::prepare`, which pins in pieces of
/// at most `PIN_CHUNK` bytes.
#[derive(Debug, Clone)]
pub struct CudaPinner {
    ctx: Arc<PrimaryCtx>,
}

impl CudaPinner {
    /// A pinner that registers memory through device `device`'s primary context. Fails, with
    /// advice, when CUDA is not available.
    pub fn new(device: u32) -> Result<CudaPinner> {
        Ok(CudaPinner { ctx: PrimaryCtx::retain(device, "pinner")? })
    }
}

impl HostPinner for CudaPinner {
    /// Pinning a range that is already pinned succeeds (pinning is idempotent).
    fn pin(&self, addr: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let len = usize::try_from(len).map_err(|_| Error::InvalidConfig {
            field: "pin",
            reason: format!("{len} bytes do not fit this machine"),
        })?;
        let _scope = self.ctx.enter()?;
        // SAFETY: the caller passes a range of its own mapped memory; registering only locks the
        // pages and does not change their content.
        let r =
            unsafe { sys::cuMemHostRegister_v2(addr as usize as *mut c_void, len, sys::CU_MEMHOSTREGISTER_PORTABLE) };
        if r == sys::CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED {
            return Ok(());
        }
        check(r, "cuMemHostRegister", self.ctx.ordinal)
    }

    fn unpin(&self, addr: u64) -> Result<()> {
        let _scope = self.ctx.enter()?;
        // SAFETY: unregistering only unlocks pages registered earlier; the driver rejects an
        // address it did not register.
        check(
            unsafe { sys::cuMemHostUnregister(addr as usize as *mut c_void) },
            "cuMemHostUnregister",
            self.ctx.ordinal,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probing_never_panics_and_is_stable() {
        let first = cuda_available();
        assert_eq!(cuda_available(), first);
        assert_eq!(device_count() > 0, first);
    }

    #[test]
    fn without_cuda_constructors_fail_with_advice() {
        if cuda_available() {
            return;
        }
        let e = CudaCopy::new(0, 2).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("CUDA is not available") && msg.contains("host copy engine"), "{msg}");
        assert_eq!(e.kind(), crate::error::ErrorKind::InvalidInput);
        let msg = CudaPinner::new(0).unwrap_err().to_string();
        assert!(msg.contains("CUDA is not available"), "{msg}");
    }

    #[test]
    fn stream_count_is_checked_first() {
        for n in [0, MAX_STREAMS + 1] {
            let msg = CudaCopy::new(0, n).unwrap_err().to_string();
            assert!(msg.contains("copy_streams"), "{msg}");
        }
    }

    #[test]
    fn a_missing_device_is_refused() {
        if !cuda_available() {
            return;
        }
        let msg = CudaCopy::new(device_count(), 1).unwrap_err().to_string();
        assert!(msg.contains("does not exist"), "{msg}");
    }

    #[test]
    fn split_cuts_at_the_chunk_size_and_drops_empty_regions() {
        let regions = [
            Region { src: 0x1000, dst: 0x9000, len: 0 },
            Region { src: 0x1001, dst: 0x9003, len: 10 },
            Region { src: 0x100, dst: 0x200, len: 4 },
        ];
        let p = split(&regions, 4).unwrap();
        assert_eq!(
            p,
            vec![
                Region { src: 0x1001, dst: 0x9003, len: 4 },
                Region { src: 0x1005, dst: 0x9007, len: 4 },
                Region { src: 0x1009, dst: 0x900b, len: 2 },
                Region { src: 0x100, dst: 0x200, len: 4 },
            ]
        );
        assert!(split(&[], CHUNK).unwrap().is_empty());
        let wrap = [Region { src: u64::MAX - 1, dst: 0, len: 4 }];
        assert!(split(&wrap, CHUNK).is_err());
    }
}
