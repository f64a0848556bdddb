//! Object names of a checkpoint: `<job>/step-<N>/rank-<r>.ckpt` and `<job>/step-<N>/MANIFEST`.
//!
//! Steps and ranks are plain decimals; listings parse and sort them numerically, so no padding is
//! needed. Names that do not parse are debris (temporary files, foreign objects) and are never taken
//! for checkpoint data.

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

/// `rank-<rank>.ckpt`, the shard's name inside its step directory.
pub fn shard_name(rank: u32) -> String {
    format!("rank-{rank}{SHARD_SUFFIX}")
}

/// `<job>/step-<step>/rank-<rank>.ckpt`
pub fn shard_path(job: &str, step: u64, rank: u32) -> String {
    format!("{job}/step-{step}/{}", shard_name(rank))
}

/// Parses `step-<N>` into N.
pub fn parse_step_dir(segment: &str) -> Option<u64> {
    let digits = segment.strip_prefix("step-")?;
    parse_decimal(digits)
}

/// Parses `rank-<r>.ckpt` into r.
pub fn parse_shard_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("rank-")?.strip_suffix(SHARD_SUFFIX)?;
    parse_decimal(digits).and_then(|v| u32::try_from(v).ok())
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
    }

    #[test]
    fn job_names() {
        assert!(validate_job("llama-70b_run.2").is_ok());
        for bad in ["", "..", "a/b", "a b", "x\0"] {
            assert!(validate_job(bad).is_err(), "{bad:?}");
        }
    }
}
