//! `ckptctl inspect`: a committed step's manifest and its shards' tensor tables, read from the
//! shard headers without reading any tensor data.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::Context as _;
use ckpt_core::codec::CODEC_ZSTD;
use ckpt_core::{Manifest, ShardEntry, ShardHeader};
use indicatif::HumanBytes;
use serde::Serialize;

use super::{Ctx, InspectArgs, progress, rfc3339, step_or_latest};

/// The JSON document `inspect --json` prints.
#[derive(Debug, Serialize)]
struct Inspection<'a> {
    store: &'a str,
    job: &'a str,
    step: u64,
    /// Whether the step was chosen as the newest sound one (no `--step`).
    latest: bool,
    created: String,
    created_unix_ms: u64,
    world_size: u32,
    total_bytes: u64,
    metadata: &'a BTreeMap<String, String>,
    shards: &'a [ShardEntry],
    ranks: Vec<RankView>,
}

#[derive(Debug, Serialize)]
struct RankView {
    rank: u32,
    region_len: u64,
    chunk_size: u32,
    chunks: usize,
    compressed_chunks: usize,
    user_metadata_len: usize,
    tensors: Vec<TensorView>,
}

#[derive(Debug, Serialize)]
struct TensorView {
    name: String,
    dtype: &'static str,
    shape: Vec<u64>,
    bytes: u64,
    offset: u64,
}

impl RankView {
    fn new(h: &ShardHeader) -> RankView {
        let index = &h.index;
        RankView {
            rank: index.rank,
            region_len: index.table.total_len(),
            chunk_size: index.chunk_size,
            chunks: index.chunks.len(),
            compressed_chunks: index.chunks.iter().filter(|c| c.codec == CODEC_ZSTD).count(),
            user_metadata_len: index.metadata.len(),
            tensors: index
                .table
                .entries()
                .iter()
                .map(|e| TensorView {
                    name: e.meta.name.clone(),
                    dtype: e.meta.dtype.name(),
                    shape: e.meta.shape.clone(),
                    bytes: e.len,
                    offset: e.offset,
                })
                .collect(),
        }
    }
}

pub(super) fn run(ctx: &mut Ctx<'_>, args: &InspectArgs) -> anyhow::Result<()> {
    let (step, latest) = step_or_latest(ctx, args.step)?;
    let m = ctx.engine.manifest(&ctx.job, step)?;
    let ranks: Vec<u32> = match args.rank {
        Some(r) if r >= m.world_size => {
            anyhow::bail!(
                "rank {r} does not exist: step {step} has world size {} (ranks 0..{})",
                m.world_size,
                m.world_size
            )
        }
        Some(r) => vec![r],
        None => m.shards.iter().map(|s| s.rank).collect(),
    };
    let bar = progress::bar(ctx.progress, ranks.len() as u64, "reading");
    let mut views = Vec::with_capacity(ranks.len());
    for r in ranks {
        let h = ctx.engine.shard_header(&ctx.job, step, r)?;
        views.push(RankView::new(&h));
        bar.inc(1);
    }
    bar.finish_and_clear();
    if args.json {
        let url = ctx.url().to_string();
        let job = ctx.job.clone();
        return ctx.json(&Inspection {
            store: &url,
            job: &job,
            step,
            latest,
            created: rfc3339(i64::try_from(m.created_unix_ms).unwrap_or(i64::MAX)),
            created_unix_ms: m.created_unix_ms,
            world_size: m.world_size,
            total_bytes: m.total_size(),
            metadata: &m.metadata,
            shards: &m.shards,
            ranks: views,
        });
    }
    let url = ctx.url().to_string();
    write_text(ctx.out, &url, &m, latest, &views).context("cannot write output")
}

fn write_text(out: &mut dyn Write, url: &str, m: &Manifest, latest: bool, ranks: &[RankView]) -> std::io::Result<()> {
    let mark = if latest { " (latest)" } else { "" };
    writeln!(out, "job {} step {}{mark} on {url}", m.job, m.step)?;
    writeln!(out, "committed   {}", rfc3339(i64::try_from(m.created_unix_ms).unwrap_or(i64::MAX)))?;
    writeln!(out, "world size  {}", m.world_size)?;
    writeln!(out, "total       {} ({} bytes)", HumanBytes(m.total_size()), m.total_size())?;
    if m.metadata.is_empty() {
        writeln!(out, "metadata    (none)")?;
    } else {
        writeln!(out, "metadata")?;
        for (k, v) in &m.metadata {
            writeln!(out, "  {k} = {v}")?;
        }
    }
    writeln!(out)?;
    writeln!(out, "{:>6}  {:<16}  {:>14}  {:>10}  {:>14}", "RANK", "OBJECT", "SIZE", "CRC32C", "REGION")?;
    for s in &m.shards {
        writeln!(
            out,
            "{:>6}  {:<16}  {:>14}  {:>10}  {:>14}",
            s.rank,
            s.object,
            s.size,
            format!("{:08x}", s.index_crc32c),
            s.region_len
        )?;
    }
    for r in ranks {
        writeln!(out)?;
        writeln!(
            out,
            "rank {}: {} tensors, region {} bytes, {} chunks of {} ({} compressed), user metadata {} bytes",
            r.rank,
            r.tensors.len(),
            r.region_len,
            r.chunks,
            HumanBytes(u64::from(r.chunk_size)),
            r.compressed_chunks,
            r.user_metadata_len
        )?;
        let width = r.tensors.iter().map(|t| t.name.len()).max().unwrap_or(4).max(4);
        writeln!(out, "  {:<width$}  {:<13}  {:<20}  {:>14}  {:>14}", "NAME", "DTYPE", "SHAPE", "BYTES", "OFFSET")?;
        for t in &r.tensors {
            writeln!(
                out,
                "  {:<width$}  {:<13}  {:<20}  {:>14}  {:>14}",
                t.name,
                t.dtype,
                format!("{:?}", t.shape),
                t.bytes,
                t.offset
            )?;
        }
    }
    Ok(())
}
