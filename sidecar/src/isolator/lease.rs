//! Leader election through a `coordination.k8s.io/v1` Lease, so that two isolator replicas never
//! act at once: only the holder answers agents and touches nodes.
//!
//! The algorithm is client-go's: the holder renews `renewTime` every `retry` period; another
//! replica takes the Lease over only after it has seen the same record unchanged for a whole
//! `duration` on its own monotonic clock (so clock skew between replicas does not matter). A holder
//! that cannot renew for `duration` steps down. On shutdown the holder clears `holderIdentity` so a
//! successor need not wait.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::kube::{is_not_found, kube_err};
use crate::Result;

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica's identity (`holderIdentity`).
    pub identity: String,
    /// How long a record must stay unchanged before another replica takes over.
    pub duration: Duration,
    /// How often the holder renews and the others look.
    pub retry: Duration,
}

fn micro_now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// What a replica last saw of the Lease.
#[derive(Debug, PartialEq)]
struct Seen {
    holder: String,
    renew: String,
    transitions: i32,
}

/// Runs the election until `cancel`, publishing whether this replica leads on `leader` and the
/// current holder on `holder`.
pub async fn run(
    client: Client,
    cfg: LeaseConfig,
    leader: watch::Sender<bool>,
    holder: watch::Sender<String>,
    cancel: CancellationToken,
) {
    let api = Api::<Lease>::namespaced(client, &cfg.namespace);
    let mut seen: Option<(Seen, Instant)> = None;
    let mut last_renew: Option<Instant> = None;
    loop {
        match step(&api, &cfg, &mut seen).await {
            Ok((leads, who)) => {
                if leads {
                    last_renew = Some(Instant::now());
                }
                leader.send_if_modified(|l| std::mem::replace(l, leads) != leads);
                holder.send_if_modified(|h| std::mem::replace(h, who.clone()) != who);
            }
            Err(e) => {
                tracing::warn!(error = %e, lease = %cfg.name, "lease election call failed");
                if *leader.borrow() && last_renew.is_none_or(|t| t.elapsed() >= cfg.duration) {
                    tracing::error!(lease = %cfg.name, "cannot renew the lease: stepping down");
                    leader.send_replace(false);
                }
            }
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(cfg.retry) => {}
        }
    }
    if *leader.borrow() {
        let patch = json!({ "spec": { "holderIdentity": null } });
        if let Err(e) = api.patch(&cfg.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            tracing::warn!(error = %e, "cannot release the lease on shutdown; a successor waits for it to expire");
        }
        leader.send_replace(false);
    }
}

/// One round: returns whether we lead and who holds the Lease.
async fn step(api: &Api<Lease>, cfg: &LeaseConfig, seen: &mut Option<(Seen, Instant)>) -> Result<(bool, String)> {
    let object = format!("lease/{}/{}", cfg.namespace, cfg.name);
    let secs = i32::try_from(cfg.duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let found = match api.get(&cfg.name).await {
        Ok(l) => Some(l),
        Err(e) if is_not_found(&e) => None,
        Err(e) => return Err(kube_err("get", &object, e)),
    };
    let Some(lease) = found else {
        let now = micro_now();
        let lease: Lease = serde_json::from_value(json!({
            "metadata": { "name": cfg.name, "namespace": cfg.namespace },
            "spec": { "holderIdentity": cfg.identity, "leaseDurationSeconds": secs,
                      "acquireTime": now, "renewTime": now, "leaseTransitions": 0 },
        }))
        .map_err(|e| crate::Error::Runtime { what: "build the Lease object", reason: e.to_string() })?;
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => {
                tracing::info!(identity = %cfg.identity, lease = %cfg.name, "acquired the lease");
                Ok((true, cfg.identity.clone()))
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok((false, String::new())),
            Err(e) => Err(kube_err("create", &object, e)),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let current = Seen {
        holder: spec.holder_identity.clone().unwrap_or_default(),
        renew: spec.renew_time.as_ref().and_then(|t| serde_json::to_string(t).ok()).unwrap_or_default(),
        transitions: spec.lease_transitions.unwrap_or(0),
    };
    let version = lease.metadata.resource_version.clone();
    if current.holder == cfg.identity {
        let mut patch = json!({ "spec": { "renewTime": micro_now(), "leaseDurationSeconds": secs } });
        if let Some(v) = &version {
            patch["metadata"] = json!({ "resourceVersion": v });
        }
        api.patch(&cfg.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| kube_err("renew", &object, e))?;
        *seen = None;
        return Ok((true, cfg.identity.clone()));
    }
    let now = Instant::now();
    let expired = match seen {
        Some((s, since)) if *s == current => now.duration_since(*since) >= cfg.duration,
        _ => {
            *seen = Some((current, now));
            false
        }
    };
    let holder = seen.as_ref().map(|(s, _)| s.holder.clone()).unwrap_or_default();
    if !(expired || holder.is_empty()) {
        return Ok((false, holder));
    }
    let transitions = seen.as_ref().map(|(s, _)| s.transitions).unwrap_or(0).saturating_add(1);
    let t = micro_now();
    let mut patch = json!({ "spec": {
        "holderIdentity": cfg.identity, "leaseDurationSeconds": secs,
        "acquireTime": t, "renewTime": t, "leaseTransitions": transitions,
    }});
    if let Some(v) = &version {
        patch["metadata"] = json!({ "resourceVersion": v });
    }
    match api.patch(&cfg.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => return Ok((false, holder)),
        Err(e) => return Err(kube_err("take over", &object, e)),
    }
    // Read back: of two replicas racing on a server without optimistic concurrency, only the
    // one whose write landed last sees itself.
    let after = api.get(&cfg.name).await.map_err(|e| kube_err("get", &object, e))?;
    let now_holder = after.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    let leads = now_holder == cfg.identity;
    if leads {
        tracing::warn!(identity = %cfg.identity, previous = %holder, lease = %cfg.name, "took over the lease");
        *seen = None;
    }
    Ok((leads, now_holder))
}
