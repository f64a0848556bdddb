//! The one place where isolator errors become gRPC statuses (and back, for the link).

use tonic::{Code, Status};

use crate::{Error, ErrorKind};

/// The gRPC status for an error of the isolator's handlers.
pub fn to_status(e: &Error) -> Status {
    let code = match e.kind() {
        ErrorKind::InvalidRequest | ErrorKind::Config => Code::InvalidArgument,
        ErrorKind::UnknownJob => Code::NotFound,
        ErrorKind::Stale => Code::FailedPrecondition,
        ErrorKind::NotLeader | ErrorKind::Cluster => Code::Unavailable,
        ErrorKind::Core(ckpt_core::ErrorKind::Conflict) => Code::AlreadyExists,
        ErrorKind::Core(ckpt_core::ErrorKind::InvalidInput) => Code::InvalidArgument,
        ErrorKind::Core(ckpt_core::ErrorKind::Transient | ckpt_core::ErrorKind::Timeout) => Code::Unavailable,
        _ => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// The error for a status the isolator answered to `call` (used by the agent-side link).
pub fn from_status(url: &str, call: &str, s: &Status) -> Error {
    let class = match s.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            return Error::IsolatorUnavailable { url: url.to_string(), reason: format!("{call}: {}", s.message()) };
        }
        Code::FailedPrecondition => ErrorKind::Stale,
        Code::NotFound => ErrorKind::UnknownJob,
        Code::Unauthenticated | Code::PermissionDenied => ErrorKind::Config,
        _ => ErrorKind::InvalidRequest,
    };
    Error::IsolatorRefused { call: call.to_string(), class, message: s.message().to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_and_hostile_map_to_distinct_codes_and_back() {
        let stale = Error::StaleGeneration { job: "j".into(), got: 1, current: 2 };
        let s = to_status(&stale);
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(from_status("u", "heartbeat", &s).kind(), ErrorKind::Stale);
        let bad = Error::InvalidRequest { what: "rank".into(), reason: "9 >= 4".into() };
        assert_eq!(to_status(&bad).code(), Code::InvalidArgument);
        assert_eq!(to_status(&Error::UnknownJob { job: "x".into() }).code(), Code::NotFound);
        assert_eq!(to_status(&Error::NotLeader { holder: "b".into() }).code(), Code::Unavailable);
        assert_eq!(from_status("u", "vote", &Status::unavailable("x")).kind(), ErrorKind::IsolatorUnavailable);
    }
}
