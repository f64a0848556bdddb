//! Progress reporter: hang detection from trainer heartbeats. A rank hangs when it makes no
//! progress (a new step or a new phase) for longer than its phase's budget:
//! - step: max(floor, k × the rolling median step time), so a model with 2 s steps is flagged
//!   in minutes while one with 60 s steps is not flagged at all by a fixed timeout;
//! - init, checkpoint-save and checkpoint-load: their own fixed budgets, so a long restore from
//!   object storage is never a hang.
//!
//! The tracker is a pure state machine over explicit instants; the task stamps heartbeats with
//! tokio's clock, so tests drive it with paused time and no sleeps.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use ckpt_core::Phase;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::controller::StatusBoard;
use super::finding::{Finding, Source};

/// The reporter's name in status and metrics.
pub(crate) const NAME: &str = "progress";

/// Step-time samples kept per rank for the rolling median.
const WINDOW: usize = 64;

/// Hang budgets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budgets {
    /// Least time without progress in the step phase before a hang.
    pub floor: Duration,
    /// Multiple of the rolling median step time.
    pub k: f64,
    /// Start-up, and the first step (compilation, NCCL set-up) before any step time is known.
    pub init: Duration,
    /// A checkpoint save.
    pub save: Duration,
    /// A checkpoint load (restore from the store can take long).
    pub load: Duration,
}

/// What the progress task receives.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Event {
    /// `phase` is `None` when the trainer did not say; the heartbeat still counts.
    Heartbeat {
        rank: u32,
        step: u64,
        phase: Option<Phase>,
    },
    Attached {
        rank: u32,
        gpu: Option<u32>,
    },
    Detached {
        rank: u32,
    },
    /// A drill: report the rank (or every rank) as hung at the next check.
    Inject {
        rank: Option<u32>,
    },
}

#[derive(Debug)]
struct Rank {
    gpu: Option<u32>,
    step: u64,
    /// `None` until the trainer names a phase, or after a heartbeat that named none.
    phase: Option<Phase>,
    last_progress: Instant,
    /// When the current step began, in the step phase.
    step_started: Option<(u64, Instant)>,
    step_times: VecDeque<Duration>,
    reported: bool,
    seen: bool,
}

/// Per-rank progress state.
#[derive(Debug)]
pub(crate) struct Tracker {
    budgets: Budgets,
    ranks: BTreeMap<u32, Rank>,
    injected: Vec<Option<u32>>,
}

impl Tracker {
    pub(crate) fn new(budgets: Budgets) -> Tracker {
        Tracker { budgets, ranks: BTreeMap::new(), injected: Vec::new() }
    }

    fn rank(&mut self, rank: u32, now: Instant) -> &mut Rank {
        self.ranks.entry(rank).or_insert_with(|| Rank {
            gpu: None,
            step: 0,
            phase: Some(Phase::Init),
            last_progress: now,
            step_started: None,
            step_times: VecDeque::new(),
            reported: false,
            seen: false,
        })
    }

    pub(crate) fn apply(&mut self, ev: Event, now: Instant) {
        match ev {
            Event::Attached { rank, gpu } => {
                let r = self.rank(rank, now);
                r.gpu = gpu;
                r.last_progress = now;
            }
            Event::Detached { rank } => {
                self.ranks.remove(&rank);
            }
            Event::Inject { rank } => self.injected.push(rank),
            Event::Heartbeat { rank, step, phase } => self.heartbeat(rank, step, phase, now),
        }
    }

    fn heartbeat(&mut self, rank: u32, step: u64, phase: Option<Phase>, now: Instant) {
        let r = self.rank(rank, now);
        let first = !r.seen;
        r.seen = true;
        let progressed = first || step != r.step || phase != r.phase;
        let stepping = phase == Some(Phase::Step);
        if stepping && r.phase == Some(Phase::Step) && step > r.step {
            // A step time only from step to step, so checkpoint phases do not inflate it.
            if let Some((from, at)) = r.step_started {
                let steps = u32::try_from(step - from).unwrap_or(u32::MAX).max(1);
                r.step_times.push_back(now.duration_since(at) / steps);
                if r.step_times.len() > WINDOW {
                    r.step_times.pop_front();
                }
            }
        }
        if stepping && (r.phase != Some(Phase::Step) || step != r.step || first) {
            r.step_started = Some((step, now));
        }
        if progressed {
            r.last_progress = now;
            r.reported = false;
        }
        r.step = step;
        r.phase = phase;
    }

    /// The budget of a rank in its current phase and how it was computed.
    fn budget(&self, r: &Rank) -> (Duration, String) {
        let b = &self.budgets;
        match r.phase {
            Some(Phase::CheckpointSave) => (b.save, "checkpoint-save budget".into()),
            Some(Phase::CheckpointLoad) => (b.load, "checkpoint-load budget".into()),
            Some(Phase::Step) if !r.step_times.is_empty() => {
                let mut v: Vec<Duration> = r.step_times.iter().copied().collect();
                v.sort();
                let median = v[v.len() / 2];
                let scaled = median.mul_f64(b.k.max(0.0));
                (b.floor.max(scaled), format!("max(floor {:?}, {} × median step {:?})", b.floor, b.k, median))
            }
            // Init, unspecified, or the first step before any step time is known.
            _ => (b.init.max(b.floor), "init budget".into()),
        }
    }

    /// The ranks that have just crossed their budget (each stall reported once).
    pub(crate) fn check(&mut self, now: Instant) -> Vec<Finding> {
        let mut out = Vec::new();
        for inj in std::mem::take(&mut self.injected) {
            let ranks: Vec<u32> = match inj {
                Some(r) => vec![r],
                None if self.ranks.is_empty() => vec![],
                None => self.ranks.keys().copied().collect(),
            };
            if ranks.is_empty() {
                out.push(Finding::new(Source::Inject, "hang", "injected hang (ckptctl inject --hang)"));
            }
            for rank in ranks {
                let gpu = self.ranks.get(&rank).and_then(|r| r.gpu);
                out.push(
                    Finding::new(
                        Source::Inject,
                        "hang",
                        format!("injected hang of rank {rank} (ckptctl inject --hang)"),
                    )
                    .with_rank(Some(rank))
                    .with_gpu(gpu),
                );
            }
        }
        let mut hung = Vec::new();
        for (&rank, r) in &self.ranks {
            if r.reported {
                continue;
            }
            let (budget, how) = self.budget(r);
            let idle = now.duration_since(r.last_progress);
            if idle > budget {
                hung.push(rank);
                out.push(
                    Finding::new(
                        Source::Progress,
                        "hang",
                        format!(
                            "rank {rank} made no progress for {}s in phase {} at step {} (budget {}s = {how})",
                            idle.as_secs(),
                            phase_name(r.phase),
                            r.step,
                            budget.as_secs()
                        ),
                    )
                    .with_rank(Some(rank))
                    .with_gpu(r.gpu),
                );
            }
        }
        for rank in hung {
            if let Some(r) = self.ranks.get_mut(&rank) {
                r.reported = true;
            }
        }
        out
    }

    fn summary(&self, now: Instant) -> String {
        let worst = self
            .ranks
            .iter()
            .map(|(k, r)| (now.duration_since(r.last_progress), *k, r.step, r.phase))
            .max_by_key(|x| x.0);
        match worst {
            Some((idle, rank, step, phase)) => format!(
                "{} ranks; longest without progress: rank {rank}, {}s, step {step}, phase {}",
                self.ranks.len(),
                idle.as_secs(),
                phase_name(phase)
            ),
            None => "no ranks attached".into(),
        }
    }
}

/// How a rank's phase reads in findings and status: its name, or `unspecified`.
fn phase_name(phase: Option<Phase>) -> &'static str {
    phase.map_or("unspecified", Phase::as_str)
}

/// The progress task: applies events as they come and checks the budgets every `poll`.
pub(crate) async fn run(
    mut tracker: Tracker,
    mut events: mpsc::Receiver<Event>,
    tx: mpsc::Sender<Finding>,
    poll: Duration,
    board: Arc<StatusBoard>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            ev = events.recv() => {
                let Some(ev) = ev else { break };
                let inject = matches!(ev, Event::Inject { .. });
                tracker.apply(ev, Instant::now());
                if inject && !send(&mut tracker, &tx).await { break }
            }
            _ = tick.tick() => {
                if !send(&mut tracker, &tx).await { break }
                board.sample(NAME, tracker.summary(Instant::now()));
            }
        }
    }
    tracing::debug!("health progress reporter stopped");
}

async fn send(tracker: &mut Tracker, tx: &mpsc::Sender<Finding>) -> bool {
    for f in tracker.check(Instant::now()) {
        if tx.send(f).await.is_err() {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets() -> Budgets {
        Budgets {
            floor: Duration::from_secs(60),
            k: 10.0,
            init: Duration::from_secs(600),
            save: Duration::from_secs(900),
            load: Duration::from_secs(1800),
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn step_budget_follows_the_median_step_time() {
        let mut t = Tracker::new(budgets());
        let t0 = Instant::now();
        for i in 0..20u64 {
            t.apply(Event::Heartbeat { rank: 0, step: i, phase: Some(Phase::Step) }, t0 + S * 10 * i as u32);
        }
        // Last progress at t0+190 s; median step 10 s → budget max(60, 100) = 100 s.
        let last = t0 + S * 190;
        assert!(t.check(last + S * 99).is_empty());
        let f = t.check(last + S * 101);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].kind.as_str(), f[0].rank), ("hang", Some(0)));
        assert!(f[0].evidence.contains("median step 10s"), "{}", f[0].evidence);
        assert!(t.check(last + S * 200).is_empty(), "one report per stall");
        t.apply(Event::Heartbeat { rank: 0, step: 20, phase: Some(Phase::Step) }, last + S * 300);
        assert!(t.check(last + S * 301).is_empty(), "progress clears the stall");
    }

    #[tokio::test(start_paused = true)]
    async fn floor_applies_to_fast_steps() {
        let mut t = Tracker::new(budgets());
        let t0 = Instant::now();
        for i in 0..10u64 {
            t.apply(Event::Heartbeat { rank: 1, step: i, phase: Some(Phase::Step) }, t0 + S * i as u32);
        }
        let last = t0 + S * 9;
        assert!(t.check(last + S * 59).is_empty());
        assert_eq!(t.check(last + S * 61).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn checkpoint_phases_have_their_own_budgets_and_do_not_skew_the_median() {
        let mut t = Tracker::new(budgets());
        let t0 = Instant::now();
        t.apply(Event::Heartbeat { rank: 0, step: 0, phase: Some(Phase::CheckpointLoad) }, t0);
        // A 20-minute restore is not a hang (load budget 30 min).
        assert!(t.check(t0 + S * 1200).is_empty());
        t.apply(Event::Heartbeat { rank: 0, step: 0, phase: Some(Phase::Step) }, t0 + S * 1200);
        t.apply(Event::Heartbeat { rank: 0, step: 1, phase: Some(Phase::Step) }, t0 + S * 1202);
        t.apply(Event::Heartbeat { rank: 0, step: 1, phase: Some(Phase::CheckpointSave) }, t0 + S * 1203);
        // Ten minutes into a save: within the 15-minute save budget.
        assert!(t.check(t0 + S * 1803).is_empty());
        t.apply(Event::Heartbeat { rank: 0, step: 2, phase: Some(Phase::Step) }, t0 + S * 1803);
        t.apply(Event::Heartbeat { rank: 0, step: 3, phase: Some(Phase::Step) }, t0 + S * 1805);
        // Median is 2 s (the save did not count): budget = floor 60 s.
        assert!(t.check(t0 + S * 1864).is_empty());
        assert_eq!(t.check(t0 + S * 1866).len(), 1);
        // And a save that overruns its budget is reported.
        t.apply(Event::Heartbeat { rank: 0, step: 3, phase: Some(Phase::CheckpointSave) }, t0 + S * 2000);
        assert!(t.check(t0 + S * 2899).is_empty());
        let f = t.check(t0 + S * 2901);
        assert!(f[0].evidence.contains("checkpoint-save"), "{}", f[0].evidence);
    }

    #[tokio::test(start_paused = true)]
    async fn init_budget_covers_the_first_step_and_detach_forgets() {
        let mut t = Tracker::new(budgets());
        let t0 = Instant::now();
        t.apply(Event::Attached { rank: 2, gpu: Some(5) }, t0);
        assert!(t.check(t0 + S * 599).is_empty());
        let f = t.check(t0 + S * 601);
        assert_eq!((f[0].rank, f[0].gpu), (Some(2), Some(5)));
        t.apply(Event::Detached { rank: 2 }, t0 + S * 602);
        assert!(t.check(t0 + S * 5000).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_heartbeats_without_a_new_step_are_not_progress() {
        let mut t = Tracker::new(budgets());
        let t0 = Instant::now();
        t.apply(Event::Heartbeat { rank: 0, step: 0, phase: Some(Phase::Step) }, t0);
        t.apply(Event::Heartbeat { rank: 0, step: 1, phase: Some(Phase::Step) }, t0 + S);
        for i in 2..200u32 {
            t.apply(Event::Heartbeat { rank: 0, step: 1, phase: Some(Phase::Step) }, t0 + S * i);
        }
        assert_eq!(t.check(t0 + S * 200).len(), 1);
    }
}
