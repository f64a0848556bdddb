//! The node isolator (issue #6): fault intake from agents, global commit, the job state machine,
//! Kubernetes node isolation and coordinated restore.

/// Command-line flags of `ckptd isolator`.
#[derive(Debug, Clone, clap::Args)]
pub struct IsolatorArgs {}

/// Runs the isolator until SIGTERM.
pub fn run(_args: IsolatorArgs) -> crate::Result<()> {
    Err(crate::Error::Config { what: "ckptd isolator".into(), reason: "not built yet (issue #6)".into() })
}
