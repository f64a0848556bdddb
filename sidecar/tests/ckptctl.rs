//! System tests of `ckptctl`: checkpoints are written with the real engine into a `file://` store,
//! then the real binary runs against them and its exit codes and output are checked.

#[path = "../../ckpt-core/tests/common/shard_file.rs"]
mod shard_file;
use shard_file::shard_file;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use bytes::Bytes;
use ckpt_core::{CommitConfig, DType, Engine, EngineConfig, PersistConfig, Snapshot, TensorMeta, TensorTable};
use serde_json::Value;

const JOB: &str = "llama";
/// Chunk size of the test shards: small, so that a shard spans many chunks.
const CHUNK: u32 = 4096;

struct Store {
    dir: tempfile::TempDir,
    url: String,
    engine: Engine,
}

fn store() -> Store {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let cfg = EngineConfig {
        persist: PersistConfig {
            chunk_size: CHUNK,
            workers: 2,
            inflight_bytes: 4 * (u64::from(CHUNK) + (5 << 20)),
            part_size: 5 << 20,
            ..PersistConfig::default()
        },
        commit: CommitConfig { deadline: std::time::Duration::from_secs(20), ..CommitConfig::default() },
        ..EngineConfig::default()
    };
    let engine = Engine::open(&url, cfg).unwrap();
    Store { dir, url, engine }
}

/// Mixed dtypes, a scalar, a zero-size tensor and a complex128 tensor (which safetensors lacks),
/// about 25 KiB, with bytes that depend on `seed`.
fn snapshot(seed: u8) -> Snapshot {
    let metas = vec![
        TensorMeta::new("model.embed", DType::BF16, vec![64, 128]).unwrap(),
        TensorMeta::new("model.scalar", DType::F64, vec![]).unwrap(),
        TensorMeta::new("model.empty", DType::F32, vec![3, 0]).unwrap(),
        TensorMeta::new("optim.exp_avg", DType::F32, vec![2048]).unwrap(),
        TensorMeta::new("optim.step", DType::I64, vec![1]).unwrap(),
        TensorMeta::new("mask", DType::Bool, vec![17]).unwrap(),
        TensorMeta::new("fp8", DType::F8E4M3FN, vec![5, 3]).unwrap(),
        TensorMeta::new("c", DType::C128, vec![2, 2]).unwrap(),
    ];
    let table = TensorTable::packed(metas, 64).unwrap();
    let data: Vec<u8> = (0..table.total_len()).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    Snapshot { table, data: Bytes::from(data), metadata: b"{\"epoch\":3}".to_vec() }
}

/// Writes and commits `step` with `world_size` ranks.
fn commit(s: &Store, step: u64, world_size: u32) {
    for rank in (1..world_size).rev() {
        s.engine.write_shard(JOB, step, rank, world_size, &snapshot(rank as u8)).unwrap();
    }
    let meta = BTreeMap::from([("lr".to_string(), "3e-4".to_string())]);
    let (_, m) = s.engine.save(JOB, step, 0, world_size, &snapshot(0), meta).unwrap();
    assert!(m.is_some(), "rank 0 commits");
}

/// Runs `ckptctl` with `args`; the target comes from the flags, never from the caller's environment.
fn ckptctl(args: &[&str]) -> Output {
    ckptctl_in(None, args)
}

fn ckptctl_in(cwd: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ckptctl"));
    cmd.args(args)
        .env_remove(ckptd::env::ENV_STORE)
        .env_remove(ckptd::env::ENV_JOB)
        .env_remove(ckptd::env::ENV_CKPTCTL_LOG);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    cmd.output().unwrap()
}

/// `args` followed by `--store <url> --job llama`.
fn on(s: &Store, args: &[&str]) -> Output {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--store", &s.url, "--job", JOB]);
    ckptctl(&all)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("ckptctl exited by a signal")
}

fn json(o: &Output) -> Value {
    assert_eq!(code(o), 0, "stdout: {}\nstderr: {}", stdout(o), stderr(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not one JSON document ({e}): {}", stdout(o)))
}

#[test]
fn ls_lists_committed_and_uncommitted_steps_and_marks_latest() {
    let s = store();
    commit(&s, 10, 1);
    commit(&s, 20, 2);
    // Step 30: only rank 1 of 2 wrote its shard, nobody committed.
    s.engine.write_shard(JOB, 30, 1, 2, &snapshot(1)).unwrap();

    let doc = json(&on(&s, &["ls", "--json"]));
    assert_eq!(doc["job"], JOB);
    assert_eq!(doc["latest"], 20);
    let steps = doc["steps"].as_array().unwrap();
    let summary: Vec<(u64, &str, u64, bool)> = steps
        .iter()
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["state"].as_str().unwrap(),
                v["shards"].as_u64().unwrap(),
                v["latest"] == true,
            )
        })
        .collect();
    assert_eq!(summary, [(10, "committed", 1, false), (20, "committed", 2, true), (30, "uncommitted", 1, false)]);
    for v in steps {
        assert!(v["bytes"].as_u64().unwrap() > 20_000, "{v}");
        let modified = v["modified"].as_str().unwrap();
        assert!(modified.len() == 20 && modified.ends_with('Z') && modified.as_bytes()[10] == b'T', "{modified}");
    }

    // The table, with the target taken from the environment this time.
    let o = Command::new(env!("CARGO_BIN_EXE_ckptctl"))
        .arg("ls")
        .env(ckptd::env::ENV_STORE, &s.url)
        .env(ckptd::env::ENV_JOB, JOB)
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    let line = |step: &str| text.lines().find(|l| l.split_whitespace().next() == Some(step)).unwrap_or_default();
    assert!(line("20").contains("committed") && line("20").contains("latest"), "{text}");
    assert!(line("30").contains("uncommitted") && !line("30").contains("latest"), "{text}");
    assert!(!line("10").contains("latest"), "{text}");
    assert!(o.stderr.is_empty(), "no progress or logs when stdout is not a terminal: {}", stderr(&o));
}

#[test]
fn ls_of_an_empty_job_says_so() {
    let s = store();
    let doc = json(&on(&s, &["ls", "--json"]));
    assert_eq!(doc["steps"], Value::Array(vec![]));
    assert_eq!(doc["latest"], Value::Null);
    let o = on(&s, &["ls"]);
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).contains("has no steps"), "{}", stdout(&o));
}

#[test]
fn inspect_shows_the_manifest_and_every_rank_tensor_table() {
    let s = store();
    commit(&s, 3, 1);
    commit(&s, 7, 2);

    let doc = json(&on(&s, &["inspect", "--json"]));
    assert_eq!(doc["step"], 7, "defaults to the latest step");
    assert_eq!(doc["latest"], true);
    assert_eq!(doc["world_size"], 2);
    assert_eq!(doc["metadata"]["lr"], "3e-4");
    let m = s.engine.manifest(JOB, 7).unwrap();
    let shards = doc["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2);
    for (v, e) in shards.iter().zip(&m.shards) {
        assert_eq!(v["size"], e.size);
        assert_eq!(v["index_crc32c"], e.index_crc32c);
    }
    let ranks = doc["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 2);
    let snap = snapshot(0);
    let tensors = ranks[0]["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), snap.table.len());
    for (v, e) in tensors.iter().zip(snap.table.entries()) {
        assert_eq!(v["name"], e.meta.name.as_str());
        assert_eq!(v["dtype"], e.meta.dtype.name());
        assert_eq!(v["shape"], serde_json::json!(e.meta.shape));
        assert_eq!(v["bytes"], e.len);
    }
    assert_eq!(tensors[1]["shape"], serde_json::json!([]), "scalar");
    assert_eq!(tensors[2]["bytes"], 0, "zero-size tensor");
    assert_eq!(ranks[0]["user_metadata_len"], snap.metadata.len());
    assert!(ranks[0]["chunks"].as_u64().unwrap() > 5);

    let doc = json(&on(&s, &["inspect", "--json", "--step", "3", "--rank", "0"]));
    assert_eq!((doc["step"].as_u64(), doc["latest"].as_bool()), (Some(3), Some(false)));
    assert_eq!(doc["ranks"].as_array().unwrap().len(), 1);

    let o = on(&s, &["inspect", "--rank", "1"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("world size  2") && text.contains("optim.exp_avg") && text.contains("bfloat16"), "{text}");
    assert!(text.contains("rank 1:") && !text.contains("rank 0:"), "{text}");

    let o = on(&s, &["inspect", "--rank", "5"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).starts_with("error: rank 5 does not exist"), "{}", stderr(&o));
}

/// Flips one bit of `rank`'s shard of `step` at `offset`.
fn flip(s: &Store, step: u64, rank: u32, offset: usize) {
    let path = shard_file(&s.dir.path().join(format!("{JOB}/step-{step}")), rank).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[offset] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();
}

#[test]
fn verify_exits_0_when_sound_and_1_naming_rank_and_chunk_after_a_flipped_byte() {
    let s = store();
    commit(&s, 4, 1);
    commit(&s, 5, 2);

    let o = on(&s, &["verify", "--step", "5"]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("step 5: ok"), "{}", stdout(&o));
    assert!(o.stderr.is_empty(), "{}", stderr(&o));

    // Chunks are stored raw from offset 0, so this byte lies in chunk 2 of rank 1.
    flip(&s, 5, 1, 2 * CHUNK as usize + 100);

    let o = on(&s, &["verify"]);
    assert_eq!(code(&o), 1, "the newest commit is verified by default: {}", stdout(&o));
    let text = stdout(&o);
    assert!(text.contains("step 5: CORRUPT"), "{text}");
    let problem = text.lines().find(|l| l.trim_start().starts_with("rank 1:")).unwrap_or_else(|| panic!("{text}"));
    assert!(problem.contains("chunk 2") && problem.contains("crc32c mismatch"), "{problem}");
    assert!(problem.contains(&format!("at offset {}", 2 * CHUNK)), "{problem}");
    assert!(!text.contains("rank 0:"), "rank 0 is sound: {text}");

    let doc: Value = serde_json::from_slice(&on(&s, &["verify", "--all", "--json"]).stdout).unwrap();
    assert_eq!(doc["ok"], false);
    let steps = doc["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!((steps[0]["step"].as_u64(), steps[0]["ok"].as_bool()), (Some(4), Some(true)));
    assert_eq!((steps[1]["step"].as_u64(), steps[1]["ok"].as_bool()), (Some(5), Some(false)));
    assert_eq!(steps[1]["shards"][0]["error"], Value::Null);
    let err = steps[1]["shards"][1]["error"].as_str().unwrap();
    assert!(err.contains("step 5, rank 1") && err.contains("chunk 2"), "{err}");
    assert_eq!(code(&on(&s, &["verify", "--all"])), 1);

    assert_eq!(code(&on(&s, &["verify", "--step", "4"])), 0, "an older sound step still verifies");
}

#[test]
fn verify_of_a_step_that_does_not_exist_exits_2() {
    let s = store();
    commit(&s, 1, 1);
    let o = on(&s, &["verify", "--step", "99"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("step 99") && stderr(&o).contains("not found"), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
}

#[test]
fn gc_keep_1_leaves_only_the_newest_step() {
    let s = store();
    for step in 1..=3 {
        commit(&s, step, 1);
    }
    // Uncommitted: step 0 is abandoned debris older than the newest commit, which goes; step 25 is
    // newer than it and may be in progress, so retention leaves it alone.
    s.engine.write_shard(JOB, 0, 1, 2, &snapshot(1)).unwrap();
    s.engine.write_shard(JOB, 25, 1, 2, &snapshot(1)).unwrap();

    let o = on(&s, &["gc", "--keep", "1", "--dry-run"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("would delete committed steps: 1, 2"), "{}", stdout(&o));
    assert_eq!(s.engine.steps(JOB).unwrap().len(), 5, "a dry run deletes nothing");

    let doc = json(&on(&s, &["gc", "--keep", "1", "--json"]));
    assert_eq!(doc["kept"], serde_json::json!([3]));
    assert_eq!(doc["deleted_committed"], serde_json::json!([1, 2]));
    assert_eq!(doc["deleted_debris"], serde_json::json!([0]));
    let after: Vec<u64> = s.engine.steps(JOB).unwrap().iter().map(|i| i.step).collect();
    assert_eq!(after, [3, 25]);
    assert_eq!(s.engine.latest(JOB).unwrap().map(|m| m.step), Some(3));

    let o = on(&s, &["gc", "--keep", "0"]);
    assert_eq!(code(&o), 64, "{}", stderr(&o));
    assert_eq!(s.engine.steps(JOB).unwrap().len(), 2);
}

#[test]
fn export_writes_a_file_that_safetensors_loads_with_identical_bytes() {
    let s = store();
    commit(&s, 8, 2);
    let out_dir = tempfile::tempdir().unwrap();

    // complex128 has no safetensors dtype: a clear error naming the tensor, and no file.
    let out = out_dir.path().join("rank1.safetensors");
    let o = on(&s, &["export", "--format", "safetensors", "--rank", "1", "--out", out.to_str().unwrap()]);
    assert_eq!(code(&o), 2);
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("`c` (complex128)") && err.contains("--skip-unsupported"),
        "{err}"
    );
    assert!(!out.exists());

    // A relative --out, resolved against the working directory.
    let mut args = vec!["export", "--format", "safetensors", "--rank", "1", "--out", "rank1.safetensors"];
    args.extend(["--skip-unsupported", "--step", "8", "--store", &s.url, "--job", JOB]);
    let o = ckptctl_in(Some(out_dir.path()), &args);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("skipped `c` (complex128)"), "{}", stdout(&o));
    assert!(o.stderr.is_empty(), "{}", stderr(&o));

    let file = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&file).unwrap();
    let snap = snapshot(1);
    let exported: Vec<_> = snap.table.entries().iter().filter(|e| e.meta.dtype != DType::C128).collect();
    assert_eq!(st.len(), exported.len());
    for e in exported {
        let view = st.tensor(&e.meta.name).unwrap();
        assert_eq!(format!("{:?}", view.dtype()), e.meta.dtype.safetensors_name().unwrap(), "{}", e.meta.name);
        assert_eq!(view.shape().iter().map(|&d| d as u64).collect::<Vec<_>>(), e.meta.shape, "{}", e.meta.name);
        assert!(view.data() == &snap.data[e.range()], "bytes of `{}` differ", e.meta.name);
    }
    let (_, md) = safetensors::SafeTensors::read_metadata(&file).unwrap();
    let md = md.metadata().clone().unwrap();
    assert_eq!((md["ckptd.job"].as_str(), md["ckptd.step"].as_str(), md["ckptd.rank"].as_str()), (JOB, "8", "1"));
    let leftovers: Vec<_> = std::fs::read_dir(out_dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, ["rank1.safetensors"], "no temporary file is left behind");
}

#[test]
fn bad_configuration_exits_64_with_one_line_and_no_credentials() {
    let o = ckptctl(&["ls", "--store", "bogus://alice:s3cr3t@host/x?token=hunter2", "--job", JOB]);
    assert_eq!(code(&o), 64);
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: invalid store url") && err.contains("unknown scheme"), "{err}");
    assert!(!err.contains("s3cr3t") && !err.contains("hunter2"), "credentials leaked: {err}");

    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let o = ckptctl(&["ls", "--store", &url, "--job", "a/b"]);
    assert_eq!(code(&o), 64, "{}", stderr(&o));
    assert!(stderr(&o).contains("not a valid job name"), "{}", stderr(&o));

    let o = ckptctl(&["ls", "--job", JOB]);
    assert_eq!(code(&o), 64, "a missing --store is a usage error: {}", stderr(&o));
    assert!(stderr(&o).contains("--store"), "{}", stderr(&o));
    let o = ckptctl(&["frobnicate"]);
    assert_eq!(code(&o), 64);
    assert_eq!(code(&ckptctl(&["--help"])), 0);
}

/// The MANIFEST file of `step`.
fn manifest_path(s: &Store, step: u64) -> std::path::PathBuf {
    s.dir.path().join(format!("{JOB}/step-{step}/{}", ckpt_core::store::layout::MANIFEST_NAME))
}

#[test]
fn a_mistyped_file_store_is_reported_missing_and_not_created() {
    let s = store();
    commit(&s, 1, 1);
    let typo = s.dir.path().join("chekpoints/llama");
    let url = format!("file://{}", typo.display());
    for cmd in [&["ls"][..], &["verify"], &["verify", "--all", "--json"], &["inspect"], &["gc", "--keep", "1"]] {
        let mut args = cmd.to_vec();
        args.extend(["--store", &url, "--job", JOB]);
        let o = ckptctl(&args);
        assert_eq!(code(&o), 2, "{cmd:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(&typo.display().to_string()) && err.contains("not found"), "{cmd:?}: {err}");
        assert!(!s.dir.path().join("chekpoints").exists(), "{cmd:?} created the mistyped directory");
    }
}

#[test]
fn an_empty_store_and_a_bare_file_scheme_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    for url in ["", "file://", "file:///"] {
        let o = ckptctl_in(Some(dir.path()), &["ls", "--store", url, "--job", JOB]);
        assert_eq!(code(&o), 64, "`{url}`: {}", stderr(&o));
        let err = stderr(&o);
        assert!(err.lines().count() == 1 && err.starts_with("error: invalid store url"), "`{url}`: {err}");
    }
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "nothing is created in the working directory");
}

#[test]
fn ls_marks_a_committed_step_whose_manifest_does_not_decode_as_damaged() {
    let s = store();
    for step in 1..=3 {
        commit(&s, step, 1);
    }
    std::fs::write(manifest_path(&s, 2), b"{ not a manifest").unwrap();
    std::fs::write(manifest_path(&s, 3), b"").unwrap();

    let doc = json(&on(&s, &["ls", "--json"]));
    assert_eq!(doc["latest"], 1);
    let states: Vec<(u64, &str)> = doc["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["step"].as_u64().unwrap(), v["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [(1, "committed"), (2, "damaged"), (3, "damaged")]);
    assert!(doc["steps"][1]["problem"].as_str().unwrap().contains("corrupt"), "{}", doc["steps"][1]);
    assert!(doc["steps"][0].get("problem").is_none());

    let o = on(&s, &["ls"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    let line = |step: &str| text.lines().find(|l| l.split_whitespace().next() == Some(step)).unwrap_or_default();
    assert!(line("2").contains("damaged") && line("3").contains("damaged"), "{text}");
    assert!(line("1").contains("committed") && line("1").contains("latest"), "{text}");
    assert!(text.contains("step 3 is damaged:"), "{text}");
    // The engine warns that it skipped the damaged steps; stderr is a pipe here, so no colour.
    let err = stderr(&o);
    assert!(err.contains("falling back"), "{err}");
    assert!(!err.contains('\u{1b}'), "ANSI escapes on a redirected stderr: {err:?}");
}

#[test]
fn verify_reports_a_newer_format_version_as_unsupported_not_corrupt() {
    let s = store();
    commit(&s, 1, 1);
    commit(&s, 2, 2);
    let mut m = s.engine.manifest(JOB, 2).unwrap();
    m.version = ckpt_core::manifest::MANIFEST_VERSION + 1;
    std::fs::write(manifest_path(&s, 2), m.encode()).unwrap();

    let o = on(&s, &["verify", "--step", "2"]);
    let text = stdout(&o);
    assert_eq!(code(&o), 2, "unsupported is not corruption (exit 1): {text}");
    assert!(text.contains("step 2: UNSUPPORTED") && !text.contains("CORRUPT"), "{text}");
    assert!(text.contains("upgrade"), "{text}");

    let doc: Value = serde_json::from_slice(&on(&s, &["verify", "--all", "--json"]).stdout).unwrap();
    let steps = doc["steps"].as_array().unwrap();
    assert_eq!((steps[0]["ok"].as_bool(), steps[0]["unsupported"].as_bool()), (Some(true), Some(false)));
    assert_eq!((steps[1]["ok"].as_bool(), steps[1]["unsupported"].as_bool()), (Some(false), Some(true)));

    // Real damage next to it is still corruption.
    flip(&s, 1, 0, 100);
    let o = on(&s, &["verify", "--all"]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    assert!(stdout(&o).contains("1 corrupt, 1 unsupported"), "{}", stdout(&o));
}

#[test]
fn export_does_not_create_missing_directories() {
    let s = store();
    commit(&s, 1, 1);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("no/such/dir/rank0.safetensors");
    let args =
        ["export", "--format", "safetensors", "--rank", "0", "--skip-unsupported", "--out", out.to_str().unwrap()];
    let o = on(&s, &args);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.lines().count() == 1 && err.contains("does not exist"), "{err}");
    assert!(!dir.path().join("no").exists(), "export created the missing directories");

    // A file the OS refuses to create: the OS's reason is said once, not once per cause.
    let o = on(
        &s,
        &["export", "--format", "safetensors", "--rank", "0", "--skip-unsupported", "--out", "/proc/sys/x.safetensors"],
    );
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.matches("(os error").count(), 1, "{err}");
}

/// Commits step `step` of one rank whose shard is consistent (trailer, index checksum, manifest)
/// but whose index claims a `region_len`-byte region in 8 MiB zstd chunks of 16 garbage bytes each,
/// so that only reading a chunk shows the damage.
fn commit_huge_claim(s: &Store, step: u64, region_len: u64) {
    use ckpt_core::codec::CODEC_ZSTD;
    use ckpt_core::format::ChunkEntry;
    const STORED: u32 = 16;
    let garbage = [0x5au8; STORED as usize];
    let chunk_size = 8 << 20;
    let table = TensorTable::packed([TensorMeta::new("huge", DType::U8, vec![region_len]).unwrap()], 64).unwrap();
    assert_eq!(table.total_len(), region_len);
    let chunks = region_len.div_ceil(u64::from(chunk_size));
    let entry = ChunkEntry { codec: CODEC_ZSTD, stored_len: STORED, crc32c: crc32c::crc32c(&garbage) };
    let index = ckpt_core::ShardIndex {
        step,
        rank: 0,
        world_size: 1,
        chunk_size,
        table,
        chunks: vec![entry; chunks as usize],
        metadata: Vec::new(),
    };
    let encoded = index.encode();
    let mut bytes = garbage.repeat(chunks as usize);
    let trailer = ckpt_core::Trailer {
        index_offset: bytes.len() as u64,
        index_len: encoded.len() as u64,
        index_crc32c: crc32c::crc32c(&encoded),
    };
    bytes.extend_from_slice(&encoded);
    bytes.extend_from_slice(&trailer.encode());
    let object = ckpt_core::store::layout::shard_object(0, step);
    let path = s.dir.path().join(ckpt_core::store::layout::object_path(JOB, step, &object));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let shard = ckpt_core::ShardEntry {
        rank: 0,
        object,
        size: bytes.len() as u64,
        index_crc32c: trailer.index_crc32c,
        region_len,
    };
    s.engine.commit(JOB, step, 1, vec![shard], BTreeMap::new()).unwrap();
}

/// Runs `ckptctl` with its address space capped at 8 GiB, far below the region the crafted shard
/// claims: a reader that allocates the whole region dies on the allocation instead of answering.
fn ckptctl_capped(s: &Store, args: &[&str]) -> Output {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "ulimit -v 8388608 && exec \"$0\" \"$@\"", env!("CARGO_BIN_EXE_ckptctl")])
        .args(args)
        .args(["--store", &s.url, "--job", JOB])
        .env_remove(ckptd::env::ENV_STORE)
        .env_remove(ckptd::env::ENV_JOB)
        .env_remove(ckptd::env::ENV_CKPTCTL_LOG);
    cmd.output().unwrap()
}

#[test]
fn export_and_verify_of_a_shard_claiming_a_64_gib_region_stream_it_and_fail_on_the_bad_chunk() {
    let s = store();
    commit_huge_claim(&s, 3, 64 << 30);
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("huge.safetensors");

    let o = ckptctl_capped(&s, &["export", "--format", "safetensors", "--rank", "0", "--out", out.to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "export must fail cleanly, not be killed: {:?}\n{err}", o.status);
    // A warning that the damaged step is passed over, then the one error: no older step exists.
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("step 3") && errors[0].contains("chunk 0"), "{err}");
    let left: Vec<_> = std::fs::read_dir(out_dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "no output and no temporary file: {left:?}");

    let o = ckptctl_capped(&s, &["verify", "--step", "3"]);
    assert_eq!(o.status.code(), Some(1), "verify reports corruption: {:?}\n{}", o.status, stderr(&o));
    let text = stdout(&o);
    // Every chunk is garbage, and verify reads them in parallel: it names the first one it caught.
    assert!(text.contains("step 3: CORRUPT") && text.contains("rank 0") && text.contains(" chunk "), "{text}");
}

#[test]
fn export_without_a_step_passes_over_a_damaged_newest_step() {
    use std::os::unix::fs::FileExt;
    let s = store();
    commit(&s, 1, 1);
    commit(&s, 2, 1);
    let shard = shard_file(&s.dir.path().join(format!("{JOB}/step-2")), 0).unwrap();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&shard).unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, 10).unwrap();
    file.write_all_at(&[byte[0] ^ 0x01], 10).unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("model.safetensors");
    let o = on(
        &s,
        &["export", "--format", "safetensors", "--rank", "0", "--skip-unsupported", "--out", out.to_str().unwrap()],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("skipped step 2") && text.contains("step 1 rank 0"), "{text}");
    let bytes = std::fs::read(&out).unwrap();
    let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(md.metadata().as_ref().and_then(|m| m.get("ckptd.step")).map(String::as_str), Some("1"));
}
