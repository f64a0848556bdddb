//! `ckptctl ls`: every step of a job, committed or not, and which one a restore would use.

use std::io::Write;

use anyhow::Context as _;
use ckpt_core::{ErrorKind, StepInfo, StepState};
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

/// What `ls` says about a step: the catalog's state, except that a committed step whose MANIFEST
/// cannot be read or decoded is `damaged`, because no restore can use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum RowState {
    Committed,
    Uncommitted,
    Damaged,
}

#[derive(Debug, Serialize)]
struct StepRow {
    step: u64,
    state: RowState,
    /// Why a step is damaged.
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<String>,
    shards: usize,
    shard_ranks: Vec<u32>,
    bytes: u64,
    objects: usize,
    modified: String,
    modified_unix_ms: i64,
    latest: bool,
}

impl StepRow {
    fn new(s: &StepInfo, latest: Option<u64>, problem: Option<String>) -> StepRow {
        let state = match (s.state, &problem) {
            (StepState::Uncommitted, _) => RowState::Uncommitted,
            (StepState::Committed, None) => RowState::Committed,
            (StepState::Committed, Some(_)) => RowState::Damaged,
        };
        StepRow {
            step: s.step,
            state,
            problem,
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
    let mut rows = Vec::with_capacity(steps.len());
    for s in &steps {
        let problem = match s.state {
            StepState::Committed if latest != Some(s.step) => manifest_problem(ctx, s.step)?,
            _ => None,
        };
        rows.push(StepRow::new(s, latest, problem));
    }
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

/// Why the MANIFEST of a committed step cannot be used (damaged, unreadable, an unsupported
/// version), or `None` when it reads. A failure that may pass (a store outage, a timeout) is the
/// command's error, so a sound step is never listed as damaged because of a network blip.
fn manifest_problem(ctx: &Ctx<'_>, step: u64) -> anyhow::Result<Option<String>> {
    match ctx.engine.manifest(&ctx.job, step) {
        Ok(_) => Ok(None),
        Err(e) if matches!(e.kind(), ErrorKind::Transient | ErrorKind::Timeout | ErrorKind::Cancelled) => Err(e.into()),
        Err(e) => Ok(Some(e.to_string())),
    }
}

fn write_table(out: &mut dyn Write, rows: &[StepRow]) -> std::io::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(out, "{:>12}  {:<11}  {:>6}  {:>11}  MODIFIED", "STEP", "STATE", "SHARDS", "BYTES")?;
    for r in rows {
        let state = match r.state {
            RowState::Committed => "committed",
            RowState::Uncommitted => "uncommitted",
            RowState::Damaged => "damaged",
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
    for r in rows {
        if let Some(problem) = &r.problem {
            writeln!(out, "step {} is damaged: {problem}", r.step)?;
        }
    }
    Ok(())
}
