//! Health monitoring and fault classification (issue #5): one controller fed by reporters, in the
//! shape of tikv's `health_controller`. Each reporter keeps its own state and only observes:
//! - `nvml`: XID events, ECC, row remapping, retired pages, NVLink/PCIe counters, throttling,
//!   lost GPUs;
//! - `kmsg`: `NVRM: Xid` lines of the kernel log (XIDs NVML does not deliver);
//! - `progress`: trainer heartbeats → hangs, with per-phase budgets;
//! - `nccl`: NCCL debug logs and torch flight-recorder dumps;
//! - `ib`: InfiniBand/RoCE port state and counters.
//!
//! The controller maps each [`Finding`] to an [`Action`] through the [`Policy`], debounces,
//! deduplicates and rate-limits, and hands [`Decision`]s to the agent over a bounded channel.
//! docs/HEALTH.md is the operator's view: every finding, its default action, overrides,
//! permissions and drills.

mod controller;
mod finding;
pub mod ib;
pub mod kmsg;
pub mod nccl;
pub mod nvml;
mod pci;
mod policy;
mod progress;
mod tail;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ckpt_core::Phase;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use controller::{Decision, FaultRecord, HealthStatus, ReporterState, ReporterStatus};
pub use finding::{Finding, Source};
pub use pci::normalize as normalize_pci;
pub use policy::{Action, KINDS, Policy, Rule, XID_CATALOGUE, XID_DEFAULT};
pub use progress::Budgets;

use controller::{Controller, Metrics, StatusBoard};

use crate::env;

/// The health flags of `ckptd agent` (flattened into its flags). Every flag has an environment
/// variable, listed in [`crate::env`].
#[derive(Debug, Clone, clap::Args)]
pub struct HealthArgs {
    /// Policy override file (TOML, or YAML for .yaml/.yml); validated at start-up.
    #[arg(long = "health-policy", env = env::ENV_HEALTH_POLICY, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Kernel log to read: /dev/kmsg, or a regular file or FIFO of kernel-log lines.
    #[arg(long, env = env::ENV_KMSG, default_value = "/dev/kmsg", value_name = "PATH")]
    pub kmsg: PathBuf,
    /// Do not read the kernel log.
    #[arg(long, env = env::ENV_NO_KMSG)]
    pub no_kmsg: bool,
    /// How often the kernel-log reader looks for new lines.
    #[arg(long, env = env::ENV_KMSG_POLL, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub kmsg_poll: Duration,
    /// PCI address → GPU index map when NVML is unavailable, e.g. `0=0000:3b:00.0,1=0000:5e:00.0`.
    #[arg(long, env = env::ENV_GPU_PCI_MAP, value_name = "MAP")]
    pub gpu_pci_map: Option<String>,
    /// sysfs PCI devices directory, for the PCI → GPU index fallback.
    #[arg(long, env = env::ENV_PCI_ROOT, default_value = "/sys/bus/pci/devices", value_name = "DIR")]
    pub pci_root: PathBuf,
    /// NCCL debug log patterns (NCCL_DEBUG_FILE values; %h and %p match anything).
    #[arg(long, env = env::ENV_NCCL_LOG_GLOB, value_delimiter = ',', value_name = "GLOB")]
    pub nccl_log_glob: Vec<String>,
    /// A directory whose every file is an NCCL debug log.
    #[arg(long, env = env::ENV_NCCL_DIR, value_name = "DIR")]
    pub nccl_dir: Option<PathBuf>,
    /// The torch flight-recorder dump directory (TORCH_NCCL_DEBUG_INFO_TEMP_FILE's directory).
    #[arg(long, env = env::ENV_FLIGHT_RECORDER_DIR, value_name = "DIR")]
    pub flight_recorder_dir: Option<PathBuf>,
    /// How often NCCL logs and dumps are read.
    #[arg(long, env = env::ENV_NCCL_POLL, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub nccl_poll: Duration,
    /// InfiniBand sysfs root.
    #[arg(long, env = env::ENV_IB_ROOT, default_value = "/sys/class/infiniband", value_name = "DIR")]
    pub ib_root: PathBuf,
    /// Do not watch InfiniBand ports.
    #[arg(long, env = env::ENV_NO_IB)]
    pub no_ib: bool,
    /// How often IB ports are read.
    #[arg(long, env = env::ENV_IB_POLL, default_value = "1s", value_parser = humantime::parse_duration)]
    pub ib_poll: Duration,
    /// How long a port must stay out of ACTIVE before it is reported down (shorter is a bounce).
    #[arg(long, env = env::ENV_IB_DOWN_GRACE, default_value = "5s", value_parser = humantime::parse_duration)]
    pub ib_down_grace: Duration,
    /// Down→up transitions within --ib-flap-window that make a flap.
    #[arg(long, env = env::ENV_IB_FLAP_COUNT, default_value_t = 3)]
    pub ib_flap_count: u32,
    /// The flap window.
    #[arg(long, env = env::ENV_IB_FLAP_WINDOW, default_value = "10m", value_parser = humantime::parse_duration)]
    pub ib_flap_window: Duration,
    /// symbol_error increments per second that count as a spike.
    #[arg(long, env = env::ENV_IB_SYMBOL_ERROR_RATE, default_value_t = 10.0)]
    pub ib_symbol_error_rate: f64,
    /// port_rcv_errors increments per second that count as a spike.
    #[arg(long, env = env::ENV_IB_RCV_ERROR_RATE, default_value_t = 10.0)]
    pub ib_rcv_error_rate: f64,
    /// Least time without progress in the step phase before a hang.
    #[arg(long, env = env::ENV_HANG_FLOOR, default_value = "2m", value_parser = humantime::parse_duration)]
    pub hang_floor: Duration,
    /// Multiple of the rolling median step time before a hang.
    #[arg(long, env = env::ENV_HANG_K, default_value_t = 10.0)]
    pub hang_k: f64,
    /// Budget of start-up and the first step.
    #[arg(long, env = env::ENV_HANG_INIT, default_value = "30m", value_parser = humantime::parse_duration)]
    pub hang_init: Duration,
    /// Budget of a checkpoint save.
    #[arg(long, env = env::ENV_HANG_SAVE, default_value = "30m", value_parser = humantime::parse_duration)]
    pub hang_save: Duration,
    /// Budget of a checkpoint load.
    #[arg(long, env = env::ENV_HANG_LOAD, default_value = "1h", value_parser = humantime::parse_duration)]
    pub hang_load: Duration,
    /// How often hang budgets are checked.
    #[arg(long, env = env::ENV_PROGRESS_POLL, default_value = "1s", value_parser = humantime::parse_duration)]
    pub progress_poll: Duration,
    /// Do not use NVML.
    #[arg(long, env = env::ENV_NO_NVML)]
    pub no_nvml: bool,
    /// How often NVML counters are read (XID events arrive at once).
    #[arg(long, env = env::ENV_NVML_POLL, default_value = "5s", value_parser = humantime::parse_duration)]
    pub nvml_poll: Duration,
    /// Accept `ckptctl inject` drills.
    #[arg(long, env = env::ENV_ALLOW_INJECT)]
    pub allow_inject: bool,
}

impl HealthArgs {
    /// Parses health flags alone (tests, tools): `from_flags(["--no-nvml", "--kmsg", path])`.
    pub fn from_flags<I, T>(flags: I) -> Result<HealthArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            health: HealthArgs,
        }
        let args = std::iter::once(std::ffi::OsString::from("ckptd-health")).chain(flags.into_iter().map(Into::into));
        <Cli as clap::Parser>::try_parse_from(args).map(|c| c.health)
    }

    fn budgets(&self) -> Budgets {
        Budgets {
            floor: self.hang_floor,
            k: self.hang_k,
            init: self.hang_init,
            save: self.hang_save,
            load: self.hang_load,
        }
    }

    fn validate(&self) -> crate::Result<()> {
        let bad = |what: &str, reason: &str| Err(crate::Error::Config { what: what.into(), reason: reason.into() });
        if !(self.hang_k.is_finite() && self.hang_k > 0.0) {
            return bad("--hang-k", "must be a positive number, e.g. 10");
        }
        for (what, d) in [
            ("--kmsg-poll", self.kmsg_poll),
            ("--nccl-poll", self.nccl_poll),
            ("--ib-poll", self.ib_poll),
            ("--progress-poll", self.progress_poll),
            ("--nvml-poll", self.nvml_poll),
        ] {
            if d.is_zero() {
                return bad(what, "must be longer than zero, e.g. \"1s\"");
            }
        }
        if !(self.ib_symbol_error_rate >= 0.0 && self.ib_rcv_error_rate >= 0.0) {
            return bad("--ib-symbol-error-rate/--ib-rcv-error-rate", "must be zero or more errors per second");
        }
        Ok(())
    }
}

/// A drill from `ckptctl inject`: it becomes a finding with source `inject` and goes through the
/// same policy, dedupe and rate limit as a real one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Injection {
    /// An XID on a GPU (`ckptctl inject --xid N --gpu I`).
    Xid {
        /// The XID.
        xid: u32,
        /// The GPU index.
        gpu: Option<u32>,
    },
    /// A hang of one rank, or of every attached rank (`ckptctl inject --hang`).
    Hang {
        /// The rank; `None` for all.
        rank: Option<u32>,
    },
    /// An IB port going down (`ckptctl inject --ib-down mlx5_0/1`).
    IbDown {
        /// `device/port`.
        port: String,
    },
}

/// Spawns a health task under a tracing span carrying its name, so every log line of the task
/// says which one it is (tokio task names need `tokio_unstable`).
fn named<F>(rt: &tokio::runtime::Handle, name: &'static str, fut: F) -> Task
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    use tracing::Instrument;
    Task::Async(name, rt.spawn(fut.instrument(tracing::info_span!("health", task = name))))
}

#[derive(Debug)]
enum Task {
    Async(&'static str, tokio::task::JoinHandle<()>),
    Thread(&'static str, std::thread::JoinHandle<()>),
}

#[derive(Debug)]
struct Inner {
    findings: mpsc::Sender<Finding>,
    progress: mpsc::Sender<progress::Event>,
    board: Arc<StatusBoard>,
    metrics: Metrics,
    pci: pci::PciMap,
    attached: controller::Attached,
    allow_inject: bool,
    tasks: Mutex<Vec<Task>>,
    shutdown: CancellationToken,
}

/// The running health subsystem. Cheap to clone; every clone talks to the same reporters.
#[derive(Debug, Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

/// Capacity of the findings queue (reporters → controller).
const FINDINGS_QUEUE: usize = 1024;
/// Capacity of the heartbeat queue (agent → progress reporter); heartbeats beyond it are dropped
/// and counted, a later one carries the same information.
const PROGRESS_QUEUE: usize = 4096;
/// Capacity of the decision queue (controller → agent).
pub const DECISION_QUEUE: usize = 64;

impl Health {
    /// Validates the flags and the policy (an unknown key or action is [`crate::Error::Config`],
    /// which `ckptd` turns into exit code 64) and starts every reporter and the controller as
    /// named tasks and threads on `rt`. They stop when `shutdown` is cancelled; await
    /// [`Health::stopped`] to wait for them.
    pub fn start(
        args: &HealthArgs,
        node: String,
        registry: &mut Registry,
        rt: &tokio::runtime::Handle,
        shutdown: CancellationToken,
    ) -> crate::Result<(Health, mpsc::Receiver<Decision>)> {
        args.validate()?;
        let policy = match &args.policy {
            Some(p) => Policy::load(p)?,
            None => Policy::builtin(),
        };
        let initial_map = match &args.gpu_pci_map {
            Some(spec) => {
                pci::parse_map(spec).map_err(|reason| crate::Error::Config { what: "--gpu-pci-map".into(), reason })?
            }
            None => pci::scan_sysfs(&args.pci_root),
        };
        let pci_map = pci::PciMap::new(initial_map);
        let metrics = Metrics::register(registry);
        let board = Arc::new(StatusBoard::new(node.clone(), args.allow_inject));
        let (ftx, frx) = mpsc::channel(FINDINGS_QUEUE);
        let (dtx, drx) = mpsc::channel(DECISION_QUEUE);
        let (ptx, prx) = mpsc::channel(PROGRESS_QUEUE);
        let mut tasks = Vec::new();
        let io =
            |e: std::io::Error| crate::Error::Runtime { what: "start a health reporter thread", reason: e.to_string() };

        let attached = controller::Attached::default();
        let ctl = Controller::new(node, policy, metrics.clone(), attached.clone());
        tasks.push(named(rt, "health-controller", controller::run(ctl, frx, dtx, board.clone(), shutdown.clone())));

        board.set(progress::NAME, ReporterState::Enabled, format!("budgets {:?}", args.budgets()));
        metrics.set_enabled(progress::NAME, true);
        tasks.push(named(
            rt,
            "health-progress",
            progress::run(
                progress::Tracker::new(args.budgets()),
                prx,
                ftx.clone(),
                args.progress_poll,
                board.clone(),
                shutdown.clone(),
            ),
        ));

        if args.no_kmsg {
            board.set(
                kmsg::NAME,
                ReporterState::Disabled,
                "disabled by configuration (--no-kmsg, CKPTD_NO_KMSG)".into(),
            );
            metrics.set_enabled(kmsg::NAME, false);
        } else if let Some(t) = kmsg::spawn(
            args.kmsg.clone(),
            args.kmsg_poll,
            ftx.clone(),
            board.clone(),
            metrics.clone(),
            pci_map.clone(),
            shutdown.clone(),
        )
        .map_err(io)?
        {
            tasks.push(Task::Thread("health-kmsg", t));
        }

        let mut globs: Vec<String> = args.nccl_log_glob.iter().map(|g| nccl::glob_of(g)).collect();
        if let Some(d) = &args.nccl_dir {
            globs.push(d.join("*").to_string_lossy().into_owned());
        }
        if let Some(t) = nccl::start(
            globs,
            args.flight_recorder_dir.clone(),
            args.nccl_poll,
            ftx.clone(),
            board.clone(),
            metrics.clone(),
            shutdown.clone(),
        ) {
            tasks.push(named(rt, "health-nccl", t));
        }

        if args.no_ib {
            board.set(ib::NAME, ReporterState::Disabled, "disabled by configuration (--no-ib, CKPTD_NO_IB)".into());
            metrics.set_enabled(ib::NAME, false);
        } else {
            let th = ib::Thresholds {
                flap_count: args.ib_flap_count,
                flap_window: args.ib_flap_window,
                symbol_rate: args.ib_symbol_error_rate,
                rcv_rate: args.ib_rcv_error_rate,
                down_grace: args.ib_down_grace,
            };
            let t = ib::start(
                args.ib_root.clone(),
                th,
                args.ib_poll,
                ftx.clone(),
                board.clone(),
                metrics.clone(),
                shutdown.clone(),
            );
            tasks.push(named(rt, "health-ib", t));
        }

        if let Some(t) = nvml::spawn(
            !args.no_nvml,
            args.nvml_poll,
            nvml::Thresholds::default(),
            ftx.clone(),
            board.clone(),
            metrics.clone(),
            pci_map.clone(),
            shutdown.clone(),
        )
        .map_err(io)?
        {
            tasks.push(Task::Thread("health-nvml", t));
        }

        let inner = Inner {
            findings: ftx,
            progress: ptx,
            board,
            metrics,
            pci: pci_map,
            attached,
            allow_inject: args.allow_inject,
            tasks: Mutex::new(tasks),
            shutdown,
        };
        Ok((Health { inner: Arc::new(inner) }, drx))
    }

    fn progress(&self, ev: progress::Event) {
        if self.inner.progress.try_send(ev).is_err() {
            self.inner.metrics.drop_input("heartbeats");
        }
    }

    /// A trainer heartbeat: the rank's step and phase (`None`, or a wire phase that is
    /// unspecified, when the trainer did not say). Never blocks; when the queue is full the
    /// heartbeat is dropped and counted (the next one carries the same information).
    pub fn heartbeat(&self, rank: u32, step: u64, phase: impl Into<Option<Phase>>) {
        self.progress(progress::Event::Heartbeat { rank, step, phase: phase.into() });
    }

    /// A trainer rank registered, with the GPU it uses when known; its init budget starts now.
    /// `gpu` is the host's NVML index (not the container's CUDA ordinal): once any attached rank
    /// has one, GPU-level faults (below drain-node) on other GPUs are someone else's and do not
    /// restart this job.
    pub fn rank_attached(&self, rank: u32, gpu: Option<u32>) {
        if let Ok(mut a) = self.inner.attached.write() {
            a.insert(rank, gpu);
        }
        self.progress(progress::Event::Attached { rank, gpu });
    }

    /// A trainer rank left cleanly; it is no longer watched for hangs.
    pub fn rank_detached(&self, rank: u32) {
        if let Ok(mut a) = self.inner.attached.write() {
            a.remove(&rank);
        }
        self.progress(progress::Event::Detached { rank });
    }

    /// Runs a drill through the same classification path as a real fault. Refused with
    /// [`crate::Error::InjectDisabled`] unless the agent was started with `--allow-inject`.
    pub fn inject(&self, injection: Injection) -> crate::Result<()> {
        if !self.inner.allow_inject {
            return Err(crate::Error::InjectDisabled);
        }
        tracing::warn!(?injection, "fault injection requested");
        let finding = match injection {
            Injection::Hang { rank } => {
                self.progress(progress::Event::Inject { rank });
                return Ok(());
            }
            Injection::Xid { xid, gpu } => {
                let pci = gpu.and_then(|g| self.inner.pci.pci(g));
                let evidence = format!(
                    "injected: NVRM: Xid (PCI:{}): {xid}, pid='<unknown>', name=<unknown>, ckptctl inject --xid {xid}{}",
                    pci.as_deref().unwrap_or("unknown"),
                    gpu.map_or(String::new(), |g| format!(" --gpu {g}"))
                );
                Finding::new(Source::Inject, format!("xid-{xid}"), evidence).with_gpu(gpu).with_pci(pci)
            }
            Injection::IbDown { port } => Finding::new(
                Source::Inject,
                "ib-port-down",
                format!("injected: {port}: state 4: ACTIVE → 1: DOWN (ckptctl inject --ib-down {port})"),
            )
            .with_port(Some(port)),
        };
        self.inner.findings.try_send(finding).map_err(|_| crate::Error::Busy {
            what: "the health controller",
            reason: "its queue is full or it is stopping".into(),
        })
    }

    /// Every reporter's state and the active faults, for `ckptctl health [--json]`.
    pub fn status(&self) -> HealthStatus {
        self.inner.board.snapshot()
    }

    /// Waits for every task and thread to finish after `shutdown` was cancelled, at most
    /// `grace`; returns the names of those still running then.
    pub async fn stopped(&self, grace: Duration) -> Vec<&'static str> {
        let tasks = match self.inner.tasks.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(_) => return Vec::new(),
        };
        if !self.inner.shutdown.is_cancelled() {
            tracing::debug!("Health::stopped called before shutdown was cancelled");
        }
        let deadline = tokio::time::Instant::now() + grace;
        let mut late = Vec::new();
        for t in tasks {
            let (name, done) = match t {
                Task::Async(name, h) => (name, tokio::time::timeout_at(deadline, h).await.is_ok()),
                Task::Thread(name, h) => {
                    let waited = tokio::time::timeout_at(deadline, async {
                        while !h.is_finished() {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    })
                    .await;
                    (name, waited.is_ok())
                }
            };
            if !done {
                late.push(name);
            }
        }
        late
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_has_an_env_var_listed_in_the_docs() {
        let doc = include_str!("../../../docs/HEALTH.md");
        let cmd = <HealthArgs as clap::Args>::augment_args(clap::Command::new("ckptd-health"));
        let mut n = 0;
        for arg in cmd.get_arguments() {
            let long = arg.get_long().unwrap_or_default();
            let env = arg.get_env().and_then(|e| e.to_str()).unwrap_or_else(|| panic!("--{long} has no env var"));
            assert!(doc.contains(env), "{env} not in docs/HEALTH.md");
            assert!(doc.contains(&format!("--{long}")), "--{long} not in docs/HEALTH.md");
            n += 1;
        }
        assert_eq!(n, 27, "a flag was added or removed: update docs/HEALTH.md and this count");
    }

    #[test]
    fn defaults_parse_and_validate() {
        let a = HealthArgs::from_flags(std::iter::empty::<&str>()).unwrap();
        assert_eq!(a.kmsg, PathBuf::from("/dev/kmsg"));
        assert_eq!(a.hang_floor, Duration::from_secs(120));
        a.validate().unwrap();
        let bad = HealthArgs::from_flags(["--ib-poll", "0s"]).unwrap();
        assert!(matches!(bad.validate(), Err(crate::Error::Config { what, .. }) if what == "--ib-poll"));
        assert!(HealthArgs::from_flags(["--hang-floor", "soon"]).is_err());
    }
}
