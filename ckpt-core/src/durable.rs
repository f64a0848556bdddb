//! Durable file-system operations, all in one place so that no call site forgets a directory
//! fsync.
//!
//! On POSIX, data survives a crash only after `fsync` of the file, and a new name survives only
//! after `fsync` of the directory that holds it. [`publish`] (create-only) and
//! [`publish_replace`] do the full sequence: write to a temporary name in the same directory,
//! fsync it, link or rename it to its final name, fsync the directory.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::store::layout::TMP_MARKER;

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary name next to `path`, unique within this host.
pub fn tmp_path(path: &Path) -> PathBuf {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!("{TMP_MARKER}{}-{n}-{nanos}", std::process::id()));
    path.with_file_name(name)
}

/// The directory that holds `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Creates the parent directories of `path`, fsyncing each new one's parent so that the
/// directories themselves survive a crash.
pub fn create_parent_dirs(path: &Path) -> Result<()> {
    let parent = parent_dir(path);
    if parent.is_dir() {
        return Ok(());
    }
    create_parent_dirs(parent)?;
    match std::fs::create_dir(parent) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(Error::io("create directory", parent, e)),
    }
    sync_dir(parent_dir(parent))
}

/// fsyncs a directory, making the names in it durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(|e| Error::io("open directory", dir, e))?;
    d.sync_all().map_err(|e| Error::io("fsync directory", dir, e))
}

/// Opens a new temporary file next to `path` for writing.
pub fn create_tmp(path: &Path) -> Result<(File, PathBuf)> {
    create_parent_dirs(path)?;
    let tmp = tmp_path(path);
    let f = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
    Ok((f, tmp))
}

/// Makes a fully written temporary file durable under its final name, failing with
/// `AlreadyExists` (kind `Conflict`) when the name is taken. Exactly one of several racing
/// publishers of the same name wins, on local and NFS file systems alike (`link(2)` is atomic).
/// The temporary file is removed in every case.
pub fn publish(file: File, tmp: &Path, path: &Path) -> Result<()> {
    let result = (|| {
        file.sync_all().map_err(|e| Error::io("fsync", tmp, e))?;
        drop(file);
        std::fs::hard_link(tmp, path).map_err(|e| Error::io("link", path, e))
    })();
    let _ = std::fs::remove_file(tmp);
    result?;
    sync_dir(parent_dir(path))
}

/// Like [`publish`] but replaces an existing file (an export that is written again).
pub fn publish_replace(file: File, tmp: &Path, path: &Path) -> Result<()> {
    let result = (|| {
        file.sync_all().map_err(|e| Error::io("fsync", tmp, e))?;
        drop(file);
        std::fs::rename(tmp, path).map_err(|e| Error::io("rename", path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result?;
    sync_dir(parent_dir(path))
}

/// Writes `bytes` to `path` durably and create-only (see [`publish`]).
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    let (mut f, tmp) = create_tmp(path)?;
    if let Err(e) = f.write_all(bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io("write", &tmp, e));
    }
    publish(f, &tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_file_names_live_in_the_current_directory() {
        assert_eq!(parent_dir(Path::new("plain-name")), Path::new("."));
        assert_eq!(parent_dir(Path::new("a/b")), Path::new("a"));
        assert_eq!(parent_dir(Path::new("/x")), Path::new("/"));
    }

    #[test]
    fn create_only_has_one_winner_and_leaves_no_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/MANIFEST");
        write_new(&path, b"one").unwrap();
        let e = write_new(&path, b"two").unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Conflict);
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        let names: Vec<_> =
            std::fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("MANIFEST")]);
    }
}
