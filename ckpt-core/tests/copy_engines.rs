//! The copy-engine conformance suite: the same checks against every [`CopyEngine`].
//!
//! The host engine always runs. The CUDA engine runs when `CKPTD_GPU_TESTS=1`, and then a machine
//! without a usable GPU fails the tests instead of skipping them:
//!
//! ```text
//! CKPTD_GPU_TESTS=1 cargo test -p ckpt-core --test copy_engines
//! ```
//!
//! Each check takes the engine and a [`Memory`]: how to allocate, fill and read the engine's
//! "device" side (host memory for the host engine, `cuMemAlloc` memory for the CUDA engine) and
//! its host side (pageable or page-locked).

use std::sync::Arc;

use ckpt_core::ErrorKind;
use ckpt_core::arena::{Arena, ArenaConfig, HostPinner};
use ckpt_core::copy::cuda::{CudaCopy, CudaPinner, cuda_available};
use ckpt_core::copy::host::HostCopy;
use ckpt_core::copy::{CopyEngine, CopyTicket, Device, Direction, Region};
use cudarc::driver::sys;

/// Set to `1` to run the CUDA engine's checks (they fail when CUDA is not usable).
const ENV_GPU_TESTS: &str = "CKPTD_GPU_TESTS";

/// Region sizes of the round trip: empty, tiny, just under a page, just over a host piece, a
/// large tensor, and one that crosses the CUDA engine's 64 MiB chunk.
const SIZES: [usize; 6] = [0, 1, 4095, (4 << 20) + 3, 33 << 20, (64 << 20) + 5];

/// Guard bytes around every region: copies must not touch them.
const GUARD: usize = 64;

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

/// A buffer the test owns; freed on drop.
struct Buffer {
    addr: u64,
    len: usize,
    own: Own,
}

enum Own {
    /// Pageable host memory (the Vec owns it; only `addr` is used to reach it).
    Host(#[allow(dead_code)] Vec<u8>),
    /// `cuMemAllocHost` (page-locked) memory.
    Pinned,
    /// `cuMemAlloc` device memory.
    Device,
}

impl Drop for Buffer {
    fn drop(&mut self) {
        match self.own {
            Own::Host(_) => {}
            Own::Pinned => {
                // SAFETY: allocated by cuMemAllocHost in a context that is current on this thread
                // (GPU tests hold it for their whole body), freed once; no copy is in flight (every
                // ticket was waited on).
                let _ = unsafe { sys::cuMemFreeHost(self.addr as usize as *mut std::ffi::c_void) };
            }
            Own::Device => {
                // SAFETY: as above, for cuMemAlloc memory.
                let _ = unsafe { sys::cuMemFree_v2(self.addr) };
            }
        }
    }
}

fn host_buffer(len: usize) -> Buffer {
    let mut v = vec![0u8; len];
    Buffer { addr: v.as_mut_ptr() as u64, len, own: Own::Host(v) }
}

/// Writes host memory at `buf.addr + off`.
fn host_write(buf: &Buffer, off: usize, bytes: &[u8]) {
    assert!(off + bytes.len() <= buf.len);
    // SAFETY: the range lies inside the buffer (checked above), which is host memory owned by the
    // test, and no copy into it is in flight.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), (buf.addr as usize + off) as *mut u8, bytes.len()) };
}

/// Reads all of a host buffer.
fn host_read(buf: &Buffer) -> Vec<u8> {
    // SAFETY: the buffer is `len` bytes of host memory owned by the test; every copy into it was
    // waited on.
    unsafe { std::slice::from_raw_parts(buf.addr as usize as *const u8, buf.len) }.to_vec()
}

/// How a check reaches the engine's memory.
trait Memory: Sync {
    /// The `Device` to submit with.
    fn device(&self) -> Device;
    /// A buffer on the engine's device side.
    fn alloc(&self, len: usize) -> Buffer;
    /// A host buffer (the snapshot side).
    fn alloc_host(&self, len: usize) -> Buffer;
    /// Writes all of a device-side buffer.
    fn write(&self, buf: &Buffer, bytes: &[u8]);
    /// Reads all of a device-side buffer.
    fn read(&self, buf: &Buffer) -> Vec<u8>;
}

/// Host memory on both sides (the host engine, and CPU tensors given to the CUDA engine).
struct HostMemory;

impl Memory for HostMemory {
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn alloc(&self, len: usize) -> Buffer {
        host_buffer(len)
    }
    fn alloc_host(&self, len: usize) -> Buffer {
        host_buffer(len)
    }
    fn write(&self, buf: &Buffer, bytes: &[u8]) {
        host_write(buf, 0, bytes)
    }
    fn read(&self, buf: &Buffer) -> Vec<u8> {
        host_read(buf)
    }
}

// ---------------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------------

/// Deterministic bytes (splitmix64), different for every seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ len as u64;
    for chunk in out.chunks_mut(8) {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
    out
}

/// Asserts equality of two byte images, naming the first difference instead of printing both.
fn same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
        panic!("{what}: first difference at byte {at} of {}: got {:#04x}, want {:#04x}", got.len(), got[at], want[at]);
    }
}

/// One region of a batch: a device-side buffer and a host buffer, each with a guard and an
/// unaligned offset around the bytes that move.
struct Slot {
    dev: Buffer,
    host: Buffer,
    dev_off: usize,
    host_off: usize,
    len: usize,
}

impl Slot {
    fn new(mem: &dyn Memory, len: usize, i: usize) -> Slot {
        let (dev_off, host_off) = (GUARD + (i * 3 + 1) % 8, GUARD + (i * 5 + 3) % 8);
        let dev = mem.alloc(len + 2 * GUARD + 8);
        let host = mem.alloc_host(len + 2 * GUARD + 8);
        Slot { dev, host, dev_off, host_off, len }
    }

    fn dev_addr(&self) -> u64 {
        self.dev.addr + self.dev_off as u64
    }

    fn host_addr(&self) -> u64 {
        self.host.addr + self.host_off as u64
    }

    /// The region of a copy to the host (device side → host side).
    fn d2h(&self) -> Region {
        Region { src: self.dev_addr(), dst: self.host_addr(), len: self.len }
    }

    /// The region of a copy from the host (host side → device side).
    fn h2d(&self) -> Region {
        Region { src: self.host_addr(), dst: self.dev_addr(), len: self.len }
    }

    /// A full buffer image: guard bytes with `bytes` at `off`.
    fn image(total: usize, off: usize, fill: u8, bytes: &[u8]) -> Vec<u8> {
        let mut v = vec![fill; total];
        v[off..off + bytes.len()].copy_from_slice(bytes);
        v
    }

    /// Fills the device side with `bytes` (guards 0xA5) and the host side with 0x5A.
    fn prime_device(&self, mem: &dyn Memory, bytes: &[u8]) {
        mem.write(&self.dev, &Slot::image(self.dev.len, self.dev_off, 0xa5, bytes));
        host_write(&self.host, 0, &vec![0x5a; self.host.len]);
    }

    /// Fills the host side with `bytes` (guards 0x5A) and the device side with 0xA5.
    fn prime_host(&self, mem: &dyn Memory, bytes: &[u8]) {
        host_write(&self.host, 0, &Slot::image(self.host.len, self.host_off, 0x5a, bytes));
        mem.write(&self.dev, &vec![0xa5; self.dev.len]);
    }

    fn check_host(&self, bytes: &[u8], what: &str) {
        same(&host_read(&self.host), &Slot::image(self.host.len, self.host_off, 0x5a, bytes), what);
    }

    fn check_device(&self, mem: &dyn Memory, bytes: &[u8], what: &str) {
        same(&mem.read(&self.dev), &Slot::image(self.dev.len, self.dev_off, 0xa5, bytes), what);
    }
}

/// Submits and returns the ticket.
fn submit(
    engine: &dyn CopyEngine,
    dir: Direction,
    device: Device,
    regions: &[Region],
    stream: Option<u64>,
) -> Arc<dyn CopyTicket> {
    // SAFETY: every region lies inside a buffer the calling check owns and keeps alive, untouched,
    // until it has waited on (or fenced and synchronised) the returned ticket; regions of one batch
    // never overlap.
    unsafe { engine.submit(dir, device, regions, stream) }
        .unwrap_or_else(|e| panic!("{} engine: submit failed: {e}", engine.name()))
}

/// Many regions of every size, at unaligned offsets, to the host and back, bit for bit; nothing
/// outside the regions changes.
fn round_trip(engine: &dyn CopyEngine, mem: &dyn Memory) {
    let name = engine.name();
    let slots: Vec<Slot> = SIZES.iter().enumerate().map(|(i, &len)| Slot::new(mem, len, i)).collect();
    let out: Vec<Vec<u8>> = SIZES.iter().enumerate().map(|(i, &len)| pattern(i as u64, len)).collect();
    for (s, p) in slots.iter().zip(&out) {
        s.prime_device(mem, p);
    }
    let regions: Vec<Region> = slots.iter().map(Slot::d2h).collect();
    let t = submit(engine, Direction::ToHost, mem.device(), &regions, None);
    t.wait().unwrap_or_else(|e| panic!("{name}: wait: {e}"));
    for (s, p) in slots.iter().zip(&out) {
        s.check_host(p, &format!("{name}: to host, {} bytes", s.len));
    }

    let back: Vec<Vec<u8>> = SIZES.iter().enumerate().map(|(i, &len)| pattern(100 + i as u64, len)).collect();
    for (s, p) in slots.iter().zip(&back) {
        s.prime_host(mem, p);
    }
    let regions: Vec<Region> = slots.iter().map(Slot::h2d).collect();
    let t = submit(engine, Direction::FromHost, mem.device(), &regions, None);
    t.wait().unwrap_or_else(|e| panic!("{name}: wait: {e}"));
    for (s, p) in slots.iter().zip(&back) {
        s.check_device(mem, p, &format!("{name}: from host, {} bytes", s.len));
    }
}

/// `is_done` is true once `wait` returned, and stays true; waiting twice is fine.
fn done_after_wait(engine: &dyn CopyEngine, mem: &dyn Memory) {
    let s = Slot::new(mem, 33 << 20, 1);
    let p = pattern(7, s.len);
    s.prime_device(mem, &p);
    let t = submit(engine, Direction::ToHost, mem.device(), &[s.d2h()], None);
    t.wait().unwrap();
    assert!(t.is_done(), "{}: is_done after wait", engine.name());
    t.wait().unwrap();
    assert!(t.is_done());
    s.check_host(&p, "done after wait");
}

/// Several batches in flight at once, each waited on alone and in reverse order of submission, and
/// batches submitted and waited from several threads: each ticket covers exactly its own copies.
fn concurrent_batches(engine: &dyn CopyEngine, mem: &dyn Memory) {
    let name = engine.name();
    let sizes = [(9 << 20) + 1, 1, 4 << 20, 4095];
    let slots: Vec<Slot> = sizes.iter().enumerate().map(|(i, &len)| Slot::new(mem, len, i)).collect();
    let pats: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &len)| pattern(200 + i as u64, len)).collect();
    for (s, p) in slots.iter().zip(&pats) {
        s.prime_device(mem, p);
    }
    let tickets: Vec<_> =
        slots.iter().map(|s| submit(engine, Direction::ToHost, mem.device(), &[s.d2h()], None)).collect();
    for (i, t) in tickets.iter().enumerate().rev() {
        t.wait().unwrap_or_else(|e| panic!("{name}: batch {i}: {e}"));
        assert!(t.is_done());
        slots[i].check_host(&pats[i], &format!("{name}: batch {i} after its own wait"));
    }

    let pats: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &len)| pattern(300 + i as u64, len)).collect();
    for (s, p) in slots.iter().zip(&pats) {
        s.prime_host(mem, p);
    }
    let device = mem.device();
    std::thread::scope(|scope| {
        for s in &slots {
            let region = s.h2d();
            scope.spawn(move || {
                let t = submit(engine, Direction::FromHost, device, &[region], None);
                t.wait().unwrap_or_else(|e| panic!("{name}: threaded batch: {e}"));
                assert!(t.is_done());
            });
        }
    });
    for (i, (s, p)) in slots.iter().zip(&pats).enumerate() {
        s.check_device(mem, p, &format!("{name}: threaded batch {i}"));
    }
}

/// A batch with nothing to copy is done at once; waiting and fencing it succeed.
fn empty_batch(engine: &dyn CopyEngine, mem: &dyn Memory) {
    let s = Slot::new(mem, 0, 0);
    for regions in [vec![], vec![s.d2h(), s.d2h()]] {
        for dir in [Direction::ToHost, Direction::FromHost] {
            let t = submit(engine, dir, mem.device(), &regions, None);
            assert!(t.is_done(), "{}: empty batch of {} regions is done at once", engine.name(), regions.len());
            t.wait().unwrap();
            t.fence_stream(0).unwrap();
        }
    }
}

/// Submitting for a device the engine does not serve is refused, before anything is copied.
fn wrong_device(engine: &dyn CopyEngine, device: Device) {
    let src = host_buffer(16);
    let dst = host_buffer(16);
    host_write(&src, 0, &[1; 16]);
    let r = Region { src: src.addr, dst: dst.addr, len: 16 };
    // SAFETY: both buffers are 16 bytes of host memory owned here; the engine must refuse anyway.
    let e = unsafe { engine.submit(Direction::ToHost, device, &[r], None) }
        .err()
        .unwrap_or_else(|| panic!("{} engine accepted {device:?}", engine.name()));
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert_eq!(host_read(&dst), vec![0; 16], "nothing was copied");
}

// ---------------------------------------------------------------------------------------------
// The host engine
// ---------------------------------------------------------------------------------------------

fn host_engine() -> HostCopy {
    HostCopy::new(3).unwrap()
}

#[test]
fn host_round_trip() {
    round_trip(&host_engine(), &HostMemory);
}

#[test]
fn host_done_after_wait() {
    done_after_wait(&host_engine(), &HostMemory);
}

#[test]
fn host_concurrent_batches() {
    concurrent_batches(&host_engine(), &HostMemory);
}

#[test]
fn host_empty_batch() {
    empty_batch(&host_engine(), &HostMemory);
}

#[test]
fn host_wrong_device() {
    let e = host_engine();
    wrong_device(&e, Device::Cuda(0));
    // SAFETY: no regions; the engine must refuse the device anyway.
    let msg = unsafe { e.submit(Direction::ToHost, Device::Cuda(0), &[], None) }.err().unwrap().to_string();
    assert!(msg.contains("CUDA engine"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// The CUDA engine (CKPTD_GPU_TESTS=1)
// ---------------------------------------------------------------------------------------------

/// Panics with the driver's error name when a test's own CUDA call fails.
fn ok(r: sys::CUresult, what: &str) {
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS, "{what}");
}

/// Device 0's primary context, retained and current on the test's thread for the test's life.
struct Gpu {
    device: sys::CUdevice,
    engine: CudaCopy,
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `gpu()`.
        let _ = unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.device) };
    }
}

/// The CUDA fixture, or `None` (skip) when `CKPTD_GPU_TESTS` is not `1`. With it set, a machine
/// where CUDA cannot be used fails the test.
#[allow(clippy::print_stderr)]
fn gpu() -> Option<Gpu> {
    if std::env::var(ENV_GPU_TESTS).as_deref() != Ok("1") {
        eprintln!("skipped: set {ENV_GPU_TESTS}=1 on a machine with a GPU to run the CUDA copy engine checks");
        return None;
    }
    let engine =
        CudaCopy::new(0, 3).unwrap_or_else(|e| panic!("{ENV_GPU_TESTS}=1 but the CUDA copy engine cannot start: {e}"));
    assert!(cuda_available());
    let mut device: sys::CUdevice = 0;
    let mut ctx: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: CUDA is available (the engine started, which probed the driver); the out-pointers are
    // valid locals.
    unsafe {
        ok(sys::cuDeviceGet(&mut device, 0), "cuDeviceGet");
        ok(sys::cuDevicePrimaryCtxRetain(&mut ctx, device), "cuDevicePrimaryCtxRetain");
        ok(sys::cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
    }
    Some(Gpu { device, engine })
}

/// `cuMemAlloc` memory on the device side; host side pageable or page-locked.
struct CudaMemory {
    pinned: bool,
}

impl Memory for CudaMemory {
    fn device(&self) -> Device {
        Device::Cuda(0)
    }
    fn alloc(&self, len: usize) -> Buffer {
        let mut p: sys::CUdeviceptr = 0;
        // SAFETY: the test thread has device 0's primary context current (`gpu()`); `p` is a valid
        // out-pointer; `len` > 0 (buffers include guards).
        ok(unsafe { sys::cuMemAlloc_v2(&mut p, len) }, "cuMemAlloc");
        Buffer { addr: p, len, own: Own::Device }
    }
    fn alloc_host(&self, len: usize) -> Buffer {
        if !self.pinned {
            return host_buffer(len);
        }
        let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: as in `alloc`.
        ok(unsafe { sys::cuMemAllocHost_v2(&mut p, len) }, "cuMemAllocHost");
        Buffer { addr: p as u64, len, own: Own::Pinned }
    }
    fn write(&self, buf: &Buffer, bytes: &[u8]) {
        assert_eq!(bytes.len(), buf.len);
        // SAFETY: `buf` is a device allocation of `len` bytes; `bytes` is a host slice of the same
        // length; the copy is synchronous.
        ok(unsafe { sys::cuMemcpyHtoD_v2(buf.addr, bytes.as_ptr().cast(), bytes.len()) }, "cuMemcpyHtoD");
        // From pageable memory, the "synchronous" copy may return before its DMA landed: finish it,
        // so work on other (non-blocking) streams sees the bytes.
        // SAFETY: a context is current on this thread (`gpu()`).
        ok(unsafe { sys::cuCtxSynchronize() }, "cuCtxSynchronize");
    }
    fn read(&self, buf: &Buffer) -> Vec<u8> {
        let mut v = vec![0u8; buf.len];
        // SAFETY: as in `write`, the other way.
        ok(unsafe { sys::cuMemcpyDtoH_v2(v.as_mut_ptr().cast(), buf.addr, buf.len) }, "cuMemcpyDtoH");
        v
    }
}

#[test]
fn cuda_round_trip_pageable() {
    let Some(g) = gpu() else { return };
    round_trip(&g.engine, &CudaMemory { pinned: false });
}

#[test]
fn cuda_round_trip_pinned() {
    let Some(g) = gpu() else { return };
    round_trip(&g.engine, &CudaMemory { pinned: true });
}

#[test]
fn cuda_engine_copies_cpu_tensors_too() {
    let Some(g) = gpu() else { return };
    round_trip(&g.engine, &HostMemory);
    concurrent_batches(&g.engine, &HostMemory);
}

#[test]
fn cuda_done_after_wait() {
    let Some(g) = gpu() else { return };
    done_after_wait(&g.engine, &CudaMemory { pinned: true });
}

#[test]
fn cuda_concurrent_batches() {
    let Some(g) = gpu() else { return };
    concurrent_batches(&g.engine, &CudaMemory { pinned: true });
    concurrent_batches(&g.engine, &CudaMemory { pinned: false });
}

#[test]
fn cuda_empty_batch() {
    let Some(g) = gpu() else { return };
    empty_batch(&g.engine, &CudaMemory { pinned: true });
}

#[test]
fn cuda_wrong_device() {
    let Some(g) = gpu() else { return };
    wrong_device(&g.engine, Device::Cuda(1));
    wrong_device(&g.engine, Device::Cuda(u32::MAX));
}

/// The save path: the trainer's stream produces values, the snapshot is enqueued after them, the
/// fence makes the next write on that stream (the optimizer step) wait for the snapshot, and the
/// host never blocks in between. The snapshot must hold exactly the produced values.
fn fence_holds_the_old_values(g: &Gpu, stream: sys::CUstream) {
    let mem = CudaMemory { pinned: true };
    let n = 64 << 20;
    let (a, b, c) = (pattern(1, n), pattern(2, n), pattern(3, n));
    let src = mem.alloc(n);
    mem.write(&src, &a);
    let produced = mem.alloc_host(n);
    host_write(&produced, 0, &b);
    let step = mem.alloc_host(n);
    host_write(&step, 0, &c);
    let snap = mem.alloc_host(n);
    host_write(&snap, 0, &vec![0; n]);

    // "Backward": the values to save are written on the trainer's stream, asynchronously.
    // SAFETY: `src` is a device buffer of n bytes, `produced` n bytes of pinned host memory that
    // stays alive and unchanged until the stream is synchronised below.
    ok(unsafe { sys::cuMemcpyHtoDAsync_v2(src.addr, produced.addr as usize as *const _, n, stream) }, "HtoD B");
    let t = submit(
        &g.engine,
        Direction::ToHost,
        Device::Cuda(0),
        &[Region { src: src.addr, dst: snap.addr, len: n }],
        Some(stream as usize as u64),
    );
    t.fence_stream(stream as usize as u64).unwrap();
    // "Optimizer step": overwrites the source on the trainer's stream; the fence orders it after
    // the snapshot.
    // SAFETY: as above, with `step`.
    ok(unsafe { sys::cuMemcpyHtoDAsync_v2(src.addr, step.addr as usize as *const _, n, stream) }, "HtoD C");
    // SAFETY: `stream` is the caller's live stream (or 0).
    ok(unsafe { sys::cuStreamSynchronize(stream) }, "cuStreamSynchronize");
    assert!(t.is_done(), "the stream waited for the snapshot, so its ticket is done");
    t.wait().unwrap();
    same(&host_read(&snap), &b, "snapshot holds the values produced before it, not the next step's");
    same(&mem.read(&src), &c, "the optimizer step ran after the snapshot");
}

#[test]
fn cuda_fence_on_a_user_stream() {
    let Some(g) = gpu() else { return };
    let mut stream: sys::CUstream = std::ptr::null_mut();
    // SAFETY: the primary context is current; `stream` is a valid out-pointer.
    ok(
        unsafe { sys::cuStreamCreate(&mut stream, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32) },
        "cuStreamCreate",
    );
    fence_holds_the_old_values(&g, stream);
    // SAFETY: created above; all its work was synchronised.
    ok(unsafe { sys::cuStreamDestroy_v2(stream) }, "cuStreamDestroy");
}

#[test]
fn cuda_fence_on_the_legacy_default_stream() {
    let Some(g) = gpu() else { return };
    fence_holds_the_old_values(&g, std::ptr::null_mut());
}

/// Pins an arena through the CUDA pinner (as the trainer does off the save path), copies into and
/// out of a slot at an unaligned offset, and unpins it.
#[test]
fn cuda_pinned_arena_slot() {
    let Some(g) = gpu() else { return };
    // tmpfs, as in production: the kernel may refuse to page-lock pages of a disk file.
    let dir =
        tempfile::Builder::new().prefix("ckptd-pin").tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).unwrap();
    let cfg = ArenaConfig { dir: dir.path().into(), name: "pin.arena".into(), slots: 2, slot_size: 8 << 20 };
    let arena = Arena::create(&cfg, &mut None).unwrap();
    let pinner = CudaPinner::new(0).unwrap();
    arena.prepare(Some(&pinner)).unwrap();
    arena.prepare(Some(&pinner)).unwrap(); // pinning again is harmless
    let base = arena.slot_addr(0);

    let mut mem_type = 0u32;
    // SAFETY: `mem_type` is a valid out-pointer for a CUmemorytype (u32); `base` is a host address
    // the driver knows once registered.
    ok(
        unsafe {
            sys::cuPointerGetAttribute(
                (&mut mem_type as *mut u32).cast(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                base,
            )
        },
        "the arena is registered with the driver",
    );
    assert_eq!(mem_type, sys::CUmemorytype_enum::CU_MEMORYTYPE_HOST as u32);

    let mem = CudaMemory { pinned: false };
    let len = (4 << 20) + 3;
    let p = pattern(9, len);
    let src = mem.alloc(len);
    mem.write(&src, &p);
    let slot = arena.acquire().unwrap();
    let at = arena.slot_addr(slot) + 5;
    let t = submit(&g.engine, Direction::ToHost, Device::Cuda(0), &[Region { src: src.addr, dst: at, len }], None);
    t.wait().unwrap();
    // SAFETY: we own the slot (acquired above), the copy into it completed, and nothing else writes
    // it while the slice is alive.
    let bytes = unsafe { arena.slot_bytes(slot) };
    same(&bytes[5..5 + len], &p, "pinned slot holds the device bytes");

    let back = mem.alloc(len);
    let t = submit(&g.engine, Direction::FromHost, Device::Cuda(0), &[Region { src: at, dst: back.addr, len }], None);
    t.wait().unwrap();
    same(&mem.read(&back), &p, "device bytes restored from the pinned slot");

    pinner.unpin(base).unwrap();
    let e = pinner.unpin(base).unwrap_err().to_string();
    assert!(e.contains("cuMemHostUnregister"), "{e}");
}
