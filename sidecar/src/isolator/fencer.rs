//! The seam between the isolator and the cluster: [`NodeFencer`] isolates and releases nodes and
//! records Events. [`KubeFencer`](super::kube::KubeFencer) is the real implementation (kube-rs);
//! [`MemoryFencer`] sits beside it, records what it is asked to do and serves both `--dry-run`
//! and the unit tests of the coordinator.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use crate::Result;

/// A boxed future, so that [`NodeFencer`] stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Annotation that carries the evidence of an isolation (JSON), and marks the node as ours.
pub const EVIDENCE_ANNOTATION: &str = "ckptd.io/isolation";
/// Annotation set when the isolator, not an operator, cordoned the node (release uncordons only
/// then).
pub const CORDONED_ANNOTATION: &str = "ckptd.io/cordoned-by-isolator";
/// Key of the taint the isolator adds.
pub const TAINT_KEY: &str = "ckptd.io/unhealthy";

/// A pod, by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// What to isolate and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    /// The node.
    pub node: String,
    /// Short machine-readable reason, already a valid taint value (`xid-79`).
    pub reason: String,
    /// The job whose rank saw the fault.
    pub job: String,
    /// The reporter (`nvml`, `kmsg`, ...).
    pub source: String,
    /// The raw line or counter that proves it.
    pub evidence: String,
    /// The affected pod, deleted so that its controller reschedules it elsewhere.
    pub pod: Option<PodRef>,
}

/// The object an Event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A node.
    Node(String),
    /// A pod.
    Pod(PodRef),
}

/// An Event that is not part of an isolation (straggler, refused isolation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// What it is about.
    pub subject: Subject,
    /// CamelCase reason (`Straggler`, `IsolationRefused`).
    pub reason: String,
    /// Human-readable message.
    pub message: String,
}

/// Isolates nodes. Every method is idempotent: repeating a call changes nothing more.
pub trait NodeFencer: Send + Sync + std::fmt::Debug {
    /// Number of nodes in the cluster (the circuit breaker's base).
    fn node_count(&self) -> BoxFuture<'_, Result<usize>>;
    /// Cordons and taints the node, annotates the evidence, emits Events on the node and the pod
    /// and deletes the pod. Returns `false` when the node was already isolated (nothing changed on
    /// the node; a pod that is still there is deleted all the same).
    fn isolate<'a>(&'a self, iso: &'a Isolation) -> BoxFuture<'a, Result<bool>>;
    /// Undoes [`isolate`](NodeFencer::isolate) on the node: removes the taint and the evidence and
    /// uncordons it if the isolator cordoned it. Returns whether it was isolated (a node that does
    /// not exist was not).
    fn release<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<bool>>;
    /// Records a warning Event.
    fn notice<'a>(&'a self, notice: &'a Notice) -> BoxFuture<'a, Result<()>>;
    /// The node whose `spec.providerID` names the cloud instance `instance` (see
    /// [`provider_id_names`]), or `None` when no node does.
    fn node_of_instance<'a>(&'a self, instance: &'a str) -> BoxFuture<'a, Result<Option<String>>>;
}

/// Whether a node's `spec.providerID` names the cloud instance `instance`: its last segment after
/// `/` or `.` is the id (`cn-hangzhou.i-bp1...` on ACK, `aws:///us-east-1a/i-0ab...` on EKS).
pub fn provider_id_names(provider_id: &str, instance: &str) -> bool {
    !instance.is_empty() && provider_id.rsplit(['/', '.']).next() == Some(instance)
}

/// What a [`MemoryFencer`] was asked to do.
#[derive(Debug, Default, Clone)]
pub struct MemoryRecord {
    /// Isolated nodes and their isolation.
    pub isolated: BTreeMap<String, Isolation>,
    /// Pods deleted.
    pub deleted_pods: BTreeSet<PodRef>,
    /// Notices recorded.
    pub notices: Vec<Notice>,
    /// Calls to `isolate` that changed something.
    pub isolations: u32,
}

/// A fencer that acts on nothing: it logs and records. `--dry-run` uses it, and so do the unit
/// tests.
#[derive(Debug)]
pub struct MemoryFencer {
    nodes: usize,
    instances: BTreeMap<String, String>,
    record: Mutex<MemoryRecord>,
}

impl MemoryFencer {
    /// A fencer for a cluster of `nodes` nodes.
    pub fn new(nodes: usize) -> MemoryFencer {
        MemoryFencer { nodes, instances: BTreeMap::new(), record: Mutex::new(MemoryRecord::default()) }
    }

    /// The same fencer, knowing that cloud instance `instance` is node `node`.
    pub fn with_instance(mut self, instance: &str, node: &str) -> MemoryFencer {
        self.instances.insert(instance.to_string(), node.to_string());
        self
    }

    /// A copy of what was recorded.
    pub fn record(&self) -> MemoryRecord {
        self.record.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl NodeFencer for MemoryFencer {
    fn node_count(&self) -> BoxFuture<'_, Result<usize>> {
        Box::pin(async move { Ok(self.nodes) })
    }

    fn isolate<'a>(&'a self, iso: &'a Isolation) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            tracing::warn!(node = %iso.node, reason = %iso.reason, job = %iso.job, "dry run: would cordon, taint and annotate the node and delete its pod");
            let mut r = self.record.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(pod) = &iso.pod {
                r.deleted_pods.insert(pod.clone());
            }
            if r.isolated.contains_key(&iso.node) {
                return Ok(false);
            }
            r.isolated.insert(iso.node.clone(), iso.clone());
            r.isolations += 1;
            Ok(true)
        })
    }

    fn release<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            tracing::warn!(node, "dry run: would release the node");
            let mut r = self.record.lock().unwrap_or_else(|p| p.into_inner());
            Ok(r.isolated.remove(node).is_some())
        })
    }

    fn notice<'a>(&'a self, notice: &'a Notice) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            tracing::warn!(reason = %notice.reason, message = %notice.message, "dry run: would record an Event");
            self.record.lock().unwrap_or_else(|p| p.into_inner()).notices.push(notice.clone());
            Ok(())
        })
    }

    fn node_of_instance<'a>(&'a self, instance: &'a str) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(async move { Ok(self.instances.get(instance).cloned()) })
    }
}

/// Turns a fault kind into a valid taint value: at most 63 characters of `[A-Za-z0-9._-]`,
/// starting and ending with an alphanumeric (others become `-`); `unknown` when nothing is left.
pub fn taint_value(kind: &str) -> String {
    let mapped: String = kind
        .chars()
        .take(63)
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' })
        .collect();
    let trimmed = mapped.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if trimmed.is_empty() { "unknown".to_string() } else { trimmed.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taint_values_are_valid_label_values() {
        assert_eq!(taint_value("xid-79"), "xid-79");
        assert_eq!(taint_value("nccl timeout!"), "nccl-timeout");
        assert_eq!(taint_value("--"), "unknown");
        assert_eq!(taint_value(&"a".repeat(100)).len(), 63);
    }

    #[test]
    fn provider_ids_name_their_instance() {
        assert!(provider_id_names("cn-hangzhou.i-bp1abc", "i-bp1abc"));
        assert!(provider_id_names("aws:///us-east-1a/i-0ab", "i-0ab"));
        assert!(!provider_id_names("cn-hangzhou.i-bp1abcd", "i-bp1abc"));
        assert!(!provider_id_names("", ""));
    }

    #[tokio::test]
    async fn memory_fencer_is_idempotent() {
        let f = MemoryFencer::new(4);
        let iso = Isolation {
            node: "n1".into(),
            reason: "xid-79".into(),
            job: "j".into(),
            source: "nvml".into(),
            evidence: "Xid 79".into(),
            pod: None,
        };
        assert!(f.isolate(&iso).await.unwrap());
        assert!(!f.isolate(&iso).await.unwrap());
        assert_eq!(f.record().isolations, 1);
        assert!(f.release("n1").await.unwrap());
        assert!(!f.release("n1").await.unwrap());
    }
}
