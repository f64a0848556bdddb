//! InfiniBand/RoCE reporter: polls `<root>/<device>/ports/<port>/{state,phys_state,rate}` and
//! `counters/*` (root `/sys/class/infiniband` by default) and reports a port leaving ACTIVE,
//! `link_downed` increments, flapping (N down→up transitions within a window) and spikes of
//! the symbol and receive error rates. A node whose fabric port is down cannot run its ranks,
//! and NCCL would only notice when its next collective times out.
//!
//! [`Monitor::observe`] is pure over a [`Snapshot`] and an instant; [`read_snapshot`] does the
//! sysfs reads, on the blocking pool.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::controller::{Metrics, ReporterState, StatusBoard};
use super::finding::{Finding, Source};

/// The reporter's name in status and metrics.
pub(crate) const NAME: &str = "ib";

/// Counters read from `counters/`.
const COUNTERS: [&str; 4] = ["link_downed", "symbol_error", "port_rcv_errors", "link_error_recovery"];

/// One port's sysfs values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSample {
    /// `state`, e.g. `4: ACTIVE`.
    pub state: String,
    /// `phys_state`, e.g. `5: LinkUp`.
    pub phys_state: String,
    /// `rate`, e.g. `400 Gb/sec (4X NDR)`.
    pub rate: String,
    /// Counter values by file name.
    pub counters: BTreeMap<String, u64>,
}

impl PortSample {
    fn active(&self) -> bool {
        self.state.contains("ACTIVE")
    }
}

/// Every port by `device/port`.
pub type Snapshot = BTreeMap<String, PortSample>;

/// Reads every port under `root`. Missing files read as empty (a port without counters still
/// has a state); a missing root is an empty snapshot.
pub fn read_snapshot(root: &Path) -> Snapshot {
    let mut snap = Snapshot::new();
    let Ok(devices) = std::fs::read_dir(root) else { return snap };
    for dev in devices.filter_map(Result::ok).take(64) {
        let Ok(ports) = std::fs::read_dir(dev.path().join("ports")) else { continue };
        for port in ports.filter_map(Result::ok).take(16) {
            let p = port.path();
            let read = |f: &str| std::fs::read_to_string(p.join(f)).map(|s| s.trim().to_owned()).unwrap_or_default();
            let mut s = PortSample {
                state: read("state"),
                phys_state: read("phys_state"),
                rate: read("rate"),
                ..Default::default()
            };
            for c in COUNTERS {
                if let Ok(v) = read(&format!("counters/{c}")).parse() {
                    s.counters.insert(c.to_owned(), v);
                }
            }
            snap.insert(format!("{}/{}", dev.file_name().to_string_lossy(), port.file_name().to_string_lossy()), s);
        }
    }
    snap
}

/// Thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Down→up transitions within `flap_window` that make a flap.
    pub flap_count: u32,
    /// The flap window.
    pub flap_window: Duration,
    /// `symbol_error` increments per second that make a spike.
    pub symbol_rate: f64,
    /// `port_rcv_errors` increments per second that make a spike.
    pub rcv_rate: f64,
    /// How long a port must stay out of ACTIVE before it is reported down.
    pub down_grace: Duration,
}

#[derive(Debug)]
struct PortState {
    last: PortSample,
    at: Instant,
    ups: VecDeque<Instant>,
    /// When the port left ACTIVE and what it was before, until it is reported or comes back.
    down: Option<(Instant, PortSample)>,
}

/// Per-port history.
#[derive(Debug)]
pub struct Monitor {
    th: Thresholds,
    ports: HashMap<String, PortState>,
}

impl Monitor {
    /// A monitor with no history.
    pub fn new(th: Thresholds) -> Monitor {
        Monitor { th, ports: HashMap::new() }
    }

    /// Compares a snapshot with the previous one. The first snapshot of a port is a baseline:
    /// a port that is down at start-up may be unused, so it is shown in status, not reported.
    pub fn observe(&mut self, snap: &Snapshot, now: Instant) -> Vec<Finding> {
        let mut out = Vec::new();
        for (port, cur) in snap {
            let Some(st) = self.ports.get_mut(port) else {
                self.ports
                    .insert(port.clone(), PortState { last: cur.clone(), at: now, ups: VecDeque::new(), down: None });
                continue;
            };
            let f = |kind: &str, evidence: String| {
                Finding::new(Source::Ib, kind, format!("{port}: {evidence}")).with_port(Some(port.clone()))
            };
            let prev = &st.last;
            if prev.active() && !cur.active() {
                st.down = Some((now, prev.clone()));
            }
            if cur.active() {
                st.down = None;
            }
            // A bounce shorter than the grace is a link retrain, not a dead port (its
            // `link_downed` increment is reported on its own).
            if let Some((since, before)) =
                st.down.take_if(|(since, _)| now.duration_since(*since) >= self.th.down_grace)
            {
                out.push(f(
                    "ib-port-down",
                    format!(
                        "state {} → {}, phys_state {} → {}, down for {:.1}s",
                        before.state,
                        cur.state,
                        before.phys_state,
                        cur.phys_state,
                        now.duration_since(since).as_secs_f64()
                    ),
                ));
            }
            if !prev.active() && cur.active() {
                st.ups.push_back(now);
            }
            while st.ups.front().is_some_and(|t| now.duration_since(*t) > self.th.flap_window) {
                st.ups.pop_front();
            }
            if st.ups.len() as u32 >= self.th.flap_count.max(1) {
                out.push(f(
                    "ib-flap",
                    format!(
                        "{} down→up transitions within {:?} (threshold {}); now {}",
                        st.ups.len(),
                        self.th.flap_window,
                        self.th.flap_count,
                        cur.state
                    ),
                ));
                st.ups.clear();
            }
            let delta = |c: &str| -> Option<(u64, u64)> {
                let (a, b) = (*prev.counters.get(c)?, *cur.counters.get(c)?);
                // A smaller value is a counter reset or wrap: no delta, a new baseline.
                (b > a).then_some((a, b))
            };
            if let Some((a, b)) = delta("link_downed") {
                out.push(f("ib-link-downed", format!("link_downed {a} → {b}")));
            }
            let secs = now.duration_since(st.at).as_secs_f64();
            if secs > 0.0 {
                for (counter, kind, limit) in [
                    ("symbol_error", "ib-symbol-errors", self.th.symbol_rate),
                    ("port_rcv_errors", "ib-rcv-errors", self.th.rcv_rate),
                ] {
                    if let Some((a, b)) = delta(counter) {
                        let rate = (b - a) as f64 / secs;
                        if rate > limit {
                            out.push(f(
                                kind,
                                format!("{counter} {a} → {b} in {secs:.1}s = {rate:.1}/s (threshold {limit}/s)"),
                            ));
                        }
                    }
                }
            }
            st.last = cur.clone();
            st.at = now;
        }
        self.ports.retain(|p, _| snap.contains_key(p));
        out
    }
}

/// A one-line view of a snapshot for status.
fn summary(snap: &Snapshot) -> String {
    if snap.is_empty() {
        return "no ports found".into();
    }
    snap.iter()
        .map(|(p, s)| {
            format!("{p} {} {} link_downed={}", s.state, s.rate, s.counters.get("link_downed").copied().unwrap_or(0))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Enabled while the root has ports; unavailable (not disabled: nothing in the configuration
/// switched it off) while it has none, which is what a node without InfiniBand or RoCE shows.
fn show_state(board: &StatusBoard, metrics: &Metrics, root: &Path, poll: Duration, has_ports: bool) {
    if has_ports {
        board.set(NAME, ReporterState::Enabled, format!("polling {} every {poll:?}", root.display()));
    } else {
        board.set(
            NAME,
            ReporterState::Unavailable,
            format!("no InfiniBand or RoCE devices under {}; polling every {poll:?} for one to appear", root.display()),
        );
    }
    metrics.set_enabled(NAME, has_ports);
}

/// Takes the baseline and returns the reporter task; it runs even when the root has no ports yet
/// (RoCE drivers load late), and status shows what it sees.
pub(crate) fn start(
    root: PathBuf,
    th: Thresholds,
    poll: Duration,
    tx: mpsc::Sender<Finding>,
    board: Arc<StatusBoard>,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    // The baseline is taken now, so changes after `Health::start` returns are all reported.
    let mut monitor = Monitor::new(th);
    let first = read_snapshot(&root);
    monitor.observe(&first, Instant::now());
    let mut has_ports = !first.is_empty();
    show_state(&board, &metrics, &root, poll, has_ports);
    board.sample(NAME, summary(&first));
    async move {
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let r = root.clone();
            let Ok(snap) = tokio::task::spawn_blocking(move || read_snapshot(&r)).await else { break };
            if has_ports == snap.is_empty() {
                has_ports = !snap.is_empty();
                show_state(&board, &metrics, &root, poll, has_ports);
            }
            board.sample(NAME, summary(&snap));
            for f in monitor.observe(&snap, Instant::now()) {
                if tx.send(f).await.is_err() {
                    return;
                }
            }
        }
        tracing::debug!("health IB reporter stopped");
    }
}
