//! gRPC plumbing shared by the trainer client, the agent and `ckptctl`: the channel over a Unix
//! socket, and the mapping between [`Error`] and [`tonic::Status`] — in both directions, here and
//! nowhere else.
//!
//! The agent puts the [`ErrorKind`] of a failure in the status metadata (`ckptd-kind`), so that the
//! trainer rebuilds an error of the same class: a `load` that finds nothing raises `NoCheckpoint` in
//! Python whether the checkpointer runs embedded or against an agent.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

use crate::error::{Error, ErrorKind};

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

/// The status a server returns for `err`.
pub fn to_status(err: &Error) -> Status {
    let kind = err.kind();
    let code = match kind {
        ErrorKind::Core(k) => match k {
            ckpt_core::ErrorKind::InvalidInput => Code::InvalidArgument,
            ckpt_core::ErrorKind::NotFound => Code::NotFound,
            ckpt_core::ErrorKind::Conflict => Code::AlreadyExists,
            ckpt_core::ErrorKind::Corrupt => Code::DataLoss,
            ckpt_core::ErrorKind::Mismatch => Code::FailedPrecondition,
            ckpt_core::ErrorKind::Transient => Code::Unavailable,
            ckpt_core::ErrorKind::Timeout => Code::DeadlineExceeded,
            ckpt_core::ErrorKind::Cancelled => Code::Aborted,
            _ => Code::Internal,
        },
        ErrorKind::ArenaFull => Code::ResourceExhausted,
        ErrorKind::NoCheckpoint => Code::NotFound,
        ErrorKind::Config => Code::InvalidArgument,
        ErrorKind::Closed => Code::Unavailable,
        _ => Code::Internal,
    };
    with_kind(Status::new(code, err.to_string()), kind)
}

/// A status with an explicit kind, for refusals that are not library errors (a bad session, a slot
/// the caller does not own).
pub fn refuse(code: Code, kind: ErrorKind, message: impl Into<String>) -> Status {
    with_kind(Status::new(code, message.into()), kind)
}

fn with_kind(mut status: Status, kind: ErrorKind) -> Status {
    if let Ok(v) = kind.as_str().parse() {
        status.metadata_mut().insert(KIND_METADATA, v);
    }
    status
}

/// The error a client raises for a failed call `op` to the agent at `socket`.
pub fn from_status(socket: &Path, op: &'static str, status: Status) -> Error {
    let kind = status.metadata().get(KIND_METADATA).and_then(|v| v.to_str().ok()).and_then(ErrorKind::from_name);
    match (status.code(), kind) {
        // A transport failure: the agent went away or never answered.
        (Code::Unavailable | Code::Unknown | Code::Cancelled, None) => {
            Error::AgentUnavailable { socket: socket.to_path_buf(), reason: status.message().to_string() }
        }
        (_, Some(kind)) => Error::Agent { op, kind, message: status.message().to_string() },
        (code, None) => Error::Agent {
            op,
            kind: ErrorKind::Core(ckpt_core::ErrorKind::InvalidInput),
            message: format!("{code:?}: {}", status.message()),
        },
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_survive_the_wire() {
        let errors = [
            Error::NoCheckpoint { job: "j".into(), store: "file:///x".into() },
            Error::ArenaFull { reason: "no room".into() },
            Error::Core(ckpt_core::Error::StateMismatch { step: 3, problems: vec!["`w`: shape".into()] }),
            Error::Config { what: "slots".into(), reason: "0".into() },
        ];
        for e in errors {
            let back = from_status(Path::new("/s"), "load", to_status(&e));
            assert_eq!(back.kind(), e.kind(), "{e} came back as {back}");
            assert!(back.to_string().contains(&e.to_string()), "{back} lost the message of {e}");
        }
    }

    #[test]
    fn transport_failures_are_agent_unavailable() {
        let back = from_status(Path::new("/run/agent.sock"), "save", Status::unavailable("connection reset"));
        assert_eq!(back.kind(), ErrorKind::AgentUnavailable);
        assert!(back.to_string().contains("/run/agent.sock"));
    }
}
