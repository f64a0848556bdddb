//! Object names of a checkpoint: `<job>/step-<N>/rank-<r>.<tag>.ckpt` (a shard; format 1 wrote
//! `rank-<r>.ckpt`) and `<job>/step-<N>/MANIFEST`.
//!
//! Steps and ranks are plain decimals; listings parse and sort them numerically, so no padding is
//! needed. A shard's tag is 16 lowercase hex digits, new for every shard written, so no two writes
//! ever produce the same name and a name a MANIFEST references can never be written again. Names
//! that do not parse are debris (temporary files, foreign objects) and are never taken for
//! checkpoint data.

/// File name of the commit record inside a step directory.
pub const MANIFEST_NAME: &str = "MANIFEST";
/// Suffix of a rank's shard.
pub const SHARD_SUFFIX: &str = ".ckpt";
/// Marker inside temporary file names written on `file://` stores before their durable rename.
pub const TMP_MARKER: &str = ".tmp-";

/// Checks that a job name is usable as one path segment.
pub fn validate_job(job: &str) -> crate::Result<()> {
    let ok = !job.is_empty()
        && job.len() <= 253
        && job != "."
        && job != ".."
        && job.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(crate::Error::InvalidConfig {
            field: "job",
            reason: format!("`{job}` is not a valid job name: use 1-253 characters from [A-Za-z0-9._-]"),
        })
    }
}

/// `<job>/`
pub fn job_dir(job: &str) -> String {
    format!("{job}/")
}

/// `<job>/step-<step>`
pub fn step_dir(job: &str, step: u64) -> String {
    format!("{job}/step-{step}")
}

/// `<job>/step-<step>/MANIFEST`
pub fn manifest_path(job: &str, step: u64) -> String {
    format!("{job}/step-{step}/{MANIFEST_NAME}")
}

/// `rank-<rank>.ckpt`: the name format 1 gave every shard. Readers still accept it; writers use
/// [`shard_object`].
pub fn shard_name(rank: u32) -> String {
    format!("rank-{rank}{SHARD_SUFFIX}")
}

/// `rank-<rank>.<tag>.ckpt`: the name of one shard write inside its step directory.
pub fn shard_object(rank: u32, tag: u64) -> String {
    format!("rank-{rank}.{tag:016x}{SHARD_SUFFIX}")
}

/// A fresh tag for [`shard_object`]: the writer's clock in milliseconds in the high bits (so a
/// later write usually sorts after an earlier one) and 16 low bits from a per-process random base
/// plus a counter, so consecutive calls in one process always differ and processes differ by
/// chance. The name is published create-only, so even a collision could not replace a shard; it
/// would fail the write.
pub fn new_shard_tag() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static BASE: OnceLock<u64> = OnceLock::new();
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let base = *BASE.get_or_init(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(now.as_nanos());
        h.finish()
    });
    let low = base.wrapping_add(CALLS.fetch_add(1, Ordering::Relaxed)) & 0xffff;
    ((now.as_millis() as u64) << 16) | low
}

/// `<job>/step-<step>/<object>`: a shard object named by a MANIFEST entry or a listing.
pub fn object_path(job: &str, step: u64, object: &str) -> String {
    format!("{job}/step-{step}/{object}")
}

/// `<job>/step-<step>/rank-<rank>.ckpt`: where format 1 put rank `rank`'s shard.
pub fn shard_path(job: &str, step: u64, rank: u32) -> String {
    object_path(job, step, &shard_name(rank))
}

/// Parses `step-<N>` into N.
pub fn parse_step_dir(segment: &str) -> Option<u64> {
    let digits = segment.strip_prefix("step-")?;
    parse_decimal(digits)
}

/// Parses a shard's name, `rank-<r>.<tag>.ckpt` or format 1's `rank-<r>.ckpt`, into r.
pub fn parse_shard_name(name: &str) -> Option<u32> {
    let stem = name.strip_prefix("rank-")?.strip_suffix(SHARD_SUFFIX)?;
    let digits = match stem.split_once('.') {
        Some((digits, tag)) if is_tag(tag) => digits,
        Some(_) => return None,
        None => stem,
    };
    parse_decimal(digits).and_then(|v| u32::try_from(v).ok())
}

/// Whether `name` is format 1's untagged shard name, `rank-<r>.ckpt`.
pub fn is_untagged_shard_name(name: &str) -> bool {
    parse_shard_name(name).is_some_and(|r| name == shard_name(r))
}

fn is_tag(tag: &str) -> bool {
    tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn parse_decimal(digits: &str) -> Option<u64> {
    // Canonical decimals only, so "step-01" and "step-1" never name the same step twice.
    if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_step_dir("step-42"), Some(42));
        assert_eq!(parse_step_dir("step-042"), None);
        assert_eq!(parse_step_dir("step-"), None);
        assert_eq!(parse_step_dir("step-1x"), None);
        assert_eq!(parse_shard_name(&shard_name(7)), Some(7));
        assert_eq!(parse_shard_name("rank-7.ckpt.tmp-1"), None);
        assert_eq!(parse_shard_name("rank-99999999999.ckpt"), None);
        assert_eq!(shard_path("j", 3, 1), "j/step-3/rank-1.ckpt");
        let tagged = shard_object(7, 0xfeed);
        assert_eq!(tagged, "rank-7.000000000000feed.ckpt");
        assert_eq!(parse_shard_name(&tagged), Some(7));
        assert!(is_untagged_shard_name("rank-7.ckpt") && !is_untagged_shard_name(&tagged));
        for bad in
            ["rank-7.FEED00000000FEED.ckpt", "rank-7.feed.ckpt", "rank-7..ckpt", "rank-7.000000000000feed.ckpt.tmp-1"]
        {
            assert_eq!(parse_shard_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn tags_differ_and_follow_the_clock() {
        let a = new_shard_tag();
        let b = new_shard_tag();
        assert_ne!(a, b, "consecutive calls differ in their counter bits");
        assert!(b >> 16 >= a >> 16, "the clock part does not go back");
    }

    #[test]
    fn job_names() {
        assert!(validate_job("llama-70b_run.2").is_ok());
        for bad in ["", "..", "a/b", "a b", "x\0"] {
            assert!(validate_job(bad).is_err(), "{bad:?}");
        }
    }
}
