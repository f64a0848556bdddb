//! The recovery drill as a `compare` scenario: `python-bindings/tests/drill.py` runs a real
//! torch.distributed job (two torchrun launchers, two ckptd agents, the isolator against kmock),
//! injects a fault, lets ckptd recover the job by itself and times every phase. This module runs
//! the drill, reads its results back, derives the figures the recovery-time table shows, and
//! hands the goodput model the measured restart time in place of an assumed one.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::Context;
use serde_json::Value;

/// The phases of a recovery in the order they happen, with their column labels. Each is the
/// time after the fault at which the slowest rank (or pod) was through it; `isolated` and
/// `replaced` exist only where the isolator replaces a node.
pub const PHASES: [(&str, &str); 9] = [
    ("detected", "detected"),
    ("ordered", "restart ordered"),
    ("isolated", "node isolated"),
    ("workers_exited", "workers exited"),
    ("replaced", "pod replaced"),
    ("restarted", "workers restarted"),
    ("rendezvous", "rendezvous"),
    ("restored", "restored"),
    ("first_step", "first step done"),
];

/// One scenario's result, as `drill.py` writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// `xid`, `hang` or `local`.
    pub scenario: String,
    /// The committed step every rank resumed from.
    pub resumed_step: u64,
    /// Per rank: restored from the memory tier (`true`) or from storage.
    pub memory: BTreeMap<u32, bool>,
    /// Per rank: seconds its restore (`load`) took.
    pub load_s: BTreeMap<u32, f64>,
    /// Phase (see [`PHASES`]) → seconds after the fault.
    pub since_fault: BTreeMap<String, f64>,
    /// Fault → the agent's `health fault` (every scenario has it).
    pub detected: f64,
    /// Fault → the slowest rank's first training step after its restore: the MTTR.
    pub first_step: f64,
}

impl Run {
    /// Reads one result; says which field is missing or malformed.
    pub fn from_json(v: &Value) -> Result<Run, String> {
        let field = |name: &str| v.get(name).ok_or_else(|| format!("no `{name}`"));
        let scenario = field("scenario")?.as_str().ok_or("`scenario` is not a string")?.to_string();
        let resumed_step = field("resumed_step")?.as_u64().ok_or("`resumed_step` is not a step number")?;
        let per_rank = |name: &str| -> Result<BTreeMap<u32, Value>, String> {
            let obj = field(name)?.as_object().ok_or_else(|| format!("`{name}` is not an object"))?;
            obj.iter()
                .map(|(k, x)| {
                    k.parse::<u32>().map(|r| (r, x.clone())).map_err(|_| format!("`{name}`: `{k}` is not a rank"))
                })
                .collect()
        };
        let memory = per_rank("memory")?
            .into_iter()
            .map(|(r, x)| x.as_bool().map(|b| (r, b)).ok_or_else(|| format!("`memory` of rank {r} is not a boolean")))
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        let load_s = per_rank("load_s")?
            .into_iter()
            .map(|(r, x)| seconds(&x).map(|s| (r, s)).ok_or_else(|| format!("`load_s` of rank {r} is not seconds")))
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        let since_fault = field("since_fault_s")?
            .as_object()
            .ok_or("`since_fault_s` is not an object")?
            .iter()
            .map(|(k, x)| {
                seconds(x).map(|s| (k.clone(), s)).ok_or_else(|| format!("`since_fault_s.{k}` is not seconds"))
            })
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        if memory.is_empty() || load_s.is_empty() {
            return Err("no ranks".into());
        }
        let required =
            |phase: &str| since_fault.get(phase).copied().ok_or_else(|| format!("no `since_fault_s.{phase}`"));
        let (detected, first_step) = (required("detected")?, required("first_step")?);
        Ok(Run { scenario, resumed_step, memory, load_s, since_fault, detected, first_step })
    }

    /// Seconds after the fault at which `phase` ended, when the scenario has it.
    pub fn phase(&self, phase: &str) -> Option<f64> {
        self.since_fault.get(phase).copied()
    }

    /// The slowest rank's restore: the job's restore ends when it does.
    pub fn slowest_load(&self) -> f64 {
        self.load_s.values().copied().fold(0.0, f64::max)
    }

    /// The part of the recovery that is ckptd's own work: detection (fault → the agent's
    /// `health fault`), the order (detected → the first `restore ordered`; zero where no order
    /// was logged) and the restore (the slowest rank's `load_s`). What lies between (the
    /// library ending the workers, the launcher starting new ones, torch's import and the
    /// rendezvous) belongs to the launcher and torch.
    pub fn ckptd_part(&self) -> f64 {
        let order = self.phase("ordered").map_or(0.0, |o| (o - self.detected).max(0.0));
        self.detected + order + self.slowest_load()
    }

    /// What a recovery costs apart from reading the state back: fault → first step minus the
    /// slowest rank's load. Detection, the order, the workers' exit, their restart and the
    /// rendezvous do not depend on the state's size; the load does, and the goodput model adds
    /// each system's own measured restore in its place.
    pub fn restart_overhead(&self) -> f64 {
        (self.first_step - self.slowest_load()).max(0.0)
    }

    /// `memory`, `storage`, or which ranks read which.
    pub fn source(&self) -> String {
        let ranks = |from_memory: bool| -> Vec<String> {
            self.memory.iter().filter(|(_, m)| **m == from_memory).map(|(r, _)| r.to_string()).collect()
        };
        let (mem, sto) = (ranks(true), ranks(false));
        match (mem.is_empty(), sto.is_empty()) {
            (false, true) => "memory".into(),
            (true, _) => "storage".into(),
            (false, false) => format!("memory (ranks {}), storage (ranks {})", mem.join(","), sto.join(",")),
        }
    }
}

fn seconds(v: &Value) -> Option<f64> {
    v.as_f64().filter(|s| s.is_finite() && *s >= 0.0)
}

/// Reads every result of a `drill.py` JSON list.
pub fn parse(v: &Value) -> Result<Vec<Run>, String> {
    let list = v.as_array().ok_or("the drill's results are not a list")?;
    list.iter().enumerate().map(|(i, x)| Run::from_json(x).map_err(|e| format!("drill result {i}: {e}"))).collect()
}

/// The restart time the goodput model charges each failure on top of the restore: the drill
/// with the largest [`Run::restart_overhead`], so that the model does not flatter.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovery {
    /// The scenario it was measured in.
    pub scenario: String,
    /// Its fault → first step.
    pub fault_to_first_step: f64,
    /// Its slowest rank's load.
    pub load: f64,
    /// `fault_to_first_step − load`.
    pub overhead: f64,
}

impl Recovery {
    /// The slowest of `runs`' restarts; `None` without runs.
    pub fn of(runs: &[Run]) -> Option<Recovery> {
        runs.iter().max_by(|a, b| a.restart_overhead().total_cmp(&b.restart_overhead())).map(|r| Recovery {
            scenario: r.scenario.clone(),
            fault_to_first_step: r.first_step,
            load: r.slowest_load(),
            overhead: r.restart_overhead(),
        })
    }
}

/// Runs `drill.py` under `python` with the `ckptd`/`ckptctl` binaries of `bin_dir`; returns its
/// JSON list, or why it did not produce one (its logs are then kept, and it names them on stderr).
pub fn run(python: &Path, bin_dir: &Path, json_path: &Path) -> anyhow::Result<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../python-bindings/tests/drill.py");
    let _ = std::fs::remove_file(json_path);
    // The drill prints its JSON on stdout as well; the file is what is read.
    let status = Command::new(python)
        .arg(&script)
        .arg("--json")
        .arg(json_path)
        .env("CKPTD_BIN_DIR", bin_dir)
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("run {}", python.display()))?;
    anyhow::ensure!(status.success(), "{} failed ({status})", script.display());
    let text = std::fs::read_to_string(json_path).with_context(|| format!("read {}", json_path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("parse {}", json_path.display()))?;
    parse(&v).map_err(|e| anyhow::anyhow!("{}: {e}", json_path.display()))?;
    let _ = std::fs::remove_file(json_path);
    Ok(v)
}

/// The recovery-time table, in markdown, one row per scenario.
pub fn markdown(runs: &[Run]) -> String {
    let mut s = String::new();
    let mut line = |t: String| {
        s.push_str(&t);
        s.push('\n');
    };
    line("Recovery drill (`python-bindings/tests/drill.py`): a torch.distributed job (2 torchrun launchers × 2 gloo workers, \
          DDP + AdamW on CPU) under 2 ckptd agents; `xid`: an injected XID 79, the isolator (against kmock) cordons the node and \
          the pod is replaced; `hang`: one worker SIGSTOPped; `local`: an XID with no isolator. Seconds after the fault at which \
          the slowest rank (or pod) was through each phase:"
        .into());
    line(String::new());
    let mut head = "| scenario | restored from |".to_string();
    let mut rule = "|---|---|".to_string();
    for (_, label) in PHASES {
        head.push_str(&format!(" {label} |"));
        rule.push_str("---|");
    }
    line(format!("{head} slowest load | ckptd part | fault → first step |"));
    line(format!("{rule}---|---|---|"));
    for r in runs {
        let mut row = format!("| {} | {} |", r.scenario, r.source());
        for (key, _) in PHASES {
            row.push_str(&r.phase(key).map_or_else(|| " – |".into(), |x| format!(" {x:.2} |")));
        }
        line(format!("{row} {:.2} | {:.2} | {:.2} |", r.slowest_load(), r.ckptd_part(), r.first_step));
    }
    line(String::new());
    line("ckptd part = detected (fault → the agent's `health fault`) + (restart ordered − detected) + the slowest rank's load \
          (`load_s`); fault → first step is the MTTR, torch's start-up and the rendezvous included. drill.py fails a scenario \
          unless every rank resumed from one committed step and the job's final weights and optimizer state are bitwise equal \
          to an uninterrupted run's."
        .into());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from a real `drill.py --json` run on the development VM (all three scenarios).
    const SAMPLE: &str = include_str!("../fixtures/drill.json");

    fn sample() -> Vec<Run> {
        parse(&serde_json::from_str(SAMPLE).unwrap()).unwrap()
    }

    #[test]
    fn a_captured_drill_parses() {
        let runs = sample();
        let names: Vec<&str> = runs.iter().map(|r| r.scenario.as_str()).collect();
        assert_eq!(names, ["xid", "hang", "local"]);
        for r in &runs {
            assert_eq!(r.memory.len(), 4, "{}", r.scenario);
            assert_eq!(r.load_s.len(), 4, "{}", r.scenario);
            assert!(r.first_step > r.ckptd_part(), "{}", r.scenario);
        }
        let xid = &runs[0];
        assert!(xid.phase("isolated").is_some() && xid.phase("replaced").is_some());
        assert_eq!(xid.source(), "memory (ranks 0,1), storage (ranks 2,3)");
        assert_eq!(runs[1].source(), "memory");
        assert_eq!(runs[1].phase("isolated"), None);
    }

    #[test]
    fn derived_columns_follow_their_definitions() {
        let v = serde_json::json!({
            "scenario": "xid", "resumed_step": 16,
            "memory": {"0": true, "1": true, "2": false, "3": false},
            "load_s": {"0": 0.01, "1": 0.02, "2": 0.25, "3": 0.2},
            "since_fault_s": {"detected": 0.5, "ordered": 0.75, "restarted": 4.0, "first_step": 9.5, "done": 20.0},
        });
        let r = Run::from_json(&v).unwrap();
        assert_eq!(r.slowest_load(), 0.25);
        assert_eq!(r.ckptd_part(), 0.5 + 0.25 + 0.25);
        assert_eq!(r.first_step, 9.5);
        assert_eq!(r.restart_overhead(), 9.25);
        let local = Run::from_json(&serde_json::json!({
            "scenario": "local", "resumed_step": 16, "memory": {"0": true}, "load_s": {"0": 0.5},
            "since_fault_s": {"detected": 1.0, "first_step": 8.0},
        }))
        .unwrap();
        assert_eq!(local.ckptd_part(), 1.5, "no order logged: detection and load only");
        let worst = Recovery::of(&[r, local]).unwrap();
        assert_eq!((worst.scenario.as_str(), worst.overhead), ("xid", 9.25));
        assert_eq!(Recovery::of(&[]), None);
    }

    #[test]
    fn malformed_results_are_refused_with_the_field_named() {
        let mut v: Value = serde_json::from_str::<Value>(SAMPLE).unwrap()[0].clone();
        v["since_fault_s"].as_object_mut().unwrap().remove("first_step");
        assert!(Run::from_json(&v).unwrap_err().contains("first_step"));
        v["load_s"]["x"] = serde_json::json!(1.0);
        assert!(Run::from_json(&v).unwrap_err().contains("`x` is not a rank"));
        assert!(parse(&serde_json::json!({"scenario": "xid"})).is_err());
        let err = parse(&serde_json::json!([{"scenario": "xid"}])).unwrap_err();
        assert!(err.starts_with("drill result 0:"), "{err}");
    }

    #[test]
    fn the_table_has_a_row_per_scenario_and_the_derived_columns() {
        let runs = sample();
        let md = markdown(&runs);
        assert!(md.contains("| ckptd part | fault → first step |"));
        for r in &runs {
            let row = md.lines().find(|l| l.starts_with(&format!("| {} |", r.scenario))).unwrap();
            assert!(row.ends_with(&format!("{:.2} | {:.2} |", r.ckptd_part(), r.first_step)), "{row}");
        }
    }
}
