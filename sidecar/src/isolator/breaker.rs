//! The circuit breaker: never isolate more than a configured number or share of the cluster's
//! nodes within a sliding window. Past the limit the isolator only alerts (metric, Event, log), so
//! a false alarm that fires on every node cannot cordon the cluster (NVSentinel's rule).
//!
//! Repair requests (`--repair-url`) are counted the same way, against the same limit: no more
//! repair requests in the window than isolations it allows.
//!
//! Pure: time is passed in, so the tests drive it without sleeping.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Limits of the breaker.
#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    /// Most isolations within `window`.
    pub max_isolated: u32,
    /// Most isolations within `window` as a share of the cluster's nodes (at least one node is
    /// always allowed, so small clusters are not locked out).
    pub max_fraction: f64,
    /// The sliding window.
    pub window: Duration,
}

/// Counts isolations and repair requests in the window and says whether one more is allowed.
#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    recent: VecDeque<Instant>,
    repairs: VecDeque<Instant>,
    open: bool,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(cfg: BreakerConfig) -> Breaker {
        Breaker { cfg, recent: VecDeque::new(), repairs: VecDeque::new(), open: false }
    }

    /// The limit for a cluster of `nodes` nodes.
    pub fn limit(&self, nodes: usize) -> u32 {
        let by_share = (self.cfg.max_fraction.clamp(0.0, 1.0) * nodes as f64).floor() as u32;
        self.cfg.max_isolated.min(by_share.max(1))
    }

    /// Asks for one isolation at `now` in a cluster of `nodes` nodes. On `true` the isolation is
    /// counted; on `false` the breaker is open and the caller must only alert.
    pub fn try_acquire(&mut self, now: Instant, nodes: usize) -> bool {
        self.expire(now);
        if (self.recent.len() as u64) < u64::from(self.limit(nodes)) {
            self.recent.push_back(now);
            self.open = false;
            true
        } else {
            self.open = true;
            false
        }
    }

    /// Asks for one repair request at `now` in a cluster of `nodes` nodes, within the same limit
    /// as isolations (counted apart from them). On `true` the request is counted.
    pub fn try_acquire_repair(&mut self, now: Instant, nodes: usize) -> bool {
        self.expire(now);
        if (self.repairs.len() as u64) < u64::from(self.limit(nodes)) {
            self.repairs.push_back(now);
            true
        } else {
            false
        }
    }

    /// Whether the last request was refused and the window has not yet moved past it.
    pub fn is_open(&mut self, now: Instant) -> bool {
        self.expire(now);
        if self.open && self.recent.is_empty() {
            self.open = false;
        }
        self.open
    }

    fn expire(&mut self, now: Instant) {
        for q in [&mut self.recent, &mut self.repairs] {
            while let Some(&t) = q.front() {
                if now.saturating_duration_since(t) >= self.cfg.window {
                    q.pop_front();
                } else {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(max: u32, fraction: f64) -> Breaker {
        Breaker::new(BreakerConfig { max_isolated: max, max_fraction: fraction, window: Duration::from_secs(60) })
    }

    #[test]
    fn the_n_plus_first_isolation_in_the_window_is_refused() {
        let mut b = breaker(2, 1.0);
        let t0 = Instant::now();
        assert!(b.try_acquire(t0, 100));
        assert!(b.try_acquire(t0 + Duration::from_secs(1), 100));
        assert!(!b.try_acquire(t0 + Duration::from_secs(2), 100));
        assert!(b.is_open(t0 + Duration::from_secs(3)));
        // The first isolation leaves the window: one more is allowed again.
        assert!(b.try_acquire(t0 + Duration::from_secs(60), 100));
        assert!(!b.is_open(t0 + Duration::from_secs(60)));
    }

    #[test]
    fn share_limits_and_never_locks_out_a_small_cluster() {
        let b = breaker(10, 0.25);
        assert_eq!(b.limit(40), 10);
        assert_eq!(b.limit(20), 5);
        assert_eq!(b.limit(4), 1);
        assert_eq!(b.limit(1), 1);
        let b = breaker(0, 0.5);
        assert_eq!(b.limit(10), 0);
    }

    #[test]
    fn repair_requests_are_limited_like_isolations_and_counted_apart() {
        let mut b = breaker(2, 0.5);
        let t0 = Instant::now();
        // 6 nodes: floor(0.5 x 6) = 3, capped by --max-isolated at 2.
        assert!(b.try_acquire_repair(t0, 6));
        assert!(b.try_acquire_repair(t0 + Duration::from_secs(1), 6));
        assert!(!b.try_acquire_repair(t0 + Duration::from_secs(2), 6), "the third repair in the window");
        assert!(!b.is_open(t0 + Duration::from_secs(2)), "refused repairs do not open the isolation breaker");
        assert!(b.try_acquire(t0 + Duration::from_secs(2), 6), "repairs do not use up isolations");
        assert!(b.try_acquire(t0 + Duration::from_secs(3), 6));
        assert!(!b.try_acquire(t0 + Duration::from_secs(4), 6));
        assert!(b.try_acquire_repair(t0 + Duration::from_secs(60), 6), "the first repair left the window");
        let mut small = breaker(5, 0.1);
        assert!(small.try_acquire_repair(t0, 3), "a small cluster still gets one");
        assert!(!small.try_acquire_repair(t0, 3));
    }

    #[test]
    fn zero_limit_only_alerts() {
        let mut b = breaker(0, 1.0);
        assert!(!b.try_acquire(Instant::now(), 4));
    }
}
