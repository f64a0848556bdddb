//! [`Layout`]: how a job splits its ranks into data, tensor and pipeline parallel groups.
//!
//! A job declares it with the `ckptd.io/parallel` annotation (`dp=8,tp=4,pp=2`); the webhook checks
//! it and hands it to the agent as `CKPTD_PARALLEL`, which reads it back with this same parser and
//! reports it to the isolator. One parser on both sides means a value the webhook admits is one the
//! agent accepts. The launcher's own variables (torchrun, Megatron) are not read.
//!
//! Ranks are numbered in Megatron-LM's default order: tensor-parallel fastest, then
//! data-parallel, then pipeline-parallel, so the rank at tensor index `t`, data index `d` and
//! pipeline index `p` is `t + tp × (d + dp × p)`. Ranks that differ only in their data-parallel
//! index are **data-parallel replicas** ([`Layout::replicas`]): the isolator takes a faulty
//! rank's shard of an emergency snapshot from a healthy replica (docs/ISOLATOR.md). A job whose
//! ranks of one data-parallel group do not hold the same state (ZeRO or FSDP sharding across
//! data-parallel ranks) must not declare them as replicas: it declares `dp=1` with those ranks in
//! another factor, or no layout.

use std::fmt;
use std::str::FromStr;

/// The accepted form, quoted in every parse error.
pub const FORM: &str = "comma-separated dp=N, tp=N and pp=N (or data=N, tensor=N, pipeline=N), each a whole number of at least 1, e.g. dp=8,tp=4,pp=2; an omitted factor is 1";

/// The longest text [`Layout::from_str`] reads: a value beyond it is not a layout.
const MAX_LEN: usize = 256;

/// The parallel layout of a job: data × tensor × pipeline parallel degrees. Their product is the
/// job's world size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    /// Data-parallel degree (replicas of the model).
    pub dp: u32,
    /// Tensor-parallel degree (ranks one layer is split across).
    pub tp: u32,
    /// Pipeline-parallel degree (stages the layers are split into).
    pub pp: u32,
}

impl Layout {
    /// A layout with every factor at least 1 and a product that fits a `u32`; `None` otherwise.
    pub fn new(dp: u32, tp: u32, pp: u32) -> Option<Layout> {
        if dp == 0 || tp == 0 || pp == 0 {
            return None;
        }
        dp.checked_mul(tp)?.checked_mul(pp)?;
        Some(Layout { dp, tp, pp })
    }

    /// The number of ranks the layout describes: `dp × tp × pp`.
    pub fn world_size(&self) -> u64 {
        u64::from(self.dp) * u64::from(self.tp) * u64::from(self.pp)
    }

    /// The data-parallel replicas of `rank`: the other ranks with its tensor- and
    /// pipeline-parallel indexes (rank order in the module documentation), in ascending order.
    /// None when `dp` is 1 or `rank` is not below the world size.
    pub fn replicas(&self, rank: u32) -> impl Iterator<Item = u32> + use<> {
        let (tp, dp) = (u64::from(self.tp), u64::from(self.dp));
        let r = u64::from(rank);
        let groups = if r < self.world_size() { dp } else { 0 };
        let (t, d, p) = (r % tp, (r / tp) % dp, r / (tp * dp));
        // Every rank of the layout is below its world size, which fits a u32 (`Layout::new`).
        (0..groups).filter(move |&o| o != d).filter_map(move |o| u32::try_from(t + tp * (o + dp * p)).ok())
    }

    /// Why the layout does not fit a job of `world_size` ranks, or `None` when it does.
    pub fn mismatch(&self, world_size: u64) -> Option<String> {
        (self.world_size() != world_size)
            .then(|| format!("{self} describes {} ranks, but the job has {world_size}", self.world_size()))
    }
}

impl fmt::Display for Layout {
    /// The canonical form, which [`Layout::from_str`] reads back: `dp=8,tp=4,pp=2`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dp={},tp={},pp={}", self.dp, self.tp, self.pp)
    }
}

impl FromStr for Layout {
    /// One sentence that quotes the offending part and gives [`FORM`].
    type Err = String;

    fn from_str(s: &str) -> Result<Layout, String> {
        if s.len() > MAX_LEN {
            return Err(format!("a value of {} bytes is not {FORM}", s.len()));
        }
        let shown = |v: &str| crate::text::capped(v, 64).to_string();
        let mut factors: [Option<u32>; 3] = [None; 3];
        for part in s.split(',').map(str::trim) {
            let Some((key, value)) = part.split_once('=') else {
                return Err(format!("`{}` is not a factor such as dp=8: use {FORM}", shown(part)));
            };
            let slot = match key.trim() {
                "dp" | "data" => 0,
                "tp" | "tensor" => 1,
                "pp" | "pipeline" => 2,
                other => return Err(format!("unknown factor `{}`: use {FORM}", shown(other))),
            };
            let value = value.trim();
            let n = match value.parse::<u32>() {
                Ok(n) if n >= 1 && value.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(format!("`{}` is not a whole number of at least 1: use {FORM}", shown(part))),
            };
            if factors[slot].replace(n).is_some() {
                return Err(format!("`{}` sets a factor given before: use {FORM}", shown(part)));
            }
        }
        let [dp, tp, pp] = factors.map(|f| f.unwrap_or(1));
        Layout::new(dp, tp, pp)
            .ok_or_else(|| format!("`{}` describes more than {} ranks: use {FORM}", shown(s), u32::MAX))
    }
}

impl From<Layout> for ckptd_proto::v1::ParallelLayout {
    fn from(l: Layout) -> Self {
        ckptd_proto::v1::ParallelLayout { dp: l.dp, tp: l.tp, pp: l.pp }
    }
}

impl TryFrom<&ckptd_proto::v1::ParallelLayout> for Layout {
    /// Why the wire value is not a layout.
    type Error = String;

    fn try_from(p: &ckptd_proto::v1::ParallelLayout) -> Result<Layout, String> {
        Layout::new(p.dp, p.tp, p.pp).ok_or_else(|| {
            format!(
                "dp={},tp={},pp={} is not a layout: every factor must be at least 1 and their product at most {}",
                p.dp,
                p.tp,
                p.pp,
                u32::MAX
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn both_spellings_parse_and_omitted_factors_are_one() {
        let l = |dp, tp, pp| Layout { dp, tp, pp };
        for (text, want) in [
            ("dp=8,tp=4,pp=2", l(8, 4, 2)),
            ("data=8,tensor=4,pipeline=2", l(8, 4, 2)),
            ("pp=2, dp=8 ,tp = 4", l(8, 4, 2)),
            ("tensor=4,dp=2", l(2, 4, 1)),
            ("dp=64", l(64, 1, 1)),
        ] {
            assert_eq!(text.parse::<Layout>(), Ok(want), "{text}");
        }
        assert_eq!(l(8, 4, 2).world_size(), 64);
        assert_eq!(l(8, 4, 2).mismatch(64), None);
        let m = l(8, 4, 2).mismatch(32).unwrap();
        assert_eq!(m, "dp=8,tp=4,pp=2 describes 64 ranks, but the job has 32");
    }

    #[test]
    fn replicas_share_the_tensor_and_pipeline_index() {
        let replicas = |dp, tp, pp, rank| Layout::new(dp, tp, pp).unwrap().replicas(rank).collect::<Vec<u32>>();
        assert_eq!(replicas(2, 1, 1, 0), vec![1]);
        assert_eq!(replicas(2, 1, 1, 1), vec![0]);
        assert_eq!(replicas(4, 1, 1, 2), vec![0, 1, 3]);
        // tp=2: ranks 0 and 1 are tensor neighbours (one layer split in two), 0 and 2 replicas.
        assert_eq!(replicas(2, 2, 1, 0), vec![2]);
        assert_eq!(replicas(2, 2, 1, 1), vec![3]);
        assert_eq!(replicas(2, 2, 1, 3), vec![1]);
        // dp=2,tp=2,pp=2: rank 5 is t=1, d=0, p=1; its replica is t=1, d=1, p=1 = 1 + 2 × (1 + 2) = 7.
        assert_eq!(replicas(2, 2, 2, 5), vec![7]);
        assert_eq!(replicas(2, 2, 2, 2), vec![0]);
        assert_eq!(replicas(3, 4, 2, 13), vec![17, 21]);
        assert!(replicas(1, 4, 2, 3).is_empty(), "dp=1: no replica");
        assert!(replicas(2, 2, 1, 4).is_empty(), "outside the world");
        assert!(replicas(2, 2, 1, u32::MAX).is_empty());
    }

    #[test]
    fn bad_values_name_the_part_and_the_form() {
        for (text, why) in [
            ("", "is not a factor"),
            ("dp=8,,tp=4", "is not a factor"),
            ("8,4,2", "`8` is not a factor"),
            ("dp=0,tp=4", "`dp=0` is not a whole number of at least 1"),
            ("dp=-1", "is not a whole number"),
            ("dp=+8", "is not a whole number"),
            ("dp=8.0", "is not a whole number"),
            ("dp=", "is not a whole number"),
            ("dp=99999999999", "is not a whole number"),
            ("dp=8,data=8", "`data=8` sets a factor given before"),
            ("dp=8,cp=2", "unknown factor `cp`"),
            ("DP=8", "unknown factor `DP`"),
            ("dp=65536,tp=65536", "more than 4294967295 ranks"),
        ] {
            let e = text.parse::<Layout>().expect_err(text);
            assert!(e.contains(why), "{text:?}: {e}");
            assert!(e.contains(FORM), "{text:?}: {e}");
        }
        let long = format!("dp={}", "1".repeat(1000));
        assert!(long.parse::<Layout>().unwrap_err().starts_with("a value of 1003 bytes"));
        let e = "dp=8,\u{1b}[31m=1".parse::<Layout>().unwrap_err();
        assert!(!e.contains('\u{1b}'), "{e:?}");
    }

    #[test]
    fn the_wire_form_is_checked_like_the_text() {
        let wire = ckptd_proto::v1::ParallelLayout::from(Layout { dp: 2, tp: 2, pp: 1 });
        assert_eq!(Layout::try_from(&wire), Ok(Layout { dp: 2, tp: 2, pp: 1 }));
        let zero = ckptd_proto::v1::ParallelLayout { dp: 0, tp: 2, pp: 1 };
        assert!(Layout::try_from(&zero).unwrap_err().contains("at least 1"));
        let huge = ckptd_proto::v1::ParallelLayout { dp: u32::MAX, tp: 2, pp: 1 };
        assert!(Layout::try_from(&huge).is_err());
    }

    proptest! {
        /// Replicas are symmetric, distinct from the rank, inside the world, `dp - 1` of them,
        /// and agree with the rank order `t + tp × (d + dp × p)`.
        #[test]
        fn replicas_follow_the_rank_order(dp in 1u32..=8, tp in 1u32..=8, pp in 1u32..=4, pick in any::<u32>()) {
            let l = Layout::new(dp, tp, pp).unwrap();
            let world = dp * tp * pp;
            let rank = pick % world;
            let got: Vec<u32> = l.replicas(rank).collect();
            prop_assert_eq!(got.len() as u32, dp - 1);
            for &o in &got {
                prop_assert!(o < world && o != rank);
                prop_assert_eq!(o % tp, rank % tp, "same tensor index");
                prop_assert_eq!(o / (tp * dp), rank / (tp * dp), "same pipeline index");
                prop_assert!(l.replicas(o).any(|b| b == rank), "symmetric");
            }
        }

        /// Every layout prints to a text that parses back to it, in either spelling and any order.
        #[test]
        fn display_round_trips(dp in 1u32..=4096, tp in 1u32..=64, pp in 1u32..=64, long in any::<bool>(), rot in 0usize..3) {
            let l = Layout::new(dp, tp, pp).unwrap();
            prop_assert_eq!(l.to_string().parse::<Layout>(), Ok(l));
            let names = if long { ["data", "tensor", "pipeline"] } else { ["dp", "tp", "pp"] };
            let mut parts: Vec<String> =
                names.iter().zip([dp, tp, pp]).map(|(k, v)| format!("{k}={v}")).collect();
            parts.rotate_left(rot);
            prop_assert_eq!(parts.join(",").parse::<Layout>(), Ok(l));
        }

        /// Any text either parses to a layout whose product fits a u32, or is refused; never a panic.
        #[test]
        fn any_text_parses_or_is_refused(s in "(dp|tp|pp|data|x|=|,|[0-9]{1,12}| ){0,12}") {
            if let Ok(l) = s.parse::<Layout>() {
                prop_assert!(l.dp >= 1 && l.tp >= 1 && l.pp >= 1);
                prop_assert!(l.world_size() <= u64::from(u32::MAX));
                prop_assert_eq!(l.to_string().parse::<Layout>(), Ok(l));
            }
        }
    }
}
