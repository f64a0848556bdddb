//! Crash loop: trainers (embedded and sidecar, one and two ranks) are killed with SIGKILL or
//! SIGTERM at random moments, many of them 0–150 ms after a `save()` returned, and each kill is
//! followed by a restart that must load a committed step bit for bit (embedded: exactly the newest
//! committed one) and save again. A restart never waits on slots a dead process left (the wedge
//! this guards against ended in `ArenaFull` after 60 s), and after the loop no committed step
//! directory holds a temporary shard file.
//!
//! Iterations per configuration: `CKPTD_CRASH_LOOP_ITERATIONS` (default 13, so 52 kills in all).
//! The kills delivered are recorded in the reliability tally (`CKPTD_RELIABILITY_LOG`), and so is
//! each restart's time from spawn to a loaded step (class `restart-ms`): `scripts/test.sh` prints
//! the slowest and the median. Measured, never asserted (no test asserts a time).

#[path = "../../ckpt-core/tests/common/reliability.rs"]
mod reliability;
#[path = "../../ckpt-core/tests/common/shard_file.rs"]
mod shard_file;
use shard_file::shard_file;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ckpt_core::copy::Device;
use ckpt_core::{DType, Engine, StepState};
use ckptd::client::{Checkpointer, CheckpointerConfig, TensorRef};

const JOB: &str = "crashloop";
const CHILD_ENV: &str = "CKPTD_CRASH_LOOP_CHILD";
/// Generous bound on any one wait (a restart, a first save); never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(120);
const ELEMS: usize = 64 * 1024;

static KILLS: AtomicU64 = AtomicU64::new(0);
/// Spawn-to-`loaded` of every restart, in milliseconds, with the configuration it ran in.
static RESTARTS: std::sync::Mutex<Vec<(String, u64)>> = std::sync::Mutex::new(Vec::new());

fn pattern(step: u64, rank: u32) -> Vec<f32> {
    (0..ELEMS).map(|i| (step as f32) * 0.5 + (rank as f32) * 1000.0 + (i % 97) as f32).collect()
}

fn refs(w: *const f32, step: *const i64) -> Vec<TensorRef> {
    vec![
        TensorRef {
            name: "w".into(),
            dtype: DType::F32,
            shape: vec![ELEMS as u64],
            addr: w as u64,
            device: Device::Cpu,
        },
        TensorRef { name: "step".into(), dtype: DType::I64, shape: vec![], addr: step as u64, device: Device::Cpu },
    ]
}

fn newest_committed(engine: &Engine) -> Option<u64> {
    engine.steps(JOB).unwrap().iter().filter(|s| s.state == StepState::Committed).map(|s| s.step).max()
}

/// A tiny xorshift generator: the loop's randomness, reproducible from the printed seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The trainer process: `<sidecar 0|1>|<store>|<arena dir>|<socket>|<rank>|<world>|<first step>`.
/// Loads the newest committed step and checks it, prints `loaded <step>`, then saves from
/// `first step` on, printing `saved <step>` after each `save()` returned, until it is killed.
#[test]
fn crash_loop_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let f: Vec<&str> = spec.split('|').collect();
    let (sidecar, store, arena, socket) = (f[0] == "1", f[1], f[2], f[3]);
    let rank: u32 = if f[4] == "env" { std::env::var("RANK").unwrap().parse().unwrap() } else { f[4].parse().unwrap() };
    let (world, first): (u32, u64) = (f[5].parse().unwrap(), f[6].parse().unwrap());
    let mut cfg = CheckpointerConfig::new(JOB);
    cfg.store = Some(store.into());
    cfg.arena_dir = Some(arena.into());
    // `env` leaves the rank and world size to RANK and WORLD_SIZE, as under torchrun.
    if f[4] != "env" {
        cfg.rank = Some(rank);
        cfg.world_size = Some(world);
    }
    cfg.socket = sidecar.then(|| PathBuf::from(socket));
    cfg.engine.commit.deadline = Duration::from_secs(30);
    let started = Instant::now();
    let ck = loop {
        match Checkpointer::new(cfg.clone()) {
            Ok(ck) => break ck,
            // Sidecar: the agent may still hold the dead trainer's session, or be restarting.
            Err(e) if sidecar && started.elapsed() < PATIENCE => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("restart of rank {rank} refused: {e}"),
        }
    };
    let engine = Engine::open(store, Default::default()).unwrap();
    let before = newest_committed(&engine);
    let mut w = vec![0f32; ELEMS];
    let mut s = [0i64; 1];
    // SAFETY: `w` and `s` are only touched by this load until it returns.
    match unsafe { ck.load(&refs(w.as_mut_ptr(), s.as_mut_ptr()), None, None) } {
        Ok(loaded) => {
            if sidecar {
                assert!(Some(loaded.step) >= before, "loaded step {} is older than committed {before:?}", loaded.step);
            } else {
                assert_eq!(Some(loaded.step), before, "embedded restart must load the newest committed step");
            }
            assert!(engine.manifest(JOB, loaded.step).is_ok(), "loaded step {} is not committed", loaded.step);
            assert_eq!(s[0], loaded.step as i64);
            assert!(w == pattern(loaded.step, rank), "step {} of rank {rank} differs from what was saved", loaded.step);
            say(format_args!("loaded {}", loaded.step));
        }
        Err(e) if e.kind() == ckptd::ErrorKind::NoCheckpoint && before.is_none() => say(format_args!("loaded none")),
        Err(e) => panic!("restart of rank {rank} could not load: {e}"),
    }
    for step in first.. {
        let w = pattern(step, rank);
        let s = [step as i64];
        // SAFETY: `w` and `s` stay alive and unwritten until the handle is waited for below.
        let h = unsafe { ck.save(&refs(w.as_ptr(), s.as_ptr()), step, Vec::new(), None) }.unwrap();
        say(format_args!("saved {step}"));
        ck.fence(None).unwrap();
        // A failure here is a kill of the agent (sidecar) or of the other rank; the parent only
        // needs the `saved` lines and the restart that follows.
        if let Err(e) = h.wait() {
            let _ = writeln!(std::io::stderr(), "save of step {step} failed: {e}");
        }
    }
}

/// One line to the parent, flushed at once.
fn say(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

struct Trainer {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    spawned: Instant,
}

fn spawn(spec: String) -> Trainer {
    spawn_with(spec, &[])
}

fn spawn_with(spec: String, env: &[(&str, &str)]) -> Trainer {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .envs(env.iter().copied())
        .args(["--exact", "crash_loop_child", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, spec)
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    Trainer { child, lines, spawned: Instant::now() }
}

impl Trainer {
    /// Waits for a line starting with `prefix`; panics with the child's status when it exits.
    fn expect(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok(l) if l.contains(prefix) => return l,
                Ok(_) => {}
                Err(_) => {
                    if let Ok(Some(st)) = self.child.try_wait() {
                        panic!("trainer exited with {st} before printing `{prefix}`");
                    }
                    assert!(Instant::now() < deadline, "no `{prefix}` within {PATIENCE:?}: the restart is wedged");
                }
            }
        }
    }

    fn kill(&mut self, term: bool) {
        if term {
            let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        } else {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        KILLS.fetch_add(1, Ordering::Relaxed);
    }
}

struct Agent(Child);

impl Agent {
    fn start(store: &str, arena: &Path, socket: &Path, world: u32) -> Agent {
        let _ = std::fs::remove_file(socket);
        let child = Command::new(env!("CARGO_BIN_EXE_ckptd"))
            .arg("agent")
            .args(["--socket", socket.to_str().unwrap(), "--store", store, "--job", JOB])
            .args(["--arena-dir", arena.to_str().unwrap(), "--world-size", &world.to_string()])
            // A step whose other rank was killed before its shard never commits; the agent gives
            // up on it after this, and a restarted trainer's load waits for that (the persists of
            // its rank settle first). Short, so that a round does not wait out a long deadline;
            // a live commit of these small shards takes milliseconds.
            .args(["--commit-timeout", "5s", "--grace-period", "1s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(started.elapsed() < PATIENCE, "the agent never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        Agent(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        KILLS.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn iterations() -> u64 {
    std::env::var("CKPTD_CRASH_LOOP_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(13)
}

fn run(sidecar: bool, world: u32) {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().join("store").display());
    let arena = dir.path().join("arena");
    let socket = dir.path().join("agent.sock");
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    let _ = writeln!(std::io::stderr(), "crash loop sidecar={sidecar} world={world} seed={seed}");
    let mut rng = Rng(seed);
    let mut agent = sidecar.then(|| Agent::start(&store, &arena, &socket, world));
    for i in 0..iterations() {
        let first = (i + 1) * 1000;
        let mut trainers: Vec<Trainer> = (0..world)
            .map(|r| {
                let flag = if sidecar { "1" } else { "0" };
                spawn(format!("{flag}|{store}|{}|{}|{r}|{world}|{first}", arena.display(), socket.display()))
            })
            .collect();
        for t in &mut trainers {
            t.expect("loaded");
            let ms = t.spawned.elapsed().as_millis() as u64;
            let config = format!(
                "{} {world} rank{}",
                if sidecar { "sidecar" } else { "embedded" },
                if world == 1 { "" } else { "s" }
            );
            RESTARTS.lock().unwrap().push((config, ms));
        }
        for t in &mut trainers {
            t.expect("saved");
        }
        // 0–150 ms after the first save returned, or a little later, in the middle of others.
        std::thread::sleep(Duration::from_millis(rng.next() % 150 + if rng.next() % 4 == 0 { 150 } else { 0 }));
        let term = rng.next() % 2 == 0;
        for t in &mut trainers {
            t.kill(term);
        }
        if let Some(a) = agent.as_mut()
            && rng.next() % 4 == 0
        {
            a.kill();
            *a = Agent::start(&store, &arena, &socket, world);
        }
    }
    // One more restart must load and save; then no committed step directory holds a temporary.
    let mut trainers: Vec<Trainer> = (0..world)
        .map(|r| {
            let flag = if sidecar { "1" } else { "0" };
            spawn(format!("{flag}|{store}|{}|{}|{r}|{world}|{}", arena.display(), socket.display(), 1_000_000))
        })
        .collect();
    for t in &mut trainers {
        t.expect("loaded");
        t.expect("saved");
    }
    for t in &mut trainers {
        t.kill(false);
    }
    drop(agent);
    let engine = Engine::open(&store, Default::default()).unwrap();
    let committed: Vec<u64> =
        engine.steps(JOB).unwrap().iter().filter(|s| s.state == StepState::Committed).map(|s| s.step).collect();
    assert!(!committed.is_empty(), "the loop committed nothing");
    // The last writers were killed too: start owners once more (taking over an arena removes the
    // temporaries its dead owner left), then look.
    let agent = sidecar.then(|| Agent::start(&store, &arena, &socket, world));
    for r in 0..world {
        let mut cfg = CheckpointerConfig::new(JOB);
        cfg.store = Some(store.clone());
        cfg.arena_dir = Some(arena.clone());
        cfg.rank = Some(r);
        cfg.world_size = Some(world);
        cfg.socket = sidecar.then(|| socket.clone());
        Checkpointer::new(cfg).unwrap().close().unwrap();
    }
    // This agent may be persisting what the killed one left: let it finish (SIGTERM, grace period).
    if let Some(mut a) = agent {
        let _ = Command::new("kill").args(["-TERM", &a.0.id().to_string()]).status();
        let _ = a.0.wait();
    }
    report();
    for step in committed {
        let d = dir.path().join("store").join(JOB).join(format!("step-{step}"));
        for f in std::fs::read_dir(&d).unwrap().flatten() {
            let name = f.file_name().to_string_lossy().to_string();
            assert!(!name.contains(".tmp-"), "temporary {name} left in committed {}", d.display());
        }
        assert!(engine.verify(JOB, step).unwrap().ok(), "committed step {step} does not verify");
    }
}

#[test]
fn embedded_one_rank() {
    run(false, 1);
}

#[test]
fn embedded_two_ranks() {
    run(false, 2);
}

#[test]
fn sidecar_one_rank() {
    run(true, 1);
}

#[test]
fn sidecar_two_ranks() {
    run(true, 2);
}

/// Records the kills delivered so far (and not recorded yet) in the reliability tally.
fn report() {
    reliability::record("sigkill", "trainers and agents (client crash loop)", KILLS.swap(0, Ordering::Relaxed));
    for (config, ms) in RESTARTS.lock().unwrap().drain(..) {
        reliability::record("restart-ms", &config, ms);
    }
}

/// A second process of the same job and rank is refused, naming the holder's pid, and the first
/// one's committed step still loads bit for bit afterwards.
#[test]
fn a_second_writer_of_a_rank_is_refused_and_the_committed_step_is_intact() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().join("store").display());
    let arena = dir.path().join("arena");
    let mut first = spawn(format!("0|{store}|{}||0|1|1000", arena.display()));
    first.expect("loaded");
    first.expect("saved 1001"); // step 1000 was waited for: it is committed
    let mut cfg = CheckpointerConfig::new(JOB);
    cfg.store = Some(store.clone());
    cfg.arena_dir = Some(arena.clone());
    cfg.rank = Some(0);
    cfg.world_size = Some(1);
    let e = Checkpointer::new(cfg.clone()).expect_err("a second writer of rank 0 was let in");
    assert_eq!(e.kind(), ckptd::ErrorKind::Core(ckpt_core::ErrorKind::Conflict), "{e}");
    assert!(e.to_string().contains(&format!("pid {}", first.child.id())), "the holder is not named: {e}");
    first.kill(false);
    let ck = Checkpointer::new(cfg).unwrap();
    let (mut w, mut s) = (vec![0f32; ELEMS], [0i64; 1]);
    // SAFETY: `w` and `s` are only touched by this load until it returns.
    let loaded = unsafe { ck.load(&refs(w.as_mut_ptr(), s.as_mut_ptr()), Some(1000), None) }.unwrap();
    assert_eq!(loaded.step, 1000);
    assert!(w == pattern(1000, 0), "the committed step changed");
    let engine = Engine::open(&store, Default::default()).unwrap();
    assert!(engine.verify(JOB, 1000).unwrap().ok());
    // A clean close removes the arena (a killed process leaves it for the next start).
    let path = ck.arena_path();
    assert!(path.exists());
    ck.close().unwrap();
    assert!(!path.exists(), "close() left the arena {}", path.display());
    report();
}

/// A checkpointer given no rank reads RANK and WORLD_SIZE (torchrun): with `RANK=1 WORLD_SIZE=2`
/// it writes rank 1's shard and arena.
#[test]
fn rank_and_world_size_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().join("store").display());
    let arena = dir.path().join("arena");
    let mut t = spawn_with(format!("0|{store}|{}||env|0|1000", arena.display()), &[("RANK", "1"), ("WORLD_SIZE", "2")]);
    t.expect("saved 1000");
    let step_dir = dir.path().join("store").join(JOB).join("step-1000");
    let deadline = Instant::now() + PATIENCE;
    while shard_file(&step_dir, 1).is_none() {
        assert!(Instant::now() < deadline, "no shard of rank 1 in {}", step_dir.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(arena.join(ckpt_core::arena::file_name(JOB, 1)).exists());
    assert!(shard_file(&step_dir, 0).is_none(), "nothing written for rank 0");
    t.kill(false);
    report();
}
