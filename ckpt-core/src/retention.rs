//! Retention: keep the newest K committed steps, delete uncommitted debris older than the newest
//! commit, and abort stale multipart uploads.
//!
//! Invariants:
//! - the newest committed step whose every chunk verifies is never deleted, whatever K says;
//! - a committed step loses its MANIFEST first, so no reader ever sees it half-deleted;
//! - steps newer than the newest commit are left alone: they may be in progress.

use std::time::Duration;

use object_store::ObjectStoreExt;
use tokio::runtime::Handle;

use crate::catalog::{self, Depth, StepState};
use crate::error::{Error, Result};
use crate::restore::ReadConfig;
use crate::store::{Store, layout};

/// What retention keeps and removes.
#[derive(Debug, Clone)]
pub struct RetentionPolicy {
    /// Committed steps to keep (at least 1).
    pub keep: usize,
    /// Multipart uploads older than this are aborted even for steps that may still be in progress.
    pub upload_max_age: Duration,
    /// Report what would be deleted without deleting.
    pub dry_run: bool,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy { keep: 3, upload_max_age: Duration::from_secs(24 * 3600), dry_run: false }
    }
}

/// What a retention pass did (or would do, in a dry run).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Committed steps kept.
    pub kept: Vec<u64>,
    /// Committed steps deleted.
    pub deleted_committed: Vec<u64>,
    /// Uncommitted steps (debris) deleted.
    pub deleted_debris: Vec<u64>,
    /// Objects deleted.
    pub deleted_objects: u64,
    /// Bytes freed.
    pub freed_bytes: u64,
    /// Multipart uploads aborted.
    pub aborted_uploads: u64,
    /// Whether nothing was actually deleted.
    pub dry_run: bool,
}

pub(crate) fn gc(
    store: &Store,
    rt: &Handle,
    read: &ReadConfig,
    job: &str,
    policy: &RetentionPolicy,
) -> Result<GcReport> {
    if policy.keep == 0 {
        return Err(Error::InvalidConfig {
            field: "keep",
            reason: "must be at least 1: retention never deletes the newest committed step".into(),
        });
    }
    let steps = catalog::list_steps(store, rt, job)?;
    let committed: Vec<u64> = steps.iter().filter(|s| s.state == StepState::Committed).map(|s| s.step).collect();
    let newest_commit = committed.last().copied();
    // Before any committed step goes, find the newest one whose every chunk verifies: it stays
    // even when newer damaged steps fill the quota. Usually that is the newest step, read once.
    let newest_valid = if committed.len() > policy.keep {
        catalog::newest_valid(store, rt, read, job, Depth::Full)?.map(|m| m.step)
    } else {
        None
    };
    let mut keep: Vec<u64> = committed.iter().rev().take(policy.keep).copied().collect();
    if let Some(v) = newest_valid
        && !keep.contains(&v)
    {
        keep.push(v);
    }
    keep.sort_unstable();
    let mut report = GcReport { kept: keep.clone(), dry_run: policy.dry_run, ..GcReport::default() };

    for s in &steps {
        let doomed = match s.state {
            StepState::Committed => !keep.contains(&s.step),
            StepState::Uncommitted => newest_commit.is_some_and(|n| s.step < n),
        };
        if !doomed {
            continue;
        }
        // The MANIFEST goes first, so the step stops being visible before any shard disappears.
        let mut names: Vec<&str> = s.objects.iter().map(|o| o.name.as_str()).collect();
        names.sort_by_key(|n| *n != layout::MANIFEST_NAME);
        if !policy.dry_run {
            for name in &names {
                let path = store.path(&format!("{}/{name}", layout::step_dir(job, s.step)));
                let os = store.object_store().clone();
                match rt.block_on(os.delete(&path)) {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(Error::store("delete", &path, e)),
                }
            }
            if let Some(dir) = store.local_file(&store.path(&layout::step_dir(job, s.step))) {
                // Only succeeds when empty; a writer that raced us keeps its directory.
                let _ = std::fs::remove_dir(&dir);
            }
        }
        report.deleted_objects += names.len() as u64;
        report.freed_bytes += s.bytes();
        match s.state {
            StepState::Committed => report.deleted_committed.push(s.step),
            StepState::Uncommitted => report.deleted_debris.push(s.step),
        }
        tracing::info!(job, step = s.step, bytes = s.bytes(), dry_run = policy.dry_run, "retention removed step");
    }

    #[cfg(feature = "cloud")]
    abort_stale_uploads(store, rt, job, policy, newest_commit, &keep, &mut report)?;
    Ok(report)
}

/// Aborts incomplete multipart uploads of steps that are superseded, or older than the policy's
/// age limit.
#[cfg(feature = "cloud")]
fn abort_stale_uploads(
    store: &Store,
    rt: &Handle,
    job: &str,
    policy: &RetentionPolicy,
    newest_commit: Option<u64>,
    keep: &[u64],
    report: &mut GcReport,
) -> Result<()> {
    use crate::store::s3_uploads;
    use std::time::SystemTime;
    let prefix = store.path(&layout::job_dir(job));
    let uploads = rt.block_on(s3_uploads::list_pending(store, &format!("{prefix}/")))?;
    let now = SystemTime::now();
    for up in uploads {
        let step = up.key.rsplit('/').nth(1).and_then(layout::parse_step_dir);
        let superseded = match (step, newest_commit) {
            (Some(s), Some(n)) => s < n || keep.contains(&s) || report.deleted_committed.contains(&s),
            _ => false,
        };
        let too_old =
            up.initiated.and_then(|t| now.duration_since(t).ok()).is_some_and(|age| age > policy.upload_max_age);
        if !(superseded || too_old) {
            continue;
        }
        if !policy.dry_run {
            rt.block_on(s3_uploads::abort(store, &up))?;
        }
        report.aborted_uploads += 1;
        tracing::info!(job, key = %up.key, dry_run = policy.dry_run, "retention aborted multipart upload");
    }
    Ok(())
}
