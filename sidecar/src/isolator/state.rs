//! The job state machine: Running → Degraded → Evacuating → Restoring → Running.
//!
//! Pure: [`JobState::on`] maps a state and an [`Event`] to the next state, and the coordinator
//! performs the side effects that go with each transition (isolate, snapshot-now, restore). Keeping
//! it free of I/O lets every transition be tested exhaustively here.

use crate::health::Action;

/// Where a job is in its fault-recovery cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobState {
    /// Every rank trains; steps commit globally.
    Running,
    /// A fault that needs a restore was reported; the faulty node is being isolated.
    Degraded,
    /// Healthy ranks were told to snapshot now; the isolator waits for them, with a bound.
    Evacuating,
    /// Every rank was told to restore the newest globally committed step at a new generation; the
    /// isolator waits for each rank to come back at that generation.
    Restoring,
}

/// Every state, for metrics that export one series per state.
pub const ALL_STATES: [JobState; 4] =
    [JobState::Running, JobState::Degraded, JobState::Evacuating, JobState::Restoring];

impl JobState {
    /// The name used in metrics, `ckptctl jobs` and the protocol's `JobStatus.state`.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Running => "Running",
            JobState::Degraded => "Degraded",
            JobState::Evacuating => "Evacuating",
            JobState::Restoring => "Restoring",
        }
    }

    /// The state after `event`, or `None` when the event does not apply in this state (the
    /// coordinator then ignores it).
    pub fn on(self, event: Event) -> Option<JobState> {
        use JobState::*;
        match (self, event) {
            (Running, Event::Fault(a)) => needs_restore(a).then_some(Degraded),
            // A second fault during a cycle is folded into it: its node is isolated too, and the
            // one restore that follows covers both.
            (Degraded | Evacuating, Event::Fault(_)) => None,
            // A fault while ranks restore starts a new cycle (the restore may never complete).
            (Restoring, Event::Fault(a)) => needs_restore(a).then_some(Degraded),
            (Degraded, Event::Isolated) => Some(Evacuating),
            (Evacuating, Event::SnapshotsSettled) => Some(Restoring),
            (Restoring, Event::AllRanksRestored) => Some(Running),
            _ => None,
        }
    }
}

/// What moves a job between states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An agent reported a fault with this action.
    Fault(Action),
    /// The faulty node is isolated, or needs no isolation, or the circuit breaker refused it.
    Isolated,
    /// Every healthy rank's emergency snapshot settled (committed or aborted) or the bound passed.
    SnapshotsSettled,
    /// Every rank is back at the new generation.
    AllRanksRestored,
}

/// Whether a fault action leads to a coordinated restore.
pub fn needs_restore(action: Action) -> bool {
    matches!(action, Action::RestartJob | Action::ResetGpu | Action::DrainNode | Action::RebootNode)
}

/// Whether a fault action isolates the node (cordon, taint, delete the pod) before the restore.
pub fn needs_isolation(action: Action) -> bool {
    matches!(action, Action::ResetGpu | Action::DrainNode | Action::RebootNode)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACTIONS: [Action; 5] = Action::ALL;

    #[test]
    fn full_cycle_returns_to_running() {
        let s = JobState::Running.on(Event::Fault(Action::DrainNode)).unwrap();
        assert_eq!(s, JobState::Degraded);
        let s = s.on(Event::Isolated).unwrap();
        assert_eq!(s, JobState::Evacuating);
        let s = s.on(Event::SnapshotsSettled).unwrap();
        assert_eq!(s, JobState::Restoring);
        assert_eq!(s.on(Event::AllRanksRestored), Some(JobState::Running));
    }

    #[test]
    fn only_restoring_actions_leave_running() {
        for a in ACTIONS {
            let next = JobState::Running.on(Event::Fault(a));
            assert_eq!(next.is_some(), needs_restore(a), "{a:?}");
        }
        assert!(!needs_restore(Action::Ignore));
        assert!(needs_isolation(Action::RebootNode));
        assert!(!needs_isolation(Action::RestartJob));
    }

    #[test]
    fn faults_fold_into_an_open_cycle_and_restart_a_restore() {
        for s in [JobState::Degraded, JobState::Evacuating] {
            for a in ACTIONS {
                assert_eq!(s.on(Event::Fault(a)), None);
            }
        }
        assert_eq!(JobState::Restoring.on(Event::Fault(Action::ResetGpu)), Some(JobState::Degraded));
        assert_eq!(JobState::Restoring.on(Event::Fault(Action::Ignore)), None);
    }

    #[test]
    fn out_of_order_events_are_ignored() {
        let events = [Event::Isolated, Event::SnapshotsSettled, Event::AllRanksRestored];
        let legal = [
            (JobState::Degraded, Event::Isolated),
            (JobState::Evacuating, Event::SnapshotsSettled),
            (JobState::Restoring, Event::AllRanksRestored),
        ];
        for s in ALL_STATES {
            for e in events {
                assert_eq!(s.on(e).is_some(), legal.contains(&(s, e)), "{s:?} on {e:?}");
            }
        }
    }
}
