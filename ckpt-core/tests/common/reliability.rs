//! The reliability tally: tests that kill processes, damage checkpoints, inject store faults or
//! send hostile input append what they did to the file named by [`LOG_ENV`], and
//! `scripts/test.sh` prints one summary line per class. Shared by the `ckptd` tests too (through
//! `#[path]`), so the format is written once.

use std::io::Write;

/// The file to append to; unset outside `scripts/test.sh`, and then nothing is recorded.
pub const LOG_ENV: &str = "CKPTD_RELIABILITY_LOG";

/// Records `count` events of `class` (`sigkill`, `corruption`, `store-fault`, `hostile`), with
/// `what` naming their kind, as one line `<class>\t<what>\t<count>`.
pub fn record(class: &str, what: &str, count: u64) {
    let Some(path) = std::env::var_os(LOG_ENV) else { return };
    let line = format!("{class}\t{what}\t{count}\n");
    // One write of a short line in append mode: concurrent tests never interleave inside it.
    match std::fs::OpenOptions::new().create(true).append(true).open(&path) {
        Ok(mut f) => f.write_all(line.as_bytes()).unwrap_or_else(|e| panic!("cannot append to {path:?}: {e}")),
        Err(e) => panic!("cannot open the reliability log {path:?}: {e}"),
    }
}
