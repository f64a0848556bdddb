//! Straggler detection: a rank whose step time exceeds `k` × the job's median for `m` consecutive
//! windows is a straggler. Stragglers are reported (metric, Event), not isolated.
//!
//! Pure: the coordinator calls [`Detector::window`] once per window with each rank's latest step
//! time.

use std::collections::{BTreeMap, BTreeSet};

/// Detects stragglers of one job.
#[derive(Debug, Clone)]
pub struct Detector {
    k: f64,
    m: u32,
    slow_windows: BTreeMap<u32, u32>,
    flagged: BTreeSet<u32>,
}

impl Detector {
    /// A detector for `k` × median over `m` windows (`m` ≥ 1).
    pub fn new(k: f64, m: u32) -> Detector {
        Detector { k, m: m.max(1), slow_windows: BTreeMap::new(), flagged: BTreeSet::new() }
    }

    /// Closes one window with each rank's step time in milliseconds. Returns the ranks that became
    /// stragglers in this window (each is reported once until it recovers).
    pub fn window(&mut self, step_ms: &BTreeMap<u32, u64>) -> Vec<u32> {
        let mut times: Vec<u64> = step_ms.values().copied().filter(|&t| t > 0).collect();
        if times.len() < 2 {
            return Vec::new();
        }
        times.sort_unstable();
        let median = if times.len() % 2 == 1 {
            times[times.len() / 2] as f64
        } else {
            (times[times.len() / 2 - 1] as f64 + times[times.len() / 2] as f64) / 2.0
        };
        let mut newly = Vec::new();
        for (&rank, &t) in step_ms {
            if t > 0 && t as f64 > self.k * median {
                let n = self.slow_windows.entry(rank).or_insert(0);
                *n = n.saturating_add(1);
                if *n >= self.m && self.flagged.insert(rank) {
                    newly.push(rank);
                }
            } else {
                self.slow_windows.remove(&rank);
                self.flagged.remove(&rank);
            }
        }
        newly
    }

    /// The ranks currently flagged.
    pub fn stragglers(&self) -> Vec<u32> {
        self.flagged.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times(v: &[u64]) -> BTreeMap<u32, u64> {
        v.iter().enumerate().map(|(r, &t)| (r as u32, t)).collect()
    }

    #[test]
    fn slow_rank_is_flagged_after_m_windows_once_and_cleared_on_recovery() {
        let mut d = Detector::new(1.5, 3);
        let slow = times(&[100, 100, 400, 110]);
        assert!(d.window(&slow).is_empty());
        assert!(d.window(&slow).is_empty());
        assert_eq!(d.window(&slow), vec![2]);
        assert!(d.window(&slow).is_empty(), "reported once");
        assert_eq!(d.stragglers(), vec![2]);
        d.window(&times(&[100, 100, 100, 100]));
        assert!(d.stragglers().is_empty());
    }

    #[test]
    fn an_interrupted_run_of_slow_windows_starts_over() {
        let mut d = Detector::new(2.0, 2);
        let slow = times(&[100, 300, 100]);
        let fine = times(&[100, 100, 100]);
        assert!(d.window(&slow).is_empty());
        assert!(d.window(&fine).is_empty());
        assert!(d.window(&slow).is_empty());
        assert_eq!(d.window(&slow), vec![1]);
    }

    #[test]
    fn too_few_ranks_or_no_times_flag_nothing() {
        let mut d = Detector::new(1.1, 1);
        assert!(d.window(&times(&[1000])).is_empty());
        assert!(d.window(&times(&[0, 0, 0])).is_empty());
    }
}
