//! Follows a growing text file (`tail -F`): returns the complete lines appended since the last
//! read, survives truncation and replacement (log rotation), and caps line length and bytes per
//! read so a runaway writer cannot make a reporter buffer without bound. Blocking I/O: callers
//! run it on a blocking thread.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Longest line kept; the rest of a longer line is dropped (the evidence stays readable).
pub(crate) const MAX_LINE: usize = 16 * 1024;
/// Most bytes consumed per [`Tail::read_lines`] call.
const MAX_READ: usize = 4 << 20;

/// Where a new [`Tail`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// At the current end: only lines appended from now on (files that existed at start-up,
    /// whose old faults are not news).
    End,
    /// At the beginning (a file that appeared after start-up).
    Beginning,
}

#[derive(Debug)]
pub(crate) struct Tail {
    path: PathBuf,
    file: Option<File>,
    offset: u64,
    ino: u64,
    partial: Vec<u8>,
    stream: bool,
}

impl Tail {
    /// Opens `path`; a FIFO or character device is read as a stream (no seeking).
    pub(crate) fn open(path: &Path, start: Start) -> std::io::Result<Tail> {
        let file = open_nonblocking(path)?;
        let meta = file.metadata()?;
        let stream = !meta.is_file();
        let mut t =
            Tail { path: path.to_owned(), offset: 0, ino: meta.ino(), partial: Vec::new(), stream, file: Some(file) };
        if start == Start::End && !stream {
            t.offset = meta.len();
        }
        Ok(t)
    }

    /// The complete lines appended since the last call (without their newlines).
    pub(crate) fn read_lines(&mut self) -> std::io::Result<Vec<String>> {
        if !self.stream {
            self.follow_rotation()?;
        }
        let Some(file) = self.file.as_mut() else { return Ok(Vec::new()) };
        if !self.stream {
            file.seek(SeekFrom::Start(self.offset))?;
        }
        let mut buf = vec![0u8; 64 * 1024];
        let mut lines = Vec::new();
        let mut total = 0usize;
        while total < MAX_READ {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            total += n;
            self.offset += n as u64;
            for &b in &buf[..n] {
                if b == b'\n' {
                    lines.push(String::from_utf8_lossy(&self.partial).trim_end_matches('\r').to_owned());
                    self.partial.clear();
                } else if self.partial.len() < MAX_LINE {
                    self.partial.push(b);
                }
            }
        }
        Ok(lines)
    }

    /// Reopens the path when the file was replaced, and rewinds when it was truncated.
    fn follow_rotation(&mut self) -> std::io::Result<()> {
        match std::fs::metadata(&self.path) {
            Ok(meta) if meta.ino() != self.ino => {
                self.file = Some(open_nonblocking(&self.path)?);
                self.ino = meta.ino();
                self.offset = 0;
                self.partial.clear();
            }
            Ok(meta) if meta.len() < self.offset => {
                self.offset = 0;
                self.partial.clear();
            }
            Ok(_) => {}
            // Removed: keep reading the open file until a new one appears.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

/// Opens for reading without blocking: a FIFO without a writer opens at once, and reads of a
/// FIFO or `/dev/kmsg` return `WouldBlock` instead of parking the thread (the loop must see
/// shutdown).
pub(crate) fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn follows_appends_truncation_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, "old line\n").unwrap();
        let mut t = Tail::open(&p, Start::End).unwrap();
        assert!(t.read_lines().unwrap().is_empty());
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"one\ntw").unwrap();
        assert_eq!(t.read_lines().unwrap(), ["one"]);
        f.write_all(b"o\r\n").unwrap();
        assert_eq!(t.read_lines().unwrap(), ["two"]);
        std::fs::write(&p, "x\n").unwrap(); // truncate + rewrite, same inode
        assert_eq!(t.read_lines().unwrap(), ["x"]);
        std::fs::rename(&p, dir.path().join("log.1")).unwrap();
        std::fs::write(&p, "fresh\n").unwrap();
        assert_eq!(t.read_lines().unwrap(), ["fresh"]);
        let mut t = Tail::open(&p, Start::Beginning).unwrap();
        assert_eq!(t.read_lines().unwrap(), ["fresh"]);
    }

    #[test]
    fn caps_long_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, "").unwrap();
        let mut t = Tail::open(&p, Start::End).unwrap();
        std::fs::write(&p, format!("{}\nok\n", "a".repeat(MAX_LINE * 3))).unwrap();
        let lines = t.read_lines().unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), MAX_LINE);
        assert_eq!(lines[1], "ok");
    }
}
