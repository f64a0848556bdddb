//! The isolator's gRPC service as a real `ckptd isolator` process (dry-run: no cluster): auth,
//! hostile requests, global commit exactly once, deadline abort, coordinated restore with
//! generation fencing, stragglers.
#![cfg(feature = "server")]

#[path = "../../ckpt-core/tests/common/reliability.rs"]
mod reliability;

#[path = "support/isolator_proc.rs"]
mod isolator_proc;
#[path = "support/slow_clients.rs"]
mod slow_clients;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use ckpt_core::store::MapEnv;
use ckpt_core::{DType, Engine, EngineConfig, ShardInfo, Snapshot, Store, StoreOptions, TensorMeta, TensorTable};
use ckptd::ErrorKind;
use ckptd::isolator::link::{IsolatorLink, LinkCredentials};
use ckptd_proto::v1::{FaultAction, FaultReport, command};
use isolator_proc::{IsolatorProc, TOKEN, TestPki, eventually, token_file};
use slow_clients::SlowClients;
use tempfile::TempDir;

const LIMIT: Duration = Duration::from_secs(30);
/// The loopback S3 server's endpoint (see ckpt-core/tests/common/mod.rs); unset: S3 variants skip.
const S3_ENDPOINT_ENV: &str = "CKPTD_TEST_S3_ENDPOINT";

fn snapshot(step: u64, rank: u32) -> Snapshot {
    let metas = vec![TensorMeta::new("w", DType::F32, vec![64]).unwrap()];
    let table = TensorTable::packed(metas, 64).unwrap();
    let data: Vec<u8> = (0..table.total_len()).map(|i| (i as u8) ^ (step as u8) ^ (rank as u8)).collect();
    Snapshot { table, data: Bytes::from(data), metadata: Vec::new() }
}

/// Environment of the S3 test store (endpoint and credentials of the loopback server), empty for
/// `file://`. The isolator child gets it as its environment; this process passes it explicitly.
fn s3_env() -> Vec<(String, String)> {
    let Some(endpoint) = std::env::var(S3_ENDPOINT_ENV).ok().filter(|e| !e.trim().is_empty()) else {
        return Vec::new();
    };
    [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ALLOW_HTTP", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Opens `store` with the test environment `env` (empty: the process environment).
fn open_engine(store: &str, env: &[(String, String)]) -> Engine {
    if env.is_empty() {
        return Engine::open(store, EngineConfig::default()).unwrap();
    }
    let map = MapEnv(env.iter().cloned().collect());
    let s = Store::open_with_env(store, &StoreOptions::default(), &map).unwrap();
    Engine::new(s, EngineConfig::default()).unwrap()
}

/// Writes every rank's real shard of `step` to `store` and returns them.
async fn write_shards(store: &str, job: &str, step: u64, world: u32) -> Vec<ShardInfo> {
    write_shards_env(store, &[], job, step, world).await
}

async fn write_shards_env(store: &str, env: &[(String, String)], job: &str, step: u64, world: u32) -> Vec<ShardInfo> {
    let (store, job, env) = (store.to_string(), job.to_string(), env.to_vec());
    blocking(move || {
        let engine = open_engine(&store, &env);
        (0..world).map(|r| engine.write_shard(&job, step, r, world, &snapshot(step, r)).unwrap()).collect()
    })
    .await
}

/// Runs engine calls (which block) off the test's runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn file_store(dir: &TempDir) -> String {
    format!("file://{}", dir.path().join("store").display())
}

fn start(dir: &TempDir, extra: &[&str]) -> IsolatorProc {
    start_env(dir, extra, &[])
}

fn start_env(dir: &TempDir, extra: &[&str], env: &[(String, String)]) -> IsolatorProc {
    let token = token_file(dir.path());
    let mut args = vec!["--dry-run", "--token-file", token.to_str().unwrap()];
    args.extend_from_slice(extra);
    IsolatorProc::spawn_with_env(dir.path(), "isolator", &args, env)
}

async fn link(iso: &IsolatorProc) -> IsolatorLink {
    IsolatorLink::connect(&iso.url(), LinkCredentials::token(TOKEN)).await.unwrap()
}

/// One link per rank, each registered.
async fn register_all(iso: &IsolatorProc, job: &str, world: u32, store: &str) -> Vec<IsolatorLink> {
    let mut links = Vec::new();
    for r in 0..world {
        let l = link(iso).await;
        l.register(job, &[r], world, &format!("node-{r}"), &format!("train-{r}"), "train", store).await.unwrap();
        links.push(l);
    }
    links
}

#[tokio::test]
async fn calls_without_the_right_token_are_unauthenticated() {
    let dir = TempDir::new().unwrap();
    let iso = start(&dir, &[]);
    let store = file_store(&dir);
    for creds in [LinkCredentials::default(), LinkCredentials::token("wrong-token-0123456789abcdef")] {
        let l = IsolatorLink::connect(&iso.url(), creds).await.unwrap();
        let err = l.register("job", &[0], 1, "n", "p", "ns", &store).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        assert!(err.to_string().contains("Bearer"), "{err}");
        assert!(l.list_jobs().await.is_err(), "admin calls are authenticated too");
    }
    let l = link(&iso).await;
    let reply = l.register("job", &[0], 1, "n", "p", "ns", &store).await.unwrap();
    assert_eq!(reply.generation, 0);
    assert!(!reply.has_committed);
    assert_eq!(l.list_jobs().await.unwrap().len(), 1);
}

#[tokio::test]
async fn mtls_needs_a_client_certificate_signed_by_the_ca() {
    let dir = TempDir::new().unwrap();
    let pki = TestPki::new(dir.path(), "agent");
    let iso = IsolatorProc::spawn(
        dir.path(),
        "isolator",
        &["--dry-run", "--tls-cert", &pki.cert, "--tls-key", &pki.key, "--client-ca", &pki.ca_path],
    );
    let url = format!("https://localhost:{}", iso.grpc.port());
    let store = file_store(&dir);

    // A TLS client without a certificate fails the handshake or the call.
    let anon = LinkCredentials::default().with_ca(pki.ca_pem.clone().into_bytes());
    match IsolatorLink::connect(&url, anon).await {
        Ok(l) => assert!(l.register("job", &[0], 1, "n", "p", "ns", &store).await.is_err()),
        Err(e) => assert_eq!(e.kind(), ErrorKind::IsolatorUnavailable),
    }
    let creds =
        LinkCredentials::mtls(pki.client_pem.into_bytes(), pki.client_key_pem.into_bytes(), pki.ca_pem.into_bytes());
    let l = IsolatorLink::connect(&url, creds).await.unwrap();
    l.register("job", &[0], 1, "n", "p", "ns", &store).await.unwrap();
}

#[tokio::test]
async fn hostile_requests_get_clear_refusals() {
    let dir = TempDir::new().unwrap();
    let iso = start(&dir, &[]);
    let store = file_store(&dir);
    let l = link(&iso).await;
    let kind = |r: ckptd::Result<ckptd_proto::v1::RegisterReply>| r.unwrap_err().kind();
    assert_eq!(kind(l.register("job", &[4], 4, "n", "p", "ns", &store).await), ErrorKind::InvalidRequest);
    assert_eq!(kind(l.register("../etc", &[0], 4, "n", "p", "ns", &store).await), ErrorKind::InvalidRequest);
    assert_eq!(kind(l.register("job", &[0], 0, "n", "p", "ns", &store).await), ErrorKind::InvalidRequest);
    assert_eq!(kind(l.register("job", &[0], u32::MAX, "n", "p", "ns", &store).await), ErrorKind::InvalidRequest);
    assert_eq!(kind(l.register("job", &[0], 4, "", "p", "ns", &store).await), ErrorKind::InvalidRequest);
    // Heartbeats for a job nobody registered.
    let ghost = link(&iso).await;
    assert_eq!(ghost.heartbeat(0, 1, Duration::from_millis(5)).await.unwrap_err().kind(), ErrorKind::UnknownJob);

    l.register("job", &[0], 4, "n", "p", "ns", &store).await.unwrap();
    assert_eq!(kind(l.register("job", &[1], 8, "n", "p", "ns", &store).await), ErrorKind::InvalidRequest);
    assert_eq!(l.heartbeat(9, 1, Duration::from_millis(5)).await.unwrap_err().kind(), ErrorKind::InvalidRequest);
    let mut info = write_shards(&store, "job", 1, 4).await.remove(0);
    info.size = 1 << 50;
    assert_eq!(l.vote_durable(&info, &BTreeMap::new()).await.unwrap_err().kind(), ErrorKind::InvalidRequest);
    info.size = 10;
    info.rank = 7;
    assert_eq!(l.vote_durable(&info, &BTreeMap::new()).await.unwrap_err().kind(), ErrorKind::InvalidRequest);
    let fault = FaultReport { ranks: vec![99], action: 42, ..Default::default() };
    assert_eq!(l.report_fault(fault).await.unwrap_err().kind(), ErrorKind::InvalidRequest);
    // The isolator survived all of it.
    assert_eq!(l.list_jobs().await.unwrap()[0].registered, 1);
    reliability::record("hostile", "isolator: forged and unauthenticated requests", 7);
}

/// Whether `step` of `job` has a MANIFEST on `store`.
async fn has_manifest(store: &str, job: &str, step: u64) -> bool {
    let (url, job) = (store.to_string(), job.to_string());
    blocking(move || Engine::open(&url, EngineConfig::default()).unwrap().manifest(&job, step).is_ok()).await
}

#[tokio::test]
async fn a_vote_for_a_shard_that_was_never_written_commits_nothing() {
    let dir = TempDir::new().unwrap();
    let iso = start(&dir, &[]);
    let store = file_store(&dir);
    let links = register_all(&iso, "job", 1, &store).await;
    let forged = ShardInfo {
        step: 1,
        rank: 0,
        object: ckpt_core::store::layout::shard_object(0, 0x1234),
        world_size: 1,
        size: 10,
        index_crc32c: 0,
        region_len: 10,
        compressed_chunks: 0,
        chunks: 1,
        direct_bytes: 0,
    };
    let err = links[0].vote_durable(&forged, &BTreeMap::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidRequest, "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert!(!has_manifest(&store, "job", 1).await, "no MANIFEST for a shard that does not exist");
    let jobs = links[0].list_jobs().await.unwrap();
    assert!(!jobs[0].has_committed, "the job's state did not move");
}

#[tokio::test]
async fn a_vote_whose_size_or_checksum_differs_from_the_shard_is_refused_and_the_honest_ballot_commits_once() {
    let dir = TempDir::new().unwrap();
    let iso = start(&dir, &[]);
    let store = file_store(&dir);
    let links = register_all(&iso, "job", 2, &store).await;
    let shards = write_shards(&store, "job", 1, 2).await;
    let lies = |s: &ShardInfo| {
        [
            ShardInfo { size: s.size + 1, ..s.clone() },
            ShardInfo { size: s.size - 1, ..s.clone() },
            ShardInfo { index_crc32c: s.index_crc32c ^ 1, ..s.clone() },
            ShardInfo { region_len: s.region_len + 4, ..s.clone() },
        ]
    };
    for (rank, lie) in lies(&shards[0]).iter().enumerate() {
        let err = links[0].vote_durable(lie, &BTreeMap::new()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidRequest, "lie {rank}: {err}");
        assert!(err.to_string().contains("does not match"), "{err}");
    }
    // The honest vote of rank 0 is counted (the lies were not); rank 1 lies before it is honest.
    assert!(!links[0].vote_durable(&shards[0], &BTreeMap::new()).await.unwrap());
    for lie in lies(&shards[1]) {
        let err = links[1].vote_durable(&lie, &BTreeMap::new()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidRequest, "{err}");
        assert!(!has_manifest(&store, "job", 1).await, "no MANIFEST after a lying completing vote");
    }
    assert!(!links[0].list_jobs().await.unwrap()[0].has_committed);
    // A lie does not abort the step: the honest vote completes it, exactly once.
    assert!(links[1].vote_durable(&shards[1], &BTreeMap::new()).await.unwrap());
    for (l, s) in links.iter().zip(&shards) {
        assert!(l.vote_durable(s, &BTreeMap::new()).await.unwrap(), "a retried vote reports the commit");
    }
    // A lie about the committed step is a conflict with it, and changes nothing.
    let err = links[1].vote_durable(&lies(&shards[1])[2], &BTreeMap::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Core(ckpt_core::ErrorKind::Conflict), "{err}");
    let url = store.clone();
    let (m, steps) = blocking(move || {
        let engine = Engine::open(&url, EngineConfig::default()).unwrap();
        (engine.latest_valid("job").unwrap().expect("a committed step"), engine.steps("job").unwrap())
    })
    .await;
    assert_eq!(m.step, 1);
    assert_eq!(m.shards, shards.iter().map(ShardInfo::entry).collect::<Vec<_>>());
    assert_eq!(steps.iter().filter(|s| s.step == 1).count(), 1);
    assert_eq!(links[0].list_jobs().await.unwrap()[0].committed_step, 1);
    reliability::record("hostile", "isolator: lying durable votes", 4);
}

#[tokio::test]
async fn a_vote_for_step_2_pow_64_minus_1_is_invalid_and_later_steps_still_commit() {
    let dir = TempDir::new().unwrap();
    let iso = start(&dir, &[]);
    let store = file_store(&dir);
    let links = register_all(&iso, "job", 1, &store).await;
    // A real shard at that step, so that only the bound refuses it.
    let far = write_shards(&store, "job", u64::MAX, 1).await.remove(0);
    let mut raw = ckptd_proto::v1::isolator_client::IsolatorClient::connect(iso.url()).await.unwrap();
    let mut req = tonic::Request::new(ckptd_proto::v1::DurableVote {
        job: "job".into(),
        step: u64::MAX,
        rank: 0,
        world_size: 1,
        generation: 0,
        shard_key: far.entry().object,
        shard_len: far.size,
        shard_crc32c: far.index_crc32c,
        metadata: Vec::new(),
        region_len: far.region_len,
    });
    req.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let status = raw.vote_durable(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("step"), "{status:?}");
    let err = links[0].vote_durable(&far, &BTreeMap::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidRequest, "{err}");
    assert!(!has_manifest(&store, "job", u64::MAX).await);
    // The job is not stuck behind it: an honest step 1 commits.
    let s1 = write_shards(&store, "job", 1, 1).await;
    assert!(links[0].vote_durable(&s1[0], &BTreeMap::new()).await.unwrap());
    assert_eq!(links[0].list_jobs().await.unwrap()[0].committed_step, 1);
}

async fn commit_exactly_once(store: &str, dir: &TempDir, env: &[(String, String)]) {
    let iso = start_env(dir, &[], env);
    let links = register_all(&iso, "job", 4, store).await;
    let shards = write_shards_env(store, env, "job", 10, 4).await;
    let mut meta = BTreeMap::new();
    meta.insert("lr".to_string(), "0.1".to_string());
    let mut committed = Vec::new();
    for (l, s) in links.iter().zip(&shards) {
        committed.push(l.vote_durable(s, &meta).await.unwrap());
    }
    assert_eq!(committed, vec![false, false, false, true], "only the last vote commits");
    // Retried votes change nothing and report the commit.
    for (l, s) in links.iter().zip(&shards) {
        assert!(l.vote_durable(s, &meta).await.unwrap());
    }
    let (url, env) = (store.to_string(), env.to_vec());
    let (m, steps) = blocking(move || {
        let engine = open_engine(&url, &env);
        (engine.latest_valid("job").unwrap().expect("a committed step"), engine.steps("job").unwrap())
    })
    .await;
    assert_eq!(m.step, 10);
    assert_eq!(m.metadata.get("lr").map(String::as_str), Some("0.1"));
    assert_eq!(m.shards.len(), 4);
    assert_eq!(steps.iter().filter(|s| s.step == 10).count(), 1);
    let jobs = links[0].list_jobs().await.unwrap();
    assert_eq!((jobs[0].has_committed, jobs[0].committed_step), (true, 10));
    // The operator's view, through the real `ckptctl jobs --json`.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ckptctl"))
        .args(["jobs", "--json", "--isolator", &iso.url(), "--token-file"])
        .arg(dir.path().join("token"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["job"], "job");
    assert_eq!(v[0]["state"], "Running");
    assert_eq!(v[0]["latest_global_step"], 10);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ckptctl"))
        .args(["jobs", "--isolator", &iso.url()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "no token: refused");
    let (code, body) = iso.http_get("/metrics");
    assert_eq!(code, 200);
    assert!(body.contains("ckptd_isolator_latest_global_step{job=\"job\"} 10"), "{body}");
}

#[tokio::test]
async fn four_votes_commit_the_step_exactly_once_on_file_store() {
    let dir = TempDir::new().unwrap();
    commit_exactly_once(&file_store(&dir), &dir, &[]).await;
}

#[tokio::test]
#[allow(clippy::print_stderr)]
async fn four_votes_commit_the_step_exactly_once_on_s3() {
    let env = s3_env();
    if env.is_empty() {
        eprintln!(
            "skipping the S3 variant: {S3_ENDPOINT_ENV} is not set (scripts/test.sh starts the loopback S3 server)"
        );
        return;
    }
    let bucket =
        std::env::var("CKPTD_TEST_S3_BUCKET").ok().filter(|b| !b.is_empty()).unwrap_or_else(|| "ckptd-test".into());
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let store = format!("s3://{bucket}/isolator-{}-{nanos}", std::process::id());
    let dir = TempDir::new().unwrap();
    commit_exactly_once(&store, &dir, &env).await;
}

#[tokio::test]
async fn a_rank_that_never_votes_aborts_its_step_and_the_previous_stays_latest() {
    let dir = TempDir::new().unwrap();
    let iso = start(&dir, &["--commit-deadline", "300ms"]);
    let store = file_store(&dir);
    let links = register_all(&iso, "job", 4, &store).await;
    let s1 = write_shards(&store, "job", 1, 4).await;
    for (l, s) in links.iter().zip(&s1) {
        l.vote_durable(s, &BTreeMap::new()).await.unwrap();
    }
    let s2 = write_shards(&store, "job", 2, 4).await;
    for (l, s) in links.iter().zip(&s2).take(3) {
        assert!(!l.vote_durable(s, &BTreeMap::new()).await.unwrap());
    }
    // Rank 3 never votes: once the deadline passes, the step is aborted.
    let err = eventually("step 2 to be aborted", LIMIT, || async {
        links[0].vote_durable(&s2[0], &BTreeMap::new()).await.err()
    })
    .await;
    assert_eq!(err.kind(), ErrorKind::Stale, "{err}");
    assert!(err.to_string().contains("aborted"), "{err}");
    // A late vote of rank 3 cannot resurrect it.
    assert_eq!(links[3].vote_durable(&s2[3], &BTreeMap::new()).await.unwrap_err().kind(), ErrorKind::Stale);
    let url = store.clone();
    let (latest, step2) = blocking(move || {
        let engine = Engine::open(&url, EngineConfig::default()).unwrap();
        (engine.latest("job").unwrap().map(|m| m.step), engine.manifest("job", 2).is_ok())
    })
    .await;
    assert_eq!(latest, Some(1));
    assert!(!step2, "no MANIFEST for the aborted step");
}

#[tokio::test]
async fn restart_job_fault_restores_every_rank_at_a_new_generation_and_fences_stale_ranks() {
    let dir = TempDir::new().unwrap();
    let iso = start(&dir, &["--snapshot-timeout", "300ms"]);
    let store = file_store(&dir);
    let links = register_all(&iso, "job", 4, &store).await;
    let mut streams: Vec<_> = links.iter().map(IsolatorLink::commands).collect();
    let s1 = write_shards(&store, "job", 5, 4).await;
    for (l, s) in links.iter().zip(&s1) {
        l.vote_durable(s, &BTreeMap::new()).await.unwrap();
    }
    // A stale copy of rank 1 that will never hear about the restore.
    let stale = link(&iso).await;
    stale.register("job", &[1], 4, "node-1", "train-1", "train", &store).await.unwrap();
    eventually("every agent to subscribe", LIMIT, || async {
        (links[0].list_jobs().await.unwrap()[0].connected_agents == 4).then_some(())
    })
    .await;
    let fault = FaultReport {
        ranks: vec![2],
        node: "node-2".into(),
        pod: "train-2".into(),
        source: "inject".into(),
        kind: "hang".into(),
        action: FaultAction::RestartJob as i32,
        evidence: "no progress for 600 s".into(),
        ..Default::default()
    };
    // Step 6 is open (rank 3 still persists) when the fault hits: the restart aborts it.
    let s6 = write_shards(&store, "job", 6, 4).await;
    for (l, s) in links.iter().zip(&s6).take(3) {
        assert!(!l.vote_durable(s, &BTreeMap::new()).await.unwrap());
    }
    let ack = links[2].report_fault(fault).await.unwrap();
    assert_eq!(ack.action, FaultAction::RestartJob as i32);
    for (rank, rx) in streams.iter_mut().enumerate() {
        let first = tokio::time::timeout(LIMIT, rx.recv()).await.unwrap().unwrap();
        match (rank, first.command) {
            (2, Some(command::Command::Stop(_))) => {}
            (r, Some(command::Command::SnapshotNow(s))) if r != 2 => assert_eq!(s.deadline_ms, 300),
            other => panic!("rank {rank}: unexpected first command {other:?}"),
        }
        let second = tokio::time::timeout(LIMIT, rx.recv()).await.unwrap().unwrap();
        match second.command {
            Some(command::Command::Restore(r)) => {
                assert_eq!((r.step, r.generation, r.from_scratch), (5, 1, false), "rank {rank}")
            }
            other => panic!("rank {rank}: expected restore, got {other:?}"),
        }
    }
    assert_eq!(links[0].list_jobs().await.unwrap()[0].state, "Restoring");
    // The stale copy still speaks generation 0: refused.
    let err = stale.heartbeat(1, 6, Duration::from_millis(100)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Stale, "{err}");
    assert_eq!(stale.vote_durable(&s6[1], &BTreeMap::new()).await.unwrap_err().kind(), ErrorKind::Stale);
    // Every rank comes back at generation 1: running again.
    for (r, l) in links.iter().enumerate() {
        assert_eq!(l.generation(), 1);
        assert_eq!(l.heartbeat(r as u32, 5, Duration::from_millis(100)).await.unwrap(), 1);
    }
    let jobs = links[0].list_jobs().await.unwrap();
    assert_eq!((jobs[0].state.as_str(), jobs[0].generation), ("Running", 1));
    // The restarted job saves step 6 again (its shards replace the aborted attempt's): the new
    // generation's votes commit it.
    let s6 = write_shards(&store, "job", 6, 4).await;
    for (l, s) in links.iter().zip(&s6) {
        l.vote_durable(s, &BTreeMap::new()).await.unwrap();
    }
    assert_eq!(links[0].list_jobs().await.unwrap()[0].committed_step, 6);
}

#[tokio::test]
async fn a_rank_slower_than_k_times_the_median_for_m_windows_is_a_straggler() {
    let dir = TempDir::new().unwrap();
    let iso = start(&dir, &["--straggler-window", "100ms", "--straggler-windows", "2", "--straggler-factor", "2"]);
    let store = file_store(&dir);
    let links = register_all(&iso, "job", 4, &store).await;
    for (r, l) in links.iter().enumerate() {
        let ms = if r == 3 { 500 } else { 100 };
        l.heartbeat(r as u32, 1, Duration::from_millis(ms)).await.unwrap();
    }
    let stragglers = eventually("rank 3 flagged", LIMIT, || async {
        let s = links[0].list_jobs().await.unwrap().remove(0).stragglers;
        (!s.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(stragglers, vec![3]);
    let (_, body) = iso.http_get("/metrics");
    assert!(body.contains("ckptd_isolator_stragglers{job=\"job\"} 1"), "{body}");
    assert!(iso.log_text().contains("straggler"));
    // Not isolated: the job keeps running.
    assert_eq!(links[0].list_jobs().await.unwrap()[0].state, "Running");
}

#[test]
fn a_configuration_without_authentication_exits_64_with_one_line() {
    let dir = TempDir::new().unwrap();
    let short = dir.path().join("short");
    std::fs::write(&short, "abc").unwrap();
    let cases: [&[&str]; 3] = [
        &["--dry-run"],
        &["--dry-run", "--token-file", short.to_str().unwrap()],
        &["--dry-run", "--client-ca", short.to_str().unwrap()],
    ];
    for args in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ckptd"))
            .arg("isolator")
            .args(["--listen", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

#[tokio::test]
async fn an_emergency_snapshot_that_completes_a_step_the_faulty_rank_voted_is_what_ranks_restore() {
    let dir = TempDir::new().unwrap();
    let iso = start(&dir, &["--snapshot-timeout", "20s"]);
    let store = file_store(&dir);
    let links = register_all(&iso, "job", 4, &store).await;
    let mut streams: Vec<_> = links.iter().map(IsolatorLink::commands).collect();
    eventually("every agent to subscribe", LIMIT, || async {
        (links[0].list_jobs().await.unwrap()[0].connected_agents == 4).then_some(())
    })
    .await;
    let s1 = write_shards(&store, "job", 1, 4).await;
    for (l, s) in links.iter().zip(&s1) {
        l.vote_durable(s, &BTreeMap::new()).await.unwrap();
    }
    // Step 2: ranks 0-2 are durable (rank 2 among them), rank 3 still persists when rank 2 dies.
    let s2 = write_shards(&store, "job", 2, 4).await;
    for (l, s) in links.iter().zip(&s2).take(3) {
        assert!(!l.vote_durable(s, &BTreeMap::new()).await.unwrap());
    }
    let fault = FaultReport {
        ranks: vec![2],
        node: "node-2".into(),
        kind: "xid-79".into(),
        action: FaultAction::DrainNode as i32,
        ..Default::default()
    };
    links[2].report_fault(fault).await.unwrap();
    let first = tokio::time::timeout(LIMIT, streams[3].recv()).await.unwrap().unwrap();
    assert!(matches!(first.command, Some(command::Command::SnapshotNow(_))), "{first:?}");
    // Rank 3's emergency snapshot completes step 2.
    assert!(links[3].vote_durable(&s2[3], &BTreeMap::new()).await.unwrap());
    for (rank, rx) in streams.iter_mut().enumerate() {
        let restore = loop {
            let cmd = tokio::time::timeout(LIMIT, rx.recv()).await.unwrap().unwrap();
            if let Some(command::Command::Restore(r)) = cmd.command {
                break r;
            }
        };
        assert_eq!((restore.step, restore.generation), (2, 1), "rank {rank}");
    }
}

#[test]
fn the_metrics_port_answers_healthz_while_64_slow_clients_trickle_their_heads() {
    let dir = TempDir::new().unwrap();
    let iso = start(&dir, &[]);
    let slow = SlowClients::connect(iso.metrics, 64);
    let (code, body) = iso.http_get("/healthz");
    assert_eq!(code, 200, "{body}");
    // However a client trickles, it is evicted for newcomers or closed at the head deadline.
    slow.wait_all_given_up();
    assert_eq!(iso.http_get("/healthz").0, 200);
}
