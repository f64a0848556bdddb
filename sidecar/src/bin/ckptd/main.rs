//! `ckptd`: the daemon binary. Each role is a subcommand: `agent`, `isolator`, `webhook`, and `demo`,
//! which runs the checkpoint path end to end with nothing else installed.
//!
//! Exit codes: 0 on success, 64 for a bad configuration (one line on stderr, as linkerd does), 1
//! when a run fails.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use ckpt_core::Compression;
use ckptd::env::ENV_LOG;
use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

mod demo;

/// Exit code for a bad configuration (`EX_USAGE` of sysexits.h).
const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(name = "ckptd", version = ckptd::VERSION, about = "ckptd: fast, verified checkpoints for GPU training")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a synthetic model, checkpoint it in the background, crash, restore and verify bitwise.
    /// Needs no GPU, cluster or server.
    Demo(DemoArgs),
    /// The per-pod agent: serves trainers over a Unix socket and persists their snapshots.
    Agent(Box<ckptd::agent::AgentArgs>),
    /// The cluster node isolator: fault intake, global commit, node isolation, coordinated restore.
    Isolator(Box<ckptd::isolator::IsolatorArgs>),
    /// The mutating admission webhook that injects the agent into training pods.
    Webhook(ckptd::webhook::WebhookArgs),
    /// The trainer process of `demo --mode sidecar` (internal).
    #[command(hide = true)]
    DemoTrainer(DemoTrainerArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DemoMode {
    /// Persist from a thread of the training process.
    Embedded,
    /// Start an agent process; kill the trainer mid-run and restore from the agent's memory.
    Sidecar,
}

#[derive(Debug, Args)]
struct DemoTrainerArgs {
    #[arg(long)]
    socket: std::path::PathBuf,
    #[arg(long)]
    job: String,
    #[arg(long)]
    state_bytes: u64,
    #[arg(long)]
    steps: u64,
    #[arg(long)]
    every: u64,
    #[arg(long)]
    compute_ms: u64,
    #[arg(long)]
    resume: Option<u64>,
}

impl DemoTrainerArgs {
    fn config(self) -> demo::sidecar::TrainerConfig {
        let demo = demo::Config {
            store: String::new(),
            job: self.job,
            arena_dir: None,
            state_bytes: self.state_bytes,
            steps: self.steps,
            every: self.every,
            compression: Compression::None,
            compute: Duration::from_millis(self.compute_ms),
            keep: 0,
        };
        demo::sidecar::TrainerConfig { socket: self.socket, demo, resume: self.resume }
    }
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Store URL (file:///dir, s3://bucket/prefix, ...) [default: ./ckptd-demo-store]
    #[arg(long)]
    store: Option<String>,
    /// Job name in the store.
    #[arg(long, default_value = "demo")]
    job: String,
    /// Size of the training state in MiB.
    #[arg(long, default_value_t = 256)]
    state_mib: u64,
    /// Training steps before the simulated crash.
    #[arg(long, default_value_t = 30)]
    steps: u64,
    /// Checkpoint every this many steps.
    #[arg(long, default_value_t = 5)]
    every: u64,
    /// Chunk compression: none, auto, zstd or zstd:<level>.
    #[arg(long, default_value = "none", value_parser = parse_compression)]
    compression: Compression,
    /// Simulated forward + backward time per step, in milliseconds; persisting overlaps it.
    #[arg(long, default_value_t = 100)]
    compute_ms: u64,
    /// Committed steps to keep (0 keeps all).
    #[arg(long, default_value_t = 2)]
    keep: usize,
    /// Directory of the arena, the memory tier [default: /dev/shm/ckptd; in sidecar mode a
    /// directory of its own under /dev/shm, removed at the end].
    #[arg(long)]
    arena_dir: Option<std::path::PathBuf>,
    /// `embedded` (one process) or `sidecar` (an agent process and a trainer that is SIGKILLed
    /// and restarted).
    #[arg(long, value_enum, default_value = "embedded")]
    mode: DemoMode,
}

fn parse_compression(s: &str) -> Result<Compression, String> {
    s.parse().map_err(|e: ckpt_core::Error| e.to_string())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let reason = match e.kind() {
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand => {
                    "a subcommand is required".to_string()
                }
                _ => e.to_string().lines().next().unwrap_or_default().trim_start_matches("error: ").to_string(),
            };
            return fail_config(&format!("{reason} (see `ckptd --help`)"));
        }
    };
    if let Err(e) = init_logging() {
        return fail_config(&format!("{e:#}"));
    }
    match cli.command {
        Command::Demo(args) => run_demo(args),
        Command::Agent(args) => exit_with(ckptd::agent::run(*args)),
        Command::Isolator(args) => exit_with(ckptd::isolator::run(*args)),
        Command::Webhook(args) => exit_with(ckptd::webhook::run(args)),
        Command::DemoTrainer(args) => match demo::sidecar::trainer(&args.config(), &mut std::io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "ckptd demo-trainer: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Exit code of a daemon's run: 64 with one line for a bad configuration, 1 for any other failure.
fn exit_with(r: ckptd::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == ckptd::ErrorKind::Config => fail_config(&e.to_string()),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "ckptd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() -> anyhow::Result<()> {
    let filter = match std::env::var(ENV_LOG) {
        Ok(v) => EnvFilter::try_new(&v).with_context(|| format!("{ENV_LOG}=`{v}` is not a valid log filter"))?,
        Err(std::env::VarError::NotPresent) => EnvFilter::new("warn"),
        Err(e) => anyhow::bail!("{ENV_LOG}: {e}"),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot start logging: {e}"))
}

fn run_demo(args: DemoArgs) -> ExitCode {
    let cwd = match std::env::current_dir() {
        Ok(cwd) => cwd,
        Err(e) => return fail_config(&format!("cannot resolve the current directory: {e}")),
    };
    let cfg = demo::Config {
        store: args.store.unwrap_or_else(|| demo::default_store(&cwd)),
        job: args.job,
        arena_dir: args.arena_dir,
        state_bytes: args.state_mib.saturating_mul(1 << 20),
        steps: args.steps,
        every: args.every,
        compression: args.compression,
        compute: Duration::from_millis(args.compute_ms),
        keep: args.keep,
    };
    if let Err(reason) = cfg.validate() {
        return fail_config(&reason);
    }
    let mut out = std::io::stdout().lock();
    let r = match args.mode {
        DemoMode::Embedded => demo::run(&cfg, &mut out),
        DemoMode::Sidecar => demo::sidecar::run(&cfg, &cwd.join("ckptd-demo-sidecar"), &mut out),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if demo::is_config(&e) => fail_config(&e.to_string()),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "ckptd demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn fail_config(reason: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "ckptd: {reason}");
    ExitCode::from(EXIT_CONFIG)
}
