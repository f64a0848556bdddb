//! Facts about the machine a benchmark ran on, printed with every result: numbers without the
//! file system and core count behind them cannot be compared.

use std::path::{Path, PathBuf};

/// The mount that holds a directory, from `/proc/mounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Device or source (`/dev/nvme0n1p2`, `tmpfs`).
    pub source: String,
    /// Where it is mounted.
    pub point: PathBuf,
    /// File system type (`ext4`, `xfs`, `tmpfs`, `nfs4`, ...).
    pub fs_type: String,
}

impl Mount {
    /// Whether the file system keeps its data in memory, so that "cold" reads are still
    /// memory reads.
    pub fn memory_backed(&self) -> bool {
        matches!(self.fs_type.as_str(), "tmpfs" | "ramfs" | "hugetlbfs")
    }
}

/// The mount holding `dir` (which must be canonical): the longest mount point that contains it.
/// Later entries win ties, as the last mount over a point hides the earlier ones.
pub fn mount_of(dir: &Path) -> Option<Mount> {
    let text = std::fs::read_to_string("/proc/mounts").ok()?;
    mount_in(&text, dir)
}

fn mount_in(mounts: &str, dir: &Path) -> Option<Mount> {
    let mut best: Option<Mount> = None;
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(source), Some(point), Some(fs_type)) = (f.next(), f.next(), f.next()) else { continue };
        let point = PathBuf::from(unescape(point));
        if !dir.starts_with(&point) {
            continue;
        }
        if best.as_ref().is_none_or(|b| point.as_os_str().len() >= b.point.as_os_str().len()) {
            best = Some(Mount { source: unescape(source), point, fs_type: fs_type.to_string() });
        }
    }
    best
}

/// `/proc/mounts` writes space, tab, newline and backslash as octal escapes.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// CPU model name from `/proc/cpuinfo`.
pub fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

/// A `/proc/meminfo` value in bytes (`MemTotal`, `MemAvailable`).
pub fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.split(':').next() == Some(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Cores this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_and_latest_mount_wins() {
        let mounts = "/dev/vda / ext4 rw 0 0\n\
                      tmpfs /tmp tmpfs rw 0 0\n\
                      /dev/vdb /work/my\\040dir xfs rw 0 0\n\
                      tmpfs /tmp tmpfs rw,size=1g 0 0\n";
        let m = mount_in(mounts, Path::new("/work/my dir/x")).unwrap();
        assert_eq!((m.fs_type.as_str(), m.point.as_path()), ("xfs", Path::new("/work/my dir")));
        assert_eq!(mount_in(mounts, Path::new("/work/other")).unwrap().fs_type, "ext4");
        assert_eq!(mount_in(mounts, Path::new("/tmpx")).unwrap().fs_type, "ext4", "not a path prefix");
        let tmp = mount_in(mounts, Path::new("/tmp/a")).unwrap();
        assert!(tmp.memory_backed());
    }
}
