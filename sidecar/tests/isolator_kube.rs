//! The isolator against kmock, a stateful Kubernetes API emulator: node isolation (cordon, taint,
//! evidence, Events, pod deletion) and its idempotence, release, the circuit breaker, leader
//! election through a Lease with two isolator processes, and an emergency snapshot that a
//! faulty rank's data-parallel replica completes.
//!
//! Needs `pip install kmock` (see tests/support/kmock.rs for the skip rule).
#![cfg(feature = "server")]

#[path = "support/isolator_proc.rs"]
mod isolator_proc;
#[path = "support/kmock.rs"]
mod kmock;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use ckpt_core::{DType, Engine, EngineConfig, Manifest, Snapshot, TensorMeta, TensorTable};
use ckptd::ErrorKind;
use ckptd::isolator::link::{IsolatorLink, LinkCredentials};
use ckptd::layout::Layout;
use ckptd_proto::v1::{FaultAction, FaultReport, command};
use isolator_proc::{IsolatorProc, TOKEN, ckptctl_faults, eventually, token_file};
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

/// The training state at `step`: data-parallel replicas hold the same bytes.
fn replica_state(step: u64) -> Snapshot {
    let metas =
        vec![TensorMeta::new("w", DType::F32, vec![256]).unwrap(), TensorMeta::new("b", DType::U8, vec![3]).unwrap()];
    let table = TensorTable::packed(metas, 64).unwrap();
    let data: Vec<u8> = (0..table.total_len()).map(|i| (i as u8).wrapping_mul(31) ^ (step as u8)).collect();
    Snapshot { table, data: Bytes::from(data), metadata: br#"{"step":"replica"}"#.to_vec() }
}

/// A dp=2 job (two replicas of the model, `ckptd.io/parallel: dp=2`): rank 1's node fails during
/// a step, rank 0 takes the emergency snapshot, and the step commits with rank 1's entry naming
/// rank 0's shard; every rank restores it, and rank 1 loads rank 0's state from it. Under the
/// rule that every rank must vote, the step would not commit and the restore would name step 1.
#[tokio::test]
async fn a_data_parallel_replica_completes_the_faulty_ranks_emergency_snapshot() {
    let Some(km) = Kmock::start(2) else { return };
    let dir = TempDir::new().unwrap();
    let iso = start(&dir, &km, "isolator", &["--max-isolated", "2", "--max-isolated-fraction", "1"]);
    let store = format!("file://{}", dir.path().join("store").display());
    let dp2 = Layout::new(2, 1, 1);
    let mut links = Vec::new();
    for rank in 0..2u32 {
        let l = IsolatorLink::connect(&iso.url(), LinkCredentials::token(TOKEN)).await.unwrap().with_parallel(dp2);
        l.register("job", &[rank], 2, &format!("node-{rank}"), &format!("train-{rank}"), POD_NAMESPACE, &store)
            .await
            .unwrap();
        links.push(l);
    }
    let mut streams: Vec<_> = links.iter().map(IsolatorLink::commands).collect();
    eventually("both agents to subscribe", LIMIT, || async {
        let jobs = links[0].list_jobs().await.unwrap();
        (jobs[0].connected_agents == 2).then_some(())
    })
    .await;
    assert_eq!(links[0].list_jobs().await.unwrap()[0].parallel, dp2.map(Into::into));
    let write = |step: u64, rank: u32| {
        let store = store.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let engine = Engine::open(&store, EngineConfig::default()).unwrap();
                engine.write_shard("job", step, rank, 2, &replica_state(step)).unwrap()
            })
            .await
            .unwrap()
        }
    };
    // Step 1 is saved by both ranks and commits.
    for (rank, l) in links.iter().enumerate() {
        let shard = write(1, rank as u32).await;
        assert_eq!(l.vote_durable(&shard, &BTreeMap::new()).await.unwrap(), rank == 1);
    }

    // Rank 1's GPU falls off the bus during step 2.
    let fault = FaultReport { ranks: vec![1], ..xid(1) };
    let ack = links[1].report_fault(fault).await.unwrap();
    assert_eq!(ack.action, FaultAction::DrainNode as i32, "{}", ack.note);
    let next = |rx: &mut tokio::sync::mpsc::Receiver<ckptd_proto::v1::Command>| {
        let cmd = rx.try_recv();
        cmd.ok().and_then(|c| c.command)
    };
    let asked = eventually("rank 0 to be asked for an emergency snapshot", LIMIT, || {
        let got = next(&mut streams[0]);
        async move { got }
    })
    .await;
    assert!(matches!(asked, command::Command::SnapshotNow(_)), "{asked:?}");
    let stop = eventually("rank 1 to be stopped", LIMIT, || {
        let got = next(&mut streams[1]);
        async move { got }
    })
    .await;
    assert!(matches!(stop, command::Command::Stop(_)), "{stop:?}");
    // Rank 0's emergency snapshot of step 2 completes the step: rank 1 is faulty and rank 0
    // holds its state.
    let shard = write(2, 0).await;
    assert!(links[0].vote_durable(&shard, &BTreeMap::new()).await.unwrap(), "the replica completes step 2");

    for (rank, rx) in streams.iter_mut().enumerate() {
        let restore = eventually("the restore", LIMIT, || {
            let got = next(rx);
            async move {
                match got {
                    Some(command::Command::Restore(r)) => Some(r),
                    _ => None,
                }
            }
        })
        .await;
        assert_eq!((restore.step, restore.generation, restore.from_scratch), (2, 1, false), "rank {rank}");
    }
    let nodes = Api::<Node>::all(km.client());
    assert!(cordoned(&nodes.get("node-1").await.unwrap()), "the faulty node is isolated");
    assert!(!cordoned(&nodes.get("node-0").await.unwrap()));

    // Rank 1 loads step 2 through the engine: rank 0's shard, the same state.
    let s = store.clone();
    let (manifest, (h0, rank0), (h1, rank1)) = tokio::task::spawn_blocking(move || {
        let engine = Engine::open(&s, EngineConfig::default()).unwrap();
        (engine.manifest("job", 2).unwrap(), engine.restore("job", 2, 0).unwrap(), engine.restore("job", 2, 1).unwrap())
    })
    .await
    .unwrap();
    assert_eq!(manifest.shards[1].object, shard.object, "rank 1's entry names rank 0's shard");
    assert_eq!((manifest.shards[1].rank, Manifest::source_rank(&manifest.shards[1])), (1, 0));
    assert_eq!(rank1, replica_state(2).data.to_vec());
    assert_eq!(rank1, rank0);
    assert_eq!((h1.index.table, h1.index.metadata), (h0.index.table, h0.index.metadata));

    // The fault record says where rank 1's shard came from.
    let note = eventually("the restart in the fault record", LIMIT, || {
        let records = ckptctl_faults(&iso, dir.path(), "job");
        async move {
            let rec = records.into_iter().next()?;
            rec.get("restart_at")?;
            rec["note"].as_str().map(str::to_string)
        }
    })
    .await;
    assert!(note.contains("step 2 committed") && note.contains("rank 1 from rank 0"), "{note}");
}
