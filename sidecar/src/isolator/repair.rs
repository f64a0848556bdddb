//! Node repair: after isolating a node for a hardware fault, the isolator asks a repair system
//! (`--repair-url`, e.g. a bridge to the platform's node-operations API) to fix it, and records
//! the answer in the fault record. The repair system reports the node fixed through the alert
//! intake (`POST /v1/repairs/<node>/done`), which releases the node.
//!
//! [`is_hardware`] is the rule for which faults get a repair request. A [`Repairer`] holds the
//! requests in flight per node and POSTs them from a task of its own through a bounded queue, with
//! a timeout and a few retries, so the coordinator never waits for the repair system; each answer
//! reaches the record through the [`FaultSink`]. The circuit breaker bounds how many requests go
//! out ([`Breaker::try_acquire_repair`](super::breaker::Breaker::try_acquire_repair)).
//!
//! The requests in flight live in the leader's memory. A new leader that gets a done report finds
//! the repair in the stored records instead ([`stored_repair`]), so the record is stamped whoever
//! requested it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ckptd_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::faults::{FaultLog, FaultRecord, FaultSink};
use super::hook::Hook;
use crate::health::Action;

/// Capacity of the queue in front of the repair task.
pub const QUEUE: usize = 64;
/// Attempts per request (a refusal with a 4xx other than 408 and 429 is final).
pub const ATTEMPTS: u32 = 3;
/// Most characters of a ticket kept.
pub const MAX_TICKET: usize = 128;
/// Most nodes with a repair in flight remembered.
const PENDING: usize = 4096;

/// Kind prefixes of hardware faults: GPU (XIDs, ECC, row remapping), NVLink and NVSwitch, PCIe,
/// InfiniBand/RoCE.
const HARDWARE_PREFIXES: [&str; 7] = ["xid-", "ecc-", "row-remap-", "nvlink-", "nvswitch-", "pcie-", "ib-"];
/// Hardware fault kinds named whole: the GPU lost, pages retired, the cloud host failed.
const HARDWARE_KINDS: [&str; 3] = ["gpu-lost", "retired-pages", "host-failure"];

/// Whether a fault of `kind` handled with `action` asks for a repair: the action isolates the node
/// (`reset-gpu`, `reboot-node`, `drain-node`) and the kind is a hardware class (`xid-*`, `ecc-*`,
/// `row-remap-*`, `nvlink-*`, `nvswitch-*`, `pcie-*`, `ib-*`, `gpu-lost`, `retired-pages`,
/// `host-failure`). Hangs, NCCL faults, node software conditions and planned maintenance never
/// do: a repair system cannot fix a program or a kernel deadlock.
pub fn is_hardware(kind: &str, action: Action) -> bool {
    matches!(action, Action::ResetGpu | Action::RebootNode | Action::DrainNode) && is_hardware_class(kind)
}

/// Whether `kind` is a hardware class (see [`is_hardware`]): the fault itself is hardware
/// evidence, whatever the policy asks for.
pub fn is_hardware_class(kind: &str) -> bool {
    HARDWARE_PREFIXES.iter().any(|p| kind.strip_prefix(p).is_some_and(|rest| !rest.is_empty()))
        || HARDWARE_KINDS.contains(&kind)
}

/// What became of a repair request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RepairOutcome {
    /// Sent (or queued); no answer yet.
    Requested,
    /// The repair system answered 2xx.
    Accepted,
    /// The repair system answered otherwise.
    Refused,
    /// No answer after every attempt, or the queue was full.
    Unreachable,
    /// The circuit breaker allowed no more repair requests in its window: none was sent.
    RateLimited,
}

impl RepairOutcome {
    /// The name in records and `ckptctl faults`.
    pub fn as_str(self) -> &'static str {
        match self {
            RepairOutcome::Requested => "requested",
            RepairOutcome::Accepted => "accepted",
            RepairOutcome::Refused => "refused",
            RepairOutcome::Unreachable => "unreachable",
            RepairOutcome::RateLimited => "rate-limited",
        }
    }

    fn parse(s: &str) -> RepairOutcome {
        match s {
            "accepted" => RepairOutcome::Accepted,
            "refused" => RepairOutcome::Refused,
            "unreachable" => RepairOutcome::Unreachable,
            "rate-limited" => RepairOutcome::RateLimited,
            _ => RepairOutcome::Requested,
        }
    }
}

/// The repair request and its answer, as a fault record keeps them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Repair {
    /// The repair asked for (the fault's action).
    pub action: Action,
    /// What became of it.
    pub outcome: RepairOutcome,
    /// The repair system's HTTP status, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The repair system's ticket (`ticket` in its JSON answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    /// Why, in words (a refusal's `error`, a transport error).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
    /// When the request was made.
    #[serde(default, with = "super::faults::rfc3339", skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<u64>,
}

impl Repair {
    fn new(action: Action, outcome: RepairOutcome, requested_at: Option<u64>) -> Repair {
        Repair { action, outcome, status: None, ticket: None, note: String::new(), requested_at }
    }

    /// A request about to be sent, at `at`.
    pub fn requested(action: Action, at: u64) -> Repair {
        Repair::new(action, RepairOutcome::Requested, Some(at))
    }

    /// A request the circuit breaker did not allow.
    pub fn rate_limited(action: Action) -> Repair {
        let mut r = Repair::new(action, RepairOutcome::RateLimited, None);
        r.note = "circuit breaker: no more repair requests in its window than isolations".into();
        r
    }

    /// Whether the repair system gave its answer (or none will come).
    pub fn is_settled(&self) -> bool {
        self.outcome != RepairOutcome::Requested
    }

    /// One word and the ticket or status, for `ckptctl faults`.
    pub fn summary(&self) -> String {
        match (&self.ticket, self.status) {
            (Some(t), _) => format!("{} {t}", self.outcome.as_str()),
            (None, Some(s)) if self.outcome != RepairOutcome::Accepted => format!("{} {s}", self.outcome.as_str()),
            _ => self.outcome.as_str().to_string(),
        }
    }
}

impl From<&Repair> for pb::RepairAnswer {
    fn from(r: &Repair) -> pb::RepairAnswer {
        pb::RepairAnswer {
            action: pb::FaultAction::from(r.action) as i32,
            outcome: r.outcome.as_str().to_string(),
            status: r.status.map_or(0, u32::from),
            ticket: r.ticket.clone().unwrap_or_default(),
            note: r.note.clone(),
            requested_unix_ms: r.requested_at.unwrap_or(0),
        }
    }
}

impl From<&pb::RepairAnswer> for Repair {
    fn from(r: &pb::RepairAnswer) -> Repair {
        Repair {
            action: pb::FaultAction::try_from(r.action)
                .ok()
                .and_then(|a| Action::try_from(a).ok())
                .unwrap_or(Action::DrainNode),
            outcome: RepairOutcome::parse(&r.outcome),
            status: u16::try_from(r.status).ok().filter(|s| *s != 0),
            ticket: (!r.ticket.is_empty()).then(|| r.ticket.clone()),
            note: r.note.clone(),
            requested_at: (r.requested_unix_ms != 0).then_some(r.requested_unix_ms),
        }
    }
}

/// The JSON body POSTed to `--repair-url`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RepairRequest {
    /// The node to repair.
    pub node: String,
    /// The job whose rank saw the fault.
    pub job: String,
    /// The fault's class (its kind: `xid-79`, `ecc-dbe`, `ib-port-down`).
    pub class: String,
    /// The line, counter or alert that proves it.
    pub evidence: String,
    /// The repair asked for: `reset-gpu`, `reboot-node` or `drain-node`.
    pub action: Action,
    /// The fault record's id.
    pub record: String,
}

impl RepairRequest {
    /// The request for `rec`, whose fault asked for `action`.
    pub fn new(rec: &FaultRecord, action: Action) -> RepairRequest {
        RepairRequest {
            node: rec.node.clone(),
            job: rec.job.clone(),
            class: rec.kind.clone(),
            evidence: rec.evidence.clone(),
            action,
            record: rec.id.clone(),
        }
    }
}

/// The repair system's answer: `(status, body)` becomes the outcome, the status, the ticket (a
/// string `ticket` in a JSON object, at most [`MAX_TICKET`] printable characters) and, for a
/// refusal, a note from its `error` or `message`.
pub fn parse_answer(action: Action, requested_at: u64, status: u16, body: &[u8]) -> Repair {
    let ok = (200..300).contains(&status);
    let mut r =
        Repair::new(action, if ok { RepairOutcome::Accepted } else { RepairOutcome::Refused }, Some(requested_at));
    r.status = Some(status);
    let json: Option<serde_json::Map<String, serde_json::Value>> = serde_json::from_slice(body).ok();
    let text = |k: &str| json.as_ref().and_then(|o| o.get(k)).and_then(|v| v.as_str()).map(str::to_string);
    r.ticket = text("ticket")
        .map(|t| t.chars().filter(|c| !c.is_control()).take(MAX_TICKET).collect::<String>())
        .filter(|t| !t.is_empty());
    if !ok {
        let why = text("error").or_else(|| text("message")).unwrap_or_else(|| String::from_utf8_lossy(body).into());
        r.note = format!("HTTP {status}: {}", crate::text::capped(why.trim(), 256));
    }
    r
}

/// Whether a request that got `status` is worth another attempt (a server error, a timeout or
/// throttling); other refusals are final.
pub fn retryable(status: u16) -> bool {
    status >= 500 || status == 408 || status == 429
}

/// A node's repair in flight: its record and, once the repair system answered, its ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The job of the fault record.
    pub job: String,
    /// The fault record's id.
    pub record: String,
    /// The repair system's ticket, once known.
    pub ticket: Option<String>,
}

/// The repair of `node` that its done report stamps, found in `records` (every job's) rather than
/// in the leader's memory: the newest record of the node whose repair request went out (any outcome
/// but rate-limited), unless that one is repaired already. An older record left unrepaired is not
/// picked: the report is about the node's latest repair.
pub fn stored_repair(records: &[FaultRecord], node: &str) -> Option<Pending> {
    let newest = records
        .iter()
        .filter(|r| r.node == node && r.repair.as_ref().is_some_and(|p| p.outcome != RepairOutcome::RateLimited))
        .max_by(|a, b| a.detected_at.cmp(&b.detected_at).then_with(|| a.id.cmp(&b.id)))?;
    newest.repaired_at.is_none().then(|| Pending {
        job: newest.job.clone(),
        record: newest.id.clone(),
        ticket: newest.repair.as_ref().and_then(|r| r.ticket.clone()),
    })
}

/// [`stored_repair`] over every record in `log`. A log that cannot be read is logged and finds
/// nothing: the node is still released, its record is not stamped.
pub async fn find_stored_repair(log: &dyn FaultLog, node: &str) -> Option<Pending> {
    match log.all().await {
        Ok(records) => stored_repair(&records, node),
        Err(e) => {
            tracing::warn!(node, error = %e, "cannot read the fault records: the repair time is not stamped");
            None
        }
    }
}

/// The coordinator's end of the repair hook: the requests in flight by node, and a bounded queue
/// to the task that POSTs them.
#[derive(Debug, Clone)]
pub struct Repairer {
    tx: mpsc::Sender<(RepairRequest, u64)>,
    pending: Arc<Mutex<BTreeMap<String, Pending>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Repairer {
    /// Starts the task that POSTs repair requests to `hook` and hands each answer to `faults`.
    /// It stops when `cancel` fires.
    pub fn spawn(hook: Hook, faults: FaultSink, cancel: CancellationToken) -> Repairer {
        let (tx, rx) = mpsc::channel(QUEUE);
        let pending = Arc::new(Mutex::new(BTreeMap::new()));
        tokio::spawn(post_requests(rx, hook, faults, pending.clone(), cancel));
        Repairer { tx, pending }
    }

    /// Whether a repair of `node` is in flight (requested and not released since).
    pub fn is_pending(&self, node: &str) -> bool {
        lock(&self.pending).contains_key(node)
    }

    /// The repair of `node` in flight, if any.
    pub fn pending(&self, node: &str) -> Option<Pending> {
        lock(&self.pending).get(node).cloned()
    }

    /// Forgets the repair of `node` (the node was released) and returns it.
    pub fn forget(&self, node: &str) -> Option<Pending> {
        lock(&self.pending).remove(node)
    }

    /// Queues `req`, made at `at`, without waiting. `false` when the queue is full (the request is
    /// not sent).
    pub fn submit(&self, req: RepairRequest, at: u64) -> bool {
        {
            let mut pending = lock(&self.pending);
            if pending.len() >= PENDING
                && let Some(first) = pending.keys().next().cloned()
            {
                pending.remove(&first);
            }
            pending
                .insert(req.node.clone(), Pending { job: req.job.clone(), record: req.record.clone(), ticket: None });
        }
        let node = req.node.clone();
        match self.tx.try_send((req, at)) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(node = %node, error = %e, "repair request queue full: no repair requested");
                lock(&self.pending).remove(&node);
                false
            }
        }
    }
}

async fn post_requests(
    mut rx: mpsc::Receiver<(RepairRequest, u64)>,
    hook: Hook,
    faults: FaultSink,
    pending: Arc<Mutex<BTreeMap<String, Pending>>>,
    cancel: CancellationToken,
) {
    loop {
        let (req, at) = tokio::select! {
            r = rx.recv() => match r { Some(r) => r, None => return },
            () = cancel.cancelled() => return,
        };
        let Some(answer) = exchange(&hook, &req, at, &cancel).await else { return };
        match answer.outcome {
            RepairOutcome::Accepted => {
                tracing::warn!(node = %req.node, record = %req.record, ticket = ?answer.ticket, "repair requested")
            }
            _ => {
                tracing::error!(node = %req.node, record = %req.record, outcome = answer.outcome.as_str(), note = %answer.note, "repair not accepted")
            }
        }
        if let Some(p) = lock(&pending).get_mut(&req.node).filter(|p| p.record == req.record) {
            p.ticket.clone_from(&answer.ticket);
        }
        faults.repair(&req.job, &req.record, answer);
    }
}

/// Sends one request, with retries; `None` when `cancel` fired.
async fn exchange(hook: &Hook, req: &RepairRequest, at: u64, cancel: &CancellationToken) -> Option<Repair> {
    let body = match serde_json::to_vec(req) {
        Ok(b) => b,
        Err(e) => {
            let mut r = Repair::new(req.action, RepairOutcome::Unreachable, Some(at));
            r.note = format!("cannot encode the request: {e}");
            return Some(r);
        }
    };
    let mut last = Repair::new(req.action, RepairOutcome::Unreachable, Some(at));
    for attempt in 1..=ATTEMPTS {
        let sent = tokio::select! {
            r = hook.post_json(&body) => r,
            () = cancel.cancelled() => return None,
        };
        match sent {
            Ok((status, answer)) => {
                last = parse_answer(req.action, at, status, &answer);
                if !retryable(status) {
                    return Some(last);
                }
            }
            Err(e) => {
                last = Repair::new(req.action, RepairOutcome::Unreachable, Some(at));
                last.note = crate::text::capped(&e.to_string(), 256).to_string();
            }
        }
        tracing::warn!(url = %hook.url(), node = %req.node, attempt, note = %last.note, "repair request failed");
        if attempt < ATTEMPTS {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(500 << attempt)) => {}
                () = cancel.cancelled() => return None,
            }
        }
    }
    Some(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hardware_classes_with_an_isolating_action_ask_for_repair() {
        for kind in [
            "xid-79",
            "xid-48",
            "ecc-dbe",
            "row-remap-failed",
            "nvlink-errors",
            "nvswitch-fatal",
            "pcie-replay",
            "ib-port-down",
            "gpu-lost",
            "retired-pages",
            "host-failure",
        ] {
            for action in [Action::ResetGpu, Action::DrainNode, Action::RebootNode] {
                assert!(is_hardware(kind, action), "{kind} {action}");
            }
            for action in [Action::Ignore, Action::RestartJob] {
                assert!(!is_hardware(kind, action), "{kind} {action} isolates nothing");
            }
        }
        for kind in [
            "hang",
            "nccl-timeout",
            "nccl-net-error",
            "nccl-remote-error",
            "node-kernel-deadlock",
            "node-readonly-filesystem",
            "host-maintenance",
            "instance-failure",
            "thermal-throttle",
            "lingjun-gpu-fault",
            "xid-",
            "",
        ] {
            assert!(!is_hardware(kind, Action::DrainNode), "{kind} is not a hardware class");
        }
    }

    #[test]
    fn the_request_body_names_the_node_class_action_and_record() {
        let rec = FaultRecord::new(
            3,
            1000,
            "llm",
            &[1],
            "node-2",
            "nvml",
            "xid-79",
            "NVRM: Xid 79",
            "Running",
            Action::DrainNode,
        );
        let v = serde_json::to_value(RepairRequest::new(&rec, Action::DrainNode)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "node": "node-2", "job": "llm", "class": "xid-79", "evidence": "NVRM: Xid 79",
                "action": "drain-node", "record": rec.id,
            })
        );
        let v = serde_json::to_value(RepairRequest::new(&rec, Action::ResetGpu)).unwrap();
        assert_eq!(v["action"], "reset-gpu");
    }

    #[test]
    fn answers_become_outcomes_with_the_ticket_and_the_reason() {
        let a = parse_answer(Action::DrainNode, 5, 200, br#"{"ticket": "T-1", "eta": 3600}"#);
        assert_eq!((a.outcome, a.status, a.ticket.as_deref()), (RepairOutcome::Accepted, Some(200), Some("T-1")));
        assert_eq!((a.requested_at, a.note.as_str()), (Some(5), ""));
        assert_eq!(a.summary(), "accepted T-1");
        let a = parse_answer(Action::DrainNode, 5, 202, b"queued");
        assert_eq!((a.outcome, a.ticket), (RepairOutcome::Accepted, None), "a body that is not JSON is no ticket");
        let a = parse_answer(Action::DrainNode, 5, 201, br#"{"ticket": 42}"#);
        assert_eq!(a.ticket, None, "a ticket that is not a string is ignored");
        let long = format!(r#"{{"ticket": "{}\u0007"}}"#, "x".repeat(500));
        let a = parse_answer(Action::DrainNode, 5, 200, long.as_bytes());
        assert_eq!(a.ticket.map(|t| t.len()), Some(MAX_TICKET), "cut, control characters dropped");
        let a = parse_answer(Action::ResetGpu, 5, 409, br#"{"error": "node already in repair"}"#);
        assert_eq!((a.outcome, a.status), (RepairOutcome::Refused, Some(409)));
        assert_eq!(a.note, "HTTP 409: node already in repair");
        assert_eq!(a.summary(), "refused 409");
        let a = parse_answer(Action::ResetGpu, 5, 503, b"busy\n");
        assert_eq!(a.note, "HTTP 503: busy");
        assert!(retryable(503) && retryable(429) && retryable(408));
        assert!(!retryable(400) && !retryable(404) && !retryable(200));
    }

    #[test]
    fn a_repair_round_trips_through_json_and_protobuf() {
        let mut r = parse_answer(Action::RebootNode, 1_700_000_000_000, 200, br#"{"ticket": "T-9"}"#);
        assert_eq!(Repair::from(&pb::RepairAnswer::from(&r)), r);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["outcome"], "accepted");
        assert_eq!(v["requested_at"], "2023-11-14T22:13:20.000Z");
        assert_eq!(serde_json::from_value::<Repair>(v).unwrap(), r);
        r = Repair::rate_limited(Action::DrainNode);
        assert_eq!(Repair::from(&pb::RepairAnswer::from(&r)), r);
        assert_eq!(serde_json::to_value(&r).unwrap()["outcome"], "rate-limited");
    }

    #[test]
    fn a_stored_repair_is_the_newest_sent_one_of_the_node_until_it_is_repaired() {
        let rec = |seq: u64, at: u64, job: &str, node: &str, repair: Option<Repair>| {
            let mut r = FaultRecord::new(seq, at, job, &[0], node, "nvml", "xid-79", "", "Running", Action::DrainNode);
            r.repair = repair;
            r
        };
        let accepted =
            |ticket: &str| parse_answer(Action::DrainNode, 1, 200, format!(r#"{{"ticket": "{ticket}"}}"#).as_bytes());
        let old = rec(1, 10, "a", "n1", Some(accepted("T-1")));
        let newer = rec(2, 20, "b", "n1", Some(Repair::requested(Action::DrainNode, 20)));
        let limited = rec(3, 30, "a", "n1", Some(Repair::rate_limited(Action::DrainNode)));
        let no_repair = rec(4, 40, "a", "n1", None);
        let elsewhere = rec(5, 50, "a", "n2", Some(accepted("T-5")));
        let records = vec![old.clone(), newer.clone(), limited, no_repair, elsewhere.clone()];
        let found = stored_repair(&records, "n1").expect("n1 has a repair");
        assert_eq!((found.job.as_str(), found.record.as_str(), found.ticket), ("b", newer.id.as_str(), None));
        let found = stored_repair(&records, "n2").expect("n2 has a repair");
        assert_eq!((found.record.as_str(), found.ticket.as_deref()), (elsewhere.id.as_str(), Some("T-5")));
        assert_eq!(stored_repair(&records, "n3"), None);
        // Once the newest is repaired, the older unrepaired one is not picked up instead.
        let mut repaired = newer;
        repaired.repaired_at = Some(25);
        assert_eq!(stored_repair(&[old.clone(), repaired], "n1"), None);
        assert_eq!(stored_repair(std::slice::from_ref(&old), "n1").map(|p| p.record), Some(old.id));
    }

    #[tokio::test]
    async fn a_request_is_posted_and_its_answer_reaches_the_record() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        use super::super::faults::{FaultLog, MemoryFaultLog, Stage};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut bodies = Vec::new();
            // The first attempt is answered 503 (retried), the second with a ticket.
            for answer in [
                &b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbusy"[..],
                &b"HTTP/1.1 200 OK\r\ncontent-length: 17\r\nconnection: close\r\n\r\n{\"ticket\": \"T-1\"}"[..],
            ] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.ends_with(b"}") {
                    let n = s.read(&mut buf).await.unwrap();
                    assert!(n > 0, "the client closed early");
                    got.extend_from_slice(&buf[..n]);
                }
                s.write_all(answer).await.unwrap();
                let text = String::from_utf8_lossy(&got).to_string();
                bodies.push(text.split_once("\r\n\r\n").unwrap().1.to_string());
            }
            bodies
        });
        let log = Arc::new(MemoryFaultLog::new());
        let cancel = CancellationToken::new();
        let sink = FaultSink::spawn(log.clone(), 10, None, cancel.clone());
        let mut rec =
            FaultRecord::new(1, 10, "llm", &[1], "node-2", "nvml", "xid-79", "Xid 79", "Running", Action::DrainNode);
        rec.repair = Some(Repair::requested(Action::DrainNode, 10));
        sink.send(&rec, Stage::Detected);
        let hook = Hook::new("--repair-url", &format!("http://{addr}/repair"), None).unwrap();
        let repairer = Repairer::spawn(hook, sink, cancel.clone());
        assert!(repairer.submit(RepairRequest::new(&rec, Action::DrainNode), 10));
        assert!(repairer.is_pending("node-2"));
        let bodies = server.await.unwrap();
        assert_eq!(bodies.len(), 2);
        let sent: serde_json::Value = serde_json::from_str(&bodies[1]).unwrap();
        assert_eq!((&sent["node"], &sent["record"]), (&"node-2".into(), &rec.id.clone().into()));
        let mut stored = None;
        for _ in 0..10_000 {
            stored = log
                .list("llm")
                .await
                .unwrap()
                .into_iter()
                .next()
                .filter(|r| r.repair.as_ref().is_some_and(Repair::is_settled));
            if stored.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let repair = stored.expect("the answer reaches the record").repair.unwrap();
        assert_eq!((repair.outcome, repair.ticket.as_deref()), (RepairOutcome::Accepted, Some("T-1")));
        assert_eq!(repairer.pending("node-2").and_then(|p| p.ticket).as_deref(), Some("T-1"));
        assert_eq!(repairer.forget("node-2").map(|p| p.record), Some(rec.id));
        assert!(!repairer.is_pending("node-2"));
        cancel.cancel();
    }
}
