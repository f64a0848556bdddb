//! [`KubeFencer`]: node isolation through the Kubernetes API (kube-rs). Every write is a JSON merge
//! patch computed from a fresh read, so repeating an isolation changes nothing and a node that an
//! operator cordoned is left cordoned on release.
//!
//! RBAC it needs: nodes get/list/patch, pods get/delete, events create (and leases, see
//! [`lease`](super::lease)).

use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

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
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let now = now_rfc3339();
        let mut involved = json!({ "kind": kind, "name": name, "apiVersion": "v1" });
        if kind == "Pod" {
            involved["namespace"] = json!(namespace);
        }
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
        Api::<Event>::namespaced(self.client.clone(), &namespace)
            .create(&PostParams::default(), &ev)
            .await
            .map_err(|e| kube_err("create event", &format!("{}/{name}", kind.to_lowercase()), e))?;
        Ok(())
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
        let n = nodes.get(node).await.map_err(|e| kube_err("get", &object, e))?;
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
