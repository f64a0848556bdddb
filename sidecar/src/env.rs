//! Every environment variable ckptd reads, by name, in one place.
//!
//! Each flag of `ckptd agent`, `ckptd isolator`, `ckptd webhook`, the health reporters and
//! `ckptctl` falls back to the variable named here; the webhook writes the same names into the pods
//! it injects, so a rename here reaches both sides. A constant is named after its variable without
//! the `CKPTD_` prefix (`CKPTD_SOCKET` is [`ENV_SOCKET`]). docs/DEPLOY.md and docs/OPERATIONS.md
//! list them for operators.

/// The prefix of every variable ckptd defines (the webhook never overrides a trainer's own).
pub const PREFIX: &str = "CKPTD_";

// The trainer and its agent. The webhook sets these in both containers of an injected pod.

/// The agent's Unix socket (`ckptd agent --socket`, `ckptctl --socket`). In the trainer it selects
/// sidecar mode: the checkpointer talks to the agent there instead of running embedded.
pub const ENV_SOCKET: &str = "CKPTD_SOCKET";
/// The arena directory on a memory-backed volume (`--arena-dir`); the trainer and the agent must
/// see the same one.
pub const ENV_ARENA_DIR: &str = "CKPTD_ARENA_DIR";
/// The store URL (`--store`). May carry credentials, so `--help` never shows its value.
pub const ENV_STORE: &str = "CKPTD_STORE";
/// The job name (`--job`): the store prefix of the job's checkpoints.
pub const ENV_JOB: &str = "CKPTD_JOB";
/// Arena slots per rank (`--slots`), at most [`ckpt_core::arena::MAX_SLOTS`].
pub const ENV_SLOTS: &str = "CKPTD_SLOTS";
/// The trainer's global rank as torchrun (and most launchers) set it: a [`crate::client::Checkpointer`]
/// given no rank reads it.
pub const ENV_LAUNCHER_RANK: &str = "RANK";
/// The number of ranks as torchrun sets it: a checkpointer given no world size reads it.
pub const ENV_LAUNCHER_WORLD_SIZE: &str = "WORLD_SIZE";
/// The agent's metrics listen address (`ckptd agent --metrics-addr`).
pub const ENV_METRICS_ADDR: &str = "CKPTD_METRICS_ADDR";
/// Ranks the agent prefetches at start-up (`--ranks`).
pub const ENV_RANKS: &str = "CKPTD_RANKS";
/// The job's world size (`--world-size`).
pub const ENV_WORLD_SIZE: &str = "CKPTD_WORLD_SIZE";
/// The job's parallel layout (`ckptd agent --parallel`), e.g. `dp=8,tp=4,pp=2`: the webhook sets
/// it from the `ckptd.io/parallel` annotation; the agent checks it against the world size and
/// reports it to the isolator.
pub const ENV_PARALLEL: &str = "CKPTD_PARALLEL";
/// The job's resize policy (`wait` or `replicas`, see [`crate::resize`]): the webhook sets it from
/// the `ckptd.io/on-resize` annotation in the trainer and the agent; `ckptd agent --on-resize`.
pub const ENV_ON_RESIZE: &str = "CKPTD_ON_RESIZE";
/// The most ranks, and so trainer sessions, the agent serves (`--max-sessions`).
pub const ENV_MAX_SESSIONS: &str = "CKPTD_MAX_SESSIONS";
/// How long the agent lets persists finish after SIGTERM (`--grace-period`).
pub const ENV_GRACE_PERIOD: &str = "CKPTD_GRACE_PERIOD";
/// In the trainer: seconds the client library waits, after a restart or stop order, for the
/// training script to act on it before it exits the process itself (default 3; `off` never
/// exits). See [`crate::client::EXIT_RESTART`].
pub const ENV_RESTART_GRACE: &str = "CKPTD_RESTART_GRACE";
/// How long after a restart or stop order the agent sends SIGKILL to a trainer that is still
/// attached and has not restored (`ckptd agent --restart-kill-after`; `0s` never).
pub const ENV_RESTART_KILL_AFTER: &str = "CKPTD_RESTART_KILL_AFTER";
/// Chunk compression (`--compression`).
pub const ENV_COMPRESSION: &str = "CKPTD_COMPRESSION";
/// CPU priority of the threads that persist snapshots, `normal`, `nice` or `idle` (`ckptd agent
/// --persist-priority`; in the trainer it sets the embedded persist's and the copy-waiting
/// thread's). See [`ckpt_core::Priority`].
pub const ENV_PERSIST_PRIORITY: &str = "CKPTD_PERSIST_PRIORITY";
/// How `file://` shards are written, `direct`, `write-behind` or `buffered` (`ckptd agent
/// --persist-io`; in the trainer, embedded mode). See [`ckpt_core::FileIo`].
pub const ENV_PERSIST_IO: &str = "CKPTD_PERSIST_IO";
/// Threads that copy host tensors into the arena and back in the trainer (default: half the
/// cores, at least 1, at most 8; see [`ckpt_core::copy::host::default_threads`]).
pub const ENV_COPY_THREADS: &str = "CKPTD_COPY_THREADS";
/// How long a rank waits for its step's commit (`--commit-timeout`).
pub const ENV_COMMIT_TIMEOUT: &str = "CKPTD_COMMIT_TIMEOUT";
/// Committed steps to keep (`--keep`).
pub const ENV_KEEP: &str = "CKPTD_KEEP";
/// The isolator's URL: where the agent registers (`ckptd agent --isolator`) and what `ckptctl jobs`
/// and `ckptctl release` ask (`--isolator`). `ckptctl` also accepts [`ENV_ISOLATOR_URL`].
pub const ENV_ISOLATOR: &str = "CKPTD_ISOLATOR";
/// The former name of [`ENV_ISOLATOR`] for `ckptctl`, still read when [`ENV_ISOLATOR`] is unset.
pub const ENV_ISOLATOR_URL: &str = "CKPTD_ISOLATOR_URL";
/// File holding the isolator's bearer token. The agent and `ckptctl` present it
/// (`--isolator-token-file`, `ckptctl --token-file`); the isolator accepts it
/// (`ckptd isolator --token-file`).
pub const ENV_ISOLATOR_TOKEN_FILE: &str = "CKPTD_ISOLATOR_TOKEN_FILE";
/// CA bundle that signs the isolator's certificate (`ckptd agent --isolator-ca`).
pub const ENV_ISOLATOR_CA: &str = "CKPTD_ISOLATOR_CA";
/// Client certificate for mTLS to the isolator (`ckptd agent --isolator-cert`).
pub const ENV_ISOLATOR_CERT: &str = "CKPTD_ISOLATOR_CERT";
/// Client key for mTLS to the isolator (`ckptd agent --isolator-key`).
pub const ENV_ISOLATOR_KEY: &str = "CKPTD_ISOLATOR_KEY";
/// The node the pod runs on (downward API `spec.nodeName`).
pub const ENV_NODE_NAME: &str = "CKPTD_NODE_NAME";
/// The pod's name (downward API `metadata.name`).
pub const ENV_POD_NAME: &str = "CKPTD_POD_NAME";
/// The pod's namespace (downward API `metadata.namespace`).
pub const ENV_POD_NAMESPACE: &str = "CKPTD_POD_NAMESPACE";
/// The pod's UID (downward API `metadata.uid`). The webhook sets it for log correlation; the
/// agent does not read it.
pub const ENV_POD_UID: &str = "CKPTD_POD_UID";
/// The log filter of `ckptd` (`tracing_subscriber` `EnvFilter` syntax).
pub const ENV_LOG: &str = "CKPTD_LOG";
/// The log filter of `ckptctl`; `warn` when unset, so the engine's fall-back warnings show.
pub const ENV_CKPTCTL_LOG: &str = "CKPTCTL_LOG";

// Health reporters (flags of `ckptd agent`).

/// `--health-policy`: the policy override file (TOML, or YAML by `.yaml`/`.yml`).
pub const ENV_HEALTH_POLICY: &str = "CKPTD_HEALTH_POLICY";
/// `--kmsg`: the kernel log to read.
pub const ENV_KMSG: &str = "CKPTD_KMSG";
/// `--no-kmsg`: do not read the kernel log.
pub const ENV_NO_KMSG: &str = "CKPTD_NO_KMSG";
/// `--kmsg-poll`: how often the kernel log is read.
pub const ENV_KMSG_POLL: &str = "CKPTD_KMSG_POLL";
/// Set to `1` to run the tests that read the host's real `/dev/kmsg`.
pub const ENV_KMSG_TESTS: &str = "CKPTD_KMSG_TESTS";
/// `--gpu-pci-map`: `INDEX=PCI,...` when NVML is unavailable.
pub const ENV_GPU_PCI_MAP: &str = "CKPTD_GPU_PCI_MAP";
/// `--pci-root`: sysfs PCI devices directory for the fallback map.
pub const ENV_PCI_ROOT: &str = "CKPTD_PCI_ROOT";
/// `--nccl-log-glob`: NCCL debug file patterns (comma-separated; `%h`/`%p` allowed).
pub const ENV_NCCL_LOG_GLOB: &str = "CKPTD_NCCL_LOG_GLOB";
/// `--nccl-dir`: a directory whose every file is an NCCL debug log.
pub const ENV_NCCL_DIR: &str = "CKPTD_NCCL_DIR";
/// `--flight-recorder-dir`: where torch writes flight-recorder dumps.
pub const ENV_FLIGHT_RECORDER_DIR: &str = "CKPTD_FLIGHT_RECORDER_DIR";
/// `--nccl-poll`: how often NCCL logs are read.
pub const ENV_NCCL_POLL: &str = "CKPTD_NCCL_POLL";
/// `--ib-root`: sysfs InfiniBand directory.
pub const ENV_IB_ROOT: &str = "CKPTD_IB_ROOT";
/// `--no-ib`: do not watch InfiniBand ports.
pub const ENV_NO_IB: &str = "CKPTD_NO_IB";
/// `--ib-poll`: how often port counters are read.
pub const ENV_IB_POLL: &str = "CKPTD_IB_POLL";
/// `--ib-down-grace`: how long a port may be down before it is a fault.
pub const ENV_IB_DOWN_GRACE: &str = "CKPTD_IB_DOWN_GRACE";
/// `--ib-flap-count`: state changes within the flap window that make a flapping port.
pub const ENV_IB_FLAP_COUNT: &str = "CKPTD_IB_FLAP_COUNT";
/// `--ib-flap-window`: the flap window.
pub const ENV_IB_FLAP_WINDOW: &str = "CKPTD_IB_FLAP_WINDOW";
/// `--ib-symbol-error-rate`: symbol errors per second that make a fault.
pub const ENV_IB_SYMBOL_ERROR_RATE: &str = "CKPTD_IB_SYMBOL_ERROR_RATE";
/// `--ib-rcv-error-rate`: receive errors per second that make a fault.
pub const ENV_IB_RCV_ERROR_RATE: &str = "CKPTD_IB_RCV_ERROR_RATE";
/// `--hang-floor`: least time without progress in the step phase before a hang.
pub const ENV_HANG_FLOOR: &str = "CKPTD_HANG_FLOOR";
/// `--hang-k`: multiple of the median step time before a hang.
pub const ENV_HANG_K: &str = "CKPTD_HANG_K";
/// `--hang-init`: the init phase's budget.
pub const ENV_HANG_INIT: &str = "CKPTD_HANG_INIT";
/// `--hang-save`: the checkpoint-save phase's budget.
pub const ENV_HANG_SAVE: &str = "CKPTD_HANG_SAVE";
/// `--hang-load`: the checkpoint-load phase's budget.
pub const ENV_HANG_LOAD: &str = "CKPTD_HANG_LOAD";
/// `--progress-poll`: how often hang budgets are checked.
pub const ENV_PROGRESS_POLL: &str = "CKPTD_PROGRESS_POLL";
/// `--no-nvml`: do not use NVML.
pub const ENV_NO_NVML: &str = "CKPTD_NO_NVML";
/// `--nvml-poll`: how often NVML is polled.
pub const ENV_NVML_POLL: &str = "CKPTD_NVML_POLL";
/// `--allow-inject`: accept `ckptctl inject` drills.
pub const ENV_ALLOW_INJECT: &str = "CKPTD_ALLOW_INJECT";

// The isolator (flags of `ckptd isolator`; its token file is [`ENV_ISOLATOR_TOKEN_FILE`]).

/// `--listen`: the gRPC address for agents and `ckptctl`.
pub const ENV_ISOLATOR_LISTEN: &str = "CKPTD_ISOLATOR_LISTEN";
/// `--metrics-addr`: the address of `/metrics`, `/healthz` and `/readyz`.
pub const ENV_ISOLATOR_METRICS_ADDR: &str = "CKPTD_ISOLATOR_METRICS_ADDR";
/// `--tls-cert`: the server certificate (PEM).
pub const ENV_ISOLATOR_TLS_CERT: &str = "CKPTD_ISOLATOR_TLS_CERT";
/// `--tls-key`: the server key (PEM).
pub const ENV_ISOLATOR_TLS_KEY: &str = "CKPTD_ISOLATOR_TLS_KEY";
/// `--client-ca`: the CA that signs agent client certificates (mTLS).
pub const ENV_ISOLATOR_CLIENT_CA: &str = "CKPTD_ISOLATOR_CLIENT_CA";
/// `--lease-name`: the Lease for leader election.
pub const ENV_ISOLATOR_LEASE_NAME: &str = "CKPTD_ISOLATOR_LEASE_NAME";
/// `--lease-namespace`: the Lease's namespace.
pub const ENV_ISOLATOR_LEASE_NAMESPACE: &str = "CKPTD_ISOLATOR_LEASE_NAMESPACE";
/// `--lease-duration`: how long an unrenewed Lease stays held.
pub const ENV_ISOLATOR_LEASE_DURATION: &str = "CKPTD_ISOLATOR_LEASE_DURATION";
/// `--lease-retry`: how often the Lease is renewed or looked at.
pub const ENV_ISOLATOR_LEASE_RETRY: &str = "CKPTD_ISOLATOR_LEASE_RETRY";
/// `--identity`: this replica's Lease holder identity.
pub const ENV_ISOLATOR_IDENTITY: &str = "CKPTD_ISOLATOR_IDENTITY";
/// `--dry-run`: log isolations instead of acting on the cluster.
pub const ENV_ISOLATOR_DRY_RUN: &str = "CKPTD_ISOLATOR_DRY_RUN";
/// `--max-isolated`: most nodes isolated within the window.
pub const ENV_ISOLATOR_MAX_ISOLATED: &str = "CKPTD_ISOLATOR_MAX_ISOLATED";
/// `--max-isolated-fraction`: most nodes isolated within the window, as a share of the cluster.
pub const ENV_ISOLATOR_MAX_ISOLATED_FRACTION: &str = "CKPTD_ISOLATOR_MAX_ISOLATED_FRACTION";
/// `--isolation-window`: the circuit breaker's sliding window.
pub const ENV_ISOLATOR_ISOLATION_WINDOW: &str = "CKPTD_ISOLATOR_ISOLATION_WINDOW";
/// `--taint-effect`: the effect of the `ckptd.io/unhealthy` taint.
pub const ENV_ISOLATOR_TAINT_EFFECT: &str = "CKPTD_ISOLATOR_TAINT_EFFECT";
/// `--kube-url`: the Kubernetes API URL.
pub const ENV_ISOLATOR_KUBE_URL: &str = "CKPTD_ISOLATOR_KUBE_URL";
/// `--commit-deadline`: how long a step's ballot may stay incomplete.
pub const ENV_ISOLATOR_COMMIT_DEADLINE: &str = "CKPTD_ISOLATOR_COMMIT_DEADLINE";
/// `--snapshot-timeout`: how long healthy ranks get for their emergency snapshot.
pub const ENV_ISOLATOR_SNAPSHOT_TIMEOUT: &str = "CKPTD_ISOLATOR_SNAPSHOT_TIMEOUT";
/// `--straggler-factor`: a rank is slow above this factor × the job median.
pub const ENV_ISOLATOR_STRAGGLER_FACTOR: &str = "CKPTD_ISOLATOR_STRAGGLER_FACTOR";
/// `--straggler-windows`: consecutive slow windows before a straggler is reported.
pub const ENV_ISOLATOR_STRAGGLER_WINDOWS: &str = "CKPTD_ISOLATOR_STRAGGLER_WINDOWS";
/// `--straggler-window`: the length of one straggler window.
pub const ENV_ISOLATOR_STRAGGLER_WINDOW: &str = "CKPTD_ISOLATOR_STRAGGLER_WINDOW";
/// `--store`: the store URL for every job, instead of the one each agent registers with.
pub const ENV_ISOLATOR_STORE: &str = "CKPTD_ISOLATOR_STORE";
/// `--alerts-addr`: address of the isolator's alert intake (off unless set).
pub const ENV_ISOLATOR_ALERTS_ADDR: &str = "CKPTD_ISOLATOR_ALERTS_ADDR";
/// `--alert-mapping`: the alert mapping file of the isolator.
pub const ENV_ISOLATOR_ALERT_MAPPING: &str = "CKPTD_ISOLATOR_ALERT_MAPPING";
/// `--health-policy` of the isolator: the policy file that gives alerts their actions.
pub const ENV_ISOLATOR_HEALTH_POLICY: &str = "CKPTD_ISOLATOR_HEALTH_POLICY";
/// `--fault-records`: fault records kept per job.
pub const ENV_ISOLATOR_FAULT_RECORDS: &str = "CKPTD_ISOLATOR_FAULT_RECORDS";
/// `--fault-notify-url`: endpoint that receives each fault record as JSON.
pub const ENV_ISOLATOR_FAULT_NOTIFY_URL: &str = "CKPTD_ISOLATOR_FAULT_NOTIFY_URL";
/// `--hook-ca`: CA certificates trusted for https hooks.
pub const ENV_ISOLATOR_HOOK_CA: &str = "CKPTD_ISOLATOR_HOOK_CA";
/// `--repair-url`: endpoint that repairs nodes isolated for hardware faults.
pub const ENV_ISOLATOR_REPAIR_URL: &str = "CKPTD_ISOLATOR_REPAIR_URL";
/// The isolator pod's name from the downward API (no `CKPTD_` prefix, as the chart sets it): the
/// default `--identity`.
pub const ENV_DOWNWARD_POD_NAME: &str = "POD_NAME";

// The admission webhook (flags of `ckptd webhook`).

/// `--config`: the webhook's YAML configuration file.
pub const ENV_WEBHOOK_CONFIG: &str = "CKPTD_WEBHOOK_CONFIG";
/// `--agent-image`: the image of the injected agent.
pub const ENV_AGENT_IMAGE: &str = "CKPTD_AGENT_IMAGE";
/// `--listen`: the HTTPS address.
pub const ENV_WEBHOOK_LISTEN: &str = "CKPTD_WEBHOOK_LISTEN";
/// `--tls-cert`: the serving certificate chain (PEM).
pub const ENV_WEBHOOK_TLS_CERT: &str = "CKPTD_WEBHOOK_TLS_CERT";
/// `--tls-key`: the serving key (PEM).
pub const ENV_WEBHOOK_TLS_KEY: &str = "CKPTD_WEBHOOK_TLS_KEY";
/// `--cert-reload-interval`: how often the certificate files are read.
pub const ENV_WEBHOOK_CERT_RELOAD_INTERVAL: &str = "CKPTD_WEBHOOK_CERT_RELOAD_INTERVAL";

/// The value of `key`, unless it is unset or empty.
pub fn nonempty(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every constant of this module; a name must appear once, and the constant's name must be
    /// the variable's without `CKPTD_`, so that a grep for either finds the other.
    const ALL: &[(&str, &str)] = &[
        ("ENV_SOCKET", ENV_SOCKET),
        ("ENV_ARENA_DIR", ENV_ARENA_DIR),
        ("ENV_STORE", ENV_STORE),
        ("ENV_JOB", ENV_JOB),
        ("ENV_SLOTS", ENV_SLOTS),
        ("ENV_METRICS_ADDR", ENV_METRICS_ADDR),
        ("ENV_RANKS", ENV_RANKS),
        ("ENV_MAX_SESSIONS", ENV_MAX_SESSIONS),
        ("ENV_LAUNCHER_RANK", ENV_LAUNCHER_RANK),
        ("ENV_LAUNCHER_WORLD_SIZE", ENV_LAUNCHER_WORLD_SIZE),
        ("ENV_WORLD_SIZE", ENV_WORLD_SIZE),
        ("ENV_PARALLEL", ENV_PARALLEL),
        ("ENV_ON_RESIZE", ENV_ON_RESIZE),
        ("ENV_GRACE_PERIOD", ENV_GRACE_PERIOD),
        ("ENV_RESTART_GRACE", ENV_RESTART_GRACE),
        ("ENV_RESTART_KILL_AFTER", ENV_RESTART_KILL_AFTER),
        ("ENV_COMPRESSION", ENV_COMPRESSION),
        ("ENV_PERSIST_PRIORITY", ENV_PERSIST_PRIORITY),
        ("ENV_PERSIST_IO", ENV_PERSIST_IO),
        ("ENV_COPY_THREADS", ENV_COPY_THREADS),
        ("ENV_COMMIT_TIMEOUT", ENV_COMMIT_TIMEOUT),
        ("ENV_KEEP", ENV_KEEP),
        ("ENV_ISOLATOR", ENV_ISOLATOR),
        ("ENV_ISOLATOR_URL", ENV_ISOLATOR_URL),
        ("ENV_ISOLATOR_TOKEN_FILE", ENV_ISOLATOR_TOKEN_FILE),
        ("ENV_ISOLATOR_CA", ENV_ISOLATOR_CA),
        ("ENV_ISOLATOR_CERT", ENV_ISOLATOR_CERT),
        ("ENV_ISOLATOR_KEY", ENV_ISOLATOR_KEY),
        ("ENV_NODE_NAME", ENV_NODE_NAME),
        ("ENV_POD_NAME", ENV_POD_NAME),
        ("ENV_POD_NAMESPACE", ENV_POD_NAMESPACE),
        ("ENV_POD_UID", ENV_POD_UID),
        ("ENV_LOG", ENV_LOG),
        ("ENV_CKPTCTL_LOG", ENV_CKPTCTL_LOG),
        ("ENV_HEALTH_POLICY", ENV_HEALTH_POLICY),
        ("ENV_KMSG", ENV_KMSG),
        ("ENV_NO_KMSG", ENV_NO_KMSG),
        ("ENV_KMSG_POLL", ENV_KMSG_POLL),
        ("ENV_KMSG_TESTS", ENV_KMSG_TESTS),
        ("ENV_GPU_PCI_MAP", ENV_GPU_PCI_MAP),
        ("ENV_PCI_ROOT", ENV_PCI_ROOT),
        ("ENV_NCCL_LOG_GLOB", ENV_NCCL_LOG_GLOB),
        ("ENV_NCCL_DIR", ENV_NCCL_DIR),
        ("ENV_FLIGHT_RECORDER_DIR", ENV_FLIGHT_RECORDER_DIR),
        ("ENV_NCCL_POLL", ENV_NCCL_POLL),
        ("ENV_IB_ROOT", ENV_IB_ROOT),
        ("ENV_NO_IB", ENV_NO_IB),
        ("ENV_IB_POLL", ENV_IB_POLL),
        ("ENV_IB_DOWN_GRACE", ENV_IB_DOWN_GRACE),
        ("ENV_IB_FLAP_COUNT", ENV_IB_FLAP_COUNT),
        ("ENV_IB_FLAP_WINDOW", ENV_IB_FLAP_WINDOW),
        ("ENV_IB_SYMBOL_ERROR_RATE", ENV_IB_SYMBOL_ERROR_RATE),
        ("ENV_IB_RCV_ERROR_RATE", ENV_IB_RCV_ERROR_RATE),
        ("ENV_HANG_FLOOR", ENV_HANG_FLOOR),
        ("ENV_HANG_K", ENV_HANG_K),
        ("ENV_HANG_INIT", ENV_HANG_INIT),
        ("ENV_HANG_SAVE", ENV_HANG_SAVE),
        ("ENV_HANG_LOAD", ENV_HANG_LOAD),
        ("ENV_PROGRESS_POLL", ENV_PROGRESS_POLL),
        ("ENV_NO_NVML", ENV_NO_NVML),
        ("ENV_NVML_POLL", ENV_NVML_POLL),
        ("ENV_ALLOW_INJECT", ENV_ALLOW_INJECT),
        ("ENV_ISOLATOR_LISTEN", ENV_ISOLATOR_LISTEN),
        ("ENV_ISOLATOR_METRICS_ADDR", ENV_ISOLATOR_METRICS_ADDR),
        ("ENV_ISOLATOR_TLS_CERT", ENV_ISOLATOR_TLS_CERT),
        ("ENV_ISOLATOR_TLS_KEY", ENV_ISOLATOR_TLS_KEY),
        ("ENV_ISOLATOR_CLIENT_CA", ENV_ISOLATOR_CLIENT_CA),
        ("ENV_ISOLATOR_LEASE_NAME", ENV_ISOLATOR_LEASE_NAME),
        ("ENV_ISOLATOR_LEASE_NAMESPACE", ENV_ISOLATOR_LEASE_NAMESPACE),
        ("ENV_ISOLATOR_LEASE_DURATION", ENV_ISOLATOR_LEASE_DURATION),
        ("ENV_ISOLATOR_LEASE_RETRY", ENV_ISOLATOR_LEASE_RETRY),
        ("ENV_ISOLATOR_IDENTITY", ENV_ISOLATOR_IDENTITY),
        ("ENV_ISOLATOR_DRY_RUN", ENV_ISOLATOR_DRY_RUN),
        ("ENV_ISOLATOR_MAX_ISOLATED", ENV_ISOLATOR_MAX_ISOLATED),
        ("ENV_ISOLATOR_MAX_ISOLATED_FRACTION", ENV_ISOLATOR_MAX_ISOLATED_FRACTION),
        ("ENV_ISOLATOR_ISOLATION_WINDOW", ENV_ISOLATOR_ISOLATION_WINDOW),
        ("ENV_ISOLATOR_TAINT_EFFECT", ENV_ISOLATOR_TAINT_EFFECT),
        ("ENV_ISOLATOR_KUBE_URL", ENV_ISOLATOR_KUBE_URL),
        ("ENV_ISOLATOR_COMMIT_DEADLINE", ENV_ISOLATOR_COMMIT_DEADLINE),
        ("ENV_ISOLATOR_SNAPSHOT_TIMEOUT", ENV_ISOLATOR_SNAPSHOT_TIMEOUT),
        ("ENV_ISOLATOR_STRAGGLER_FACTOR", ENV_ISOLATOR_STRAGGLER_FACTOR),
        ("ENV_ISOLATOR_STRAGGLER_WINDOWS", ENV_ISOLATOR_STRAGGLER_WINDOWS),
        ("ENV_ISOLATOR_STRAGGLER_WINDOW", ENV_ISOLATOR_STRAGGLER_WINDOW),
        ("ENV_ISOLATOR_STORE", ENV_ISOLATOR_STORE),
        ("ENV_ISOLATOR_ALERTS_ADDR", ENV_ISOLATOR_ALERTS_ADDR),
        ("ENV_ISOLATOR_ALERT_MAPPING", ENV_ISOLATOR_ALERT_MAPPING),
        ("ENV_ISOLATOR_HEALTH_POLICY", ENV_ISOLATOR_HEALTH_POLICY),
        ("ENV_ISOLATOR_FAULT_RECORDS", ENV_ISOLATOR_FAULT_RECORDS),
        ("ENV_ISOLATOR_FAULT_NOTIFY_URL", ENV_ISOLATOR_FAULT_NOTIFY_URL),
        ("ENV_ISOLATOR_HOOK_CA", ENV_ISOLATOR_HOOK_CA),
        ("ENV_ISOLATOR_REPAIR_URL", ENV_ISOLATOR_REPAIR_URL),
        ("ENV_DOWNWARD_POD_NAME", ENV_DOWNWARD_POD_NAME),
        ("ENV_WEBHOOK_CONFIG", ENV_WEBHOOK_CONFIG),
        ("ENV_AGENT_IMAGE", ENV_AGENT_IMAGE),
        ("ENV_WEBHOOK_LISTEN", ENV_WEBHOOK_LISTEN),
        ("ENV_WEBHOOK_TLS_CERT", ENV_WEBHOOK_TLS_CERT),
        ("ENV_WEBHOOK_TLS_KEY", ENV_WEBHOOK_TLS_KEY),
        ("ENV_WEBHOOK_CERT_RELOAD_INTERVAL", ENV_WEBHOOK_CERT_RELOAD_INTERVAL),
    ];

    #[test]
    fn names_are_unique_and_match_their_constants() {
        let mut seen = std::collections::BTreeSet::new();
        for &(constant, var) in ALL {
            assert!(seen.insert(var), "{var} is defined twice");
            let expected = match var {
                "CKPTCTL_LOG" => "ENV_CKPTCTL_LOG".to_string(),
                "POD_NAME" => "ENV_DOWNWARD_POD_NAME".to_string(),
                "RANK" | "WORLD_SIZE" => format!("ENV_LAUNCHER_{var}"),
                v => format!("ENV_{}", v.strip_prefix("CKPTD_").unwrap_or(v)),
            };
            assert_eq!(constant, expected);
        }
        let source = include_str!("env.rs");
        let defined = source.lines().filter(|l| l.starts_with("pub const ENV_")).count();
        assert_eq!(defined, ALL.len(), "a constant is missing from ALL");
    }
}
