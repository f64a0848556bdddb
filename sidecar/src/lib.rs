//! ckptd: the sidecar daemon, the trainer-side client, health monitoring, the node isolator, the
//! admission webhook and the command-line tools. Everything durable goes through `ckpt-core`.

/// The version of this build, shown by `--version` and reported to peers.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
