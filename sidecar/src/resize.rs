//! The job's resize policy: what a rank does when the step it restores was saved by another number
//! of ranks (a job that came back on fewer nodes after one was isolated, or on more).
//!
//! A job sets it with the `ckptd.io/on-resize` annotation (`wait`, the default, or `replicas`);
//! the webhook checks it and hands it to the trainer and the agent as `CKPTD_ON_RESIZE`, and they
//! read it back here, with the job's layout (`CKPTD_PARALLEL`) for `replicas`. One parser on every
//! side, so a value the webhook admits is one the trainer and the agent accept.

use ckpt_core::Resize;

use crate::layout::Layout;

/// The accepted values, quoted in every parse error.
pub const FORM: &str = "`wait` (the job waits until it runs with the ranks it saved with) or `replicas` (its data-parallel replicas hold the same state, so it may resume at another data-parallel size)";

/// The policy a `CKPTD_ON_RESIZE` value and a `CKPTD_PARALLEL` layout describe. Unset or empty is
/// `wait`. With `replicas`, the layout gives the tensor- and pipeline-parallel sizes (1 and 1 without
/// one); a layout that does not parse is refused here too.
pub fn parse(value: Option<&str>, parallel: Option<&str>) -> Result<Resize, String> {
    match value.map(str::trim).unwrap_or("") {
        "" | "wait" => Ok(Resize::Wait),
        "replicas" => {
            let layout = match parallel.map(str::trim).filter(|p| !p.is_empty()) {
                Some(p) => p.parse::<Layout>().map_err(|e| format!("the layout for `replicas`: {e}"))?,
                None => Layout { dp: 1, tp: 1, pp: 1 },
            };
            Ok(Resize::Replicas { tp: layout.tp, pp: layout.pp })
        }
        other => Err(format!("`{}` is not a resize policy: use {FORM}", crate::text::capped(other, 64))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_layouts() {
        assert_eq!(parse(None, None), Ok(Resize::Wait));
        assert_eq!(parse(Some(" wait "), Some("dp=2")), Ok(Resize::Wait));
        assert_eq!(parse(Some("replicas"), None), Ok(Resize::Replicas { tp: 1, pp: 1 }));
        assert_eq!(parse(Some("replicas"), Some("dp=4,tp=2,pp=3")), Ok(Resize::Replicas { tp: 2, pp: 3 }));
        let e = parse(Some("shrink"), None).unwrap_err();
        assert!(e.contains("`shrink`") && e.contains("replicas"), "{e}");
        let e = parse(Some("replicas"), Some("tp=x")).unwrap_err();
        assert!(e.contains("layout"), "{e}");
    }
}
