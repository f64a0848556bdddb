//! The webhook's cluster-wide defaults: what an annotation-free pod gets.
//!
//! The file (`--config`, YAML) is written by the operator once per cluster; annotations override it per
//! pod. Unknown keys are rejected so that a typo in the ConfigMap fails the rollout instead of being
//! silently ignored.

use std::collections::BTreeMap;
use std::path::Path;

use ckpt_core::arena::MAX_SLOTS;
use serde::Deserialize;

use super::quantity::{Cpu, Memory};
use super::value::{is_dns_subdomain, parse_isolator, parse_store};
use crate::{Error, Result};

/// Everything `mutate` needs besides the pod. Built from `--agent-image` and the `--config` file.
#[derive(Debug, Clone)]
pub struct Config {
    /// The image of the injected agent container (`--agent-image`).
    pub agent_image: String,
    /// The defaults and switches from the configuration file.
    pub file: FileConfig,
}

impl Config {
    /// A configuration with the built-in defaults and the given agent image.
    pub fn new(agent_image: impl Into<String>) -> Config {
        Config { agent_image: agent_image.into(), file: FileConfig::default() }
    }

    /// Reads and checks the YAML file at `path`.
    pub fn load(agent_image: impl Into<String>, path: &Path) -> Result<Config> {
        let what = format!("--config {}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| Error::unreadable(what.clone(), path, &e))?;
        Config::from_yaml(agent_image, &text).map_err(|e| match e {
            Error::Config { reason, .. } => Error::Config { what, reason },
            other => other,
        })
    }

    /// Parses and checks a YAML configuration document.
    pub fn from_yaml(agent_image: impl Into<String>, text: &str) -> Result<Config> {
        let file: FileConfig = if text.trim().is_empty() {
            FileConfig::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| Error::unparsable("webhook configuration", &e))?
        };
        let cfg = Config { agent_image: agent_image.into(), file };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the values an operator wrote with the same rules as the per-pod annotations, so that a
    /// default can never produce a pod the webhook would deny for an annotation.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, reason: String| Error::Config { what: what.into(), reason };
        if self.agent_image.trim().is_empty() {
            return Err(bad("--agent-image", "must name an image, e.g. registry.example.com/ckptd:0.1.0".into()));
        }
        let f = &self.file;
        if let Some(store) = &f.store {
            parse_store(store).map_err(|r| bad("store", r))?;
        }
        if let Some(iso) = &f.isolator {
            parse_isolator(iso).map_err(|r| bad("isolator", r))?;
        }
        let max = Memory::parse(&f.max_arena_size).map_err(|r| bad("maxArenaSize", r))?;
        let arena = Memory::parse(&f.arena_size).map_err(|r| bad("arenaSize", r))?;
        if arena.bytes() > max.bytes() {
            return Err(bad("arenaSize", format!("{} is above maxArenaSize {}", f.arena_size, f.max_arena_size)));
        }
        if !(1..=MAX_SLOTS).contains(&f.slots) {
            return Err(bad("slots", format!("must be 1 to {MAX_SLOTS}, got {}", f.slots)));
        }
        Memory::parse(&f.shared_volume_size).map_err(|r| bad("sharedVolumeSize", r))?;
        if f.flight_recorder_entries == 0 {
            return Err(bad("flightRecorderEntries", "must be at least 1".into()));
        }
        if f.agent_command.is_empty() {
            return Err(bad("agentCommand", "must name the executable and the `agent` subcommand".into()));
        }
        if !["Always", "IfNotPresent", "Never"].contains(&f.image_pull_policy.as_str()) {
            return Err(bad(
                "imagePullPolicy",
                format!("must be Always, IfNotPresent or Never, got {}", f.image_pull_policy),
            ));
        }
        for (name, q) in &f.agent_resources.requests {
            check_resource(name, q).map_err(|r| bad("agentResources.requests", r))?;
        }
        for (name, q) in &f.agent_resources.limits {
            check_resource(name, q).map_err(|r| bad("agentResources.limits", r))?;
        }
        if let Some(secret) = &f.isolator_token_secret {
            if !is_dns_subdomain(&secret.name) || secret.key.is_empty() {
                return Err(bad(
                    "isolatorTokenSecret",
                    "needs `name` (a Secret in the pod's namespace) and `key`".into(),
                ));
            }
        }
        if f.max_body_bytes < 64 * 1024 {
            return Err(bad("maxBodyBytes", "must be at least 65536: a pod review is often tens of KiB".into()));
        }
        Ok(())
    }
}

fn check_resource(name: &str, q: &str) -> std::result::Result<(), String> {
    match name {
        "cpu" => Cpu::parse(q).map(|_| ()),
        "memory" | "ephemeral-storage" => Memory::parse(q).map(|_| ()),
        // An extended resource from a device plugin (e.g. one that hands out /dev/kmsg): whole units.
        other if other.split_once('/').is_some_and(|(d, n)| is_dns_subdomain(d) && !n.is_empty()) => {
            match q.parse::<u32>() {
                Ok(n) if n >= 1 && !q.starts_with('+') => Ok(()),
                _ => Err(format!("`{q}` for `{other}` is not a whole number of at least 1")),
            }
        }
        other => Err(format!(
            "unknown resource `{other}`: use cpu, memory, ephemeral-storage or a device plugin's domain/name"
        )),
    }
}

/// The `--config` file. Every field has a default, so an empty file is valid.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct FileConfig {
    /// Inject the agent as a native sidecar (an init container with `restartPolicy: Always`, Kubernetes
    /// 1.29+). `false` appends a regular container instead, for older clusters; a Job's pod then never
    /// completes on its own, because the agent keeps running after the trainer exits.
    pub native_sidecar: bool,
    /// The store every pod uses unless it sets `ckptd.io/store`. Without one, a pod must set it.
    pub store: Option<String>,
    /// The arena volume's size unless a pod sets `ckptd.io/arena-size`.
    pub arena_size: String,
    /// The largest `ckptd.io/arena-size` a pod may ask for: the arena is node memory.
    pub max_arena_size: String,
    /// Arena slots unless a pod sets `ckptd.io/slots`.
    pub slots: u32,
    /// The isolator's gRPC endpoint unless a pod sets `ckptd.io/isolator`; none means standalone agents.
    pub isolator: Option<String>,
    /// The Secret (in the pod's namespace) holding the bearer token the agent presents to the isolator.
    pub isolator_token_secret: Option<SecretKeyRef>,
    /// Size limit of the volume that holds NCCL debug logs and flight-recorder dumps.
    pub shared_volume_size: String,
    /// `TORCH_NCCL_TRACE_BUFFER_SIZE`: flight-recorder entries per process group.
    pub flight_recorder_entries: u32,
    /// The agent's command (the image's entrypoint is not assumed).
    pub agent_command: Vec<String>,
    /// The agent's `imagePullPolicy`.
    pub image_pull_policy: String,
    /// The agent's resources unless a pod sets the `ckptd.io/agent-*` annotations.
    pub agent_resources: Resources,
    /// The largest AdmissionReview body accepted, in bytes. The API server caps requests at 3 MiB.
    pub max_body_bytes: usize,
    /// Give the agent the node's kernel log (read-only hostPath `/dev/kmsg` and `CAP_SYSLOG`)
    /// unless a pod sets `ckptd.io/kmsg: "false"`. `false` for clusters that forbid either.
    pub kmsg: bool,
    /// Give the agent the node's GPUs for NVML (`NVIDIA_VISIBLE_DEVICES=all`,
    /// `NVIDIA_DRIVER_CAPABILITIES=utility`) unless a pod sets `ckptd.io/nvml: "false"`.
    pub nvml: bool,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            native_sidecar: true,
            store: None,
            arena_size: "16Gi".into(),
            max_arena_size: "512Gi".into(),
            slots: 1,
            isolator: None,
            isolator_token_secret: None,
            shared_volume_size: "1Gi".into(),
            flight_recorder_entries: 2000,
            agent_command: vec!["ckptd".into(), "agent".into()],
            image_pull_policy: "IfNotPresent".into(),
            agent_resources: Resources::default(),
            max_body_bytes: 4 << 20,
            kmsg: true,
            nvml: true,
        }
    }
}

/// A key of a Secret.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    /// The Secret's name.
    pub name: String,
    /// The key whose value is the token.
    pub key: String,
}

/// Container resources, as in a pod spec.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Resources {
    /// `resources.requests`.
    pub requests: BTreeMap<String, String>,
    /// `resources.limits`.
    pub limits: BTreeMap<String, String>,
}

impl Default for Resources {
    /// One core and 1 GiB requested (compression and checksums are CPU work), 4 GiB memory limit (the
    /// persist pipeline's in-flight memory is bounded), and no CPU limit: throttling the agent would
    /// stretch persists without protecting the trainer, which has its own request.
    fn default() -> Self {
        Resources {
            requests: BTreeMap::from([("cpu".into(), "1".into()), ("memory".into(), "1Gi".into())]),
            limits: BTreeMap::from([("memory".into(), "4Gi".into())]),
        }
    }
}
