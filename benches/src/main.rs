//! `ckptd-benches`: measurements of ckptd against the limits of the machine it runs on.
//!
//! `engine` times the engine's save and restore on a `file://` store next to the plain file
//! system calls and memcpy on the same bytes, so every ckptd number comes with the ceiling it
//! should be compared to. `compare` puts ckptd (embedded and sidecar, through its Rust client and,
//! with torch, through Python) next to torch.save, DCP and safetensors and the machine's limits in
//! one run, measures what a training step pays while a save persists, adds multi-rank scaling, the
//! recovery drill's timeline (`--drill`) and the goodput model, and writes `results.json`, a
//! markdown table and PNG plots.
//!
//! Exit codes: 0 on success, 64 for a bad configuration (one line on stderr), 1 when a run fails.

mod client;
mod compare;
mod drill;
mod engine;
mod goodput;
mod machine;
mod plot;
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
    /// ckptd embedded and sidecar against torch.save, DCP, safetensors and the limits; scaling;
    /// goodput. Writes OUT/results.json, OUT/results.md and PNG plots.
    Compare(Box<CompareArgs>),
    /// compare's child: ckptd through the Rust client, one system at one size.
    #[command(hide = true)]
    ClientChild(client::ChildArgs),
    /// compare's child: the training-step stall of one priority and file write mode.
    #[command(hide = true)]
    StepStallChild(client::stall::StallArgs),
}

#[derive(Debug, clap::Args)]
struct CompareArgs {
    /// State sizes, comma-separated (units as for `engine --size`).
    #[arg(long, default_value = "256MiB,1GiB", value_delimiter = ',', value_parser = units::parse_size)]
    sizes: Vec<u64>,
    /// Repetitions of every measurement.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Where results.json, results.md and the PNGs go.
    #[arg(long, default_value = "bench-out/compare")]
    out: PathBuf,
    /// Directory the checkpoints and the limit files are written to (a temporary directory is made
    /// inside it and removed). [default: OUT]
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Python with torch and the ckptd package; safetensors is measured when it imports.
    /// [default: $CKPTD_BENCH_PYTHON, else python3]
    #[arg(long)]
    python: Option<PathBuf>,
    /// Before measuring, `pip install` the peers that --python cannot import (safetensors) into
    /// --python's own environment (use a virtualenv).
    #[arg(long)]
    install_peers: bool,
    /// `cuda` uses CUDA tensors and pinned copies (and fails without CUDA); `auto` picks it when
    /// torch sees a GPU.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    device: String,
    /// Only these systems: in Rust ckptd-rust, ckptd-sidecar-rust and step-stall (the
    /// training-step stall); in Python ckptd, ckptd-sidecar, torch.save, dcp, dcp-cached,
    /// safetensors and memcpy.
    #[arg(long)]
    systems: Option<String>,
    /// World sizes of the scaling run, comma-separated; `none` skips it.
    #[arg(long, default_value = "1,2,4,8")]
    ranks: String,
    /// Bytes each rank saves in the scaling run.
    #[arg(long, default_value = "64MiB", value_parser = units::parse_size)]
    shard: u64,
    /// Run the scaling part against S3 at `http(s)://HOST:PORT/BUCKET` (e.g. a loopback moto
    /// server) instead of a file:// store under --dir.
    #[arg(long, value_name = "URL")]
    scaling_s3: Option<String>,
    /// Measure nothing: redraw OUT/results.md, the plots and the goodput model (with these fault
    /// flags) from an earlier results.json.
    #[arg(long, value_name = "RESULTS_JSON")]
    from_json: Option<PathBuf>,
    /// Also run the recovery drill (python-bindings/tests/drill.py: a torch.distributed job under
    /// two ckptd agents recovers from an XID, a hung worker and a local fault; about 2 minutes),
    /// print its timeline and charge its measured restart time to every failure in the goodput
    /// model. Needs `ckptd` and `ckptctl` (server feature) in $CKPTD_BIN_DIR, else next to this
    /// binary, else in target/debug.
    #[arg(long)]
    drill: bool,
    /// Goodput: interruptions observed on the reference fleet (default: Llama 3, 419 in 54 days on 16,384 GPUs).
    #[arg(long, default_value_t = goodput::FaultRate::LLAMA3.interruptions)]
    fault_interruptions: f64,
    /// Goodput: over this many days.
    #[arg(long, default_value_t = goodput::FaultRate::LLAMA3.days)]
    fault_days: f64,
    /// Goodput: on this many GPUs.
    #[arg(long, default_value_t = goodput::FaultRate::LLAMA3.fleet_gpus)]
    fault_fleet_gpus: f64,
    /// Goodput: GPUs in the modelled job (the job fails when any does).
    #[arg(long, default_value_t = goodput::FaultRate::LLAMA3.job_gpus)]
    job_gpus: f64,
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
        Command::Compare(a) => {
            let a = *a;
            let ranks: Result<Vec<usize>, _> = if a.ranks == "none" {
                Ok(Vec::new())
            } else {
                a.ranks
                    .split(',')
                    .map(|r| r.trim().parse::<usize>().ok().filter(|&n| (1..=64).contains(&n)).ok_or(r))
                    .collect()
            };
            let ranks = match ranks {
                Ok(r) => r,
                Err(bad) => return fail(EXIT_CONFIG, &format!("--ranks: `{bad}` is not a world size from 1 to 64")),
            };
            let fault = goodput::FaultRate {
                interruptions: a.fault_interruptions,
                days: a.fault_days,
                fleet_gpus: a.fault_fleet_gpus,
                job_gpus: a.job_gpus,
            };
            if [fault.interruptions, fault.days, fault.fleet_gpus, fault.job_gpus]
                .iter()
                .any(|v| !(v.is_finite() && *v > 0.0))
            {
                return fail(EXIT_CONFIG, "the --fault-* and --job-gpus values must be positive numbers");
            }
            let python = a
                .python
                .or_else(|| std::env::var_os("CKPTD_BENCH_PYTHON").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from("python3"));
            if let Err(e) = std::fs::create_dir_all(&a.out) {
                return fail(EXIT_CONFIG, &format!("cannot create --out {}: {e}", a.out.display()));
            }
            let dir = a.dir.unwrap_or_else(|| a.out.clone());
            let cfg = compare::Config {
                sizes: a.sizes,
                reps: a.reps,
                out: a.out,
                dir,
                python,
                device: a.device,
                systems: a.systems,
                ranks,
                shard: a.shard,
                scaling_s3: a.scaling_s3,
                fault,
                install_peers: a.install_peers,
                drill: a.drill,
            };
            let stdout = std::io::stdout();
            let done = match &a.from_json {
                Some(from) => compare::redraw(&cfg, from, &mut stdout.lock()),
                None => compare::run(&cfg, &mut stdout.lock()),
            };
            match done {
                Ok(()) => ExitCode::SUCCESS,
                Err(engine::Failure::Config(reason)) => fail(EXIT_CONFIG, &reason),
                Err(engine::Failure::Run(e)) => fail(1, &format!("{e:#}")),
            }
        }
        Command::ClientChild(a) => match client::child(&a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(1, &format!("{e:#}")),
        },
        Command::StepStallChild(a) => match client::stall::child(&a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(1, &format!("{e:#}")),
        },
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
