//! Node repair with a real `ckptd isolator` process against kmock and a fake repair endpoint on
//! 127.0.0.1: an agent's XID 79 report isolates node-2 and POSTs a repair request (node, class,
//! action, record id) to `--repair-url`; the endpoint's ticket shows in `ckptctl faults --json`; a
//! hang requests no repair; `POST /v1/repairs/node-2/done` with the token releases node-2 (taint
//! gone, uncordoned) and stamps `repaired_at` on the record, while no token gets 401, a node ckptd
//! did not isolate 404, and a bad body or a wrong ticket 400. After a leader change the new
//! leader finds the repair its predecessor requested in the stored records: it checks the ticket
//! against it and stamps `repaired_at` on it.
//!
//! Needs `pip install kmock` (see tests/support/kmock.rs for the skip rule).
#![cfg(feature = "server")]

#[path = "support/isolator_proc.rs"]
mod isolator_proc;
#[path = "support/kmock.rs"]
mod kmock;

use std::time::Duration;

use ckptd_proto::v1::{FaultAction, FaultReport};
use isolator_proc::{IsolatorProc, TOKEN, ckptctl_faults, eventually, post_intake, read_request, token_file};
use k8s_openapi::api::core::v1::Node;
use kmock::{Kmock, cordoned, job_on};
use kube::Api;
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

const LIMIT: Duration = Duration::from_secs(30);

/// A repair endpoint on 127.0.0.1: answers every POST with `{"ticket": "T-<n>"}` and passes each
/// body on.
async fn repair_endpoint() -> (String, mpsc::Receiver<Value>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/repairs", l.local_addr().unwrap());
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut s, _)) = l.accept().await {
            let Some((head, body)) = read_request(&mut s).await else { continue };
            assert!(head.starts_with("POST /v1/repairs HTTP/1.1"), "{head}");
            assert!(head.to_lowercase().contains("content-type: application/json"), "{head}");
            n += 1;
            let answer = format!("{{\"ticket\": \"T-{n}\"}}");
            let _ = s
                .write_all(
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}", answer.len())
                        .as_bytes(),
                )
                .await;
            let _ = tx.send(serde_json::from_str(&body).expect("the repair request is JSON")).await;
        }
    });
    (url, rx)
}

fn ours_tainted(n: &Node) -> bool {
    n.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|t| t.iter().any(|t| t.key == "ckptd.io/unhealthy"))
}

/// An isolator with the alert intake and `--repair-url`, its records in kmock.
fn start(dir: &TempDir, km: &Kmock, name: &str, repair_url: &str) -> IsolatorProc {
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
            "ckptd",
            "--alerts-addr",
            "127.0.0.1:0",
            "--max-isolated-fraction",
            "1",
            "--repair-url",
            repair_url,
        ],
    )
}

/// An XID 79 report of `job`'s rank on `node`.
fn xid_79(job: &str, node: &str, pod: &str) -> FaultReport {
    FaultReport {
        job: job.into(),
        ranks: vec![0],
        node: node.into(),
        pod: pod.into(),
        source: "nvml".into(),
        kind: "xid-79".into(),
        action: FaultAction::DrainNode as i32,
        evidence: "NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_hardware_fault_requests_a_repair_and_the_done_report_releases_the_node() {
    let Some(km) = Kmock::start(4) else { return };
    let dir = TempDir::new().unwrap();
    let nodes = Api::<Node>::all(km.client());
    let (repair_url, mut requests) = repair_endpoint().await;
    let iso = start(&dir, &km, "isolator", &repair_url);
    let llm = job_on(&iso, &dir, "llm", 2).await.unwrap();
    let other = job_on(&iso, &dir, "other", 0).await.unwrap();

    // A hang is not a hardware class: its record has no repair.
    let hang = FaultReport {
        job: "other".into(),
        ranks: vec![0],
        node: "node-0".into(),
        pod: "train-0".into(),
        source: "progress".into(),
        kind: "hang".into(),
        action: FaultAction::RestartJob as i32,
        evidence: "rank 0 made no progress for 600 s".into(),
        ..Default::default()
    };
    let ack = other.report_fault(hang).await.unwrap();
    assert_eq!(ack.action, FaultAction::RestartJob as i32, "{}", ack.note);

    // An XID 79 report isolates node-2 and asks the repair system to drain it.
    let ack = llm.report_fault(xid_79("llm", "node-2", "train-2")).await.unwrap();
    assert_eq!(ack.action, FaultAction::DrainNode as i32, "{}", ack.note);
    let sent = tokio::time::timeout(LIMIT, requests.recv()).await.expect("a repair request").unwrap();
    assert_eq!(
        (&sent["node"], &sent["job"], &sent["class"], &sent["action"]),
        (&"node-2".into(), &"llm".into(), &"xid-79".into(), &"drain-node".into())
    );
    assert!(sent["evidence"].as_str().unwrap().contains("Xid"), "{sent}");
    let id = sent["record"].as_str().expect("the record id").to_string();

    // `ckptctl faults` shows the repair accepted with the endpoint's ticket.
    let records = eventually("the repair answer in the record", LIMIT, || async {
        let r = ckptctl_faults(&iso, dir.path(), "llm");
        r.into_iter().find(|r| r["id"] == id.as_str() && r["repair"]["outcome"] == "accepted")
    })
    .await;
    let repair = &records["repair"];
    assert_eq!(
        (&repair["ticket"], &repair["status"], &repair["action"]),
        (&"T-1".into(), &200.into(), &"drain-node".into())
    );
    assert!(repair["requested_at"].is_string(), "{records}");
    assert!(records["isolated_at"].is_string(), "{records}");
    assert!(records.get("repaired_at").is_none(), "{records}");
    let hangs = ckptctl_faults(&iso, dir.path(), "other");
    assert_eq!(hangs.len(), 1, "{hangs:?}");
    assert!(hangs[0].get("repair").is_none(), "a hang requests no repair: {}", hangs[0]);
    let n2 = nodes.get("node-2").await.unwrap();
    assert!(ours_tainted(&n2) && cordoned(&n2));

    // The done report: authentication, node and body are checked before anything is done.
    let done = "/v1/repairs/node-2/done";
    let (code, _) = post_intake(&iso, done, None, br#"{"ticket": "T-1"}"#).await;
    assert_eq!(code, 401);
    let (code, body) = post_intake(&iso, "/v1/repairs/node-3/done", Some(TOKEN), b"").await;
    assert_eq!(code, 404, "{body}");
    assert!(body["error"].as_str().unwrap().contains("node-3"), "{body}");
    let (code, _) = post_intake(&iso, "/v1/repairs/node-9/done", Some(TOKEN), b"").await;
    assert_eq!(code, 404, "a node that does not exist is not isolated by ckptd");
    let (code, body) = post_intake(&iso, done, Some(TOKEN), br#"{"ticket": 1}"#).await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = post_intake(&iso, done, Some(TOKEN), br#"{"ticket": "T-7"}"#).await;
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("ticket"), "{body}");
    assert!(ours_tainted(&nodes.get("node-2").await.unwrap()), "refused reports release nothing");

    let (code, body) = post_intake(&iso, done, Some(TOKEN), br#"{"ticket": "T-1"}"#).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        (&body["node"], &body["record"], &body["released"]),
        (&"node-2".into(), &id.as_str().into(), &true.into())
    );
    let n2 = nodes.get("node-2").await.unwrap();
    assert!(!ours_tainted(&n2), "the taint is gone");
    assert!(!cordoned(&n2), "node-2 is schedulable again");
    let stamped = eventually("the repair time on the record", LIMIT, || async {
        ckptctl_faults(&iso, dir.path(), "llm")
            .into_iter()
            .find(|r| r["id"] == id.as_str() && r["repaired_at"].is_string())
    })
    .await;
    assert_eq!(stamped["repaired_at"], body["repaired_at"]);
    assert_eq!(stamped["repair"]["ticket"], "T-1", "the answer is kept");
    let (code, _) = post_intake(&iso, done, Some(TOKEN), b"").await;
    assert_eq!(code, 404, "released already");
    assert!(requests.try_recv().is_err(), "one repair request in all: the hang asked for none");
}

#[tokio::test]
async fn a_new_leader_stamps_the_repair_its_predecessor_requested() {
    let Some(km) = Kmock::start(4) else { return };
    let dir = TempDir::new().unwrap();
    let nodes = Api::<Node>::all(km.client());
    let (repair_url, mut requests) = repair_endpoint().await;
    let mut a = start(&dir, &km, "isolator-a", &repair_url);
    let llm = job_on(&a, &dir, "llm", 1).await.unwrap();
    let ack = llm.report_fault(xid_79("llm", "node-1", "train-1")).await.unwrap();
    assert_eq!(ack.action, FaultAction::DrainNode as i32, "{}", ack.note);
    let sent = tokio::time::timeout(LIMIT, requests.recv()).await.expect("a repair request").unwrap();
    let id = sent["record"].as_str().expect("the record id").to_string();
    eventually("the repair answer in the record", LIMIT, || async {
        ckptctl_faults(&a, dir.path(), "llm")
            .into_iter()
            .find(|r| r["id"] == id.as_str() && r["repair"]["ticket"] == "T-1")
    })
    .await;

    // Leader A dies with the repair in flight; B knows of it only through the stored record.
    a.kill();
    let b = start(&dir, &km, "isolator-b", &repair_url);
    let done = "/v1/repairs/node-1/done";
    let (code, body) = post_intake(&b, done, Some(TOKEN), br#"{"ticket": "T-2"}"#).await;
    assert_eq!(code, 400, "B checks the ticket of the stored repair: {body}");
    assert!(ours_tainted(&nodes.get("node-1").await.unwrap()), "a refused report releases nothing");
    let (code, body) = post_intake(&b, done, Some(TOKEN), br#"{"ticket": "T-1"}"#).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!((&body["record"], &body["job"], &body["released"]), (&id.as_str().into(), &"llm".into(), &true.into()));
    let n1 = nodes.get("node-1").await.unwrap();
    assert!(!ours_tainted(&n1) && !cordoned(&n1), "node-1 is released");
    let stamped = eventually("the repair time on the record", LIMIT, || async {
        ckptctl_faults(&b, dir.path(), "llm")
            .into_iter()
            .find(|r| r["id"] == id.as_str() && r["repaired_at"].is_string())
    })
    .await;
    assert_eq!(stamped["repaired_at"], body["repaired_at"]);
    assert_eq!(stamped["repair"]["ticket"], "T-1", "the answer is kept");
    assert!(stamped["isolated_at"].is_string(), "A's stamps are kept: {stamped}");
    let (code, _) = post_intake(&b, done, Some(TOKEN), b"").await;
    assert_eq!(code, 404, "released already");
    assert!(requests.try_recv().is_err(), "B requests no repair of its own");
}
