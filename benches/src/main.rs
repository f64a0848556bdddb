//! `ckptd-benches`: measurements of ckptd against the limits of the machine it runs on.
//!
//! `engine` times the engine's save and restore on a `file://` store next to the plain file
//! system calls and memcpy on the same bytes, so every ckptd number comes with the ceiling it
//! should be compared to.
//!
//! Exit codes: 0 on success, 64 for a bad configuration (one line on stderr), 1 when a run fails.

mod engine;
mod machine;
mod units;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};

/// Exit code for a bad configuration (`EX_USAGE` of sysexits.h).
const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(name = "ckptd-benches", about = "ckptd benchmarks against the memcpy and storage limits")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Engine save/restore on file:// next to write+fsync, read and memcpy of the same bytes.
    Engine(EngineArgs),
}

#[derive(Debug, clap::Args)]
struct EngineArgs {
    /// Bytes per snapshot: a number with an optional unit (KiB, MiB, GiB, or KB, MB, GB).
    #[arg(long, default_value = "1GiB", value_parser = units::parse_size)]
    size: u64,
    /// Repetitions of every measurement.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Directory to write in; a temporary directory is made inside it and removed afterwards.
    /// [default: $TMPDIR when set, else the current directory; /tmp is often tmpfs]
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also write the samples and the summary to OUT/engine.json.
    #[arg(long)]
    out: Option<PathBuf>,
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
            return fail(EXIT_CONFIG, &format!("{reason} (see `ckptd-benches --help`)"));
        }
    };
    match cli.command {
        Command::Engine(a) => {
            let dir = match a.dir {
                Some(d) => d,
                None => match std::env::var_os("TMPDIR").map(PathBuf::from).map_or_else(std::env::current_dir, Ok) {
                    Ok(d) => d,
                    Err(e) => return fail(EXIT_CONFIG, &format!("cannot resolve the current directory: {e}")),
                },
            };
            let cfg = engine::Config { size: a.size, reps: a.reps, dir, out: a.out };
            let stdout = std::io::stdout();
            match engine::run(&cfg, &mut stdout.lock()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(engine::Failure::Config(reason)) => fail(EXIT_CONFIG, &reason),
                Err(engine::Failure::Run(e)) => fail(1, &format!("{e:#}")),
            }
        }
    }
}

fn fail(code: u8, reason: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "ckptd-benches: {reason}");
    ExitCode::from(code)
}
