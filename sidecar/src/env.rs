//! Every environment variable ckptd reads, in one place: the trainer library, the agent, the CLI
//! and the webhook (which sets them in the pods it mutates) all name them through these constants.

/// The agent's Unix socket; when set, the trainer's checkpointer runs in sidecar mode.
pub const ENV_SOCKET: &str = "CKPTD_SOCKET";
/// The store URL.
pub const ENV_STORE: &str = "CKPTD_STORE";
/// The arena directory (default `/dev/shm/ckptd`).
pub const ENV_ARENA_DIR: &str = "CKPTD_ARENA_DIR";

/// The value of `key`, unless it is unset or empty.
pub fn nonempty(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}
