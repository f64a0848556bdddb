//! [`KubeFencer`]: node isolation through the Kubernetes API (kube-rs). Every write is a JSON merge
//! patch computed from a fresh read, so repeating an isolation changes nothing and a node that an
//! operator cordoned is left cordoned on release.
//!
//! RBAC it needs: nodes get/list/patch, pods get/delete, events create (and leases, see
//! [`lease`](super::lease)). [`KubeFaultLog`] keeps fault records in ConfigMaps of the isolator's
//! namespace (configmaps get/list/create/patch there) and finds the job object that owns a pod (pods
//! and jobs.batch get).

use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use super::faults::{FaultLog, FaultRecord, Owner, merge};
use super::fencer::{
    BoxFuture, CORDONED_ANNOTATION, EVIDENCE_ANNOTATION, Isolation, NodeFencer, Notice, PodRef, Subject, TAINT_KEY,
    provider_id_names,
};
use crate::{Error, Result};

/// Namespace of Events about nodes (cluster-scoped objects), as the kubelet does.
const NODE_EVENT_NAMESPACE: &str = "default";
/// `source.component` of our Events.
const COMPONENT: &str = "ckptd-isolator";

/// Taint effect of isolations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TaintEffect {
    /// New pods are not scheduled on the node.
    #[value(name = "NoSchedule")]
    NoSchedule,
    /// Running pods without a toleration are evicted too.
    #[value(name = "NoExecute")]
    NoExecute,
}

impl TaintEffect {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TaintEffect::NoSchedule => "NoSchedule",
            TaintEffect::NoExecute => "NoExecute",
        }
    }
}

/// Isolates nodes through the Kubernetes API.
#[derive(Clone)]
pub struct KubeFencer {
    client: Client,
    effect: TaintEffect,
}

impl std::fmt::Debug for KubeFencer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeFencer").field("effect", &self.effect).finish_non_exhaustive()
    }
}

/// Maps a kube error to ours through [`Error::kube`].
pub(crate) fn kube_err(op: &str, object: &str, e: kube::Error) -> Error {
    Error::kube(op, object, &e)
}

/// 404 by code as well as by reason: some API servers (and emulators) spell the reason otherwise.
pub(crate) fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found() || s.code == 404)
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl KubeFencer {
    /// A fencer over `client`.
    pub fn new(client: Client, effect: TaintEffect) -> KubeFencer {
        KubeFencer { client, effect }
    }

    async fn event(&self, subject: &Subject, type_: &str, reason: &str, message: &str) -> Result<()> {
        let (namespace, kind, name) = match subject {
            Subject::Node(n) => (NODE_EVENT_NAMESPACE.to_string(), "Node", n.clone()),
            Subject::Pod(p) => (p.namespace.clone(), "Pod", p.name.clone()),
        };
        let mut involved = json!({ "kind": kind, "name": name, "apiVersion": "v1" });
        if kind == "Pod" {
            involved["namespace"] = json!(namespace);
        }
        create_event(&self.client, &namespace, involved, type_, reason, message).await
    }

    async fn delete_pod(&self, pod: &PodRef) -> Result<bool> {
        let api = Api::<Pod>::namespaced(self.client.clone(), &pod.namespace);
        match api.delete(&pod.name, &DeleteParams::default()).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(kube_err("delete", &format!("pod/{}/{}", pod.namespace, pod.name), e)),
        }
    }

    async fn do_isolate(&self, iso: &Isolation) -> Result<bool> {
        let nodes = Api::<Node>::all(self.client.clone());
        let object = format!("node/{}", iso.node);
        let node = nodes.get(&iso.node).await.map_err(|e| kube_err("get", &object, e))?;
        let spec = node.spec.unwrap_or_default();
        let annotations = node.metadata.annotations.unwrap_or_default();
        let mut taints = spec.taints.unwrap_or_default();
        let tainted = taints.iter().any(|t| t.key == TAINT_KEY);
        let cordoned = spec.unschedulable.unwrap_or(false);
        let annotated = annotations.contains_key(EVIDENCE_ANNOTATION);
        let changed = !(tainted && cordoned && annotated);
        if changed {
            if !tainted {
                taints.push(k8s_openapi::api::core::v1::Taint {
                    key: TAINT_KEY.to_string(),
                    value: Some(iso.reason.clone()),
                    effect: self.effect.as_str().to_string(),
                    time_added: None,
                });
            }
            let evidence = json!({
                "reason": iso.reason, "job": iso.job, "source": iso.source,
                "evidence": iso.evidence, "pod": iso.pod.as_ref().map(|p| format!("{}/{}", p.namespace, p.name)),
                "at": now_rfc3339(),
            });
            let mut ann = serde_json::Map::new();
            if !annotated {
                ann.insert(EVIDENCE_ANNOTATION.into(), json!(evidence.to_string()));
            }
            if !cordoned {
                ann.insert(CORDONED_ANNOTATION.into(), json!("true"));
            }
            let patch = json!({
                "metadata": { "annotations": ann },
                "spec": { "unschedulable": true, "taints": taints },
            });
            nodes
                .patch(&iso.node, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| kube_err("cordon and taint", &object, e))?;
            tracing::warn!(node = %iso.node, reason = %iso.reason, job = %iso.job, "node cordoned and tainted");
            let msg = format!(
                "ckptd isolated the node: {} from {} (job {}): {:.512}",
                iso.reason, iso.source, iso.job, iso.evidence
            );
            self.event(&Subject::Node(iso.node.clone()), "Warning", "NodeIsolated", &msg).await?;
            if let Some(pod) = &iso.pod {
                let msg = format!("ckptd deletes the pod: its node {} is isolated ({})", iso.node, iso.reason);
                self.event(&Subject::Pod(pod.clone()), "Warning", "NodeIsolated", &msg).await?;
            }
        }
        if let Some(pod) = &iso.pod
            && self.delete_pod(pod).await?
        {
            tracing::warn!(pod = %pod.name, namespace = %pod.namespace, "pod deleted for rescheduling");
        }
        Ok(changed)
    }

    async fn do_release(&self, node: &str) -> Result<bool> {
        let nodes = Api::<Node>::all(self.client.clone());
        let object = format!("node/{node}");
        let n = match nodes.get(node).await {
            Ok(n) => n,
            // A node that does not exist is not isolated.
            Err(e) if is_not_found(&e) => return Ok(false),
            Err(e) => return Err(kube_err("get", &object, e)),
        };
        let spec = n.spec.unwrap_or_default();
        let annotations = n.metadata.annotations.unwrap_or_default();
        let taints = spec.taints.unwrap_or_default();
        let tainted = taints.iter().any(|t| t.key == TAINT_KEY);
        let ours = annotations.contains_key(EVIDENCE_ANNOTATION);
        let cordoned_by_us = annotations.contains_key(CORDONED_ANNOTATION);
        if !tainted && !ours && !cordoned_by_us {
            return Ok(false);
        }
        let kept: Vec<_> = taints.into_iter().filter(|t| t.key != TAINT_KEY).collect();
        let mut patch = json!({
            "metadata": { "annotations": { EVIDENCE_ANNOTATION: null, CORDONED_ANNOTATION: null } },
            "spec": { "taints": if kept.is_empty() { serde_json::Value::Null } else { json!(kept) } },
        });
        if cordoned_by_us {
            patch["spec"]["unschedulable"] = serde_json::Value::Null;
        }
        nodes
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| kube_err("release", &object, e))?;
        self.event(&Subject::Node(node.to_string()), "Normal", "NodeReleased", "ckptd released the node").await?;
        tracing::warn!(node, "node released");
        Ok(true)
    }
}

/// Creates an Event about `involved` (an `involvedObject`) in `namespace`.
async fn create_event(
    client: &Client,
    namespace: &str,
    involved: serde_json::Value,
    type_: &str,
    reason: &str,
    message: &str,
) -> Result<()> {
    let name = involved["name"].as_str().unwrap_or("object").to_string();
    let kind = involved["kind"].as_str().unwrap_or("object").to_lowercase();
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let now = now_rfc3339();
    let ev: Event = serde_json::from_value(json!({
        "metadata": { "name": format!("{name}.{nanos:x}"), "namespace": namespace },
        "involvedObject": involved,
        "type": type_,
        "reason": reason,
        "message": message,
        "source": { "component": COMPONENT },
        "reportingComponent": COMPONENT,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }))
    .map_err(|e| Error::Runtime { what: "build an Event object", reason: e.to_string() })?;
    Api::<Event>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &ev)
        .await
        .map_err(|e| kube_err("create event", &format!("{kind}/{name}"), e))?;
    Ok(())
}

impl NodeFencer for KubeFencer {
    fn node_count(&self) -> BoxFuture<'_, Result<usize>> {
        Box::pin(async move {
            let list = Api::<Node>::all(self.client.clone())
                .list(&ListParams::default())
                .await
                .map_err(|e| kube_err("list", "nodes", e))?;
            Ok(list.items.len())
        })
    }

    fn isolate<'a>(&'a self, iso: &'a Isolation) -> BoxFuture<'a, Result<bool>> {
        Box::pin(self.do_isolate(iso))
    }

    fn release<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(self.do_release(node))
    }

    fn notice<'a>(&'a self, notice: &'a Notice) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.event(&notice.subject, "Warning", &notice.reason, &notice.message))
    }

    fn node_of_instance<'a>(&'a self, instance: &'a str) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(async move {
            let list = Api::<Node>::all(self.client.clone())
                .list(&ListParams::default())
                .await
                .map_err(|e| kube_err("list", "nodes", e))?;
            Ok(list.items.into_iter().find_map(|n| {
                let pid = n.spec.as_ref().and_then(|s| s.provider_id.as_deref()).unwrap_or_default();
                if provider_id_names(pid, instance) { n.metadata.name } else { None }
            }))
        })
    }
}

/// Prefix of the ConfigMaps that hold fault records.
pub const FAULTS_CONFIGMAP_PREFIX: &str = "ckptd-faults-";
/// Key of the records (a JSON array, oldest first) in such a ConfigMap.
pub const FAULTS_KEY: &str = "records.json";
/// Annotation of such a ConfigMap with the job's name as given.
pub const FAULTS_JOB_ANNOTATION: &str = "ckptd.io/job";

/// The ConfigMap of `job`'s records: `ckptd-faults-<job>` when the job's name is a valid object
/// name, else its name made valid (lower case, `[a-z0-9-]`) with a hash of the real name appended.
pub fn faults_configmap(job: &str) -> String {
    let clean: String = job
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
        .collect();
    let clean = clean.trim_matches('-');
    if clean == job && !clean.is_empty() && FAULTS_CONFIGMAP_PREFIX.len() + clean.len() <= 63 {
        return format!("{FAULTS_CONFIGMAP_PREFIX}{clean}");
    }
    // FNV-1a: a stable, dependency-free hash, so that distinct names stay distinct.
    let hash = job.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let stem: String = clean.chars().take(63 - FAULTS_CONFIGMAP_PREFIX.len() - 17).collect();
    let stem = stem.trim_end_matches('-');
    if stem.is_empty() {
        format!("{FAULTS_CONFIGMAP_PREFIX}{hash:016x}")
    } else {
        format!("{FAULTS_CONFIGMAP_PREFIX}{stem}-{hash:016x}")
    }
}

/// The owners a fault Event may go to: (apiVersion group prefix, kind).
const JOB_KINDS: [(&str, &str); 3] =
    [("kubeflow.org/", "PyTorchJob"), ("jobset.x-k8s.io/", "JobSet"), ("batch/", "Job")];

fn job_owner(refs: &[OwnerReference], namespace: &str) -> Option<Owner> {
    let pick = refs.iter().find(|r| r.controller == Some(true)).or_else(|| refs.first())?;
    JOB_KINDS.iter().any(|(g, k)| pick.api_version.starts_with(g) && pick.kind == *k).then(|| Owner {
        api_version: pick.api_version.clone(),
        kind: pick.kind.clone(),
        name: pick.name.clone(),
        namespace: namespace.to_string(),
        uid: pick.uid.clone(),
    })
}

/// Fault records in ConfigMaps of one namespace, and Events on the job objects.
#[derive(Clone)]
pub struct KubeFaultLog {
    client: Client,
    namespace: String,
}

impl std::fmt::Debug for KubeFaultLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeFaultLog").field("namespace", &self.namespace).finish_non_exhaustive()
    }
}

impl KubeFaultLog {
    /// Records in ConfigMaps of `namespace`.
    pub fn new(client: Client, namespace: &str) -> KubeFaultLog {
        KubeFaultLog { client, namespace: namespace.to_string() }
    }

    fn parse(name: &str, cm: &ConfigMap) -> Vec<FaultRecord> {
        let Some(text) = cm.data.as_ref().and_then(|d| d.get(FAULTS_KEY)) else { return Vec::new() };
        serde_json::from_str(text).unwrap_or_else(|e| {
            tracing::warn!(configmap = %name, error = %e, "unreadable fault records: starting over");
            Vec::new()
        })
    }

    async fn do_store(&self, rec: &FaultRecord, keep: usize) -> Result<()> {
        let api = Api::<ConfigMap>::namespaced(self.client.clone(), &self.namespace);
        let name = faults_configmap(&rec.job);
        let object = format!("configmap/{}/{name}", self.namespace);
        // Two tries: a create that loses a race to another writer is retried as an update.
        for _ in 0..2 {
            let existing = match api.get(&name).await {
                Ok(cm) => Some(cm),
                Err(e) if is_not_found(&e) => None,
                Err(e) => return Err(kube_err("get", &object, e)),
            };
            let old = existing.as_ref().map(|cm| Self::parse(&name, cm)).unwrap_or_default();
            let records = merge(old, rec.clone(), keep);
            let text = serde_json::to_string(&records)
                .map_err(|e| Error::Runtime { what: "encode fault records", reason: e.to_string() })?;
            if existing.is_some() {
                let patch = json!({ "data": { FAULTS_KEY: text } });
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(|e| kube_err("update", &object, e))?;
                return Ok(());
            }
            let cm: ConfigMap = serde_json::from_value(json!({
                "metadata": {
                    "name": name,
                    "namespace": self.namespace,
                    "labels": { "app.kubernetes.io/managed-by": COMPONENT },
                    "annotations": { FAULTS_JOB_ANNOTATION: rec.job },
                },
                "data": { FAULTS_KEY: text },
            }))
            .map_err(|e| Error::Runtime { what: "build a ConfigMap object", reason: e.to_string() })?;
            match api.create(&PostParams::default(), &cm).await {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(kube_err("create", &object, e)),
            }
        }
        Err(Error::Kube { op: "create".into(), object, reason: "another writer keeps creating it".into() })
    }

    async fn do_list(&self, job: &str) -> Result<Vec<FaultRecord>> {
        let api = Api::<ConfigMap>::namespaced(self.client.clone(), &self.namespace);
        let name = faults_configmap(job);
        match api.get(&name).await {
            Ok(cm) => Ok(Self::parse(&name, &cm).into_iter().filter(|r| r.job == job).collect()),
            Err(e) if is_not_found(&e) => Ok(Vec::new()),
            Err(e) => Err(kube_err("get", &format!("configmap/{}/{name}", self.namespace), e)),
        }
    }

    async fn do_all(&self) -> Result<Vec<FaultRecord>> {
        let api = Api::<ConfigMap>::namespaced(self.client.clone(), &self.namespace);
        let list = api
            .list(&ListParams::default())
            .await
            .map_err(|e| kube_err("list", &format!("configmaps/{}", self.namespace), e))?;
        Ok(list
            .items
            .iter()
            .filter_map(|cm| {
                let name = cm.metadata.name.as_deref()?;
                name.starts_with(FAULTS_CONFIGMAP_PREFIX).then(|| Self::parse(name, cm))
            })
            .flatten()
            .collect())
    }

    async fn do_owner(&self, pod: &PodRef) -> Result<Option<Owner>> {
        let p = match Api::<Pod>::namespaced(self.client.clone(), &pod.namespace).get(&pod.name).await {
            Ok(p) => p,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(kube_err("get", &format!("pod/{}/{}", pod.namespace, pod.name), e)),
        };
        let Some(owner) = job_owner(p.metadata.owner_references.as_deref().unwrap_or_default(), &pod.namespace) else {
            return Ok(None);
        };
        if owner.kind != "Job" {
            return Ok(Some(owner));
        }
        // A Job may itself belong to a JobSet (or a PyTorchJob): the Event goes to the top.
        match Api::<Job>::namespaced(self.client.clone(), &pod.namespace).get(&owner.name).await {
            Ok(j) => Ok(Some(
                job_owner(j.metadata.owner_references.as_deref().unwrap_or_default(), &pod.namespace)
                    .filter(|o| o.kind != "Job")
                    .unwrap_or(owner),
            )),
            Err(e) if is_not_found(&e) => Ok(Some(owner)),
            Err(e) => Err(kube_err("get", &format!("job/{}/{}", pod.namespace, owner.name), e)),
        }
    }
}

impl FaultLog for KubeFaultLog {
    fn store<'a>(&'a self, rec: &'a FaultRecord, keep: usize) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.do_store(rec, keep))
    }

    fn list<'a>(&'a self, job: &'a str) -> BoxFuture<'a, Result<Vec<FaultRecord>>> {
        Box::pin(self.do_list(job))
    }

    fn all(&self) -> BoxFuture<'_, Result<Vec<FaultRecord>>> {
        Box::pin(self.do_all())
    }

    fn owner<'a>(&'a self, pod: &'a PodRef) -> BoxFuture<'a, Result<Option<Owner>>> {
        Box::pin(self.do_owner(pod))
    }

    fn announce<'a>(
        &'a self,
        rec: &'a FaultRecord,
        owner: &'a Owner,
        reason: &'a str,
        normal: bool,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let involved = json!({
                "apiVersion": owner.api_version, "kind": owner.kind, "name": owner.name,
                "namespace": owner.namespace, "uid": owner.uid,
            });
            let (what, type_) = if normal { ("recovered", "Normal") } else { ("detected", "Warning") };
            let message = format!("ckptd {what} (record {}): {:.900}", rec.id, rec.summary());
            create_event(&self.client, &owner.namespace, involved, type_, reason, &message).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_configmaps_have_valid_distinct_names() {
        assert_eq!(faults_configmap("llama-70b"), "ckptd-faults-llama-70b");
        let a = faults_configmap("Llama_70B");
        let b = faults_configmap("llama_70b");
        assert_ne!(a, b);
        for n in [a, b, faults_configmap(&"x".repeat(300)), faults_configmap("__")] {
            assert!(n.len() <= 63, "{n}");
            assert!(n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'), "{n}");
            assert!(!n.ends_with('-'), "{n}");
        }
    }

    #[test]
    fn the_owner_is_a_job_kind_controller() {
        let r = |api: &str, kind: &str, controller| OwnerReference {
            api_version: api.into(),
            kind: kind.into(),
            name: "n".into(),
            uid: "u".into(),
            controller: Some(controller),
            block_owner_deletion: None,
        };
        let o = job_owner(&[r("v1", "ConfigMap", false), r("kubeflow.org/v1", "PyTorchJob", true)], "ns").unwrap();
        assert_eq!((o.display(), o.namespace.as_str()), ("PyTorchJob/n".to_string(), "ns"));
        assert_eq!(job_owner(&[r("batch/v1", "Job", true)], "ns").unwrap().kind, "Job");
        assert!(job_owner(&[r("apps/v1", "ReplicaSet", true)], "ns").is_none());
        assert!(job_owner(&[], "ns").is_none());
    }
}
