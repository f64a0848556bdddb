//! What a training rank is doing: the [`Phase`] a trainer reports with each heartbeat.
//!
//! The engine does not act on it; the phase lives here because the trainer client, the agent and
//! the health monitor all speak about it, and the wire protocol converts to and from it.

use std::fmt;
use std::str::FromStr;

/// The phase of a training rank. Hang detection gives each phase its own budget, so a long restore
/// from object storage is never mistaken for a stuck step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Start-up: model construction, compilation, NCCL set-up, up to the first step.
    Init,
    /// A training step.
    Step,
    /// Saving a checkpoint.
    CheckpointSave,
    /// Loading (restoring) a checkpoint.
    CheckpointLoad,
}

impl Phase {
    /// Every phase, in the order a rank normally goes through them.
    pub const ALL: [Phase; 4] = [Phase::Init, Phase::Step, Phase::CheckpointSave, Phase::CheckpointLoad];

    /// The phase's stable name (`init`, `step`, `checkpoint-save`, `checkpoint-load`), as used in
    /// logs, metrics, findings and the Python API.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Init => "init",
            Phase::Step => "step",
            Phase::CheckpointSave => "checkpoint-save",
            Phase::CheckpointLoad => "checkpoint-load",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`Phase`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{name:.64}` is not a phase: use init, step, checkpoint-save or checkpoint-load")]
pub struct UnknownPhase {
    /// The name given.
    pub name: String,
}

impl FromStr for Phase {
    type Err = UnknownPhase;

    fn from_str(s: &str) -> Result<Phase, UnknownPhase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| UnknownPhase { name: s.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in Phase::ALL {
            assert_eq!(p.as_str().parse::<Phase>(), Ok(p));
            assert_eq!(p.to_string(), p.as_str());
        }
        let err = "training".parse::<Phase>().unwrap_err();
        assert!(err.to_string().contains("checkpoint-load"), "{err}");
    }
}
