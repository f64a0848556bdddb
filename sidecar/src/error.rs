//! The one error type of the `ckptd` library.

use std::path::PathBuf;
use std::sync::Arc;

/// What class of failure an [`Error`] is, for retry policy and for the Python exception hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A failure inside the engine, with its own kind.
    Core(ckpt_core::ErrorKind),
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
    /// A local resource failed after start-up: a server stopped accepting connections.
    Io,
    /// A bounded queue is full or its consumer is stopping; retrying later can succeed.
    Busy,
    /// The process itself failed: a thread or runtime could not start, or a task panicked.
    Internal,
}

/// The error type of the `ckptd` library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The engine failed.
    #[error(transparent)]
    Core(#[from] ckpt_core::Error),
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
    /// The checkpointer was closed.
    #[error("the checkpointer is closed")]
    Closed,
    /// The agent refused or failed a call; `kind` is the class of the agent-side failure.
    #[error("the ckptd agent failed `{op}`: {message}")]
    Agent {
        /// The call.
        op: &'static str,
        /// The class of the failure on the agent's side.
        kind: ErrorKind,
        /// The agent's message.
        message: String,
    },
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
    /// A thread, runtime or blocking task of this process failed.
    #[error("cannot {what}: {reason}")]
    Runtime {
        /// What was attempted (`start the isolator runtime`, `open the store`).
        what: &'static str,
        /// The operating system's or the task's answer.
        reason: String,
    },
    /// A server could not bind its address. Its kind is [`ErrorKind::Config`]: the operator picks
    /// the address, and a daemon exits with code 64 on it as on any other bad setting.
    #[error("cannot listen on {addr} for {what}: {source}: free the address or choose another one")]
    Listen {
        /// The server (`the isolator's gRPC`, `the webhook's HTTPS`).
        what: &'static str,
        /// The address as given.
        addr: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// A server stopped with an error after it started.
    #[error("{what} server failed: {reason}")]
    Serve {
        /// The server (`the isolator's gRPC`).
        what: &'static str,
        /// The transport's answer.
        reason: String,
    },
    /// A bounded queue is full or its consumer is stopping.
    #[error("{what} is busy: {reason}; retry")]
    Busy {
        /// The queue or component.
        what: &'static str,
        /// Why the request was not taken.
        reason: String,
    },
    /// Something this process waits for did not finish in time.
    #[error("{what} did not finish within {waited_ms} ms")]
    Timeout {
        /// What was awaited (`rank 3's persists`, `the persists of the grace period`).
        what: String,
        /// How long it was awaited.
        waited_ms: u64,
    },
}

impl Error {
    /// A configuration file (or a file a flag names) that cannot be read.
    pub fn unreadable(what: impl Into<String>, path: &std::path::Path, e: &std::io::Error) -> Error {
        Error::Config { what: what.into(), reason: format!("cannot read {}: {e}", path.display()) }
    }

    /// A configuration document (YAML, TOML, JSON) that does not parse; `e` is the parser's error.
    pub fn unparsable(what: impl Into<String>, e: &dyn std::error::Error) -> Error {
        Error::Config { what: what.into(), reason: source_chain(e) }
    }

    /// The isolator at `url` cannot be reached: the transport's error with its causes.
    pub fn isolator_transport(url: &str, e: &dyn std::error::Error) -> Error {
        Error::IsolatorUnavailable { url: url.to_string(), reason: source_chain(e) }
    }

    /// A failed Kubernetes API call `op` on `object`, keeping the API server's answer.
    #[cfg(feature = "server")]
    pub fn kube(op: &str, object: &str, e: &kube::Error) -> Error {
        Error::Kube { op: op.to_string(), object: object.to_string(), reason: source_chain(e) }
    }

    /// Whether this failure means a stored step's data is damaged, so that an older committed
    /// step may still serve a restore ([`ckpt_core::slots::is_damage`]).
    pub fn is_damage(&self) -> bool {
        matches!(self.kind(), ErrorKind::Core(k) if ckpt_core::slots::is_damage(k))
    }

    /// The class of this failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Core(e) => ErrorKind::Core(e.kind()),
            Error::AgentUnavailable { .. } => ErrorKind::AgentUnavailable,
            Error::NoCheckpoint { .. } => ErrorKind::NoCheckpoint,
            Error::SaveFailed { source, .. } => source.kind(),
            Error::Closed => ErrorKind::Closed,
            Error::Config { .. } => ErrorKind::Config,
            Error::Agent { kind, .. } => *kind,
            Error::InjectDisabled => ErrorKind::Config,
            Error::InvalidRequest { .. } => ErrorKind::InvalidRequest,
            Error::UnknownJob { .. } => ErrorKind::UnknownJob,
            Error::StaleGeneration { .. } | Error::StepAborted { .. } => ErrorKind::Stale,
            Error::NotLeader { .. } => ErrorKind::NotLeader,
            Error::Kube { .. } => ErrorKind::Cluster,
            Error::IsolatorUnavailable { .. } => ErrorKind::IsolatorUnavailable,
            Error::IsolatorRefused { class, .. } => *class,
            Error::Runtime { .. } => ErrorKind::Internal,
            Error::Listen { .. } => ErrorKind::Config,
            Error::Serve { .. } => ErrorKind::Io,
            Error::Busy { .. } => ErrorKind::Busy,
            Error::Timeout { .. } => ErrorKind::Core(ckpt_core::ErrorKind::Timeout),
        }
    }
}

impl ErrorKind {
    /// A stable short name, carried in gRPC status metadata so that the peer can rebuild the kind.
    pub fn as_str(self) -> &'static str {
        use ckpt_core::ErrorKind as K;
        match self {
            ErrorKind::Core(K::InvalidInput) => "invalid_input",
            ErrorKind::Core(K::NotFound) => "not_found",
            ErrorKind::Core(K::Conflict) => "conflict",
            ErrorKind::Core(K::Corrupt) => "corrupt",
            ErrorKind::Core(K::Unsupported) => "unsupported",
            ErrorKind::Core(K::Mismatch) => "mismatch",
            ErrorKind::Core(K::Transient) => "transient",
            ErrorKind::Core(K::Storage) => "storage",
            ErrorKind::Core(K::Timeout) => "timeout",
            ErrorKind::Core(K::Cancelled) => "cancelled",
            ErrorKind::Core(K::Device) => "device",
            ErrorKind::Core(K::ArenaFull) => "arena_full",
            ErrorKind::Core(_) => "core",
            ErrorKind::AgentUnavailable => "agent_unavailable",
            ErrorKind::NoCheckpoint => "no_checkpoint",
            ErrorKind::Closed => "closed",
            ErrorKind::Config => "config",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::UnknownJob => "unknown_job",
            ErrorKind::Stale => "stale",
            ErrorKind::NotLeader => "not_leader",
            ErrorKind::Cluster => "cluster",
            ErrorKind::IsolatorUnavailable => "isolator_unavailable",
            ErrorKind::Io => "io",
            ErrorKind::Busy => "busy",
            ErrorKind::Internal => "internal",
        }
    }

    /// The kind named by [`ErrorKind::as_str`], if any.
    pub fn from_name(name: &str) -> Option<ErrorKind> {
        use ckpt_core::ErrorKind as K;
        Some(match name {
            "invalid_input" => ErrorKind::Core(K::InvalidInput),
            "not_found" => ErrorKind::Core(K::NotFound),
            "conflict" => ErrorKind::Core(K::Conflict),
            "corrupt" => ErrorKind::Core(K::Corrupt),
            "unsupported" => ErrorKind::Core(K::Unsupported),
            "mismatch" => ErrorKind::Core(K::Mismatch),
            "transient" => ErrorKind::Core(K::Transient),
            "storage" => ErrorKind::Core(K::Storage),
            "timeout" => ErrorKind::Core(K::Timeout),
            "cancelled" => ErrorKind::Core(K::Cancelled),
            "device" => ErrorKind::Core(K::Device),
            "arena_full" => ErrorKind::Core(K::ArenaFull),
            "agent_unavailable" => ErrorKind::AgentUnavailable,
            "no_checkpoint" => ErrorKind::NoCheckpoint,
            "closed" => ErrorKind::Closed,
            "config" => ErrorKind::Config,
            "invalid_request" => ErrorKind::InvalidRequest,
            "unknown_job" => ErrorKind::UnknownJob,
            "stale" => ErrorKind::Stale,
            "not_leader" => ErrorKind::NotLeader,
            "cluster" => ErrorKind::Cluster,
            "isolator_unavailable" => ErrorKind::IsolatorUnavailable,
            "io" => ErrorKind::Io,
            "busy" => ErrorKind::Busy,
            "internal" => ErrorKind::Internal,
            _ => return None,
        })
    }
}

/// `e` and its causes on one line (`connect failed: tcp connect error: connection refused`).
pub(crate) fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

/// Result alias of the `ckptd` library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sidecars_own_failures_have_truthful_kinds() {
        let io = || std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let cases = [
            (
                Error::Runtime { what: "start the isolator runtime", reason: "out of threads".into() },
                ErrorKind::Internal,
            ),
            (
                Error::Listen { what: "the webhook's HTTPS", addr: "0.0.0.0:8443".into(), source: io() },
                ErrorKind::Config,
            ),
            (Error::Serve { what: "the isolator's gRPC", reason: "accept failed".into() }, ErrorKind::Io),
            (Error::Busy { what: "the health controller", reason: "its queue is full".into() }, ErrorKind::Busy),
            (
                Error::Timeout { what: "rank 3's persists".into(), waited_ms: 1000 },
                ErrorKind::Core(ckpt_core::ErrorKind::Timeout),
            ),
            (Error::unreadable("--token-file", std::path::Path::new("/t"), &io()), ErrorKind::Config),
            (Error::isolator_transport("https://iso", &io()), ErrorKind::IsolatorUnavailable),
        ];
        for (e, kind) in cases {
            assert_eq!(e.kind(), kind, "{e}");
            let msg = e.to_string();
            assert!(msg.chars().next().is_some_and(|c| !c.is_uppercase()) && !msg.ends_with('.'), "{msg}");
        }
    }

    #[test]
    fn a_cause_chain_reads_on_one_line_without_repeats() {
        #[derive(Debug, thiserror::Error)]
        #[error("connect failed: refused")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("refused"));
        assert_eq!(source_chain(&e), "connect failed: refused");
        let e = Outer(std::io::Error::other("tls handshake"));
        assert_eq!(source_chain(&e), "connect failed: refused: tls handshake");
    }
}
