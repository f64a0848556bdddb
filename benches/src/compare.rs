//! `compare`: ckptd against its peers and the machine's limits, in one run, on the same state and
//! the same directory, so that every ratio it prints is measured side by side.
//!
//! The limits (memcpy, sequential write+fsync, warm and cold sequential read) are timed here in
//! Rust, on the same directory. ckptd itself is always measured in Rust too, through its Rust
//! client in embedded and sidecar mode ([`crate::client`], one child process per system and
//! size), together with the training-step stall: what a CPU-bound step pays while a save persists,
//! for each persist priority and file write mode. Everything that needs torch (ckptd through
//! Python, torch.save, DCP, safetensors, pinned CUDA copies, multi-rank commits) is timed by
//! `benches/python/compare.py` under `--python` when it imports torch, each system in its own
//! process; without it those are listed as skipped, with the reason. With `--drill`, the recovery drill (see
//! [`crate::drill`]) times a real job's recovery from a fault, phase by phase. This module merges
//! everything into `OUT/results.json`, writes `OUT/results.md`, draws the PNGs and runs the goodput
//! model, with the drill's measured restart time when there is one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use ckpt_core::{FileIo, Priority};
use serde_json::{Value, json};

use crate::client;
use crate::drill::{self, Recovery};
use crate::engine::{Failure, evict, noise, parallel_copy, prefault, read_file, spread, timed, timed_io, write_file};
use crate::goodput::{self, Costs, FaultRate};
use crate::machine;
use crate::plot::{self, Series, YAxis};
use crate::units::human;

/// What `compare` runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub sizes: Vec<u64>,
    pub reps: usize,
    pub out: PathBuf,
    pub dir: PathBuf,
    pub python: PathBuf,
    pub device: String,
    pub systems: Option<String>,
    pub ranks: Vec<usize>,
    pub shard: u64,
    /// Run the scaling part against S3 at `http(s)://HOST:PORT/BUCKET` instead of file://.
    pub scaling_s3: Option<String>,
    pub fault: FaultRate,
    /// `pip install` missing peers into `python`'s environment first.
    pub install_peers: bool,
    /// Run the recovery drill too (minutes).
    pub drill: bool,
}

/// The order systems are shown in, and their labels.
const SYSTEMS: [(&str, &str); 10] = [
    ("ckptd-rust", "ckptd (embedded, Rust client)"),
    ("ckptd-sidecar-rust", "ckptd (sidecar, Rust client)"),
    ("ckptd", "ckptd (embedded, Python)"),
    ("ckptd-sidecar", "ckptd (sidecar, Python)"),
    ("torch.save", "torch.save/load"),
    ("dcp", "DCP async_save"),
    ("dcp-cached", "DCP async_save, cached staging"),
    ("safetensors", "safetensors"),
    ("memcpy", "torch copy_ (limit)"),
    ("limit", "Rust limits"),
];

/// The scaling runs' systems in `compare.py`'s records, and the store each ran against.
const SCALING: [(&str, &str); 2] = [("ckptd-scaling", "file://"), ("ckptd-scaling-s3", "S3")];

/// One record of `results.json`.
#[derive(Debug, Clone)]
struct Rec {
    system: String,
    size: u64,
    metric: String,
    median: f64,
    min: f64,
    max: f64,
    rss: Option<u64>,
    ranks: Option<u64>,
}

impl Rec {
    fn from_json(v: &Value) -> Option<Rec> {
        Some(Rec {
            system: v.get("system")?.as_str()?.to_string(),
            size: v.get("size_bytes")?.as_u64()?,
            metric: v.get("metric")?.as_str()?.to_string(),
            median: v.get("median_s")?.as_f64()?,
            min: v.get("min_s")?.as_f64()?,
            max: v.get("max_s")?.as_f64()?,
            rss: v.get("peak_rss_bytes").and_then(Value::as_u64),
            ranks: v.get("ranks").and_then(Value::as_u64),
        })
    }

    fn to_json(&self) -> Value {
        let mut v = json!({
            "system": self.system, "size_bytes": self.size, "metric": self.metric,
            "median_s": self.median, "min_s": self.min, "max_s": self.max,
        });
        if let Some(r) = self.rss {
            v["peak_rss_bytes"] = json!(r);
        }
        if let Some(n) = self.ranks {
            v["ranks"] = json!(n);
        }
        v
    }
}

/// Runs everything and prints the tables to `out`.
pub fn run(cfg: &Config, out: &mut dyn Write) -> Result<(), Failure> {
    if cfg.reps == 0 || cfg.reps > 100 {
        return Err(Failure::Config(format!("--reps {} is out of range: give 1 to 100", cfg.reps)));
    }
    if cfg.sizes.is_empty() {
        return Err(Failure::Config("--sizes is empty".into()));
    }
    let dir = cfg.dir.canonicalize().map_err(|e| Failure::Config(format!("--dir {}: {e}", cfg.dir.display())))?;
    let bin_dir = ckptd_bin_dir();
    if cfg.drill {
        for name in ["ckptd", "ckptctl"] {
            if !bin_dir.join(name).exists() {
                return Err(Failure::Config(format!(
                    "--drill needs {}: build it with `cargo build -p ckptd --features server --bins` or point CKPTD_BIN_DIR at it",
                    bin_dir.join(name).display()
                )));
            }
        }
    }
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("create {}", cfg.out.display()))?;
    let mount = machine::mount_of(&dir);
    let facts = machine_facts(&dir, mount.as_ref());
    writeln!(out, "ckptd compare: sizes {}, {} reps, dir {}", sizes_text(&cfg.sizes), cfg.reps, dir.display())?;
    writeln!(out, "  machine {}", facts["summary"].as_str().unwrap_or_default())?;
    if mount.as_ref().is_some_and(machine::Mount::memory_backed) {
        writeln!(out, "  note: {} is memory-backed: 'durable' and cold reads mean nothing there", dir.display())?;
    }
    out.flush()?;

    // Python first: it decides whether this is a GPU run, and fails early on `--device cuda`
    // without CUDA, before minutes of limits are spent.
    if cfg.install_peers {
        install_peers(&cfg.python, out)?;
    }
    let torch = probe_python(&cfg.python);
    if cfg.device == "cuda" && !torch.as_ref().is_ok_and(|t| t.1) {
        let why = match &torch {
            Ok(_) => "torch.cuda.is_available() is False (no GPU, or a CPU-only torch)".to_string(),
            Err(e) => e.clone(),
        };
        return Err(Failure::Config(format!("--device cuda: {why}")));
    }

    let mut recs: Vec<Rec> = Vec::new();
    for &size in &cfg.sizes {
        writeln!(out, "  limits at {} ...", human(size))?;
        out.flush()?;
        recs.extend(limits(&dir, size, cfg.reps)?);
    }
    let mut skipped: BTreeMap<String, String> = BTreeMap::new();
    rust_systems(cfg, &dir, &bin_dir, &mut recs, &mut skipped, out)?;
    let mut py_machine = Value::Null;
    match &torch {
        Err(e) => {
            writeln!(
                out,
                "  skipping the Python systems (ckptd through Python, torch.save, DCP, safetensors, torch copy_, scaling): {e}"
            )?;
            skipped.insert("python".into(), e.clone());
        }
        Ok((version, cuda)) => {
            writeln!(out, "  python {} with torch {version} (CUDA: {cuda}) ...", cfg.python.display())?;
            out.flush()?;
            let (r, m, s) = python_systems(cfg, &dir, &bin_dir)?;
            recs.extend(r);
            py_machine = m;
            skipped.extend(s);
        }
    }
    let mut drill_results = Value::Null;
    if cfg.drill {
        if torch.is_ok() {
            writeln!(out, "  recovery drill (xid, hang, local) with {} ...", bin_dir.display())?;
            out.flush()?;
            match drill::run(&cfg.python, &bin_dir, &cfg.out.join("drill.json")) {
                Ok(v) => drill_results = v,
                Err(e) => {
                    writeln!(out, "  the drill failed: {e:#}")?;
                    skipped.insert("drill".into(), format!("{e:#}"));
                }
            }
        } else {
            skipped.insert("drill".into(), "needs --python with torch and ckptd".into());
        }
    }

    let command = std::env::args().collect::<Vec<_>>().join(" ");
    report(cfg, &recs, &drill_results, &facts, &py_machine, &skipped, &command, out)
}

/// Redraws the tables, the goodput model and the plots from an earlier `results.json`, with this
/// run's fault-rate flags: a different job size or fault rate needs no new measurements.
pub fn redraw(cfg: &Config, from: &Path, out: &mut dyn Write) -> Result<(), Failure> {
    let text =
        std::fs::read_to_string(from).map_err(|e| Failure::Config(format!("--from-json {}: {e}", from.display())))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Failure::Config(format!("--from-json {}: not JSON: {e}", from.display())))?;
    let recs: Vec<Rec> =
        v["records"].as_array().map(|a| a.iter().filter_map(Rec::from_json).collect()).unwrap_or_default();
    if recs.is_empty() {
        return Err(Failure::Config(format!("--from-json {}: no records", from.display())));
    }
    let mut sizes: Vec<u64> = recs.iter().filter(|r| r.system == "limit").map(|r| r.size).collect();
    if sizes.is_empty() {
        sizes = recs.iter().filter(|r| r.ranks.is_none()).map(|r| r.size).collect();
    }
    sizes.sort_unstable();
    sizes.dedup();
    let mut ranks: Vec<usize> = recs.iter().filter_map(|r| r.ranks).filter_map(|n| usize::try_from(n).ok()).collect();
    ranks.sort_unstable();
    ranks.dedup();
    let shard = recs.iter().find_map(|r| r.ranks.filter(|&n| n > 0).map(|n| r.size / n)).unwrap_or(cfg.shard);
    let reps = v["reps"].as_u64().and_then(|n| usize::try_from(n).ok()).unwrap_or(cfg.reps);
    let skipped: BTreeMap<String, String> = v["skipped"]
        .as_object()
        .map(|o| o.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
        .unwrap_or_default();
    let command = v["command"].as_str().unwrap_or_default().to_string();
    let cfg = Config { sizes, reps, ranks, shard, ..cfg.clone() };
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("create {}", cfg.out.display()))?;
    report(&cfg, &recs, &v["drill"], &v["machine"], &v["python"], &skipped, &command, out)
}

/// Writes results.json, results.md and the plots, and prints the tables. `drill` is drill.py's
/// JSON list, or null when the drill did not run.
#[allow(clippy::too_many_arguments)]
fn report(
    cfg: &Config,
    recs: &[Rec],
    drill: &Value,
    facts: &Value,
    py_machine: &Value,
    skipped: &BTreeMap<String, String>,
    command: &str,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let runs = if drill.is_null() {
        Vec::new()
    } else {
        drill::parse(drill).map_err(|e| Failure::Run(anyhow::anyhow!("the drill's results: {e}")))?
    };
    let recovery = Recovery::of(&runs);
    let fault = cfg.fault;
    let mtbf = fault.job_mtbf_s();
    let good = goodput_rows(recs, &cfg.sizes, mtbf, recovery.as_ref());
    let json = json!({
        "benchmark": "compare",
        "command": command,
        "machine": facts,
        "python": py_machine,
        "reps": cfg.reps,
        "fault_rate": {
            "interruptions": fault.interruptions, "days": fault.days, "fleet_gpus": fault.fleet_gpus,
            "job_gpus": fault.job_gpus, "per_gpu_per_hour": fault.per_gpu_per_s() * 3600.0, "job_mtbf_s": mtbf,
        },
        "skipped": skipped,
        "records": recs.iter().map(Rec::to_json).collect::<Vec<_>>(),
        "drill": drill,
        "recovery": recovery.as_ref().map(|r| json!({
            "scenario": r.scenario, "fault_to_first_step_s": r.fault_to_first_step, "load_s": r.load,
            "restart_overhead_s": r.overhead,
        })),
        "goodput": good.iter().map(|g| json!({
            "system": g.system, "size_bytes": g.size, "stall_s": g.costs.stall, "persist_s": g.costs.persist,
            "restore_s": g.costs.restore, "restore_storage_s": g.restore_storage, "restart_s": g.restart,
            "interval_s": g.out.interval_s, "effective": g.out.effective,
        })).collect::<Vec<_>>(),
    });
    let path = cfg.out.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).context("encode results")? + "\n")
        .with_context(|| format!("write {}", path.display()))?;

    let md = markdown(cfg, recs, &runs, &good, skipped, facts, mtbf);
    let md_path = cfg.out.join("results.md");
    std::fs::write(&md_path, &md).with_context(|| format!("write {}", md_path.display()))?;
    writeln!(out, "\n{md}")?;
    match plots(&cfg.out, recs, &good) {
        Ok(made) => writeln!(out, "wrote {}, {} and {}", path.display(), md_path.display(), made.join(", "))?,
        Err(e) => writeln!(out, "wrote {} and {}; no plots: {e:#}", path.display(), md_path.display())?,
    }
    Ok(())
}

fn sizes_text(sizes: &[u64]) -> String {
    sizes.iter().map(|&s| human(s)).collect::<Vec<_>>().join(", ")
}

/// CPU, RAM, file system and load: figures without them cannot be compared.
fn machine_facts(dir: &Path, mount: Option<&machine::Mount>) -> Value {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let cpu = machine::cpu_model().unwrap_or_else(|| "unknown CPU".into());
    let mem = machine::meminfo("MemTotal");
    let fs = mount.map_or_else(|| "unknown fs".to_string(), |m| format!("{} on {}", m.fs_type, m.source));
    let summary = format!(
        "{} cores ({cpu}), {} RAM, dir on {fs}, load average {}",
        machine::cores(),
        mem.map_or_else(|| "unknown".into(), human),
        load.join(" ")
    );
    json!({
        "cores": machine::cores(), "cpu": cpu, "mem_total": mem, "dir": dir.display().to_string(),
        "fs_type": mount.map(|m| m.fs_type.clone()), "fs_source": mount.map(|m| m.source.clone()),
        "loadavg_start": load, "summary": summary,
    })
}

/// The machine's own speed on `size` bytes in `dir`, as records of system `limit`.
fn limits(dir: &Path, size: u64, reps: usize) -> Result<Vec<Rec>, Failure> {
    let n = usize::try_from(size).map_err(|_| Failure::Config(format!("{size} bytes do not fit in memory here")))?;
    let need = size.saturating_mul(2).saturating_add(256 << 20);
    if machine::meminfo("MemAvailable").is_some_and(|a| a < need) {
        return Err(Failure::Config(format!("{} needs {} of free memory for the limits", human(size), human(need))));
    }
    let data = noise(n);
    let mut dst = vec![0u8; n];
    prefault(&mut dst);
    let cores = machine::cores();
    let work =
        tempfile::Builder::new().prefix("ckptd-compare-").tempdir_in(dir).context("create the work directory")?;
    let plain = work.path().join("plain.bin");
    let mut s: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for _ in 0..reps {
        s.entry("memcpy_1thread").or_default().push(timed(|| dst.copy_from_slice(&data)).as_secs_f64());
        std::hint::black_box(&mut dst);
        s.entry("memcpy_all_threads").or_default().push(timed(|| parallel_copy(&data, &mut dst, cores)).as_secs_f64());
        std::hint::black_box(&mut dst);
        s.entry("write_fsync").or_default().push(timed_io(|| write_file(&plain, &data))?.as_secs_f64());
        s.entry("read_warm").or_default().push(timed_io(|| read_file(&plain, &mut dst))?.as_secs_f64());
        evict(&plain)?;
        s.entry("read_cold").or_default().push(timed_io(|| read_file(&plain, &mut dst))?.as_secs_f64());
        std::fs::remove_file(&plain).with_context(|| format!("remove {}", plain.display()))?;
    }
    Ok(s.into_iter()
        .map(|(metric, xs)| {
            let (median, min, max) = spread(&xs);
            Rec { system: "limit".into(), size, metric: metric.into(), median, min, max, rss: None, ranks: None }
        })
        .collect())
}

/// Whether `--systems` selects `system` (everything when it is not given).
fn selected(cfg: &Config, system: &str) -> bool {
    cfg.systems.as_deref().is_none_or(|list| list.split(',').any(|s| s.trim() == system))
}

/// ckptd through its Rust client at every size, then the training-step stall of every variant;
/// a system that cannot run is skipped with its reason.
fn rust_systems(
    cfg: &Config,
    dir: &Path,
    bin_dir: &Path,
    recs: &mut Vec<Rec>,
    skipped: &mut BTreeMap<String, String>,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    for system in client::SYSTEMS {
        if !selected(cfg, system) {
            continue;
        }
        for &size in &cfg.sizes {
            writeln!(out, "  {} at {} ...", label(system), human(size))?;
            out.flush()?;
            match client::measure(system, size, cfg.reps, dir, bin_dir) {
                Ok(r) => {
                    client::summary(out, &r)?;
                    recs.extend(r.iter().filter_map(Rec::from_json));
                }
                Err(e) => {
                    writeln!(out, "    skipped: {e}")?;
                    skipped.insert(system.into(), e);
                    break;
                }
            }
        }
    }
    if !selected(cfg, STEP_STALL) {
        return Ok(());
    }
    for &size in &cfg.sizes {
        for (priority, io) in client::stall::VARIANTS {
            writeln!(out, "  training-step stall at {}, persist priority {priority}, {io} writes ...", human(size))?;
            out.flush()?;
            match client::stall::measure(size, cfg.reps, dir, priority, io) {
                Ok(r) => {
                    client::summary(out, &r)?;
                    recs.extend(r.iter().filter_map(Rec::from_json));
                }
                Err(e) => {
                    writeln!(out, "    skipped: {e}")?;
                    skipped.insert(client::stall::system(priority, io), e);
                }
            }
        }
    }
    Ok(())
}

/// `--systems` name of the training-step stall measurement.
const STEP_STALL: &str = "step-stall";

/// `(torch version, CUDA available)` of `--python`, or why it cannot run the Python systems.
fn probe_python(python: &Path) -> Result<(String, bool), String> {
    let out = Command::new(python)
        .args(["-c", "import torch, ckptd; print(torch.__version__, torch.cuda.is_available())"])
        .output()
        .map_err(|e| format!("cannot run {}: {e} (give --python PATH)", python.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("failed");
        return Err(format!("{} cannot import torch and ckptd: {last}", python.display()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut w = text.split_whitespace();
    let version = w.next().unwrap_or("?").to_string();
    Ok((version, w.next() == Some("True")))
}

/// Installs the peers `python` cannot import; a failure is reported and the peer skipped later.
fn install_peers(python: &Path, out: &mut dyn Write) -> Result<(), Failure> {
    for (module, package) in [("safetensors", "safetensors")] {
        let present =
            Command::new(python).args(["-c", &format!("import {module}")]).output().is_ok_and(|o| o.status.success());
        if present {
            continue;
        }
        writeln!(out, "  installing {package} into {} ...", python.display())?;
        let ok = Command::new(python).args(["-m", "pip", "install", "-q", package]).status().is_ok_and(|s| s.success());
        if !ok {
            writeln!(out, "  could not install {package}: it will be skipped")?;
        }
    }
    Ok(())
}

type PyOut = (Vec<Rec>, Value, BTreeMap<String, String>);

/// Where the `ckptd` and `ckptctl` binaries are (the sidecar system and the drill start them):
/// `$CKPTD_BIN_DIR`, else this executable's directory when `ckptd` was built next to it, else the
/// workspace's `target/debug` (the drill's own default).
fn ckptd_bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CKPTD_BIN_DIR") {
        return PathBuf::from(d);
    }
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .filter(|d| d.join("ckptd").exists())
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"))
}

/// Runs `benches/python/compare.py` and reads its records back.
fn python_systems(cfg: &Config, dir: &Path, bin_dir: &Path) -> Result<PyOut, Failure> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/compare.py");
    let json_path = cfg.out.join("python.json");
    let sizes: Vec<String> = cfg.sizes.iter().map(u64::to_string).collect();
    let ranks: Vec<String> = cfg.ranks.iter().map(usize::to_string).collect();
    let mut cmd = Command::new(&cfg.python);
    cmd.arg(&script)
        .args(["--sizes", &sizes.join(","), "--reps", &cfg.reps.to_string(), "--device", &cfg.device])
        .args(["--ranks", &ranks.join(","), "--shard", &cfg.shard.to_string()])
        .arg("--dir")
        .arg(dir)
        .arg("--json")
        .arg(&json_path);
    if let Some(s) = &cfg.systems {
        let python: Vec<&str> =
            s.split(',').map(str::trim).filter(|n| !client::SYSTEMS.contains(n) && *n != STEP_STALL).collect();
        cmd.args(["--systems", &python.join(",")]);
    }
    if let Some(url) = &cfg.scaling_s3 {
        cmd.args(["--scaling-s3", url]);
    }
    // The sidecar child starts `ckptd agent` from there.
    cmd.env("CKPTD_BIN_DIR", bin_dir);
    let status = cmd.status().with_context(|| format!("run {}", cfg.python.display()))?;
    if !status.success() {
        return Err(Failure::Run(anyhow::anyhow!("{} failed ({status})", script.display())));
    }
    let text = std::fs::read_to_string(&json_path).with_context(|| format!("read {}", json_path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("parse {}", json_path.display()))?;
    let recs = v["records"].as_array().map(|a| a.iter().filter_map(Rec::from_json).collect()).unwrap_or_default();
    let skipped = v["skipped"]
        .as_object()
        .map(|o| o.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
        .unwrap_or_default();
    let _ = std::fs::remove_file(&json_path);
    Ok((recs, v["machine"].clone(), skipped))
}

/// The requested size a record belongs to: Python's state is within a few percent of it.
fn bucket(sizes: &[u64], size: u64) -> u64 {
    let d = |s: u64| ((s as f64).ln() - (size as f64).ln()).abs();
    sizes.iter().copied().min_by(|a, b| d(*a).total_cmp(&d(*b))).unwrap_or(size)
}

fn find<'a>(recs: &'a [Rec], sizes: &[u64], system: &str, size: u64, metric: &str) -> Option<&'a Rec> {
    recs.iter().find(|r| r.system == system && r.ranks.is_none() && r.metric == metric && bucket(sizes, r.size) == size)
}

struct GoodRow {
    system: String,
    size: u64,
    costs: Costs,
    /// The system's own measured restore from storage, part of `costs.restore`.
    restore_storage: f64,
    /// The drill's restart time, the rest of `costs.restore` (`None` without a drill).
    restart: Option<f64>,
    out: goodput::Goodput,
}

/// Goodput for every system with a stall, a persist and a restore time at a size. Synchronous
/// systems (torch.save, safetensors) stall until durable. A failure costs the system's restore
/// from storage, plus, when the drill ran, its measured restart time (detection, the workers'
/// exit and restart, the rendezvous): measured with ckptd, and charged to every system alike.
fn goodput_rows(recs: &[Rec], sizes: &[u64], mtbf: f64, recovery: Option<&Recovery>) -> Vec<GoodRow> {
    let restart = recovery.map(|r| r.overhead);
    let mut rows = Vec::new();
    for &size in sizes {
        for (sys, _) in SYSTEMS {
            let m = |metric| find(recs, sizes, sys, size, metric).map(|r| r.median);
            let (Some(stall), Some(persist), Some(restore_storage)) =
                (m("save_stall"), m("durable"), m("restore_storage"))
            else {
                continue;
            };
            let costs = Costs { stall, persist, restore: restore_storage + restart.unwrap_or(0.0) };
            rows.push(GoodRow {
                system: sys.into(),
                size,
                costs,
                restore_storage,
                restart,
                out: goodput::model(costs, mtbf),
            });
        }
    }
    rows
}

fn secs(s: f64) -> String {
    if s < 0.0 {
        // A difference of times (the step stall) can come out negative in noise.
        return format!("−{}", secs(-s));
    }
    if s < 1e-3 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

fn fmt2(s: f64) -> String {
    format!("{s:.2}")
}

fn cell(r: Option<&Rec>) -> String {
    r.map_or_else(|| "–".into(), |r| format!("{} ({}–{})", secs(r.median), secs(r.min), secs(r.max)))
}

fn gbps(bytes: u64, s: f64) -> f64 {
    if s > 0.0 { bytes as f64 / s / 1e9 } else { 0.0 }
}

fn label(sys: &str) -> &str {
    SYSTEMS.iter().find(|(k, _)| *k == sys).map_or(sys, |(_, l)| l)
}

fn markdown(
    cfg: &Config,
    recs: &[Rec],
    runs: &[drill::Run],
    good: &[GoodRow],
    skipped: &BTreeMap<String, String>,
    facts: &Value,
    mtbf: f64,
) -> String {
    let mut s = String::new();
    let mut line = |t: String| {
        s.push_str(&t);
        s.push('\n');
    };
    let sizes = &cfg.sizes;
    line(format!(
        "Machine: {}. Median (min–max) of {} repetitions.",
        facts["summary"].as_str().unwrap_or(""),
        cfg.reps
    ));
    line(String::new());
    line("| size | system | save stall | until durable | durable GB/s | restore, memory tier | restore, storage (cold) | peak RSS over state |".into());
    line("|---|---|---|---|---|---|---|---|".into());
    for &size in sizes {
        for (sys, lab) in SYSTEMS {
            if sys == "limit" {
                continue;
            }
            let g = |m| find(recs, sizes, sys, size, m);
            let stall = g("save_stall");
            if stall.is_none() {
                continue;
            }
            let bytes = stall.map_or(size, |r| r.size);
            let durable = g("durable");
            let tput = durable.map_or_else(|| "–".into(), |d| format!("{:.2}", gbps(bytes, d.median)));
            let rss = stall.and_then(|r| r.rss).map_or_else(|| "–".into(), human);
            line(format!(
                "| {} | {lab} | {} | {} | {tput} | {} | {} | {rss} |",
                human(bytes),
                cell(stall),
                cell(durable),
                cell(g("restore_memory")),
                cell(g("restore_storage"))
            ));
        }
    }
    step_stall_table(&mut line, recs, sizes);
    line(String::new());
    line("Limits in the same directory (GB/s, median (min–max)):".into());
    line(String::new());
    line("| size | memcpy 1 thread | memcpy all threads | write+fsync | read, warm | read, cold |".into());
    line("|---|---|---|---|---|---|".into());
    for &size in sizes {
        let c = |m| {
            find(recs, sizes, "limit", size, m).map_or_else(
                || "–".to_string(),
                |r| format!("{:.2} ({:.2}–{:.2})", gbps(size, r.median), gbps(size, r.max), gbps(size, r.min)),
            )
        };
        line(format!(
            "| {} | {} | {} | {} | {} | {} |",
            human(size),
            c("memcpy_1thread"),
            c("memcpy_all_threads"),
            c("write_fsync"),
            c("read_warm"),
            c("read_cold")
        ));
    }
    line(String::new());
    line("Ratios of medians, same run (ckptd through Python where it ran, else through its Rust client):".into());
    line(String::new());
    line("| size | ckptd stall / torch.save stall | / DCP async_save stall | / DCP cached stall | / safetensors stall | ckptd durable GB/s / write+fsync GB/s | ckptd cold restore GB/s / cold read GB/s | sidecar stall / embedded stall |".into());
    line("|---|---|---|---|---|---|---|---|".into());
    for &size in sizes {
        let med = |sys, m| find(recs, sizes, sys, size, m).map(|r| (r.median, r.size));
        let ratio = |a: Option<(f64, u64)>, b: Option<(f64, u64)>| match (a, b) {
            (Some(a), Some(b)) if b.0 > 0.0 => format!("{:.3}", a.0 / b.0),
            _ => "–".into(),
        };
        // ckptd through Python when it ran (what a torch user gets), else its Rust client.
        let ckptd = if med("ckptd", "save_stall").is_some() { "ckptd" } else { "ckptd-rust" };
        let sidecar = if ckptd == "ckptd" { "ckptd-sidecar" } else { "ckptd-sidecar-rust" };
        let stall = med(ckptd, "save_stall");
        let bw = |a: Option<(f64, u64)>, b: Option<(f64, u64)>| match (a, b) {
            (Some(a), Some(b)) if a.0 > 0.0 && b.0 > 0.0 => format!("{:.2}", gbps(a.1, a.0) / gbps(size, b.0)),
            _ => "–".into(),
        };
        line(format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            human(size),
            ratio(stall, med("torch.save", "save_stall")),
            ratio(stall, med("dcp", "save_stall")),
            ratio(stall, med("dcp-cached", "save_stall")),
            ratio(stall, med("safetensors", "save_stall")),
            bw(med(ckptd, "durable"), med("limit", "write_fsync")),
            bw(med(ckptd, "restore_storage"), med("limit", "read_cold")),
            ratio(med(sidecar, "save_stall"), stall),
        ));
    }
    goals_table(&mut line, recs, sizes);
    for (system, store) in SCALING {
        let scaling: Vec<&Rec> = recs.iter().filter(|r| r.ranks.is_some() && r.system == system).collect();
        if scaling.is_empty() {
            continue;
        }
        line(String::new());
        line(format!(
            "Scaling: N ranks (one process each) saving {} each to one {store} store, ckptd embedded. Commit: the last \
             rank to learn of the commit minus the last shard durable, from each rank's `SaveHandle.timings()`:",
            human(cfg.shard)
        ));
        line(String::new());
        line("| ranks | total | until every rank's wait() returns | aggregate GB/s | commit after the last shard | MANIFEST written after the last shard | slowest rank's save stall |".into());
        line("|---|---|---|---|---|---|---|".into());
        for &n in &cfg.ranks {
            let g = |m: &str| scaling.iter().find(|r| r.ranks == Some(n as u64) && r.metric == m).copied();
            let Some(all) = g("all_durable") else { continue };
            line(format!(
                "| {n} | {} | {} | {:.2} | {} | {} | {} |",
                human(all.size),
                cell(Some(all)),
                gbps(all.size, all.median),
                cell(g("commit_after_last_shard")),
                cell(g("manifest_after_last_shard")),
                cell(g("save_stall_max_rank"))
            ));
        }
    }
    if !runs.is_empty() {
        line(String::new());
        line(drill::markdown(runs).trim_end().to_string());
    }
    line(String::new());
    let f = cfg.fault;
    let recovery = Recovery::of(runs);
    line(format!(
        "Goodput model: {} interruptions in {} days on {} GPUs = {:.3e} per GPU-hour; a job of {} GPUs fails every {:.2} h (MTBF). \
         Interval: Daly's optimum for the stall, at least the persist time; effective = interval/(interval+stall) × \
         (1 − ((interval+stall)/2 + persist + restore)/MTBF). Each GPU is assumed to hold one state of the size shown, all saved in parallel.",
        f.interruptions,
        f.days,
        f.fleet_gpus,
        f.per_gpu_per_s() * 3600.0,
        f.job_gpus,
        mtbf / 3600.0
    ));
    line(String::new());
    match &recovery {
        Some(r) => line(format!(
            "Restore = restart + the system's restore from storage. Restart = {} s, measured by the recovery drill for ckptd only \
             (scenario `{}`, the slowest: fault → first step {:.2} s minus its slowest rank's load {:.2} s; detection, the order, \
             the workers' exit and restart, torch's start-up and the rendezvous) and charged to every system alike: the other systems \
             have no automatic detection or restart of their own, and their recovery time was not measured.",
            fmt2(r.overhead),
            r.scenario,
            r.fault_to_first_step,
            r.load
        )),
        None => line(
            "Restore = the system's restore from storage only: detection, restart and rescheduling are left out \
             (run with `--drill` to measure them)."
                .into(),
        ),
    }
    line(String::new());
    line("| size | system | stall | persist | restore from storage | restart (drill) | restore | best interval | effective training time |".into());
    line("|---|---|---|---|---|---|---|---|---|".into());
    for g in good {
        line(format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.4} |",
            human(g.size),
            label(&g.system),
            secs(g.costs.stall),
            secs(g.costs.persist),
            secs(g.restore_storage),
            g.restart.map_or_else(|| "–".into(), secs),
            secs(g.costs.restore),
            secs(g.out.interval_s),
            g.out.effective
        ));
    }
    let measured: Vec<&str> = SYSTEMS
        .iter()
        .filter(|(sys, _)| recs.iter().any(|r| r.system == *sys && r.ranks.is_none()))
        .map(|(_, lab)| *lab)
        .collect();
    line(String::new());
    line(format!("Measured: {}.", if measured.is_empty() { "nothing".to_string() } else { measured.join(", ") }));
    if !skipped.is_empty() {
        line(String::new());
        for (k, v) in skipped {
            line(format!("Not measured: {k}: {v}."));
        }
    }
    s
}

/// The training-step stall's table: for each size and variant, what the steps overlapping a save
/// paid, in ms and as a share of one memcpy of the state (the same process's).
/// Issue 16's goals for one size, each a ratio from this run: ckptd embedded (through its Rust
/// client, and through Python where it ran) against the limits measured in the same directory.
fn goals_table(line: &mut dyn FnMut(String), recs: &[Rec], sizes: &[u64]) {
    let mut rows = Vec::new();
    for &size in sizes {
        for (sys, lab) in [("ckptd-rust", "Rust client"), ("ckptd", "Python")] {
            let g = |m| find(recs, sizes, sys, size, m);
            let lim = |m| find(recs, sizes, "limit", size, m);
            let Some(stall) = g("save_stall") else { continue };
            let state = stall.size as f64;
            let bw = |a: Option<&Rec>, b: Option<&Rec>| match (a, b) {
                (Some(a), Some(b)) if a.median > 0.0 && b.median > 0.0 => {
                    format!("{:.2}", gbps(a.size, a.median) / gbps(size, b.median))
                }
                _ => "–".into(),
            };
            let memory = |r: Option<&Rec>| {
                r.and_then(|r| r.rss).map_or_else(|| "–".into(), |b| format!("{:.2}×", b as f64 / state))
            };
            let first = |m| match (g(m), g("durable")) {
                (Some(f), Some(d)) if d.median > 0.0 => format!("{:.2}", f.median / d.median),
                _ => "–".into(),
            };
            rows.push(format!(
                "| {} | {lab} | {} | {} | {} | {} | {} | {} |",
                human(stall.size),
                bw(g("restore_storage"), lim("read_cold")),
                bw(g("durable"), lim("write_fsync")),
                memory(Some(stall)),
                memory(g("restore_storage")),
                first("first_durable"),
                first("first_durable_hint"),
            ));
        }
    }
    if rows.is_empty() {
        return;
    }
    line(String::new());
    line(
        "Goals (issue 16), ckptd embedded, ratios of medians in this run. Restore: a new checkpointer's load from \
         storage with the files out of the page cache, GB/s over a cold read's. Persist: GB/s until durable over a \
         buffered write+fsync's. Host memory beyond the state (peak RSS over the state, as a multiple of it) while \
         saving and while restoring from storage. First save: time to durable of the first save over the median \
         steady one, without and with `size_hint` (the arena prepared before the save). Goals: restore ≥ 0.9, \
         persist ≥ 0.9, memory ≤ 1.1×, first save ≤ 1.2."
            .into(),
    );
    line(String::new());
    line("| size | through | restore / cold read | persist / write+fsync | memory, save | memory, restore | first save / steady | first save / steady, size_hint |".into());
    line("|---|---|---|---|---|---|---|---|".into());
    for r in rows {
        line(r);
    }
}

fn step_stall_table(line: &mut dyn FnMut(String), recs: &[Rec], sizes: &[u64]) {
    let rows: Vec<(u64, Priority, FileIo, &Rec)> = sizes
        .iter()
        .flat_map(|&size| {
            client::stall::VARIANTS.iter().filter_map(move |&(p, io)| {
                find(recs, sizes, &client::stall::system(p, io), size, "slowdown").map(|r| (size, p, io, r))
            })
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    line(String::new());
    line(
        "Training-step stall while a save persists (ckptd embedded, Rust client): a CPU-bound step on one thread, \
         timed while a save is in flight and for as many steps right after it; per save, the save() call plus the \
         overlapping steps' time less that of the steps after it. Share of copy = that over one memcpy of the state in the same process. \
         Goal: ≤ 25% of one copy."
            .into(),
    );
    line(String::new());
    line("| size | persist priority | file writes | step, no save | stall per save | share of one copy | steps overlapped | save in flight |".into());
    line("|---|---|---|---|---|---|---|---|".into());
    for (size, p, io, r) in rows {
        let sys = client::stall::system(p, io);
        let g = |m| find(recs, sizes, &sys, size, m);
        let share = g("memcpy").filter(|c| c.median > 0.0).map_or_else(
            || "–".into(),
            |c| {
                format!(
                    "{:.0}% ({:.0}–{:.0}%)",
                    100.0 * r.median / c.median,
                    100.0 * r.min / c.median,
                    100.0 * r.max / c.median
                )
            },
        );
        line(format!(
            "| {} | {p} | {io} | {} | {} | {share} | {} | {} |",
            human(r.size),
            g("step").map_or_else(|| "–".into(), |s| secs(s.median)),
            cell(Some(r)),
            g("steps_overlapped").map_or_else(|| "–".into(), |s| format!("{:.0}", s.median)),
            cell(g("window")),
        ));
    }
}

/// Draws the PNGs; returns their names.
fn plots(out: &Path, recs: &[Rec], good: &[GoodRow]) -> anyhow::Result<Vec<String>> {
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    // `y` maps a run's seconds to the plotted value; each point is the median's, its bar the
    // fastest and slowest run's.
    let by_system = |metric: &str, suffix: &str, y: &dyn Fn(&Rec, f64) -> f64| -> Vec<Series> {
        SYSTEMS
            .iter()
            .filter_map(|(sys, lab)| {
                let runs: Vec<&Rec> =
                    recs.iter().filter(|r| r.system == *sys && r.metric == metric && r.ranks.is_none()).collect();
                (!runs.is_empty()).then(|| with_spread(format!("{lab}{suffix}"), &runs, &|r| mib(r.size), y))
            })
            .collect()
    };
    let mut made = Vec::new();
    let mut stall = by_system("save_stall", "", &|_, s| s);
    stall.extend(limit_series(recs, "memcpy_1thread", "memcpy 1 thread (limit)", &|_, s| s));
    plot::lines(
        &out.join("stall.png"),
        "Time in the save() call (the copy may still run after it returns)",
        "state size (MiB)",
        "seconds",
        &stall,
        YAxis::Log,
    )?;
    made.push("stall.png".to_string());
    let mut tput = by_system("durable", "", &|r, s| gbps(r.size, s));
    tput.extend(limit_series(recs, "write_fsync", "write+fsync (limit)", &|r, s| gbps(r.size, s)));
    plot::lines(
        &out.join("throughput.png"),
        "Save throughput until durable",
        "state size (MiB)",
        "GB/s",
        &tput,
        YAxis::Linear,
    )?;
    made.push("throughput.png".to_string());
    let step_stall: Vec<Series> = client::stall::VARIANTS
        .iter()
        .filter_map(|&(p, io)| {
            let sys = client::stall::system(p, io);
            let runs: Vec<&Rec> =
                recs.iter().filter(|r| r.system == sys && r.metric == "slowdown" && r.ranks.is_none()).collect();
            let copy = |r: &Rec| {
                recs.iter().find(|c| c.system == sys && c.metric == "memcpy" && c.size == r.size).map(|c| c.median)
            };
            let runs: Vec<&Rec> = runs.into_iter().filter(|r| copy(r).is_some_and(|c| c > 0.0)).collect();
            let share = |r: &Rec, s: f64| 100.0 * s / copy(r).unwrap_or(f64::INFINITY);
            (!runs.is_empty())
                .then(|| with_spread(format!("priority {p}, {io} writes"), &runs, &|r| mib(r.size), &share))
        })
        .collect();
    if !step_stall.is_empty() {
        let mut s = step_stall;
        let xs: Vec<f64> = s.iter().flat_map(|l| l.points.iter().map(|p| p.0)).collect();
        let (lo, hi) = xs.iter().fold((f64::INFINITY, 0.0f64), |(a, b), &x| (a.min(x), b.max(x)));
        s.push(Series::new("goal: 25% of one copy", vec![(lo, 25.0), (hi, 25.0)]));
        plot::lines(
            &out.join("step_stall.png"),
            "Training-step time lost per save while it persists (CPU-bound step, one thread)",
            "state size (MiB)",
            "% of one memcpy of the state",
            &s,
            YAxis::Linear,
        )?;
        made.push("step_stall.png".to_string());
    }
    let mut rest = by_system("restore_storage", ", storage", &|r, s| gbps(r.size, s));
    rest.extend(by_system("restore_memory", ", memory tier", &|r, s| gbps(r.size, s)));
    rest.extend(limit_series(recs, "read_cold", "cold read (limit)", &|r, s| gbps(r.size, s)));
    plot::lines(
        &out.join("restore.png"),
        "Restore: from storage (page cache dropped) and from the memory tier",
        "state size (MiB)",
        "GB/s",
        &rest,
        YAxis::Linear,
    )?;
    made.push("restore.png".to_string());
    let ranks = |r: &Rec| r.ranks.unwrap_or(1) as f64;
    let s: Vec<Series> = SCALING
        .iter()
        .filter_map(|(system, store)| {
            let scale: Vec<&Rec> =
                recs.iter().filter(|r| r.metric == "all_durable" && r.ranks.is_some() && r.system == *system).collect();
            let name = format!("ckptd on {store}, aggregate until committed");
            (!scale.is_empty()).then(|| with_spread(name, &scale, &ranks, &|r, s| gbps(r.size, s)))
        })
        .collect();
    if !s.is_empty() {
        plot::lines(&out.join("scaling.png"), "Ranks on one host, one store", "ranks", "GB/s", &s, YAxis::Linear)?;
        made.push("scaling.png".to_string());
    }
    let g: Vec<Series> = SYSTEMS
        .iter()
        .filter_map(|(sys, lab)| {
            // A model's fraction of time training: above 1.0 it would claim the impossible.
            let points: Vec<(f64, f64)> =
                good.iter().filter(|g| g.system == *sys).map(|g| (mib(g.size), g.out.effective.min(1.0))).collect();
            (!points.is_empty()).then(|| Series::new(*lab, points))
        })
        .collect();
    if !g.is_empty() {
        plot::lines(
            &out.join("goodput.png"),
            "Effective training time (goodput model)",
            "state size (MiB)",
            "fraction",
            &g,
            YAxis::Linear,
        )?;
        made.push("goodput.png".to_string());
    }
    Ok(made)
}

fn limit_series(recs: &[Rec], metric: &str, name: &str, y: &dyn Fn(&Rec, f64) -> f64) -> Option<Series> {
    let runs: Vec<&Rec> = recs.iter().filter(|r| r.system == "limit" && r.metric == metric).collect();
    (!runs.is_empty()).then(|| with_spread(name.into(), &runs, &|r| r.size as f64 / f64::from(1u32 << 20), y))
}

/// A line through `runs`' medians, each with the bar from its fastest to its slowest run (`y`
/// maps a run's seconds to the plotted value, which may turn the order round: GB/s).
fn with_spread(name: String, runs: &[&Rec], x: &dyn Fn(&Rec) -> f64, y: &dyn Fn(&Rec, f64) -> f64) -> Series {
    let points = runs.iter().map(|r| (x(r), y(r, r.median))).collect();
    let spread = runs
        .iter()
        .map(|r| {
            let (a, b) = (y(r, r.min), y(r, r.max));
            (a.min(b), a.max(b))
        })
        .collect();
    Series { name, points, spread }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(system: &str, size: u64, metric: &str, median: f64) -> Rec {
        Rec {
            system: system.into(),
            size,
            metric: metric.into(),
            median,
            min: median,
            max: median,
            rss: None,
            ranks: None,
        }
    }

    #[test]
    fn records_round_trip_and_bucket_to_the_requested_size() {
        let r = Rec { rss: Some(7), ..rec("ckptd", 270_000_000, "save_stall", 0.5) };
        let back = Rec::from_json(&r.to_json()).unwrap();
        assert_eq!((back.system.as_str(), back.size, back.rss), ("ckptd", 270_000_000, Some(7)));
        assert_eq!(bucket(&[64 << 20, 256 << 20, 1 << 30], 270_000_000), 256 << 20);
    }

    #[test]
    fn goodput_needs_all_three_costs() {
        let sizes = [1u64 << 20];
        let mut recs = vec![
            rec("ckptd", 1 << 20, "save_stall", 0.01),
            rec("ckptd", 1 << 20, "durable", 0.5),
            rec("torch.save", 1 << 20, "save_stall", 0.5),
            rec("torch.save", 1 << 20, "durable", 0.5),
        ];
        assert!(goodput_rows(&recs, &sizes, 10_000.0, None).is_empty());
        recs.push(rec("ckptd", 1 << 20, "restore_storage", 0.2));
        recs.push(rec("torch.save", 1 << 20, "restore_storage", 0.2));
        let rows = goodput_rows(&recs, &sizes, 10_000.0, None);
        assert_eq!(rows.len(), 2);
        assert!(rows[0].out.effective > rows[1].out.effective, "ckptd stalls less");
        assert_eq!((rows[0].costs.restore, rows[0].restart), (0.2, None), "without a drill, the load alone");
    }

    #[test]
    fn goodput_charges_the_drills_measured_restart_to_every_system() {
        let sizes = [1u64 << 20];
        let recs = vec![
            rec("ckptd", 1 << 20, "save_stall", 0.01),
            rec("ckptd", 1 << 20, "durable", 0.5),
            rec("ckptd", 1 << 20, "restore_storage", 0.25),
            rec("torch.save", 1 << 20, "save_stall", 0.5),
            rec("torch.save", 1 << 20, "durable", 0.5),
            rec("torch.save", 1 << 20, "restore_storage", 0.5),
        ];
        let runs = drill::parse(&serde_json::from_str(include_str!("../fixtures/drill.json")).unwrap()).unwrap();
        let recovery = Recovery::of(&runs).unwrap();
        let slowest = runs.iter().map(drill::Run::restart_overhead).fold(0.0, f64::max);
        assert_eq!(recovery.overhead, slowest);
        let without = goodput_rows(&recs, &sizes, 10_000.0, None);
        let with = goodput_rows(&recs, &sizes, 10_000.0, Some(&recovery));
        for (w, o) in with.iter().zip(&without) {
            assert_eq!(w.restart, Some(slowest));
            assert_eq!(w.costs.restore, w.restore_storage + slowest, "{}", w.system);
            assert_eq!(w.restore_storage, o.costs.restore, "{}", w.system);
            assert!(w.out.effective < o.out.effective, "a restart costs goodput: {}", w.system);
        }
        let md = markdown(&cfg_for(&sizes), &recs, &runs, &with, &BTreeMap::new(), &json!({}), 10_000.0);
        assert!(md.contains("measured by the recovery drill for ckptd only"), "{md}");
        assert!(md.contains("| fault → first step |"), "{md}");
        let md = markdown(&cfg_for(&sizes), &recs, &[], &without, &BTreeMap::new(), &json!({}), 10_000.0);
        assert!(md.contains("restore from storage only"), "{md}");
    }

    #[test]
    fn the_scaling_tables_keep_each_store_apart() {
        let sizes = [1u64 << 20];
        let ranked =
            |system: &str, metric: &str, median: f64| Rec { ranks: Some(2), ..rec(system, 2 << 20, metric, median) };
        let recs = vec![
            ranked("ckptd-scaling", "all_durable", 0.5),
            ranked("ckptd-scaling", "commit_after_last_shard", 0.0042),
            ranked("ckptd-scaling-s3", "all_durable", 0.9),
            ranked("ckptd-scaling-s3", "commit_after_last_shard", 0.0375),
            ranked("ckptd-scaling-s3", "manifest_after_last_shard", 0.0251),
        ];
        let cfg = Config { ranks: vec![2], ..cfg_for(&sizes) };
        let md = markdown(&cfg, &recs, &[], &[], &BTreeMap::new(), &json!({}), 10_000.0);
        let file = md.find("one file:// store").expect("a file:// table");
        let s3 = md.find("one S3 store").expect("an S3 table");
        let row = |from: usize| md[from..].lines().find(|l| l.starts_with("| 2 |")).unwrap().to_string();
        assert!(row(file).contains(&cell(Some(&recs[1]))), "{md}");
        assert!(row(s3).contains(&cell(Some(&recs[3]))) && row(s3).contains(&cell(Some(&recs[4]))), "{md}");
        assert!(!row(file).contains(&cell(Some(&recs[3]))), "the S3 figure leaked into the file:// table: {md}");
    }

    #[test]
    fn without_python_the_rust_client_rows_fill_the_tables_and_the_skip_says_why() {
        let sizes = [1u64 << 30];
        let g = 1u64 << 30;
        let recs = vec![
            rec("ckptd-rust", g, "save_stall", 0.001),
            rec("ckptd-rust", g, "durable", 2.0),
            rec("ckptd-rust", g, "restore_storage", 1.0),
            rec("ckptd-rust", g, "restore_memory", 0.25),
            rec("limit", g, "write_fsync", 1.0),
            rec("limit", g, "read_cold", 0.5),
            rec("step-stall:nice:direct", g, "slowdown", 0.02),
            rec("step-stall:nice:direct", g, "memcpy", 0.1),
            rec("step-stall:nice:direct", g, "step", 0.01),
        ];
        let skipped = BTreeMap::from([("python".to_string(), "python3 cannot import torch and ckptd".to_string())]);
        let md = markdown(&cfg_for(&sizes), &recs, &[], &[], &skipped, &json!({}), 10_000.0);
        assert!(md.contains("| ckptd (embedded, Rust client) |"), "{md}");
        // durable 0.5× write+fsync, cold restore 0.5× the cold read: from the Rust rows.
        assert!(md.contains("| 1.00 GiB | – | – | – | – | 0.50 | 0.50 | – |"), "{md}");
        assert!(
            md.contains("| 1.00 GiB | nice | direct | 10.0 ms | 20.0 ms (20.0 ms–20.0 ms) | 20% (20–20%) |"),
            "{md}"
        );
        assert!(md.contains("Measured: ckptd (embedded, Rust client), Rust limits."), "{md}");
        assert!(md.contains("Not measured: python: python3 cannot import torch and ckptd."), "{md}");
    }

    #[test]
    fn the_goals_table_divides_by_the_limits_of_the_same_size() {
        let g = 1u64 << 30;
        let with_rss = |r: Rec, rss: u64| Rec { rss: Some(rss), ..r };
        let recs = vec![
            with_rss(rec("ckptd-rust", g, "save_stall", 0.001), g + g / 16),
            rec("ckptd-rust", g, "durable", 2.0),
            with_rss(rec("ckptd-rust", g, "restore_storage", 1.25), 0),
            rec("ckptd-rust", g, "first_durable", 3.0),
            rec("ckptd-rust", g, "first_durable_hint", 2.2),
            rec("limit", g, "write_fsync", 1.8),
            rec("limit", g, "read_cold", 1.0),
        ];
        let md = markdown(&cfg_for(&[g]), &recs, &[], &[], &BTreeMap::new(), &json!({}), 10_000.0);
        // restore 1/1.25 = 0.80 of a cold read, persist 1.8/2 = 0.90, memory 1.06× and 0.00×,
        // first saves 1.50 and 1.10 of the steady one; no Python row without Python records.
        assert!(md.contains("| 1.00 GiB | Rust client | 0.80 | 0.90 | 1.06× | 0.00× | 1.50 | 1.10 |"), "{md}");
        assert!(!md.contains("| Python |"), "{md}");
    }

    #[test]
    fn systems_filter_by_name() {
        let mut cfg = cfg_for(&[1]);
        assert!(selected(&cfg, "ckptd-rust"));
        cfg.systems = Some("dcp, step-stall".into());
        assert!(!selected(&cfg, "ckptd-rust"));
        assert!(selected(&cfg, STEP_STALL));
    }

    fn cfg_for(sizes: &[u64]) -> Config {
        Config {
            sizes: sizes.to_vec(),
            reps: 1,
            out: PathBuf::new(),
            dir: PathBuf::new(),
            python: PathBuf::new(),
            device: "cpu".into(),
            systems: None,
            ranks: Vec::new(),
            shard: 1 << 20,
            scaling_s3: None,
            fault: FaultRate::LLAMA3,
            install_peers: false,
            drill: false,
        }
    }
}
