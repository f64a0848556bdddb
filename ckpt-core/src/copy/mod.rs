//! Copy engines: moving tensor bytes between the training process's memory (host or GPU) and a
//! snapshot region (an arena slot), off the training loop's critical path.
//!
//! One small object-safe seam, [`CopyEngine`], with a host implementation ([`host::HostCopy`], a
//! parallel memcpy on a persistent bounded pool) and a CUDA implementation ([`cuda::CudaCopy`],
//! dedicated copy streams, chunked async copies ordered after an event recorded on the caller's
//! stream). Both run the same conformance tests (`tests/copy_engines.rs`); the CUDA ones only when
//! `CKPTD_GPU_TESTS=1`.
//!
//! Addresses are raw (`u64`): they come from torch `data_ptr()`, numpy's array interface, DLPack or
//! an mmap'd slot. Submitting is therefore `unsafe`: the caller promises that every region stays
//! valid, and is not written by anyone else, until the returned [`CopyTicket`] completes.

pub mod cuda;
pub mod host;

use std::sync::Arc;

use crate::error::Result;

/// Which way bytes move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Into a snapshot region on the host (device→host for GPU tensors, host→host for CPU ones).
    ToHost,
    /// From a host region back into tensors (host→device for GPU tensors, host→host for CPU ones).
    FromHost,
}

/// Where a tensor lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// Host memory.
    Cpu,
    /// Memory of CUDA device N.
    Cuda(u32),
}

/// One contiguous copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Source address.
    pub src: u64,
    /// Destination address.
    pub dst: u64,
    /// Bytes to copy.
    pub len: usize,
}

/// Completion of a submitted batch of copies.
pub trait CopyTicket: Send + Sync + std::fmt::Debug {
    /// Blocks the calling thread until every copy of the batch finished.
    fn wait(&self) -> Result<()>;
    /// Whether every copy of the batch finished (never blocks).
    fn is_done(&self) -> bool;
    /// Makes work later enqueued on the caller's CUDA `stream` wait for the copies, without
    /// blocking the host. Engines without streams wait on the host instead.
    fn fence_stream(&self, stream: u64) -> Result<()>;
}

/// Moves bytes between tensors and snapshot regions.
pub trait CopyEngine: Send + Sync + std::fmt::Debug {
    /// A short name for logs and metrics (`host`, `cuda`).
    fn name(&self) -> &'static str;

    /// Enqueues `regions` and returns at once. For device copies, the copies start only after all
    /// work already enqueued on the caller's `stream` (a raw `CUstream`; 0 = the legacy default
    /// stream) finished, so they read the values the training step produced.
    ///
    /// # Safety
    /// Every `src` must be readable and every `dst` writable for `len` bytes, the regions must not
    /// overlap, and nothing else may write a destination (or, until [`CopyTicket::fence_stream`] or
    /// [`CopyTicket::wait`], a source) until the ticket completes.
    unsafe fn submit(
        &self,
        direction: Direction,
        device: Device,
        regions: &[Region],
        stream: Option<u64>,
    ) -> Result<Arc<dyn CopyTicket>>;
}
