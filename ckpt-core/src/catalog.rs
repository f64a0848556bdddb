//! What a store holds for a job: steps, whether each is committed, and which committed step is the
//! newest one that validates.
//!
//! Readers never trust a pointer: a step counts only when its MANIFEST parses, its checksum holds,
//! and every shard it lists exists with the recorded size and index checksum.

use std::collections::BTreeMap;

use futures::StreamExt;
use object_store::ObjectStoreExt;
use tokio::runtime::Handle;

use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::restore::{self, ReadConfig, ShardRef};
use crate::store::{Store, layout};

/// Whether a step is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    /// Its MANIFEST exists.
    Committed,
    /// Shards or debris without a MANIFEST: in progress, or abandoned.
    Uncommitted,
}

/// One object found under a step.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StepObject {
    /// Object name inside the step directory.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, milliseconds since the Unix epoch.
    pub modified_unix_ms: i64,
}

/// A shard object found under a step.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ListedShard {
    /// The rank that wrote it (from its name).
    pub rank: u32,
    /// Its name inside the step directory.
    pub object: String,
}

/// One step directory as listed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StepInfo {
    /// The step.
    pub step: u64,
    /// Committed or not.
    pub state: StepState,
    /// Ranks that have a shard object, each once.
    pub shard_ranks: Vec<u32>,
    /// Every shard object: a rank may have several (writes of attempts that did not commit, or
    /// a late write after the commit); the MANIFEST names the ones that count.
    pub shards: Vec<ListedShard>,
    /// Every object under the step (shards, MANIFEST, temporary files).
    pub objects: Vec<StepObject>,
}

impl StepInfo {
    /// Total bytes under the step.
    pub fn bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.size).sum()
    }

    /// Most recent modification of any object, milliseconds since the Unix epoch.
    pub fn newest_modified_unix_ms(&self) -> i64 {
        self.objects.iter().map(|o| o.modified_unix_ms).max().unwrap_or(0)
    }
}

/// Lists every step of `job`, oldest first.
pub(crate) fn list_steps(store: &Store, rt: &Handle, job: &str) -> Result<Vec<StepInfo>> {
    layout::validate_job(job)?;
    list_under(store, rt, &layout::job_dir(job))
}

/// Lists one step of `job`: one listing of its directory, not of the whole job, so that a rank
/// looking whether its step is complete pays the same whatever the job's history. `None`: the
/// step has no object.
pub(crate) fn list_step(store: &Store, rt: &Handle, job: &str, step: u64) -> Result<Option<StepInfo>> {
    layout::validate_job(job)?;
    Ok(list_under(store, rt, &layout::step_dir(job, step))?.into_iter().find(|s| s.step == step))
}

/// The steps found under `rel` (a job's directory or one step's), oldest first.
fn list_under(store: &Store, rt: &Handle, rel: &str) -> Result<Vec<StepInfo>> {
    let prefix = store.path(rel);
    let os = store.object_store().clone();
    let metas = rt.block_on(async {
        let mut out = Vec::new();
        let mut stream = os.list(Some(&prefix));
        while let Some(item) = stream.next().await {
            match item {
                Ok(meta) => out.push(meta),
                // A temporary file renamed away between listing and stat is not an error.
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(Error::store("list", &prefix, e)),
            }
        }
        Ok(out)
    })?;
    let mut steps: BTreeMap<u64, StepInfo> = BTreeMap::new();
    for meta in metas {
        let Some(rel) = store.relative(&meta.location) else { continue };
        let mut parts = rel.split('/');
        let (Some(_job), Some(dir), Some(name), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let Some(step) = layout::parse_step_dir(dir) else { continue };
        let info = steps.entry(step).or_insert_with(|| StepInfo {
            step,
            state: StepState::Uncommitted,
            shard_ranks: Vec::new(),
            shards: Vec::new(),
            objects: Vec::new(),
        });
        if name == layout::MANIFEST_NAME {
            info.state = StepState::Committed;
        } else if let Some(rank) = layout::parse_shard_name(name) {
            info.shard_ranks.push(rank);
            info.shards.push(ListedShard { rank, object: name.to_string() });
        }
        info.objects.push(StepObject {
            name: name.to_string(),
            size: meta.size,
            modified_unix_ms: meta.last_modified.timestamp_millis(),
        });
    }
    let mut out: Vec<StepInfo> = steps.into_values().collect();
    for s in &mut out {
        s.shard_ranks.sort_unstable();
        s.shard_ranks.dedup();
        // By rank, and a rank's newest tag (the clock's high bits) last.
        s.shards.sort_by(|a, b| (a.rank, &a.object).cmp(&(b.rank, &b.object)));
        s.objects.sort_by(|a, b| a.name.cmp(&b.name));
    }
    Ok(out)
}

/// Reads and decodes the MANIFEST of a step, checking that it names this job and step.
pub(crate) fn read_manifest(store: &Store, rt: &Handle, job: &str, step: u64) -> Result<Manifest> {
    layout::validate_job(job)?;
    let rel = layout::manifest_path(job, step);
    let path = store.path(&rel);
    let os = store.object_store().clone();
    let bytes = rt.block_on(async { os.get(&path).await?.bytes().await }).map_err(|e| match e {
        object_store::Error::NotFound { .. } => {
            Error::NotFound { what: format!("committed step {step} of job `{job}`") }
        }
        e => Error::store("get", &path, e),
    })?;
    let m = Manifest::decode(&bytes).map_err(|e| relabel(e, &rel, step))?;
    if m.job != job || m.step != step {
        return Err(Error::corrupt(
            crate::Location { object: rel, step: Some(step), ..Default::default() },
            format!("manifest names job `{}` step {} (misplaced object)", m.job, m.step),
        ));
    }
    Ok(m)
}

fn relabel(e: Error, object: &str, step: u64) -> Error {
    match e {
        Error::Corrupt { location, reason } => Error::Corrupt {
            location: crate::Location { object: object.to_string(), step: Some(step), ..location },
            reason,
        },
        other => other,
    }
}

/// Runs `f` over `items` on up to `threads` threads, returning results in input order.
pub(crate) fn parallel_map<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if items.len() <= 1 || threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<Option<R>> = Vec::with_capacity(items.len());
    results.resize_with(items.len(), || None);
    let slots: Vec<std::sync::Mutex<Option<R>>> = results.into_iter().map(std::sync::Mutex::new).collect();
    std::thread::scope(|s| {
        for _ in 0..threads.min(items.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = f(item);
                    if let Ok(mut slot) = slots[i].lock() {
                        *slot = Some(r);
                    }
                }
            });
        }
    });
    slots.into_iter().filter_map(|m| m.into_inner().ok().flatten()).collect()
}

/// How deeply a committed step is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// MANIFEST checksum, and every shard's size, trailer and index checksum.
    Structure,
    /// Also every chunk's checksum and decompression.
    Full,
}

/// Checks a committed step; returns its manifest when it is sound.
pub(crate) fn validate_step(
    store: &Store,
    rt: &Handle,
    read: &ReadConfig,
    job: &str,
    step: u64,
    depth: Depth,
) -> Result<Manifest> {
    let m = read_manifest(store, rt, job, step)?;
    let results = parallel_map(&m.shards, 16, |s| match depth {
        Depth::Structure => restore::read_header(store, rt, ShardRef::committed(job, step, s)).map(|_| ()),
        Depth::Full => restore::read_shard(store, rt, read, ShardRef::committed(job, step, s), None).map(|_| ()),
    });
    results.into_iter().collect::<Result<Vec<()>>>()?;
    Ok(m)
}

/// The newest committed step that validates at `depth`, falling back past damaged ones.
pub(crate) fn newest_valid(
    store: &Store,
    rt: &Handle,
    read: &ReadConfig,
    job: &str,
    depth: Depth,
) -> Result<Option<Manifest>> {
    let steps = list_steps(store, rt, job)?;
    for s in steps.iter().rev().filter(|s| s.state == StepState::Committed) {
        match validate_step(store, rt, read, job, s.step, depth) {
            Ok(m) => return Ok(Some(m)),
            Err(e)
                if matches!(
                    e.kind(),
                    crate::ErrorKind::Corrupt | crate::ErrorKind::NotFound | crate::ErrorKind::Unsupported
                ) =>
            {
                tracing::warn!(job, step = s.step, error = %e, "committed step fails validation; falling back");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// The result of verifying one step.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// The step.
    pub step: u64,
    /// Whether the MANIFEST exists and decodes.
    pub manifest_ok: bool,
    /// Per-rank results.
    pub shards: Vec<ShardReport>,
    /// Every problem found, one line each; empty when the step is sound.
    pub problems: Vec<String>,
}

impl VerifyReport {
    /// Whether the step is sound.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One shard's verification result.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ShardReport {
    /// The rank.
    pub rank: u32,
    /// Object size.
    pub size: u64,
    /// The problem, if any.
    pub error: Option<String>,
}

/// Whether an error is a verdict about the stored bytes (damage, a missing object, an unknown
/// version), as opposed to a failure to find out (a store outage, a timeout, a local I/O error).
fn is_verdict(e: &Error) -> bool {
    matches!(
        e.kind(),
        crate::ErrorKind::Corrupt
            | crate::ErrorKind::Unsupported
            | crate::ErrorKind::NotFound
            | crate::ErrorKind::Mismatch
    )
}

/// Verifies every byte of a step and reports every problem rather than the first. Only verdicts
/// about the data go into the report; a read that fails for another reason (the store is down, a
/// request timed out) is returned as an error, so a sound step is never reported as damaged
/// because of a network blip.
pub(crate) fn verify_step(store: &Store, rt: &Handle, read: &ReadConfig, job: &str, step: u64) -> Result<VerifyReport> {
    let m = match read_manifest(store, rt, job, step) {
        Ok(m) => m,
        Err(e) if e.kind() == crate::ErrorKind::NotFound || !is_verdict(&e) => return Err(e),
        Err(e) => {
            return Ok(VerifyReport { step, manifest_ok: false, shards: Vec::new(), problems: vec![e.to_string()] });
        }
    };
    let results =
        parallel_map(&m.shards, 8, |s| restore::read_shard(store, rt, read, ShardRef::committed(job, step, s), None));
    let mut report = VerifyReport { step, manifest_ok: true, shards: Vec::new(), problems: Vec::new() };
    for (s, r) in m.shards.iter().zip(results) {
        let error = match r {
            Ok(_) => None,
            Err(e) if is_verdict(&e) => Some(e.to_string()),
            Err(e) => return Err(e),
        };
        if let Some(e) = &error {
            report.problems.push(e.clone());
        }
        report.shards.push(ShardReport { rank: s.rank, size: s.size, error });
    }
    Ok(report)
}
