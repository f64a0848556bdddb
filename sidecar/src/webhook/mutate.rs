//! `mutate`: the pure function from a pod and the configuration to a JSON patch or a denial.
//!
//! The patch is built from explicit `add` operations at the places the webhook owns, never from a diff
//! of a re-serialised pod: fields this build of k8s-openapi does not know survive untouched, and a user's
//! value is never replaced, because an `add` only ever appends to a list or creates a missing one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ckpt_core::store::rrsa;
use json_patch::{AddOperation, Patch, PatchOperation, jsonptr::PointerBuf};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HostPathVolumeSource,
    ObjectFieldSelector, Pod, ResourceRequirements, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde_json::Value;

use super::annotations::{self, LABEL_INJECT, PodSettings};
use super::config::Config;
use super::value::shown;
use crate::env;

/// The injected agent container's name; its presence marks a pod as already injected.
pub const AGENT_CONTAINER: &str = "ckptd-agent";
/// The arena volume (memory-backed emptyDir).
pub const VOLUME_ARENA: &str = "ckptd-arena";
/// The volume holding the agent's Unix socket.
pub const VOLUME_SOCKET: &str = "ckptd-socket";
/// The volume shared for NCCL debug logs and torch flight-recorder dumps, which the agent reads.
pub const VOLUME_SHARED: &str = "ckptd-nccl";
/// The volume holding the isolator token (only with `isolatorTokenSecret`).
pub const VOLUME_TOKEN: &str = "ckptd-isolator-token";
/// The node's kernel log, a read-only hostPath volume in the agent (unless `ckptd.io/kmsg: "false"`).
pub const VOLUME_KMSG: &str = "ckptd-kmsg";
/// The kernel log, at the same path on the node and in the agent.
pub const KMSG_PATH: &str = "/dev/kmsg";
/// The capability that lets the agent read the kernel log when `kernel.dmesg_restrict=1`, as
/// Kubernetes spells it (without `CAP_`).
pub const CAP_SYSLOG: &str = "SYSLOG";
/// Where the arena is mounted, the same in the agent and every trainer: the agent hands trainers
/// absolute paths inside it.
pub const ARENA_DIR: &str = "/var/run/ckptd/arena";
/// Where the socket volume is mounted.
pub const SOCKET_DIR: &str = "/var/run/ckptd/sock";
/// The agent's socket.
pub const SOCKET_PATH: &str = "/var/run/ckptd/sock/agent.sock";
/// Where the NCCL log volume is mounted.
pub const SHARED_DIR: &str = "/var/run/ckptd/nccl";
/// Where the isolator token is mounted in the agent.
pub const TOKEN_DIR: &str = "/var/run/ckptd/isolator";
/// `NCCL_DEBUG_FILE`: one file per host and process (`%h`, `%p` are expanded by NCCL). The trainer
/// gets it as `NCCL_DEBUG_FILE` and the agent the same string as `CKPTD_NCCL_LOG_GLOB`, which reads
/// `%h` and `%p` as wildcards.
pub const NCCL_DEBUG_FILE: &str = "/var/run/ckptd/nccl/nccl.%h.%p.log";
/// `TORCH_NCCL_DEBUG_INFO_TEMP_FILE`: the flight-recorder dump prefix (torch appends the rank). The
/// agent gets its directory, [`flight_recorder_dir`], as `CKPTD_FLIGHT_RECORDER_DIR`.
pub const FLIGHT_RECORDER_PREFIX: &str = "/var/run/ckptd/nccl/nccl_trace_rank_";
/// The trainer's variable for [`NCCL_DEBUG_FILE`], read by NCCL.
pub const TRAINER_NCCL_DEBUG_FILE: &str = "NCCL_DEBUG_FILE";
/// The trainer's variable for [`FLIGHT_RECORDER_PREFIX`], read by torch.
pub const TRAINER_FLIGHT_RECORDER_PREFIX: &str = "TORCH_NCCL_DEBUG_INFO_TEMP_FILE";
/// Which GPUs the NVIDIA container runtime gives the agent: all of the node's, because the device
/// plugin hands the pod's GPUs to the trainer container alone and which ones is decided after
/// admission. docs/HEALTH.md says why and what the alternative is.
pub const NVIDIA_VISIBLE_DEVICES: (&str, &str) = ("NVIDIA_VISIBLE_DEVICES", "all");
/// The driver parts the runtime mounts into the agent: `utility` is NVML and nvidia-smi, no CUDA.
pub const NVIDIA_DRIVER_CAPABILITIES: (&str, &str) = ("NVIDIA_DRIVER_CAPABILITIES", "utility");
/// The agent's metrics port in the pod.
pub const METRICS_PORT: i32 = 9101;
/// The name of the agent's metrics port, which the chart's PodMonitor scrapes.
pub const METRICS_PORT_NAME: &str = "ckptd-metrics";

/// The workload-identity variables that ACK's pod-identity webhook (RRSA) and EKS's (IRSA) set in a
/// pod's containers and the store reads to trade the projected ServiceAccount token for temporary
/// keys. They are the only variables copied from a training container into the agent: an explicit
/// list, so that nothing else of the trainer's (a secret among it) reaches the agent by accident.
pub const IDENTITY_ENV: [&str; 10] = [
    rrsa::ENV_ROLE_ARN,
    rrsa::ENV_OIDC_PROVIDER_ARN,
    rrsa::ENV_OIDC_TOKEN_FILE,
    rrsa::ENV_STS_ENDPOINT,
    rrsa::ENV_STS_REGION,
    rrsa::ENV_VPC_ENDPOINT_ENABLED,
    AWS_ROLE_ARN,
    AWS_WEB_IDENTITY_TOKEN_FILE,
    "AWS_STS_REGIONAL_ENDPOINTS",
    "AWS_REGION",
];
/// IRSA's role, read by `object_store` for `s3://`.
pub const AWS_ROLE_ARN: &str = "AWS_ROLE_ARN";
/// IRSA's projected token file, read by `object_store` for `s3://`.
pub const AWS_WEB_IDENTITY_TOKEN_FILE: &str = "AWS_WEB_IDENTITY_TOKEN_FILE";
/// The variables of [`IDENTITY_ENV`] that name a token file: the volume that holds it is mounted in
/// the agent too, read-only at the trainer's path.
pub const IDENTITY_TOKEN_FILES: [&str; 2] = [rrsa::ENV_OIDC_TOKEN_FILE, AWS_WEB_IDENTITY_TOKEN_FILE];

/// The directory torch writes flight-recorder dumps into: that of [`FLIGHT_RECORDER_PREFIX`].
pub fn flight_recorder_dir() -> &'static str {
    FLIGHT_RECORDER_PREFIX.rsplit_once('/').map_or("/", |(dir, _)| dir)
}

/// Why a pod is refused. The message goes back to whoever created the pod, so it names each offending
/// annotation and the accepted form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// One entry per problem.
    pub problems: Vec<String>,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ckptd: {}", self.problems.join("; "))
    }
}

/// Whether the pod asked for injection.
pub fn opted_in(pod: &Pod) -> bool {
    pod.metadata.labels.as_ref().and_then(|l| l.get(LABEL_INJECT)).is_some_and(|v| v == "true")
}

/// Whether the pod already has the agent (a second pass, or a pod written by hand).
pub fn has_agent(pod: &Pod) -> bool {
    let Some(spec) = &pod.spec else { return false };
    spec.containers.iter().chain(spec.init_containers.iter().flatten()).any(|c| c.name == AGENT_CONTAINER)
}

/// The patch that injects the agent into `pod`: empty for a pod that did not opt in, a [`Denial`] for
/// invalid annotations or a pod the injection would conflict with.
///
/// A pod that already has the agent (a reinvocation after another webhook changed the pod, or a
/// pod written by hand) is not injected again: its patch only gives the agent the workload identity
/// it lacks ([`identity`]), and is empty once it has it, so any number of passes converge.
pub fn mutate(pod: &Pod, cfg: &Config) -> Result<Patch, Denial> {
    if !opted_in(pod) {
        return Ok(Patch(Vec::new()));
    }
    if has_agent(pod) {
        return Ok(reinvoked(pod));
    }
    let Some(spec) = &pod.spec else {
        return Err(Denial { problems: vec!["the pod has no spec".into()] });
    };
    let settings = annotations::settings(pod, cfg).map_err(|problems| Denial { problems })?;
    check_conflicts(pod, &settings)?;
    let ranks = ranks(pod, &settings).map_err(|problem| Denial { problems: vec![problem] })?;
    if let (Some(layout), Some((_, world, from))) = (settings.parallel, &ranks)
        && let Some(why) = layout.mismatch(*world)
    {
        return Err(Denial {
            problems: vec![format!(
                "{}: {why} ({from}): make dp × tp × pp equal the world size",
                annotations::PARALLEL
            )],
        });
    }

    let mut ops = Vec::new();
    let trainer_env = trainer_env(&settings, cfg);
    for &i in &settings.containers {
        let Some(c) = spec.containers.get(i) else { continue };
        let index = i.to_string();
        let set: BTreeSet<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
        // envFrom may set anything and an `env` entry would take precedence over it, so a container with
        // envFrom only gets the variables ckptd itself defines.
        let tuning_allowed = c.env_from.as_ref().is_none_or(Vec::is_empty);
        let add: Vec<EnvVar> = trainer_env
            .iter()
            .filter(|e| !set.contains(e.name.as_str()))
            .filter(|e| tuning_allowed || e.name.starts_with(env::PREFIX))
            .cloned()
            .collect();
        append(&mut ops, &["spec", "containers", &index, "env"], c.env.is_some(), add);
        append(&mut ops, &["spec", "containers", &index, "volumeMounts"], c.volume_mounts.is_some(), shared_mounts());
    }
    append(&mut ops, &["spec", "volumes"], spec.volumes.is_some(), volumes(&settings, cfg));
    let mut agent = agent(pod, &settings, cfg, ranks);
    let (identity_env, identity_mounts) = identity(pod, &settings.containers, &agent);
    agent.env.get_or_insert_default().extend(identity_env);
    agent.volume_mounts.get_or_insert_default().extend(identity_mounts);
    if cfg.file.native_sidecar {
        append(&mut ops, &["spec", "initContainers"], spec.init_containers.is_some(), vec![agent]);
    } else {
        append(&mut ops, &["spec", "containers"], true, vec![agent]);
    }
    Ok(Patch(ops))
}

/// The patch for a pod that already has the agent: the workload identity the agent lacks, appended
/// to its `env` and `volumeMounts`; nothing else is looked at again (the first pass validated the
/// annotations). Empty when the agent has it all, or the training containers cannot be told.
fn reinvoked(pod: &Pod) -> Patch {
    let Some(spec) = &pod.spec else { return Patch(Vec::new()) };
    let named = pod.metadata.annotations.as_ref().and_then(|a| a.get(annotations::CONTAINERS));
    let Ok(trainers) = annotations::containers(pod, named) else { return Patch(Vec::new()) };
    // Without native sidecars the agent is one of `spec.containers`, which is no training container.
    let trainers: Vec<usize> =
        trainers.into_iter().filter(|&i| spec.containers.get(i).is_some_and(|c| c.name != AGENT_CONTAINER)).collect();
    let position = |cs: &[Container]| cs.iter().position(|c| c.name == AGENT_CONTAINER);
    let init = spec.init_containers.as_deref().unwrap_or_default();
    let (list, i, agent) = match (position(init), position(&spec.containers)) {
        (Some(i), _) => ("initContainers", i, &init[i]),
        (None, Some(i)) => ("containers", i, &spec.containers[i]),
        (None, None) => return Patch(Vec::new()),
    };
    let (env, mounts) = identity(pod, &trainers, agent);
    let index = i.to_string();
    let mut ops = Vec::new();
    append(&mut ops, &["spec", list, &index, "env"], agent.env.is_some(), env);
    append(&mut ops, &["spec", list, &index, "volumeMounts"], agent.volume_mounts.is_some(), mounts);
    Patch(ops)
}

/// What `agent` lacks of the workload identity of the first training container that has one: the
/// [`IDENTITY_ENV`] variables it sets (as it sets them) that the agent does not, and for each token
/// file ([`IDENTITY_TOKEN_FILES`]) the trainer's mount that holds it (the deepest whose path is a
/// parent of the file), read-only at the same path, unless the agent mounts something there already.
fn identity(pod: &Pod, trainers: &[usize], agent: &Container) -> (Vec<EnvVar>, Vec<VolumeMount>) {
    let Some(spec) = &pod.spec else { return (Vec::new(), Vec::new()) };
    let is_identity = |e: &&EnvVar| IDENTITY_ENV.contains(&e.name.as_str());
    let Some(source) = trainers
        .iter()
        .filter_map(|&i| spec.containers.get(i))
        .find(|c| c.env.iter().flatten().any(|e| is_identity(&e)))
    else {
        return (Vec::new(), Vec::new());
    };
    let mut have: BTreeSet<&str> = agent.env.iter().flatten().map(|e| e.name.as_str()).collect();
    let env: Vec<EnvVar> =
        source.env.iter().flatten().filter(is_identity).filter(|e| have.insert(e.name.as_str())).cloned().collect();

    let mut mounted: BTreeSet<&str> =
        agent.volume_mounts.iter().flatten().map(|m| m.mount_path.trim_end_matches('/')).collect();
    let mut mounts = Vec::new();
    for var in IDENTITY_TOKEN_FILES {
        // The path the agent will read: its own value when it has one, else the one copied above.
        let Some(file) = literal_value(agent, var).or_else(|| literal_value(source, var)) else { continue };
        let holds = |m: &&VolumeMount| {
            let root = m.mount_path.trim_end_matches('/');
            !root.is_empty() && file.strip_prefix(root).is_some_and(|rest| rest.starts_with('/'))
        };
        let Some(m) = source.volume_mounts.iter().flatten().filter(holds).max_by_key(|m| m.mount_path.len()) else {
            continue;
        };
        if mounted.insert(m.mount_path.trim_end_matches('/')) {
            mounts.push(VolumeMount {
                read_only: Some(true),
                recursive_read_only: None,
                mount_propagation: None,
                ..m.clone()
            });
        }
    }
    (env, mounts)
}

/// The literal value of the container's variable `name`, if it sets one.
fn literal_value<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env.iter().flatten().find(|e| e.name == name).and_then(|e| e.value.as_deref())
}

/// Adds `items` to the list at `path`: one `add` of the whole list when the pod has none, else one
/// append (`/-`) per item, so that nothing already there is replaced.
fn append<T: serde::Serialize>(ops: &mut Vec<PatchOperation>, path: &[&str], exists: bool, items: Vec<T>) {
    if items.is_empty() {
        return;
    }
    let values: Vec<Value> = items.iter().filter_map(|i| serde_json::to_value(i).ok()).collect();
    if exists {
        for value in values {
            let path = PointerBuf::from_tokens(path.iter().copied().chain(["-"]));
            ops.push(PatchOperation::Add(AddOperation { path, value }));
        }
    } else {
        let path = PointerBuf::from_tokens(path.iter().copied());
        ops.push(PatchOperation::Add(AddOperation { path, value: Value::Array(values) }));
    }
}

/// Refuses a pod whose own volumes or mounts would collide with the injected ones: renaming or moving
/// the user's would change their pod, and skipping ours would leave the agent half-installed.
fn check_conflicts(pod: &Pod, s: &PodSettings) -> Result<(), Denial> {
    let Some(spec) = &pod.spec else { return Ok(()) };
    let mut problems = Vec::new();
    let ours = [VOLUME_ARENA, VOLUME_SOCKET, VOLUME_SHARED, VOLUME_TOKEN, VOLUME_KMSG];
    for v in spec.volumes.iter().flatten().filter(|v| ours.contains(&v.name.as_str())) {
        problems.push(format!(
            "the pod already has a volume named {} but no {AGENT_CONTAINER} container: rename the volume, it is reserved for ckptd",
            v.name
        ));
    }
    let paths = [ARENA_DIR, SOCKET_DIR, SHARED_DIR];
    for c in s.containers.iter().filter_map(|&i| spec.containers.get(i)) {
        for m in c.volume_mounts.iter().flatten() {
            if paths.contains(&m.mount_path.trim_end_matches('/')) {
                problems.push(format!(
                    "container {} already mounts {} at {}, where ckptd mounts its own volume: move that mount",
                    c.name, m.name, m.mount_path
                ));
            }
        }
    }
    if store_mount(pod, s).is_err() {
        problems.push(format!(
            "{}: {} is on no volume mounted in the training containers; mount the shared file system (e.g. a PersistentVolumeClaim) in the trainer at the store directory or a parent of it, and the webhook mounts it in the agent too",
            annotations::STORE,
            s.store
        ));
    }
    if problems.is_empty() { Ok(()) } else { Err(Denial { problems }) }
}

/// For a `file://` store, the training container's mount that holds the directory, so the agent can
/// mount the same volume at the same path; `Ok(None)` for object stores.
fn store_mount(pod: &Pod, s: &PodSettings) -> Result<Option<VolumeMount>, ()> {
    let Some(dir) = url::Url::parse(&s.store).ok().filter(|u| u.scheme() == "file").map(|u| u.path().to_string())
    else {
        return Ok(None);
    };
    let spec = pod.spec.as_ref().ok_or(())?;
    let under = |m: &VolumeMount| {
        let root = m.mount_path.trim_end_matches('/');
        !root.is_empty() && (dir == root || dir.starts_with(&format!("{root}/")))
    };
    s.containers
        .iter()
        .filter_map(|&i| spec.containers.get(i))
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .filter(|m| under(m) && m.sub_path_expr.is_none())
        .max_by_key(|m| m.mount_path.len())
        .map(|m| Some(VolumeMount { read_only: None, recursive_read_only: None, ..m.clone() }))
        .ok_or(())
}

fn literal(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), value_from: None }
}

fn field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { api_version: Some("v1".into()), field_path: path.into() }),
            ..Default::default()
        }),
    }
}

/// The variables every training container gets, unless it sets them itself.
fn trainer_env(s: &PodSettings, cfg: &Config) -> Vec<EnvVar> {
    vec![
        literal(env::ENV_SOCKET, SOCKET_PATH),
        literal(env::ENV_JOB, &s.job),
        literal(env::ENV_ARENA_DIR, ARENA_DIR),
        literal("NCCL_DEBUG", "WARN"),
        literal(TRAINER_NCCL_DEBUG_FILE, NCCL_DEBUG_FILE),
        literal("TORCH_NCCL_TRACE_BUFFER_SIZE", cfg.file.flight_recorder_entries.to_string()),
        literal("TORCH_NCCL_DUMP_ON_TIMEOUT", "1"),
        literal(TRAINER_FLIGHT_RECORDER_PREFIX, FLIGHT_RECORDER_PREFIX),
    ]
}

/// The mounts shared by the agent and the trainers.
fn shared_mounts() -> Vec<VolumeMount> {
    [(VOLUME_ARENA, ARENA_DIR), (VOLUME_SOCKET, SOCKET_DIR), (VOLUME_SHARED, SHARED_DIR)]
        .into_iter()
        .map(|(name, path)| VolumeMount { name: name.into(), mount_path: path.into(), ..Default::default() })
        .collect()
}

fn volumes(s: &PodSettings, cfg: &Config) -> Vec<Volume> {
    let empty_dir = |medium: Option<&str>, size: &str| EmptyDirVolumeSource {
        medium: medium.map(Into::into),
        size_limit: Some(Quantity(size.into())),
    };
    let mut v = vec![
        Volume {
            name: VOLUME_ARENA.into(),
            empty_dir: Some(empty_dir(Some("Memory"), &s.arena_size)),
            ..Default::default()
        },
        Volume { name: VOLUME_SOCKET.into(), empty_dir: Some(empty_dir(None, "1Mi")), ..Default::default() },
        Volume {
            name: VOLUME_SHARED.into(),
            empty_dir: Some(empty_dir(None, &cfg.file.shared_volume_size)),
            ..Default::default()
        },
    ];
    if s.kmsg {
        v.push(Volume {
            name: VOLUME_KMSG.into(),
            host_path: Some(HostPathVolumeSource { path: KMSG_PATH.into(), type_: Some("CharDevice".into()) }),
            ..Default::default()
        });
    }
    if let (Some(_), Some(secret)) = (&s.isolator, &cfg.file.isolator_token_secret) {
        v.push(Volume {
            name: VOLUME_TOKEN.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.name.clone()),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    v
}

/// Global ranks, world size and where they came from (quoted in denials) from the first training
/// container's literal PyTorch variables:
/// torchrun's `PET_NODE_RANK`/`PET_NPROC_PER_NODE`/`PET_NNODES` (set by the PyTorchJob operator), else
/// one process per pod with `RANK`/`WORLD_SIZE`. Anything else (elastic `min:max`, `valueFrom`) is left
/// to the agent, which learns ranks from the trainers that attach (`Ok(None)`).
///
/// Values the agent would refuse at start-up (no ranks, more ranks than one agent serves, a rank
/// outside the world, a world size beyond `u32`) are an `Err`: the pod is denied here instead of
/// crash-looping on the agent's configuration error.
fn ranks(pod: &Pod, s: &PodSettings) -> Result<Option<(String, u64, String)>, String> {
    let Some(c) = pod.spec.as_ref().zip(s.containers.first()).and_then(|(spec, &i)| spec.containers.get(i)) else {
        return Ok(None);
    };
    let env: BTreeMap<&str, &str> =
        c.env.iter().flatten().filter_map(|e| Some((e.name.as_str(), e.value.as_deref()?))).collect();
    let num = |k: &str| env.get(k).and_then(|v| v.parse::<u64>().ok());
    let (ranks, world, from) = if let (Some(node), Some(nproc), Some(nnodes)) =
        (num("PET_NODE_RANK"), num("PET_NPROC_PER_NODE"), num("PET_NNODES"))
    {
        let from = format!(
            "container {}: PET_NODE_RANK={node}, PET_NPROC_PER_NODE={nproc}, PET_NNODES={nnodes}",
            shown(&c.name)
        );
        if nproc == 0 || nnodes == 0 {
            return Err(format!("{from} give no ranks: PET_NPROC_PER_NODE and PET_NNODES must be at least 1"));
        }
        if node >= nnodes {
            return Err(format!("{from}: the node rank must be below PET_NNODES"));
        }
        let range = node.checked_mul(nproc).and_then(|first| Some((first, first.checked_add(nproc - 1)?)));
        let (Some((first, last)), Some(world)) = (range, nnodes.checked_mul(nproc)) else {
            return Err(format!("{from} give ranks beyond {}", u32::MAX));
        };
        let ranks = if first == last { first.to_string() } else { format!("{first}-{last}") };
        (ranks, world, from)
    } else {
        match (num("RANK"), num("WORLD_SIZE")) {
            (Some(rank), Some(world)) => {
                let from = format!("container {}: RANK={rank}, WORLD_SIZE={world}", shown(&c.name));
                if rank >= world {
                    return Err(format!("{from}: RANK must be below WORLD_SIZE"));
                }
                (rank.to_string(), world, from)
            }
            _ => return Ok(None),
        }
    };
    // The agent reads these back with the same parser and bounds; what it would refuse is refused here.
    if u32::try_from(world).is_err() {
        return Err(format!("{from} give a world size of {world}, above the agent's limit {}", u32::MAX));
    }
    crate::agent::parse_ranks(&ranks).map_err(|e| {
        format!(
            "{from} give ranks {ranks}, which the agent refuses ({e}): one pod runs at most {} processes",
            crate::agent::MAX_RANKS_PER_AGENT
        )
    })?;
    Ok(Some((ranks, world, from)))
}

/// The agent container; `ranks` is [`ranks`]'s answer (ranks, world size, where they came from).
fn agent(pod: &Pod, s: &PodSettings, cfg: &Config, ranks: Option<(String, u64, String)>) -> Container {
    let mut env = vec![
        literal(env::ENV_SOCKET, SOCKET_PATH),
        literal(env::ENV_ARENA_DIR, ARENA_DIR),
        literal(env::ENV_STORE, &s.store),
        literal(env::ENV_JOB, &s.job),
        literal(env::ENV_SLOTS, s.slots.to_string()),
        literal(env::ENV_METRICS_ADDR, format!("0.0.0.0:{METRICS_PORT}")),
    ];
    let mut mounts = shared_mounts();
    if let Some(iso) = &s.isolator {
        env.push(literal(env::ENV_ISOLATOR, iso));
        if let Some(secret) = &cfg.file.isolator_token_secret {
            env.push(literal(env::ENV_ISOLATOR_TOKEN_FILE, format!("{TOKEN_DIR}/{}", secret.key)));
            mounts.push(VolumeMount {
                name: VOLUME_TOKEN.into(),
                mount_path: TOKEN_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            });
        }
    }
    if let Some((ranks, world, _)) = ranks {
        env.push(literal(env::ENV_RANKS, ranks));
        env.push(literal(env::ENV_WORLD_SIZE, world.to_string()));
    }
    if let Some(layout) = s.parallel {
        env.push(literal(env::ENV_PARALLEL, layout.to_string()));
    }
    if let Some(on_resize) = &s.on_resize {
        env.push(literal(env::ENV_ON_RESIZE, on_resize.clone()));
    }
    // What each health reporter reads: the trainer's NCCL paths (the same constants), the kernel
    // log and the GPUs, or the switch that says the pod left a reporter out. InfiniBand needs
    // nothing: the container's read-only /sys shows the RDMA devices of the pod's network namespace.
    env.extend([
        literal(env::ENV_NCCL_LOG_GLOB, NCCL_DEBUG_FILE),
        literal(env::ENV_FLIGHT_RECORDER_DIR, flight_recorder_dir()),
    ]);
    let mut capabilities = None;
    if s.kmsg {
        env.push(literal(env::ENV_KMSG, KMSG_PATH));
        mounts.push(VolumeMount {
            name: VOLUME_KMSG.into(),
            mount_path: KMSG_PATH.into(),
            read_only: Some(true),
            ..Default::default()
        });
        capabilities = Some(Capabilities { add: Some(vec![CAP_SYSLOG.into()]), drop: None });
    } else {
        env.push(literal(env::ENV_NO_KMSG, "true"));
    }
    if s.nvml {
        env.extend([NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES].map(|(k, v)| literal(k, v)));
    } else {
        env.push(literal(env::ENV_NO_NVML, "true"));
    }
    env.extend([
        field(env::ENV_NODE_NAME, "spec.nodeName"),
        field(env::ENV_POD_NAME, "metadata.name"),
        field(env::ENV_POD_NAMESPACE, "metadata.namespace"),
        field(env::ENV_POD_UID, "metadata.uid"),
    ]);
    if let Ok(Some(m)) = store_mount(pod, s) {
        mounts.push(m);
    }
    let quantities = |m: &BTreeMap<String, String>| {
        m.iter().map(|(k, v)| (k.clone(), Quantity(v.clone()))).collect::<BTreeMap<_, _>>()
    };
    Container {
        name: AGENT_CONTAINER.into(),
        image: Some(cfg.agent_image.clone()),
        image_pull_policy: Some(cfg.file.image_pull_policy.clone()),
        command: Some(cfg.file.agent_command.clone()),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some(METRICS_PORT_NAME.into()),
            container_port: METRICS_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&s.requests)).filter(|m| !m.is_empty()),
            limits: Some(quantities(&s.limits)).filter(|m| !m.is_empty()),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        restart_policy: cfg.file.native_sidecar.then(|| "Always".into()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities,
            ..Default::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The injected pod as JSON, the patch applied.
    fn injected(annotations: Value) -> Value {
        let mut pod = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "train-0", "labels": {"ckptd.io/inject": "true"}, "annotations": annotations},
            "spec": {"containers": [{"name": "trainer", "image": "pytorch"}]}
        });
        let typed: Pod = serde_json::from_value(pod.clone()).unwrap();
        let patch = mutate(&typed, &Config::new("img:1")).unwrap();
        json_patch::patch(&mut pod, &patch).unwrap();
        pod
    }

    fn var<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
        container["env"].as_array()?.iter().find(|e| e["name"] == name)?["value"].as_str()
    }

    #[test]
    fn the_agent_reads_the_nccl_files_the_trainer_writes() {
        let pod = injected(serde_json::json!({"ckptd.io/store": "s3://b/p"}));
        let (trainer, agent) = (&pod["spec"]["containers"][0], &pod["spec"]["initContainers"][0]);
        let debug_file = var(trainer, TRAINER_NCCL_DEBUG_FILE).unwrap();
        let glob = var(agent, env::ENV_NCCL_LOG_GLOB).unwrap();
        assert_eq!(glob, debug_file, "one constant, two names");
        // NCCL expands %h to the host name and %p to the process id.
        let pattern = glob::Pattern::new(&crate::health::nccl::glob_of(glob)).unwrap();
        for written in [
            debug_file.replace("%h", "train-0").replace("%p", "4242"),
            debug_file.replace("%h", "n.x-1").replace("%p", "1"),
        ] {
            assert!(pattern.matches_path(Path::new(&written)), "{written} is missed by {pattern}");
        }
        assert!(!pattern.matches_path(Path::new("/var/run/ckptd/nccl/nccl_trace_rank_0")), "a dump is not a log");

        // torch appends the rank to the prefix: the dump lands in the agent's directory.
        let prefix = var(trainer, TRAINER_FLIGHT_RECORDER_PREFIX).unwrap();
        let dump = format!("{prefix}7");
        let dir = var(agent, env::ENV_FLIGHT_RECORDER_DIR).unwrap();
        assert_eq!(Path::new(&dump).parent(), Some(Path::new(dir)));
        // Both live on the volume the two containers share.
        let shared = |c: &Value| {
            c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["name"] == VOLUME_SHARED && m["mountPath"] == SHARED_DIR)
        };
        assert!(shared(trainer) && shared(agent));
        assert!(Path::new(dir).starts_with(SHARED_DIR) && Path::new(debug_file).starts_with(SHARED_DIR));
        assert!(var(agent, TRAINER_NCCL_DEBUG_FILE).is_none(), "the agent runs no NCCL");
    }

    #[test]
    fn the_agent_gets_the_kernel_log_and_the_gpus_unless_the_pod_opts_out() {
        let pod = injected(serde_json::json!({"ckptd.io/store": "s3://b/p"}));
        let agent = &pod["spec"]["initContainers"][0];
        assert_eq!(agent["securityContext"]["capabilities"], serde_json::json!({"add": ["SYSLOG"]}));
        assert_eq!(agent["securityContext"]["allowPrivilegeEscalation"], false);
        assert!(agent["securityContext"]["privileged"].is_null());
        let kmsg = agent["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == VOLUME_KMSG).unwrap();
        assert_eq!((kmsg["mountPath"].as_str(), kmsg["readOnly"].as_bool()), (Some(KMSG_PATH), Some(true)));
        let vol = pod["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == VOLUME_KMSG).unwrap();
        assert_eq!(vol["hostPath"], serde_json::json!({"path": "/dev/kmsg", "type": "CharDevice"}));
        assert_eq!(var(agent, env::ENV_KMSG), Some(KMSG_PATH));
        assert_eq!(var(agent, "NVIDIA_VISIBLE_DEVICES"), Some("all"));
        assert_eq!(var(agent, "NVIDIA_DRIVER_CAPABILITIES"), Some("utility"));
        let trainer = &pod["spec"]["containers"][0];
        assert!(var(trainer, "NVIDIA_VISIBLE_DEVICES").is_none(), "the trainer's GPUs are the device plugin's");
        assert!(trainer["volumeMounts"].as_array().unwrap().iter().all(|m| m["name"] != VOLUME_KMSG));

        let pod = injected(
            serde_json::json!({"ckptd.io/store": "s3://b/p", "ckptd.io/kmsg": "false", "ckptd.io/nvml": "false"}),
        );
        let agent = &pod["spec"]["initContainers"][0];
        assert!(agent["securityContext"]["capabilities"].is_null());
        assert!(agent["volumeMounts"].as_array().unwrap().iter().all(|m| m["name"] != VOLUME_KMSG));
        assert!(pod["spec"]["volumes"].as_array().unwrap().iter().all(|v| v["name"] != VOLUME_KMSG));
        assert_eq!((var(agent, env::ENV_NO_KMSG), var(agent, env::ENV_NO_NVML)), (Some("true"), Some("true")));
        assert!(var(agent, "NVIDIA_VISIBLE_DEVICES").is_none() && var(agent, env::ENV_KMSG).is_none());
    }

    #[test]
    fn a_bad_switch_is_a_denial_naming_the_annotation() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "t", "labels": {"ckptd.io/inject": "true"},
                         "annotations": {"ckptd.io/store": "s3://b/p", "ckptd.io/kmsg": "no", "ckptd.io/nvml": "True"}},
            "spec": {"containers": [{"name": "trainer"}]}
        }))
        .unwrap();
        let d = mutate(&pod, &Config::new("img:1")).unwrap_err();
        assert_eq!(d.problems.len(), 2, "{d}");
        assert!(d.problems[0].starts_with("ckptd.io/kmsg: `no` is not \"true\" or \"false\""), "{d}");
        assert!(d.problems[1].starts_with("ckptd.io/nvml: `True` is not"), "{d}");
        let cfg = Config::from_yaml("img:1", "kmsg: false\n").unwrap();
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "t", "labels": {"ckptd.io/inject": "true"}, "annotations": {"ckptd.io/store": "s3://b/p"}},
            "spec": {"containers": [{"name": "trainer"}]}
        }))
        .unwrap();
        let text = serde_json::to_string(&mutate(&pod, &cfg).unwrap()).unwrap();
        assert!(!text.contains("/dev/kmsg") && text.contains(env::ENV_NO_KMSG), "the cluster default: {text}");

        // A device plugin's resource for /dev/kmsg goes into the agent's limits from the configuration.
        let cfg = Config::from_yaml("img:1", "agentResources: {limits: {example.com/kmsg: \"1\"}}\n").unwrap();
        let text = serde_json::to_string(&mutate(&pod, &cfg).unwrap()).unwrap();
        assert!(text.contains(r#""limits":{"example.com/kmsg":"1"}"#), "{text}");
        for bad in
            ["{limits: {example.com/kmsg: \"0\"}}", "{limits: {kmsg: \"1\"}}", "{limits: {example.com/kmsg: 1Gi}}"]
        {
            assert!(Config::from_yaml("img:1", &format!("agentResources: {bad}\n")).is_err(), "{bad}");
        }
    }
}
