//! `ckptctl verify`: reads every byte of committed steps and reports every problem, so that an
//! operator learns about a damaged checkpoint before a restore needs it.

use std::io::Write;

use anyhow::Context as _;
use ckpt_core::{ErrorKind, StepState, VerifyReport};
use serde::Serialize;

use super::{Ctx, EXIT_CORRUPT, EXIT_FAILURE, EXIT_OK, VerifyArgs, progress};

/// The JSON document `verify --json` prints.
#[derive(Debug, Serialize)]
struct Verification<'a> {
    store: &'a str,
    job: &'a str,
    /// Whether every verified step is sound and no step failed to verify.
    ok: bool,
    steps: Vec<StepVerdict>,
    /// Steps that could not be verified at all (vanished, store errors).
    errors: Vec<StepError>,
}

#[derive(Debug, Serialize)]
struct StepVerdict {
    ok: bool,
    /// The step is not damaged but written in a format version this build does not read.
    unsupported: bool,
    #[serde(flatten)]
    report: VerifyReport,
}

#[derive(Debug, Serialize)]
struct StepError {
    step: u64,
    error: String,
}

pub(super) fn run(ctx: &mut Ctx<'_>, args: &VerifyArgs) -> anyhow::Result<u8> {
    let steps: Vec<u64> = match args.step {
        Some(s) => vec![s],
        None => {
            let committed: Vec<u64> = ctx
                .engine
                .steps(&ctx.job)?
                .into_iter()
                .filter(|s| s.state == StepState::Committed)
                .map(|s| s.step)
                .collect();
            if args.all {
                committed
            } else {
                // The newest commit, even when `latest` would skip it as damaged: that is the
                // step an operator most needs to hear about.
                match committed.last() {
                    Some(&s) => vec![s],
                    None => anyhow::bail!("job `{}` has no committed step on {}", ctx.job, ctx.url()),
                }
            }
        }
    };
    let bar = progress::bar(ctx.progress, steps.len() as u64, "verifying");
    let mut verdicts = Vec::with_capacity(steps.len());
    let mut errors = Vec::new();
    for &step in &steps {
        bar.set_message(format!("step {step}"));
        match ctx.engine.verify(&ctx.job, step) {
            Ok(report) => {
                let unsupported = !report.ok() && unsupported(ctx, &report);
                verdicts.push(StepVerdict { ok: report.ok(), unsupported, report });
            }
            // One step is what the operator asked about: its failure is the command's.
            Err(e) if !args.all => return Err(e.into()),
            Err(e) => errors.push(StepError { step, error: e.to_string() }),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let corrupt = verdicts.iter().filter(|v| !v.ok && !v.unsupported).count();
    let unsupported = verdicts.iter().filter(|v| v.unsupported).count();
    let code = if corrupt > 0 {
        EXIT_CORRUPT
    } else if unsupported > 0 || !errors.is_empty() {
        EXIT_FAILURE
    } else {
        EXIT_OK
    };
    if args.json {
        let url = ctx.url().to_string();
        let job = ctx.job.clone();
        ctx.json(&Verification { store: &url, job: &job, ok: code == EXIT_OK, steps: verdicts, errors })?;
        return Ok(code);
    }
    write_text(ctx.out, &verdicts, &errors, corrupt).context("cannot write output")?;
    Ok(code)
}

/// Whether every problem of a failed step is a format version this build does not read, rather
/// than damage: the MANIFEST's version when it is the problem, else each failing shard's header.
fn unsupported(ctx: &Ctx<'_>, r: &VerifyReport) -> bool {
    let is_unsupported = |e: ckpt_core::Error| e.kind() == ErrorKind::Unsupported;
    if !r.manifest_ok {
        return ctx.engine.manifest(&ctx.job, r.step).is_err_and(is_unsupported);
    }
    let mut failed = r.shards.iter().filter(|s| s.error.is_some()).peekable();
    failed.peek().is_some()
        && failed.all(|s| ctx.engine.shard_header(&ctx.job, r.step, s.rank).is_err_and(is_unsupported))
}

fn write_text(
    out: &mut dyn Write,
    verdicts: &[StepVerdict],
    errors: &[StepError],
    corrupt: usize,
) -> std::io::Result<()> {
    let unsupported = verdicts.iter().filter(|v| v.unsupported).count();
    for v in verdicts {
        let r = &v.report;
        if v.ok {
            writeln!(out, "step {}: ok ({} shards)", r.step, r.shards.len())?;
            continue;
        }
        if v.unsupported {
            writeln!(out, "step {}: UNSUPPORTED (written by a newer ckptd: upgrade ckptctl to verify it)", r.step)?;
        } else {
            writeln!(out, "step {}: CORRUPT", r.step)?;
        }
        if !r.manifest_ok {
            for p in &r.problems {
                writeln!(out, "  manifest: {p}")?;
            }
        }
        for s in &r.shards {
            if let Some(e) = &s.error {
                writeln!(out, "  rank {}: {e}", s.rank)?;
            }
        }
    }
    for e in errors {
        writeln!(out, "step {}: not verified: {}", e.step, e.error)?;
    }
    let total = verdicts.len() + errors.len();
    match (corrupt, unsupported, errors.len()) {
        (0, 0, 0) if total == 0 => writeln!(out, "no committed steps to verify"),
        (0, 0, 0) => writeln!(out, "{total} step(s) verified, all sound"),
        (c, u, e) => writeln!(out, "{total} step(s) checked: {c} corrupt, {u} unsupported, {e} not verified"),
    }
}
