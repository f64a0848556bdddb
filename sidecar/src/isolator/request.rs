//! The validated form of what agents send: a [`Registration`], a [`Heartbeat`], a [`Fault`], a
//! [`ShardVote`] and a [`Subscription`]. Each is built from its wire message by `TryFrom` (or
//! `From`, where every wire value is valid), which checks every field a peer controls in one place;
//! the coordinator only sees values that passed, and checks them against the job it knows.

use std::time::Duration;

use ckpt_core::Phase;
use ckptd_proto::v1::{CommandsRequest, DurableVote, FaultAction, FaultReport, RankHeartbeat, RegisterRequest};

use super::ballot::Vote;
use crate::health::Action;
use crate::layout::Layout;
use crate::{Error, Result};

/// Longest job, node, pod or namespace name accepted.
pub const MAX_NAME: usize = 253;
/// Most ranks one request may name.
pub const MAX_RANKS_PER_REQUEST: usize = 4096;
/// Highest step a vote may name (2^40, about 10^12): a job that saves every step for a century at
/// 300 steps per second stays below it. A higher step is a hostile or broken peer, and committing
/// it would make every later step of the job look old.
pub const MAX_STEP: u64 = 1 << 40;
/// Longest reporter name kept from a fault report.
const MAX_SOURCE: usize = 64;
/// Longest evidence kept from a fault report (it reaches a node annotation and an Event).
const MAX_EVIDENCE: usize = 4096;

fn invalid(what: &str, reason: String) -> Error {
    Error::InvalidRequest { what: what.into(), reason }
}

/// Checks a Kubernetes-ish name a peer sent: 1-253 printable characters (or empty when optional).
pub fn check_name(what: &str, v: &str, required: bool) -> Result<()> {
    if (required && v.is_empty()) || v.len() > MAX_NAME || v.chars().any(char::is_control) {
        return Err(invalid(what, format!("`{:.64}` must be 1-{MAX_NAME} printable characters", v)));
    }
    Ok(())
}

/// One rank of a job announcing itself and where its agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The job (a valid store path segment).
    pub job: String,
    /// The rank, below `world_size`.
    pub rank: u32,
    /// The job's world size, within the MANIFEST's limit.
    pub world_size: u32,
    /// The node the rank runs on.
    pub node: String,
    /// The pod, or empty when the agent does not know it.
    pub pod: String,
    /// The pod's namespace, or empty.
    pub namespace: String,
    /// The agent's version.
    pub agent_version: String,
    /// The store URL the agent writes to; empty when the isolator's `--store` is to be used.
    pub store: String,
    /// The restart generation the agent last learned (0 for a fresh pod).
    pub generation: u64,
    /// The job's parallel layout, when the pod declared one; its product is `world_size`.
    pub parallel: Option<Layout>,
}

impl TryFrom<&RegisterRequest> for Registration {
    type Error = Error;

    fn try_from(r: &RegisterRequest) -> Result<Registration> {
        ckpt_core::store::layout::validate_job(&r.job).map_err(|e| invalid("job", e.to_string()))?;
        let max = ckpt_core::manifest::MAX_WORLD_SIZE;
        if r.world_size == 0 || r.world_size > max {
            return Err(invalid("world_size", format!("{} is outside 1..={max}", r.world_size)));
        }
        if r.rank >= r.world_size {
            return Err(invalid("rank", format!("rank {} is not below the world size {}", r.rank, r.world_size)));
        }
        check_name("node", &r.node, true)?;
        check_name("pod", &r.pod, false)?;
        check_name("namespace", &r.namespace, false)?;
        let parallel = match &r.parallel {
            None => None,
            Some(p) => {
                let l = Layout::try_from(p).map_err(|e| invalid("parallel", e))?;
                if let Some(why) = l.mismatch(u64::from(r.world_size)) {
                    return Err(invalid("parallel", why));
                }
                Some(l)
            }
        };
        Ok(Registration {
            job: r.job.clone(),
            rank: r.rank,
            world_size: r.world_size,
            node: r.node.clone(),
            pod: r.pod.clone(),
            namespace: r.namespace.clone(),
            agent_version: r.agent_version.chars().take(MAX_NAME).collect(),
            store: r.store.clone(),
            generation: r.generation,
            parallel,
        })
    }
}

/// A fault an agent's health controller decided on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// The job (checked against the registered jobs by the coordinator).
    pub job: String,
    /// Ranks on the faulty node, or the one faulty rank.
    pub ranks: Vec<u32>,
    /// The generation the agent is at.
    pub generation: u64,
    /// The node; never empty when `action` isolates it.
    pub node: String,
    /// The reporting pod, or empty.
    pub pod: String,
    /// The reporter that saw it (`nvml`, `kmsg`, ...), at most 64 characters.
    pub source: String,
    /// The finding's kind (`xid-79`, `hang`).
    pub kind: String,
    /// What the agent's policy asks for.
    pub action: Action,
    /// The line or counter that proves it, at most 4096 characters.
    pub evidence: String,
    /// The faulty ranks' phase when the agent reported it; `None` from an agent that does not say
    /// (or a name this isolator does not know), and for alerts.
    pub phase: Option<Phase>,
}

impl TryFrom<&FaultReport> for Fault {
    type Error = Error;

    fn try_from(f: &FaultReport) -> Result<Fault> {
        let action = FaultAction::try_from(f.action).ok().and_then(|a| Action::try_from(a).ok()).ok_or_else(|| {
            invalid("fault action", format!("{} is not a FaultAction other than unspecified", f.action))
        })?;
        check_name("node", &f.node, super::state::needs_isolation(action))?;
        check_name("pod", &f.pod, false)?;
        if f.ranks.len() > MAX_RANKS_PER_REQUEST {
            return Err(invalid("ranks", format!("{} ranks in one report", f.ranks.len())));
        }
        Ok(Fault {
            job: f.job.clone(),
            ranks: f.ranks.clone(),
            generation: f.generation,
            node: f.node.clone(),
            pod: f.pod.clone(),
            source: f.source.chars().take(MAX_SOURCE).collect(),
            kind: f.kind.clone(),
            action,
            evidence: f.evidence.chars().take(MAX_EVIDENCE).collect(),
            phase: f.phase.parse().ok(),
        })
    }
}

/// A rank's progress report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// The job.
    pub job: String,
    /// The rank.
    pub rank: u32,
    /// The generation the agent is at.
    pub generation: u64,
    /// The rank's step.
    pub step: u64,
    /// How long its last step took.
    pub step_time: Duration,
    /// The rank's phase; `None` from an agent that does not forward it, or for a name this
    /// isolator does not know (a newer agent's phase is not a reason to refuse its heartbeat).
    pub phase: Option<Phase>,
}

impl From<&RankHeartbeat> for Heartbeat {
    fn from(h: &RankHeartbeat) -> Heartbeat {
        Heartbeat {
            job: h.job.clone(),
            rank: h.rank,
            generation: h.generation,
            step: h.step,
            step_time: Duration::from_millis(h.step_time_ms),
            phase: h.phase.parse().ok(),
        }
    }
}

/// One rank's vote that its shard of a step is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardVote {
    /// The job.
    pub job: String,
    /// The step, at most [`MAX_STEP`].
    pub step: u64,
    /// The world size the rank wrote its shard for.
    pub world_size: u32,
    /// The generation the agent is at.
    pub generation: u64,
    /// The validated vote (rank, shard entry, metadata).
    pub vote: Vote,
}

impl TryFrom<&DurableVote> for ShardVote {
    type Error = Error;

    fn try_from(v: &DurableVote) -> Result<ShardVote> {
        if v.step > MAX_STEP {
            return Err(invalid("vote step", format!("{} is above {MAX_STEP}", v.step)));
        }
        Ok(ShardVote {
            job: v.job.clone(),
            step: v.step,
            world_size: v.world_size,
            generation: v.generation,
            vote: Vote::try_from(v)?,
        })
    }
}

/// An agent asking for the commands of its ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The job.
    pub job: String,
    /// The agent's ranks: 1 to [`MAX_RANKS_PER_REQUEST`].
    pub ranks: Vec<u32>,
    /// The generation the agent is at (a lower one first gets the pending restore).
    pub generation: u64,
}

impl TryFrom<&CommandsRequest> for Subscription {
    type Error = Error;

    fn try_from(r: &CommandsRequest) -> Result<Subscription> {
        if r.ranks.is_empty() || r.ranks.len() > MAX_RANKS_PER_REQUEST {
            return Err(invalid("ranks", format!("{} ranks: name 1-{MAX_RANKS_PER_REQUEST}", r.ranks.len())));
        }
        Ok(Subscription { job: r.job.clone(), ranks: r.ranks.clone(), generation: r.generation })
    }
}

#[cfg(test)]
mod tests {
    use ckptd_proto::v1::ParallelLayout;

    use super::*;

    fn registration() -> RegisterRequest {
        RegisterRequest { job: "job".into(), rank: 1, world_size: 2, node: "n".into(), ..Default::default() }
    }

    #[test]
    fn a_registration_is_checked_field_by_field() {
        assert_eq!(Registration::try_from(&registration()).unwrap().rank, 1);
        assert_eq!(Registration::try_from(&registration()).unwrap().parallel, None);
        let declared = RegisterRequest { parallel: Some(ParallelLayout { dp: 1, tp: 2, pp: 1 }), ..registration() };
        assert_eq!(Registration::try_from(&declared).unwrap().parallel, Some(Layout { dp: 1, tp: 2, pp: 1 }));
        let bad = [
            RegisterRequest { job: "../etc".into(), ..registration() },
            RegisterRequest { job: String::new(), ..registration() },
            RegisterRequest { world_size: 0, ..registration() },
            RegisterRequest { world_size: u32::MAX, ..registration() },
            RegisterRequest { rank: 2, ..registration() },
            RegisterRequest { node: String::new(), ..registration() },
            RegisterRequest { pod: "a\nb".into(), ..registration() },
            RegisterRequest { namespace: "x".repeat(MAX_NAME + 1), ..registration() },
            RegisterRequest { parallel: Some(ParallelLayout { dp: 2, tp: 2, pp: 1 }), ..registration() },
            RegisterRequest { parallel: Some(ParallelLayout { dp: 0, tp: 2, pp: 1 }), ..registration() },
        ];
        for r in bad {
            let e = Registration::try_from(&r).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidRequest, "{r:?}: {e}");
        }
    }

    #[test]
    fn a_fault_needs_a_known_action_and_a_node_when_it_isolates() {
        let report = |action: FaultAction, node: &str| FaultReport {
            job: "job".into(),
            node: node.into(),
            action: action as i32,
            evidence: "x".repeat(10_000),
            ..Default::default()
        };
        let f = Fault::try_from(&report(FaultAction::DrainNode, "n")).unwrap();
        assert_eq!((f.action, f.evidence.len()), (Action::DrainNode, MAX_EVIDENCE));
        assert_eq!(Fault::try_from(&report(FaultAction::RestartJob, "")).unwrap().action, Action::RestartJob);
        for bad in [
            report(FaultAction::DrainNode, ""),
            report(FaultAction::Unspecified, "n"),
            FaultReport { action: 42, ..report(FaultAction::Ignore, "n") },
            FaultReport { ranks: vec![0; MAX_RANKS_PER_REQUEST + 1], ..report(FaultAction::Ignore, "n") },
        ] {
            assert_eq!(Fault::try_from(&bad).unwrap_err().kind(), crate::ErrorKind::InvalidRequest);
        }
    }

    #[test]
    fn a_heartbeat_phase_is_known_or_none() {
        let hb = |phase: &str| RankHeartbeat { job: "job".into(), phase: phase.into(), ..Default::default() };
        assert_eq!(Heartbeat::from(&hb("checkpoint-save")).phase, Some(Phase::CheckpointSave));
        assert_eq!(Heartbeat::from(&hb("init")).phase, Some(Phase::Init));
        for unknown in ["", "warmup", "Step"] {
            assert_eq!(Heartbeat::from(&hb(unknown)).phase, None, "{unknown:?}");
        }
    }

    #[test]
    fn a_vote_names_a_step_up_to_the_bound() {
        let vote = |step: u64| DurableVote {
            job: "job".into(),
            step,
            shard_key: ckpt_core::store::layout::shard_name(0),
            shard_len: 10,
            ..Default::default()
        };
        assert_eq!(ShardVote::try_from(&vote(MAX_STEP)).unwrap().step, MAX_STEP);
        for step in [MAX_STEP + 1, u64::MAX] {
            assert_eq!(ShardVote::try_from(&vote(step)).unwrap_err().kind(), crate::ErrorKind::InvalidRequest);
        }
    }

    #[test]
    fn a_subscription_names_one_to_the_most_ranks() {
        let req = |n: usize| CommandsRequest { job: "job".into(), ranks: vec![0; n], generation: 0 };
        assert!(Subscription::try_from(&req(1)).is_ok());
        for n in [0, MAX_RANKS_PER_REQUEST + 1] {
            assert_eq!(Subscription::try_from(&req(n)).unwrap_err().kind(), crate::ErrorKind::InvalidRequest);
        }
    }
}
