//! The embedded-mode `Checkpointer` on host memory: save, fence, wait, in-place load from the
//! memory tier and from storage, growth of the arena, and multi-rank commits.

use ckpt_core::DType;
use ckpt_core::copy::Device;
use ckptd::client::{Checkpointer, CheckpointerConfig, TensorRef};

struct State {
    weights: Vec<f32>,
    step: Vec<i64>,
    mask: Vec<u8>,
}

impl State {
    fn new(seed: u32, n: usize) -> State {
        State {
            weights: (0..n).map(|i| (i as f32) * 0.5 + seed as f32).collect(),
            step: vec![i64::from(seed)],
            mask: (0..n / 3).map(|i| ((i as u32 + seed) % 2) as u8).collect(),
        }
    }

    fn refs(&mut self) -> Vec<TensorRef> {
        vec![
            TensorRef {
                name: "model.w".into(),
                dtype: DType::F32,
                shape: vec![self.weights.len() as u64],
                addr: self.weights.as_mut_ptr() as u64,
                device: Device::Cpu,
            },
            TensorRef {
                name: "step".into(),
                dtype: DType::I64,
                shape: vec![],
                addr: self.step.as_mut_ptr() as u64,
                device: Device::Cpu,
            },
            TensorRef {
                name: "mask".into(),
                dtype: DType::Bool,
                shape: vec![self.mask.len() as u64],
                addr: self.mask.as_mut_ptr() as u64,
                device: Device::Cpu,
            },
        ]
    }
}

fn config(dir: &std::path::Path, rank: u32, world: u32) -> CheckpointerConfig {
    let mut cfg = CheckpointerConfig::new("job");
    cfg.store = Some(format!("file://{}", dir.join("store").display()));
    cfg.arena_dir = Some(dir.join(format!("arena-{rank}")));
    cfg.rank = Some(rank);
    cfg.world_size = Some(world);
    cfg.engine.commit.deadline = std::time::Duration::from_secs(20);
    cfg
}

#[test]
fn save_fence_mutate_then_load_restores_the_saved_values() {
    let dir = tempfile::tempdir().unwrap();
    let ck = Checkpointer::new(config(dir.path(), 0, 1)).unwrap();
    let mut s = State::new(1, 300_000);
    let saved = (s.weights.clone(), s.step.clone(), s.mask.clone());
    // SAFETY: the state outlives the save and is not written until fence() returns.
    let h = unsafe { ck.save(&s.refs(), 7, b"meta".to_vec(), None) }.unwrap();
    ck.fence(None).unwrap();
    // The "optimizer step": overwrite everything after the fence.
    s.weights.iter_mut().for_each(|w| *w = -1.0);
    s.step[0] = 99;
    h.wait().unwrap();
    assert!(h.done());
    assert_eq!(ck.latest_step().unwrap(), Some(7));

    // From the memory tier (same arena): values come back as saved.
    // SAFETY: exclusive access to the state during load.
    let loaded = unsafe { ck.load(&s.refs(), None, None) }.unwrap();
    assert_eq!((loaded.step, loaded.metadata.as_slice(), loaded.from_memory), (7, b"meta".as_slice(), true));
    assert_eq!((&s.weights, &s.step, &s.mask), (&saved.0, &saved.1, &saved.2));
    ck.close().unwrap();

    // A new process with a fresh arena loads from storage.
    let mut cfg = config(dir.path(), 0, 1);
    cfg.arena_dir = Some(dir.path().join("fresh-arena"));
    let ck2 = Checkpointer::new(cfg).unwrap();
    let mut t = State::new(5, 300_000);
    // SAFETY: as above.
    let loaded = unsafe { ck2.load(&t.refs(), Some(7), None) }.unwrap();
    assert!(!loaded.from_memory);
    assert_eq!((&t.weights, &t.step, &t.mask), (&saved.0, &saved.1, &saved.2));
}

#[test]
fn restarted_trainer_restores_from_the_arena_it_left() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = State::new(2, 10_000);
    {
        let ck = Checkpointer::new(config(dir.path(), 0, 1)).unwrap();
        for step in [1, 2, 3] {
            s.step[0] = step;
            // SAFETY: state outlives the save; waited below before any write.
            let h = unsafe { ck.save(&s.refs(), step as u64, Vec::new(), None) }.unwrap();
            h.wait().unwrap();
        }
        // A planned restart keeps the arena (a plain close removes it).
        ck.close_keeping_arena().unwrap();
    }
    let ck = Checkpointer::new(config(dir.path(), 0, 1)).unwrap();
    let mut t = State::new(9, 10_000);
    // SAFETY: exclusive access during load.
    let loaded = unsafe { ck.load(&t.refs(), None, None) }.unwrap();
    assert_eq!(loaded.step, 3);
    assert!(loaded.from_memory, "the arena file of the previous process holds step 3");
    assert_eq!(t.step[0], 3);
    assert_eq!(t.weights, s.weights);
}

#[test]
fn mismatched_state_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let ck = Checkpointer::new(config(dir.path(), 0, 1)).unwrap();
    let mut s = State::new(3, 1000);
    // SAFETY: waited before any write.
    unsafe { ck.save(&s.refs(), 1, Vec::new(), None) }.unwrap().wait().unwrap();
    let mut other = State::new(3, 999);
    let mut refs = other.refs();
    refs[1].dtype = DType::I32;
    refs.pop();
    // SAFETY: exclusive access during load.
    let e = unsafe { ck.load(&refs, None, None) }.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("`model.w`: expected float32 [999], checkpoint has float32 [1000]"), "{msg}");
    assert!(msg.contains("`step`: expected int32 [], checkpoint has int64 []"), "{msg}");
    assert!(msg.contains("`mask`: in the checkpoint but not in the state"), "{msg}");
    assert_eq!(e.kind(), ckptd::ErrorKind::Core(ckpt_core::ErrorKind::Mismatch));
}

#[test]
fn growing_state_grows_the_arena_and_many_saves_stay_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let ck = Checkpointer::new(config(dir.path(), 0, 1)).unwrap();
    let mut small = State::new(4, 1000);
    let mut handles = Vec::new();
    for step in 0..6u64 {
        // SAFETY: the state is not written until all handles are waited below.
        handles.push(unsafe { ck.save(&small.refs(), step, Vec::new(), None) }.unwrap());
    }
    let mut big = State::new(4, 2_000_000);
    // SAFETY: as above.
    handles.push(unsafe { ck.save(&big.refs(), 6, Vec::new(), None) }.unwrap());
    for h in &handles {
        h.wait().unwrap();
    }
    let arena_len = std::fs::metadata(ck.arena_path()).unwrap().len();
    // Two slots of the big state plus headroom, not a slot per save.
    assert!(arena_len < 3 * 8_000_000 + (4 << 20), "arena is {arena_len} bytes");
    assert_eq!(ck.latest_step().unwrap(), Some(6));
    let mut back = State::new(0, 2_000_000);
    // SAFETY: exclusive access during load.
    unsafe { ck.load(&back.refs(), None, None) }.unwrap();
    assert_eq!(back.weights, big.weights);
}

#[test]
fn four_ranks_commit_through_storage() {
    let dir = tempfile::tempdir().unwrap();
    let world = 4u32;
    std::thread::scope(|sc| {
        for rank in 0..world {
            let dir = dir.path();
            sc.spawn(move || {
                let ck = Checkpointer::new(config(dir, rank, world)).unwrap();
                let mut s = State::new(10 + rank, 5000);
                for step in [10u64, 20] {
                    // SAFETY: waited before the next write.
                    let h = unsafe { ck.save(&s.refs(), step, Vec::new(), None) }.unwrap();
                    h.wait().unwrap();
                    s.step[0] += 1;
                }
            });
        }
    });
    let ck = Checkpointer::new(config(dir.path(), 2, world)).unwrap();
    assert_eq!(ck.latest_step().unwrap(), Some(20));
    let mut s = State::new(0, 5000);
    // SAFETY: exclusive access during load.
    unsafe { ck.load(&s.refs(), Some(10), None) }.unwrap();
    assert_eq!(s.weights, State::new(12, 5000).weights);
}

#[test]
fn socket_means_sidecar_mode_and_is_never_silently_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 0, 1);
    cfg.socket = Some("/run/ckptd/agent.sock".into());
    let e = Checkpointer::new(cfg).unwrap_err();
    assert_eq!(e.kind(), ckptd::ErrorKind::AgentUnavailable);
    assert!(e.to_string().contains("/run/ckptd/agent.sock"), "{e}");
}

#[test]
fn load_without_checkpoint_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let ck = Checkpointer::new(config(dir.path(), 0, 1)).unwrap();
    let mut s = State::new(0, 10);
    // SAFETY: exclusive access during load.
    let e = unsafe { ck.load(&s.refs(), None, None) }.unwrap_err();
    assert_eq!(e.kind(), ckptd::ErrorKind::NoCheckpoint);
}

#[test]
fn saving_a_committed_step_number_again_is_refused_and_stale_shards_of_an_uncommitted_one_are_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = State::new(1, 10_000);
    let saved = first.weights.clone();
    {
        let ck = Checkpointer::new(config(dir.path(), 0, 1)).unwrap();
        // SAFETY: the state outlives the save, which is waited for before the state is dropped.
        unsafe { ck.save(&first.refs(), 4, Vec::new(), None) }.unwrap().wait().unwrap();
    }
    // A new process that resumed from an older step saves step 4 again, with other values.
    let mut cfg = config(dir.path(), 0, 1);
    cfg.arena_dir = Some(dir.path().join("arena-resumed"));
    let ck = Checkpointer::new(cfg).unwrap();
    let mut second = State::new(2, 10_000);
    // SAFETY: as above.
    let err = unsafe { ck.save(&second.refs(), 4, Vec::new(), None) }.unwrap().wait().unwrap_err();
    assert_eq!(err.kind(), ckptd::ErrorKind::Core(ckpt_core::ErrorKind::Conflict), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("step 4") && msg.contains("already committed"), "{msg}");
    assert!(msg.contains("resume from step 4"), "the message says what to do: {msg}");
    // The committed bytes did not change.
    let engine =
        ckpt_core::Engine::open(&format!("file://{}", dir.path().join("store").display()), Default::default()).unwrap();
    let mut check = State::new(9, 10_000);
    // SAFETY: exclusive access during load.
    let loaded = unsafe { ck.load(&check.refs(), Some(4), None) }.unwrap();
    assert_eq!((loaded.step, loaded.from_memory), (4, false));
    assert_eq!(check.weights, saved);

    // Step 5 has a stale shard from an attempt that never committed: a save replaces it.
    let stale = ckpt_core::Snapshot {
        table: ckpt_core::TensorTable::packed(
            [ckpt_core::TensorMeta::new("other", DType::F32, vec![8]).unwrap()],
            ckpt_core::tensor::DEFAULT_ALIGN,
        )
        .unwrap(),
        data: vec![0u8; 32].into(),
        metadata: Vec::new(),
    };
    engine.write_shard("job", 5, 0, 1, &stale).unwrap();
    // SAFETY: as above.
    unsafe { ck.save(&second.refs(), 5, Vec::new(), None) }.unwrap().wait().unwrap();
    assert!(engine.verify("job", 5).unwrap().ok());
    let (header, _) = engine.restore("job", 5, 0).unwrap();
    assert!(header.index.table.get("model.w").is_some(), "the new shard replaced the stale one");
    let mut check = State::new(9, 10_000);
    // SAFETY: exclusive access during load.
    unsafe { ck.load(&check.refs(), Some(5), None) }.unwrap();
    assert_eq!(check.weights, second.weights);
}

/// (comm, nice, scheduling policy) of every thread of this process, from `/proc/self/task`.
fn threads() -> Vec<(String, i64, u64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let Ok(stat) = std::fs::read_to_string(task.unwrap().path().join("stat")) else { continue };
        // `pid (comm) state ...`: comm may hold spaces, so split after its closing parenthesis.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        // Fields after comm start at field 3 (state): nice is field 19, policy field 41.
        out.push((stat[open + 1..close].to_string(), fields[16].parse().unwrap(), fields[38].parse().unwrap()));
    }
    out
}

#[test]
fn the_persist_thread_runs_at_the_configured_priority() {
    const SCHED_IDLE: u64 = 5;
    let idle_persist = || threads().iter().filter(|(c, _, p)| c == "ckpt-persist" && *p == SCHED_IDLE).count();
    // No other test asks for `idle`: any idle persist thread is this test's.
    assert_eq!(idle_persist(), 0);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 0, 1);
    cfg.engine.persist.priority = ckpt_core::Priority::Idle;
    let ck = Checkpointer::new(cfg).unwrap();
    let mut s = State::new(1, 4096);
    // SAFETY: `s` outlives the save, which is waited for before it is touched.
    unsafe { ck.save(&s.refs(), 1, Vec::new(), None) }.unwrap().wait().unwrap();
    assert_eq!(idle_persist(), 1, "{:?}", threads());
    ck.close().unwrap();
    assert_eq!(idle_persist(), 0, "closing joins the thread");
}
