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
    /// A peer sent a request that is malformed or inconsistent (wrong job, rank out of range,
    /// absurd size); retrying the same request cannot succeed.
    InvalidRequest,
    /// The request names a job the isolator does not know.
    UnknownJob,
    /// The request belongs to an older restart generation or to an aborted step: the sender must
    /// resynchronise (restore) before it may act again.
    Stale,
    /// This isolator replica does not hold the leader Lease; another one acts.
    NotLeader,
    /// A Kubernetes API call failed.
    Cluster,
    /// The isolator cannot be reached.
    IsolatorUnavailable,
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
    /// A peer's request is malformed or inconsistent.
    #[error("invalid {what}: {reason}")]
    InvalidRequest {
        /// The field or message.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// The job has not been registered with the isolator.
    #[error("job `{job}` is not registered with the isolator: register its ranks first")]
    UnknownJob {
        /// The job.
        job: String,
    },
    /// The request carries a restart generation older than the job's.
    #[error(
        "job `{job}`: generation {got} is stale, the job is at generation {current}: restore the step the isolator sent"
    )]
    StaleGeneration {
        /// The job.
        job: String,
        /// The generation in the request.
        got: u64,
        /// The job's generation.
        current: u64,
    },
    /// A vote for a step that the isolator aborted (deadline or restart).
    #[error("job `{job}`: step {step} was aborted ({reason}); the previous committed step stays latest")]
    StepAborted {
        /// The job.
        job: String,
        /// The step.
        step: u64,
        /// Why it was aborted.
        reason: String,
    },
    /// This replica does not hold the leader Lease.
    #[error("this isolator is not the leader (the Lease is held by {holder}): retry against the leader")]
    NotLeader {
        /// The current holder, or `nobody`.
        holder: String,
    },
    /// A Kubernetes API call failed.
    #[error("kubernetes: {op} {object}: {reason}")]
    Kube {
        /// The operation (`cordon`, `delete pod`, `renew lease`, ...).
        op: String,
        /// The object (`node/gpu-3`, `pod/train/worker-2`).
        object: String,
        /// The API server's answer or the transport failure.
        reason: String,
    },
    /// The isolator cannot be reached (connection refused, TLS failure, timeout).
    #[error("no isolator at {url}: {reason}")]
    IsolatorUnavailable {
        /// The isolator URL.
        url: String,
        /// Why it failed.
        reason: String,
    },
    /// The isolator refused a call.
    #[error("the isolator refused {call}: {message}")]
    IsolatorRefused {
        /// The RPC.
        call: String,
        /// The class of the refusal ([`ErrorKind::Stale`] means: wait for the restore command).
        class: ErrorKind,
        /// The isolator's message.
        message: String,
    },
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
            Error::InvalidRequest { .. } => ErrorKind::InvalidRequest,
            Error::UnknownJob { .. } => ErrorKind::UnknownJob,
            Error::StaleGeneration { .. } | Error::StepAborted { .. } => ErrorKind::Stale,
            Error::NotLeader { .. } => ErrorKind::NotLeader,
            Error::Kube { .. } => ErrorKind::Cluster,
            Error::IsolatorUnavailable { .. } => ErrorKind::IsolatorUnavailable,
            Error::IsolatorRefused { class, .. } => *class,
        }
    }
}

/// Result alias of the `ckptd` library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
