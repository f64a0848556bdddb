//! The per-pod settings: `ckptd.io/*` annotations merged over the cluster defaults.
//!
//! Every annotation is validated, and every problem is reported at once with the annotation's name and
//! the accepted form, because the person reading the denial is looking at a failed `kubectl apply` or a
//! job controller's event and has to fix the manifest in one go.

use std::collections::{BTreeMap, BTreeSet};

use ckpt_core::arena::MAX_SLOTS;
use k8s_openapi::api::core::v1::Pod;

use super::config::Config;
use super::quantity::{CPU_FORM, Cpu, MEMORY_FORM, Memory};
use super::value::{is_dns_subdomain, parse_isolator, parse_store, shown};
use crate::layout::Layout;

/// The opt-in label: only pods with `ckptd.io/inject: "true"` are changed.
pub const LABEL_INJECT: &str = "ckptd.io/inject";

/// Annotation: the job name (`CKPTD_JOB`); defaults to the PyTorchJob, JobSet or Job label, then the pod name.
pub const JOB: &str = "ckptd.io/job";
/// Annotation: the store URL (`CKPTD_STORE`).
pub const STORE: &str = "ckptd.io/store";
/// Annotation: the arena volume's size (the memory-backed emptyDir's `sizeLimit`).
pub const ARENA_SIZE: &str = "ckptd.io/arena-size";
/// Annotation: arena slots (`CKPTD_SLOTS`).
pub const SLOTS: &str = "ckptd.io/slots";
/// Annotation: the isolator's endpoint (`CKPTD_ISOLATOR`), or `none`.
pub const ISOLATOR: &str = "ckptd.io/isolator";
/// Annotation: the training containers, comma-separated; default all of `spec.containers`.
pub const CONTAINERS: &str = "ckptd.io/containers";
/// Annotation: the agent's CPU request.
pub const AGENT_CPU_REQUEST: &str = "ckptd.io/agent-cpu-request";
/// Annotation: the agent's CPU limit.
pub const AGENT_CPU_LIMIT: &str = "ckptd.io/agent-cpu-limit";
/// Annotation: the agent's memory request.
pub const AGENT_MEMORY_REQUEST: &str = "ckptd.io/agent-memory-request";
/// Annotation: the agent's memory limit.
pub const AGENT_MEMORY_LIMIT: &str = "ckptd.io/agent-memory-limit";

/// Annotation: `"false"` leaves the kernel-log reporter out: no hostPath `/dev/kmsg`, no
/// `CAP_SYSLOG` (for namespaces whose policy forbids either, such as Pod Security `baseline`).
pub const KMSG: &str = "ckptd.io/kmsg";
/// Annotation: `"false"` leaves the NVML reporter out: the agent gets no `NVIDIA_*` variables and
/// so no GPU from the NVIDIA container runtime.
pub const NVML: &str = "ckptd.io/nvml";

/// Annotation: the job's parallel layout, e.g. `dp=8,tp=4,pp=2` ([`Layout`]), passed to the agent
/// as `CKPTD_PARALLEL`. Its product must be the job's world size.
pub const PARALLEL: &str = "ckptd.io/parallel";
/// Annotation: what a rank restores from a step saved by another number of ranks, `wait` (the
/// default: refused, the job waits for a replacement) or `replicas` (the data-parallel replicas hold
/// the same state; see [`crate::resize`]), passed to the agent as `CKPTD_ON_RESIZE`.
pub const ON_RESIZE: &str = "ckptd.io/on-resize";

/// Every annotation the webhook reads. Any other `ckptd.io/` annotation is a typo and is denied.
pub const KNOWN: [&str; 14] = [
    JOB,
    PARALLEL,
    ON_RESIZE,
    KMSG,
    NVML,
    STORE,
    ARENA_SIZE,
    SLOTS,
    ISOLATOR,
    CONTAINERS,
    AGENT_CPU_REQUEST,
    AGENT_CPU_LIMIT,
    AGENT_MEMORY_REQUEST,
    AGENT_MEMORY_LIMIT,
];

/// The smallest arena: the header page plus room for a small model; below it the agent cannot start.
pub const MIN_ARENA_BYTES: u64 = 64 << 20;

/// Pod labels that name the job a pod belongs to, most specific first. A JobSet's pods also carry the
/// child Job's label, so the JobSet label must win.
pub const JOB_LABELS: [&str; 4] =
    ["training.kubeflow.org/job-name", "jobset.sigs.k8s.io/jobset-name", "batch.kubernetes.io/job-name", "job-name"];

/// The settings of one pod, after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSettings {
    /// `CKPTD_JOB`.
    pub job: String,
    /// `CKPTD_STORE`.
    pub store: String,
    /// The arena volume's `sizeLimit`, as written.
    pub arena_size: String,
    /// `CKPTD_SLOTS`.
    pub slots: u32,
    /// `CKPTD_ISOLATOR`, if the agent reports to one.
    pub isolator: Option<String>,
    /// Indexes into `spec.containers` of the training containers.
    pub containers: Vec<usize>,
    /// The agent's `resources.requests`.
    pub requests: BTreeMap<String, String>,
    /// The agent's `resources.limits`.
    pub limits: BTreeMap<String, String>,
    /// Whether the agent reads the node's kernel log (hostPath `/dev/kmsg` and `CAP_SYSLOG`).
    pub kmsg: bool,
    /// Whether the agent gets the node's GPUs through the NVIDIA container runtime for NVML.
    pub nvml: bool,
    /// The declared parallel layout (`CKPTD_PARALLEL`), if any.
    pub parallel: Option<Layout>,
    /// `CKPTD_ON_RESIZE`, as written, when the annotation is set.
    pub on_resize: Option<String>,
}

/// Reads and validates the pod's settings; `Err` holds one message per problem.
pub fn settings(pod: &Pod, cfg: &Config) -> Result<PodSettings, Vec<String>> {
    let empty = BTreeMap::new();
    let ann = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let mut problems = Vec::new();

    // `ckptd.io/inject` is the label; the same key as an annotation is redundant, not a typo.
    let unknown =
        |k: &&String| k.starts_with("ckptd.io/") && k.as_str() != LABEL_INJECT && !KNOWN.contains(&k.as_str());
    for key in ann.keys().filter(unknown) {
        problems.push(format!("unknown annotation {key}: the webhook reads {}", KNOWN.join(", ")));
    }

    let job = match ann.get(JOB) {
        Some(v) if is_dns_subdomain(v) => Some(v.clone()),
        Some(v) => {
            let vv = shown(v);
            problems.push(format!("{JOB}: `{vv}` is not a job name: use lowercase letters, digits, `-` and `.`, starting and ending with a letter or digit, at most 253 characters (e.g. llama-70b)"));
            None
        }
        None => {
            let job = default_job(pod);
            if job.is_none() {
                problems.push(format!("cannot tell which job this pod belongs to: set the annotation {JOB} to the job name (e.g. llama-70b), or create the pod from a PyTorchJob, JobSet or Job"));
            }
            job
        }
    };

    let store = match ann.get(STORE).or(cfg.file.store.as_ref()) {
        Some(v) => parse_store(v).map_err(|r| problems.push(format!("{STORE}: {r}"))).ok(),
        None => {
            problems.push(format!(
                "{STORE} is required (no default store is configured): set it to the checkpoint location, e.g. s3://bucket/checkpoints"
            ));
            None
        }
    };

    let arena_size = ann.get(ARENA_SIZE).unwrap_or(&cfg.file.arena_size).clone();
    match Memory::parse(&arena_size) {
        Ok(m) => {
            let max = Memory::parse(&cfg.file.max_arena_size).map(Memory::bytes).unwrap_or(u64::MAX);
            if m.bytes() < MIN_ARENA_BYTES || m.bytes() > max {
                problems.push(format!(
                    "{ARENA_SIZE}: `{}` is outside the allowed range 64Mi to {}",
                    shown(&arena_size),
                    cfg.file.max_arena_size
                ));
            }
        }
        Err(r) => problems.push(format!("{ARENA_SIZE}: {r}")),
    }

    let slots = match ann.get(SLOTS) {
        None => cfg.file.slots,
        Some(v) => match v.parse::<u32>() {
            Ok(n) if (1..=MAX_SLOTS).contains(&n) && !v.starts_with('+') => n,
            _ => {
                let vv = shown(v);
                problems.push(format!("{SLOTS}: `{vv}` is not a whole number from 1 to {MAX_SLOTS} (e.g. 2)"));
                cfg.file.slots
            }
        },
    };

    let isolator = match ann.get(ISOLATOR).or(cfg.file.isolator.as_ref()) {
        None => None,
        Some(v) => parse_isolator(v).unwrap_or_else(|r| {
            problems.push(format!("{ISOLATOR}: {r}"));
            None
        }),
    };

    let containers = containers(pod, ann.get(CONTAINERS)).unwrap_or_else(|r| {
        problems.push(r);
        Vec::new()
    });

    let mut requests = cfg.file.agent_resources.requests.clone();
    let mut limits = cfg.file.agent_resources.limits.clone();
    for (key, resource, is_limit) in [
        (AGENT_CPU_REQUEST, "cpu", false),
        (AGENT_CPU_LIMIT, "cpu", true),
        (AGENT_MEMORY_REQUEST, "memory", false),
        (AGENT_MEMORY_LIMIT, "memory", true),
    ] {
        let Some(v) = ann.get(key) else { continue };
        let ok = if resource == "cpu" {
            Cpu::parse(v).map(|_| ()).map_err(|_| CPU_FORM)
        } else {
            Memory::parse(v).map(|_| ()).map_err(|_| MEMORY_FORM)
        };
        match ok {
            Ok(()) => {
                let into = if is_limit { &mut limits } else { &mut requests };
                into.insert(resource.into(), v.clone());
            }
            Err(form) => problems.push(format!("{key}: `{}` is not {form}", shown(v))),
        }
    }
    for (resource, req_key, lim_key) in
        [("cpu", AGENT_CPU_REQUEST, AGENT_CPU_LIMIT), ("memory", AGENT_MEMORY_REQUEST, AGENT_MEMORY_LIMIT)]
    {
        let (Some(r), Some(l)) = (requests.get(resource), limits.get(resource)) else { continue };
        let above = if resource == "cpu" {
            matches!((Cpu::parse(r), Cpu::parse(l)), (Ok(r), Ok(l)) if r > l)
        } else {
            matches!((Memory::parse(r), Memory::parse(l)), (Ok(r), Ok(l)) if r > l)
        };
        if above {
            problems.push(format!(
                "{req_key}: the agent's {resource} request {r} is above its limit {l} (set {lim_key} too, or lower the request)"
            ));
        }
    }

    let mut switch = |key: &str, default: bool, what: &str| match ann.get(key).map(String::as_str) {
        None => default,
        Some("true") => true,
        Some("false") => false,
        Some(v) => {
            problems.push(format!("{key}: `{}` is not \"true\" or \"false\" (\"false\" leaves out {what})", shown(v)));
            default
        }
    };
    let kmsg = switch(KMSG, cfg.file.kmsg, "the kernel-log reporter, its hostPath /dev/kmsg and CAP_SYSLOG");
    let nvml = switch(NVML, cfg.file.nvml, "the NVML reporter and the agent's NVIDIA_* variables");

    let parallel =
        ann.get(PARALLEL).and_then(|v| v.parse::<Layout>().map_err(|r| problems.push(format!("{PARALLEL}: {r}"))).ok());
    // The agent parses it with the same function, with the layout above.
    let on_resize = ann.get(ON_RESIZE).and_then(|v| {
        let layout = parallel.map(|l| l.to_string());
        match crate::resize::parse(Some(v), layout.as_deref()) {
            Ok(_) => Some(v.trim().to_string()),
            Err(r) => {
                problems.push(format!("{ON_RESIZE}: {r}"));
                None
            }
        }
    });

    match (job, store, problems.is_empty()) {
        (Some(job), Some(store), true) => Ok(PodSettings {
            job,
            store,
            arena_size,
            slots,
            isolator,
            containers,
            requests,
            limits,
            kmsg,
            nvml,
            parallel,
            on_resize,
        }),
        _ => Err(problems),
    }
}

/// The job name from the usual controller labels, else the pod's own name.
fn default_job(pod: &Pod) -> Option<String> {
    let labels = pod.metadata.labels.as_ref();
    JOB_LABELS
        .iter()
        .find_map(|l| labels.and_then(|m| m.get(*l)))
        .or(pod.metadata.name.as_ref())
        .filter(|v| is_dns_subdomain(v))
        .cloned()
}

/// Indexes of the training containers: those named in `ckptd.io/containers`, else all of them.
pub(crate) fn containers(pod: &Pod, named: Option<&String>) -> Result<Vec<usize>, String> {
    let all: Vec<&str> =
        pod.spec.as_ref().map(|s| s.containers.iter().map(|c| c.name.as_str()).collect()).unwrap_or_default();
    let Some(list) = named else {
        return Ok((0..all.len()).collect());
    };
    let form = "a comma-separated list of the pod's container names (e.g. trainer or trainer,evaluator)";
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim) {
        let nn = shown(name);
        if name.is_empty() {
            return Err(format!("{CONTAINERS}: `{}` has an empty name: use {form}", shown(list)));
        }
        if !seen.insert(name) {
            return Err(format!("{CONTAINERS}: `{nn}` is listed twice: use {form}"));
        }
        match all.iter().position(|c| *c == name) {
            Some(i) => out.push(i),
            None => {
                return Err(format!(
                    "{CONTAINERS}: the pod has no container `{nn}` (it has {}): use {form}",
                    all.join(", ")
                ));
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}
