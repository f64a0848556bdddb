//! `ckptctl ls`: every step of a job, committed or not, and which one a restore would use.

use std::io::Write;

use anyhow::Context as _;
use ckpt_core::{StepInfo, StepState};
use indicatif::HumanBytes;
use serde::Serialize;

use super::{Ctx, LsArgs, rfc3339};

/// The JSON document `ls --json` prints.
#[derive(Debug, Serialize)]
struct Listing<'a> {
    store: &'a str,
    job: &'a str,
    /// The step `Engine::latest` returns: the newest committed step that validates.
    latest: Option<u64>,
    steps: Vec<StepRow>,
}

#[derive(Debug, Serialize)]
struct StepRow {
    step: u64,
    state: StepState,
    shards: usize,
    shard_ranks: Vec<u32>,
    bytes: u64,
    objects: usize,
    modified: String,
    modified_unix_ms: i64,
    latest: bool,
}

impl StepRow {
    fn new(s: &StepInfo, latest: Option<u64>) -> StepRow {
        StepRow {
            step: s.step,
            state: s.state,
            shards: s.shard_ranks.len(),
            shard_ranks: s.shard_ranks.clone(),
            bytes: s.bytes(),
            objects: s.objects.len(),
            modified: rfc3339(s.newest_modified_unix_ms()),
            modified_unix_ms: s.newest_modified_unix_ms(),
            latest: latest == Some(s.step),
        }
    }
}

pub(super) fn run(ctx: &mut Ctx<'_>, args: &LsArgs) -> anyhow::Result<()> {
    let steps = ctx.engine.steps(&ctx.job)?;
    let latest = ctx.engine.latest(&ctx.job)?.map(|m| m.step);
    let rows: Vec<StepRow> = steps.iter().map(|s| StepRow::new(s, latest)).collect();
    if args.json {
        let url = ctx.engine.store().url().to_string();
        let job = ctx.job.clone();
        return ctx.json(&Listing { store: &url, job: &job, latest, steps: rows });
    }
    write_table(ctx.out, &rows).context("cannot write output")?;
    match (rows.is_empty(), latest) {
        (true, _) => writeln!(ctx.out, "job `{}` has no steps on {}", ctx.job, ctx.engine.store().url()),
        (false, None) => writeln!(ctx.out, "no committed step validates: a restore would start from scratch"),
        (false, Some(_)) => Ok(()),
    }
    .context("cannot write output")
}

fn write_table(out: &mut dyn Write, rows: &[StepRow]) -> std::io::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(out, "{:>12}  {:<11}  {:>6}  {:>11}  MODIFIED", "STEP", "STATE", "SHARDS", "BYTES")?;
    for r in rows {
        let state = match r.state {
            StepState::Committed => "committed",
            StepState::Uncommitted => "uncommitted",
        };
        let mark = if r.latest { "  <- latest" } else { "" };
        writeln!(
            out,
            "{:>12}  {:<11}  {:>6}  {:>11}  {}{mark}",
            r.step,
            state,
            r.shards,
            HumanBytes(r.bytes).to_string(),
            r.modified
        )?;
    }
    Ok(())
}
