//! Store faults: an [`Engine`] talks to the loopback S3 server (moto, started by
//! `scripts/test.sh`) through the fault-injecting proxy of `tests/common/fault_proxy.rs`, which
//! answers `503 SlowDown`, delays requests, drops connections and cuts responses short.
//!
//! What must hold, whatever the store does:
//! - a save either succeeds after retries, and then reads back bitwise equal through a clean path,
//!   or fails with a store error (never `Corrupt`), leaving no MANIFEST and no multipart upload;
//! - no committed step is ever damaged, and `latest()` never moves backwards because of a write
//!   that failed;
//! - a restore either returns the saved bytes or fails with a transient error: never other bytes,
//!   and a transient read fault never makes a sound step look damaged;
//! - a MANIFEST that the store kept but never acknowledged is a successful commit.
//!
//! Every engine under test is opened with `Store::open_with_env` on a map of variables, so the
//! proxied engine and the clean one (directly on the server) differ only in the endpoint. The
//! proxy runs on a runtime the test owns; the blocking engine calls run on the test thread.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ckpt_core::store::s3_uploads::{PendingUpload, list_pending};
use ckpt_core::store::{MapEnv, layout};
use ckpt_core::{
    CommitConfig, Compression, DType, Engine, EngineConfig, Error, ErrorKind, Manifest, PersistConfig, ReadConfig,
    RetentionPolicy, Snapshot, StepState, Store, StoreOptions, TensorMeta, TensorTable,
};
use common::fault_proxy::{FaultPlan, FaultProxy, FaultStats};
use common::s3;
use http::Method;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

const JOB: &str = "job";
/// Part size of multipart uploads: S3's minimum.
const PART: usize = 5 << 20;
/// A snapshot that goes up as a multipart upload of three parts.
const BIG: usize = 12 << 20;
/// A snapshot that goes up with one PUT.
const SMALL: usize = 1 << 20;
/// Retries for engines that are meant to get through the faults.
const PATIENT: usize = 10;

/// A proxy in front of the test server, the runtime it runs on, and a key prefix of its own.
struct Harness {
    proxy: FaultProxy,
    rt: tokio::runtime::Runtime,
    url: String,
    upstream: String,
}

impl Harness {
    /// `None` only when S3 tests are skipped on purpose; a missing server panics.
    fn new(tag: &str) -> Option<Harness> {
        if !s3::s3_available() {
            return None;
        }
        let upstream = s3::require_endpoint();
        let rt = tokio::runtime::Runtime::new().expect("test runtime");
        let proxy = rt.block_on(FaultProxy::start(s3::endpoint_addr(&upstream))).expect("start the fault proxy");
        let url = format!("s3://{}/{}", s3::bucket(), s3::unique_prefix(tag));
        Some(Harness { proxy, rt, url, upstream })
    }

    /// An engine whose every request goes through the proxy.
    fn faulty(&self, max_retries: usize) -> Engine {
        open_engine(&self.url, &self.proxy.endpoint(), max_retries)
    }

    /// An engine directly on the server: the clean path that judges what was stored.
    fn direct(&self) -> Engine {
        open_engine(&self.url, &self.upstream, 3)
    }

    fn plan(&self, plan: FaultPlan) {
        self.proxy.set_plan(plan);
    }

    fn stats(&self) -> FaultStats {
        self.proxy.stats()
    }

    /// Incomplete multipart uploads under the job, as the server (not the proxy) lists them.
    fn pending_uploads(&self) -> Vec<PendingUpload> {
        let direct = self.direct();
        let prefix = format!("{}/", direct.store().path(JOB));
        self.rt.block_on(list_pending(direct.store(), &prefix)).expect("list multipart uploads")
    }

    /// A plain S3 client on the proxy that never retries, to observe single requests.
    fn raw_client(&self) -> Arc<dyn ObjectStore> {
        let store = s3::builder(&self.proxy.endpoint())
            .with_retry(RetryConfig { max_retries: 0, ..RetryConfig::default() })
            .build()
            .expect("raw S3 client");
        Arc::new(store)
    }

    /// Stops the proxy once the test's checks passed, and tallies the faults it injected.
    fn finish(self) {
        let st = self.proxy.stats();
        common::reliability::record("store-fault", "503 responses", st.injected_errors);
        common::reliability::record("store-fault", "dropped connections", st.dropped);
        common::reliability::record("store-fault", "cut responses", st.truncated);
        common::reliability::record("store-fault", "delays", st.delayed);
        let Harness { proxy, rt, .. } = self;
        rt.block_on(proxy.shutdown());
    }
}

/// Small chunks, 5 MiB parts, 1 MiB reads, short backoffs and `max_retries` retries.
fn engine_config(max_retries: usize) -> EngineConfig {
    let store = StoreOptions {
        max_retries,
        retry_timeout: Duration::from_secs(30),
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(100),
        request_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(5),
        allow_http: Some(true),
        create_local_dir: true,
    };
    let persist = PersistConfig {
        chunk_size: 64 << 10,
        compression: Compression::None,
        workers: 2,
        inflight_bytes: 4 * ((64 << 10) + PART as u64),
        part_size: PART as u64,
        ..PersistConfig::default()
    };
    let read = ReadConfig { read_size: 1 << 20, parallel_reads: 4, workers: 2 };
    let commit = CommitConfig { deadline: Duration::from_secs(20), ..CommitConfig::default() };
    EngineConfig { store, persist, read, commit, io_threads: 2 }
}

fn open_engine(url: &str, endpoint: &str, max_retries: usize) -> Engine {
    let vars = [
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", s3::SECRET_ACCESS_KEY),
        ("AWS_REGION", s3::REGION),
        ("AWS_ALLOW_HTTP", "true"),
    ];
    let env = MapEnv(vars.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect());
    let cfg = engine_config(max_retries);
    let store = Store::open_with_env(url, &cfg.store, &env).expect("open the S3 store");
    Engine::new(store, cfg).expect("engine")
}

/// A deterministic snapshot of about `len` bytes of noise in two tensors.
fn snapshot(seed: u64, len: usize) -> Snapshot {
    let metas = vec![
        TensorMeta::new("model.weight", DType::F32, vec![(len / 8) as u64]).unwrap(),
        TensorMeta::new("optim.state", DType::U8, vec![(len / 2) as u64]).unwrap(),
    ];
    let table = TensorTable::packed(metas, 64).unwrap();
    let mut data = vec![0u8; table.total_len() as usize];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for word in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
    }
    Snapshot { table, data: Bytes::from(data), metadata: format!("{{\"seed\":{seed}}}").into_bytes() }
}

fn save(engine: &Engine, step: u64, snap: &Snapshot) -> Result<Manifest, Error> {
    let (info, m) = engine.save(JOB, step, 0, 1, snap, BTreeMap::new())?;
    let m = m.expect("rank 0 commits");
    assert_eq!(m.shards[0].size, info.size, "the manifest records the shard that was written");
    Ok(m)
}

/// Reads `step` back through `engine` and checks every byte, the table and the metadata.
fn assert_restores(engine: &Engine, step: u64, snap: &Snapshot) {
    let (header, back) = engine.restore(JOB, step, 0).unwrap_or_else(|e| panic!("restore of step {step}: {e}"));
    assert_eq!(header.index.table, snap.table, "step {step}: tensor table");
    assert_eq!(header.index.metadata, snap.metadata, "step {step}: metadata");
    assert!(back == snap.data, "step {step}: restored bytes differ from the saved ones");
}

/// What the clean path sees: `step` is committed, the newest sound step, verifies and restores.
fn assert_committed(direct: &Engine, step: u64, snap: &Snapshot) {
    let report = direct.verify(JOB, step).unwrap_or_else(|e| panic!("verify step {step}: {e}"));
    assert!(report.ok(), "step {step} fails verification: {:?}", report.problems);
    assert_restores(direct, step, snap);
}

fn latest_step(engine: &Engine) -> Option<u64> {
    engine.latest(JOB).expect("latest").map(|m| m.step)
}

fn assert_not_committed(direct: &Engine, step: u64) {
    let e = direct.manifest(JOB, step).expect_err("a failed save must not leave a MANIFEST");
    assert_eq!(e.kind(), ErrorKind::NotFound, "manifest of step {step}: {e}");
    let listed = direct.steps(JOB).expect("steps");
    assert!(
        !listed.iter().any(|s| s.step == step && s.state == StepState::Committed),
        "step {step} is listed as committed: {listed:?}"
    );
}

/// A write fault that exhausted the retries surfaces as the store's transient error.
fn assert_transient(e: &Error, what: &str) {
    assert_eq!(e.kind(), ErrorKind::Transient, "{what}: {e}");
    assert!(matches!(e, Error::Store { .. }), "{what}: expected a store error, got {e:?}");
}

fn writes() -> Option<Vec<Method>> {
    Some(vec![Method::PUT, Method::POST])
}

#[test]
fn transient_503s_on_writes_are_retried() {
    let Some(h) = Harness::new("faults-503") else { return };
    let engine = h.faulty(PATIENT);
    let direct = h.direct();

    // The first three writes of a multipart save are refused: its create, three times over.
    h.plan(FaultPlan { fail_first_n: 3, only_methods: writes(), ..FaultPlan::default() });
    let big = snapshot(1, BIG);
    let m = save(&engine, 1, &big).expect("save through three 503s");
    assert_eq!(h.stats().injected_errors, 3, "{:?}", h.stats());
    assert_eq!(direct.manifest(JOB, 1).expect("manifest of step 1"), m);

    // Random 503s on 30% of writes, for a multipart save and a single-PUT one.
    h.plan(FaultPlan { error_rate: 0.3, only_methods: writes(), seed: 7, ..FaultPlan::default() });
    let before = h.stats();
    let big2 = snapshot(2, BIG + PART / 2);
    save(&engine, 2, &big2).expect("multipart save through random 503s");
    let small = snapshot(3, SMALL);
    save(&engine, 3, &small).expect("single-put save through random 503s");
    let after = h.stats();
    assert!(after.injected_errors > before.injected_errors, "no 503 was injected: {after:?}");

    h.plan(FaultPlan::default());
    assert_committed(&direct, 1, &big);
    assert_committed(&direct, 2, &big2);
    assert_committed(&direct, 3, &small);
    assert_eq!(latest_step(&direct), Some(3));
    assert_eq!(latest_step(&engine), Some(3));
    assert!(h.pending_uploads().is_empty(), "uploads left behind: {:?}", h.pending_uploads());
    h.finish();
}

#[test]
fn dropped_connections_and_delays_are_retried() {
    let Some(h) = Harness::new("faults-drop") else { return };
    let engine = h.faulty(PATIENT);
    let direct = h.direct();

    // Every method: the committer's listings and header reads are hit too.
    h.plan(FaultPlan {
        drop_rate: 0.3,
        delay: Duration::from_millis(50),
        delay_rate: 0.5,
        seed: 11,
        ..FaultPlan::default()
    });
    let big = snapshot(11, BIG);
    save(&engine, 1, &big).expect("multipart save through drops and delays");
    let small = snapshot(12, SMALL);
    save(&engine, 2, &small).expect("single-put save through drops and delays");
    let stats = h.stats();
    assert!(stats.dropped > 0 && stats.delayed > 0, "no drop or no delay was injected: {stats:?}");

    h.plan(FaultPlan::default());
    assert_committed(&direct, 1, &big);
    assert_committed(&direct, 2, &small);
    assert_eq!(latest_step(&direct), Some(2));
    assert!(h.pending_uploads().is_empty(), "uploads left behind: {:?}", h.pending_uploads());
    h.finish();
}

#[test]
fn permanent_write_failure_fails_cleanly_and_keeps_the_last_commit() {
    let Some(h) = Harness::new("faults-permanent") else { return };
    let engine = h.faulty(2);
    let direct = h.direct();
    let good = snapshot(21, SMALL);
    save(&engine, 1, &good).expect("save without faults");

    // Every write refused: the multipart create of a big save, and the single PUT of a small one.
    h.plan(FaultPlan { error_rate: 1.0, only_methods: writes(), seed: 1, ..FaultPlan::default() });
    let e = save(&engine, 2, &snapshot(22, BIG)).expect_err("a save with every write refused");
    assert_transient(&e, "multipart save with every write refused");
    let e = save(&engine, 3, &snapshot(23, SMALL)).expect_err("a save with every write refused");
    assert_transient(&e, "single-put save with every write refused");
    assert!(h.stats().injected_errors >= 6, "retries were not attempted: {:?}", h.stats());

    // Parts refused after the upload was created: the engine must abort its upload.
    h.plan(FaultPlan { error_rate: 1.0, only_methods: Some(vec![Method::PUT]), ..FaultPlan::default() });
    let e = save(&engine, 4, &snapshot(24, BIG)).expect_err("a save whose parts are refused");
    assert_transient(&e, "multipart save with every part refused");
    assert!(matches!(e, Error::Store { op: "put part", .. }), "the upload should have failed on a part: {e:?}");
    h.plan(FaultPlan::default());
    assert!(h.pending_uploads().is_empty(), "a failed save left its upload: {:?}", h.pending_uploads());

    // Parts and the abort refused: the upload stays behind, and retention aborts it.
    h.plan(FaultPlan {
        error_rate: 1.0,
        only_methods: Some(vec![Method::PUT, Method::DELETE]),
        ..FaultPlan::default()
    });
    let e = save(&engine, 5, &snapshot(25, BIG)).expect_err("a save whose parts and abort are refused");
    assert_transient(&e, "multipart save with parts and abort refused");
    h.plan(FaultPlan::default());
    let left = h.pending_uploads();
    let prefix = format!("{}/rank-0.", direct.store().path(&layout::step_dir(JOB, 5)));
    let ours = |key: &str| key.strip_prefix(&prefix).is_some_and(|rest| rest.ends_with(".ckpt"));
    assert!(left.len() == 1 && ours(&left[0].key), "expected the one upload of step 5, found {left:?}");
    let policy = RetentionPolicy { upload_max_age: Duration::ZERO, ..RetentionPolicy::default() };
    let report = direct.gc(JOB, &policy).expect("gc");
    assert_eq!(report.aborted_uploads, 1, "{report:?}");
    assert_eq!(report.kept, vec![1], "{report:?}");
    assert!(h.pending_uploads().is_empty(), "gc left an upload: {:?}", h.pending_uploads());

    // The shard is stored, then the MANIFEST's create-only PUT is refused.
    engine.write_shard(JOB, 6, 0, 1, &snapshot(26, SMALL)).expect("shard without faults");
    h.plan(FaultPlan { error_rate: 1.0, only_methods: Some(vec![Method::PUT]), ..FaultPlan::default() });
    let e = engine.commit_when_complete(JOB, 6, 1, BTreeMap::new()).expect_err("a commit whose MANIFEST is refused");
    assert_transient(&e, "commit with the MANIFEST refused");
    h.plan(FaultPlan::default());
    let step6 = direct.steps(JOB).expect("steps").into_iter().find(|s| s.step == 6).expect("step 6 is listed");
    assert_eq!(step6.state, StepState::Uncommitted, "{step6:?}");

    for step in 2..=6 {
        assert_not_committed(&direct, step);
    }
    assert_eq!(latest_step(&direct), Some(1));
    assert_eq!(direct.latest_valid(JOB).expect("latest_valid").map(|m| m.step), Some(1));
    assert_committed(&direct, 1, &good);
    h.finish();
}

#[test]
fn read_faults_are_retried_or_fail_cleanly() {
    let Some(h) = Harness::new("faults-read") else { return };
    let direct = h.direct();
    let old = snapshot(31, SMALL);
    save(&direct, 1, &old).expect("save step 1");
    let snap = snapshot(32, BIG);
    save(&direct, 2, &snap).expect("save step 2");
    let reads = || Some(vec![Method::GET]);

    // Errors, drops and truncated bodies on reads, with retries: everything comes back.
    let patient = h.faulty(PATIENT);
    h.plan(FaultPlan {
        error_rate: 0.15,
        drop_rate: 0.15,
        truncate_rate: 0.15,
        only_methods: reads(),
        seed: 3,
        ..FaultPlan::default()
    });
    assert_restores(&patient, 2, &snap);
    assert_eq!(patient.latest_valid(JOB).expect("latest_valid through read faults").map(|m| m.step), Some(2));
    let stats = h.stats();
    assert!(stats.injected_errors > 0 && stats.dropped > 0 && stats.truncated > 0, "faults missing: {stats:?}");

    // Every body cut in half and no retries: a restore fails, with a transient error.
    let impatient = h.faulty(0);
    h.plan(FaultPlan { truncate_rate: 1.0, only_methods: reads(), ..FaultPlan::default() });
    let e = impatient.restore(JOB, 2, 0).expect_err("a restore whose every read is truncated");
    assert_eq!(e.kind(), ErrorKind::Transient, "{e}");
    let e = impatient.latest(JOB).expect_err("latest whose every read is truncated");
    assert_eq!(e.kind(), ErrorKind::Transient, "{e}");

    // Some reads fail and nothing retries: each call either returns the truth or fails
    // transiently. Never other bytes, and never a fallback to the older step.
    let mut failures = 0;
    for seed in 0..8 {
        h.plan(FaultPlan {
            error_rate: 0.05,
            drop_rate: 0.05,
            truncate_rate: 0.1,
            only_methods: reads(),
            seed,
            ..FaultPlan::default()
        });
        match impatient.restore(JOB, 2, 0) {
            Ok((_, back)) => assert!(back == snap.data, "seed {seed}: restore returned other bytes"),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Transient, "seed {seed}: {e}");
                failures += 1;
            }
        }
        match impatient.latest(JOB) {
            Ok(m) => assert_eq!(m.map(|m| m.step), Some(2), "seed {seed}: a read fault moved latest"),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Transient, "seed {seed}: {e}");
                failures += 1;
            }
        }
    }
    assert!(failures > 0, "no read fault reached the engine");

    h.plan(FaultPlan::default());
    assert_committed(&direct, 2, &snap);
    assert_committed(&direct, 1, &old);
    h.finish();
}

#[test]
fn verify_does_not_report_a_failed_manifest_read_as_damage() {
    let Some(h) = Harness::new("faults-verify-manifest") else { return };
    let direct = h.direct();
    let snap = snapshot(41, SMALL);
    save(&direct, 1, &snap).expect("save step 1");
    let impatient = h.faulty(0);

    h.plan(FaultPlan { error_rate: 1.0, only_methods: Some(vec![Method::GET]), ..FaultPlan::default() });
    match impatient.verify(JOB, 1) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Transient, "{e}"),
        Ok(report) => panic!("a sound step reported as damaged because its MANIFEST read failed: {report:?}"),
    }
    h.plan(FaultPlan::default());
    assert_committed(&direct, 1, &snap);
    h.finish();
}

#[test]
fn verify_does_not_report_failed_chunk_reads_as_damage() {
    let Some(h) = Harness::new("faults-verify-chunks") else { return };
    let direct = h.direct();
    let snap = snapshot(42, 3 << 20);
    save(&direct, 1, &snap).expect("save step 1");
    let impatient = h.faulty(0);

    // The MANIFEST and the shard's tail read fine, then a chunk read is cut short.
    h.plan(truncations(seed_for(&h, &[false, false, true]), &[Method::GET]));
    let before = h.stats();
    match impatient.verify(JOB, 1) {
        Ok(report) => {
            assert!(report.ok(), "a sound step reported as damaged because a chunk read was cut: {:?}", report.problems)
        }
        Err(e) => assert_eq!(e.kind(), ErrorKind::Transient, "{e}"),
    }
    assert!(h.stats().truncated > before.truncated, "no read was cut: {:?}", h.stats());
    h.plan(FaultPlan::default());
    assert_committed(&direct, 1, &snap);
    h.finish();
}

/// A plan that cuts half of the responses to `methods`, at random from `seed`.
fn truncations(seed: u64, methods: &[Method]) -> FaultPlan {
    FaultPlan { truncate_rate: 0.5, only_methods: Some(methods.to_vec()), seed, ..FaultPlan::default() }
}

/// The first seed whose [`truncations`] plan cuts consecutive matching requests as `pattern` says
/// (`true`: cut), found by sending single PUTs through the proxy with a client that never
/// retries. Decisions depend only on the seed and the request's position, not its method.
fn seed_for(h: &Harness, pattern: &[bool]) -> u64 {
    let raw = h.raw_client();
    let probe = Path::from(format!("{}/probe", s3::unique_prefix("faults-seed-probe")));
    let found = (0..512).find(|&seed| {
        h.plan(truncations(seed, &[Method::PUT]));
        pattern.iter().all(|&cut| {
            let put = h.rt.block_on(raw.put(&probe, PutPayload::from_static(b"probe")));
            put.is_err() == cut
        })
    });
    h.plan(FaultPlan::default());
    let _ = h.rt.block_on(raw.delete(&probe));
    found.expect("no seed in 0..512 gives the truncation pattern")
}

#[test]
fn a_stored_but_unacknowledged_manifest_is_a_successful_commit() {
    let Some(h) = Harness::new("faults-ambiguous") else { return };
    let engine = h.faulty(PATIENT);
    let direct = h.direct();

    // The committer's create-only PUT is stored and its response lost; the client's retry is
    // refused because the MANIFEST exists. That MANIFEST is the engine's own.
    let snap = snapshot(51, SMALL);
    engine.write_shard(JOB, 1, 0, 1, &snap).expect("shard");
    h.plan(truncations(seed_for(&h, &[true, false]), &[Method::PUT]));
    let before = h.stats();
    let m = engine
        .commit_when_complete(JOB, 1, 1, BTreeMap::new())
        .expect("a commit whose MANIFEST landed must be reported as committed");
    assert_eq!(h.stats().truncated, before.truncated + 1, "the MANIFEST PUT was not cut: {:?}", h.stats());
    h.plan(FaultPlan::default());
    assert_eq!(direct.manifest(JOB, 1).expect("manifest"), m);
    assert_committed(&direct, 1, &snap);

    // The same through the isolator's explicit commit.
    let snap2 = snapshot(52, SMALL);
    let info = engine.write_shard(JOB, 2, 0, 1, &snap2).expect("shard");
    h.plan(truncations(seed_for(&h, &[true, false]), &[Method::PUT]));
    let before = h.stats();
    let m2 = engine
        .commit(JOB, 2, 1, vec![info.entry()], BTreeMap::new())
        .expect("an explicit commit whose MANIFEST landed must be reported as committed");
    assert_eq!(h.stats().truncated, before.truncated + 1, "the MANIFEST PUT was not cut: {:?}", h.stats());
    h.plan(FaultPlan::default());
    assert_eq!(direct.manifest(JOB, 2).expect("manifest"), m2);
    assert_committed(&direct, 2, &snap2);
    assert_eq!(latest_step(&direct), Some(2));

    // Without retries the engine cannot tell: it must say so with a transient error (never
    // corrupt or conflict), and the step it could not confirm is sound.
    let impatient = h.faulty(0);
    let snap3 = snapshot(53, SMALL);
    impatient.write_shard(JOB, 3, 0, 1, &snap3).expect("shard");
    h.plan(FaultPlan { truncate_rate: 1.0, only_methods: Some(vec![Method::PUT]), ..FaultPlan::default() });
    let e = impatient.commit_when_complete(JOB, 3, 1, BTreeMap::new()).expect_err("an unacknowledged commit");
    assert_transient(&e, "commit without retries whose response was lost");
    h.plan(FaultPlan::default());
    assert_committed(&direct, 3, &snap3);
    assert_eq!(latest_step(&direct), Some(3));
    h.finish();
}

#[test]
fn unacknowledged_multipart_requests_leave_nothing_behind() {
    let Some(h) = Harness::new("faults-multipart-ack") else { return };
    let engine = h.faulty(PATIENT);
    let direct = h.direct();
    let first = snapshot(61, SMALL);
    save(&engine, 1, &first).expect("save without faults");

    // A multipart save's POSTs are its create and its complete. Each case cuts one response:
    // the server acted, the engine did not hear it. The save then either succeeds or fails with a
    // transient error and commits nothing; a retried save commits; retention aborts any upload
    // the engine lost track of.
    for (step, pattern) in [(2, [true, false]), (3, [false, true])] {
        let snap = snapshot(60 + step, BIG);
        h.plan(truncations(seed_for(&h, &pattern), &[Method::POST]));
        let before = h.stats();
        match save(&engine, step, &snap) {
            Ok(m) => assert_eq!(direct.manifest(JOB, step).expect("manifest"), m),
            Err(e) => {
                assert_transient(&e, &format!("step {step}, POSTs cut as {pattern:?}"));
                h.plan(FaultPlan::default());
                assert_not_committed(&direct, step);
                assert_eq!(latest_step(&direct), Some(step - 1));
                save(&engine, step, &snap).expect("the retried save");
            }
        }
        assert!(h.stats().truncated > before.truncated, "step {step}: no response was cut: {:?}", h.stats());
        h.plan(FaultPlan::default());
        assert_committed(&direct, step, &snap);
        assert_eq!(latest_step(&direct), Some(step));
        let pending = h.pending_uploads();
        let report = direct.gc(JOB, &RetentionPolicy::default()).expect("gc");
        assert_eq!(report.aborted_uploads, pending.len() as u64, "step {step}: {report:?} for {pending:?}");
        assert!(h.pending_uploads().is_empty(), "step {step}: gc left {:?}", h.pending_uploads());
        assert_committed(&direct, step, &snap);
    }
    assert_committed(&direct, 1, &first);
    h.finish();
}
