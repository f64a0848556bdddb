//! The node isolator, `ckptd isolator`: one per cluster, HA through a Lease.
//!
//! Agents register their ranks, send heartbeats, faults and durable-votes over gRPC (TCP, mTLS or a
//! bearer token). The isolator commits a step globally once every rank voted, drives each job
//! through Running → Degraded → Evacuating → Restoring → Running, isolates faulty nodes through
//! Kubernetes within a circuit breaker, and streams snapshot-now / stop / restore commands back.
//! docs/ISOLATOR.md describes the protocol and the state machine.
//!
//! Layout: [`coordinator`] holds the state and decisions; [`request`] validates what agents
//! send; [`state`], [`handling`] (a fault's handling by phase), [`ballot`], [`breaker`] and
//! [`straggler`] are its pure parts; [`fencer`] is
//! the cluster seam with [`kube`] as the real implementation; [`lease`] elects the leader;
//! [`service`] is the gRPC shell (errors become statuses in [`crate::rpc`]); [`metrics`] serves
//! Prometheus; [`link`] is the agent's client. Alerts from outside the agents (Alertmanager,
//! Alibaba Cloud system events) come in through [`intake`], parsed by [`alert`] and mapped to
//! findings by [`mapping`]. Every fault acted on becomes a record ([`faults`]), kept in a ConfigMap
//! per job and POSTed to a notify endpoint through [`hook`]. Nodes isolated for hardware faults are
//! sent to a repair system through [`repair`]; its "fixed" report comes back through [`intake`].

pub mod alert;
pub mod ballot;
pub mod breaker;
pub mod coordinator;
pub mod faults;
pub mod fencer;
pub mod handling;
pub mod hook;
pub mod intake;
pub mod kube;
pub mod lease;
pub mod link;
pub mod mapping;
pub mod metrics;
pub mod repair;
pub mod request;
pub mod service;
pub mod state;
pub mod straggler;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ckptd_proto::MAX_MESSAGE_BYTES;
use ckptd_proto::v1::isolator_admin_server::IsolatorAdminServer;
use ckptd_proto::v1::isolator_server::IsolatorServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use self::breaker::BreakerConfig;
use self::coordinator::{Coordinator, Settings};
use self::faults::{FaultLog, FaultSink, MemoryFaultLog};
use self::fencer::{MemoryFencer, NodeFencer};
use self::kube::{KubeFaultLog, KubeFencer, TaintEffect};
use self::mapping::AlertMapping;
use self::metrics::Metrics;
use self::service::{Auth, Service};
use crate::health::Policy;
use crate::{Error, Result, env};

/// Command-line flags of `ckptd isolator`. Each is also an environment variable
/// `CKPTD_ISOLATOR_*` ([`crate::env`]).
#[derive(Debug, Clone, clap::Args)]
pub struct IsolatorArgs {
    /// gRPC address for agents and `ckptctl` (port 0 picks a free one; the bound address is
    /// printed on stdout).
    #[arg(long, env = env::ENV_ISOLATOR_LISTEN, default_value = "0.0.0.0:7443")]
    pub listen: SocketAddr,
    /// Address of `/metrics`, `/healthz` and `/readyz` (200 only on the Lease holder).
    #[arg(long, env = env::ENV_ISOLATOR_METRICS_ADDR, default_value = "0.0.0.0:9102")]
    pub metrics_addr: SocketAddr,
    /// Server certificate (PEM); serves TLS when given.
    #[arg(long, env = env::ENV_ISOLATOR_TLS_CERT, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, env = env::ENV_ISOLATOR_TLS_KEY, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA that signs agent client certificates (mTLS); needs --tls-cert.
    #[arg(long, env = env::ENV_ISOLATOR_CLIENT_CA)]
    pub client_ca: Option<PathBuf>,
    /// File holding the bearer token agents present (`authorization: Bearer <token>`).
    #[arg(long, env = env::ENV_ISOLATOR_TOKEN_FILE)]
    pub token_file: Option<PathBuf>,
    /// Lease for leader election; without it this replica always leads (run one replica only).
    #[arg(long, env = env::ENV_ISOLATOR_LEASE_NAME)]
    pub lease_name: Option<String>,
    /// Namespace of the Lease.
    #[arg(long, env = env::ENV_ISOLATOR_LEASE_NAMESPACE, default_value = "default")]
    pub lease_namespace: String,
    /// How long a Lease record must stay unrenewed before another replica takes over.
    #[arg(long, env = env::ENV_ISOLATOR_LEASE_DURATION, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// How often the holder renews and the others look.
    #[arg(long, env = env::ENV_ISOLATOR_LEASE_RETRY, default_value = "2s", value_parser = humantime::parse_duration)]
    pub lease_retry: Duration,
    /// Lease holder identity [default: $POD_NAME, else the host name].
    #[arg(long, env = env::ENV_ISOLATOR_IDENTITY)]
    pub identity: Option<String>,
    /// Log isolations and Events instead of acting on the cluster (commit and restore still run).
    #[arg(long, env = env::ENV_ISOLATOR_DRY_RUN)]
    pub dry_run: bool,
    /// Most nodes isolated within --isolation-window; past it the isolator only alerts.
    #[arg(long, env = env::ENV_ISOLATOR_MAX_ISOLATED, default_value_t = 2)]
    pub max_isolated: u32,
    /// Most nodes isolated within the window as a share of the cluster (at least one).
    #[arg(long, env = env::ENV_ISOLATOR_MAX_ISOLATED_FRACTION, default_value_t = 0.1)]
    pub max_isolated_fraction: f64,
    /// The circuit breaker's sliding window.
    #[arg(long, env = env::ENV_ISOLATOR_ISOLATION_WINDOW, default_value = "1h", value_parser = humantime::parse_duration)]
    pub isolation_window: Duration,
    /// Effect of the `ckptd.io/unhealthy` taint.
    #[arg(long, env = env::ENV_ISOLATOR_TAINT_EFFECT, value_enum, default_value = "NoSchedule")]
    pub taint_effect: TaintEffect,
    /// Kubernetes API URL (tests, kmock) [default: in-cluster config or kubeconfig].
    #[arg(long, env = env::ENV_ISOLATOR_KUBE_URL)]
    pub kube_url: Option<String>,
    /// A step not voted by every rank this long after its first vote is aborted.
    #[arg(long, env = env::ENV_ISOLATOR_COMMIT_DEADLINE, default_value = "120s", value_parser = humantime::parse_duration)]
    pub commit_deadline: Duration,
    /// How long healthy ranks get for their emergency snapshot before the restore.
    #[arg(long, env = env::ENV_ISOLATOR_SNAPSHOT_TIMEOUT, default_value = "60s", value_parser = humantime::parse_duration)]
    pub snapshot_timeout: Duration,
    /// A rank is slow when its step time exceeds this factor × the job median.
    #[arg(long, env = env::ENV_ISOLATOR_STRAGGLER_FACTOR, default_value_t = 1.5)]
    pub straggler_factor: f64,
    /// Consecutive slow windows before a rank is reported as a straggler.
    #[arg(long, env = env::ENV_ISOLATOR_STRAGGLER_WINDOWS, default_value_t = 3)]
    pub straggler_windows: u32,
    /// Length of one straggler window.
    #[arg(long, env = env::ENV_ISOLATOR_STRAGGLER_WINDOW, default_value = "30s", value_parser = humantime::parse_duration)]
    pub straggler_window: Duration,
    /// Store URL for every job, instead of the one each agent registers with.
    #[arg(long, env = env::ENV_ISOLATOR_STORE, hide_env_values = true)]
    pub store: Option<String>,
    /// Address of the alert intake (`POST /v1/alerts/alertmanager`, `/v1/alerts/aliyun`), with the
    /// gRPC side's TLS and authentication; off unless given (port 0 picks a free one).
    #[arg(long, env = env::ENV_ISOLATOR_ALERTS_ADDR)]
    pub alerts_addr: Option<SocketAddr>,
    /// File (TOML, or YAML by extension) with alert mapping rules tried before the built-in ones.
    #[arg(long, env = env::ENV_ISOLATOR_ALERT_MAPPING, requires = "alerts_addr")]
    pub alert_mapping: Option<PathBuf>,
    /// Health policy file (the agents' format) that gives alerts their actions and the dedupe
    /// window [default: the built-in table].
    #[arg(long, env = env::ENV_ISOLATOR_HEALTH_POLICY)]
    pub health_policy: Option<PathBuf>,
    /// Fault records kept per job, in the ConfigMap `ckptd-faults-<job>` of --lease-namespace
    /// (1-500).
    #[arg(long, env = env::ENV_ISOLATOR_FAULT_RECORDS, default_value_t = faults::DEFAULT_KEEP)]
    pub fault_records: usize,
    /// Endpoint that receives every fault record as JSON (POST), at each stage: https, or http on
    /// a loopback address only.
    #[arg(long, env = env::ENV_ISOLATOR_FAULT_NOTIFY_URL)]
    pub fault_notify_url: Option<String>,
    /// Endpoint that repairs nodes isolated for hardware faults: receives a JSON request (POST)
    /// per isolation; https, or http on a loopback address only.
    #[arg(long, env = env::ENV_ISOLATOR_REPAIR_URL)]
    pub repair_url: Option<String>,
    /// CA certificates (PEM) trusted for an https --fault-notify-url or --repair-url [default: the
    /// system bundle].
    #[arg(long, env = env::ENV_ISOLATOR_HOOK_CA)]
    pub hook_ca: Option<PathBuf>,
}

fn config(what: &str, reason: impl Into<String>) -> Error {
    Error::Config { what: what.to_string(), reason: reason.into() }
}

fn read(flag: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::unreadable(flag, path, &e))
}

fn identity(args: &IsolatorArgs) -> String {
    if let Some(i) = &args.identity {
        return i.clone();
    }
    if let Ok(p) = std::env::var(env::ENV_DOWNWARD_POD_NAME)
        && !p.is_empty()
    {
        return p;
    }
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("ckptd-isolator-{}", std::process::id()))
}

/// Selects rustls's ring provider for the whole process. Dependencies enable both ring and
/// aws-lc-rs, and rustls then refuses to guess; the first caller wins, later calls are no-ops.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Runs the isolator until SIGTERM or Ctrl-C.
pub fn run(args: IsolatorArgs) -> crate::Result<()> {
    install_crypto_provider();
    if !(args.max_isolated_fraction.is_finite() && (0.0..=1.0).contains(&args.max_isolated_fraction)) {
        return Err(config("--max-isolated-fraction", format!("{} is not in 0..=1", args.max_isolated_fraction)));
    }
    if !(args.straggler_factor.is_finite() && args.straggler_factor > 1.0) {
        return Err(config("--straggler-factor", format!("{} must be above 1", args.straggler_factor)));
    }
    if !(1..=500).contains(&args.fault_records) {
        return Err(config("--fault-records", format!("{} is not in 1..=500", args.fault_records)));
    }
    let notify = match &args.fault_notify_url {
        Some(u) => Some(hook::Hook::new("--fault-notify-url", u, args.hook_ca.as_deref())?),
        None => None,
    };
    let repair = match &args.repair_url {
        Some(u) => Some(hook::Hook::new("--repair-url", u, args.hook_ca.as_deref())?),
        None => None,
    };
    if args.client_ca.is_some() && args.tls_cert.is_none() {
        return Err(config("--client-ca", "mTLS needs --tls-cert and --tls-key too"));
    }
    if args.client_ca.is_none() && args.token_file.is_none() {
        return Err(config("authentication", "every call must be authenticated: give --client-ca or --token-file"));
    }
    let token = match &args.token_file {
        Some(p) => {
            let t = read("--token-file", p)?;
            let t = String::from_utf8(t).map_err(|_| config("--token-file", "the token is not UTF-8"))?;
            let t = t.trim().to_string();
            if t.len() < 16 {
                return Err(config("--token-file", "the token must have at least 16 characters"));
            }
            Some(t.into_bytes())
        }
        None => None,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => {
            let mut tls =
                ServerTlsConfig::new().identity(Identity::from_pem(read("--tls-cert", c)?, read("--tls-key", k)?));
            if let Some(ca) = &args.client_ca {
                tls = tls
                    .client_ca_root(Certificate::from_pem(read("--client-ca", ca)?))
                    .client_auth_optional(token.is_some());
            }
            Some(tls)
        }
        _ => None,
    };
    let policy = match &args.health_policy {
        Some(p) => Policy::load(p)?,
        None => Policy::builtin(),
    };
    let alerts = match args.alerts_addr {
        Some(addr) => {
            let mapping = match &args.alert_mapping {
                Some(p) => AlertMapping::load(p, &policy)?,
                None => AlertMapping::builtin(),
            };
            mapping.check(&policy).map_err(|reason| config("--health-policy", reason))?;
            let tls = match (&args.tls_cert, &args.tls_key) {
                (Some(c), Some(k)) => Some(intake::tls_config(c, k, args.client_ca.as_deref(), token.is_some())?),
                _ => None,
            };
            Some(Alerts { addr, mapping, tls })
        }
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("isolator")
        .enable_all()
        .build()
        .map_err(|e| Error::Runtime { what: "start the isolator runtime", reason: e.to_string() })?;
    rt.block_on(serve(args, token, tls, policy, alerts, Hooks { notify, repair }))
}

async fn kube_client(args: &IsolatorArgs) -> Result<::kube::Client> {
    let cfg = match &args.kube_url {
        Some(u) => {
            let uri = u.parse().map_err(|e| config("--kube-url", format!("`{u}`: {e}")))?;
            ::kube::Config::new(uri)
        }
        None => ::kube::Config::infer().await.map_err(|e| {
            config(
                "kubernetes",
                format!("no in-cluster config or kubeconfig ({e}): pass --kube-url, or --dry-run without --lease-name"),
            )
        })?,
    };
    ::kube::Client::try_from(cfg).map_err(|e| config("kubernetes", format!("cannot build the client: {e}")))
}

/// The endpoints the isolator POSTs to, checked before the runtime starts.
struct Hooks {
    notify: Option<hook::Hook>,
    repair: Option<hook::Hook>,
}

/// The alert intake's settings, checked before the runtime starts.
struct Alerts {
    addr: SocketAddr,
    mapping: AlertMapping,
    tls: Option<Arc<rustls::ServerConfig>>,
}

async fn serve(
    args: IsolatorArgs,
    token: Option<Vec<u8>>,
    tls: Option<ServerTlsConfig>,
    policy: Policy,
    alerts: Option<Alerts>,
    hooks: Hooks,
) -> Result<()> {
    let cancel = CancellationToken::new();
    let client = if !args.dry_run || args.lease_name.is_some() { Some(kube_client(&args).await?) } else { None };
    let fencer: Arc<dyn NodeFencer> = match (&client, args.dry_run) {
        (Some(c), false) => Arc::new(KubeFencer::new(c.clone(), args.taint_effect)),
        _ => Arc::new(MemoryFencer::new(usize::MAX)),
    };
    let fault_log: Arc<dyn FaultLog> = match (&client, args.dry_run) {
        (Some(c), false) => Arc::new(KubeFaultLog::new(c.clone(), &args.lease_namespace)),
        _ => Arc::new(MemoryFaultLog::new()),
    };
    let faults = FaultSink::spawn(fault_log, args.fault_records, hooks.notify, cancel.clone());
    let repair = hooks.repair.map(|h| repair::Repairer::spawn(h, faults.clone(), cancel.clone()));
    let (leader_tx, leader_rx) = watch::channel(args.lease_name.is_none());
    let (holder_tx, holder_rx) = watch::channel(String::new());
    let mut tasks = tokio::task::JoinSet::new();
    if let (Some(name), Some(client)) = (&args.lease_name, &client) {
        let cfg = lease::LeaseConfig {
            name: name.clone(),
            namespace: args.lease_namespace.clone(),
            identity: identity(&args),
            duration: args.lease_duration,
            retry: args.lease_retry,
        };
        tracing::info!(identity = %cfg.identity, lease = %cfg.name, "leader election");
        tasks.spawn(lease::run(client.clone(), cfg, leader_tx, holder_tx, cancel.clone()));
    }
    let metrics = Arc::new(Metrics::new());
    let settings = Settings {
        commit_deadline: args.commit_deadline,
        snapshot_timeout: args.snapshot_timeout,
        straggler_k: args.straggler_factor,
        straggler_windows: args.straggler_windows,
        straggler_window: args.straggler_window,
        store_override: args.store.clone(),
        breaker: BreakerConfig {
            max_isolated: args.max_isolated,
            max_fraction: args.max_isolated_fraction,
            window: args.isolation_window,
        },
        dedupe_window: policy.dedupe_window,
        repair,
    };
    let coord =
        Coordinator::new(settings, fencer, faults, metrics.clone(), leader_rx.clone(), holder_rx, cancel.clone());
    tasks.spawn(coord.clone().run_background());

    let listen =
        |what: &'static str, addr: SocketAddr| move |source| Error::Listen { what, addr: addr.to_string(), source };
    let metrics_listener = TcpListener::bind(args.metrics_addr)
        .await
        .map_err(listen("the isolator's metrics (--metrics-addr)", args.metrics_addr))?;
    let grpc_listener =
        TcpListener::bind(args.listen).await.map_err(listen("the isolator's gRPC (--listen)", args.listen))?;
    let grpc_addr = grpc_listener.local_addr().map_err(listen("the isolator's gRPC (--listen)", args.listen))?;
    let metrics_addr =
        metrics_listener.local_addr().map_err(listen("the isolator's metrics (--metrics-addr)", args.metrics_addr))?;
    tasks.spawn(metrics::serve(metrics_listener, metrics, leader_rx, cancel.clone()));
    let mut alerts_shown = String::new();
    if let Some(a) = alerts {
        let what = "the isolator's alert intake (--alerts-addr)";
        let l = TcpListener::bind(a.addr).await.map_err(listen(what, a.addr))?;
        let bound = l.local_addr().map_err(listen(what, a.addr))?;
        alerts_shown = format!(" alerts={bound}");
        let intake = Arc::new(intake::Intake::new(coord.clone(), a.mapping, policy, token.clone()));
        tasks.spawn(intake::serve(l, a.tls, intake, cancel.clone()));
    }

    let auth = Auth::new(token, args.client_ca.is_some());
    let svc = Service::new(coord);
    let isolator = IsolatorServer::new(svc.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let admin = IsolatorAdminServer::new(svc)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).map_err(|e| config("--tls-cert", format!("bad TLS material: {e}")))?;
    }
    let router = builder
        .add_service(InterceptedService::new(isolator, auth.clone()))
        .add_service(InterceptedService::new(admin, auth));

    let sig = cancel.clone();
    tasks.spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        sig.cancel();
    });
    let _ =
        writeln!(std::io::stdout(), "ckptd isolator listening grpc={grpc_addr} metrics={metrics_addr}{alerts_shown}");
    let _ = std::io::stdout().flush();
    tracing::info!(grpc = %grpc_addr, metrics = %metrics_addr, dry_run = args.dry_run, "isolator serving");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
    let served = router.serve_with_incoming_shutdown(incoming, cancel.clone().cancelled_owned()).await;
    cancel.cancel();
    // Drain the background tasks with a grace period (the Lease is released on the way out).
    let _ = tokio::time::timeout(Duration::from_secs(5), async { while tasks.join_next().await.is_some() {} }).await;
    served.map_err(|e| Error::Serve { what: "the isolator's gRPC", reason: crate::error::source_chain(&e) })
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: IsolatorArgs,
    }

    #[test]
    fn flags_are_consistent_and_default_as_documented() {
        Cli::command().debug_assert();
        let a = Cli::try_parse_from(["isolator", "--token-file", "/t"]).unwrap().args;
        assert_eq!(a.listen.to_string(), "0.0.0.0:7443");
        assert_eq!(a.metrics_addr.to_string(), "0.0.0.0:9102");
        assert_eq!(a.taint_effect, TaintEffect::NoSchedule);
        assert_eq!((a.max_isolated, a.commit_deadline), (2, Duration::from_secs(120)));
        let a =
            Cli::try_parse_from(["isolator", "--taint-effect", "NoExecute", "--isolation-window", "10m"]).unwrap().args;
        assert_eq!((a.taint_effect, a.isolation_window), (TaintEffect::NoExecute, Duration::from_secs(600)));
        assert!(Cli::try_parse_from(["isolator", "--taint-effect", "Evict"]).is_err());
        assert!(Cli::try_parse_from(["isolator", "--tls-cert", "/c"]).is_err(), "--tls-cert needs --tls-key");
    }

    #[test]
    fn bad_values_are_configuration_errors() {
        let mut a = Cli::try_parse_from(["isolator", "--token-file", "/t"]).unwrap().args;
        a.max_isolated_fraction = 1.5;
        assert_eq!(run(a.clone()).unwrap_err().kind(), crate::ErrorKind::Config);
        a.max_isolated_fraction = 0.5;
        a.fault_records = 0;
        assert_eq!(run(a.clone()).unwrap_err().kind(), crate::ErrorKind::Config);
        a.fault_records = 50;
        a.fault_notify_url = Some("http://192.0.2.1/faults".into());
        let e = run(a.clone()).unwrap_err();
        assert!(e.to_string().contains("loopback"), "{e}");
        a.fault_notify_url = None;
        a.repair_url = Some("http://repairs.example/v1".into());
        let e = run(a.clone()).unwrap_err();
        assert!(e.to_string().contains("--repair-url") && e.to_string().contains("loopback"), "{e}");
        a.repair_url = None;
        a.token_file = None;
        assert_eq!(run(a).unwrap_err().kind(), crate::ErrorKind::Config);
    }
}
