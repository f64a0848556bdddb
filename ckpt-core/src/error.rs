//! The one error type of `ckpt-core`.
//!
//! Every variant says what failed and carries the structured fields that an operator needs to find
//! it (step, rank, chunk, offset, path). [`Error::kind`] gives retry and alert policy a stable value
//! to branch on, whatever the message says.

use std::path::PathBuf;

/// Result alias used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What class of failure an [`Error`] is, for retry and alert policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The caller passed something invalid: a URL, a configuration value, a tensor.
    InvalidInput,
    /// The object, step or checkpoint does not exist.
    NotFound,
    /// Someone else already created it (a racing commit).
    Conflict,
    /// Stored bytes fail validation: checksum, structure, sizes.
    Corrupt,
    /// The stored data uses a format version this build does not read.
    Unsupported,
    /// The caller's tensors do not match the checkpoint's tensor table.
    Mismatch,
    /// The store failed in a way that may succeed later (5xx, timeouts, resets).
    Transient,
    /// The store or file system refused or failed permanently (permissions, quota, full disk).
    Storage,
    /// A deadline passed before the operation could finish.
    Timeout,
    /// The engine is shutting down or the work was abandoned.
    Cancelled,
    /// A GPU driver call failed (the device may be faulty or lost).
    Device,
    /// The arena has no room: too little memory-backed space, or every slot stays busy.
    ArenaFull,
}

/// Where in a checkpoint a corruption was found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Location {
    /// Object path relative to the store root.
    pub object: String,
    /// Checkpoint step, when known.
    pub step: Option<u64>,
    /// Rank of the shard, when known.
    pub rank: Option<u32>,
    /// Chunk number inside the shard, when the damage is in a data chunk.
    pub chunk: Option<u64>,
    /// Byte offset inside the object where the damaged region starts.
    pub offset: Option<u64>,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.object)?;
        if let Some(step) = self.step {
            write!(f, " (step {step}")?;
            if let Some(rank) = self.rank {
                write!(f, ", rank {rank}")?;
            }
            f.write_str(")")?;
        }
        if let Some(chunk) = self.chunk {
            write!(f, " chunk {chunk}")?;
        }
        if let Some(offset) = self.offset {
            write!(f, " at offset {offset}")?;
        }
        Ok(())
    }
}

/// The error type of `ckpt-core`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A store URL could not be understood.
    #[error("invalid store url `{url}`: {reason}")]
    InvalidUrl {
        /// The URL with any credentials removed.
        url: String,
        /// What is wrong and what is accepted.
        reason: String,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration `{field}`: {reason}")]
    InvalidConfig {
        /// The setting's name.
        field: &'static str,
        /// What is wrong and what is accepted.
        reason: String,
    },
    /// A tensor or snapshot given by the caller is malformed.
    #[error("invalid tensor `{name}`: {reason}")]
    InvalidTensor {
        /// The tensor's name (its key path in the state).
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// An object-store call failed.
    #[error("store {op} of `{path}` failed: {cause}")]
    Store {
        /// The operation (`put`, `get`, `list`, ...).
        op: &'static str,
        /// The object path relative to the store.
        path: String,
        /// What the store said. It is part of the message and not returned by `source()`, so a
        /// printer of the cause chain says it once.
        cause: object_store::Error,
    },
    /// Temporary cloud credentials could not be obtained (a token file that cannot be read, a
    /// refusal or an unusable answer from the token service). It reaches callers as the source of
    /// the store error of the request that needed the credentials. The reason never holds a
    /// token or a key.
    #[error("cannot get {provider} credentials: {reason}")]
    Credentials {
        /// The credential source, e.g. `RRSA (STS AssumeRoleWithOIDC)`.
        provider: &'static str,
        /// What failed and what to fix.
        reason: String,
    },
    /// A local file-system call failed.
    #[error("{op} `{}` failed: {cause}", path.display())]
    Io {
        /// The operation (`open`, `pwrite`, `fsync`, ...).
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error, part of the message and not returned by `source()` (see `Store`).
        cause: std::io::Error,
    },
    /// Stored bytes are damaged or inconsistent.
    #[error("corrupt checkpoint data in {location}: {reason}")]
    Corrupt {
        /// Where the damage is.
        location: Location,
        /// What check failed.
        reason: String,
    },
    /// Stored data uses a format version this build cannot read.
    #[error("unsupported {what} version {found} (this build reads version {supported}): upgrade ckptd to read it")]
    UnsupportedVersion {
        /// Which structure (`shard`, `manifest`).
        what: &'static str,
        /// The version found.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The step is already committed (by another writer first, or by an earlier save of the same
    /// step number), and a committed step never changes.
    #[error(
        "step {step} of job `{job}` is already committed and a committed step is never rewritten: resume from step {step}, or save under a step number that is not committed yet"
    )]
    Conflict {
        /// The job.
        job: String,
        /// The step.
        step: u64,
    },
    /// The step was committed with another write of this rank than this save's (an attempt that
    /// died left it, and a committer took it before this save's shard arrived): the step holds
    /// this rank's state as that write had it, and this save does not count.
    #[error(
        "step {step} of job `{job}` was committed with {} of rank {rank}, not this save's `{ours}`: this save does not count; save the state again under a step number that is not committed yet",
        committed.as_deref().map_or("no shard".to_string(), |c| format!("shard `{c}`"))
    )]
    Superseded {
        /// The job.
        job: String,
        /// The step.
        step: u64,
        /// This rank.
        rank: u32,
        /// This save's shard object.
        ours: String,
        /// The shard object of this rank the MANIFEST names, if any.
        committed: Option<String>,
    },
    /// A step, shard or checkpoint does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for, e.g. `step 40 of job "llama"`.
        what: String,
    },
    /// The caller's state does not match the checkpoint.
    #[error("state does not match checkpoint step {step}: {}", problems.join("; "))]
    StateMismatch {
        /// The step being loaded.
        step: u64,
        /// Every offending tensor, one entry each.
        problems: Vec<String>,
    },
    /// Not every rank wrote its shard before the commit deadline.
    #[error(
        "step {step} of job `{job}` is incomplete after {waited_ms} ms: ranks {missing:?} have no valid shard; the previous step stays latest"
    )]
    Incomplete {
        /// The job.
        job: String,
        /// The step.
        step: u64,
        /// Ranks whose shard is missing or invalid.
        missing: Vec<u32>,
        /// How long the committer waited.
        waited_ms: u64,
    },
    /// Compressing or decompressing a chunk failed.
    #[error("codec failure: {cause}")]
    Codec {
        /// The zstd error, part of the message and not returned by `source()` (see `Store`).
        cause: std::io::Error,
    },
    /// A CUDA driver call failed.
    #[error("{op} on CUDA device {device} failed: {reason}")]
    Device {
        /// The driver call.
        op: &'static str,
        /// The device ordinal.
        device: u32,
        /// The driver's error name and description.
        reason: String,
    },
    /// Rank 0 (or the isolator) did not commit a step whose shard this rank wrote in time.
    #[error(
        "step {step} of job `{job}` was not committed within {waited_ms} ms of this rank's shard being durable: the committer (rank 0 or the isolator) failed or is slow; the previous step stays latest"
    )]
    CommitTimeout {
        /// The job.
        job: String,
        /// The step.
        step: u64,
        /// How long this rank waited.
        waited_ms: u64,
    },
    /// A step was given up before it committed (the job restarted, or its owner cancelled it).
    #[error("step {step} of job `{job}` was abandoned before it committed: {reason}")]
    Aborted {
        /// The job.
        job: String,
        /// The step.
        step: u64,
        /// Why.
        reason: String,
    },
    /// Another live process owns the arena of this job and rank (it holds the arena's lock): one
    /// process writes a rank's checkpoints.
    #[error(
        "{} is in use by {holder}: one process writes each rank of a job; stop that process, or give this one its own rank (RANK, WORLD_SIZE) or job",
        path.display()
    )]
    ArenaHeld {
        /// The arena file.
        path: PathBuf,
        /// Who holds it, as recorded in the arena header (`pid 1234`).
        holder: String,
    },
    /// The arena cannot take the snapshot.
    #[error("arena full: {reason}")]
    ArenaFull {
        /// What did not fit and what to change.
        reason: String,
    },
    /// The engine's I/O runtime or a worker is gone.
    #[error("engine is shut down or a worker died: {reason}")]
    Cancelled {
        /// What was abandoned.
        reason: String,
    },
}

impl Error {
    /// The class of this failure, for retry and alert policy.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidUrl { .. } | Error::InvalidConfig { .. } | Error::InvalidTensor { .. } => {
                ErrorKind::InvalidInput
            }
            Error::Store { cause, .. } => store_error_kind(cause),
            Error::Io { cause, .. } => io_error_kind(cause),
            Error::Corrupt { .. } | Error::Codec { .. } => ErrorKind::Corrupt,
            Error::UnsupportedVersion { .. } => ErrorKind::Unsupported,
            Error::Conflict { .. } | Error::Superseded { .. } | Error::ArenaHeld { .. } => ErrorKind::Conflict,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::StateMismatch { .. } => ErrorKind::Mismatch,
            Error::Incomplete { .. } | Error::CommitTimeout { .. } => ErrorKind::Timeout,
            Error::Cancelled { .. } | Error::Aborted { .. } => ErrorKind::Cancelled,
            Error::ArenaFull { .. } => ErrorKind::ArenaFull,
            Error::Device { .. } => ErrorKind::Device,
            Error::Credentials { .. } => ErrorKind::Storage,
        }
    }

    pub(crate) fn store(op: &'static str, path: impl std::fmt::Display, source: object_store::Error) -> Self {
        Error::Store { op, path: path.to_string(), cause: source }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { op, path: path.into(), cause: source }
    }

    pub(crate) fn corrupt(location: Location, reason: impl Into<String>) -> Self {
        Error::Corrupt { location, reason: reason.into() }
    }

    /// Whether this is a "not found" of any origin (store, file system or catalog).
    pub fn is_not_found(&self) -> bool {
        self.kind() == ErrorKind::NotFound
    }
}

fn store_error_kind(e: &object_store::Error) -> ErrorKind {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => ErrorKind::NotFound,
        E::AlreadyExists { .. } | E::Precondition { .. } => ErrorKind::Conflict,
        E::InvalidPath { .. } | E::NotSupported { .. } | E::NotImplemented { .. } => ErrorKind::InvalidInput,
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => ErrorKind::Storage,
        _ => ErrorKind::Transient,
    }
}

fn io_error_kind(e: &std::io::Error) -> ErrorKind {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::NotFound => ErrorKind::NotFound,
        K::AlreadyExists => ErrorKind::Conflict,
        K::InvalidInput | K::InvalidData => ErrorKind::InvalidInput,
        K::TimedOut | K::Interrupted | K::WouldBlock | K::ConnectionReset => ErrorKind::Transient,
        _ => ErrorKind::Storage,
    }
}
