//! [`DirWatch`]: being woken when a name appears in a local directory, so that a rank waiting for
//! its step's MANIFEST on a `file://` store learns of the commit when it lands instead of at its
//! next poll.
//!
//! On Linux this is inotify on the step directory (`IN_CREATE` covers the `link(2)` that publishes
//! a MANIFEST, `IN_MOVED_TO` a rename). inotify only reports changes made through this host's
//! kernel: on a network file system (NFS, CPFS, Lustre) another host's commit raises no event. So a
//! watch is only ever a way to wake early, and every caller keeps polling alongside it at a modest
//! interval.

use std::path::Path;
use std::time::Duration;

/// A watch on one directory for new names. Dropping it removes the watch.
#[derive(Debug)]
pub(crate) struct DirWatch {
    #[cfg(target_os = "linux")]
    fd: std::os::fd::OwnedFd,
}

impl DirWatch {
    /// Watches `dir` for names created, linked or moved into it. `None` when the platform has no
    /// inotify or the kernel refuses (no watches left, a file system without support): the caller
    /// then polls only.
    pub(crate) fn new(dir: &Path) -> Option<DirWatch> {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::{FromRawFd, OwnedFd};
            use std::os::unix::ffi::OsStrExt;

            let c_dir = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
            // SAFETY: inotify_init1 takes only flags and returns a new descriptor or -1.
            let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
            if raw < 0 {
                tracing::debug!(dir = %dir.display(), error = %std::io::Error::last_os_error(), "no inotify; polling only");
                return None;
            }
            // SAFETY: `raw` is a descriptor inotify_init1 just returned, owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let mask = libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_ONLYDIR;
            // SAFETY: `fd` is a live inotify descriptor and `c_dir` a NUL-terminated path that
            // outlives the call.
            let wd = unsafe { libc::inotify_add_watch(std::os::fd::AsRawFd::as_raw_fd(&fd), c_dir.as_ptr(), mask) };
            if wd < 0 {
                tracing::debug!(dir = %dir.display(), error = %std::io::Error::last_os_error(), "cannot watch the directory; polling only");
                return None;
            }
            Some(DirWatch { fd })
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = dir;
            None
        }
    }

    /// Waits at most `timeout` for `name` to appear in the directory. `true`: it appeared, or
    /// events were lost (the queue overflowed), so the caller should look; `false`: the time ran
    /// out, or only other names appeared. Never blocks past `timeout`.
    pub(crate) fn wait_for(&self, name: &str, timeout: Duration) -> bool {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;

            let fd = self.fd.as_raw_fd();
            let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
            // SAFETY: `pfd` is one valid pollfd that lives across the call.
            let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
            if ready <= 0 {
                return false;
            }
            // Room for many events at once; u64 elements keep `inotify_event`'s alignment.
            let mut buf = [0u64; 512];
            let mut seen = false;
            loop {
                let cap = std::mem::size_of_val(&buf);
                // SAFETY: `buf` is writable for `cap` bytes and outlives the call.
                let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), cap) };
                let Ok(n) = usize::try_from(n) else { break };
                if n == 0 {
                    break;
                }
                // SAFETY: the kernel wrote `n` initialized bytes at the start of `buf`.
                let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
                seen |= names_event(bytes, name);
            }
            seen
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = name;
            std::thread::sleep(timeout);
            false
        }
    }
}

/// Whether the packed `inotify_event` records in `bytes` name `name`, or say events were lost.
#[cfg(target_os = "linux")]
fn names_event(bytes: &[u8], name: &str) -> bool {
    const HEADER: usize = std::mem::size_of::<libc::inotify_event>();
    let mut at = 0;
    let mut seen = false;
    while let Some(header) = bytes.get(at..at + HEADER) {
        // Fields by offset (wd: i32, mask: u32, cookie: u32, len: u32), native-endian.
        let field = |i: usize| u32::from_ne_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let (mask, len) = (field(4), field(12) as usize);
        let Some(raw_name) = bytes.get(at + HEADER..at + HEADER + len) else { break };
        // The name is NUL-padded to the record's length.
        let end = raw_name.iter().position(|&b| b == 0).unwrap_or(raw_name.len());
        seen |= mask & libc::IN_Q_OVERFLOW != 0 || &raw_name[..end] == name.as_bytes();
        at += HEADER + len;
    }
    seen
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn wakes_for_the_watched_name_only() {
        let dir = tempfile::tempdir().unwrap();
        let w = DirWatch::new(dir.path()).expect("inotify on a local temporary directory");
        // Nothing happened: the wait times out.
        assert!(!w.wait_for("MANIFEST", Duration::from_millis(1)));
        // Another name is not the one waited for.
        std::fs::write(dir.path().join("rank-0.ckpt"), b"x").unwrap();
        assert!(!w.wait_for("MANIFEST", Duration::from_secs(5)));
        // A link into place, as the create-only publish makes it.
        std::fs::write(dir.path().join("MANIFEST.tmp-1"), b"m").unwrap();
        std::fs::hard_link(dir.path().join("MANIFEST.tmp-1"), dir.path().join("MANIFEST")).unwrap();
        assert!(w.wait_for("MANIFEST", Duration::from_secs(5)));
    }

    #[test]
    fn a_missing_directory_cannot_be_watched() {
        let dir = tempfile::tempdir().unwrap();
        assert!(DirWatch::new(&dir.path().join("absent")).is_none());
    }
}
