//! Progress bars for long operations, drawn on stderr and only when stdout is a terminal, so that
//! scripts and pipes see exactly the report and nothing else.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` units (steps, ranks), labelled `what`; hidden unless `enabled`.
pub(super) fn bar(enabled: bool, len: u64, what: &str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::new(len).with_style(style).with_message(what.to_string())
}

/// A bar of `len` bytes, labelled `what`; hidden unless `enabled`.
pub(super) fn bytes(enabled: bool, len: u64, what: &str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template("{msg:>12} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {eta}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::new(len).with_style(style).with_message(what.to_string())
}

/// A spinner for one long call whose progress the engine does not report; hidden unless
/// `enabled`.
pub(super) fn spinner(enabled: bool, what: &str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let style =
        ProgressStyle::with_template("{spinner} {msg} {elapsed}").unwrap_or_else(|_| ProgressStyle::default_spinner());
    let pb = ProgressBar::new_spinner().with_style(style).with_message(what.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}
