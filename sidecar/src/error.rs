//! The one error type of the `ckptd` library.

use std::path::PathBuf;
use std::sync::Arc;

/// What class of failure an [`Error`] is, for retry policy and for the Python exception hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A failure inside the engine, with its own kind.
    Core(ckpt_core::ErrorKind),
    /// The arena cannot hold the state (too little memory-backed space, or slots exhausted).
    ArenaFull,
    /// The sidecar agent cannot be reached.
    AgentUnavailable,
    /// No checkpoint exists to load.
    NoCheckpoint,
    /// The checkpointer was closed.
    Closed,
    /// A configuration value (flag, environment variable, file, annotation) is invalid; daemons
    /// exit with code 64.
    Config,
}

/// The error type of the `ckptd` library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The engine failed.
    #[error(transparent)]
    Core(#[from] ckpt_core::Error),
    /// The arena has no room for the state.
    #[error("arena full: {reason}")]
    ArenaFull {
        /// What did not fit and what to change.
        reason: String,
    },
    /// The agent's socket does not answer.
    #[error("no ckptd agent at {}: {reason} (is the sidecar running? unset CKPTD_SOCKET for embedded mode)", socket.display())]
    AgentUnavailable {
        /// The socket path tried.
        socket: PathBuf,
        /// Why it failed.
        reason: String,
    },
    /// There is no committed checkpoint to load.
    #[error("no committed checkpoint of job `{job}` in {store}")]
    NoCheckpoint {
        /// The job.
        job: String,
        /// The store URL (credentials removed).
        store: String,
    },
    /// A background save failed; `source` says why.
    #[error("save of step {step} failed: {source}")]
    SaveFailed {
        /// The step.
        step: u64,
        /// The failure, shared by every handle of the save.
        #[source]
        source: Arc<Error>,
    },
    /// Rank 0 did not commit a step this rank wrote in time.
    #[error(
        "step {step} was not committed within {waited_ms} ms of this rank's shard being durable: rank 0 failed or is slow; the previous step stays latest"
    )]
    CommitTimeout {
        /// The step.
        step: u64,
        /// How long this rank waited.
        waited_ms: u64,
    },
    /// The checkpointer was closed.
    #[error("the checkpointer is closed")]
    Closed,
    /// A configuration value is invalid.
    #[error("invalid {what}: {reason}")]
    Config {
        /// The flag, variable, file or annotation.
        what: String,
        /// What is wrong and the accepted form.
        reason: String,
    },
    /// `ckptctl inject` reached an agent started without `--allow-inject`.
    #[error("fault injection is disabled: start the agent with --allow-inject (CKPTD_ALLOW_INJECT=true) to run drills")]
    InjectDisabled,
}

impl Error {
    /// The class of this failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Core(e) => ErrorKind::Core(e.kind()),
            Error::ArenaFull { .. } => ErrorKind::ArenaFull,
            Error::AgentUnavailable { .. } => ErrorKind::AgentUnavailable,
            Error::NoCheckpoint { .. } => ErrorKind::NoCheckpoint,
            Error::SaveFailed { source, .. } => source.kind(),
            Error::CommitTimeout { .. } => ErrorKind::Core(ckpt_core::ErrorKind::Timeout),
            Error::Closed => ErrorKind::Closed,
            Error::Config { .. } => ErrorKind::Config,
            Error::InjectDisabled => ErrorKind::Config,
        }
    }
}

/// Result alias of the `ckptd` library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
