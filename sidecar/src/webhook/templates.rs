//! Opt-in on the job: a PyTorchJob, JobSet or Job labelled `ckptd.io/inject: "true"` gets that label,
//! and its own `ckptd.io/*` annotations, copied into its pod templates.
//!
//! Job controllers do not copy a job's labels to its pods, so without this a label on the PyTorchJob
//! would never reach the pod the webhook injects into. The job objects are handled as plain JSON: their
//! CRD types are not compiled in, and only the pod templates' `metadata` is touched, with `add`
//! operations for what is missing. A value the user set on a template (including
//! `ckptd.io/inject: "false"` to leave one replica type out) is kept. The pods themselves are validated
//! when they are created.

use json_patch::{AddOperation, Patch, PatchOperation, jsonptr::PointerBuf};
use serde_json::{Map, Value};

use super::annotations::LABEL_INJECT;

/// The job kinds whose pod templates are labelled, by API group and kind.
pub const JOB_KINDS: [(&str, &str); 3] =
    [("batch", "Job"), ("kubeflow.org", "PyTorchJob"), ("jobset.x-k8s.io", "JobSet")];

/// The patch that labels the pod templates of a job object that opted in; empty for anything else.
pub fn propagate(group: &str, kind: &str, job: &Value) -> Patch {
    let meta = &job["metadata"];
    if meta["labels"][LABEL_INJECT].as_str() != Some("true") {
        return Patch(Vec::new());
    }
    let annotations: Map<String, Value> = meta["annotations"]
        .as_object()
        .map(|m| m.iter().filter(|(k, v)| k.starts_with("ckptd.io/") && v.is_string()))
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut ops = Vec::new();
    for path in template_paths(group, kind, job) {
        let refs: Vec<&str> = path.iter().map(String::as_str).collect();
        let Some(template) = pointer(job, &refs).filter(|t| t.is_object()) else { continue };
        let labels = Map::from_iter([(LABEL_INJECT.to_string(), Value::String("true".into()))]);
        let tmeta = &template["metadata"];
        if !tmeta.is_object() {
            let mut m = Map::new();
            m.insert("labels".into(), Value::Object(labels));
            if !annotations.is_empty() {
                m.insert("annotations".into(), Value::Object(annotations.clone()));
            }
            add(&mut ops, &refs, &["metadata"], Value::Object(m));
            continue;
        }
        merge(&mut ops, &refs, tmeta, "labels", &labels);
        merge(&mut ops, &refs, tmeta, "annotations", &annotations);
    }
    Patch(ops)
}

/// Adds the entries of `want` that `meta[field]` lacks, creating the map if the template has none.
fn merge(ops: &mut Vec<PatchOperation>, base: &[&str], meta: &Value, field: &str, want: &Map<String, Value>) {
    match meta[field].as_object() {
        Some(have) => {
            for (k, v) in want.iter().filter(|(k, _)| !have.contains_key(*k)) {
                add(ops, base, &["metadata", field, k], v.clone());
            }
        }
        None if !want.is_empty() => add(ops, base, &["metadata", field], Value::Object(want.clone())),
        None => {}
    }
}

fn add(ops: &mut Vec<PatchOperation>, base: &[&str], rest: &[&str], value: Value) {
    let path = PointerBuf::from_tokens(base.iter().chain(rest).copied());
    ops.push(PatchOperation::Add(AddOperation { path, value }));
}

fn pointer<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| match v {
        Value::Object(m) => m.get(*k),
        Value::Array(a) => k.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

/// Where each kind keeps its pod templates.
fn template_paths(group: &str, kind: &str, job: &Value) -> Vec<Vec<String>> {
    let s = |p: &[&str]| p.iter().map(|t| t.to_string()).collect::<Vec<_>>();
    match (group, kind) {
        ("batch", "Job") => vec![s(&["spec", "template"])],
        ("kubeflow.org", "PyTorchJob") => job["spec"]["pytorchReplicaSpecs"]
            .as_object()
            .map(|m| m.keys().map(|role| s(&["spec", "pytorchReplicaSpecs", role, "template"])).collect())
            .unwrap_or_default(),
        ("jobset.x-k8s.io", "JobSet") => job["spec"]["replicatedJobs"]
            .as_array()
            .map(|a| {
                (0..a.len())
                    .map(|i| s(&["spec", "replicatedJobs", &i.to_string(), "template", "spec", "template"]))
                    .collect()
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}
