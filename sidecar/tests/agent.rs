//! Sidecar mode end to end: a real `ckptd agent` process on a Unix socket, trainers that are real
//! processes (this test binary re-executed as `trainer_child`), killed with SIGKILL.
//!
//! What is checked: a snapshot whose trainer dies after `save` + `fence` is still committed and
//! verifies; a slot a trainer sealed but never handed over is flushed by the agent; a restarted
//! trainer restores from the agent's memory with no storage read; a restarted agent prefetches
//! from storage; four trainers share one agent; hostile clients get errors while the agent and
//! other ranks carry on; snapshot-now reaches a trainer that calls `heartbeat`; metrics and SIGTERM.

#[path = "../../ckpt-core/tests/common/reliability.rs"]
mod reliability;
#[path = "support/slow_clients.rs"]
mod slow_clients;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ckpt_core::DType;
use ckpt_core::arena::{Arena, SlotState};
use ckpt_core::copy::Device;
use ckptd::client::{Checkpointer, CheckpointerConfig, Phase, TensorRef};
use ckptd_proto::v1 as pb;

const CHILD_ENV: &str = "CKPTD_TEST_TRAINER";
const JOB: &str = "job";
/// Longest a test waits for something a real process does; never asserted as a duration.
const PATIENCE: Duration = Duration::from_secs(120);

/// A training state derived from (rank, step), so any process can rebuild what was saved.
struct State {
    weights: Vec<f32>,
    counter: Vec<i64>,
}

impl State {
    fn of(rank: u32, step: u64, n: usize) -> State {
        State {
            weights: (0..n).map(|i| rank as f32 * 1000.0 + step as f32 + i as f32 * 0.25).collect(),
            counter: vec![step as i64 * 10 + i64::from(rank)],
        }
    }

    fn blank(n: usize) -> State {
        State { weights: vec![f32::NAN; n], counter: vec![-1] }
    }

    fn refs(&mut self) -> Vec<TensorRef> {
        vec![
            TensorRef {
                name: "model/w".into(),
                dtype: DType::F32,
                shape: vec![self.weights.len() as u64],
                addr: self.weights.as_mut_ptr() as u64,
                device: Device::Cpu,
            },
            TensorRef {
                name: "counter".into(),
                dtype: DType::I64,
                shape: vec![],
                addr: self.counter.as_mut_ptr() as u64,
                device: Device::Cpu,
            },
        ]
    }

    fn same_bits(&self, other: &State) -> bool {
        self.counter == other.counter
            && self.weights.len() == other.weights.len()
            && self.weights.iter().zip(&other.weights).all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

const N: usize = 200_000;

struct Agent {
    child: Child,
    socket: PathBuf,
    metrics: Option<String>,
    log: PathBuf,
}

impl Agent {
    fn start(dir: &Path, store: &str, arena_dir: &Path, extra: &[&str]) -> Agent {
        Self::start_with(dir, store, arena_dir, extra, &[])
    }

    fn start_with(dir: &Path, store: &str, arena_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        let socket = dir.join("agent.sock");
        let port = free_port();
        let metrics = format!("127.0.0.1:{port}");
        let log = dir.join(format!("agent-{}.log", Instant::now().elapsed().as_nanos() ^ u128::from(port)));
        let child = Command::new(env!("CARGO_BIN_EXE_ckptd"))
            .arg("agent")
            .args(["--socket", socket.to_str().unwrap(), "--store", store, "--job", JOB])
            .args(["--arena-dir", arena_dir.to_str().unwrap(), "--metrics-addr", &metrics])
            .args(["--commit-timeout", "60s", "--grace-period", "60s"])
            .args(extra)
            .envs(env.iter().copied())
            .env("CKPTD_LOG", "ckptd=info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start ckptd agent");
        let mut agent = Agent { child, socket, metrics: Some(metrics), log };
        agent.wait_ready();
        agent
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("agent exited with {status}: {}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            assert!(started.elapsed() < PATIENCE, "agent never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn metrics_text(&self) -> String {
        let addr = self.metrics.as_ref().expect("metrics enabled");
        http_get(addr, "/metrics")
    }

    fn admin(&self) -> (tokio::runtime::Runtime, pb::admin_client::AdminClient<tonic::transport::Channel>) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let ch = rt.block_on(ckptd::rpc::unix_channel(&self.socket)).unwrap();
        (rt, pb::admin_client::AdminClient::new(ch))
    }

    fn status(&self) -> pb::StatusReply {
        let (rt, mut c) = self.admin();
        rt.block_on(c.status(pb::StatusRequest {})).unwrap().into_inner()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A metric's value from the text exposition (first sample whose name and labels start so).
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next().and_then(|v| v.parse().ok()))
}

fn file_store(dir: &Path) -> String {
    format!("file://{}", dir.join("store").display())
}

fn engine(store: &str) -> ckpt_core::Engine {
    ckpt_core::Engine::open(store, Default::default()).unwrap()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < PATIENCE, "gave up waiting: {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn sidecar(socket: &Path, rank: u32, world: u32) -> Checkpointer {
    let mut cfg = CheckpointerConfig::new(JOB);
    cfg.socket = Some(socket.to_path_buf());
    cfg.rank = Some(rank);
    cfg.world_size = Some(world);
    Checkpointer::new(cfg).expect("attach to the agent")
}

/// Starts this test binary as a trainer process running `script` (see `trainer_child`).
fn trainer(socket: &Path, rank: u32, world: u32, script: &str) -> (Child, BufReader<std::process::ChildStdout>) {
    trainer_with(socket, rank, world, script, &[])
}

/// [`trainer`] with extra environment variables.
fn trainer_with(
    socket: &Path,
    rank: u32,
    world: u32,
    script: &str,
    env: &[(&str, &str)],
) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "trainer_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{}|{rank}|{world}|{script}", socket.display()))
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

/// Reads the child's stdout until a line starting with `prefix`; returns the line.
fn expect_line(out: &mut BufReader<std::process::ChildStdout>, prefix: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).unwrap();
        assert!(n > 0, "trainer exited before printing `{prefix}`");
        // libtest prints `test trainer_child ... ` without a newline before the test runs.
        if let Some(at) = line.find(prefix) {
            return line[at..].trim().to_string();
        }
    }
}

/// The trainer process. Script: `;`-separated commands:
/// `save:<step>` (save, fence, wait durable), `handoff:<step>` (save + fence only), `load:<step>`
/// (load latest, check it equals the state of `<step>`), `resave:<step>` (save a state other than
/// `<step>`'s under that step and print how the wait failed), `seal:<step>` (raw protocol: seal a
/// slot and never hand it over), `hang` (print `ready` and sleep).
#[test]
fn trainer_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let parts: Vec<&str> = spec.splitn(4, '|').collect();
    let (socket, rank, world, script) =
        (PathBuf::from(parts[0]), parts[1].parse().unwrap(), parts[2].parse().unwrap(), parts[3]);
    let mut ck: Option<Checkpointer> = None;
    let mut out = std::io::stdout();
    for cmd in script.split(';') {
        let (op, arg) = cmd.split_once(':').unwrap_or((cmd, ""));
        let step: u64 = arg.parse().unwrap_or(0);
        match op {
            "save" | "handoff" => {
                let ck = ck.get_or_insert_with(|| sidecar(&socket, rank, world));
                let mut s = State::of(rank, step, N);
                // SAFETY: `s` lives until the fence (and the wait) below; nothing writes it.
                let h = unsafe { ck.save(&s.refs(), step, format!("r{rank}").into_bytes(), None) }.unwrap();
                ck.fence(None).unwrap();
                if op == "save" {
                    h.wait().unwrap();
                }
                // The state may go now: the agent owns the snapshot.
                drop(s);
                writeln!(out, "{op} {step}").unwrap();
            }
            "resave" => {
                let ck = ck.get_or_insert_with(|| sidecar(&socket, rank, world));
                let mut s = State::of(rank, step + 1000, N);
                // SAFETY: `s` lives until the wait below; nothing writes it.
                let h = unsafe { ck.save(&s.refs(), step, Vec::new(), None) }.unwrap();
                ck.fence(None).unwrap();
                match h.wait() {
                    Ok(()) => writeln!(out, "outcome resaved {step}").unwrap(),
                    Err(e) => writeln!(out, "outcome refused {step} kind={} {e}", e.kind().as_str()).unwrap(),
                }
                drop(s);
            }
            "load" => {
                let ck = ck.get_or_insert_with(|| sidecar(&socket, rank, world));
                let mut s = State::blank(N);
                // SAFETY: exclusive access to `s` during the load.
                let loaded = unsafe { ck.load(&s.refs(), None, None) }.unwrap();
                let want = State::of(rank, step, N);
                assert!(s.same_bits(&want), "rank {rank}: loaded state differs from step {step}");
                assert_eq!(loaded.metadata, format!("r{rank}").into_bytes());
                writeln!(out, "loaded {} memory={}", loaded.step, loaded.from_memory).unwrap();
            }
            "seal" => seal_without_handover(&socket, rank, world, step, &mut out),
            "hang" => {
                writeln!(out, "ready").unwrap();
                out.flush().unwrap();
                std::thread::sleep(Duration::from_secs(3600));
            }
            other => panic!("unknown trainer command {other}"),
        }
        out.flush().unwrap();
    }
    if let Some(ck) = ck {
        ck.close().unwrap();
    }
}

/// Speaks the protocol directly: attach, have the agent make the arena, copy and seal a slot, and
/// stop there, as a trainer that dies between its copy and its handover would.
fn seal_without_handover(socket: &Path, rank: u32, world: u32, step: u64, out: &mut impl Write) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ch = rt.block_on(ckptd::rpc::unix_channel(socket)).unwrap();
    let mut c = pb::trainer_client::TrainerClient::new(ch);
    let mut stream = rt
        .block_on(c.attach(pb::AttachRequest {
            job: JOB.into(),
            rank,
            world_size: world,
            pid: 0,
            client_version: "t".into(),
        }))
        .unwrap()
        .into_inner();
    let Some(pb::TrainerEvent { event: Some(pb::trainer_event::Event::Attached(a)) }) =
        rt.block_on(stream.message()).unwrap()
    else {
        panic!("no attached event")
    };
    let mut s = State::of(rank, step, N);
    let metas: Vec<_> = s
        .refs()
        .iter()
        .map(|t| ckpt_core::TensorMeta { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() })
        .collect();
    let table = ckpt_core::TensorTable::packed(metas, ckpt_core::tensor::DEFAULT_ALIGN).unwrap();
    let meta = format!("r{rank}").into_bytes();
    let size = ckpt_core::arena::slot_size_for(&table, meta.len()) + (1 << 20);
    let reply = rt.block_on(c.prepare_arena(pb::PrepareArenaRequest { session: a.session, slot_size: size })).unwrap();
    let arena = Arena::open(Path::new(&reply.into_inner().arena_path)).unwrap();
    let slot = arena.acquire().unwrap();
    for (t, e) in s.refs().iter().zip(table.entries()) {
        // SAFETY: we hold the slot in the writing state; the source is our live state, `len` bytes.
        unsafe {
            let src = std::slice::from_raw_parts(t.addr as *const u8, e.len as usize);
            arena.slot_bytes_mut(slot)[e.offset as usize..(e.offset + e.len) as usize].copy_from_slice(src);
        }
    }
    arena.seal(slot, step, &table, &meta).unwrap();
    writeln!(out, "sealed {step}").unwrap();
    out.flush().unwrap();
    std::thread::sleep(Duration::from_secs(3600));
}

#[test]
fn trainer_killed_after_save_and_fence_still_gets_its_step_committed() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let agent = Agent::start(dir.path(), &store, &dir.path().join("arena"), &[]);
    let (mut child, mut out) = trainer(&agent.socket, 0, 1, "save:1;handoff:2;hang");
    expect_line(&mut out, "handoff 2");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let e = engine(&store);
    wait_until("step 2 committed", || e.manifest(JOB, 2).is_ok());
    let verify = Command::new(env!("CARGO_BIN_EXE_ckptctl"))
        .args(["verify", "--store", &store, "--job", JOB, "--step", "2"])
        .output()
        .unwrap();
    assert!(verify.status.success(), "ckptctl verify failed: {}", String::from_utf8_lossy(&verify.stdout));
    let (header, bytes) = e.restore(JOB, 2, 0).unwrap();
    let w = header.index.table.get("model/w").unwrap();
    let want: Vec<u8> = State::of(0, 2, N).weights.iter().flat_map(|f| f.to_le_bytes()).collect();
    assert!(bytes[w.offset as usize..(w.offset + w.len) as usize] == want[..], "stored weights differ from step 2");
}

#[test]
fn a_sealed_slot_whose_trainer_died_before_handing_it_over_is_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let agent = Agent::start(dir.path(), &store, &dir.path().join("arena"), &[]);
    let (mut child, mut out) = trainer(&agent.socket, 0, 1, "seal:5");
    expect_line(&mut out, "sealed 5");
    let e = engine(&store);
    assert!(e.manifest(JOB, 5).is_err(), "nothing is persisted while the trainer lives and has not handed over");
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until("flushed step 5 committed", || e.manifest(JOB, 5).is_ok());
    assert!(e.verify(JOB, 5).unwrap().ok());
    wait_until("flush counted", || metric(&agent.metrics_text(), "ckptd_flushed_snapshots_total") == Some(1.0));
    // The flushed step is the memory tier: a new trainer restores it from memory.
    let (mut child, mut out) = trainer(&agent.socket, 0, 1, "load:5");
    assert_eq!(expect_line(&mut out, "loaded"), "loaded 5 memory=true");
    assert!(child.wait().unwrap().success());
}

#[test]
fn restarted_trainer_loads_from_memory_without_reading_storage() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let agent = Agent::start(dir.path(), &store, &dir.path().join("arena"), &[]);
    let (mut child, mut out) = trainer(&agent.socket, 0, 1, "save:3;save:4;hang");
    expect_line(&mut out, "ready");
    child.kill().unwrap();
    child.wait().unwrap();
    // Take the store away: any storage read by the agent or the trainer now fails.
    let store_dir = dir.path().join("store");
    let hidden = dir.path().join("store-hidden");
    std::fs::rename(&store_dir, &hidden).unwrap();
    let (mut child, mut out) = trainer(&agent.socket, 0, 1, "load:4");
    assert_eq!(expect_line(&mut out, "loaded"), "loaded 4 memory=true");
    assert!(child.wait().unwrap().success());
    std::fs::rename(&hidden, &store_dir).unwrap();
    let text = agent.metrics_text();
    assert_eq!(metric(&text, "ckptd_restores_total{source=\"memory\"}"), Some(1.0), "{text}");
    assert_eq!(metric(&text, "ckptd_restores_total{source=\"storage\"}"), None, "{text}");
    assert_eq!(metric(&text, "ckptd_last_durable_step{rank=\"0\"}"), Some(4.0), "{text}");
    assert!(metric(&text, "ckptd_persist_bytes_total").is_some_and(|b| b >= (2 * N * 4) as f64), "{text}");
}

#[test]
fn restarted_agent_prefetches_from_storage_or_keeps_its_arena() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let arena = dir.path().join("arena");
    let mut agent = Agent::start(dir.path(), &store, &arena, &[]);
    let (mut child, mut out) = trainer(&agent.socket, 0, 1, "save:7;hang");
    expect_line(&mut out, "ready");
    child.kill().unwrap();
    child.wait().unwrap();
    agent.kill();

    // Container restart: the arena survives and the new agent adopts its memory tier.
    let agent = Agent::start(dir.path(), &store, &arena, &["--ranks", "0", "--world-size", "1"]);
    let st = agent.status();
    assert_eq!((st.ranks.len(), st.ranks[0].memory_tier_step, st.ranks[0].has_memory_tier), (1, 7, true));
    drop(agent);

    // Pod restart: a fresh arena directory; the agent prefetches step 7 from storage at start.
    let fresh = dir.path().join("arena-fresh");
    let agent = Agent::start(dir.path(), &store, &fresh, &["--ranks", "0", "--world-size", "1"]);
    wait_until("prefetch", || {
        agent.status().ranks.first().is_some_and(|r| r.has_memory_tier && r.memory_tier_step == 7)
    });
    // Hide the store: the load must come from what the prefetch staged. Its bytes came from
    // storage (read by the prefetch, not at load time), and the load says so.
    std::fs::rename(dir.path().join("store"), dir.path().join("store-hidden")).unwrap();
    let (mut child, mut out) = trainer(&agent.socket, 0, 1, "load:7");
    assert_eq!(expect_line(&mut out, "loaded"), "loaded 7 memory=false");
    let text = agent.metrics_text();
    assert_eq!(metric(&text, "ckptd_restores_total{source=\"storage\"}"), Some(1.0), "{text}");
    assert_eq!(metric(&text, "ckptd_restores_total{source=\"memory\"}"), None, "{text}");
    assert!(child.wait().unwrap().success());
}

#[test]
fn four_trainers_share_one_agent_and_each_restores_its_own_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let agent = Agent::start(dir.path(), &store, &dir.path().join("arena"), &["--world-size", "4"]);
    let mut kids: Vec<_> = (0..4).map(|r| trainer(&agent.socket, r, 4, "save:10;save:11;hang")).collect();
    for (child, out) in &mut kids {
        expect_line(out, "ready");
        child.kill().unwrap();
        child.wait().unwrap();
    }
    assert_eq!(engine(&store).manifest(JOB, 11).unwrap().world_size, 4);
    let mut kids: Vec<_> = (0..4).map(|r| trainer(&agent.socket, r, 4, "load:11")).collect();
    for (child, out) in &mut kids {
        assert_eq!(expect_line(out, "loaded"), "loaded 11 memory=true");
        assert!(child.wait().unwrap().success());
    }
}

#[test]
fn hostile_clients_get_errors_and_the_agent_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let agent = Agent::start(dir.path(), &store, &dir.path().join("arena"), &[]);

    // Garbage bytes instead of HTTP/2.
    for garbage in
        [&b"\x00\x01\x02 not http2 at all \xff\xfe"[..], &[0u8; 70_000][..], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff"]
    {
        let mut s = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
        let _ = s.write_all(garbage);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }

    let rt = tokio::runtime::Runtime::new().unwrap();
    let ch = rt.block_on(ckptd::rpc::unix_channel(&agent.socket)).unwrap();
    let mut c = pb::trainer_client::TrainerClient::new(ch);
    let attach = |job: &str, rank, world| pb::AttachRequest {
        job: job.into(),
        rank,
        world_size: world,
        pid: 1,
        client_version: "hostile".into(),
    };
    for (req, code) in [
        (attach("other-job", 0, 1), tonic::Code::InvalidArgument),
        (attach(JOB, 4, 4), tonic::Code::InvalidArgument),
        (attach(JOB, 0, 0), tonic::Code::InvalidArgument),
    ] {
        let e = rt.block_on(c.attach(req)).map(|_| ()).unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
    }
    // Calls with a session nobody opened.
    let e = rt.block_on(c.handover(pb::HandoverRequest { session: 42, step: 1, slot: 0, request: 0, stall_us: 0 }));
    assert_eq!(e.unwrap_err().code(), tonic::Code::PermissionDenied);
    let e = rt.block_on(c.locate(pb::LocateRequest { session: 42, step: None, strict: false }));
    assert_eq!(e.unwrap_err().code(), tonic::Code::PermissionDenied);

    // A real trainer of rank 0 (a one-rank job, so its saves commit alone) works alongside.
    let good = sidecar(&agent.socket, 0, 1);
    let mut s = State::of(0, 1, 1000);
    // SAFETY: `s` outlives the save, untouched until `wait` returns.
    let h = unsafe { good.save(&s.refs(), 1, Vec::new(), None) }.unwrap();
    good.fence(None).unwrap();
    // A second process claiming rank 0 is refused.
    let e = rt.block_on(c.attach(attach(JOB, 0, 2))).map(|_| ()).unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");

    // Rank 1, attached, tries slots it does not own: out of range, and rank 0's (not its arena).
    let mut evil = rt.block_on(c.attach(attach(JOB, 1, 2))).unwrap().into_inner();
    let Some(pb::TrainerEvent { event: Some(pb::trainer_event::Event::Attached(a)) }) =
        rt.block_on(evil.message()).unwrap()
    else {
        panic!("no attached event")
    };
    let e =
        rt.block_on(c.handover(pb::HandoverRequest { session: a.session, step: 1, slot: 0, request: 0, stall_us: 0 }));
    assert_eq!(e.unwrap_err().code(), tonic::Code::FailedPrecondition, "rank 1 has no arena yet");
    let reply = rt
        .block_on(c.prepare_arena(pb::PrepareArenaRequest { session: a.session, slot_size: 1 << 20 }))
        .unwrap()
        .into_inner();
    assert!(reply.arena_path.contains("rank-1"), "each rank has its own arena: {}", reply.arena_path);
    let e =
        rt.block_on(c.handover(pb::HandoverRequest { session: a.session, step: 1, slot: 99, request: 0, stall_us: 0 }));
    assert_eq!(e.unwrap_err().code(), tonic::Code::InvalidArgument);
    let e =
        rt.block_on(c.handover(pb::HandoverRequest { session: a.session, step: 1, slot: 0, request: 0, stall_us: 0 }));
    assert_eq!(e.unwrap_err().code(), tonic::Code::FailedPrecondition, "slot 0 of rank 1 is free, not sealed");
    let e = rt.block_on(c.prepare_arena(pb::PrepareArenaRequest { session: a.session, slot_size: 0 }));
    assert_eq!(e.unwrap_err().code(), tonic::Code::InvalidArgument);
    drop(evil);
    // The good trainer's save went through all of that.
    h.wait().unwrap();
    assert!(engine(&store).verify(JOB, 1).unwrap().ok());
    let st = agent.status();
    assert!(st.ranks.iter().any(|r| r.rank == 0 && r.attached), "rank 0 still attached: {st:?}");
    // The rank-0 trainer still heartbeats through all of it.
    assert_eq!(good.heartbeat(1, Phase::Step).unwrap(), None);
    drop(s);
    reliability::record("hostile", "agent: garbage and forged trainer requests", 13);
}

#[test]
fn snapshot_now_reaches_a_trainer_that_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let agent = Agent::start(dir.path(), &store, &dir.path().join("arena"), &[]);
    let socket = agent.socket.clone();
    let trainer = std::thread::spawn(move || {
        let ck = sidecar(&socket, 0, 1);
        let mut s = State::of(0, 0, 1000);
        for step in 1..100_000u64 {
            s.counter[0] = step as i64;
            if ck.heartbeat(step, Phase::Step).unwrap().is_some() {
                // SAFETY: `s` is not written until the save is durable.
                let h = unsafe { ck.save(&s.refs(), step, Vec::new(), None) }.unwrap();
                h.wait().unwrap();
                return step;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("no snapshot request arrived");
    });
    wait_until("trainer attached", || agent.status().ranks.iter().any(|r| r.attached));
    let (rt, mut admin) = agent.admin();
    let reply = rt
        .block_on(admin.snapshot_now(pb::SnapshotNowRequest {
            rank: Some(0),
            reason: "test".into(),
            timeout_ms: 60_000,
        }))
        .unwrap()
        .into_inner();
    let step = trainer.join().unwrap();
    assert_eq!(reply.ranks.len(), 1);
    assert!(reply.ranks[0].taken, "{reply:?}");
    assert_eq!(reply.ranks[0].step, step);
    assert!(engine(&store).manifest(JOB, step).is_ok());

    // ckptctl snapshot goes through the same path: with no trainer attached it says so.
    let out = Command::new(env!("CARGO_BIN_EXE_ckptctl"))
        .args(["snapshot", "--socket", agent.socket.to_str().unwrap(), "--rank", "3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("rank 3 is not attached"), "{out:?}");
}

#[test]
fn unreachable_agent_is_an_error_that_names_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = CheckpointerConfig::new(JOB);
    cfg.socket = Some(dir.path().join("nobody.sock"));
    let e = Checkpointer::new(cfg).unwrap_err();
    assert_eq!(e.kind(), ckptd::ErrorKind::AgentUnavailable);
    assert!(e.to_string().contains("nobody.sock"), "{e}");
}

#[test]
fn sigterm_finishes_in_flight_persists_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let mut agent = Agent::start(dir.path(), &store, &dir.path().join("arena"), &[]);
    let ck = sidecar(&agent.socket, 0, 1);
    let mut s = State::of(0, 9, 4 << 20);
    // SAFETY: `s` outlives the save and is not written.
    let _h = unsafe { ck.save(&s.refs(), 9, Vec::new(), None) }.unwrap();
    ck.fence(None).unwrap();
    // SAFETY: plain kill(2) on our child.
    assert_eq!(unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) }, 0);
    let status = agent.child.wait().unwrap();
    assert!(status.success(), "agent exit: {status}: {}", std::fs::read_to_string(&agent.log).unwrap_or_default());
    assert!(engine(&store).verify(JOB, 9).unwrap().ok(), "the in-flight step was finished before exit");
    assert!(!agent.socket.exists(), "the socket is removed at exit");
    drop(s);
    // The arena keeps step 9 as the memory tier for the next agent.
    let a = Arena::open(&dir.path().join("arena").join("job-rank-0.arena")).unwrap();
    let slot = a.newest_durable().expect("a durable slot");
    assert_eq!((a.state(slot), a.content(slot).unwrap().step), (Some(SlotState::Durable), 9));
}

#[test]
fn health_status_and_drills_go_through_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let kmsg = dir.path().join("kmsg");
    std::fs::write(&kmsg, b"").unwrap();
    let ctl = |socket: &Path, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ckptctl")).args(args).arg("--socket").arg(socket).output().unwrap()
    };
    let health_args = ["--kmsg", kmsg.to_str().unwrap(), "--no-ib", "--no-nvml"];

    // Without --allow-inject a drill is refused with what to do.
    let agent = Agent::start(dir.path(), &store, &dir.path().join("arena"), &health_args);
    let out = ctl(&agent.socket, &["inject", "--xid", "79", "--gpu", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-inject"), "{out:?}");
    drop(agent);

    let mut args = health_args.to_vec();
    args.push("--allow-inject");
    let agent = Agent::start(dir.path(), &store, &dir.path().join("arena2"), &args);
    let out = ctl(&agent.socket, &["health", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(status["reporters"]["kmsg"].is_object(), "{status}");
    assert_eq!(status["active_faults"].as_array().map(Vec::len), Some(0), "{status}");
    let out = ctl(&agent.socket, &["inject", "--xid", "79", "--gpu", "0"]);
    assert!(out.status.success(), "{out:?}");
    wait_until("the drill becomes an active fault", || {
        let out = ctl(&agent.socket, &["health", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["active_faults"].as_array().is_some_and(|f| f.iter().any(|x| x.to_string().contains("xid-79")))
    });
    // A real kernel-log line takes the same path.
    std::fs::write(&kmsg, b"NVRM: Xid (PCI:0000:3b:00): 48, pid=1, name=python, DBE (double bit error)\n").unwrap();
    wait_until("the kmsg line becomes a finding", || {
        metric(&agent.metrics_text(), "ckptd_health_findings_total{")
            .is_some_and(|_| agent.metrics_text().contains("xid-48"))
    });
}

#[test]
fn saving_a_committed_step_number_again_is_refused_and_never_reported_durable() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let agent = Agent::start(dir.path(), &store, &dir.path().join("arena"), &[]);
    let (mut child, mut out) = trainer(&agent.socket, 0, 1, "save:3");
    expect_line(&mut out, "save 3");
    assert!(child.wait().unwrap().success());
    // A new trainer (it resumed from an older step) saves step 3 again, with other values.
    let (mut child, mut out) = trainer(&agent.socket, 0, 1, "resave:3");
    let line = expect_line(&mut out, "outcome");
    assert!(child.wait().unwrap().success());
    assert!(line.starts_with("outcome refused 3 kind=conflict"), "{line}");
    assert!(line.contains("step 3") && line.contains("already committed"), "{line}");
    assert!(line.contains("resume from step 3"), "the message says what to do: {line}");
    // Storage still holds the first save's step 3.
    let e = engine(&store);
    let (header, bytes) = e.restore(JOB, 3, 0).unwrap();
    let w = header.index.table.get("model/w").unwrap();
    let want: Vec<u8> = State::of(0, 3, N).weights.iter().flat_map(|f| f.to_le_bytes()).collect();
    assert!(bytes[w.offset as usize..(w.offset + w.len) as usize] == want[..], "committed step 3 changed");
    // The agent said "durable" once, for the save that wrote bytes, and counted the refusal.
    let text = agent.metrics_text();
    assert_eq!(metric(&text, "ckptd_persist_failures_total"), Some(1.0), "{text}");
    let log = std::fs::read_to_string(&agent.log).unwrap();
    let durable: Vec<&str> = log.lines().filter(|l| l.contains("step durable and committed")).collect();
    assert_eq!(durable.len(), 1, "{log}");
    assert!(!durable[0].contains("bytes=0"), "{log}");
}

#[test]
fn an_empty_or_rootless_store_is_a_configuration_error_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    for store in ["", "file://", "file:///"] {
        let out = Command::new(env!("CARGO_BIN_EXE_ckptd"))
            .arg("agent")
            .args(["--socket", dir.path().join("agent.sock").to_str().unwrap(), "--store", store, "--job", JOB])
            .args(["--arena-dir", dir.path().join("arena").to_str().unwrap()])
            .env_remove("CKPTD_STORE")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "--store `{store}`: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "--store `{store}`: {err}");
        assert!(err.contains("--store") && err.contains("invalid store url"), "--store `{store}`: {err}");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "the agent left {left:?} behind");
}

#[test]
fn a_world_writable_arena_directory_is_a_configuration_error_with_exit_64() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let arena = dir.path().join("shared");
    std::fs::create_dir(&arena).unwrap();
    std::fs::set_permissions(&arena, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ckptd"))
        .arg("agent")
        .args(["--socket", dir.path().join("agent.sock").to_str().unwrap()])
        .args(["--store", &file_store(dir.path()), "--job", JOB])
        .args(["--arena-dir", arena.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("--arena-dir") && err.contains("world-writable"), "{err}");
    assert!(!dir.path().join("agent.sock").exists(), "the agent served anyway");
}

#[test]
fn the_metrics_port_answers_healthz_while_64_slow_clients_trickle_their_heads() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &file_store(dir.path()), &dir.path().join("arena"), &[]);
    let addr: std::net::SocketAddr = agent.metrics.as_ref().unwrap().parse().unwrap();
    let slow = slow_clients::SlowClients::connect(addr, 64);
    let healthz = http_get_within(&addr, "/healthz");
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    // However a client trickles, it is evicted for newcomers or closed at the head deadline.
    slow.wait_all_given_up();
    assert!(http_get_within(&addr, "/healthz").starts_with("HTTP/1.1 200"));
}

/// GET with a read timeout, so a server that never answers fails the test instead of hanging it.
fn http_get_within(addr: &std::net::SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("an answer within 30 s");
    out
}

#[test]
fn idle_connections_neither_starve_agent_status_nor_trainers_and_are_closed() {
    raise_nofile(4096);
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    // --max-sessions 2 bounds the socket at 2 + 64 connections, well under the idle ones.
    let agent = Agent::start(dir.path(), &store, &dir.path().join("arena"), &["--max-sessions", "2"]);
    let idle: Vec<std::os::unix::net::UnixStream> =
        (0..512).map(|_| std::os::unix::net::UnixStream::connect(&agent.socket).unwrap()).collect();
    let status = Command::new(env!("CARGO_BIN_EXE_ckptctl"))
        .args(["agent-status", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    assert!(status.status.success(), "agent-status failed: {}", String::from_utf8_lossy(&status.stderr));
    let trainer = sidecar(&agent.socket, 0, 1);
    let mut s = State::of(0, 1, 1000);
    // SAFETY: `s` outlives the save, untouched until `wait` returns.
    unsafe { trainer.save(&s.refs(), 1, Vec::new(), None) }.unwrap().wait().unwrap();
    assert!(engine(&store).verify(JOB, 1).unwrap().ok());
    // Every idle connection is evicted for a newer one or closed at the deadline for a first
    // request; the trainer's, which sent requests, stays.
    wait_until("every idle connection closed", || {
        idle.iter().all(|mut c| {
            c.set_nonblocking(true).unwrap();
            // The server's HTTP/2 preface comes first; drain it, then EOF or a reset says closed.
            let mut buf = [0u8; 256];
            loop {
                match c.read(&mut buf) {
                    Ok(0) => return true,
                    Ok(_) => continue,
                    Err(e) => return e.kind() != std::io::ErrorKind::WouldBlock,
                }
            }
        })
    });
    assert_eq!(trainer.heartbeat(1, Phase::Step).unwrap(), None);
    drop(s);
}

#[test]
fn attaching_more_ranks_than_max_sessions_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &file_store(dir.path()), &dir.path().join("arena"), &["--max-sessions", "2"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ch = rt.block_on(ckptd::rpc::unix_channel(&agent.socket)).unwrap();
    let mut c = pb::trainer_client::TrainerClient::new(ch);
    let attach = |rank| pb::AttachRequest { job: JOB.into(), rank, world_size: 8, pid: 1, client_version: "t".into() };
    let r0 = rt.block_on(c.attach(attach(0))).unwrap().into_inner();
    let r1 = rt.block_on(c.attach(attach(1))).unwrap().into_inner();
    let e = rt.block_on(c.attach(attach(2))).map(|_| ()).unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("--max-sessions"), "{e:?}");
    // The client library says the same, as a Busy error.
    let err = Checkpointer::new({
        let mut cfg = CheckpointerConfig::new(JOB);
        cfg.socket = Some(agent.socket.clone());
        cfg.rank = Some(3);
        cfg.world_size = Some(8);
        cfg
    })
    .map(|_| ())
    .unwrap_err();
    assert_eq!(err.kind(), ckptd::ErrorKind::Busy, "{err}");
    // A rank the agent serves comes back after its trainer detached; a new one still does not.
    drop(r0);
    wait_until("rank 0 detached", || agent.status().ranks.iter().any(|r| r.rank == 0 && !r.attached));
    let _r0 = rt.block_on(c.attach(attach(0))).unwrap().into_inner();
    let e = rt.block_on(c.attach(attach(2))).map(|_| ()).unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    drop(r1);
}

/// Raises this process's soft open-file limit to `want` (or the hard limit), so that a test can
/// hold many sockets; the agent it starts inherits the raised limit.
fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
}

/// The agent's persist threads, by name (`ckpt-persist-r<rank>`), from /proc.
fn persist_threads(agent: &Agent) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", agent.child.id())) else { return Vec::new() };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .filter(|c| c.starts_with("ckpt-persist-r"))
        .collect()
}

#[test]
fn a_rank_whose_trainer_left_gives_its_persist_thread_back_and_gets_one_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let agent = Agent::start(dir.path(), &store, &dir.path().join("arena"), &[]);
    let (mut child, mut out) = trainer(&agent.socket, 0, 1, "save:3");
    expect_line(&mut out, "save 3");
    assert!(child.wait().unwrap().success());
    assert_eq!(persist_threads(&agent), ["ckpt-persist-r0"], "the rank's thread ran the save");
    // Detached and idle: the thread exits (after the agent's idle period).
    wait_until("the idle persist thread exits", || persist_threads(&agent).is_empty());
    // The next trainer of the rank saves again: a new thread persists it.
    let (mut child, mut out) = trainer(&agent.socket, 0, 1, "save:4");
    expect_line(&mut out, "save 4");
    assert!(child.wait().unwrap().success());
    assert!(engine(&store).verify(JOB, 4).unwrap().ok());
}

/// Waits for a child process to end by itself; its exit status.
fn wait_exit(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(started.elapsed() < PATIENCE, "{what}: the trainer never exited");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Issue 13, workers end on order: a trainer blocked where no Python (or Rust) code of it polls
/// for orders — here asleep, as a rank blocked in a collective with a dead peer — is ended by its
/// library's own thread with EXIT_RESTART when the agent orders a restart (a local fatal fault,
/// no isolator); its restarted process is not ended again, and resumes from the memory tier at
/// the committed step. A trainer whose library does not exit (CKPTD_RESTART_GRACE=off) and never
/// restores is ended by the agent with SIGKILL after --restart-kill-after.
#[test]
fn a_restart_order_ends_a_blocked_trainer_and_its_restart_resumes_from_memory() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let kmsg = dir.path().join("kmsg");
    std::fs::write(&kmsg, b"").unwrap();
    let args = ["--kmsg", kmsg.to_str().unwrap(), "--kmsg-poll", "20ms", "--no-ib", "--no-nvml"];
    let mut args = args.to_vec();
    args.extend(["--world-size", "1", "--restart-kill-after", "1s"]);
    let agent = Agent::start(dir.path(), &store, &dir.path().join("arena"), &args);
    let grace = [("CKPTD_RESTART_GRACE", "0.3")];

    let (mut blocked, mut out) = trainer_with(&agent.socket, 0, 1, "save:1;save:2;hang", &grace);
    expect_line(&mut out, "ready");
    let append = |line: &str| {
        let mut f = std::fs::OpenOptions::new().append(true).open(&kmsg).unwrap();
        writeln!(f, "{line}").unwrap();
    };
    append("NVRM: Xid (PCI:0000:3b:00): 79, pid=4242, name=python, GPU has fallen off the bus.");
    let status = wait_exit(&mut blocked, "restart order");
    assert_eq!(status.code(), Some(ckptd::client::EXIT_RESTART), "{status:?}");

    // The launcher's restart: the order is replayed to it as news, and it restores step 2 (the
    // newest committed) from the arena. It must outlive several grace periods.
    let (mut restarted, mut out) = trainer_with(&agent.socket, 0, 1, "load:2;hang", &grace);
    assert_eq!(expect_line(&mut out, "loaded"), "loaded 2 memory=true");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(restarted.try_wait().unwrap().is_none(), "the restarted trainer was ended again");
    let _ = restarted.kill();
    let _ = restarted.wait();

    // The last resort: this trainer's library does not exit, and it never restores.
    let (mut stubborn, mut out) = trainer_with(&agent.socket, 0, 1, "save:3;hang", &[("CKPTD_RESTART_GRACE", "off")]);
    expect_line(&mut out, "ready");
    append("NVRM: Xid (PCI:0000:3b:00): 31, pid=4242, name=python, MMU Fault: ENGINE GRAPHICS");
    let status = wait_exit(&mut stubborn, "last-resort signal");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(log.contains("sending SIGKILL"), "{log}");
}

/// A training session's load (here right after its own save, while rank 0's agent still waits
/// for rank 1's shard) waits for that commit and never gives it up: only a restarted session,
/// one that has not saved yet, stops waiting for other ranks' shards.
#[test]
fn a_load_of_a_training_session_never_gives_up_its_own_pending_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let agent = Agent::start(dir.path(), &store, &dir.path().join("arena"), &["--world-size", "2"]);
    let (mut rank0, mut out0) = trainer(&agent.socket, 0, 2, "handoff:1;load:1");
    expect_line(&mut out0, "handoff 1");
    // Longer than a restarted session's patience (2 s) before rank 1's shard arrives.
    std::thread::sleep(Duration::from_secs(3));
    let (mut rank1, mut out1) = trainer(&agent.socket, 1, 2, "save:1");
    expect_line(&mut out1, "save 1");
    assert_eq!(expect_line(&mut out0, "loaded"), "loaded 1 memory=true");
    assert!(rank0.wait().unwrap().success());
    assert!(rank1.wait().unwrap().success());
}

/// (nice, scheduling policy) of the agent's thread named `name`, once it exists.
fn thread_priority(pid: u32, name: &str) -> Option<(i64, u64)> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(stat) = std::fs::read_to_string(task.ok()?.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        if &stat[open + 1..close] != name {
            continue;
        }
        // Fields after comm start at field 3 (state): nice is field 19, policy field 41.
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        return Some((fields[16].parse().ok()?, fields[38].parse().ok()?));
    }
    None
}

#[test]
fn persist_threads_run_at_the_persist_priority_and_a_bad_one_is_exit_64() {
    const SCHED_IDLE: u64 = 5;
    for (flags, env, want) in [
        (vec![], vec![], (10, 0)),
        (vec!["--persist-priority", "idle"], vec![], (0, SCHED_IDLE)),
        (vec![], vec![("CKPTD_PERSIST_PRIORITY", "normal")], (0, 0)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut extra = vec!["--ranks", "0", "--world-size", "1"];
        extra.extend(flags.iter().copied());
        // `--ranks` starts rank 0, and with it its persist thread, at start-up.
        let agent = Agent::start_with(dir.path(), &file_store(dir.path()), &dir.path().join("arena"), &extra, &env);
        let deadline = Instant::now() + Duration::from_secs(20);
        let seen = loop {
            if let Some(p) = thread_priority(agent.child.id(), "ckpt-persist-r0") {
                break p;
            }
            assert!(Instant::now() < deadline, "no persist thread in the agent ({flags:?} {env:?})");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(seen, want, "{flags:?} {env:?}");
    }
    for (flag, value) in [("--persist-priority", "urgent"), ("--persist-io", "mmap")] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_ckptd"))
            .arg("agent")
            .args(["--socket", dir.path().join("agent.sock").to_str().unwrap()])
            .args(["--store", &file_store(dir.path()), "--job", JOB, flag, value])
            .args(["--arena-dir", dir.path().join("arena").to_str().unwrap()])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{flag} {value}: {err}");
        assert!(err.contains(flag), "{flag} {value}: {err}");
    }
}
