//! The per-pod agent (issue #4): serves trainers over a Unix socket, persists their sealed arena
//! slots, keeps the memory tier and flushes on trainer failure.

/// Command-line flags of `ckptd agent`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {}

/// Runs the agent until SIGTERM.
pub fn run(_args: AgentArgs) -> crate::Result<()> {
    Err(crate::Error::Config { what: "ckptd agent".into(), reason: "not built yet (issue #4)".into() })
}
