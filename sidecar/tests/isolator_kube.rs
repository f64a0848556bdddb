//! The isolator against kmock, a stateful Kubernetes API emulator: node isolation (cordon, taint,
//! evidence, Events, pod deletion) and its idempotence, release, the circuit breaker and leader
//! election through a Lease with two isolator processes.
//!
//! Needs `pip install kmock` (see tests/support/kmock.rs for the skip rule).
#![cfg(feature = "server")]

#[path = "support/isolator_proc.rs"]
mod isolator_proc;
#[path = "support/kmock.rs"]
mod kmock;

use std::time::Duration;

use ckptd::ErrorKind;
use ckptd::isolator::link::{IsolatorLink, LinkCredentials};
use ckptd_proto::v1::{FaultAction, FaultReport};
use isolator_proc::{IsolatorProc, TOKEN, eventually, token_file};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kmock::{Kmock, POD_NAMESPACE, cordoned, events_about, job_on, taints};
use kube::Api;
use tempfile::TempDir;

const LIMIT: Duration = Duration::from_secs(30);

fn start(dir: &TempDir, km: &Kmock, name: &str, extra: &[&str]) -> IsolatorProc {
    let token = token_file(dir.path());
    let mut args = vec!["--token-file", token.to_str().unwrap(), "--kube-url", &km.url];
    args.extend_from_slice(extra);
    IsolatorProc::spawn(dir.path(), name, &args)
}

fn xid(i: u32) -> FaultReport {
    FaultReport {
        ranks: vec![0],
        node: format!("node-{i}"),
        pod: format!("train-{i}"),
        source: "nvml".into(),
        kind: "xid-79".into(),
        action: FaultAction::DrainNode as i32,
        evidence: "NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus".into(),
        gpu: Some(2),
        ..Default::default()
    }
}

/// Whether the object exists (404 by code: kmock spells the reason differently from Kubernetes).
async fn exists<K>(api: &Api<K>, name: &str) -> bool
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.get(name).await {
        Ok(_) => true,
        Err(kube::Error::Api(s)) if s.code == 404 => false,
        Err(e) => panic!("get {name}: {e}"),
    }
}

#[tokio::test]
async fn drain_node_fault_isolates_idempotently_and_release_undoes_it() {
    let Some(km) = Kmock::start(4) else { return };
    let dir = TempDir::new().unwrap();
    let iso = start(&dir, &km, "isolator", &["--max-isolated", "3", "--max-isolated-fraction", "1"]);
    let link = job_on(&iso, &dir, "job", 2).await.unwrap();
    let ack = link.report_fault(xid(2)).await.unwrap();
    assert_eq!(ack.action, FaultAction::DrainNode as i32, "{}", ack.note);

    let client = km.client();
    let nodes = Api::<Node>::all(client.clone());
    let node = nodes.get("node-2").await.unwrap();
    assert!(cordoned(&node));
    assert_eq!(taints(&node), vec![("ckptd.io/unhealthy".into(), Some("xid-79".into()), "NoSchedule".into())]);
    let ann = node.metadata.annotations.clone().unwrap_or_default();
    assert!(ann.get("ckptd.io/isolation").is_some_and(|e| e.contains("fallen off the bus")), "{ann:?}");
    assert_eq!(events_about(&client, "default", "node-2").await.len(), 1);
    assert_eq!(events_about(&client, POD_NAMESPACE, "train-2").await.len(), 1);
    let pods = Api::<Pod>::namespaced(client.clone(), POD_NAMESPACE);
    assert!(!exists(&pods, "train-2").await, "the pod was deleted");
    assert!(exists(&pods, "train-1").await, "other pods stay");
    for other in ["node-0", "node-1", "node-3"] {
        assert!(!cordoned(&nodes.get(other).await.unwrap()), "{other}");
    }
    let (_, body) = iso.http_get("/metrics");
    assert!(body.contains("ckptd_isolator_isolated_nodes 1"), "{body}");

    // The same fault again (a second reporter, a retry): nothing more happens.
    let again = link.report_fault(xid(2)).await;
    if let Err(e) = &again {
        // The restore may already have moved the job to generation 1.
        assert_eq!(e.kind(), ErrorKind::Stale, "{e}");
    }
    let node = nodes.get("node-2").await.unwrap();
    assert_eq!(taints(&node).len(), 1);
    assert_eq!(events_about(&client, "default", "node-2").await.len(), 1);

    // Release through the real `ckptctl release`, which goes through the isolator.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ckptctl"))
        .args(["release", "node-2", "--isolator", &iso.url(), "--token-file"])
        .arg(dir.path().join("token"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "released node node-2");
    let node = nodes.get("node-2").await.unwrap();
    assert!(!cordoned(&node));
    assert!(taints(&node).is_empty());
    let ann = node.metadata.annotations.clone().unwrap_or_default();
    assert!(!ann.contains_key("ckptd.io/isolation") && !ann.contains_key("ckptd.io/cordoned-by-isolator"), "{ann:?}");
    assert!(!link.release("node-2").await.unwrap(), "a second release finds nothing to undo");
    let jobs = link.list_jobs().await.unwrap();
    assert!(jobs[0].isolated_nodes.is_empty());
}

#[tokio::test]
async fn release_keeps_an_operator_cordon() {
    let Some(km) = Kmock::start(2) else { return };
    let dir = TempDir::new().unwrap();
    let client = km.client();
    let nodes = Api::<Node>::all(client.clone());
    let cordon = serde_json::json!({ "spec": { "unschedulable": true } });
    nodes.patch("node-1", &Default::default(), &kube::api::Patch::Merge(&cordon)).await.unwrap();
    let iso = start(&dir, &km, "isolator", &["--max-isolated-fraction", "1", "--taint-effect", "NoExecute"]);
    let link = job_on(&iso, &dir, "job", 1).await.unwrap();
    link.report_fault(xid(1)).await.unwrap();
    assert_eq!(taints(&nodes.get("node-1").await.unwrap())[0].2, "NoExecute");
    assert!(link.release("node-1").await.unwrap());
    let node = nodes.get("node-1").await.unwrap();
    assert!(taints(&node).is_empty());
    assert!(cordoned(&node), "the operator's cordon stays");
}

#[tokio::test]
async fn past_the_circuit_breaker_limit_the_isolator_only_alerts() {
    let Some(km) = Kmock::start(4) else { return };
    let dir = TempDir::new().unwrap();
    let iso = start(&dir, &km, "isolator", &["--max-isolated", "2", "--max-isolated-fraction", "1"]);
    let client = km.client();
    let nodes = Api::<Node>::all(client.clone());
    for i in 0..3u32 {
        let link = job_on(&iso, &dir, &format!("job-{i}"), i).await.unwrap();
        let ack = link.report_fault(xid(i)).await.unwrap();
        let node = nodes.get(&format!("node-{i}")).await.unwrap();
        if i < 2 {
            assert_eq!(ack.action, FaultAction::DrainNode as i32, "{}", ack.note);
            assert!(cordoned(&node));
        } else {
            assert_eq!(ack.action, FaultAction::RestartJob as i32, "downgraded: {}", ack.note);
            assert!(ack.note.contains("circuit breaker"), "{}", ack.note);
            assert!(!cordoned(&node), "the third node is not isolated");
            assert!(taints(&node).is_empty());
            let ev = events_about(&client, "default", "node-2").await;
            assert!(ev.iter().any(|e| e.reason.as_deref() == Some("IsolationRefused")), "{ev:?}");
            let pods = Api::<Pod>::namespaced(client.clone(), POD_NAMESPACE);
            assert!(exists(&pods, "train-2").await, "its pod is not deleted");
        }
    }
    let (_, body) = iso.http_get("/metrics");
    assert!(body.contains("ckptd_isolator_circuit_open 1"), "{body}");
    assert!(body.contains("ckptd_isolator_isolated_nodes 2"), "{body}");
}

#[tokio::test]
async fn with_two_isolators_only_the_lease_holder_acts_and_the_other_takes_over() {
    let Some(km) = Kmock::start(4) else { return };
    let dir = TempDir::new().unwrap();
    let lease = [
        "--lease-name",
        "ckptd-isolator",
        "--lease-namespace",
        "ckptd",
        "--lease-duration",
        "2s",
        "--lease-retry",
        "200ms",
    ];
    let common = ["--max-isolated", "4", "--max-isolated-fraction", "1"];
    let mut a_args = vec!["--identity", "iso-a"];
    a_args.extend(lease);
    a_args.extend(common);
    let mut a = start(&dir, &km, "iso-a", &a_args);
    eventually("iso-a to lead", LIMIT, || async { (a.http_get("/readyz").0 == 200).then_some(()) }).await;
    let mut b_args = vec!["--identity", "iso-b"];
    b_args.extend(lease);
    b_args.extend(common);
    let b = start(&dir, &km, "iso-b", &b_args);
    // b runs and is healthy, but not ready, and refuses to act.
    assert_eq!(b.http_get("/healthz").0, 200);
    assert_eq!(b.http_get("/readyz").0, 503);
    // Once b has read the Lease, its refusal names the holder.
    let err = eventually("b to name the holder", LIMIT, || async {
        let err = job_on(&b, &dir, "job", 1).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotLeader, "{err}");
        err.to_string().contains("iso-a").then_some(err)
    })
    .await;
    assert!(err.to_string().contains("not the leader"), "{err}");

    let client = km.client();
    let nodes = Api::<Node>::all(client.clone());
    let leases = Api::<Lease>::namespaced(client.clone(), "ckptd");
    let holder = |l: Lease| l.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    assert_eq!(holder(leases.get("ckptd-isolator").await.unwrap()), "iso-a");
    let link = job_on(&a, &dir, "job", 1).await.unwrap();
    link.report_fault(xid(1)).await.unwrap();
    assert!(cordoned(&nodes.get("node-1").await.unwrap()));

    // The leader crashes (no clean release): b takes over once the record stops changing.
    a.kill();
    eventually("iso-b to take over", LIMIT, || async { (b.http_get("/readyz").0 == 200).then_some(()) }).await;
    assert_eq!(holder(leases.get("ckptd-isolator").await.unwrap()), "iso-b");
    let link = job_on(&b, &dir, "job-b", 3).await.unwrap();
    let ack = link.report_fault(xid(3)).await.unwrap();
    assert_eq!(ack.action, FaultAction::DrainNode as i32, "{}", ack.note);
    assert!(cordoned(&nodes.get("node-3").await.unwrap()));
}

#[tokio::test]
async fn a_straggler_gets_an_event_on_its_pod_and_is_not_isolated() {
    let Some(km) = Kmock::start(4) else { return };
    let dir = TempDir::new().unwrap();
    let iso = start(&dir, &km, "isolator", &["--straggler-window", "100ms", "--straggler-windows", "2"]);
    let store = format!("file://{}", dir.path().join("store").display());
    let mut links = Vec::new();
    for r in 0..4u32 {
        let l = IsolatorLink::connect(&iso.url(), LinkCredentials::token(TOKEN)).await.unwrap();
        l.register("job", &[r], 4, &format!("node-{r}"), &format!("train-{r}"), POD_NAMESPACE, &store).await.unwrap();
        l.heartbeat(r, 1, Duration::from_millis(if r == 1 { 900 } else { 100 })).await.unwrap();
        links.push(l);
    }
    let client = km.client();
    let ev = eventually("a Straggler event on train-1", LIMIT, || async {
        let ev = events_about(&client, POD_NAMESPACE, "train-1").await;
        ev.into_iter().find(|e| e.reason.as_deref() == Some("Straggler"))
    })
    .await;
    assert!(ev.message.unwrap_or_default().contains("rank 1"));
    assert!(!cordoned(&Api::<Node>::all(client.clone()).get("node-1").await.unwrap()));
    assert_eq!(links[0].list_jobs().await.unwrap()[0].stragglers, vec![1]);
}
