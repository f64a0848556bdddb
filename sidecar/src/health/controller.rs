//! The health controller: the one place where findings become decisions. Reporters push
//! [`Finding`]s into its bounded queue; it looks the kind up in the [`Policy`], counts repeats at
//! the same locus (debounce and escalation), suppresses duplicates and floods, updates the
//! metrics and the status board, and hands each [`Decision`] to the agent.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::finding::{Finding, unix_ms};
use super::policy::{Action, Policy};

/// Most distinct faults (kind × locus) remembered; beyond it the oldest are forgotten, so a flood
/// of distinct findings cannot grow memory without bound.
const MAX_TRACKS: usize = 4096;

/// What the agent should do, with the finding that caused it and its history.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Decision {
    /// The latest finding of this fault (its evidence, node, GPU, PCI address, rank).
    pub finding: Finding,
    /// The action the policy chose, after escalation.
    pub action: Action,
    /// When this fault (same kind, same locus) was first seen within its window.
    #[serde(serialize_with = "unix_ms")]
    pub first_seen: SystemTime,
    /// When it was last seen.
    #[serde(serialize_with = "unix_ms")]
    pub last_seen: SystemTime,
    /// How many times it was seen within the rule's window.
    pub count: u64,
    /// Whether the action is the rule's escalation (the fault repeated).
    pub escalated: bool,
}

impl Decision {
    /// The protocol's action.
    pub fn fault_action(&self) -> ckptd_proto::v1::FaultAction {
        self.action.into()
    }

    /// The isolator's `FaultReport` for this decision; the agent supplies the job identity and
    /// the phase of the faulty ranks (`None`: unknown).
    pub fn to_report(
        &self,
        job: &str,
        ranks: Vec<u32>,
        generation: u64,
        pod: &str,
        phase: Option<ckpt_core::Phase>,
    ) -> ckptd_proto::v1::FaultReport {
        let f = &self.finding;
        ckptd_proto::v1::FaultReport {
            job: job.to_owned(),
            ranks,
            generation,
            node: f.node.clone(),
            pod: pod.to_owned(),
            source: f.source.as_str().to_owned(),
            kind: f.kind.clone(),
            action: self.fault_action() as i32,
            evidence: f.evidence.clone(),
            gpu: f.gpu,
            pci: f.pci.clone().unwrap_or_default(),
            observed_unix_ms: f.observed_unix_ms(),
            phase: phase.map(|p| p.as_str().to_owned()).unwrap_or_default(),
        }
    }
}

/// A fault the controller decided on and has seen within the dedupe window: what
/// `ckptctl health` lists as active.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FaultRecord {
    /// The latest finding.
    pub finding: Finding,
    /// The last action decided.
    pub action: Action,
    /// First seen within the window.
    #[serde(serialize_with = "unix_ms")]
    pub first_seen: SystemTime,
    /// Last seen.
    #[serde(serialize_with = "unix_ms")]
    pub last_seen: SystemTime,
    /// Occurrences within the rule's window.
    pub count: u64,
}

/// Whether a reporter watches anything, and if not, whose doing that is.
///
/// An operator reading `ckptctl health` must tell a reporter someone switched off (a flag, an
/// annotation) from one that cannot work on this node (no driver, no device, a permission the
/// pod lacks): the first is fixed in configuration, the second on the node or in the pod spec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReporterState {
    /// It runs and watches its source.
    #[default]
    Enabled,
    /// Switched off by configuration (`--no-kmsg`, `--no-nvml`, `--no-ib`, no NCCL paths given).
    Disabled,
    /// Configured to run, but its source is missing or unreadable here (no NVML driver, no
    /// InfiniBand device, no permission for the kernel log); the detail says which.
    Unavailable,
}

impl ReporterState {
    /// The word `ckptctl health` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            ReporterState::Enabled => "enabled",
            ReporterState::Disabled => "disabled",
            ReporterState::Unavailable => "unavailable",
        }
    }
}

/// One reporter's live state for `ckptctl health`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ReporterStatus {
    /// Whether it runs and watches its source (`state` is `enabled`).
    pub enabled: bool,
    /// Enabled, disabled by configuration, or unavailable on this node.
    pub state: ReporterState,
    /// What it watches when enabled; why it is disabled or unavailable otherwise.
    pub detail: String,
    /// A short description of its last sample (counters read, lines seen).
    pub last_sample: Option<String>,
    /// When it took the last sample (Unix ms).
    pub last_sample_unix_ms: Option<u64>,
}

/// The whole health picture: every reporter and the active faults.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct HealthStatus {
    /// The node.
    pub node: String,
    /// By reporter name (`nvml`, `kmsg`, `progress`, `nccl`, `ib`).
    pub reporters: BTreeMap<String, ReporterStatus>,
    /// Faults decided and seen within the dedupe window.
    pub active_faults: Vec<FaultRecord>,
    /// Whether `ckptctl inject` is accepted.
    pub inject_allowed: bool,
}

/// The human form of `ckptctl health`: one line per reporter, then one per active fault.
impl std::fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "node {}{}", self.node, if self.inject_allowed { " (drills allowed)" } else { "" })?;
        for (name, r) in &self.reporters {
            write!(f, "  {name:<8} {:<11} {}", r.state.as_str(), r.detail)?;
            if let Some(s) = &r.last_sample {
                write!(f, "; last sample: {s}")?;
            }
            writeln!(f)?;
        }
        if self.active_faults.is_empty() {
            return writeln!(f, "no active faults");
        }
        writeln!(f, "active faults:")?;
        for a in &self.active_faults {
            let x = &a.finding;
            let gpu = x.gpu.map_or_else(|| "-".to_owned(), |g| g.to_string());
            writeln!(
                f,
                "  {:<11} {:<20} gpu {gpu} pci {} rank {} ×{} ({}): {}",
                a.action.as_str(),
                x.kind,
                x.pci.as_deref().unwrap_or("-"),
                x.rank.map_or_else(|| "-".to_owned(), |r| r.to_string()),
                a.count,
                x.source,
                x.evidence
            )?;
        }
        Ok(())
    }
}

/// Shared between reporters (which write their own row) and `Health::status` (which reads).
#[derive(Debug, Default)]
pub(crate) struct StatusBoard {
    inner: Mutex<HealthStatus>,
}

impl StatusBoard {
    pub(crate) fn new(node: String, inject_allowed: bool) -> StatusBoard {
        StatusBoard { inner: Mutex::new(HealthStatus { node, inject_allowed, ..HealthStatus::default() }) }
    }

    fn with<R>(&self, f: impl FnOnce(&mut HealthStatus) -> R) -> Option<R> {
        self.inner.lock().ok().map(|mut g| f(&mut g))
    }

    pub(crate) fn set(&self, reporter: &str, state: ReporterState, detail: String) {
        self.with(|s| {
            let r = s.reporters.entry(reporter.to_owned()).or_default();
            r.enabled = state == ReporterState::Enabled;
            r.state = state;
            r.detail = detail;
        });
    }

    pub(crate) fn sample(&self, reporter: &str, sample: String) {
        self.with(|s| {
            let r = s.reporters.entry(reporter.to_owned()).or_default();
            r.last_sample = Some(sample);
            r.last_sample_unix_ms = Some(super::finding::to_unix_ms(SystemTime::now()));
        });
    }

    fn set_active(&self, faults: Vec<FaultRecord>) {
        self.with(|s| s.active_faults = faults);
    }

    pub(crate) fn snapshot(&self) -> HealthStatus {
        self.with(|s| s.clone()).unwrap_or_default()
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FindingLabels {
    source: String,
    kind: String,
    action: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReporterLabels {
    reporter: String,
}

/// The health metrics. Cloning shares the series.
#[derive(Debug, Clone, Default)]
pub(crate) struct Metrics {
    findings: Family<FindingLabels, Counter>,
    decisions: Family<ActionLabels, Counter>,
    suppressed: Family<ReasonLabels, Counter>,
    active: Gauge,
    reporter_enabled: Family<ReporterLabels, Gauge>,
    dropped: Family<ReasonLabels, Counter>,
}

impl Metrics {
    pub(crate) fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics::default();
        let r = registry.sub_registry_with_prefix("ckptd_health");
        r.register(
            "findings",
            "Findings by reporter, kind and the action the policy chose (ignore included)",
            m.findings.clone(),
        );
        r.register("decisions", "Decisions handed to the agent, by action", m.decisions.clone());
        r.register(
            "suppressed",
            "Findings that made no decision: debounce, dedupe, rate-limit or ignore",
            m.suppressed.clone(),
        );
        r.register("active_faults", "Faults decided and seen within the dedupe window", m.active.clone());
        r.register(
            "reporter_enabled",
            "1 when the reporter watches its source, 0 when it is disabled or unavailable (ckptctl health says why)",
            m.reporter_enabled.clone(),
        );
        r.register("dropped", "Inputs dropped because a bounded queue was full, by queue", m.dropped.clone());
        m
    }

    pub(crate) fn set_enabled(&self, reporter: &str, on: bool) {
        self.reporter_enabled.get_or_create(&ReporterLabels { reporter: reporter.to_owned() }).set(i64::from(on));
    }

    pub(crate) fn drop_input(&self, queue: &str) {
        self.dropped.get_or_create(&ReasonLabels { reason: queue.to_owned() }).inc();
    }

    fn suppress(&self, reason: &str) {
        self.suppressed.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
    }
}

/// The GPU of every attached rank (rank → NVML index), shared with `Health`, so a GPU-level
/// fault on a GPU this pod does not use (another job's program bug) does not restart our job.
pub(crate) type Attached = Arc<RwLock<BTreeMap<u32, Option<u32>>>>;

/// Repeats of one fault (kind × locus).
#[derive(Debug)]
struct Track {
    /// Every occurrence within the window (debounce counts these).
    occurrences: VecDeque<Instant>,
    /// Occurrences at least `coalesce` apart (escalation counts these: the driver prints several
    /// lines for one XID 13, and NVML and the kernel log both report one XID 79).
    events: VecDeque<Instant>,
    first_seen: SystemTime,
    last_seen: SystemTime,
    last_at: Instant,
    count: u64,
    decided: Option<(Instant, Action)>,
    latest: Finding,
}

/// The decision logic, free of channels so tests drive it with explicit instants.
#[derive(Debug)]
pub(crate) struct Controller {
    node: String,
    policy: Policy,
    metrics: Metrics,
    tracks: HashMap<(String, String), Track>,
    emitted: VecDeque<(Instant, Action)>,
    attached: Attached,
}

impl Controller {
    pub(crate) fn new(node: String, policy: Policy, metrics: Metrics, attached: Attached) -> Controller {
        Controller { node, policy, metrics, tracks: HashMap::new(), emitted: VecDeque::new(), attached }
    }

    /// Whether the finding names a GPU that none of this pod's ranks uses (only decidable when
    /// the attached ranks' GPUs are known).
    fn other_gpu(&self, finding: &Finding) -> bool {
        let Some(gpu) = finding.gpu else { return false };
        let Ok(attached) = self.attached.read() else { return false };
        let ours: Vec<u32> = attached.values().filter_map(|g| *g).collect();
        !ours.is_empty() && !ours.contains(&gpu)
    }

    /// Classifies one finding; `Some` when the agent must act.
    pub(crate) fn handle(&mut self, mut finding: Finding, now: Instant) -> Option<Decision> {
        if finding.node.is_empty() {
            finding.node.clone_from(&self.node);
        }
        let (rule, known) = self.policy.rule(&finding.kind);
        if !known {
            tracing::warn!(kind = %finding.kind, evidence = %finding.evidence, "finding kind not in the policy table, using its default");
        }
        self.forget_stale(now);
        let other_gpu = self.other_gpu(&finding);
        let key = (finding.kind.clone(), finding.locus());
        let track = self.tracks.entry(key).or_insert_with(|| Track {
            occurrences: VecDeque::new(),
            events: VecDeque::new(),
            first_seen: finding.observed_at,
            last_seen: finding.observed_at,
            last_at: now,
            count: 0,
            decided: None,
            latest: finding.clone(),
        });
        for q in [&mut track.occurrences, &mut track.events] {
            while q.front().is_some_and(|t| now.duration_since(*t) > rule.window) {
                q.pop_front();
            }
        }
        if track.occurrences.is_empty() {
            track.first_seen = finding.observed_at;
            track.count = 0;
        }
        if track.events.back().is_none_or(|t| now.duration_since(*t) >= self.policy.coalesce) {
            track.events.push_back(now);
        }
        track.occurrences.push_back(now);
        track.count += 1;
        track.last_seen = finding.observed_at;
        track.last_at = now;
        track.latest = finding.clone();
        let n = track.occurrences.len() as u32;
        let events = track.events.len() as u32;
        let (action, escalated) = match (rule.escalate_after, rule.escalate_to) {
            (Some(after), Some(to)) if events >= after && to > rule.action => (to, true),
            _ => (rule.action, false),
        };
        self.metrics
            .findings
            .get_or_create(&FindingLabels {
                source: finding.source.as_str().to_owned(),
                kind: finding.kind.clone(),
                action: action.as_str().to_owned(),
            })
            .inc();
        tracing::info!(source = %finding.source, kind = %finding.kind, locus = %finding.locus(), %action, count = n, evidence = %finding.evidence, "health finding");
        if n < rule.confirm {
            self.metrics.suppress("debounce");
            return None;
        }
        if action < Action::DrainNode && other_gpu {
            self.metrics.suppress("other-gpu");
            return None;
        }
        if action == Action::Ignore {
            self.metrics.suppress("ignore");
            return None;
        }
        if let Some((at, prev)) = track.decided {
            if now.duration_since(at) < self.policy.dedupe_window && action <= prev {
                self.metrics.suppress("dedupe");
                return None;
            }
        }
        while self.emitted.front().is_some_and(|(t, _)| now.duration_since(*t) >= self.policy.rate_window) {
            self.emitted.pop_front();
        }
        let strongest = self.emitted.iter().map(|(_, a)| *a).max();
        if self.emitted.len() >= self.policy.rate_limit as usize && strongest.is_some_and(|s| action <= s) {
            self.metrics.suppress("rate-limit");
            tracing::warn!(kind = %finding.kind, %action, "health decision rate-limited");
            return None;
        }
        self.emitted.push_back((now, action));
        track.decided = Some((now, action));
        self.metrics.decisions.get_or_create(&ActionLabels { action: action.as_str().to_owned() }).inc();
        Some(Decision {
            finding,
            action,
            first_seen: track.first_seen,
            last_seen: track.last_seen,
            count: track.count,
            escalated,
        })
    }

    /// The faults decided and seen within the dedupe window.
    pub(crate) fn active(&self, now: Instant) -> Vec<FaultRecord> {
        let mut v: Vec<FaultRecord> = self
            .tracks
            .values()
            .filter_map(|t| {
                let (_, action) = t.decided?;
                (now.duration_since(t.last_at) < self.policy.dedupe_window).then(|| FaultRecord {
                    finding: t.latest.clone(),
                    action,
                    first_seen: t.first_seen,
                    last_seen: t.last_seen,
                    count: t.count,
                })
            })
            .collect();
        v.sort_by(|a, b| b.action.cmp(&a.action).then(a.first_seen.cmp(&b.first_seen)));
        v
    }

    fn forget_stale(&mut self, now: Instant) {
        let keep = self.policy.dedupe_window.max(Duration::from_secs(86_400));
        self.tracks.retain(|_, t| now.duration_since(t.last_at) <= keep);
        while self.tracks.len() >= MAX_TRACKS {
            let oldest = self.tracks.iter().min_by_key(|(_, t)| t.last_at).map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.tracks.remove(&k),
                None => break,
            };
        }
    }
}

/// The controller task: findings in, decisions out, until shutdown; then it classifies what is
/// already queued (so a fault seen just before SIGTERM is not lost) and stops.
pub(crate) async fn run(
    mut ctl: Controller,
    mut findings: mpsc::Receiver<Finding>,
    decisions: mpsc::Sender<Decision>,
    board: Arc<StatusBoard>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            f = findings.recv() => {
                let Some(f) = f else { break };
                let now = Instant::now();
                let d = ctl.handle(f, now);
                publish(&ctl, &board, now);
                if let Some(d) = d {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        r = decisions.send(d) => if r.is_err() {
                            tracing::warn!("health decision receiver dropped; the controller stops");
                            break;
                        },
                    }
                }
            }
            _ = tick.tick() => publish(&ctl, &board, Instant::now()),
        }
    }
    findings.close();
    while let Ok(f) = findings.try_recv() {
        if let Some(d) = ctl.handle(f, Instant::now()) {
            if decisions.try_send(d).is_err() {
                ctl.metrics.drop_input("decisions");
            }
        }
    }
    publish(&ctl, &board, Instant::now());
    tracing::debug!("health controller stopped");
}

fn publish(ctl: &Controller, board: &StatusBoard, now: Instant) {
    let active = ctl.active(now);
    ctl.metrics.active.set(active.len() as i64);
    board.set_active(active);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::finding::Source;

    fn ctl(policy: Policy) -> Controller {
        Controller::new("node-a".into(), policy, Metrics::default(), Attached::default())
    }

    fn xid(n: u32, pci: &str) -> Finding {
        Finding::new(Source::Kmsg, format!("xid-{n}"), format!("NVRM: Xid (PCI:{pci}): {n}, ..."))
            .with_pci(Some(pci.into()))
    }

    #[tokio::test(start_paused = true)]
    async fn repeat_on_the_same_gpu_escalates_and_elsewhere_does_not() {
        let mut c = ctl(Policy::builtin());
        let t0 = Instant::now();
        let d = c.handle(xid(13, "0000:3b:00"), t0).unwrap();
        assert_eq!((d.action, d.escalated, d.finding.node.as_str()), (Action::RestartJob, false, "node-a"));
        // Second occurrence on the same GPU: same action within the dedupe window → suppressed.
        assert!(c.handle(xid(13, "0000:3b:00"), t0 + Duration::from_secs(60)).is_none());
        // On another GPU it is a separate fault.
        assert_eq!(c.handle(xid(13, "0000:5e:00"), t0 + Duration::from_secs(61)).unwrap().action, Action::RestartJob);
        // Third on the first GPU within the hour: escalates, and the escalation is not deduped.
        let d = c.handle(xid(13, "0000:3b:00"), t0 + Duration::from_secs(120)).unwrap();
        assert_eq!((d.action, d.escalated, d.count), (Action::DrainNode, true, 3));
        // Outside the window the count starts again.
        let late = t0 + Duration::from_secs(3 * 3600);
        let d = c.handle(xid(13, "0000:3b:00"), late).unwrap();
        assert_eq!((d.action, d.count), (Action::RestartJob, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_lines_is_one_event_for_escalation() {
        let mut c = ctl(Policy::builtin());
        let t0 = Instant::now();
        assert_eq!(c.handle(xid(13, "0000:3b:00"), t0).unwrap().action, Action::RestartJob);
        // The driver prints one xid-13 line per faulting SM: ten lines in a second are one event.
        for i in 1..10 {
            assert!(c.handle(xid(13, "0000:3b:00"), t0 + Duration::from_millis(100 * i)).is_none());
        }
        let active = c.active(t0 + Duration::from_secs(1));
        assert_eq!((active[0].count, active[0].action), (10, Action::RestartJob));
    }

    #[tokio::test(start_paused = true)]
    async fn gpu_faults_on_other_pods_gpus_do_not_restart_this_job_but_drains_pass() {
        let attached = Attached::default();
        let mut c = Controller::new("node-a".into(), Policy::builtin(), Metrics::default(), attached.clone());
        attached.write().unwrap().insert(0, Some(3));
        let t0 = Instant::now();
        let on = |xid: u32, gpu: u32| Finding::new(Source::Kmsg, format!("xid-{xid}"), "NVRM: Xid").with_gpu(Some(gpu));
        assert!(c.handle(on(13, 5), t0).is_none(), "another pod's program fault");
        assert_eq!(c.handle(on(13, 3), t0).unwrap().action, Action::RestartJob);
        assert_eq!(c.handle(on(79, 5), t0).unwrap().action, Action::DrainNode, "the node is still bad");
    }

    #[tokio::test(start_paused = true)]
    async fn nvml_and_kmsg_of_the_same_xid_are_one_fault() {
        let mut c = ctl(Policy::builtin());
        let t0 = Instant::now();
        assert!(c.handle(xid(79, "0000:3b:00"), t0).is_some());
        let nvml = Finding::new(Source::Nvml, "xid-79", "nvml event xid 79")
            .with_gpu(Some(0))
            .with_pci(Some("00000000:3B:00.0".into()));
        assert!(c.handle(nvml, t0 + Duration::from_millis(10)).is_none());
        let active = c.active(t0 + Duration::from_secs(1));
        assert_eq!(active.len(), 1);
        assert_eq!((active[0].count, active[0].action), (2, Action::DrainNode));
        assert!(c.active(t0 + Duration::from_secs(3600)).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn debounce_waits_for_confirmation() {
        let p = Policy::parse("[rules.ib-port-down]\nconfirm = 2\nwindow = \"1m\"\n", false).unwrap();
        let mut c = ctl(p);
        let t0 = Instant::now();
        let f = || Finding::new(Source::Ib, "ib-port-down", "state 1: DOWN").with_port(Some("mlx5_0/1".into()));
        assert!(c.handle(f(), t0).is_none());
        assert!(c.handle(f(), t0 + Duration::from_secs(120)).is_none(), "outside the window the count restarts");
        assert_eq!(c.handle(f(), t0 + Duration::from_secs(130)).unwrap().action, Action::DrainNode);
    }

    #[tokio::test(start_paused = true)]
    async fn ignore_never_decides_and_rate_limit_lets_stronger_actions_through() {
        let p = Policy::parse("rate_limit = 2\nrate_window = \"1m\"\n", false).unwrap();
        let mut c = ctl(p);
        let t0 = Instant::now();
        assert!(c.handle(xid(45, "0000:3b:00"), t0).is_none());
        let hang = |r| Finding::new(Source::Progress, "hang", "no progress").with_rank(Some(r));
        assert!(c.handle(hang(0), t0).is_some());
        assert!(c.handle(hang(1), t0).is_some());
        assert!(c.handle(hang(2), t0).is_none(), "third restart-job in the window is rate-limited");
        assert_eq!(c.handle(xid(79, "0000:3b:00"), t0).unwrap().action, Action::DrainNode);
        assert!(c.handle(hang(3), t0 + Duration::from_secs(61)).is_some(), "window passed");
    }

    #[test]
    fn report_carries_the_evidence() {
        let d = Decision {
            finding: xid(79, "0000:3b:00").with_gpu(Some(2)),
            action: Action::DrainNode,
            first_seen: SystemTime::UNIX_EPOCH,
            last_seen: SystemTime::UNIX_EPOCH,
            count: 1,
            escalated: false,
        };
        let r = d.to_report("job", vec![4], 7, "pod-0", Some(ckpt_core::Phase::CheckpointLoad));
        assert_eq!(r.phase, "checkpoint-load");
        assert_eq!(r.action, ckptd_proto::v1::FaultAction::DrainNode as i32);
        assert_eq!(
            (r.gpu, r.pci.as_str(), r.kind.as_str(), r.source.as_str()),
            (Some(2), "0000:3b:00.0", "xid-79", "kmsg")
        );
        assert!(r.evidence.starts_with("NVRM: Xid"));
    }
}
