//! Fault records: one per fault the isolator acts on, with what it decided and when each stage of
//! the recovery happened (detect, isolate, restart, resume).
//!
//! The coordinator fills a [`FaultRecord`] as the fault goes through the job's recovery and hands
//! each change to a [`FaultSink`], a bounded queue in front of one background task, so that
//! neither the Kubernetes API nor a slow notify endpoint ever holds up the coordinator. The task
//! stores the record through a [`FaultLog`] (the seam: [`KubeFaultLog`](super::kube::KubeFaultLog)
//! keeps the newest records of each job in a ConfigMap, so a new leader and `ckptctl faults` read
//! them; [`MemoryFaultLog`] serves `--dry-run` and the unit tests), emits an Event on the object
//! that owns the pod (PyTorchJob, JobSet or Job) and POSTs the record as JSON to the
//! `--fault-notify-url`, if any.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ckptd_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::fencer::{BoxFuture, PodRef};
use super::hook::Hook;
use super::repair::Repair;
use crate::Result;
use crate::health::Action;

/// Most characters of evidence kept in a record (the rest is cut).
pub const MAX_EVIDENCE: usize = 1024;
/// Most bytes of a job's records as stored (a ConfigMap holds at most 1 MiB); the oldest records
/// go first.
pub const MAX_STORED_BYTES: usize = 512 * 1024;
/// Most records kept per job unless `--fault-records` says otherwise.
pub const DEFAULT_KEEP: usize = 50;
/// Capacity of the queue between the coordinator and the record writer.
pub const QUEUE: usize = 256;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

/// One fault and its handling. Its JSON form is what the ConfigMap holds, what `ckptctl faults
/// --json` prints and what the notify endpoint receives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRecord {
    /// Unique per isolator: the job, the detection time and a sequence number.
    pub id: String,
    /// The job.
    pub job: String,
    /// The faulty ranks.
    pub ranks: Vec<u32>,
    /// The node.
    pub node: String,
    /// The pod of the first faulty rank, and its namespace.
    pub pod: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The object that owns the pod, `Kind/name`, once found.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner: String,
    /// The reporter (`nvml`, `kmsg`, `alertmanager`, ...).
    pub source: String,
    /// The finding's kind, its class (`xid-79`, `hang`).
    pub kind: String,
    /// The line, counter or alert that proves it (at most [`MAX_EVIDENCE`] characters).
    pub evidence: String,
    /// The job's state when the fault arrived.
    pub phase: String,
    /// The fault's phase (`init`, `step`, `checkpoint-save`, `checkpoint-load`), by which it was
    /// handled: the one the agent's report carries, else the faulty ranks' from their last
    /// heartbeats (an alert's, an older agent's); empty when unknown.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fault_phase: String,
    /// The action asked for.
    pub requested: Action,
    /// The action taken (an isolation may be refused by the circuit breaker).
    pub decision: Action,
    /// Why, in words.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
    /// When the fault reached the isolator.
    #[serde(with = "rfc3339")]
    pub detected_at: Option<u64>,
    /// When the node was isolated.
    #[serde(default, with = "rfc3339", skip_serializing_if = "Option::is_none")]
    pub isolated_at: Option<u64>,
    /// When the Restore command went to the ranks.
    #[serde(default, with = "rfc3339", skip_serializing_if = "Option::is_none")]
    pub restart_at: Option<u64>,
    /// When every rank heartbeated at the new generation.
    #[serde(default, with = "rfc3339", skip_serializing_if = "Option::is_none")]
    pub resumed_at: Option<u64>,
    /// The generation the job restarted at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// The repair requested for the node (a hardware fault with `--repair-url`) and its answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair: Option<Repair>,
    /// When the repair system reported the node fixed (`POST /v1/repairs/<node>/done`) and the
    /// node was released.
    #[serde(default, with = "rfc3339", skip_serializing_if = "Option::is_none")]
    pub repaired_at: Option<u64>,
}

/// Unix milliseconds as RFC 3339 with milliseconds (`2024-05-01T12:00:00.123Z`).
pub(super) mod rfc3339 {
    use std::time::{Duration, UNIX_EPOCH};

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(ms) => s.collect_str(&humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(*ms))),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)? else { return Ok(None) };
        let t = humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)?;
        let ms = t.duration_since(UNIX_EPOCH).map_err(serde::de::Error::custom)?.as_millis();
        u64::try_from(ms).map(Some).map_err(serde::de::Error::custom)
    }
}

/// Cuts `s` to at most `max` characters.
fn cut(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

impl FaultRecord {
    /// A new record, detected at `detected_ms`; `seq` makes its id unique.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        seq: u64,
        detected_ms: u64,
        job: &str,
        ranks: &[u32],
        node: &str,
        source: &str,
        kind: &str,
        evidence: &str,
        phase: &str,
        requested: Action,
    ) -> FaultRecord {
        FaultRecord {
            id: format!("{}-{detected_ms}-{seq}", cut(job, 64)),
            job: job.to_string(),
            ranks: ranks.to_vec(),
            node: node.to_string(),
            pod: String::new(),
            namespace: String::new(),
            owner: String::new(),
            source: source.to_string(),
            kind: kind.to_string(),
            evidence: cut(evidence, MAX_EVIDENCE),
            phase: phase.to_string(),
            fault_phase: String::new(),
            requested,
            decision: requested,
            note: String::new(),
            detected_at: Some(detected_ms),
            isolated_at: None,
            restart_at: None,
            resumed_at: None,
            generation: None,
            repair: None,
            repaired_at: None,
        }
    }

    /// One line for an Event message.
    pub fn summary(&self) -> String {
        format!(
            "fault {} on node {} (ranks {:?}, from {}): {}{}{}",
            self.kind,
            self.node,
            self.ranks,
            self.source,
            self.decision,
            if self.note.is_empty() { "" } else { ": " },
            self.note
        )
    }
}

impl From<&FaultRecord> for pb::FaultRecord {
    fn from(r: &FaultRecord) -> pb::FaultRecord {
        pb::FaultRecord {
            id: r.id.clone(),
            job: r.job.clone(),
            ranks: r.ranks.clone(),
            node: r.node.clone(),
            pod: r.pod.clone(),
            namespace: r.namespace.clone(),
            owner: r.owner.clone(),
            source: r.source.clone(),
            kind: r.kind.clone(),
            evidence: r.evidence.clone(),
            phase: r.phase.clone(),
            fault_phase: r.fault_phase.clone(),
            requested: pb::FaultAction::from(r.requested) as i32,
            decision: pb::FaultAction::from(r.decision) as i32,
            note: r.note.clone(),
            detected_unix_ms: r.detected_at.unwrap_or(0),
            isolated_unix_ms: r.isolated_at.unwrap_or(0),
            restart_unix_ms: r.restart_at.unwrap_or(0),
            resumed_unix_ms: r.resumed_at.unwrap_or(0),
            generation: r.generation.unwrap_or(0),
            repair: r.repair.as_ref().map(Into::into),
            repaired_unix_ms: r.repaired_at.unwrap_or(0),
        }
    }
}

impl From<&pb::FaultRecord> for FaultRecord {
    fn from(r: &pb::FaultRecord) -> FaultRecord {
        let action =
            |a: i32| pb::FaultAction::try_from(a).ok().and_then(|a| Action::try_from(a).ok()).unwrap_or(Action::Ignore);
        let at = |ms: u64| (ms != 0).then_some(ms);
        FaultRecord {
            id: r.id.clone(),
            job: r.job.clone(),
            ranks: r.ranks.clone(),
            node: r.node.clone(),
            pod: r.pod.clone(),
            namespace: r.namespace.clone(),
            owner: r.owner.clone(),
            source: r.source.clone(),
            kind: r.kind.clone(),
            evidence: r.evidence.clone(),
            phase: r.phase.clone(),
            fault_phase: r.fault_phase.clone(),
            requested: action(r.requested),
            decision: action(r.decision),
            note: r.note.clone(),
            detected_at: at(r.detected_unix_ms),
            isolated_at: at(r.isolated_unix_ms),
            restart_at: at(r.restart_unix_ms),
            resumed_at: at(r.resumed_unix_ms),
            generation: r.restart_unix_ms.ne(&0).then_some(r.generation),
            repair: r.repair.as_ref().map(Into::into),
            repaired_at: at(r.repaired_unix_ms),
        }
    }
}

/// Puts `rec` into a job's stored records (replacing the one with its id), oldest first, keeping
/// the newest `keep` and at most [`MAX_STORED_BYTES`] of JSON. What the update does not know is
/// kept from the stored record: the owner found earlier, the repair system's answer (an update
/// made before it arrived says at most "requested") and the repair time.
pub fn merge(mut records: Vec<FaultRecord>, mut rec: FaultRecord, keep: usize) -> Vec<FaultRecord> {
    if let Some(old) = records.iter_mut().find(|r| r.id == rec.id) {
        if rec.owner.is_empty() {
            rec.owner = std::mem::take(&mut old.owner);
        }
        if !rec.repair.as_ref().is_some_and(Repair::is_settled) && old.repair.is_some() {
            rec.repair = old.repair.take();
        }
        if rec.repaired_at.is_none() {
            rec.repaired_at = old.repaired_at;
        }
        *old = rec;
    } else {
        records.push(rec);
    }
    records.sort_by(|a, b| a.detected_at.cmp(&b.detected_at).then_with(|| a.id.cmp(&b.id)));
    let excess = records.len().saturating_sub(keep.max(1));
    records.drain(..excess);
    while records.len() > 1 && serde_json::to_vec(&records).map_or(0, |v| v.len()) > MAX_STORED_BYTES {
        records.remove(0);
    }
    records
}

/// The object that owns a job's pods: a PyTorchJob (`kubeflow.org/v1`), a JobSet
/// (`jobset.x-k8s.io/v1alpha2`) or a Job (`batch/v1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// `apiVersion`.
    pub api_version: String,
    /// `kind`.
    pub kind: String,
    /// Name.
    pub name: String,
    /// Namespace (the pod's).
    pub namespace: String,
    /// `metadata.uid`.
    pub uid: String,
}

impl Owner {
    /// `Kind/name`, as records show it.
    pub fn display(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }
}

/// Where records are kept. Every method is idempotent.
pub trait FaultLog: Send + Sync + std::fmt::Debug {
    /// Stores `rec` among its job's records ([`merge`], keeping `keep`).
    fn store<'a>(&'a self, rec: &'a FaultRecord, keep: usize) -> BoxFuture<'a, Result<()>>;
    /// The job's stored records, oldest first; empty when it has none.
    fn list<'a>(&'a self, job: &'a str) -> BoxFuture<'a, Result<Vec<FaultRecord>>>;
    /// Every job's stored records, for a lookup by node rather than by job (the done report of a
    /// repair that an earlier leader requested, see [`super::repair::stored_repair`]).
    fn all(&self) -> BoxFuture<'_, Result<Vec<FaultRecord>>>;
    /// The PyTorchJob, JobSet or Job that owns the pod (through a Job when the pod's owner is
    /// one), or `None` when it has no such owner or is gone.
    fn owner<'a>(&'a self, pod: &'a PodRef) -> BoxFuture<'a, Result<Option<Owner>>>;
    /// Records a Warning (or, with `normal`, a Normal) Event about the fault on `owner`.
    fn announce<'a>(
        &'a self,
        rec: &'a FaultRecord,
        owner: &'a Owner,
        reason: &'a str,
        normal: bool,
    ) -> BoxFuture<'a, Result<()>>;
}

/// Records kept in memory, for `--dry-run` and the unit tests.
#[derive(Debug, Default)]
pub struct MemoryFaultLog {
    jobs: Mutex<BTreeMap<String, Vec<FaultRecord>>>,
    owners: BTreeMap<PodRef, Owner>,
    announced: Mutex<Vec<(String, String)>>,
}

impl MemoryFaultLog {
    /// An empty log; no pod has an owner.
    pub fn new() -> MemoryFaultLog {
        MemoryFaultLog::default()
    }

    /// The same log, knowing that `owner` owns `pod`.
    pub fn with_owner(mut self, pod: PodRef, owner: Owner) -> MemoryFaultLog {
        self.owners.insert(pod, owner);
        self
    }

    /// (record id, reason) of every announcement so far.
    pub fn announced(&self) -> Vec<(String, String)> {
        self.announced.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

impl FaultLog for MemoryFaultLog {
    fn store<'a>(&'a self, rec: &'a FaultRecord, keep: usize) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            let old = jobs.remove(&rec.job).unwrap_or_default();
            jobs.insert(rec.job.clone(), merge(old, rec.clone(), keep));
            Ok(())
        })
    }

    fn list<'a>(&'a self, job: &'a str) -> BoxFuture<'a, Result<Vec<FaultRecord>>> {
        Box::pin(async move {
            Ok(self.jobs.lock().unwrap_or_else(|p| p.into_inner()).get(job).cloned().unwrap_or_default())
        })
    }

    fn all(&self) -> BoxFuture<'_, Result<Vec<FaultRecord>>> {
        Box::pin(async move {
            Ok(self.jobs.lock().unwrap_or_else(|p| p.into_inner()).values().flatten().cloned().collect())
        })
    }

    fn owner<'a>(&'a self, pod: &'a PodRef) -> BoxFuture<'a, Result<Option<Owner>>> {
        Box::pin(async move { Ok(self.owners.get(pod).cloned()) })
    }

    fn announce<'a>(
        &'a self,
        rec: &'a FaultRecord,
        owner: &'a Owner,
        reason: &'a str,
        _normal: bool,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let on = owner.display();
            tracing::warn!(job = %rec.job, id = %rec.id, owner = %on, reason, "dry run: would record an Event on the job");
            self.announced.lock().unwrap_or_else(|p| p.into_inner()).push((rec.id.clone(), format!("{reason} {on}")));
            Ok(())
        })
    }
}

/// What happened to a record, and so which Event its owner gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Detected and decided on (isolated or not): a `FaultDetected` Event.
    Detected,
    /// The Restore command went out: no Event (the job restarts).
    Restarted,
    /// Every rank is back: a `FaultRecovered` Event.
    Resumed,
    /// The repair system answered, or the node was repaired: no Event.
    Repaired,
}

#[derive(Debug)]
enum Update {
    /// A job's pod, to find the job's owner before a fault deletes the pod.
    Pod { job: String, pod: PodRef },
    /// A record changed.
    Record { record: Box<FaultRecord>, stage: Stage },
    /// The repair answer or the repair time of a stored record.
    Repair { job: String, id: String, repair: Option<Box<Repair>>, repaired_at: Option<u64> },
}

/// The coordinator's end of the record writer: a bounded queue that never blocks, and the log
/// that `ckptctl faults` reads.
#[derive(Debug, Clone)]
pub struct FaultSink {
    tx: mpsc::Sender<Update>,
    log: std::sync::Arc<dyn FaultLog>,
}

impl FaultSink {
    /// Starts the writer task over `log`, keeping `keep` records per job and POSTing each record
    /// to `notify` when given. It stops when `cancel` fires, after writing what is queued (for a
    /// few seconds at most).
    pub fn spawn(
        log: std::sync::Arc<dyn FaultLog>,
        keep: usize,
        notify: Option<Hook>,
        cancel: CancellationToken,
    ) -> FaultSink {
        let (tx, rx) = mpsc::channel(QUEUE);
        let notify = notify.map(|hook| Notifier::spawn(hook, cancel.clone()));
        tokio::spawn(write_records(rx, log.clone(), keep, notify, cancel));
        FaultSink { tx, log }
    }

    /// The log the records are written to.
    pub fn log(&self) -> &std::sync::Arc<dyn FaultLog> {
        &self.log
    }

    /// Queues a change of `record`; when the queue is full the change is logged and dropped (the
    /// record's next change carries it again).
    pub fn send(&self, record: &FaultRecord, stage: Stage) {
        let update = Update::Record { record: Box::new(record.clone()), stage };
        if let Err(e) = self.tx.try_send(update) {
            tracing::warn!(id = %record.id, job = %record.job, error = %e, "fault record queue full: this change is not written");
        }
    }

    /// Queues the repair system's answer for the stored record `id` of `job`.
    pub fn repair(&self, job: &str, id: &str, repair: Repair) {
        self.patch(job, id, Some(Box::new(repair)), None);
    }

    /// Queues the time the stored record `id` of `job` was repaired (its node released).
    pub fn repaired(&self, job: &str, id: &str, at: u64) {
        self.patch(job, id, None, Some(at));
    }

    fn patch(&self, job: &str, id: &str, repair: Option<Box<Repair>>, repaired_at: Option<u64>) {
        let update = Update::Repair { job: job.to_string(), id: id.to_string(), repair, repaired_at };
        if let Err(e) = self.tx.try_send(update) {
            tracing::warn!(id, job, error = %e, "fault record queue full: the repair is not written");
        }
    }

    /// Queues the lookup of the object that owns `job`'s pods (once per job and leader: a pod
    /// deleted by an isolation can no longer be asked).
    pub fn pod(&self, job: &str, pod: PodRef) -> bool {
        self.tx.try_send(Update::Pod { job: job.to_string(), pod }).is_ok()
    }
}

/// Most jobs whose owner the writer remembers.
const OWNERS: usize = 4096;

async fn write_records(
    mut rx: mpsc::Receiver<Update>,
    log: std::sync::Arc<dyn FaultLog>,
    keep: usize,
    notify: Option<Notifier>,
    cancel: CancellationToken,
) {
    // The object that owns each job's pods, found once per job.
    let mut owners: BTreeMap<String, Owner> = BTreeMap::new();
    loop {
        let update = tokio::select! {
            u = rx.recv() => u,
            () = cancel.cancelled() => tokio::time::timeout(Duration::from_secs(2), rx.recv()).await.unwrap_or_default(),
        };
        let (mut record, stage) = match update {
            None => return,
            Some(Update::Pod { job, pod }) => {
                match log.owner(&pod).await {
                    Ok(Some(owner)) => {
                        if owners.len() >= OWNERS
                            && let Some(first) = owners.keys().next().cloned()
                        {
                            owners.remove(&first);
                        }
                        owners.insert(job, owner);
                    }
                    Ok(None) => {
                        tracing::debug!(job = %job, pod = %pod.name, "the job's pod has no PyTorchJob, JobSet or Job owner")
                    }
                    Err(e) => {
                        tracing::warn!(job = %job, pod = %pod.name, error = %e, "cannot find the object that owns the job's pod")
                    }
                }
                continue;
            }
            Some(Update::Record { record, stage }) => (*record, stage),
            Some(Update::Repair { job, id, repair, repaired_at }) => {
                let found = match log.list(&job).await {
                    Ok(records) => records.into_iter().find(|r| r.id == id),
                    Err(e) => {
                        tracing::warn!(id = %id, job = %job, error = %e, "cannot read the fault record to add its repair");
                        continue;
                    }
                };
                let Some(mut record) = found else {
                    tracing::warn!(id = %id, job = %job, "the fault record is no longer stored: its repair is not written");
                    continue;
                };
                if let Some(r) = repair {
                    record.repair = Some(*r);
                }
                if repaired_at.is_some() {
                    record.repaired_at = repaired_at;
                }
                (record, Stage::Repaired)
            }
        };
        let owner = owners.get(&record.job);
        if let Some(o) = owner {
            record.owner = o.display();
        }
        let reason = match stage {
            Stage::Detected => Some("FaultDetected"),
            Stage::Restarted | Stage::Repaired => None,
            Stage::Resumed => Some("FaultRecovered"),
        };
        if let (Some(reason), Some(owner)) = (reason, owner)
            && let Err(e) = log.announce(&record, owner, reason, stage == Stage::Resumed).await
        {
            tracing::warn!(id = %record.id, job = %record.job, error = %e, "cannot record the fault's Event on its job");
        }
        if let Err(e) = log.store(&record, keep).await {
            tracing::warn!(id = %record.id, job = %record.job, error = %e, "cannot store the fault record");
        }
        if let Some(n) = &notify {
            n.send(&record);
        }
    }
}

/// POSTs records to the notify endpoint from a task of its own, through a bounded queue, with a
/// timeout and a few retries per record.
#[derive(Debug)]
struct Notifier {
    tx: mpsc::Sender<Vec<u8>>,
}

/// Attempts per record.
const NOTIFY_ATTEMPTS: u32 = 3;

impl Notifier {
    fn spawn(hook: Hook, cancel: CancellationToken) -> Notifier {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
        tokio::spawn(async move {
            loop {
                let body = tokio::select! {
                    b = rx.recv() => match b { Some(b) => b, None => return },
                    () = cancel.cancelled() => return,
                };
                for attempt in 1..=NOTIFY_ATTEMPTS {
                    match hook.post_json(&body).await {
                        Ok((status, _)) if (200..300).contains(&status) => break,
                        Ok((status, _)) => {
                            tracing::warn!(url = %hook.url(), status, attempt, "the fault notify endpoint refused a record")
                        }
                        Err(e) => {
                            tracing::warn!(url = %hook.url(), error = %e, attempt, "cannot send a fault record")
                        }
                    }
                    if attempt < NOTIFY_ATTEMPTS {
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_millis(500 << attempt)) => {}
                            () = cancel.cancelled() => return,
                        }
                    }
                }
            }
        });
        Notifier { tx }
    }

    fn send(&self, record: &FaultRecord) {
        match serde_json::to_vec(record) {
            Ok(body) => {
                if self.tx.try_send(body).is_err() {
                    tracing::warn!(id = %record.id, "fault notify queue full: record not sent");
                }
            }
            Err(e) => tracing::warn!(id = %record.id, error = %e, "cannot encode a fault record"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, at: u64) -> FaultRecord {
        FaultRecord::new(seq, at, "job", &[1], "node-1", "nvml", "xid-79", "NVRM: Xid 79", "Running", Action::DrainNode)
    }

    #[test]
    fn a_record_is_json_with_rfc3339_times_and_round_trips() {
        let mut r = rec(1, 1_700_000_000_123);
        r.isolated_at = Some(1_700_000_000_500);
        r.fault_phase = "checkpoint-save".into();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["detected_at"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["isolated_at"], "2023-11-14T22:13:20.500Z");
        assert_eq!(v["requested"], "drain-node");
        assert_eq!(v["kind"], "xid-79");
        assert_eq!((&v["phase"], &v["fault_phase"]), (&"Running".into(), &"checkpoint-save".into()));
        assert!(v.get("resumed_at").is_none(), "stages that did not happen are left out");
        let back: FaultRecord = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
        let via_proto = FaultRecord::from(&pb::FaultRecord::from(&r));
        assert_eq!(via_proto, r);
        assert!(serde_json::from_str::<FaultRecord>(r#"{"id": "x"}"#).is_err());
    }

    #[test]
    fn evidence_is_cut_and_ids_are_unique() {
        let long = "x".repeat(5000);
        let r = FaultRecord::new(7, 5, "j", &[], "n", "s", "k", &long, "Running", Action::RestartJob);
        assert_eq!(r.evidence.chars().count(), MAX_EVIDENCE);
        assert_ne!(r.id, FaultRecord::new(8, 5, "j", &[], "n", "s", "k", "", "Running", Action::RestartJob).id);
    }

    #[test]
    fn merge_replaces_by_id_keeps_the_newest_and_the_owner() {
        let mut first = rec(1, 10);
        first.owner = "Job/train".into();
        let mut records = merge(Vec::new(), first.clone(), 2);
        let mut later = first.clone();
        later.resumed_at = Some(20);
        records = merge(records, later, 2);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].resumed_at, Some(20));
        assert_eq!(records[0].owner, "Job/train", "an update without the owner keeps it");
        records = merge(records, rec(2, 30), 2);
        records = merge(records, rec(3, 40), 2);
        assert_eq!(records.iter().map(|r| r.detected_at).collect::<Vec<_>>(), vec![Some(30), Some(40)]);
        let mut big = rec(4, 50);
        big.evidence = "e".repeat(MAX_STORED_BYTES);
        let records = merge(records, big, 10);
        assert_eq!(records.len(), 1, "the size bound drops the oldest records");
    }

    #[test]
    fn merge_keeps_the_repair_answer_and_time_from_older_updates() {
        use super::super::repair::{RepairOutcome, parse_answer};
        let mut requested = rec(1, 10);
        requested.repair = Some(Repair::requested(Action::DrainNode, 10));
        let mut answered = requested.clone();
        answered.repair = Some(parse_answer(Action::DrainNode, 10, 200, br#"{"ticket": "T-1"}"#));
        answered.repaired_at = Some(50);
        let records = merge(Vec::new(), answered, 10);
        // The restart stamp comes from the coordinator's copy, made before the answer arrived.
        let mut restarted = requested;
        restarted.restart_at = Some(30);
        restarted.generation = Some(1);
        let records = merge(records, restarted, 10);
        let r = &records[0];
        assert_eq!(r.restart_at, Some(30));
        assert_eq!(
            r.repair.as_ref().map(|r| (r.outcome, r.ticket.as_deref())),
            Some((RepairOutcome::Accepted, Some("T-1")))
        );
        assert_eq!(r.repaired_at, Some(50));
        let via_proto = FaultRecord::from(&pb::FaultRecord::from(r));
        assert_eq!(&via_proto, r);
    }

    #[tokio::test]
    async fn the_writer_stores_and_announces_each_stage() {
        let pod = PodRef { namespace: "train".into(), name: "train-1".into() };
        let owner = Owner {
            api_version: "batch/v1".into(),
            kind: "Job".into(),
            name: "train".into(),
            namespace: "train".into(),
            uid: "u".into(),
        };
        let log = std::sync::Arc::new(MemoryFaultLog::new().with_owner(pod.clone(), owner));
        let cancel = CancellationToken::new();
        let sink = FaultSink::spawn(log.clone(), 10, None, cancel.clone());
        assert!(sink.pod("job", pod));
        let mut r = rec(1, 10);
        sink.send(&r, Stage::Detected);
        r.resumed_at = Some(20);
        sink.send(&r, Stage::Resumed);
        drop(sink);
        for _ in 0..1000 {
            if log.list("job").await.unwrap().first().is_some_and(|r| r.resumed_at.is_some()) {
                break;
            }
            tokio::task::yield_now().await;
        }
        r.owner = "Job/train".into();
        assert_eq!(log.list("job").await.unwrap(), vec![r.clone()]);
        let reasons: Vec<String> = log.announced().into_iter().map(|(_, why)| why).collect();
        assert_eq!(reasons, vec!["FaultDetected Job/train", "FaultRecovered Job/train"]);
    }
}
