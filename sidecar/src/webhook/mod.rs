//! The mutating admission webhook: injects the agent into training pods that opt in.
//!
//! Users label a pod template, or a PyTorchJob, JobSet or Job ([`templates`]), `ckptd.io/inject: "true"`
//! instead of editing their pods; the webhook adds
//! the agent as a native sidecar, the arena, socket and NCCL-log volumes, the environment trainers
//! and NCCL need, and what the agent's health reporters read (the node's kernel log with
//! `CAP_SYSLOG`, the GPUs through the NVIDIA container runtime, the trainers' NCCL paths), each
//! reporter that needs a grant switchable per pod (`ckptd.io/kmsg`, `ckptd.io/nvml`). The decision is the pure [`mutate()`] (tested on captured AdmissionReviews); the rest of
//! this module is a thin HTTPS shell around it, as in kube-rs's admission controller example.
//!
//! It never touches a pod that did not opt in, never replaces a value the user set (the patch only
//! appends), and denies invalid `ckptd.io/*` annotations with a message naming the annotation and the
//! accepted form. docs/DEPLOY.md is the operator's guide.

pub mod annotations;
pub mod config;
pub mod mutate;
pub mod quantity;
pub mod server;
pub mod templates;
pub mod tls;
pub mod value;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use config::Config;
pub use mutate::{Denial, mutate};

use crate::{Error, Result, env};

/// Command-line flags of `ckptd webhook`. Without a subcommand it serves; `gen-cert` writes a CA and a
/// serving certificate for clusters without cert-manager.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct WebhookArgs {
    /// A one-off task instead of serving.
    #[command(subcommand)]
    pub command: Option<WebhookCommand>,
    /// Address to serve HTTPS on.
    #[arg(long, env = env::ENV_WEBHOOK_LISTEN, default_value = "0.0.0.0:8443")]
    pub listen: String,
    /// Serving certificate chain (PEM). Reloaded when the file changes.
    #[arg(long, env = env::ENV_WEBHOOK_TLS_CERT)]
    pub tls_cert: Option<PathBuf>,
    /// Serving private key (PEM). Reloaded when the file changes.
    #[arg(long, env = env::ENV_WEBHOOK_TLS_KEY)]
    pub tls_key: Option<PathBuf>,
    /// Image of the injected agent container, e.g. registry.example.com/ckptd:0.1.0.
    #[arg(long, env = env::ENV_AGENT_IMAGE)]
    pub agent_image: Option<String>,
    /// YAML file with the cluster defaults (store, arena size, slots, isolator, agent resources).
    #[arg(long, env = env::ENV_WEBHOOK_CONFIG)]
    pub config: Option<PathBuf>,
    /// How often the certificate files are checked for a change.
    #[arg(long, env = env::ENV_WEBHOOK_CERT_RELOAD_INTERVAL, default_value = "10s", value_parser = humantime::parse_duration)]
    pub cert_reload_interval: Duration,
}

/// The webhook's one-off tasks.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum WebhookCommand {
    /// Write a new CA (ca.crt) and a serving certificate and key (tls.crt, tls.key) for
    /// <service>.<namespace>.svc, for clusters without cert-manager.
    GenCert(GenCertArgs),
}

/// Flags of `ckptd webhook gen-cert`.
#[derive(Debug, Clone, clap::Args)]
pub struct GenCertArgs {
    /// The webhook's Service name.
    #[arg(long, default_value = "ckptd-webhook")]
    pub service: String,
    /// The webhook's namespace.
    #[arg(long, default_value = "ckptd")]
    pub namespace: String,
    /// Directory to write ca.crt, tls.crt and tls.key into (created if missing; existing files are
    /// not overwritten).
    #[arg(long, default_value = ".")]
    pub out_dir: PathBuf,
    /// Validity of both certificates, in days (1 to 36500).
    #[arg(long, default_value_t = 825)]
    pub days: u32,
}

/// Runs the webhook until SIGTERM (or runs `gen-cert`).
pub fn run(args: WebhookArgs) -> Result<()> {
    if let Some(WebhookCommand::GenCert(g)) = args.command {
        return gen_cert(&g);
    }
    let required = |v: Option<PathBuf>, flag: &str| {
        v.ok_or_else(|| Error::Config { what: flag.into(), reason: "is required to serve".into() })
    };
    let cert = required(args.tls_cert, "--tls-cert")?;
    let key = required(args.tls_key, "--tls-key")?;
    let image = args.agent_image.ok_or_else(|| Error::Config {
        what: "--agent-image".into(),
        reason: "is required: the image of the injected agent, e.g. registry.example.com/ckptd:0.1.0".into(),
    })?;
    let cfg = match &args.config {
        Some(path) => Config::load(image, path)?,
        None => {
            let c = Config::new(image);
            c.validate()?;
            c
        }
    };
    if args.cert_reload_interval.is_zero() {
        return Err(Error::Config { what: "--cert-reload-interval".into(), reason: "must be above zero".into() });
    }
    let certs = tls::CertStore::load(&cert, &key)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ckptd-webhook")
        .enable_all()
        .build()
        .map_err(|e| Error::Runtime { what: "start the webhook runtime", reason: e.to_string() })?;
    rt.block_on(async move {
        let listener = server::bind(&args.listen).await?;
        tracing::info!(listen = %args.listen, "webhook serving");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let watcher = tokio::spawn(Arc::clone(&certs).watch(args.cert_reload_interval, stopped(stop_rx.clone())));
        let served = tokio::spawn(server::serve(listener, Arc::new(cfg), certs, stopped(stop_rx)));
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        let _ = watcher.await;
        served.await.unwrap_or(Ok(()))
    })
}

/// Resolves on SIGTERM (the kubelet) or Ctrl-C.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the webhook");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn gen_cert(g: &GenCertArgs) -> Result<()> {
    if !value::is_dns_subdomain(&g.service) || !value::is_dns_subdomain(&g.namespace) {
        return Err(Error::Config {
            what: "gen-cert".into(),
            reason: "--service and --namespace must be Kubernetes names (lowercase letters, digits, `-`)".into(),
        });
    }
    // Checked (with --days) before anything is written, so a bad value leaves no directory behind.
    let out = tls::generate(&g.service, &g.namespace, g.days)?;
    let io = |p: &Path, e: std::io::Error| Error::Config {
        what: format!("gen-cert {}", p.display()),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(&g.out_dir).map_err(|e| io(&g.out_dir, e))?;
    for (name, pem, mode) in
        [("ca.crt", &out.ca_pem, 0o644), ("tls.crt", &out.cert_pem, 0o644), ("tls.key", &out.key_pem, 0o600)]
    {
        let path = g.out_dir.join(name);
        write_new(&path, pem.as_bytes(), mode).map_err(|e| io(&path, e))?;
    }
    let _ = writeln!(
        std::io::stdout(),
        "wrote ca.crt, tls.crt and tls.key to {dir}\n\
         create the Secret:  kubectl -n {ns} create secret tls {svc}-tls --cert={dir}/tls.crt --key={dir}/tls.key\n\
         set the caBundle:   helm ... --set webhook.caBundle=$(base64 -w0 {dir}/ca.crt)  (or see docs/DEPLOY.md)",
        dir = g.out_dir.display(),
        ns = g.namespace,
        svc = g.service,
    );
    Ok(())
}

/// Writes a file that must not exist yet, with `mode`, so a re-run never silently replaces the key a
/// running webhook serves.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}
