//! The ckptd wire protocol, package `ckptd.v1`: trainer↔agent (`Trainer`, `Admin`, over the
//! agent's Unix socket) and agent↔isolator (`Isolator`, `IsolatorAdmin`, over TCP). The code is
//! generated at build time from `ckptd/v1/*.proto` by `protox` and `tonic-prost-build`, so no
//! system `protoc` is needed. docs/PROTOCOL.md describes the messages and state machines.
//!
//! Generated types stay at the edge: this crate converts them to and from the `ckpt-core` domain
//! types ([`From`] where every domain value has a wire form, [`TryFrom`] where the wire admits
//! values the domain does not, such as an unspecified enum).

use std::fmt;

use ckpt_core::Phase;

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

/// A wire enum value that has no domain meaning: `UNSPECIFIED` (the default a peer sends when it
/// did not set the field) or a number this build does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unspecified {
    /// The field, in lowercase (`phase`).
    pub field: &'static str,
    /// The number on the wire.
    pub value: i32,
}

impl fmt::Display for Unspecified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value == 0 {
            write!(f, "{} is unspecified: set it", self.field)
        } else {
            write!(f, "{} {} is unknown to this build: upgrade ckptd or send a known value", self.field, self.value)
        }
    }
}

impl std::error::Error for Unspecified {}

impl From<Phase> for v1::Phase {
    fn from(p: Phase) -> v1::Phase {
        match p {
            Phase::Init => v1::Phase::Init,
            Phase::Step => v1::Phase::Step,
            Phase::CheckpointSave => v1::Phase::CheckpointSave,
            Phase::CheckpointLoad => v1::Phase::CheckpointLoad,
        }
    }
}

impl TryFrom<v1::Phase> for Phase {
    type Error = Unspecified;

    fn try_from(p: v1::Phase) -> Result<Phase, Unspecified> {
        match p {
            v1::Phase::Unspecified => Err(Unspecified { field: "phase", value: p as i32 }),
            v1::Phase::Init => Ok(Phase::Init),
            v1::Phase::Step => Ok(Phase::Step),
            v1::Phase::CheckpointSave => Ok(Phase::CheckpointSave),
            v1::Phase::CheckpointLoad => Ok(Phase::CheckpointLoad),
        }
    }
}

/// The phase of a heartbeat, or `None` when the trainer did not say: a heartbeat without a phase
/// still proves the rank is alive.
impl From<v1::Phase> for Option<Phase> {
    fn from(p: v1::Phase) -> Option<Phase> {
        Phase::try_from(p).ok()
    }
}

/// Decodes the `phase` field of a message as it arrives (an `i32`).
pub fn phase_from_wire(value: i32) -> Result<Phase, Unspecified> {
    v1::Phase::try_from(value).map_err(|_| Unspecified { field: "phase", value }).and_then(Phase::try_from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_round_trip_and_unspecified_is_refused() {
        for p in Phase::ALL {
            let wire = v1::Phase::from(p);
            assert_eq!(Phase::try_from(wire), Ok(p));
            assert_eq!(phase_from_wire(wire as i32), Ok(p));
            assert_eq!(Option::<Phase>::from(wire), Some(p));
        }
        let err = Phase::try_from(v1::Phase::Unspecified).unwrap_err();
        assert_eq!(err.to_string(), "phase is unspecified: set it");
        assert_eq!(Option::<Phase>::from(v1::Phase::Unspecified), None);
        assert_eq!(phase_from_wire(99), Err(Unspecified { field: "phase", value: 99 }));
    }
}
