//! The goodput model: what a checkpointing system's measured costs mean for a training job that
//! fails at a given rate.
//!
//! A checkpoint costs the trainer its stall `S` every interval; a failure loses the work since the
//! last *durable* checkpoint (half an interval on average, plus the persist time `P` by which
//! durability lags the save) and the restore time `R`. The interval that balances the two is
//! Young's `sqrt(2·S·M)` with Daly's higher-order correction, for a mean time between failures
//! `M`. A system whose persist takes longer than that interval cannot checkpoint that often (one
//! save in flight), so the interval is at least `P`.

/// Failures observed on a reference fleet, scaled to one job's size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultRate {
    /// Interruptions observed.
    pub interruptions: f64,
    /// Over this many days.
    pub days: f64,
    /// On this many GPUs.
    pub fleet_gpus: f64,
    /// GPUs in the job being modelled: the job fails when any of them does.
    pub job_gpus: f64,
}

impl FaultRate {
    /// Llama 3 405B pre-training (Meta, "The Llama 3 Herd of Models", 2024): 419 unexpected
    /// interruptions in 54 days on 16,384 H100s.
    pub const LLAMA3: FaultRate =
        FaultRate { interruptions: 419.0, days: 54.0, fleet_gpus: 16384.0, job_gpus: 16384.0 };

    /// Failures per second per GPU.
    pub fn per_gpu_per_s(&self) -> f64 {
        self.interruptions / (self.days * 86_400.0 * self.fleet_gpus)
    }

    /// Mean time between failures of the job, in seconds: the per-GPU rate times its GPUs,
    /// assuming failures independent and spread evenly over GPUs.
    pub fn job_mtbf_s(&self) -> f64 {
        1.0 / (self.per_gpu_per_s() * self.job_gpus)
    }
}

/// A system's measured costs, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Costs {
    /// Trainer stall per checkpoint.
    pub stall: f64,
    /// From the save call until durable.
    pub persist: f64,
    /// Restore after a failure.
    pub restore: f64,
}

/// The model's answer for one system.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Goodput {
    /// Compute time between checkpoints.
    pub interval_s: f64,
    /// Fraction of wall time spent on useful training, in [0, 1].
    pub effective: f64,
}

/// Daly's optimum (2006, "A higher order estimate of the optimum checkpoint interval"), which
/// is Young's `sqrt(2·S·M)` plus terms that matter when `S` is not small against `M`.
pub fn daly_interval(stall: f64, mtbf: f64) -> f64 {
    if stall <= 0.0 {
        return 0.0;
    }
    if stall >= 2.0 * mtbf {
        return mtbf;
    }
    let x = stall / (2.0 * mtbf);
    (2.0 * stall * mtbf).sqrt() * (1.0 + x.sqrt() / 3.0 + x / 9.0) - stall
}

/// Best interval and effective-training-time ratio for `c` at mean time between failures `mtbf`.
pub fn model(c: Costs, mtbf: f64) -> Goodput {
    // A zero stall would make the optimum zero: bound the interval below by the persist time
    // (one save in flight) and by one second, as no job checkpoints more often than it steps.
    let interval = daly_interval(c.stall, mtbf).max(c.persist).max(1.0);
    let period = interval + c.stall;
    let lost_per_failure = period / 2.0 + c.persist + c.restore;
    let effective = (interval / period) * (1.0 - lost_per_failure / mtbf);
    Goodput { interval_s: interval, effective: effective.clamp(0.0, 1.0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_rate_is_about_three_hours_per_job() {
        let h = FaultRate::LLAMA3.job_mtbf_s() / 3600.0;
        assert!((h - 54.0 * 24.0 / 419.0).abs() < 1e-9, "{h}");
        let half = FaultRate { job_gpus: 8192.0, ..FaultRate::LLAMA3 };
        assert!((half.job_mtbf_s() / FaultRate::LLAMA3.job_mtbf_s() - 2.0).abs() < 1e-9);
    }

    #[test]
    fn daly_is_close_to_young_for_small_stalls() {
        let young = (2.0_f64 * 1.0 * 10_000.0).sqrt();
        let daly = daly_interval(1.0, 10_000.0);
        assert!((daly - young).abs() / young < 0.01, "{daly} vs {young}");
        assert_eq!(daly_interval(50.0, 10.0), 10.0);
    }

    #[test]
    fn cheaper_checkpoints_give_more_goodput() {
        let m = 11_000.0;
        let fast = model(Costs { stall: 0.05, persist: 2.0, restore: 1.0 }, m);
        let slow = model(Costs { stall: 2.0, persist: 2.0, restore: 3.0 }, m);
        assert!(fast.effective > slow.effective);
        assert!(fast.interval_s < slow.interval_s);
        assert!((0.0..=1.0).contains(&slow.effective));
        let hopeless = model(Costs { stall: 1e6, persist: 1e6, restore: 1e6 }, m);
        assert_eq!(hopeless.effective, 0.0);
    }
}
