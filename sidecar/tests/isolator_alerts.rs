//! The alert intake of a real `ckptd isolator` process against kmock: an Alertmanager DCGM XID 79
//! alert isolates the node of the job registered there, a duplicate alert and the agent's report
//! of the same fault do not isolate again, an Alibaba Cloud system event finds its node by
//! `spec.providerID`, resolved alerts are recorded only, and bad payloads get 400 with a reason.
//!
//! Needs `pip install kmock` (see tests/support/kmock.rs for the skip rule).
#![cfg(feature = "server")]

#[path = "support/isolator_proc.rs"]
mod isolator_proc;
#[path = "support/kmock.rs"]
mod kmock;

use std::time::Duration;

use ckptd::isolator::link::IsolatorLink;
use ckptd_proto::v1::{FaultAction, FaultReport};
use isolator_proc::{IsolatorProc, TOKEN, TestPki, eventually, post_intake, token_file};
use k8s_openapi::api::core::v1::{Node, Pod};
use kmock::{Kmock, POD_NAMESPACE, cordoned, events_about, job_on, taints};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(30);

fn fixture(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/alerts").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

async fn pod_exists(client: &kube::Client, name: &str) -> bool {
    match Api::<Pod>::namespaced(client.clone(), POD_NAMESPACE).get(name).await {
        Ok(_) => true,
        Err(kube::Error::Api(s)) if s.code == 404 => false,
        Err(e) => panic!("get pod {name}: {e}"),
    }
}

async fn generation(link: &IsolatorLink, job: &str) -> u64 {
    link.list_jobs().await.unwrap().into_iter().find(|j| j.job == job).map(|j| j.generation).unwrap_or(0)
}

#[tokio::test]
async fn alerts_isolate_once_dedupe_and_refuse_bad_payloads() {
    let Some(km) = Kmock::start(4) else { return };
    let dir = TempDir::new().unwrap();
    let client = km.client();
    let nodes = Api::<Node>::all(client.clone());
    // node-3 is the ECS instance of the Aliyun fixtures (ACK's providerID: `<region>.<instance>`).
    let pid = serde_json::json!({ "spec": { "providerID": "cn-hangzhou.i-bp1node2gpu0000000x" } });
    nodes.patch("node-3", &PatchParams::default(), &Patch::Merge(&pid)).await.unwrap();
    let token = token_file(dir.path());
    let iso = IsolatorProc::spawn(
        dir.path(),
        "isolator",
        &[
            "--token-file",
            token.to_str().unwrap(),
            "--kube-url",
            &km.url,
            "--alerts-addr",
            "127.0.0.1:0",
            "--max-isolated",
            "3",
            "--max-isolated-fraction",
            "1",
        ],
    );
    let link = job_on(&iso, &dir, "job", 2).await.unwrap();
    let _other = job_on(&iso, &dir, "other", 3).await.unwrap();
    let am = "/v1/alerts/alertmanager";
    let xid = fixture("alertmanager-dcgm-xid79.json");

    // Authentication first: no token, a wrong token.
    assert_eq!(post_intake(&iso, am, None, &xid).await.0, 401);
    assert_eq!(post_intake(&iso, am, Some("wrong-token-0123456789"), &xid).await.0, 401);

    // Bad payloads: 400 with a reason, and nothing done.
    let big = vec![b' '; 2 << 20];
    let bad: [(&str, &[u8], &str); 5] = [
        (am, b"{not json", "not JSON"),
        (am, br#"{"version":"4","status":"firing"}"#, "alerts"),
        (am, &fixture("alertmanager-unrelated.json"), "no mapping rule"),
        (am, &big, "larger than"),
        ("/v1/alerts/aliyun", &fixture("aliyun-cloudmonitor-statechange.json"), "StateChange"),
    ];
    for (path, body, want) in bad {
        let (code, v) = post_intake(&iso, path, Some(TOKEN), body).await;
        assert_eq!(code, 400, "{want}: {v}");
        let reason = v["error"].as_str().unwrap_or_default();
        assert!(reason.contains(want), "{want}: {reason}");
    }
    assert!(!cordoned(&nodes.get("node-2").await.unwrap()), "a refused payload isolates nothing");

    // The DCGM XID 79 alert for node-2 isolates it, as the agent's report would.
    let (code, v) = post_intake(&iso, am, Some(TOKEN), &xid).await;
    assert_eq!(code, 200, "{v}");
    let r = &v["results"][0];
    assert_eq!(
        (r["kind"].as_str(), r["outcome"].as_str(), r["node"].as_str()),
        (Some("xid-79"), Some("acted"), Some("node-2")),
        "{v}"
    );
    assert_eq!(r["jobs"][0]["job"], "job");
    assert_eq!(r["jobs"][0]["action"], "drain-node", "{v}");
    let node = nodes.get("node-2").await.unwrap();
    assert!(cordoned(&node));
    assert_eq!(taints(&node), vec![("ckptd.io/unhealthy".into(), Some("xid-79".into()), "NoSchedule".into())]);
    let ann = node.metadata.annotations.clone().unwrap_or_default();
    let evidence = ann.get("ckptd.io/isolation").cloned().unwrap_or_default();
    assert!(evidence.contains("alertmanager") && evidence.contains("fallen off the bus"), "{evidence}");
    assert_eq!(events_about(&client, "default", "node-2").await.len(), 1);
    assert!(!pod_exists(&client, "train-2").await, "the pod on node-2 was deleted");
    assert!(pod_exists(&client, "train-3").await);
    // The job restarts: its generation moves to 1.
    eventually("the job's restore", LIMIT, || async { (generation(&link, "job").await == 1).then_some(()) }).await;

    // The same alert again: a duplicate.
    let (code, v) = post_intake(&iso, am, Some(TOKEN), &xid).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["results"][0]["outcome"], "duplicate", "{v}");
    // The agent's report of the same fault, at the job's new generation: acknowledged, not acted on.
    let report = FaultReport {
        job: "job".into(),
        ranks: vec![0],
        generation: 1,
        node: "node-2".into(),
        pod: "train-2".into(),
        source: "nvml".into(),
        kind: "xid-79".into(),
        action: FaultAction::DrainNode as i32,
        evidence: "NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus".into(),
        gpu: Some(2),
        ..Default::default()
    };
    // A raw client: the link would send the generation it learned (0; it follows no commands here).
    let mut raw = ckptd_proto::v1::isolator_client::IsolatorClient::connect(iso.url()).await.unwrap();
    let mut req = tonic::Request::new(report);
    req.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let ack = raw.report_fault(req).await.unwrap().into_inner();
    assert!(ack.note.contains("already acted on"), "{}", ack.note);
    assert_eq!(generation(&link, "job").await, 1, "no second restore");
    assert_eq!(events_about(&client, "default", "node-2").await.len(), 1, "no second isolation");
    assert_eq!(taints(&nodes.get("node-2").await.unwrap()).len(), 1);

    // A resolved alert is recorded, not acted on.
    let (code, v) = post_intake(&iso, am, Some(TOKEN), &fixture("alertmanager-dcgm-xid79-resolved.json")).await;
    assert_eq!((code, v["results"][0]["outcome"].as_str()), (200, Some("resolved")), "{v}");

    // An Alibaba Cloud system event: the instance is node-3 by its providerID.
    let ali = "/v1/alerts/aliyun";
    let (code, v) =
        post_intake(&iso, ali, Some(TOKEN), &fixture("aliyun-cloudmonitor-systemfailure-reboot.json")).await;
    assert_eq!(code, 200, "{v}");
    let r = &v["results"][0];
    assert_eq!(
        (r["kind"].as_str(), r["outcome"].as_str(), r["node"].as_str()),
        (Some("host-failure"), Some("acted"), Some("node-3")),
        "{v}"
    );
    let node3 = nodes.get("node-3").await.unwrap();
    assert!(cordoned(&node3));
    assert_eq!(taints(&node3)[0].1.as_deref(), Some("host-failure"));
    // The same event through EventBridge is the same fault: a duplicate.
    let (_, v) = post_intake(&iso, ali, Some(TOKEN), &fixture("aliyun-eventbridge-systemfailure-reboot.json")).await;
    assert_eq!(v["results"][0]["outcome"], "duplicate", "{v}");
    // An instance no node runs on is recorded only.
    let (code, v) = post_intake(&iso, ali, Some(TOKEN), &fixture("aliyun-eventbridge-maintenance-reboot.json")).await;
    assert_eq!((code, v["results"][0]["outcome"].as_str()), (200, Some("unknown-node")), "{v}");
    for other in ["node-0", "node-1"] {
        assert!(!cordoned(&nodes.get(other).await.unwrap()), "{other}");
    }
    let (_, body) = iso.http_get("/metrics");
    assert!(body.contains("ckptd_isolator_isolated_nodes 2"), "{body}");
}

/// POSTs over HTTPS, trusting `ca` and presenting `client` (certificate and key PEM) if given.
async fn post_tls(
    addr: std::net::SocketAddr,
    ca: &str,
    client: Option<(&str, &str)>,
    token: Option<&str>,
    body: &[u8],
) -> (u16, Value) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    ckptd::isolator::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap()).unwrap();
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let cfg = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let mut s = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.expect("TLS handshake");
    let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head = format!(
        "POST /v1/alerts/alertmanager HTTP/1.1\r\nhost: localhost\r\n{auth}content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    // The server may close without close_notify; what arrived is the answer.
    let _ = s.read_to_end(&mut out).await;
    let out = String::from_utf8_lossy(&out).to_string();
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_intake_takes_the_grpc_sides_tls_token_and_client_certificates() {
    let dir = TempDir::new().unwrap();
    let pki = TestPki::new(dir.path(), "alertmanager");
    let (cert, key, ca_path) = (&pki.cert, &pki.key, &pki.ca_path);
    let token = token_file(dir.path());
    let iso = IsolatorProc::spawn(
        dir.path(),
        "isolator",
        &[
            "--dry-run",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--client-ca",
            ca_path,
            "--token-file",
            token.to_str().unwrap(),
            "--alerts-addr",
            "127.0.0.1:0",
        ],
    );
    let addr = iso.alerts.expect("alerts address");
    let xid = fixture("alertmanager-dcgm-xid79.json");
    let (client_pem, client_key_pem) = (&pki.client_pem, &pki.client_key_pem);

    // No job runs on node-2 here: a served alert answers `no-job`.
    let (code, v) = post_tls(addr, &pki.ca_pem, None, Some(TOKEN), &xid).await;
    assert_eq!((code, v["results"][0]["outcome"].as_str()), (200, Some("no-job")), "token: {v}");
    let (code, v) = post_tls(addr, &pki.ca_pem, Some((client_pem, client_key_pem)), None, &xid).await;
    assert_eq!((code, v["results"][0]["outcome"].as_str()), (200, Some("no-job")), "client certificate: {v}");
    let (code, v) = post_tls(addr, &pki.ca_pem, None, None, &xid).await;
    assert_eq!(code, 401, "neither: {v}");
    // Plain HTTP on the TLS port gets no answer.
    let (code, _) = post_intake(&iso, "/v1/alerts/alertmanager", Some(TOKEN), &xid).await;
    assert_ne!(code, 200);
}
