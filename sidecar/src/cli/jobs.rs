//! `ckptctl jobs [--json]`: the isolator's view of every job (state, generation, newest global
//! step, declared parallel layout, isolated nodes, stragglers), through `IsolatorAdmin.ListJobs`.

use std::io::Write;

use anyhow::Context as _;
use serde::Serialize;

use super::release::{IsolatorTarget, block_on};

/// `ckptctl jobs`.
#[derive(Debug, Clone, clap::Args)]
pub struct JobsArgs {
    #[command(flatten)]
    pub isolator: IsolatorTarget,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Row {
    job: String,
    state: String,
    generation: u64,
    latest_global_step: Option<u64>,
    world_size: u32,
    registered: u32,
    /// `dp=8,tp=4,pp=2`, as the job declared it (`ckptd.io/parallel`).
    parallel: Option<String>,
    isolated_nodes: Vec<String>,
    stragglers: Vec<u32>,
}

/// Runs `ckptctl jobs`.
pub fn run(args: &JobsArgs, out: &mut dyn Write) -> anyhow::Result<u8> {
    let jobs = block_on(async {
        let link = args.isolator.connect().await?;
        Ok(link.list_jobs().await?)
    })?;
    let rows: Vec<Row> = jobs
        .into_iter()
        .map(|j| Row {
            latest_global_step: j.has_committed.then_some(j.committed_step),
            job: j.job,
            state: j.state,
            generation: j.generation,
            world_size: j.world_size,
            registered: j.registered,
            parallel: j.parallel.as_ref().and_then(|p| crate::layout::Layout::try_from(p).ok()).map(|l| l.to_string()),
            isolated_nodes: j.isolated_nodes,
            stragglers: j.stragglers,
        })
        .collect();
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &rows).context("cannot write output")?;
        writeln!(out).context("cannot write output")?;
        return Ok(super::EXIT_OK);
    }
    writeln!(
        out,
        "{:<24} {:<11} {:>4} {:>10} {:>7} {:<18} {:<20} STRAGGLERS",
        "JOB", "STATE", "GEN", "GLOBAL", "RANKS", "PARALLEL", "ISOLATED"
    )?;
    for r in &rows {
        let step = r.latest_global_step.map_or("-".to_string(), |s| s.to_string());
        let isolated = if r.isolated_nodes.is_empty() { "-".to_string() } else { r.isolated_nodes.join(",") };
        let strag = if r.stragglers.is_empty() {
            "-".to_string()
        } else {
            r.stragglers.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
        };
        writeln!(
            out,
            "{:<24} {:<11} {:>4} {:>10} {:>7} {:<18} {:<20} {strag}",
            r.job,
            r.state,
            r.generation,
            step,
            format!("{}/{}", r.registered, r.world_size),
            r.parallel.as_deref().unwrap_or("-"),
            isolated
        )?;
    }
    Ok(super::EXIT_OK)
}
