//! `ckptctl export`: one rank's tensors as a safetensors file, so that weights leave ckptd for any
//! tool that reads the Hugging Face format.
//!
//! The writer is pure: [`SafetensorsLayout::plan`] turns a shard's tensor table into the file's
//! header and the order in which region bytes follow it, and [`SafetensorsLayout::writer`]
//! streams a region through that plan into any writer, chunk by chunk as the engine verifies
//! them, so memory stays bounded whatever region length a shard claims. Only
//! [`write_safetensors_file`] touches the file system, through `ckpt_core::durable`.
//!
//! The file is the safetensors format: an 8-byte little-endian header length N, N bytes of JSON
//! (padded with spaces to a multiple of 8 so that the data is 8-byte aligned), then every tensor's
//! bytes back to back. The region's alignment padding is dropped; each tensor's `data_offsets` are
//! relative to the first data byte.

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::Range;
use std::path::Path;

use anyhow::Context as _;
use ckpt_core::TensorTable;
use indicatif::HumanBytes;
use serde_json::{Value, json};

use ckpt_core::slots;

use super::{Ctx, ExportArgs, ExportFormat, progress};

/// Largest JSON header the reference safetensors reader accepts (its `MAX_HEADER_SIZE`); a larger
/// one would make a file nobody can open, so planning refuses it.
pub const MAX_HEADER_LEN: usize = 100_000_000;

/// The key safetensors reserves for string metadata; no tensor may be named so.
const METADATA_KEY: &str = "__metadata__";

/// Bytes handed to the writer at once, so that progress advances on large tensors.
const WRITE_SLICE: usize = 8 << 20;

/// The safetensors rendering of one tensor table: the header, and which region bytes follow it in
/// which order.
#[derive(Debug, Clone)]
pub struct SafetensorsLayout {
    /// The 8-byte length prefix and the padded JSON header.
    header: Vec<u8>,
    /// Region ranges of the exported tensors, in file order.
    ranges: Vec<Range<u64>>,
    /// Length the region must have (the table's `total_len`).
    region_len: u64,
    /// Bytes of tensor data after the header.
    data_len: u64,
    /// Tensors left out because safetensors has no dtype for them, as `name (dtype)`.
    skipped: Vec<String>,
}

impl SafetensorsLayout {
    /// Plans the file for `table`, with `metadata` as the header's `__metadata__` (omitted when
    /// empty). A tensor whose dtype safetensors cannot represent (complex128) is an error naming
    /// it, unless `skip_unsupported` leaves such tensors out.
    pub fn plan(
        table: &TensorTable,
        metadata: &BTreeMap<String, String>,
        skip_unsupported: bool,
    ) -> anyhow::Result<SafetensorsLayout> {
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            header.insert(METADATA_KEY.to_string(), json!(metadata));
        }
        let mut ranges = Vec::with_capacity(table.len());
        let mut unsupported = Vec::new();
        let mut offset = 0u64;
        for e in table.entries() {
            let Some(dtype) = e.meta.dtype.safetensors_name() else {
                unsupported.push(format!("`{}` ({})", e.meta.name, e.meta.dtype));
                continue;
            };
            if e.meta.name == METADATA_KEY {
                anyhow::bail!(
                    "tensor `{METADATA_KEY}` cannot be exported: safetensors reserves that name for metadata"
                );
            }
            let end =
                offset.checked_add(e.len).with_context(|| format!("tensor `{}` ends past 2^64 bytes", e.meta.name))?;
            header.insert(
                e.meta.name.clone(),
                json!({ "dtype": dtype, "shape": e.meta.shape, "data_offsets": [offset, end] }),
            );
            ranges.push(e.offset..e.offset + e.len);
            offset = end;
        }
        if !unsupported.is_empty() && !skip_unsupported {
            anyhow::bail!(
                "safetensors has no dtype for {}: pass --skip-unsupported to export the other tensors without them",
                name_list(&unsupported)
            );
        }
        let mut json = serde_json::to_vec(&Value::Object(header)).context("cannot encode the safetensors header")?;
        json.resize(json.len().next_multiple_of(8), b' ');
        if json.len() > MAX_HEADER_LEN {
            anyhow::bail!(
                "the safetensors header would be {} bytes, over the {MAX_HEADER_LEN}-byte limit readers accept: \
                 the shard has too many tensors for one safetensors file",
                json.len()
            );
        }
        let mut bytes = Vec::with_capacity(8 + json.len());
        bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&json);
        Ok(SafetensorsLayout {
            header: bytes,
            ranges,
            region_len: table.total_len(),
            data_len: offset,
            skipped: unsupported,
        })
    }

    /// Size of the whole file in bytes.
    pub fn file_len(&self) -> u64 {
        self.header.len() as u64 + self.data_len
    }

    /// Number of tensors the file holds.
    pub fn tensors(&self) -> usize {
        self.ranges.len()
    }

    /// Tensors left out by `skip_unsupported`, as `` `name` (dtype) ``.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// Writes the file from a whole region in memory: the header, then each tensor's bytes from
    /// `region` (the restored region the table describes). `progress` is told how many bytes each
    /// write added.
    pub fn write_to(&self, region: &[u8], out: &mut dyn Write, progress: &dyn Fn(u64)) -> anyhow::Result<()> {
        let mut w = self.writer(out, progress)?;
        w.chunk(0, region)?;
        w.finish()
    }

    /// Starts the file: writes the header and returns the writer that takes the region chunk by
    /// chunk, so that a region larger than memory streams through.
    pub fn writer<'a>(&'a self, out: &'a mut dyn Write, progress: &'a dyn Fn(u64)) -> anyhow::Result<RegionWriter<'a>> {
        out.write_all(&self.header).context("cannot write the safetensors header")?;
        progress(self.header.len() as u64);
        Ok(RegionWriter { layout: self, out, progress, next_range: 0, region_at: 0, written: 0 })
    }
}

/// Writes the tensor bytes of a safetensors file from region chunks that arrive in region order.
/// Tensor ranges are sorted and disjoint (the tensor table guarantees it), so each chunk's bytes
/// go out as they arrive and nothing is buffered.
pub struct RegionWriter<'a> {
    layout: &'a SafetensorsLayout,
    out: &'a mut dyn Write,
    progress: &'a dyn Fn(u64),
    /// The first range not yet written in full.
    next_range: usize,
    /// Region offset the next chunk must start at.
    region_at: u64,
    /// Tensor bytes written so far.
    written: u64,
}

impl std::fmt::Debug for RegionWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionWriter").field("region_at", &self.region_at).field("written", &self.written).finish()
    }
}

impl RegionWriter<'_> {
    /// Takes the region bytes at `offset..offset + bytes.len()`, which must follow the previous
    /// chunk, and writes the parts that belong to exported tensors.
    pub fn chunk(&mut self, offset: u64, bytes: &[u8]) -> anyhow::Result<()> {
        let end = offset.checked_add(bytes.len() as u64).context("region chunk ends past 2^64 bytes")?;
        if offset != self.region_at || end > self.layout.region_len {
            anyhow::bail!(
                "region bytes {offset}..{end} do not follow byte {} of the {}-byte region the tensor table describes",
                self.region_at,
                self.layout.region_len
            );
        }
        while let Some(r) = self.layout.ranges.get(self.next_range) {
            if r.start >= end && r.start != r.end {
                break;
            }
            let (from, to) = (r.start.max(offset), r.end.min(end));
            if from < to {
                let slice = &bytes[(from - offset) as usize..(to - offset) as usize];
                for part in slice.chunks(WRITE_SLICE) {
                    self.out.write_all(part).context("cannot write tensor data")?;
                    (self.progress)(part.len() as u64);
                }
                self.written += to - from;
            }
            if r.end > end {
                break;
            }
            self.next_range += 1;
        }
        self.region_at = end;
        Ok(())
    }

    /// Checks that the whole region arrived.
    pub fn finish(self) -> anyhow::Result<()> {
        if self.region_at != self.layout.region_len || self.written != self.layout.data_len {
            anyhow::bail!("region is {} bytes, the tensor table describes {}", self.region_at, self.layout.region_len);
        }
        Ok(())
    }
}

/// Names at most five entries of `names`, then how many more there are.
fn name_list(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s = names.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

/// Writes the file durably: into a temporary file next to `path`, fsynced, renamed over `path`,
/// and the directory fsynced, so a crash leaves either the old file or the complete new one. `feed`
/// hands the region to the writer chunk by chunk; when it fails, the temporary file is removed and
/// `path` is left as it was.
pub fn write_safetensors_file(
    path: &Path,
    layout: &SafetensorsLayout,
    progress: &dyn Fn(u64),
    feed: &mut dyn FnMut(&mut RegionWriter<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    // The durable helpers fsync the parent directory, which a bare file name lacks.
    let path = std::path::absolute(path).with_context(|| format!("cannot resolve `{}`", path.display()))?;
    anyhow::ensure!(path.parent().is_some_and(Path::is_dir), "the directory of `{}` does not exist", path.display());
    let (file, tmp) = ckpt_core::durable::create_tmp(&path)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let written = layout
        .writer(&mut w, progress)
        .and_then(|mut region| {
            feed(&mut region)?;
            region.finish()
        })
        .and_then(|()| w.into_inner().map_err(|e| anyhow::Error::new(e.into_error())));
    let file = match written {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.context(format!("cannot write `{}`", tmp.display())));
        }
    };
    ckpt_core::durable::publish_replace(file, &tmp, &path)?;
    Ok(())
}

pub(super) fn run(ctx: &mut Ctx<'_>, args: &ExportArgs) -> anyhow::Result<()> {
    // The only format today; a new one gets its own writer here.
    let ExportFormat::Safetensors = args.format;
    // Without --step, the newest committed step whose data verifies: a step whose chunks fail
    // their checksums (or of a newer format) is passed over with a warning, as a restore would.
    // Other failures (the output file, a store outage) are errors.
    let damaged = |e: &anyhow::Error| {
        e.chain()
            .filter_map(|c| c.downcast_ref::<ckpt_core::Error>())
            .any(|c| matches!(c.kind(), ckpt_core::ErrorKind::Corrupt | ckpt_core::ErrorKind::Unsupported))
    };
    let exported = {
        let ctx = &*ctx;
        slots::newest_sound(&ctx.engine, &ctx.job, args.step, false, damaged, |step| export_step(ctx, args, step))?
    };
    let Some(exported) = exported else {
        anyhow::bail!(
            "job `{}` has no committed step on {}: run `ckptctl ls` to see what is there",
            ctx.job,
            ctx.url()
        );
    };
    for (step, why) in &exported.skipped {
        writeln!(ctx.out, "skipped step {step}: {why}").context("cannot write output")?;
    }
    write_summary(ctx.out, &args.out, exported.step, args.rank, &exported.value).context("cannot write output")
}

/// Exports `step` of the rank into the output file; returns the file's layout.
fn export_step(ctx: &Ctx<'_>, args: &ExportArgs, step: u64) -> anyhow::Result<SafetensorsLayout> {
    let rank = args.rank;
    let header = ctx.engine.shard_header(&ctx.job, step, rank)?;
    let metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("ckptd.job".to_string(), ctx.job.clone()),
        ("ckptd.step".to_string(), step.to_string()),
        ("ckptd.rank".to_string(), rank.to_string()),
        ("ckptd.world_size".to_string(), header.index.world_size.to_string()),
    ]);
    // Planning first: an unsupported dtype fails before any data is read.
    let layout = SafetensorsLayout::plan(&header.index.table, &metadata, args.skip_unsupported)?;
    // The region streams from the store into the file one verified chunk at a time: a shard
    // whose index claims more bytes than memory holds costs one chunk of memory, not the region.
    let bar = progress::bytes(ctx.progress, layout.file_len(), &format!("exporting step {step} rank {rank}"));
    let (engine, job) = (&ctx.engine, ctx.job.as_str());
    let written = write_safetensors_file(&args.out, &layout, &|n| bar.inc(n), &mut |w| {
        engine.restore_stream(job, step, rank, &mut |offset, bytes| w.chunk(offset, bytes))?;
        Ok(())
    });
    bar.finish_and_clear();
    written?;
    Ok(layout)
}

fn write_summary(
    out: &mut dyn Write,
    path: &Path,
    step: u64,
    rank: u32,
    layout: &SafetensorsLayout,
) -> std::io::Result<()> {
    writeln!(
        out,
        "wrote {}: step {step} rank {rank}, {} tensors, {} ({} bytes)",
        path.display(),
        layout.tensors(),
        HumanBytes(layout.file_len()),
        layout.file_len()
    )?;
    for s in layout.skipped() {
        writeln!(out, "skipped {s}: safetensors has no such dtype")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use ckpt_core::{DType, TensorMeta};

    use super::*;

    fn table(metas: Vec<TensorMeta>) -> TensorTable {
        TensorTable::packed(metas, 64).unwrap()
    }

    fn region(t: &TensorTable) -> Vec<u8> {
        (0..t.total_len()).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn render(t: &TensorTable, meta: &BTreeMap<String, String>, skip: bool) -> anyhow::Result<Vec<u8>> {
        let layout = SafetensorsLayout::plan(t, meta, skip)?;
        let mut out = Vec::new();
        layout.write_to(&region(t), &mut out, &|_| {})?;
        assert_eq!(out.len() as u64, layout.file_len());
        Ok(out)
    }

    #[test]
    fn every_representable_dtype_scalars_and_empties_load_in_safetensors() {
        let mut metas: Vec<TensorMeta> = DType::ALL
            .iter()
            .filter(|d| d.safetensors_name().is_some())
            .map(|&d| TensorMeta::new(format!("t.{d}"), d, vec![3, 5]).unwrap())
            .collect();
        metas.push(TensorMeta::new("scalar", DType::F64, vec![]).unwrap());
        metas.push(TensorMeta::new("empty", DType::BF16, vec![4, 0]).unwrap());
        metas.push(TensorMeta::new("last", DType::U8, vec![7]).unwrap());
        let t = table(metas);
        let meta = BTreeMap::from([("ckptd.step".to_string(), "7".to_string())]);
        let bytes = render(&t, &meta, false).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert_eq!(n % 8, 0, "header is padded to 8 bytes");

        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), t.len());
        let data = region(&t);
        for e in t.entries() {
            let view = st.tensor(&e.meta.name).unwrap();
            assert_eq!(format!("{:?}", view.dtype()), e.meta.dtype.safetensors_name().unwrap(), "{}", e.meta.name);
            let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
            assert_eq!(shape, e.meta.shape, "{}", e.meta.name);
            assert_eq!(view.data(), &data[e.range()], "{}", e.meta.name);
        }
        let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(md.metadata().as_ref().and_then(|m| m.get("ckptd.step")).map(String::as_str), Some("7"));
    }

    #[test]
    fn complex128_is_refused_by_name_or_skipped() {
        let t = table(vec![
            TensorMeta::new("w", DType::F32, vec![2]).unwrap(),
            TensorMeta::new("z", DType::C128, vec![2, 2]).unwrap(),
        ]);
        let e = render(&t, &BTreeMap::new(), false).unwrap_err().to_string();
        assert!(e.contains("`z` (complex128)") && e.contains("--skip-unsupported"), "{e}");

        let layout = SafetensorsLayout::plan(&t, &BTreeMap::new(), true).unwrap();
        assert_eq!(layout.skipped(), ["`z` (complex128)"]);
        let bytes = render(&t, &BTreeMap::new(), true).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.names(), ["w"]);
        assert_eq!(st.tensor("w").unwrap().data(), &region(&t)[..8]);
    }

    #[test]
    fn empty_table_and_reserved_name() {
        let bytes = render(&TensorTable::default(), &BTreeMap::new(), false).unwrap();
        assert!(safetensors::SafeTensors::deserialize(&bytes).unwrap().is_empty());

        let t = table(vec![TensorMeta::new(METADATA_KEY, DType::U8, vec![1]).unwrap()]);
        assert!(render(&t, &BTreeMap::new(), false).unwrap_err().to_string().contains("reserves"));
    }

    #[test]
    fn a_region_of_the_wrong_size_is_refused() {
        let t = table(vec![TensorMeta::new("w", DType::F32, vec![4]).unwrap()]);
        let layout = SafetensorsLayout::plan(&t, &BTreeMap::new(), false).unwrap();
        let e = layout.write_to(&[0u8; 3], &mut Vec::new(), &|_| {}).unwrap_err();
        assert!(e.to_string().contains("region is 3 bytes"), "{e}");
    }

    #[test]
    fn a_region_fed_in_small_chunks_gives_the_same_file_and_out_of_order_chunks_are_refused() {
        let t = table(vec![
            TensorMeta::new("a", DType::F32, vec![5]).unwrap(),
            TensorMeta::new("z", DType::C128, vec![2]).unwrap(),
            TensorMeta::new("e", DType::F32, vec![0]).unwrap(),
            TensorMeta::new("b", DType::U8, vec![130]).unwrap(),
        ]);
        let layout = SafetensorsLayout::plan(&t, &BTreeMap::new(), true).unwrap();
        let data = region(&t);
        let mut whole = Vec::new();
        layout.write_to(&data, &mut whole, &|_| {}).unwrap();
        for size in [1, 7, 64, 1000] {
            let mut out = Vec::new();
            let mut w = layout.writer(&mut out, &|_| {}).unwrap();
            for (i, c) in data.chunks(size).enumerate() {
                w.chunk((i * size) as u64, c).unwrap();
            }
            w.finish().unwrap();
            assert_eq!(out, whole, "chunks of {size} bytes");
        }
        let mut out = Vec::new();
        let mut w = layout.writer(&mut out, &|_| {}).unwrap();
        let e = w.chunk(8, &data[8..16]).unwrap_err().to_string();
        assert!(e.contains("do not follow byte 0"), "{e}");
    }

    #[test]
    fn file_is_replaced_whole_without_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let t = table(vec![TensorMeta::new("w", DType::I32, vec![3]).unwrap()]);
        let layout = SafetensorsLayout::plan(&t, &BTreeMap::new(), false).unwrap();
        let path = dir.path().join("sub/out.safetensors");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"old contents that are longer than the new file will be, by far").unwrap();
        let data = region(&t);
        write_safetensors_file(&path, &layout, &|_| {}, &mut |w| w.chunk(0, &data)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, layout.file_len());
        safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let names: Vec<_> =
            std::fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["out.safetensors"], "no temporary file is left behind");
    }
}
