//! Starting a `ckptd agent` process in a test: waiting until it listens on its socket.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `agent` (a `ckptd agent` command line) with its stderr in `log`, and waits until it
/// listens on `socket` (see [`wait_listening`]).
pub fn start(agent: &mut Command, log: &Path, socket: &Path, patience: Duration) -> Child {
    let mut child =
        agent.stdout(Stdio::null()).stderr(std::fs::File::create(log).unwrap()).spawn().expect("start ckptd agent");
    wait_listening(&mut child, log, socket, patience);
    child
}

/// Waits until the agent `child` accepts connections on `socket`; panics with its log (`log`) when
/// it exits first, or after `patience`.
pub fn wait_listening(child: &mut Child, log: &Path, socket: &Path, patience: Duration) {
    let started = Instant::now();
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("agent exited with {status}: {}", std::fs::read_to_string(log).unwrap_or_default());
        }
        assert!(started.elapsed() < patience, "the agent never listened on {}", socket.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}
