//! gRPC plumbing shared by the trainer client, the agent, the isolator and `ckptctl`: the channel
//! over a Unix socket, and the mapping between [`Error`] and [`tonic::Status`] in both directions,
//! here and nowhere else.
//!
//! Every status a ckptd server returns carries the [`ErrorKind`] of the failure in its metadata
//! (`ckptd-kind`), so that the caller rebuilds an error of the same class: a `load` that finds
//! nothing raises `NoCheckpoint` in Python whether the checkpointer runs embedded or against an
//! agent, and an agent told `stale` by the isolator waits for the restore command. The gRPC code is
//! chosen from the kind by [`code_of`]; a status without the metadata (a transport failure, a peer
//! of another version, tonic's own refusals) is classified from its code by [`kind_of_code`].

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

use crate::error::{Error, ErrorKind, source_chain};

/// Status metadata key carrying [`ErrorKind::as_str`].
pub const KIND_METADATA: &str = "ckptd-kind";

/// Opens a gRPC channel to the agent's Unix socket. Fails at once when nothing listens there.
pub async fn unix_channel(path: &Path) -> Result<Channel, Error> {
    let unavailable = |reason: String| Error::AgentUnavailable { socket: path.to_path_buf(), reason };
    let owned: PathBuf = path.to_path_buf();
    // The URI is required by the API but never resolved: the connector below ignores it.
    let endpoint = Endpoint::try_from("http://ckptd-agent.invalid")
        .map_err(|e| unavailable(e.to_string()))?
        .connect_timeout(std::time::Duration::from_secs(5));
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = owned.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| unavailable(source_chain(&e)))
}

/// The gRPC code a server answers for a failure of class `kind`.
pub fn code_of(kind: ErrorKind) -> Code {
    use ckpt_core::ErrorKind as K;
    match kind {
        ErrorKind::Core(k) => match k {
            K::InvalidInput => Code::InvalidArgument,
            K::NotFound => Code::NotFound,
            K::Conflict => Code::AlreadyExists,
            K::Corrupt => Code::DataLoss,
            K::Unsupported => Code::Unimplemented,
            K::Mismatch => Code::FailedPrecondition,
            K::Transient => Code::Unavailable,
            K::Timeout => Code::DeadlineExceeded,
            K::Cancelled => Code::Aborted,
            K::ArenaFull => Code::ResourceExhausted,
            _ => Code::Internal,
        },
        ErrorKind::Busy => Code::ResourceExhausted,
        ErrorKind::NoCheckpoint | ErrorKind::UnknownJob => Code::NotFound,
        ErrorKind::Config | ErrorKind::InvalidRequest => Code::InvalidArgument,
        ErrorKind::Stale => Code::FailedPrecondition,
        ErrorKind::AgentUnavailable
        | ErrorKind::IsolatorUnavailable
        | ErrorKind::Closed
        | ErrorKind::NotLeader
        | ErrorKind::Cluster
        | ErrorKind::Io => Code::Unavailable,
        ErrorKind::Internal => Code::Internal,
    }
}

/// The class of a status that carries no kind, from its code alone. `None`: the peer did not
/// answer (the connection failed, broke or timed out), which the caller reports as its peer being
/// unavailable.
pub fn kind_of_code(code: Code) -> Option<ErrorKind> {
    use ckpt_core::ErrorKind as K;
    Some(match code {
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => return None,
        Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidRequest,
        Code::NotFound => ErrorKind::Core(K::NotFound),
        Code::AlreadyExists => ErrorKind::Core(K::Conflict),
        Code::DataLoss => ErrorKind::Core(K::Corrupt),
        Code::Unimplemented => ErrorKind::Core(K::Unsupported),
        Code::FailedPrecondition => ErrorKind::Stale,
        Code::Aborted => ErrorKind::Core(K::Cancelled),
        Code::ResourceExhausted => ErrorKind::Busy,
        // Our own credentials or the peer's CA are wrong: a configuration to fix, not to retry.
        Code::Unauthenticated | Code::PermissionDenied => ErrorKind::Config,
        Code::Ok | Code::Internal => ErrorKind::Internal,
    })
}

/// The status a server returns for `err`.
pub fn to_status(err: &Error) -> Status {
    let kind = err.kind();
    with_kind(Status::new(code_of(kind), err.to_string()), kind)
}

/// A status with an explicit code and kind, for refusals that are not library errors (a bad
/// session, a slot the caller does not own, a missing credential).
pub fn refuse(code: Code, kind: ErrorKind, message: impl Into<String>) -> Status {
    with_kind(Status::new(code, message.into()), kind)
}

fn with_kind(mut status: Status, kind: ErrorKind) -> Status {
    if let Ok(v) = kind.as_str().parse() {
        status.metadata_mut().insert(KIND_METADATA, v);
    }
    status
}

/// The kind a status carries in its metadata, if any.
pub fn kind_of(status: &Status) -> Option<ErrorKind> {
    status.metadata().get(KIND_METADATA).and_then(|v| v.to_str().ok()).and_then(ErrorKind::from_name)
}

/// The error a client raises for a failed call `op` to the agent at `socket`.
pub fn from_status(socket: &Path, op: &'static str, status: Status) -> Error {
    match kind_of(&status).or_else(|| kind_of_code(status.code())) {
        Some(kind) => Error::Agent { op, kind, message: message(&status) },
        None => Error::AgentUnavailable { socket: socket.to_path_buf(), reason: status.message().to_string() },
    }
}

/// The error the agent raises for a failed call `call` to the isolator at `url`.
pub fn from_isolator_status(url: &str, call: &str, status: &Status) -> Error {
    match kind_of(status).or_else(|| kind_of_code(status.code())) {
        Some(class) => Error::IsolatorRefused { call: call.to_string(), class, message: message(status) },
        None => Error::IsolatorUnavailable { url: url.to_string(), reason: format!("{call}: {}", status.message()) },
    }
}

/// The peer's message; when the peer sent no kind, the code is part of what the reader needs.
fn message(status: &Status) -> String {
    if kind_of(status).is_some() {
        status.message().to_string()
    } else {
        format!("{:?}: {}", status.code(), status.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind, written as an exhaustive match so that a new kind fails to compile here until
    /// it is added to the list.
    fn every_kind() -> Vec<ErrorKind> {
        use ckpt_core::ErrorKind as K;
        let all = vec![
            ErrorKind::Core(K::InvalidInput),
            ErrorKind::Core(K::NotFound),
            ErrorKind::Core(K::Conflict),
            ErrorKind::Core(K::Corrupt),
            ErrorKind::Core(K::Unsupported),
            ErrorKind::Core(K::Mismatch),
            ErrorKind::Core(K::Transient),
            ErrorKind::Core(K::Storage),
            ErrorKind::Core(K::Timeout),
            ErrorKind::Core(K::Cancelled),
            ErrorKind::Core(K::Device),
            ErrorKind::Core(K::ArenaFull),
            ErrorKind::AgentUnavailable,
            ErrorKind::NoCheckpoint,
            ErrorKind::Closed,
            ErrorKind::Config,
            ErrorKind::InvalidRequest,
            ErrorKind::UnknownJob,
            ErrorKind::Stale,
            ErrorKind::NotLeader,
            ErrorKind::Cluster,
            ErrorKind::IsolatorUnavailable,
            ErrorKind::Io,
            ErrorKind::Busy,
            ErrorKind::Internal,
        ];
        for k in &all {
            match k {
                ErrorKind::Core(_)
                | ErrorKind::AgentUnavailable
                | ErrorKind::NoCheckpoint
                | ErrorKind::Closed
                | ErrorKind::Config
                | ErrorKind::InvalidRequest
                | ErrorKind::UnknownJob
                | ErrorKind::Stale
                | ErrorKind::NotLeader
                | ErrorKind::Cluster
                | ErrorKind::IsolatorUnavailable
                | ErrorKind::Io
                | ErrorKind::Busy
                | ErrorKind::Internal => {}
            }
        }
        all
    }

    #[test]
    fn every_kind_survives_the_wire_to_the_agent_and_to_the_isolator() {
        for kind in every_kind() {
            assert_eq!(ErrorKind::from_name(kind.as_str()), Some(kind), "{kind:?} has no stable name");
            let status = refuse(code_of(kind), kind, "refused");
            assert_eq!(kind_of(&status), Some(kind));
            let agent = from_status(Path::new("/s"), "save", status.clone());
            assert_eq!(agent.kind(), kind, "{agent}");
            let isolator = from_isolator_status("https://iso", "vote-durable", &status);
            assert_eq!(isolator.kind(), kind, "{isolator}");
        }
    }

    #[test]
    fn each_kind_has_the_code_a_plain_grpc_client_expects() {
        use ckpt_core::ErrorKind as K;
        let expected = [
            (ErrorKind::Core(K::InvalidInput), Code::InvalidArgument),
            (ErrorKind::Core(K::NotFound), Code::NotFound),
            (ErrorKind::Core(K::Conflict), Code::AlreadyExists),
            (ErrorKind::Core(K::Corrupt), Code::DataLoss),
            (ErrorKind::Core(K::Unsupported), Code::Unimplemented),
            (ErrorKind::Core(K::Mismatch), Code::FailedPrecondition),
            (ErrorKind::Core(K::Transient), Code::Unavailable),
            (ErrorKind::Core(K::Storage), Code::Internal),
            (ErrorKind::Core(K::Timeout), Code::DeadlineExceeded),
            (ErrorKind::Core(K::Cancelled), Code::Aborted),
            (ErrorKind::Core(K::Device), Code::Internal),
            (ErrorKind::Core(K::ArenaFull), Code::ResourceExhausted),
            (ErrorKind::AgentUnavailable, Code::Unavailable),
            (ErrorKind::NoCheckpoint, Code::NotFound),
            (ErrorKind::Closed, Code::Unavailable),
            (ErrorKind::Config, Code::InvalidArgument),
            (ErrorKind::InvalidRequest, Code::InvalidArgument),
            (ErrorKind::UnknownJob, Code::NotFound),
            (ErrorKind::Stale, Code::FailedPrecondition),
            (ErrorKind::NotLeader, Code::Unavailable),
            (ErrorKind::Cluster, Code::Unavailable),
            (ErrorKind::IsolatorUnavailable, Code::Unavailable),
            (ErrorKind::Io, Code::Unavailable),
            (ErrorKind::Busy, Code::ResourceExhausted),
            (ErrorKind::Internal, Code::Internal),
        ];
        assert_eq!(expected.len(), every_kind().len(), "a kind is missing from this table");
        for (kind, code) in expected {
            assert_eq!(code_of(kind), code, "{kind:?}");
        }
    }

    #[test]
    fn errors_keep_their_kind_and_message_across_the_wire() {
        let errors = [
            Error::NoCheckpoint { job: "j".into(), store: "file:///x".into() },
            Error::Core(ckpt_core::Error::ArenaFull { reason: "no room".into() }),
            Error::Core(ckpt_core::Error::StateMismatch { step: 3, problems: vec!["`w`: shape".into()] }),
            Error::Config { what: "slots".into(), reason: "0".into() },
            Error::StaleGeneration { job: "j".into(), got: 1, current: 2 },
            Error::NotLeader { holder: "b".into() },
        ];
        for e in errors {
            let back = from_status(Path::new("/s"), "load", to_status(&e));
            assert_eq!(back.kind(), e.kind(), "{e} came back as {back}");
            assert!(back.to_string().contains(&e.to_string()), "{back} lost the message of {e}");
            let back = from_isolator_status("u", "register", &to_status(&e));
            assert_eq!(back.kind(), e.kind(), "{e} came back as {back}");
        }
    }

    #[test]
    fn transport_failures_are_the_peer_being_unavailable() {
        for status in [Status::unavailable("connection reset"), Status::deadline_exceeded("no answer")] {
            let back = from_status(Path::new("/run/agent.sock"), "save", status.clone());
            assert_eq!(back.kind(), ErrorKind::AgentUnavailable);
            assert!(back.to_string().contains("/run/agent.sock"));
            let back = from_isolator_status("https://iso:7443", "heartbeat", &status);
            assert_eq!(back.kind(), ErrorKind::IsolatorUnavailable);
            assert!(back.to_string().contains("heartbeat"), "{back}");
        }
    }

    #[test]
    fn statuses_without_a_kind_are_classified_by_their_code() {
        let back = from_isolator_status("u", "register", &Status::unauthenticated("no token"));
        assert_eq!(back.kind(), ErrorKind::Config);
        assert!(back.to_string().contains("Unauthenticated: no token"), "{back}");
        let back = from_status(Path::new("/s"), "locate", Status::unimplemented("unknown method"));
        assert_eq!(back.kind(), ErrorKind::Core(ckpt_core::ErrorKind::Unsupported));
        let back = from_isolator_status("u", "vote", &Status::failed_precondition("old generation"));
        assert_eq!(back.kind(), ErrorKind::Stale);
    }
}
