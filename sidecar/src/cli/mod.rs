//! `ckptctl`, the operator's tool: list, inspect, verify, clean and export the checkpoints of a job
//! on any store the engine opens.
//!
//! It exists so that an operator can answer "what is there, is it sound, and can I get the weights
//! out" without a trainer, a GPU or the sidecar running. Every command is a thin layer over one or
//! two [`ckpt_core::Engine`] calls; nothing here reads the format itself.
//!
//! The binary (`src/bin/ckptctl.rs`) only parses arguments and calls [`run`]; the logic lives here
//! so that it is unit-tested in-process.
//!
//! Exit codes:
//! - [`EXIT_OK`]: the command succeeded (for `verify`: every checked step is sound);
//! - [`EXIT_CORRUPT`]: `verify` found damaged or missing checkpoint data;
//! - [`EXIT_FAILURE`]: anything else went wrong (step not found, store unreachable, I/O);
//! - [`EXIT_USAGE`]: the command line or configuration is invalid (unknown flag, bad URL, bad job
//!   name, `--keep 0`), as `sysexits.h`'s `EX_USAGE`.

mod export;
#[cfg(feature = "server")]
mod faults;
mod gc;
mod inspect;
#[cfg(feature = "server")]
mod jobs;
mod ls;
mod progress;
#[cfg(feature = "server")]
mod release;
mod snapshot;
mod verify;

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context as _;
use ckpt_core::{Engine, EngineConfig};
use clap::{Args, Parser, Subcommand};

use crate::env::{ENV_CKPTCTL_LOG, ENV_JOB, ENV_SOCKET, ENV_STORE};

pub use export::{MAX_HEADER_LEN, SafetensorsLayout, write_safetensors_file};

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: `verify` found corruption.
pub const EXIT_CORRUPT: u8 = 1;
/// Exit code: the command failed for any other reason than usage or corruption.
pub const EXIT_FAILURE: u8 = 2;
/// Exit code: invalid command line or configuration (`EX_USAGE` of `sysexits.h`).
pub const EXIT_USAGE: u8 = 64;

/// Inspect, verify, clean and export ckptd checkpoints.
#[derive(Debug, Parser)]
#[command(name = "ckptctl", version = crate::VERSION)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// One `ckptctl` command.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List every step of the job, committed or not, and mark the one restores would use.
    Ls(LsArgs),
    /// Show a committed step's manifest and its shards' tensor tables.
    Inspect(InspectArgs),
    /// Read and check every byte of committed steps; exits 1 when any is damaged.
    Verify(VerifyArgs),
    /// Apply retention: keep the newest K committed steps and remove older ones and debris.
    Gc(GcArgs),
    /// Restore one rank of a step and write its tensors to a file (safetensors).
    Export(ExportArgs),
    /// The isolator's jobs: state, generation, newest global step, isolated nodes, stragglers.
    #[cfg(feature = "server")]
    Jobs(jobs::JobsArgs),
    /// Undo the isolation of a node (uncordon, remove the taint and the evidence).
    #[cfg(feature = "server")]
    Release(release::ReleaseArgs),
    /// The isolator's fault records of a job: what failed, what was decided, and when the job was
    /// isolated, restarted and resumed.
    #[cfg(feature = "server")]
    Faults(faults::FaultsArgs),
    /// Ask the trainers of a running agent for an immediate snapshot and wait for it.
    Snapshot(SnapshotArgs),
    /// Show what a running agent holds for each rank (memory tier, durable step, queue).
    AgentStatus(AgentStatusArgs),
    /// The live status of a running agent's health reporters and its active faults.
    Health(AgentStatusArgs),
    /// Drill: inject a fault into a running agent (started with --allow-inject); it goes through
    /// the same classification and policy as a real one.
    Inject(InjectArgs),
}

/// `ckptctl snapshot`.
#[derive(Debug, Clone, Args)]
pub struct SnapshotArgs {
    /// The agent's Unix socket.
    #[arg(long, env = ENV_SOCKET, value_name = "PATH")]
    pub socket: std::path::PathBuf,
    /// Only this rank (default: every attached rank).
    #[arg(long, value_name = "R")]
    pub rank: Option<u32>,
    /// How long to wait for the trainers to take it.
    #[arg(long, default_value = "2m")]
    pub timeout: humantime::Duration,
    /// Why, for the logs.
    #[arg(long, default_value = "requested with ckptctl")]
    pub reason: String,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `ckptctl inject`: exactly one of `--xid`, `--hang`, `--ib-down`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("fault").required(true).args(["xid", "hang", "ib_down"])))]
pub struct InjectArgs {
    /// The agent's Unix socket.
    #[arg(long, env = ENV_SOCKET, value_name = "PATH")]
    pub socket: std::path::PathBuf,
    /// An XID error (e.g. 79: GPU fallen off the bus).
    #[arg(long, value_name = "N")]
    pub xid: Option<u32>,
    /// The GPU of the XID (host NVML index).
    #[arg(long, value_name = "I", requires = "xid")]
    pub gpu: Option<u32>,
    /// A hang of every attached rank, or of `--rank`.
    #[arg(long)]
    pub hang: bool,
    /// The rank of the hang.
    #[arg(long, value_name = "R", requires = "hang")]
    pub rank: Option<u32>,
    /// An InfiniBand port going down, as `device/port` (e.g. mlx5_0/1).
    #[arg(long, value_name = "PORT")]
    pub ib_down: Option<String>,
}

/// `ckptctl agent-status`.
#[derive(Debug, Clone, Args)]
pub struct AgentStatusArgs {
    /// The agent's Unix socket.
    #[arg(long, env = ENV_SOCKET, value_name = "PATH")]
    pub socket: std::path::PathBuf,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The job every command works on.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// Store URL: file:///path, s3://bucket/prefix, oss://, gs://, az:// or memory://.
    #[arg(long, env = ENV_STORE, hide_env_values = true, value_name = "URL")]
    pub store: String,
    /// Job name.
    #[arg(long, env = ENV_JOB, value_name = "NAME")]
    pub job: String,
}

/// `ckptctl ls`.
#[derive(Debug, Clone, Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub target: Target,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `ckptctl inspect`.
#[derive(Debug, Clone, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub target: Target,
    /// Step to inspect; the newest sound committed step when omitted.
    #[arg(long, value_name = "N")]
    pub step: Option<u64>,
    /// Show only this rank's tensor table (default: every rank's).
    #[arg(long, value_name = "R")]
    pub rank: Option<u32>,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `ckptctl verify`.
#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub target: Target,
    /// Step to verify; the newest committed step when omitted (even one that `latest` skips).
    #[arg(long, value_name = "N", conflicts_with = "all")]
    pub step: Option<u64>,
    /// Verify every committed step.
    #[arg(long)]
    pub all: bool,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `ckptctl gc`.
#[derive(Debug, Clone, Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub target: Target,
    /// Committed steps to keep (at least 1; the newest sound step is always kept).
    #[arg(long, value_name = "K", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub keep: usize,
    /// Report what would be removed without removing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Output formats of `ckptctl export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// Hugging Face safetensors.
    Safetensors,
}

/// `ckptctl export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub target: Target,
    /// Output format.
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// Rank whose shard to export.
    #[arg(long, value_name = "R")]
    pub rank: u32,
    /// File to write (replaced atomically if it exists).
    #[arg(long, value_name = "FILE")]
    pub out: std::path::PathBuf,
    /// Step to export; the newest sound committed step when omitted.
    #[arg(long, value_name = "N")]
    pub step: Option<u64>,
    /// Leave out tensors whose dtype the format cannot hold (complex128) instead of failing.
    #[arg(long)]
    pub skip_unsupported: bool,
}

/// What every command works with.
struct Ctx<'a> {
    engine: Engine,
    job: String,
    out: &'a mut dyn Write,
    /// Whether to draw progress bars (only when stdout is a terminal).
    progress: bool,
}

impl Ctx<'_> {
    /// The store's URL with credentials removed: the only form of it that is ever printed.
    fn url(&self) -> &str {
        self.engine.store().url()
    }

    /// Writes `value` as one pretty JSON document and a newline.
    fn json(&mut self, value: &impl serde::Serialize) -> anyhow::Result<()> {
        serde_json::to_writer_pretty(&mut *self.out, value).context("cannot write output")?;
        writeln!(self.out).context("cannot write output")
    }
}

/// Runs one parsed command, writing its report to `out`. Progress bars go to stderr, and only
/// when `progress` is set. Returns the exit code for outcomes that are not errors (`verify`'s
/// corruption); errors map to exit codes through [`exit_code`].
pub fn run(cli: Cli, out: &mut dyn Write, progress: bool) -> anyhow::Result<ExitCode> {
    let target = match &cli.command {
        Command::Snapshot(a) => return snapshot::run(a, out).map(ExitCode::from),
        Command::Health(a) => return snapshot::health(a, out).map(ExitCode::from),
        Command::Inject(a) => return snapshot::inject(a, out).map(ExitCode::from),
        Command::AgentStatus(a) => return snapshot::status(a, out).map(ExitCode::from),
        Command::Ls(a) => &a.target,
        Command::Inspect(a) => &a.target,
        Command::Verify(a) => &a.target,
        Command::Gc(a) => &a.target,
        Command::Export(a) => &a.target,
        #[cfg(feature = "server")]
        Command::Jobs(a) => return jobs::run(a, out).map(ExitCode::from),
        #[cfg(feature = "server")]
        Command::Release(a) => return release::run(a, out).map(ExitCode::from),
        #[cfg(feature = "server")]
        Command::Faults(a) => return faults::run(a, out).map(ExitCode::from),
    };
    ckpt_core::store::layout::validate_job(&target.job)?;
    // The URL may hold credentials: only the engine's redacted form appears in messages. No
    // command creates a missing file:// directory: a mistyped path is reported, not made.
    let mut config = EngineConfig::default();
    config.store.create_local_dir = false;
    let engine = Engine::open(&target.store, config)?;
    let mut ctx = Ctx { engine, job: target.job.clone(), out, progress };
    let code = match cli.command {
        Command::Ls(a) => ls::run(&mut ctx, &a).map(|()| EXIT_OK)?,
        Command::Inspect(a) => inspect::run(&mut ctx, &a).map(|()| EXIT_OK)?,
        Command::Verify(a) => verify::run(&mut ctx, &a)?,
        Command::Gc(a) => gc::run(&mut ctx, &a).map(|()| EXIT_OK)?,
        Command::Export(a) => export::run(&mut ctx, &a).map(|()| EXIT_OK)?,
        Command::Snapshot(a) => snapshot::run(&a, ctx.out)?,
        Command::Health(a) => snapshot::health(&a, ctx.out)?,
        Command::Inject(a) => snapshot::inject(&a, ctx.out)?,
        Command::AgentStatus(a) => snapshot::status(&a, ctx.out)?,
        #[cfg(feature = "server")]
        Command::Jobs(_) | Command::Release(_) | Command::Faults(_) => EXIT_OK,
    };
    ctx.out.flush().context("cannot write output")?;
    Ok(ExitCode::from(code))
}

/// The exit code for a failed command: [`EXIT_USAGE`] for invalid configuration (a URL the engine
/// cannot open, an invalid job name or setting, a missing or unreadable flag value),
/// [`EXIT_FAILURE`] for everything else.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    let usage = err.chain().any(|e| {
        matches!(
            e.downcast_ref::<ckpt_core::Error>(),
            Some(ckpt_core::Error::InvalidUrl { .. } | ckpt_core::Error::InvalidConfig { .. })
        ) || e.downcast_ref::<crate::Error>().is_some_and(|e| e.kind() == crate::ErrorKind::Config)
    });
    if usage { EXIT_USAGE } else { EXIT_FAILURE }
}

/// Whether `err` is a closed stdout (`ckptctl ls | head`), which is not worth a message.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|e| e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

/// Formats an error as the one line `ckptctl` prints: the whole cause chain, newlines folded.
pub fn error_line(err: &anyhow::Error) -> String {
    format!("error: {err:#}").replace(['\n', '\r'], " ")
}

/// Installs the stderr logger, filtered by [`ENV_CKPTCTL_LOG`].
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env(ENV_CKPTCTL_LOG)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // A second initialisation (in tests) is harmless: the first subscriber stays. Colour only on a
    // terminal: escape codes in a redirected log are noise to whoever reads the file.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC, to the second.
fn rfc3339(unix_ms: i64) -> String {
    let ms = u64::try_from(unix_ms).unwrap_or(0);
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// The step `--step` names, or the newest committed step that validates.
fn step_or_latest(ctx: &Ctx<'_>, step: Option<u64>) -> anyhow::Result<(u64, bool)> {
    if let Some(s) = step {
        return Ok((s, false));
    }
    match ctx.engine.latest(&ctx.job)? {
        Some(m) => Ok((m.step, true)),
        None => anyhow::bail!(
            "job `{}` has no sound committed step on {}: run `ckptctl ls` to see what is there",
            ctx.job,
            ctx.url()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_parses_with_flags_after_the_subcommand() {
        let cli = Cli::try_parse_from(["ckptctl", "gc", "--store", "memory://", "--job", "j", "--keep", "2"]).unwrap();
        let Command::Gc(a) = cli.command else { panic!("not gc") };
        assert_eq!((a.keep, a.dry_run, a.target.job.as_str()), (2, false, "j"));
        let e = Cli::try_parse_from(["ckptctl", "gc", "--store", "memory://", "--job", "j", "--keep", "0"]);
        assert!(e.is_err(), "--keep 0 must be refused");
        let e = Cli::try_parse_from(["ckptctl", "verify", "--store", "m://", "--job", "j", "--step", "1", "--all"]);
        assert!(e.is_err(), "--step and --all conflict");
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn configuration_errors_map_to_ex_usage() {
        let bad_url = anyhow::Error::new(ckpt_core::Error::InvalidUrl { url: "x".into(), reason: "y".into() });
        assert_eq!(exit_code(&bad_url), EXIT_USAGE);
        let wrapped = bad_url.context("opening the store");
        assert_eq!(exit_code(&wrapped), EXIT_USAGE);
        let missing = anyhow::Error::new(ckpt_core::Error::NotFound { what: "step 3".into() });
        assert_eq!(exit_code(&missing), EXIT_FAILURE);
    }

    #[test]
    fn errors_print_on_one_line() {
        let e = anyhow::anyhow!("inner\nsecond line").context("outer");
        assert_eq!(error_line(&e), "error: outer: inner second line");
    }

    #[test]
    fn an_os_error_is_said_once() {
        let io = ckpt_core::Error::Io {
            op: "create",
            path: "/proc/sys/x.tmp".into(),
            cause: std::io::Error::from_raw_os_error(2),
        };
        let line = error_line(&anyhow::Error::new(io).context("cannot export"));
        assert_eq!(line.matches("(os error 2)").count(), 1, "{line}");
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00Z");
    }
}
