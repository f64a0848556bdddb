//! The mutating admission webhook (issue #7): injects the agent into training pods that opt in.

/// Command-line flags of `ckptd webhook`.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {}

/// Runs the webhook until SIGTERM.
pub fn run(_args: WebhookArgs) -> crate::Result<()> {
    Err(crate::Error::Config { what: "ckptd webhook".into(), reason: "not built yet (issue #7)".into() })
}
