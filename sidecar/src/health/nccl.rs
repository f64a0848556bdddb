//! NCCL reporter: tails the NCCL debug logs (`NCCL_DEBUG_FILE`, `%h`/`%p` expanded as
//! wildcards) and watches the torch flight-recorder dump directory. It recognises the lines that
//! mean a collective is dead: torch watchdog timeouts and stuck watchdogs, remote peers that went
//! away, `ncclSystemError`/`ncclInternalError`/`ncclRemoteError`, and IB/socket transport errors.
//! It sees them minutes before torch's default 10-minute watchdog kills the job, and each finding
//! carries the raw line.
//!
//! File reads are blocking; every poll runs on the blocking pool.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::controller::{Metrics, ReporterState, StatusBoard};
use super::finding::{Finding, Source};
use super::tail::{Start, Tail};

/// The reporter's name in status and metrics.
pub(crate) const NAME: &str = "nccl";

/// Most log files followed at once.
const MAX_FILES: usize = 256;
/// Most evicted log paths remembered.
const MAX_RETIRED: usize = 16 * 1024;
/// Most bytes of a flight-recorder dump scanned for its summary.
const MAX_DUMP: u64 = 64 << 20;

/// Classifies one NCCL or torch log line; `None` for the many lines that mean nothing is wrong.
/// The most specific match wins: an error code before a peer failure before a transport error.
pub fn classify(line: &str) -> Option<&'static str> {
    let l = line;
    if l.contains("Watchdog caught collective operation timeout")
        || (l.contains("WorkNCCL(") && l.contains("before timing out"))
        || l.contains("Some NCCL operations have failed or timed out")
    {
        return Some("nccl-timeout");
    }
    if l.contains("Heartbeat monitor timed out")
        || l.contains("watchdog got stuck")
        || l.contains("watchdog thread hang")
    {
        return Some("nccl-watchdog-stuck");
    }
    if l.contains("ncclRemoteError") || l.contains("remote process exited or there was a network error") {
        return Some("nccl-remote-error");
    }
    if l.contains("ncclSystemError") || l.contains("unhandled system error") {
        return Some("nccl-system-error");
    }
    if l.contains("ncclInternalError") || l.contains("internal error - please report this issue to the NCCL developers")
    {
        return Some("nccl-internal-error");
    }
    let warn = l.contains("NCCL WARN");
    if warn
        && (l.contains("Connection closed by remote peer")
            || l.contains("Connection reset by peer")
            || l.contains("remote peer")
            || l.contains("peer closed"))
    {
        return Some("nccl-remote-peer");
    }
    if warn
        && (l.contains("NET/IB")
            || l.contains("NET/Socket")
            || l.contains("NET/Plugin")
            || l.contains("ibv_")
            || l.contains("transport/net")
            || l.contains("IBV_WC_"))
    {
        return Some("nccl-net-error");
    }
    None
}

/// The rank a torch line names: `[Rank 3]`, `[PG ID 0 PG GUID 0(default_pg) Rank 3]` or the
/// `[rank3]:` prefix.
pub fn rank_of(line: &str) -> Option<u32> {
    let digits = |s: &str| -> Option<u32> {
        let n = s.bytes().take_while(u8::is_ascii_digit).count();
        s.get(..n)?.parse().ok()
    };
    if let Some(i) = line.find(" Rank ").or_else(|| line.find("[Rank ")) {
        let after = &line[i + 6..];
        if let Some(r) = digits(after) {
            return Some(r);
        }
    }
    let i = line.find("[rank")?;
    digits(&line[i + 5..])
}

/// A summary of a torch flight-recorder dump: its collectives' profiling names (`nccl:all_reduce`)
/// and entry states. The dump is a pickle (or JSON with `TORCH_NCCL_USE_JSON`...), and both keep
/// these strings verbatim, so a byte scan finds them without a pickle parser.
pub fn summarize_dump(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut ops: Vec<String> = Vec::new();
    let mut rest = text.as_ref();
    while let Some(i) = rest.find("nccl:") {
        let name: String =
            rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':').collect();
        rest = &rest[i + 5..];
        if name.len() > 5 {
            ops.push(name);
        }
    }
    let count = |s: &str| text.matches(s).count();
    let last: Vec<&str> = ops.iter().rev().take(3).map(String::as_str).collect();
    format!(
        "{} collectives recorded (scheduled {}, started {}, completed {}); last: {}",
        ops.len(),
        count("scheduled"),
        count("started"),
        count("completed"),
        if last.is_empty() { "none".to_owned() } else { last.join(", ") }
    )
}

/// The torch rank of a dump file (`nccl_trace_rank_3` → 3).
fn dump_rank(path: &Path) -> Option<u32> {
    let name = path.file_name()?.to_str()?;
    let n = name.bytes().rev().take_while(u8::is_ascii_digit).count();
    name.get(name.len() - n..)?.parse().ok()
}

/// NCCL's `NCCL_DEBUG_FILE` placeholders (`%h` host, `%p` pid) as wildcards.
pub(crate) fn glob_of(pattern: &str) -> String {
    pattern.replace("%h", "*").replace("%p", "*")
}

#[derive(Debug)]
struct Dump {
    len: u64,
    mtime: Option<SystemTime>,
    reported: bool,
}

/// What the reporter follows; moved into the blocking pool for each poll.
#[derive(Debug)]
pub(crate) struct Watch {
    patterns: Vec<String>,
    /// The same patterns compiled: a log in the flight-recorder directory (the webhook puts both
    /// in one volume) is a log, never a dump.
    logs: Vec<glob::Pattern>,
    flight_dir: Option<PathBuf>,
    tails: HashMap<PathBuf, Tail>,
    /// Logs followed before and evicted to make room: if they match again they resume at
    /// their end, so old lines are never reported twice.
    retired: HashSet<PathBuf>,
    dumps: HashMap<PathBuf, Dump>,
    lines: u64,
}

impl Watch {
    /// Sets up the watch, taking the current end of existing logs and the existing dumps as
    /// already seen: a restarted agent must not re-report yesterday's timeout.
    pub(crate) fn new(patterns: Vec<String>, flight_dir: Option<PathBuf>) -> Watch {
        let logs = patterns.iter().filter_map(|p| glob::Pattern::new(p).ok()).collect();
        let mut w = Watch {
            patterns,
            logs,
            flight_dir,
            tails: HashMap::new(),
            retired: HashSet::new(),
            dumps: HashMap::new(),
            lines: 0,
        };
        w.discover(Start::End);
        w.scan_dumps(true);
        w
    }

    fn discover(&mut self, start: Start) {
        let patterns = std::mem::take(&mut self.patterns);
        for pattern in &patterns {
            let Ok(paths) = glob::glob(pattern) else { continue };
            for p in paths.filter_map(Result::ok) {
                if self.tails.contains_key(&p) || !p.is_file() {
                    continue;
                }
                if self.tails.len() >= MAX_FILES && !self.evict_one() {
                    continue;
                }
                let from = if self.retired.contains(&p) { Start::End } else { start };
                match Tail::open(&p, from) {
                    Ok(t) => {
                        self.tails.insert(p, t);
                    }
                    Err(e) => tracing::debug!(path = %p.display(), error = %e, "cannot open NCCL log"),
                }
            }
        }
        self.patterns = patterns;
    }

    /// Makes room for a new log by dropping the one written to longest ago (or deleted).
    fn evict_one(&mut self) -> bool {
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let Some(victim) = self.tails.keys().min_by_key(|p| mtime(p)).cloned() else { return false };
        self.tails.remove(&victim);
        if self.retired.len() >= MAX_RETIRED {
            self.retired.clear();
        }
        self.retired.insert(victim);
        true
    }

    fn scan_dumps(&mut self, initial: bool) -> Vec<Finding> {
        let mut out = Vec::new();
        let Some(dir) = &self.flight_dir else { return out };
        let Ok(entries) = std::fs::read_dir(dir) else { return out };
        let mut present = HashSet::new();
        for e in entries.filter_map(Result::ok).take(MAX_FILES) {
            let path = e.path();
            let Ok(meta) = e.metadata() else { continue };
            if !meta.is_file() || self.logs.iter().any(|p| p.matches_path(&path)) {
                continue;
            }
            present.insert(path.clone());
            let (len, mtime) = (meta.len(), meta.modified().ok());
            match self.dumps.get_mut(&path) {
                // New, still being written, or rewritten: report once it holds still for a poll.
                None => {
                    self.dumps.insert(path, Dump { len, mtime, reported: initial });
                    continue;
                }
                Some(d) if d.len != len || d.mtime != mtime => {
                    *d = Dump { len, mtime, reported: false };
                    continue;
                }
                Some(d) if d.reported || len == 0 => continue,
                Some(d) => d.reported = true,
            }
            let mut bytes = Vec::new();
            let read = std::fs::File::open(&path)
                .and_then(|f| std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_DUMP), &mut bytes));
            if let Err(e) = read {
                tracing::debug!(path = %path.display(), error = %e, "cannot read flight-recorder dump");
            }
            out.push(
                Finding::new(
                    Source::Nccl,
                    "nccl-flight-recorder",
                    format!("flight-recorder dump {} ({len} bytes): {}", path.display(), summarize_dump(&bytes)),
                )
                .with_rank(dump_rank(&path)),
            );
        }
        self.dumps.retain(|p, _| present.contains(p));
        out
    }

    /// One poll: new files, new lines, settled dumps.
    pub(crate) fn poll(&mut self) -> Vec<Finding> {
        self.discover(Start::Beginning);
        let mut out = Vec::new();
        for (path, tail) in &mut self.tails {
            let lines = match tail.read_lines() {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "cannot read NCCL log");
                    continue;
                }
            };
            self.lines += lines.len() as u64;
            for line in lines {
                if let Some(kind) = classify(&line) {
                    out.push(Finding::new(Source::Nccl, kind, line.clone()).with_rank(rank_of(&line)));
                }
            }
        }
        out.extend(self.scan_dumps(false));
        out
    }

    fn summary(&self) -> String {
        format!("{} log files followed, {} lines read, {} dumps seen", self.tails.len(), self.lines, self.dumps.len())
    }
}

/// Sets the reporter up and returns its task, or marks it disabled when nothing is configured.
pub(crate) fn start(
    patterns: Vec<String>,
    flight_dir: Option<PathBuf>,
    poll: Duration,
    tx: mpsc::Sender<Finding>,
    board: Arc<StatusBoard>,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
    if patterns.is_empty() && flight_dir.is_none() {
        board.set(
            NAME,
            ReporterState::Disabled,
            "disabled by configuration: no --nccl-log-glob, --nccl-dir or --flight-recorder-dir given".into(),
        );
        metrics.set_enabled(NAME, false);
        return None;
    }
    let detail = format!(
        "logs {:?}, flight-recorder dir {}",
        patterns,
        flight_dir.as_ref().map_or("none".into(), |d| d.display().to_string())
    );
    let watch = Watch::new(patterns, flight_dir);
    board.set(NAME, ReporterState::Enabled, detail);
    metrics.set_enabled(NAME, true);
    Some(run(watch, poll, tx, board, shutdown))
}

async fn run(
    mut watch: Watch,
    poll: Duration,
    tx: mpsc::Sender<Finding>,
    board: Arc<StatusBoard>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let Ok((w, found)) = tokio::task::spawn_blocking(move || {
            let found = watch.poll();
            (watch, found)
        })
        .await
        else {
            tracing::warn!(reporter = NAME, "NCCL log poll panicked; the reporter stops");
            break;
        };
        watch = w;
        board.sample(NAME, watch.summary());
        for f in found {
            if tx.send(f).await.is_err() {
                return;
            }
        }
    }
    tracing::debug!("health NCCL reporter stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_from_torch_prefixes() {
        assert_eq!(rank_of("[rank3]:[E1128 18:02:11.1 ProcessGroupNCCL.cpp:616] [Rank 3] Watchdog"), Some(3));
        assert_eq!(rank_of("[PG ID 0 PG GUID 0(default_pg) Rank 12] Heartbeat"), Some(12));
        assert_eq!(rank_of("[rank7]:[E1128] something"), Some(7));
        assert_eq!(rank_of("node-a:1:2 [3] NCCL WARN NET/IB"), None);
    }

    #[test]
    fn info_lines_are_not_errors() {
        for l in [
            "node-a:2345:2345 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_1:1/IB ; OOB eth0:10.0.0.4<0>",
            "node-a:2345:2345 [0] NCCL INFO Using network IB",
            "node-a:2345:2401 [3] NCCL INFO Channel 00/0 : 3[3] -> 4[0] [send] via NET/IB/0/GDRDMA",
            "[rank0]:[I1128 18:00:00.000000000 ProcessGroupNCCL.cpp:900] [PG ID 0 PG GUID 0 Rank 0] ProcessGroupNCCL initialization options: TIMEOUT(ms): 600000",
        ] {
            assert_eq!(classify(l), None, "{l}");
        }
    }

    #[test]
    fn a_full_watch_evicts_the_stalest_log_and_never_rereads_it() {
        let dir = tempfile::tempdir().unwrap();
        let line = "[rank2]:[E1128] [Rank 2] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9) ran for 1 milliseconds before timing out.\n";
        for i in 0..MAX_FILES {
            std::fs::write(dir.path().join(format!("nccl.{i:04}.log")), line).unwrap();
        }
        let mut w = Watch::new(vec![format!("{}/nccl.*.log", dir.path().display())], None);
        assert!(w.poll().is_empty(), "lines from before start-up are history");
        std::fs::write(dir.path().join("nccl.9999.log"), line).unwrap();
        let f = w.poll();
        assert_eq!((f.len(), f[0].rank), (1, Some(2)), "a new log beyond the cap is still followed");
        assert_eq!(w.tails.len(), MAX_FILES);
        assert_eq!(w.retired.len(), 1);
        for _ in 0..3 {
            assert!(w.poll().is_empty(), "evicted logs resume at their end");
        }
    }

    #[test]
    fn logs_in_the_flight_recorder_directory_are_logs_not_dumps() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("nccl.node-a.42.log");
        std::fs::write(&log, "node-a:42:42 [0] NCCL INFO Bootstrap\n").unwrap();
        let pattern = glob_of(&format!("{}/nccl.%h.%p.log", dir.path().display()));
        let mut w = Watch::new(vec![pattern], Some(dir.path().to_path_buf()));
        let line = "node-a:42:99 [0] NCCL WARN NET/IB : Got completion from peer 10.0.0.5<45123> with error 12, opcode 0, len 0, vendor err 129 (Recv)\n";
        std::io::Write::write_all(&mut std::fs::OpenOptions::new().append(true).open(&log).unwrap(), line.as_bytes())
            .unwrap();
        std::fs::write(dir.path().join("nccl_trace_rank_3"), "nccl:all_reduce started").unwrap();
        let mut kinds: Vec<String> = Vec::new();
        for _ in 0..3 {
            kinds.extend(w.poll().into_iter().map(|f| f.kind));
        }
        kinds.sort();
        assert_eq!(kinds, ["nccl-flight-recorder", "nccl-net-error"], "the log is never read as a dump");
    }

    #[test]
    fn dump_summary_and_rank() {
        let s = summarize_dump(b"\x80\x02}q\x00(X\x0e\x00\x00\x00profiling_nameX\x0f\x00\x00\x00nccl:all_reduceX\x05\x00\x00\x00stateX\x07\x00\x00\x00started");
        assert!(s.contains("nccl:all_reduce") && s.contains("started 1"), "{s}");
        assert_eq!(dump_rank(Path::new("/tmp/fr/nccl_trace_rank_12")), Some(12));
        assert_eq!(glob_of("/var/log/nccl/nccl.%h.%p.log"), "/var/log/nccl/nccl.*.*.log");
    }
}
