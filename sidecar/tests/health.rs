//! Health monitoring (issue #5) through its public API: parsers over real-format fixtures, an IB
//! sysfs tree that changes, and the whole `Health` with a kernel-log file, NCCL logs, paused-time
//! hang detection, drills and the NVML reporter on a machine without a GPU.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use ckpt_core::Phase;
use ckptd::health::{Action, Decision, Health, HealthArgs, Injection, Policy, Source};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/health");

/// Guards a wait for something that must happen; it is a failure bound, not a latency claim.
const PATIENCE: Duration = Duration::from_secs(30);

fn fixture(name: &str) -> String {
    std::fs::read_to_string(Path::new(FIXTURES).join(name)).unwrap()
}

fn append(path: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new().append(true).create(true).open(path).unwrap();
    writeln!(f, "{line}").unwrap();
}

async fn next(rx: &mut mpsc::Receiver<Decision>) -> Decision {
    tokio::time::timeout(PATIENCE, rx.recv()).await.expect("no decision in time").expect("controller stopped")
}

/// Starts `Health` on the current runtime with `flags`; NVML and IB off unless asked for.
fn start(flags: &[&str]) -> (Health, mpsc::Receiver<Decision>, Registry, CancellationToken) {
    let args = HealthArgs::from_flags(flags.iter().copied()).unwrap();
    let mut registry = Registry::default();
    let shutdown = CancellationToken::new();
    let (h, rx) =
        Health::start(&args, "node-a".into(), &mut registry, &tokio::runtime::Handle::current(), shutdown.clone())
            .unwrap();
    (h, rx, registry, shutdown)
}

#[test]
fn kmsg_fixture_has_one_line_per_xid_class_and_each_maps_to_its_action() {
    let policy = Policy::builtin();
    let parsed: Vec<(u32, Option<String>, Action)> = fixture("kmsg.log")
        .lines()
        .filter_map(ckptd::health::kmsg::parse_xid)
        .map(|x| (x.xid, x.pci, policy.rule(&format!("xid-{}", x.xid)).0.action))
        .collect();
    let xids: Vec<u32> = parsed.iter().map(|p| p.0).collect();
    assert_eq!(xids, [8, 13, 13, 31, 43, 45, 48, 63, 64, 74, 79, 92, 94, 95, 119, 120, 140, 154, 250, 109, 95]);
    let action = |xid| parsed.iter().find(|p| p.0 == xid).unwrap().2;
    assert_eq!(action(13), Action::RestartJob);
    assert_eq!(action(45), Action::Ignore);
    assert_eq!(action(48), Action::ResetGpu);
    assert_eq!(action(64), Action::DrainNode);
    assert_eq!(action(79), Action::DrainNode);
    assert_eq!(action(94), Action::RestartJob);
    assert_eq!(action(95), Action::ResetGpu);
    assert_eq!(action(119), Action::ResetGpu);
    assert_eq!(action(250), Action::RestartJob, "unknown xid → xid-default");
    assert!(parsed.iter().all(|p| p.1.as_deref().is_some_and(|a| a.ends_with(":00.0"))));
    let sxids: Vec<(&str, Action)> = fixture("kmsg.log")
        .lines()
        .filter_map(ckptd::health::kmsg::parse_sxid)
        .map(|(k, _)| (k, policy.rule(k).0.action))
        .collect();
    assert_eq!(sxids, [("nvswitch-nonfatal", Action::Ignore), ("nvswitch-fatal", Action::DrainNode)]);
}

#[test]
fn nccl_fixture_has_one_line_per_failure_kind() {
    let found: Vec<(&str, Option<u32>)> = fixture("nccl.log")
        .lines()
        .filter_map(|l| ckptd::health::nccl::classify(l).map(|k| (k, ckptd::health::nccl::rank_of(l))))
        .collect();
    assert_eq!(
        found,
        [
            ("nccl-timeout", Some(3)),
            ("nccl-watchdog-stuck", Some(0)),
            ("nccl-remote-peer", None),
            ("nccl-remote-error", Some(5)),
            ("nccl-system-error", None),
            ("nccl-remote-error", None),
            ("nccl-system-error", None),
            ("nccl-internal-error", None),
            ("nccl-internal-error", None),
            ("nccl-net-error", None),
            ("nccl-net-error", None),
        ]
    );
}

fn port(root: &Path, dev: &str, n: u32, state: &str, phys: &str) {
    let p = root.join(dev).join("ports").join(n.to_string());
    std::fs::create_dir_all(p.join("counters")).unwrap();
    std::fs::write(p.join("state"), format!("{state}\n")).unwrap();
    std::fs::write(p.join("phys_state"), format!("{phys}\n")).unwrap();
    std::fs::write(p.join("rate"), "400 Gb/sec (4X NDR)\n").unwrap();
}

fn counter(root: &Path, dev: &str, n: u32, name: &str, v: u64) {
    std::fs::write(root.join(dev).join("ports").join(n.to_string()).join("counters").join(name), format!("{v}\n"))
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn ib_tree_that_changes_over_time() {
    use ckptd::health::ib::{Monitor, Thresholds, read_snapshot};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for dev in ["mlx5_0", "mlx5_1"] {
        port(root, dev, 1, "4: ACTIVE", "5: LinkUp");
        for c in ["link_downed", "symbol_error", "port_rcv_errors", "link_error_recovery"] {
            counter(root, dev, 1, c, 0);
        }
    }
    port(root, "mlx5_2", 1, "1: DOWN", "3: Disabled"); // unused port, down from the start
    let th = Thresholds {
        flap_count: 3,
        flap_window: Duration::from_secs(600),
        symbol_rate: 10.0,
        rcv_rate: 10.0,
        down_grace: Duration::from_secs(5),
    };
    let mut m = Monitor::new(th);
    let t0 = Instant::now();
    let s = Duration::from_secs(1);
    let kinds = |v: Vec<ckptd::health::Finding>| {
        v.into_iter().map(|f| (f.kind, f.port.unwrap_or_default())).collect::<Vec<_>>()
    };
    assert!(m.observe(&read_snapshot(root), t0).is_empty(), "baseline, including the port down at start");
    assert!(m.observe(&read_snapshot(root), t0 + s).is_empty());

    // A 2-second bounce: only its link_downed increment is reported.
    port(root, "mlx5_1", 1, "1: DOWN", "2: Polling");
    counter(root, "mlx5_1", 1, "link_downed", 1);
    assert_eq!(
        kinds(m.observe(&read_snapshot(root), t0 + 2 * s)),
        [("ib-link-downed".to_owned(), "mlx5_1/1".to_owned())]
    );
    port(root, "mlx5_1", 1, "4: ACTIVE", "5: LinkUp");
    assert!(m.observe(&read_snapshot(root), t0 + 4 * s).is_empty());
    // Down for good: reported once the grace has passed, and once.
    port(root, "mlx5_1", 1, "1: DOWN", "3: Disabled");
    assert!(m.observe(&read_snapshot(root), t0 + 5 * s).is_empty());
    assert!(m.observe(&read_snapshot(root), t0 + 9 * s).is_empty());
    let f = m.observe(&read_snapshot(root), t0 + 10 * s);
    assert_eq!(kinds(f.clone()), [("ib-port-down".to_owned(), "mlx5_1/1".to_owned())]);
    assert!(f[0].evidence.contains("4: ACTIVE → 1: DOWN"), "{}", f[0].evidence);
    assert!(m.observe(&read_snapshot(root), t0 + 11 * s).is_empty());
    // Slow symbol errors are noise; a spike is reported, and a counter reset is a new baseline.
    counter(root, "mlx5_0", 1, "symbol_error", 5);
    assert!(m.observe(&read_snapshot(root), t0 + 12 * s).is_empty());
    counter(root, "mlx5_0", 1, "symbol_error", 500);
    counter(root, "mlx5_0", 1, "port_rcv_errors", 50);
    let f = m.observe(&read_snapshot(root), t0 + 13 * s);
    assert_eq!(
        kinds(f.clone()),
        [("ib-symbol-errors".to_owned(), "mlx5_0/1".to_owned()), ("ib-rcv-errors".into(), "mlx5_0/1".into())]
    );
    assert!(f[0].evidence.contains("5 → 500"), "{}", f[0].evidence);
    counter(root, "mlx5_0", 1, "symbol_error", 0);
    assert!(m.observe(&read_snapshot(root), t0 + 14 * s).is_empty());

    // Flapping: up, down, up, down, up within the window.
    let mut found = Vec::new();
    for (i, (state, phys)) in [
        ("4: ACTIVE", "5: LinkUp"),
        ("1: DOWN", "2: Polling"),
        ("4: ACTIVE", "5: LinkUp"),
        ("1: DOWN", "2: Polling"),
        ("4: ACTIVE", "5: LinkUp"),
    ]
    .into_iter()
    .enumerate()
    {
        port(root, "mlx5_1", 1, state, phys);
        found.extend(kinds(m.observe(&read_snapshot(root), t0 + s * (20 + 10 * i as u32))));
    }
    let flaps = found.iter().filter(|(k, _)| k == "ib-flap").count();
    let downs = found.iter().filter(|(k, _)| k == "ib-port-down").count();
    // Each down was seen at one poll only (shorter than the grace): the flap is the finding.
    assert_eq!((flaps, downs), (1, 0), "{found:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ib_port_going_down_drains_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    port(root, "mlx5_0", 1, "4: ACTIVE", "5: LinkUp");
    counter(root, "mlx5_0", 1, "link_downed", 7);
    let (h, mut rx, _registry, shutdown) = start(&[
        "--no-kmsg",
        "--no-nvml",
        "--ib-root",
        root.to_str().unwrap(),
        "--ib-poll",
        "50ms",
        "--ib-down-grace",
        "100ms",
    ]);
    assert!(h.status().reporters["ib"].last_sample.as_deref().is_some_and(|s| s.contains("mlx5_0/1 4: ACTIVE")));
    port(root, "mlx5_0", 1, "1: DOWN", "3: Disabled");
    let d = next(&mut rx).await;
    assert_eq!(
        (d.finding.kind.as_str(), d.finding.port.as_deref(), d.action),
        ("ib-port-down", Some("mlx5_0/1"), Action::DrainNode)
    );
    assert!(d.finding.evidence.contains("4: ACTIVE → 1: DOWN"), "{}", d.finding.evidence);
    shutdown.cancel();
    assert!(h.stopped(PATIENCE).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xid_79_appended_to_the_kmsg_file_drains_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let kmsg = dir.path().join("kmsg");
    append(&kmsg, "NVRM: Xid (PCI:0000:3b:00): 79, pid=1, name=old, GPU has fallen off the bus.");
    let k = kmsg.to_str().unwrap();
    let (h, mut rx, registry, shutdown) =
        start(&["--kmsg", k, "--no-nvml", "--no-ib", "--gpu-pci-map", "0=0000:18:00.0,1=0000:3b:00.0"]);
    // The line written before start-up is history; the new one is a fault.
    append(
        &kmsg,
        "4,2214,8123500000,-;NVRM: Xid (PCI:0000:3b:00): 13, pid=77, name=python3, Graphics Exception: ESR 0x404600=0x80000002",
    );
    append(&kmsg, "NVRM: Xid (PCI:0000:3b:00): 79, pid=4242, name=python3, GPU has fallen off the bus.");
    let d = next(&mut rx).await;
    assert_eq!((d.finding.kind.as_str(), d.action), ("xid-13", Action::RestartJob));
    let d = next(&mut rx).await;
    assert_eq!((d.finding.kind.as_str(), d.action, d.finding.source), ("xid-79", Action::DrainNode, Source::Kmsg));
    assert_eq!(
        (d.finding.gpu, d.finding.pci.as_deref(), d.finding.node.as_str()),
        (Some(1), Some("0000:3b:00.0"), "node-a")
    );
    assert!(d.finding.evidence.contains("pid=4242"));
    assert_eq!(d.fault_action(), ckptd_proto::v1::FaultAction::DrainNode);

    let status = h.status();
    assert!(status.reporters["kmsg"].enabled);
    assert!(!status.reporters["nvml"].enabled);
    assert_eq!(status.active_faults.first().map(|f| f.action), Some(Action::DrainNode));
    let text = status.to_string();
    assert!(text.contains("kmsg     enabled") && text.contains("drain-node  xid-79"), "{text}");
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["active_faults"][0]["finding"]["kind"], "xid-79");
    assert_eq!(json["reporters"]["nvml"]["enabled"], false);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(r#"ckptd_health_findings_total{source="kmsg",kind="xid-79",action="drain-node"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"ckptd_health_reporter_enabled{reporter="nvml"} 0"#), "{text}");

    shutdown.cancel();
    assert!(h.stopped(PATIENCE).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kmsg_file_created_after_start_is_read_from_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let kmsg = dir.path().join("later");
    let (h, mut rx, _registry, shutdown) = start(&["--kmsg", kmsg.to_str().unwrap(), "--no-nvml", "--no-ib"]);
    assert!(h.status().reporters["kmsg"].enabled);
    append(
        &kmsg,
        "NVRM: Xid (PCI:0000:3b:00): 119, pid=1, name=python3, Timeout after 6s of waiting for RPC response from GPU0 GSP!",
    );
    let d = next(&mut rx).await;
    assert_eq!((d.finding.kind.as_str(), d.action), ("xid-119", Action::ResetGpu));
    shutdown.cancel();
    assert!(h.stopped(PATIENCE).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_input_is_read_too() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("kmsg.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (h, mut rx, _registry, shutdown) = start(&["--kmsg", fifo.to_str().unwrap(), "--no-nvml", "--no-ib"]);
    let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    writeln!(w, "3,99,1000,-;NVRM: Xid (PCI:0000:86:00): 64, pid='<unknown>', name=<unknown>, Row Remapper Error")
        .unwrap();
    let d = next(&mut rx).await;
    assert_eq!((d.finding.kind.as_str(), d.action), ("xid-64", Action::DrainNode));
    shutdown.cancel();
    assert!(h.stopped(PATIENCE).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nccl_logs_and_flight_recorder_dumps_become_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("nccl");
    let fr = dir.path().join("fr");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::create_dir_all(&fr).unwrap();
    let old = logs.join("nccl.node-a.100.log");
    append(
        &old,
        "[rank1]:[E1128] [Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=1) ran for 600000 milliseconds before timing out.",
    );
    std::fs::write(fr.join("nccl_trace_rank_9"), b"old dump").unwrap();
    let pattern = format!("{}/nccl.%h.%p.log", logs.display());
    let (h, mut rx, _registry, shutdown) = start(&[
        "--no-kmsg",
        "--no-nvml",
        "--no-ib",
        "--nccl-log-glob",
        &pattern,
        "--flight-recorder-dir",
        fr.to_str().unwrap(),
        "--nccl-poll",
        "50ms",
    ]);
    let lines = fixture("nccl.log");
    let timeout = lines.lines().find(|l| l.contains("Watchdog caught")).unwrap();
    append(&old, timeout);
    let d = next(&mut rx).await;
    assert_eq!((d.finding.kind.as_str(), d.finding.rank, d.action), ("nccl-timeout", Some(3), Action::RestartJob));
    assert_eq!(d.finding.evidence, timeout, "the raw line is the evidence");
    // A log that appears later is read from its start.
    let new = logs.join("nccl.node-a.200.log");
    let net = lines.lines().find(|l| l.contains("NET/IB : Got completion")).unwrap();
    append(&new, "node-a:200:200 [0] NCCL INFO Using network IB");
    append(&new, net);
    let d = next(&mut rx).await;
    assert_eq!(d.finding.kind, "nccl-net-error");
    std::fs::write(fr.join("nccl_trace_rank_3"), b"\x80\x02X\x0f\x00\x00\x00nccl:all_reduceX\x07\x00\x00\x00started")
        .unwrap();
    let d = next(&mut rx).await;
    assert_eq!((d.finding.kind.as_str(), d.finding.rank), ("nccl-flight-recorder", Some(3)));
    assert!(d.finding.evidence.contains("nccl:all_reduce"), "{}", d.finding.evidence);
    assert!(h.status().reporters["nccl"].enabled);
    shutdown.cancel();
    assert!(h.stopped(PATIENCE).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn hang_detection_with_paused_time() {
    let (h, mut rx, _registry, shutdown) =
        start(&["--no-kmsg", "--no-nvml", "--no-ib", "--hang-floor", "60s", "--hang-k", "10", "--hang-load", "1h"]);
    h.rank_attached(0, Some(2));
    h.heartbeat(0, 0, Phase::CheckpointLoad);
    // 50 minutes of checkpoint load: no decision (the time passes virtually).
    assert!(tokio::time::timeout(Duration::from_secs(50 * 60), rx.recv()).await.is_err(), "a long load is not a hang");
    for step in 0..30 {
        h.heartbeat(0, step, Phase::Step);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // Median step 2 s → budget = floor 60 s. No more heartbeats with a new step from here.
    let stalled = Instant::now();
    let d = tokio::time::timeout(Duration::from_secs(600), rx.recv()).await.expect("no hang decision").unwrap();
    let waited = stalled.elapsed();
    assert_eq!(
        (d.finding.kind.as_str(), d.finding.rank, d.finding.gpu, d.action),
        ("hang", Some(0), Some(2), Action::RestartJob)
    );
    assert!(
        waited >= Duration::from_secs(58) && waited <= Duration::from_secs(65),
        "detected after {waited:?} of virtual time"
    );
    shutdown.cancel();
    assert!(h.stopped(PATIENCE).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drills_are_refused_unless_allowed_and_use_the_real_path() {
    let (h, _rx, _r, shutdown) = start(&["--no-kmsg", "--no-nvml", "--no-ib"]);
    let e = h.inject(Injection::Xid { xid: 79, gpu: Some(0) }).unwrap_err();
    assert!(matches!(e, ckptd::Error::InjectDisabled), "{e}");
    assert_eq!(e.kind(), ckptd::ErrorKind::Config);
    shutdown.cancel();

    let (h, mut rx, _r, shutdown) =
        start(&["--no-kmsg", "--no-nvml", "--no-ib", "--allow-inject", "--gpu-pci-map", "0=0000:3b:00.0"]);
    assert!(h.status().inject_allowed);
    h.inject(Injection::Xid { xid: 79, gpu: Some(0) }).unwrap();
    let d = next(&mut rx).await;
    assert_eq!((d.finding.source, d.finding.kind.as_str(), d.action), (Source::Inject, "xid-79", Action::DrainNode));
    assert_eq!(d.finding.pci.as_deref(), Some("0000:3b:00.0"));
    h.inject(Injection::IbDown { port: "mlx5_0/1".into() }).unwrap();
    assert_eq!(next(&mut rx).await.finding.kind, "ib-port-down");
    h.rank_attached(4, None);
    h.inject(Injection::Hang { rank: None }).unwrap();
    let d = next(&mut rx).await;
    assert_eq!((d.finding.kind.as_str(), d.finding.rank, d.action), ("hang", Some(4), Action::RestartJob));
    shutdown.cancel();
    assert!(h.stopped(PATIENCE).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_policy_file_is_a_config_error_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("health.yaml");
    std::fs::write(&p, "rules:\n  xid-79:\n    action: explode\n").unwrap();
    let args = HealthArgs::from_flags(["--health-policy", p.to_str().unwrap(), "--no-nvml"]).unwrap();
    let e = Health::start(
        &args,
        "n".into(),
        &mut Registry::default(),
        &tokio::runtime::Handle::current(),
        CancellationToken::new(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ckptd::ErrorKind::Config);
    let msg = e.to_string();
    assert!(
        msg.contains("health.yaml") && msg.contains("explode") && msg.contains("drain-node") && !msg.contains('\n'),
        "{msg}"
    );
    let e = HealthArgs::from_flags(["--hang-k", "0"]).map(|a| {
        Health::start(
            &a,
            "n".into(),
            &mut Registry::default(),
            &tokio::runtime::Handle::current(),
            CancellationToken::new(),
        )
    });
    assert!(matches!(e, Ok(Err(ckptd::Error::Config { .. }))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nvml_reporter_says_disabled_without_a_gpu() {
    let (h, _rx, registry, shutdown) = start(&["--no-kmsg", "--no-ib"]);
    let gpu = ckptd::health::nvml::probe().is_ok();
    let nvml = h.status().reporters["nvml"].clone();
    assert_eq!(nvml.enabled, gpu, "{nvml:?}");
    if !gpu {
        assert!(nvml.detail.contains("NVML unavailable"), "{}", nvml.detail);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains(r#"ckptd_health_reporter_enabled{reporter="nvml"} 0"#), "{text}");
    }
    shutdown.cancel();
    assert!(h.stopped(PATIENCE).await.is_empty());
}

/// Reads real NVML values; runs only with `CKPTD_GPU_TESTS=1` on a machine with NVIDIA GPUs.
#[test]
#[allow(clippy::print_stderr)]
fn nvml_reads_real_values() {
    if std::env::var("CKPTD_GPU_TESTS").as_deref() != Ok("1") {
        return;
    }
    let samples = ckptd::health::nvml::probe().expect("CKPTD_GPU_TESTS=1 but NVML does not initialise");
    assert!(!samples.is_empty(), "NVML sees no GPU");
    for s in &samples {
        assert!(!s.lost, "GPU {} is lost", s.index);
        assert!(s.pci.as_deref().and_then(ckptd::health::normalize_pci).is_some(), "{s:?}");
        assert!(s.throttle.is_some(), "throttle reasons unreadable: {s:?}");
        eprintln!("{s:?}");
    }
}

mod parsers_never_panic {
    use ckptd::health::{kmsg, nccl, normalize_pci};
    use proptest::prelude::*;

    proptest! {
        /// Any input, including invalid UTF-8 turned lossy and huge numbers: no panic.
        #[test]
        fn on_any_line(line in ".{0,300}") {
            let _ = kmsg::parse_xid(&line);
            let _ = kmsg::strip_header(&line);
            let _ = kmsg::parse_sxid(&line);
            let _ = nccl::classify(&line);
            let _ = nccl::rank_of(&line);
            let _ = normalize_pci(&line);
        }

        /// A well-formed XID line, in any of the three framings, parses back to its fields.
        #[test]
        fn xid_round_trip(
            xid in 1u32..1000,
            domain in 0u32..0x10000,
            bus in 0u32..0x100,
            dev in 0u32..0x20,
            pid in proptest::option::of(1u32..4_000_000),
            text in "[ -~]{0,80}",
            framing in 0u8..3,
        ) {
            let pid_s = pid.map_or("'<unknown>'".to_owned(), |p| p.to_string());
            let msg = format!("NVRM: Xid (PCI:{domain:04x}:{bus:02x}:{dev:02x}): {xid}, pid={pid_s}, name=python3, {text}");
            let line = match framing {
                0 => msg.clone(),
                1 => format!("4,1,2,-;{msg}"),
                _ => format!("[ 1.000000] {msg}"),
            };
            let x = kmsg::parse_xid(&line).expect("parses");
            prop_assert_eq!(x.xid, xid);
            prop_assert_eq!(x.pid, pid);
            prop_assert_eq!(x.pci, Some(format!("{domain:04x}:{bus:02x}:{dev:02x}.0")));
            prop_assert_eq!(x.message, msg.trim().to_owned());
        }

        #[test]
        fn nccl_dump_summary_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = nccl::summarize_dump(&bytes);
        }
    }
}
