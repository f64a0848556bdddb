//! `ckptctl faults --job NAME [--json]`: a job's fault records, through
//! `IsolatorAdmin.ListFaults`. The isolator reads them from the cluster, so they outlive a leader
//! change.

use std::io::Write;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context as _;

use super::release::{IsolatorTarget, block_on};
use crate::isolator::faults::FaultRecord;

/// `ckptctl faults`.
#[derive(Debug, Clone, clap::Args)]
pub struct FaultsArgs {
    #[command(flatten)]
    pub isolator: IsolatorTarget,
    /// The job.
    #[arg(long)]
    pub job: String,
    /// Print the records as a JSON array (the isolator's record format) instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn at(ms: Option<u64>) -> String {
    ms.map_or("-".to_string(), |ms| {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
    })
}

/// Runs `ckptctl faults`.
pub fn run(args: &FaultsArgs, out: &mut dyn Write) -> anyhow::Result<u8> {
    let records = block_on(async {
        let link = args.isolator.connect().await?;
        Ok(link.list_faults(&args.job).await?)
    })?;
    let records: Vec<FaultRecord> = records.iter().map(FaultRecord::from).collect();
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &records).context("cannot write output")?;
        writeln!(out).context("cannot write output")?;
        return Ok(super::EXIT_OK);
    }
    if records.is_empty() {
        writeln!(out, "no fault recorded for job {}", args.job)?;
        return Ok(super::EXIT_OK);
    }
    writeln!(
        out,
        "{:<20} {:<16} {:<14} {:<15} {:<12} {:<20} {:<20} {:<20} {:<20} {:<20} {:<20} NOTE",
        "DETECTED",
        "NODE",
        "KIND",
        "PHASE",
        "DECISION",
        "ISOLATED",
        "RESTARTED",
        "RESUMED",
        "OWNER",
        "REPAIR",
        "REPAIRED"
    )?;
    for r in &records {
        writeln!(
            out,
            "{:<20} {:<16} {:<14} {:<15} {:<12} {:<20} {:<20} {:<20} {:<20} {:<20} {:<20} {}",
            at(r.detected_at),
            r.node,
            r.kind,
            if r.fault_phase.is_empty() { "-" } else { &r.fault_phase },
            r.decision.as_str(),
            at(r.isolated_at),
            at(r.restart_at),
            at(r.resumed_at),
            if r.owner.is_empty() { "-" } else { &r.owner },
            r.repair.as_ref().map_or("-".to_string(), |r| r.summary()),
            at(r.repaired_at),
            r.note
        )?;
    }
    Ok(super::EXIT_OK)
}
