//! Fault records of a real `ckptd isolator` process against kmock: an agent's fault report on a
//! pod owned by a batch/v1 Job becomes a record with its detect and isolate times and the phase
//! the report names (not the one of the rank's last heartbeat), an Event on the Job, a ConfigMap
//! in the isolator's namespace and a POST to the notify endpoint; the restart and the resume are
//! stamped on it; `ckptctl faults` prints it, and still does from a new isolator after the first
//! one is killed.
//!
//! Needs `pip install kmock` (see tests/support/kmock.rs for the skip rule).
#![cfg(feature = "server")]

#[path = "support/isolator_proc.rs"]
mod isolator_proc;
#[path = "support/kmock.rs"]
mod kmock;

use std::time::Duration;

use ckptd::isolator::link::{IsolatorLink, LinkCredentials};
use ckptd_proto::v1::isolator_client::IsolatorClient;
use ckptd_proto::v1::{FaultAction, FaultReport, RankHeartbeat};
use isolator_proc::{IsolatorProc, TOKEN, ckptctl_faults, eventually, read_request, token_file};
use k8s_openapi::api::core::v1::{ConfigMap, Event};
use kmock::{Kmock, POD_NAMESPACE};
use kube::Api;
use kube::api::ListParams;
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

const LIMIT: Duration = Duration::from_secs(30);
const NAMESPACE: &str = "ckptd";
const OWNER_JOB: &str = "llm-train";

/// A notify endpoint on 127.0.0.1: answers 200 to every POST and passes each body on.
async fn notify_endpoint() -> (String, mpsc::Receiver<Value>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/faults", l.local_addr().unwrap());
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let Some((head, body)) = read_request(&mut s).await else { return };
                assert!(head.starts_with("POST /v1/faults HTTP/1.1"), "{head}");
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                let _ = tx.send(serde_json::from_str(&body).expect("the notify body is JSON")).await;
            });
        }
    });
    (url, rx)
}

fn start(dir: &TempDir, km: &Kmock, name: &str, notify: &str) -> IsolatorProc {
    let token = token_file(dir.path());
    IsolatorProc::spawn(
        dir.path(),
        name,
        &[
            "--token-file",
            token.to_str().unwrap(),
            "--kube-url",
            &km.url,
            "--lease-namespace",
            NAMESPACE,
            "--max-isolated-fraction",
            "1",
            "--snapshot-timeout",
            "2s",
            "--fault-notify-url",
            notify,
        ],
    )
}

async fn job_events(client: &kube::Client, reason: &str) -> Vec<Event> {
    match Api::<Event>::namespaced(client.clone(), POD_NAMESPACE).list(&ListParams::default()).await {
        Ok(list) => list
            .items
            .into_iter()
            .filter(|e| {
                e.involved_object.kind.as_deref() == Some("Job")
                    && e.involved_object.name.as_deref() == Some(OWNER_JOB)
                    && e.reason.as_deref() == Some(reason)
            })
            .collect(),
        Err(kube::Error::Api(s)) if s.code == 404 => Vec::new(),
        Err(e) => panic!("list events: {e}"),
    }
}

/// The records in the job's ConfigMap, if it exists.
async fn stored(client: &kube::Client, job: &str) -> Option<Vec<Value>> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), NAMESPACE).get(&format!("ckptd-faults-{job}")).await.ok()?;
    let text = cm.data?.get("records.json")?.clone();
    Some(serde_json::from_str(&text).expect("records.json is a JSON array"))
}

#[tokio::test]
async fn a_fault_becomes_a_record_on_the_job_that_outlives_the_leader() {
    let Some(km) = Kmock::start_with(4, &["--owner-job", OWNER_JOB]) else { return };
    let dir = TempDir::new().unwrap();
    let client = km.client();
    let (notify, mut notified) = notify_endpoint().await;
    let mut iso = start(&dir, &km, "isolator-a", &notify);
    let store = format!("file://{}", dir.path().join("store").display());
    let mut links = Vec::new();
    for rank in 0..2u32 {
        let l = IsolatorLink::connect(&iso.url(), LinkCredentials::token(TOKEN)).await.unwrap();
        let (node, pod) = (format!("node-{rank}"), format!("train-{rank}"));
        l.register("llm", &[rank], 2, &node, &pod, POD_NAMESPACE, &store).await.unwrap();
        links.push(l);
    }
    assert!(ckptctl_faults(&iso, dir.path(), "llm").is_empty(), "no record before a fault");
    // The isolator last heard rank 1 stepping; the agent reports the fault while the rank loads a
    // checkpoint, and the record keeps the report's phase.
    links[1].heartbeat_in(1, 3, Duration::from_millis(10), Some(ckpt_core::Phase::Step)).await.unwrap();

    let report = FaultReport {
        job: "llm".into(),
        ranks: vec![1],
        node: "node-1".into(),
        pod: "train-1".into(),
        source: "nvml".into(),
        kind: "xid-79".into(),
        action: FaultAction::DrainNode as i32,
        evidence: "NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus".into(),
        phase: "checkpoint-load".into(),
        ..Default::default()
    };
    let ack = links[1].report_fault(report).await.unwrap();
    assert_eq!(ack.action, FaultAction::DrainNode as i32, "{}", ack.note);

    // An Event on the Job that owns the pods, with the record's id.
    let ev = eventually("a FaultDetected Event on the Job", LIMIT, || async {
        job_events(&client, "FaultDetected").await.into_iter().next()
    })
    .await;
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    assert_eq!(ev.involved_object.uid.as_deref(), Some(format!("uid-job-{OWNER_JOB}").as_str()));
    let message = ev.message.unwrap_or_default();
    assert!(message.contains("xid-79") && message.contains("node-1"), "{message}");

    // The ConfigMap holds the record, with its detect and isolate times.
    let records = eventually("the record in the ConfigMap", LIMIT, || async {
        stored(&client, "llm").await.filter(|r| r.len() == 1 && r[0]["isolated_at"].is_string())
    })
    .await;
    let r = &records[0];
    assert_eq!(
        (&r["job"], &r["node"], &r["kind"], &r["source"]),
        (&"llm".into(), &"node-1".into(), &"xid-79".into(), &"nvml".into())
    );
    assert_eq!(
        (&r["requested"], &r["decision"], &r["phase"], &r["fault_phase"]),
        (&"drain-node".into(), &"drain-node".into(), &"Running".into(), &"checkpoint-load".into())
    );
    assert_eq!(
        (&r["pod"], &r["namespace"], &r["ranks"]),
        (&"train-1".into(), &POD_NAMESPACE.into(), &serde_json::json!([1]))
    );
    assert_eq!(r["owner"], format!("Job/{OWNER_JOB}"));
    assert!(r["evidence"].as_str().unwrap().contains("Xid"), "{r}");
    let detected = humantime::parse_rfc3339_weak(r["detected_at"].as_str().unwrap()).unwrap();
    let isolated = humantime::parse_rfc3339_weak(r["isolated_at"].as_str().unwrap()).unwrap();
    assert!(isolated >= detected, "{r}");
    let id = r["id"].as_str().unwrap().to_string();
    assert!(message.contains(&id), "{message}");

    // The notify endpoint got the record as JSON.
    let first = tokio::time::timeout(LIMIT, notified.recv()).await.expect("a notification").unwrap();
    assert_eq!(
        (&first["id"], &first["job"], &first["kind"]),
        (&Value::from(id.as_str()), &"llm".into(), &"xid-79".into())
    );
    assert!(first["detected_at"].is_string(), "{first}");

    // The job restarts at generation 1; once both ranks heartbeat there it resumes.
    let gen1 = || async {
        let jobs = links[0].list_jobs().await.ok()?;
        jobs.iter().any(|j| j.job == "llm" && j.generation == 1 && j.state == "Restoring").then_some(())
    };
    eventually("the restore", LIMIT, gen1).await;
    let mut raw = IsolatorClient::connect(iso.url()).await.unwrap();
    for rank in 0..2 {
        let mut req = tonic::Request::new(RankHeartbeat {
            job: "llm".into(),
            rank,
            generation: 1,
            step: 1,
            step_time_ms: 10,
            ..Default::default()
        });
        req.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        raw.heartbeat(req).await.unwrap();
    }
    let printed = eventually("the resumed record from ckptctl", LIMIT, || async {
        let r = ckptctl_faults(&iso, dir.path(), "llm");
        (r.len() == 1 && r[0]["resumed_at"].is_string()).then_some(r)
    })
    .await;
    let p = &printed[0];
    assert_eq!(p["id"], id.as_str());
    assert_eq!(p["generation"], 1);
    assert!(p["detected_at"].is_string() && p["isolated_at"].is_string() && p["restart_at"].is_string(), "{p}");
    eventually("a FaultRecovered Event on the Job", LIMIT, || async {
        job_events(&client, "FaultRecovered").await.into_iter().next()
    })
    .await;

    // A leader change: the first isolator dies, a new one reads the records from the cluster.
    iso.kill();
    let iso = start(&dir, &km, "isolator-b", &notify);
    let after = ckptctl_faults(&iso, dir.path(), "llm");
    assert_eq!(after, printed, "the new isolator lists the same records");
    assert!(ckptctl_faults(&iso, dir.path(), "other-job").is_empty());
}
