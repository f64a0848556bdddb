//! `ckptctl snapshot`, `agent-status`, `health` and `inject`: talk to a running agent over its
//! socket.
//!
//! `snapshot` is the manual trigger of the path the isolator drives: the agent asks each attached
//! trainer for a snapshot, the trainer takes it at its next safe point (`heartbeat`, `save`, or a
//! background thread outside the optimizer step), and the command reports which step each rank
//! handed over.

use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use ckptd_proto::v1 as pb;

use super::{AgentStatusArgs, EXIT_FAILURE, EXIT_OK, InjectArgs, SnapshotArgs};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start a runtime")
}

fn admin(
    rt: &tokio::runtime::Runtime,
    socket: &std::path::Path,
) -> anyhow::Result<pb::admin_client::AdminClient<tonic::transport::Channel>> {
    let ch = rt.block_on(crate::rpc::unix_channel(socket))?;
    Ok(pb::admin_client::AdminClient::new(ch))
}

/// Runs `ckptctl snapshot`; exits [`EXIT_FAILURE`] when a rank did not take it in time.
pub fn run(a: &SnapshotArgs, out: &mut dyn Write) -> anyhow::Result<u8> {
    let rt = runtime()?;
    let mut c = admin(&rt, &a.socket)?;
    let timeout: Duration = a.timeout.into();
    let req = pb::SnapshotNowRequest {
        rank: a.rank,
        reason: a.reason.clone(),
        timeout_ms: timeout.as_millis().min(u128::from(u64::MAX)) as u64,
    };
    let reply =
        rt.block_on(c.snapshot_now(req)).map_err(|s| crate::rpc::from_status(&a.socket, "snapshot", s))?.into_inner();
    let all_taken = reply.ranks.iter().all(|r| r.taken);
    if a.json {
        let ranks: Vec<_> = reply
            .ranks
            .iter()
            .map(|r| serde_json::json!({"rank": r.rank, "request": r.request, "taken": r.taken, "step": r.taken.then_some(r.step)}))
            .collect();
        writeln!(out, "{}", serde_json::json!({ "ranks": ranks }))?;
    } else {
        for r in &reply.ranks {
            if r.taken {
                writeln!(out, "rank {}: snapshot of step {} handed to the agent", r.rank, r.step)?;
            } else {
                writeln!(
                    out,
                    "rank {}: no snapshot within {} (request {})",
                    r.rank,
                    humantime::format_duration(timeout),
                    r.request
                )?;
            }
        }
    }
    Ok(if all_taken { EXIT_OK } else { EXIT_FAILURE })
}

/// Runs `ckptctl agent-status`.
pub fn status(a: &AgentStatusArgs, out: &mut dyn Write) -> anyhow::Result<u8> {
    let rt = runtime()?;
    let mut c = admin(&rt, &a.socket)?;
    let st = rt
        .block_on(c.status(pb::StatusRequest {}))
        .map_err(|s| crate::rpc::from_status(&a.socket, "status", s))?
        .into_inner();
    if a.json {
        let ranks: Vec<_> = st
            .ranks
            .iter()
            .map(|r| {
                serde_json::json!({
                    "rank": r.rank,
                    "attached": r.attached,
                    "arena": r.arena_path,
                    "memory_tier_step": r.has_memory_tier.then_some(r.memory_tier_step),
                    "last_durable_step": r.has_durable.then_some(r.last_durable_step),
                    "queued": r.queued,
                    "last_heartbeat_step": r.last_heartbeat_step,
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::json!({"job": st.job, "store": st.store, "ranks": ranks}))?;
        return Ok(EXIT_OK);
    }
    writeln!(out, "job {} on {}", st.job, st.store)?;
    writeln!(out, "{:>5}  {:>8}  {:>12}  {:>12}  {:>6}", "rank", "attached", "memory tier", "last durable", "queued")?;
    let opt = |has: bool, v: u64| if has { v.to_string() } else { "-".into() };
    for r in &st.ranks {
        writeln!(
            out,
            "{:>5}  {:>8}  {:>12}  {:>12}  {:>6}",
            r.rank,
            if r.attached { "yes" } else { "no" },
            opt(r.has_memory_tier, r.memory_tier_step),
            opt(r.has_durable, r.last_durable_step),
            r.queued
        )?;
    }
    Ok(EXIT_OK)
}

/// Runs `ckptctl health`: every reporter (enabled or disabled and why, last sample) and the
/// active faults.
pub fn health(a: &AgentStatusArgs, out: &mut dyn Write) -> anyhow::Result<u8> {
    let rt = runtime()?;
    let mut c = admin(&rt, &a.socket)?;
    let reply = rt
        .block_on(c.health(pb::HealthRequest {}))
        .map_err(|s| crate::rpc::from_status(&a.socket, "health", s))?
        .into_inner();
    if a.json {
        writeln!(out, "{}", reply.json)?;
    } else {
        write!(out, "{}", reply.text)?;
        if !reply.text.ends_with('\n') {
            writeln!(out)?;
        }
    }
    Ok(EXIT_OK)
}

/// Runs `ckptctl inject`.
pub fn inject(a: &InjectArgs, out: &mut dyn Write) -> anyhow::Result<u8> {
    use pb::inject_request::Fault;
    let fault = match (a.xid, a.hang, &a.ib_down) {
        (Some(xid), _, _) => Fault::Xid(pb::XidDrill { xid, gpu: a.gpu }),
        (None, true, _) => Fault::Hang(pb::HangDrill { rank: a.rank }),
        (None, false, Some(port)) => Fault::IbDown(pb::IbDownDrill { port: port.clone() }),
        (None, false, None) => anyhow::bail!("say which fault: --xid N, --hang or --ib-down PORT"),
    };
    let rt = runtime()?;
    let mut c = admin(&rt, &a.socket)?;
    rt.block_on(c.inject(pb::InjectRequest { fault: Some(fault) }))
        .map_err(|s| crate::rpc::from_status(&a.socket, "inject", s))?;
    writeln!(out, "fault injected; see `ckptctl health` and the agent's log for the decision")?;
    Ok(EXIT_OK)
}
