//! How the coordinator handles a fault, by the faulty ranks' phase and the evidence: [`decide`].
//!
//! Pure, like [`state`](super::state): the policy on the agent picks an action from the finding
//! alone; the isolator knows what the faulty ranks were doing when it arrived, and a fault means
//! something else during start-up or a checkpoint than during a step. docs/ISOLATOR.md, "Handling
//! by phase", has the table.

use ckpt_core::Phase;

use super::state::{needs_isolation, needs_restore};
use crate::health::Action;

/// The rule of [`decide`] that applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// No phase rule: the policy's action, as before phases were known.
    Policy,
    /// A fault during `init` or `checkpoint-load` without hardware evidence: the job restarts and
    /// the node is not isolated (a hang or NCCL error while a job starts or loads is most often
    /// the job's or the network's, not the node's).
    StartWithoutHardware,
    /// A fault during `checkpoint-save`: the step being saved never commits, and the restore uses
    /// the last committed step.
    InterruptedSave,
}

/// What the coordinator does with one fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handling {
    /// The action taken in place of the one asked for (before the circuit breaker's say).
    pub action: Action,
    /// Whether the node is isolated.
    pub isolate: bool,
    /// Whether the job restarts (a coordinated restore).
    pub restart: bool,
    /// Whether a step the faulty ranks were saving may still commit (from the votes already in or
    /// the emergency snapshot).
    pub commit_interrupted: bool,
    /// The rule that decided.
    pub rule: Rule,
}

/// Decides how a fault is handled: `requested` is the policy's action, `phase` the faulty
/// ranks' phase (`None`: unknown, e.g. an agent that does not forward it), `hardware` whether the
/// fault's kind is a hardware class ([`super::repair::is_hardware_class`]).
pub fn decide(requested: Action, phase: Option<Phase>, hardware: bool) -> Handling {
    let starting = matches!(phase, Some(Phase::Init | Phase::CheckpointLoad));
    let (action, rule) = if starting && !hardware && needs_isolation(requested) {
        (Action::RestartJob, Rule::StartWithoutHardware)
    } else {
        (requested, Rule::Policy)
    };
    let restart = needs_restore(action);
    let saving = restart && phase == Some(Phase::CheckpointSave);
    Handling {
        action,
        isolate: needs_isolation(action),
        restart,
        commit_interrupted: !saving,
        rule: if saving { Rule::InterruptedSave } else { rule },
    }
}

/// The phase of a fault on `ranks`, from each rank's last known phase: `checkpoint-save` if any
/// rank was saving (its step must not commit), else `step` if any rank was stepping (the node was
/// doing real work), else the start-up phase of the first rank with one; `None` when no rank's
/// phase is known.
pub fn fault_phase(phases: impl IntoIterator<Item = Option<Phase>>) -> Option<Phase> {
    let known: Vec<Phase> = phases.into_iter().flatten().collect();
    [Phase::CheckpointSave, Phase::Step].into_iter().find(|p| known.contains(p)).or_else(|| known.first().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phase_rules() {
        use Action::*;
        use Phase::*;
        // (requested, phase, hardware) → (action, isolate, restart, commit_interrupted, rule)
        let rows = [
            (DrainNode, Some(Init), false, (RestartJob, false, true, true, Rule::StartWithoutHardware)),
            (RebootNode, Some(CheckpointLoad), false, (RestartJob, false, true, true, Rule::StartWithoutHardware)),
            (DrainNode, Some(Init), true, (DrainNode, true, true, true, Rule::Policy)),
            (RestartJob, Some(CheckpointLoad), false, (RestartJob, false, true, true, Rule::Policy)),
            (RestartJob, Some(CheckpointSave), false, (RestartJob, false, true, false, Rule::InterruptedSave)),
            (DrainNode, Some(CheckpointSave), true, (DrainNode, true, true, false, Rule::InterruptedSave)),
            (Ignore, Some(CheckpointSave), false, (Ignore, false, false, true, Rule::Policy)),
            (DrainNode, Some(Step), true, (DrainNode, true, true, true, Rule::Policy)),
            (DrainNode, Some(Step), false, (DrainNode, true, true, true, Rule::Policy)),
            (RestartJob, Some(Step), false, (RestartJob, false, true, true, Rule::Policy)),
            (DrainNode, None, false, (DrainNode, true, true, true, Rule::Policy)),
        ];
        for (requested, phase, hardware, (action, isolate, restart, commit_interrupted, rule)) in rows {
            let want = Handling { action, isolate, restart, commit_interrupted, rule };
            assert_eq!(decide(requested, phase, hardware), want, "{requested:?} in {phase:?}, hardware {hardware}");
        }
    }

    #[test]
    fn saving_wins_then_stepping_then_starting() {
        use Phase::*;
        assert_eq!(fault_phase([None, None]), None);
        assert_eq!(fault_phase([Some(Step), Some(CheckpointSave)]), Some(CheckpointSave));
        assert_eq!(fault_phase([Some(Init), None, Some(Step)]), Some(Step));
        assert_eq!(fault_phase([None, Some(CheckpointLoad), Some(Init)]), Some(CheckpointLoad));
    }
}
