//! ckptd: the sidecar daemon, the trainer-side client, health monitoring, the node isolator, the
//! admission webhook and the command-line tools. Everything durable goes through `ckpt-core`.

#[cfg(feature = "server")]
pub mod agent;
#[cfg(feature = "cli")]
pub mod cli;
pub mod client;
pub mod env;
#[cfg(feature = "server")]
pub mod gate;
#[cfg(feature = "server")]
pub mod health;
#[cfg(feature = "server")]
pub mod http;
#[cfg(feature = "server")]
pub mod isolator;
pub mod layout;
pub mod resize;
#[cfg(feature = "server")]
pub mod webhook;

pub mod error;
pub mod rpc;
pub mod text;

pub use error::{Error, ErrorKind, Result};

/// The version of this build, shown by `--version` and reported to peers.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
