//! Finding a rank's shard file on a `file://` store, whose name carries the tag its writer chose
//! (`rank-<r>.<tag>.ckpt`).

use std::path::{Path, PathBuf};

/// The shard file of `rank` in the step directory `step_dir`, if there is exactly one (a step
/// holds one per rank unless an attempt that did not commit left another).
pub fn shard_file(step_dir: &Path, rank: u32) -> Option<PathBuf> {
    let mut found = std::fs::read_dir(step_dir).ok()?.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| {
        p.file_name().and_then(|n| n.to_str()).and_then(ckpt_core::store::layout::parse_shard_name) == Some(rank)
    });
    let path = found.next()?;
    assert!(found.next().is_none(), "more than one shard of rank {rank} in {}", step_dir.display());
    Some(path)
}
