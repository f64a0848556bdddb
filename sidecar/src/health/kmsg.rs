//! Kernel-log reporter: `NVRM: Xid` lines. The kernel log sees every XID, including those NVML
//! does not deliver as events (79, 119, 120 arrive there first or only). It reads `/dev/kmsg`
//! (one record per `read`, `pri,seq,ts,flags;message`) or, for drills and tests, tails a regular
//! file or FIFO of plain lines or kmsg records.
//!
//! Reads are non-blocking on a dedicated thread that polls, so shutdown is seen within one poll
//! interval and no async task ever blocks on the kernel.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::controller::{Metrics, ReporterState, StatusBoard};
use super::finding::{Finding, Source};
use super::pci::PciMap;
use super::tail::{Start, Tail};

/// The reporter's name in status and metrics.
pub(crate) const NAME: &str = "kmsg";

/// One parsed `NVRM: Xid` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XidLine {
    /// The PCI address as printed (`0000:3b:00`), normalised when it parses.
    pub pci: Option<String>,
    /// The XID.
    pub xid: u32,
    /// `pid=` when present and numeric.
    pub pid: Option<u32>,
    /// `name=` when present.
    pub name: Option<String>,
    /// The message from `NVRM:` on, as evidence.
    pub message: String,
}

/// Strips a `/dev/kmsg` record header (`pri,seq,ts_usec,flags;`) or a dmesg timestamp
/// (`[  123.456789] `) and returns the message.
pub fn strip_header(line: &str) -> &str {
    let line = line.trim_end();
    if let Some((head, msg)) = line.split_once(';') {
        let mut fields = head.split(',');
        let numeric = |f: Option<&str>| f.is_some_and(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()));
        if numeric(fields.next()) && numeric(fields.next()) && numeric(fields.next()) {
            return msg;
        }
    }
    if let Some(rest) = line.strip_prefix('[') {
        if let Some((ts, msg)) = rest.split_once(']') {
            if ts.trim().bytes().all(|b| b.is_ascii_digit() || b == b'.') {
                return msg.trim_start();
            }
        }
    }
    line
}

/// Parses a kernel-log line (kmsg record, dmesg or journal line, or bare message) into an XID.
/// Accepts `NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python, text` and the older
/// `NVRM: Xid (0000:3b:00): 13, text`. Anything else is `None`, never a panic.
pub fn parse_xid(line: &str) -> Option<XidLine> {
    let msg = strip_header(line);
    let at = msg.find("NVRM: Xid")?;
    let message = msg[at..].trim().to_owned();
    let rest = msg[at + "NVRM: Xid".len()..].trim_start();
    let rest = rest.strip_prefix('(')?;
    let (addr, rest) = rest.split_once(')')?;
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let xid: u32 = rest.get(..digits)?.parse().ok()?;
    let tail = rest[digits..].trim_start_matches(',').trim_start();
    let mut pid = None;
    let mut name = None;
    for field in tail.splitn(3, ", ") {
        if let Some(p) = field.strip_prefix("pid=") {
            pid = p.trim_matches('\'').parse().ok();
        } else if let Some(n) = field.strip_prefix("name=") {
            name = Some(n.to_owned());
        }
    }
    Some(XidLine { pci: super::pci::normalize(addr), xid, pid, name, message })
}

/// Parses an NVSwitch `SXid` line (`nvidia-nvswitch3: SXid (PCI:0000:05:00.0): 24007, Fatal,
/// Link 44 ...`) into its finding kind (`nvswitch-fatal` or `nvswitch-nonfatal`) and the message
/// as evidence. A fatal SXid takes the node's NVLink fabric down (NVIDIA Fabric Manager guide).
pub fn parse_sxid(line: &str) -> Option<(&'static str, String)> {
    let msg = strip_header(line);
    let at = msg.find("SXid (")?;
    let rest = msg[at..].split_once("): ")?.1;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let severity = rest[digits..].trim_start_matches(',').trim_start();
    let kind = if severity.starts_with("Fatal") {
        "nvswitch-fatal"
    } else if severity.starts_with("Non-fatal") {
        "nvswitch-nonfatal"
    } else {
        return None;
    };
    let start = msg[..at].rfind("nvidia-nvswitch").unwrap_or(at);
    Some((kind, msg[start..].trim().to_owned()))
}

/// Where kernel-log lines come from.
#[derive(Debug)]
enum Input {
    /// `/dev/kmsg`: one record per read.
    Kmsg(File),
    /// A regular file or FIFO, tailed line by line.
    Lines(Tail),
}

impl Input {
    fn open(path: &Path, start: Start) -> std::io::Result<Input> {
        use std::os::unix::fs::FileTypeExt;
        let meta = std::fs::metadata(path)?;
        if meta.file_type().is_char_device() {
            let mut f = super::tail::open_nonblocking(path)?;
            // Skip the ring buffer's history: faults from before start-up were handled then.
            f.seek(SeekFrom::End(0))?;
            Ok(Input::Kmsg(f))
        } else {
            Ok(Input::Lines(Tail::open(path, start)?))
        }
    }

    /// The lines available now (possibly none).
    fn read(&mut self, path: &Path) -> std::io::Result<Vec<String>> {
        match self {
            Input::Lines(t) => t.read_lines(),
            Input::Kmsg(f) => {
                let mut out = Vec::new();
                let mut buf = vec![0u8; 16 * 1024];
                for _ in 0..4096 {
                    match f.read(&mut buf) {
                        Ok(0) => break,
                        // A record may carry dictionary lines (` SUBSYSTEM=pci`) after its message.
                        Ok(n) => out.push(String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or("").to_owned()),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                            tracing::warn!(path = %path.display(), "kernel log records were overwritten before they were read; some lines are lost");
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(out)
            }
        }
    }
}

/// The one log line for an unreadable kernel log, naming the capability to add.
pub(crate) fn open_error_detail(path: &Path, e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => format!(
            "cannot read {}: permission denied; the kernel-log reporter needs CAP_SYSLOG (add it to the agent container's securityContext.capabilities.add) or kernel.dmesg_restrict=0, and a device cgroup that lets the container open the device (a device plugin that hands out /dev/kmsg, or the runtime's allowed devices; see docs/HEALTH.md)",
            path.display()
        ),
        Some(libc::ENOENT) => format!(
            "cannot read {}: no such device in this container; mount the host's /dev/kmsg read-only (the webhook does unless the pod sets ckptd.io/kmsg: \"false\")",
            path.display()
        ),
        _ => format!("cannot read {}: {e}", path.display()),
    }
}

/// Opens the kernel log now (so lines written after `Health::start` returns are seen) and starts
/// the reader thread. `None` when it cannot run; the status board then says why.
pub(crate) fn spawn(
    path: PathBuf,
    poll: Duration,
    tx: mpsc::Sender<Finding>,
    board: Arc<StatusBoard>,
    metrics: Metrics,
    pci: PciMap,
    shutdown: CancellationToken,
) -> std::io::Result<Option<std::thread::JoinHandle<()>>> {
    // A drill file that does not exist yet is read from its start once it appears.
    let mut input = match Input::open(&path, Start::End) {
        Ok(i) => Some(i),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !path.starts_with("/dev") => {
            tracing::info!(reporter = NAME, path = %path.display(), "kernel-log file does not exist yet; waiting for it");
            None
        }
        Err(e) => {
            let detail = open_error_detail(&path, &e);
            tracing::warn!(reporter = NAME, "{detail}; kernel-log XIDs are not watched");
            board.set(NAME, ReporterState::Unavailable, detail);
            metrics.set_enabled(NAME, false);
            return Ok(None);
        }
    };
    board.set(NAME, ReporterState::Enabled, format!("reading {}", path.display()));
    metrics.set_enabled(NAME, true);
    let handle = std::thread::Builder::new().name("ckptd-health-kmsg".into()).spawn(move || {
        let _span = tracing::info_span!("health", task = "health-kmsg").entered();
        let mut lines_seen: u64 = 0;
        let mut xids: u64 = 0;
        while !shutdown.is_cancelled() {
            if input.is_none() {
                input = Input::open(&path, Start::Beginning).ok();
            }
            let Some(current) = input.as_mut() else {
                std::thread::sleep(poll);
                continue;
            };
            let lines = match current.read(&path) {
                Ok(l) => l,
                Err(e) => {
                    let detail = open_error_detail(&path, &e);
                    tracing::warn!(reporter = NAME, "{detail}; the kernel-log reporter stops");
                    board.set(NAME, ReporterState::Unavailable, detail);
                    metrics.set_enabled(NAME, false);
                    return;
                }
            };
            if lines.is_empty() {
                std::thread::sleep(poll);
                continue;
            }
            lines_seen += lines.len() as u64;
            for line in &lines {
                let f = if let Some(x) = parse_xid(line) {
                    let gpu = x.pci.as_deref().and_then(|p| pci.gpu(p));
                    Finding::new(Source::Kmsg, format!("xid-{}", x.xid), x.message).with_pci(x.pci).with_gpu(gpu)
                } else if let Some((kind, message)) = parse_sxid(line) {
                    Finding::new(Source::Kmsg, kind, message)
                } else {
                    continue;
                };
                xids += 1;
                if tx.blocking_send(f).is_err() {
                    return;
                }
            }
            board.sample(NAME, format!("{lines_seen} lines read, {xids} XID/SXid lines"));
        }
    })?;
    Ok(Some(handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kmsg_records_dmesg_and_plain_lines() {
        let x = parse_xid(
            "3,1523,98765432,-;NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python3, GPU has fallen off the bus.",
        )
        .unwrap();
        assert_eq!(x.xid, 79);
        assert_eq!(x.pci.as_deref(), Some("0000:3b:00.0"));
        assert_eq!(x.pid, Some(1234));
        assert_eq!(x.name.as_deref(), Some("python3"));
        assert!(x.message.starts_with("NVRM: Xid (PCI:0000:3b:00): 79") && x.message.ends_with("bus."));

        let x = parse_xid("[ 8123.442817] NVRM: Xid (PCI:0000:5e:00): 94, pid='<unknown>', name=<unknown>, Contained: CE User Channel (0x9). RST: No, D-RST: No").unwrap();
        assert_eq!((x.xid, x.pid, x.name.as_deref()), (94, None, Some("<unknown>")));

        let x = parse_xid(
            "Nov 28 18:01:02 node-a kernel: NVRM: Xid (0000:03:00): 13, Graphics Exception: ESR 0x404600=0x80000002",
        )
        .unwrap();
        assert_eq!((x.xid, x.pci.as_deref()), (13, Some("0000:03:00.0")));
    }

    #[test]
    fn parses_nvswitch_sxids() {
        let (k, m) = parse_sxid("6,2223,8123600000,-;nvidia-nvswitch3: SXid (PCI:0000:05:00.0): 12028, Non-fatal, Link 32 egress non-posted PRIV error (First)").unwrap();
        assert_eq!(k, "nvswitch-nonfatal");
        assert!(m.starts_with("nvidia-nvswitch3: SXid"), "{m}");
        let (k, _) = parse_sxid("[ 99.1] nvidia-nvswitch0: SXid (PCI:0000:06:00.0): 24007, Fatal, Link 44 sourcetrack TCEN0 crumbstore ECC DBE Error").unwrap();
        assert_eq!(k, "nvswitch-fatal");
        assert_eq!(parse_sxid("nvidia-nvswitch0: SXid (PCI:0000:06:00.0): , Fatal"), None);
        assert_eq!(parse_sxid("nvidia-nvswitch0: SXid (PCI:0000:06:00.0): 24007, Severity unknown"), None);
        assert_eq!(parse_sxid("NVRM: Xid (PCI:0000:3b:00): 79, pid=1, name=x, GPU has fallen off the bus."), None);
    }

    #[test]
    fn rejects_non_xid_and_malformed_lines() {
        for l in [
            "",
            "4,100,200,-;usb 1-1: new high-speed USB device",
            "NVRM: Xid",
            "NVRM: Xid (PCI:0000:3b:00)",
            "NVRM: Xid (PCI:0000:3b:00): , pid=1",
            "NVRM: Xid (PCI:0000:3b:00): 99999999999, pid=1",
            "NVRM: GPU at PCI:0000:3b:00: GPU-8a2b3c4d-0000-1111-2222-333344445555",
            "\u{0}\u{ff};;;,,,",
        ] {
            assert_eq!(parse_xid(l), None, "{l:?}");
        }
        assert_eq!(parse_xid("NVRM: Xid (PCI:garbage): 31, pid=1").map(|x| (x.xid, x.pci)), Some((31, None)));
    }

    /// The `/dev/kmsg` path for real: skips the ring buffer's history, reads one record per
    /// `read`, and sees a benign marker written after opening. Needs root (or CAP_SYSLOG and write
    /// access to /dev/kmsg), so it runs only with `CKPTD_KMSG_TESTS=1`.
    #[test]
    fn reads_records_from_dev_kmsg() {
        if std::env::var(crate::env::ENV_KMSG_TESTS).as_deref() != Ok("1") {
            return;
        }
        let path = Path::new("/dev/kmsg");
        let mut input = Input::open(path, Start::End).unwrap();
        assert!(matches!(input, Input::Kmsg(_)));
        let marker = format!("ckptd-kmsg-selftest {}", std::process::id());
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, format!("<6>{marker}\n").as_bytes()))
            .unwrap();
        let mut seen = Vec::new();
        for _ in 0..100 {
            seen.extend(input.read(path).unwrap());
            if seen.iter().any(|r| strip_header(r) == marker) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("marker not read back; records: {seen:?}");
    }

    #[test]
    fn permission_error_names_cap_syslog() {
        let e = std::io::Error::from_raw_os_error(libc::EPERM);
        let d = open_error_detail(Path::new("/dev/kmsg"), &e);
        assert!(d.contains("CAP_SYSLOG") && d.contains("/dev/kmsg"), "{d}");
    }
}
