//! `ckptctl gc`: applies retention by hand (the sidecar applies the same policy after each
//! commit), with a dry run to see what it would remove.

use std::io::Write;

use anyhow::Context as _;
use ckpt_core::{GcReport, RetentionPolicy};
use indicatif::HumanBytes;

use super::{Ctx, GcArgs, progress};

pub(super) fn run(ctx: &mut Ctx<'_>, args: &GcArgs) -> anyhow::Result<()> {
    let policy = RetentionPolicy { keep: args.keep, dry_run: args.dry_run, ..RetentionPolicy::default() };
    let spinner =
        progress::spinner(ctx.progress, if args.dry_run { "planning retention" } else { "applying retention" });
    let report = ctx.engine.gc(&ctx.job, &policy);
    spinner.finish_and_clear();
    let report = report?;
    if args.json {
        return ctx.json(&report);
    }
    write_text(ctx.out, &report).context("cannot write output")
}

fn list(steps: &[u64]) -> String {
    if steps.is_empty() {
        return "none".to_string();
    }
    steps.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}

fn write_text(out: &mut dyn Write, r: &GcReport) -> std::io::Result<()> {
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    writeln!(out, "kept committed steps: {}", list(&r.kept))?;
    writeln!(out, "{verb} committed steps: {}", list(&r.deleted_committed))?;
    writeln!(out, "{verb} uncommitted steps: {}", list(&r.deleted_debris))?;
    writeln!(
        out,
        "{verb} {} objects, {} ({} bytes); {} multipart uploads aborted",
        r.deleted_objects,
        HumanBytes(r.freed_bytes),
        r.freed_bytes,
        r.aborted_uploads
    )?;
    if r.dry_run {
        writeln!(out, "dry run: nothing was deleted")?;
    }
    Ok(())
}
