//! The ckptd wire protocol, package `ckptd.v1`: trainer↔agent (`Trainer`, `Admin`, over the
//! agent's Unix socket) and agent↔isolator (`Isolator`, `IsolatorAdmin`, over TCP). The code is
//! generated at build time from `ckptd/v1/*.proto` by `protox` and `tonic-prost-build`, so no
//! system `protoc` is needed. docs/PROTOCOL.md describes the messages and state machines.

/// Generated messages, clients and servers of package `ckptd.v1`.
pub mod v1 {
    #![allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic)]
    tonic::include_proto!("ckptd.v1");
}

/// The on-storage format version that this protocol build speaks.
pub const FORMAT_VERSION: u32 = ckpt_core::format::FORMAT_VERSION;

/// Largest message either side accepts, so a hostile peer cannot make us buffer unbounded input.
/// Descriptors and votes are small; bulk data never crosses the wire.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

impl v1::Phase {
    /// The phase's short name, as used in metrics and logs.
    pub fn short_name(self) -> &'static str {
        match self {
            v1::Phase::Unspecified => "unspecified",
            v1::Phase::Init => "init",
            v1::Phase::Step => "step",
            v1::Phase::CheckpointSave => "checkpoint-save",
            v1::Phase::CheckpointLoad => "checkpoint-load",
        }
    }
}
