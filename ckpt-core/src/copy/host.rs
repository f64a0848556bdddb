//! The host copy engine: a parallel memcpy on a persistent, bounded pool of named threads.
//!
//! Large regions are split into pieces of at most [`PIECE`] bytes so that a few big tensors still
//! use every thread. A batch completes when its last piece is copied; [`HostTicket::wait`] blocks on
//! a condition variable, never spins.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crossbeam_channel::{Receiver, Sender};

use super::{CopyEngine, CopyTicket, Device, Direction, Region};
use crate::error::{Error, Result};

/// Largest piece one thread copies at a time.
pub const PIECE: usize = 4 << 20;

/// Batches that may wait for the copy threads before `submit` blocks.
const QUEUED_BATCHES: usize = 16;

/// Environment variable (test builds only, feature `test-hooks`): microseconds to sleep before
/// each piece, so tests can prove that nothing reads a snapshot before its copy finished.
pub const ENV_TEST_COPY_DELAY_US: &str = "CKPTD_TEST_COPY_DELAY_US";

/// One submitted batch: its pieces are claimed by whichever copy threads get there first.
#[derive(Debug)]
struct Batch {
    pieces: Vec<Region>,
    next: AtomicUsize,
    left: AtomicUsize,
    done: Mutex<bool>,
    cv: Condvar,
}

impl Batch {
    /// Copies pieces until none are left to claim.
    fn help(&self, delay: Option<std::time::Duration>) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(p) = self.pieces.get(i) else { return };
            if let Some(d) = delay {
                std::thread::sleep(d);
            }
            // SAFETY: `submit`'s contract makes the caller guarantee that both ranges are valid, do
            // not overlap, and are not touched by anyone else until the batch completes, which
            // happens only after this copy (finish_one below). Each piece is claimed exactly once.
            unsafe { std::ptr::copy_nonoverlapping(p.src as *const u8, p.dst as *mut u8, p.len) };
            self.finish_one();
        }
    }

    fn finish_one(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
            *done = true;
            self.cv.notify_all();
        }
    }
}

/// Completion of a host batch.
#[derive(Debug)]
pub struct HostTicket(Arc<Batch>);

impl CopyTicket for HostTicket {
    fn wait(&self) -> Result<()> {
        let mut done = self.0.done.lock().unwrap_or_else(|p| p.into_inner());
        while !*done {
            done = self.0.cv.wait(done).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    fn is_done(&self) -> bool {
        self.0.left.load(Ordering::Acquire) == 0
    }

    fn fence_stream(&self, _stream: u64) -> Result<()> {
        self.wait()
    }
}

/// Parallel memcpy between host addresses.
#[derive(Debug)]
pub struct HostCopy {
    tx: Option<Sender<Arc<Batch>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    width: usize,
}

impl HostCopy {
    /// A pool of `threads` copy threads (at least 1).
    pub fn new(threads: usize) -> Result<HostCopy> {
        let threads = threads.max(1);
        // Each batch is announced once per thread; a bounded queue of announcements means a caller
        // blocks only when QUEUED_BATCHES batches are already waiting, never per byte.
        let (tx, rx) = crossbeam_channel::bounded::<Arc<Batch>>(threads * QUEUED_BATCHES);
        let delay = test_delay();
        let handles = (0..threads)
            .map(|i| {
                let rx: Receiver<Arc<Batch>> = rx.clone();
                std::thread::Builder::new().name(format!("ckpt-copy-{i}")).spawn(move || {
                    for batch in rx {
                        batch.help(delay);
                    }
                })
            })
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| Error::Cancelled { reason: format!("cannot start copy threads: {e}") })?;
        Ok(HostCopy { tx: Some(tx), threads: handles, width: threads })
    }

    /// A pool sized to the machine (at most 8 threads).
    pub fn with_default_threads() -> Result<HostCopy> {
        HostCopy::new(default_threads())
    }
}

/// Copy threads by default: half the cores (at least 1, at most 8). The training step runs on the
/// other half while a snapshot is copied in the background: a pool on every core took the step's
/// core too (on 2 cores, 1 GiB: 17% of one copy time lost per save with one thread, against 62%
/// or more with two; docs/BENCHMARKS.md). Device tensors do not use this pool.
pub fn default_threads() -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    (cores / 2).clamp(1, 8)
}

#[cfg(feature = "test-hooks")]
fn test_delay() -> Option<std::time::Duration> {
    std::env::var(ENV_TEST_COPY_DELAY_US).ok().and_then(|v| v.parse().ok()).map(std::time::Duration::from_micros)
}

#[cfg(not(feature = "test-hooks"))]
fn test_delay() -> Option<std::time::Duration> {
    None
}

impl Drop for HostCopy {
    fn drop(&mut self) {
        self.tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl CopyEngine for HostCopy {
    fn name(&self) -> &'static str {
        "host"
    }

    unsafe fn submit(
        &self,
        _direction: Direction,
        device: Device,
        regions: &[Region],
        _stream: Option<u64>,
    ) -> Result<Arc<dyn CopyTicket>> {
        if device != Device::Cpu {
            return Err(Error::InvalidConfig {
                field: "device",
                reason: format!("the host copy engine cannot reach {device:?} memory: use the CUDA engine"),
            });
        }
        let mut pieces = Vec::with_capacity(regions.iter().map(|r| r.len.div_ceil(PIECE)).sum());
        for r in regions {
            let mut off = 0usize;
            while off < r.len {
                let len = PIECE.min(r.len - off);
                pieces.push(Region { src: r.src + off as u64, dst: r.dst + off as u64, len });
                off += len;
            }
        }
        let n = pieces.len();
        let batch = Arc::new(Batch {
            pieces,
            next: AtomicUsize::new(0),
            left: AtomicUsize::new(n),
            done: Mutex::new(n == 0),
            cv: Condvar::new(),
        });
        if n > 0 {
            let tx = self.tx.as_ref().ok_or_else(|| Error::Cancelled { reason: "copy engine shut down".into() })?;
            for _ in 0..self.width.min(n) {
                tx.send(batch.clone()).map_err(|_| Error::Cancelled { reason: "copy threads exited".into() })?;
            }
        }
        Ok(Arc::new(HostTicket(batch)))
    }
}
