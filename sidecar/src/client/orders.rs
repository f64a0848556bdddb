//! What the trainer process does with the agent's restart and stop orders when the training
//! script does not act on them.
//!
//! A healthy rank of a job whose peer died is blocked inside a collective (or holds the GIL in a
//! long kernel launch): no Python code of it runs, so it never polls
//! [`Checkpointer::take_restore_order`](super::Checkpointer::take_restore_order). The client
//! library's own native thread (the session's event task, which needs no Python) acts instead:
//! after a grace period in which the script may take the order itself, it ends the process with a
//! distinct exit code, and the launcher starts it again — torchrun's elastic agent
//! (`--max-restarts`) or the container's restart policy. The restarted process attaches, loads
//! the step the job restarts from, and continues. docs/OPERATIONS.md lists the codes for
//! operators.

use std::time::Duration;

use crate::env;
use crate::error::{Error, Result};

/// Exit code of a trainer process ended by a restart order (the job restores an earlier step):
/// restart it. Above 192, so never a shell's `128 + signal`, and at least 128, which Kubeflow's
/// `restartPolicy: ExitCode` treats as retryable.
pub const EXIT_RESTART: i32 = 211;
/// Exit code of a trainer process ended by a stop order (its node is being isolated): the pod is
/// rescheduled on another node; restarting it in place is harmless but pointless.
pub const EXIT_STOP: i32 = 212;
/// How long the script has to take an order before the library exits the process.
pub const DEFAULT_RESTART_GRACE: Duration = Duration::from_secs(3);
/// The longest grace accepted: an order must end a blocked worker within minutes, not hours.
const MAX_RESTART_GRACE: Duration = Duration::from_secs(3600);

/// Whether, and when, the library ends the process on an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OrderExit {
    /// From `CKPTD_RESTART_GRACE` (seconds, or `off`), else [`DEFAULT_RESTART_GRACE`].
    #[default]
    FromEnv,
    /// Exit when the script has not taken the order within this time.
    After(Duration),
    /// Never exit: the script polls `take_restore_order` / `stop_requested` itself.
    Never,
}

impl OrderExit {
    /// The grace period, or `None` for never; reads the environment through `lookup`.
    pub(crate) fn resolve(self, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Option<Duration>> {
        match self {
            OrderExit::After(d) if d <= MAX_RESTART_GRACE => Ok(Some(d)),
            OrderExit::After(d) => Err(grace_error(format!("{d:?} is longer than {MAX_RESTART_GRACE:?}"))),
            OrderExit::Never => Ok(None),
            OrderExit::FromEnv => match lookup(env::ENV_RESTART_GRACE) {
                None => Ok(Some(DEFAULT_RESTART_GRACE)),
                Some(v) => parse_grace(&v),
            },
        }
    }
}

fn grace_error(reason: String) -> Error {
    Error::Config { what: env::ENV_RESTART_GRACE.into(), reason }
}

/// `off` (also `never`, `no`, `false`) or a number of seconds.
fn parse_grace(v: &str) -> Result<Option<Duration>> {
    let t = v.trim();
    if ["off", "never", "no", "false"].iter().any(|w| t.eq_ignore_ascii_case(w)) {
        return Ok(None);
    }
    let secs: f64 = t
        .strip_suffix('s')
        .unwrap_or(t)
        .trim()
        .parse()
        .map_err(|_| grace_error(format!("`{t:.32}` is neither a number of seconds (e.g. 3 or 0.5) nor `off`")))?;
    if !(secs.is_finite() && secs >= 0.0 && secs <= MAX_RESTART_GRACE.as_secs_f64()) {
        return Err(grace_error(format!("{secs} s is outside 0..={} s", MAX_RESTART_GRACE.as_secs())));
    }
    Ok(Some(Duration::from_secs_f64(secs)))
}

/// Ends this process at once with `code`, after saying why on standard error.
///
/// `_exit`, not `exit`: the process may be wedged in a collective or a CUDA call, and atexit
/// handlers (NCCL's, CUDA's, Python's) could block on exactly that; nothing of ckptd's needs
/// flushing here (the agent owns every snapshot handed over, and persists the newest sealed one
/// when this session's stream closes).
pub(crate) fn exit_process(code: i32, why: &str) -> ! {
    let line = format!("ckptd: {why}; ending this worker with exit code {code} so that its launcher restarts it\n");
    tracing::error!(code, reason = %why, "ending the trainer process on the agent's order");
    // SAFETY: `write` on fd 2 with a valid buffer and its length; a failed write changes nothing.
    unsafe {
        libc::write(2, line.as_ptr().cast(), line.len());
    }
    // SAFETY: `_exit` takes no pointers and never returns; ending the process without running
    // destructors or atexit handlers is intended (see above).
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(v: Option<&str>) -> Result<Option<Duration>> {
        let v = v.map(str::to_string);
        OrderExit::FromEnv.resolve(&move |_| v.clone())
    }

    #[test]
    fn grace_from_the_environment() {
        assert_eq!(with(None).unwrap(), Some(DEFAULT_RESTART_GRACE));
        assert_eq!(with(Some("0.5")).unwrap(), Some(Duration::from_millis(500)));
        assert_eq!(with(Some(" 2s ")).unwrap(), Some(Duration::from_secs(2)));
        assert_eq!(with(Some("0")).unwrap(), Some(Duration::ZERO));
        assert_eq!(with(Some("OFF")).unwrap(), None);
        for bad in ["soon", "-1", "nan", "1e9", ""] {
            let e = with(Some(bad)).unwrap_err().to_string();
            assert!(e.contains(env::ENV_RESTART_GRACE), "{bad}: {e}");
        }
        assert_eq!(OrderExit::Never.resolve(&|_| Some("1".into())).unwrap(), None);
        assert_eq!(
            OrderExit::After(Duration::from_secs(1)).resolve(&|_| Some("off".into())).unwrap(),
            Some(Duration::from_secs(1))
        );
        assert!(OrderExit::After(Duration::from_secs(7200)).resolve(&|_| None).is_err());
    }

    #[test]
    fn exit_codes_are_distinct_and_never_a_signal_status() {
        assert_ne!(EXIT_RESTART, EXIT_STOP);
        for c in [EXIT_RESTART, EXIT_STOP] {
            assert!((193..=255).contains(&c), "{c} could be read as 128 + a signal number");
        }
    }
}
