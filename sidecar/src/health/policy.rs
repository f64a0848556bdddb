//! The policy table: finding kind → action. The built-in table follows NVIDIA's XID catalogue
//! (docs/HEALTH.md cites it row by row); an operator file (TOML or YAML) overrides single rules
//! and the controller's dedupe and rate-limit settings. The file is validated at start-up, so a
//! typo stops the agent with exit code 64 instead of silently keeping a default.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::Error;

/// What to do about a finding, ordered by severity (a later variant is stronger).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Count and show it; do nothing.
    Ignore,
    /// The program is at fault or the fault is transient: restart the job from its checkpoint.
    RestartJob,
    /// The GPU needs a reset (pending row remap, GSP hang); the node can stay.
    ResetGpu,
    /// The node is bad: cordon, taint and move the job away.
    DrainNode,
    /// The node needs a reboot (drained first).
    RebootNode,
}

impl Action {
    /// Every action, for messages that list the accepted values.
    pub const ALL: [Action; 5] =
        [Action::Ignore, Action::RestartJob, Action::ResetGpu, Action::DrainNode, Action::RebootNode];

    /// The name used in policy files, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Ignore => "ignore",
            Action::RestartJob => "restart-job",
            Action::ResetGpu => "reset-gpu",
            Action::DrainNode => "drain-node",
            Action::RebootNode => "reboot-node",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Action> for ckptd_proto::v1::FaultAction {
    fn from(a: Action) -> Self {
        use ckptd_proto::v1::FaultAction as F;
        match a {
            Action::Ignore => F::Ignore,
            Action::RestartJob => F::RestartJob,
            Action::ResetGpu => F::ResetGpu,
            Action::DrainNode => F::DrainNode,
            Action::RebootNode => F::RebootNode,
        }
    }
}

/// The wire's action as a policy action; `UNSPECIFIED` has none.
impl TryFrom<ckptd_proto::v1::FaultAction> for Action {
    type Error = ckptd_proto::Unspecified;

    fn try_from(a: ckptd_proto::v1::FaultAction) -> Result<Action, ckptd_proto::Unspecified> {
        use ckptd_proto::v1::FaultAction as F;
        match a {
            F::Unspecified => Err(ckptd_proto::Unspecified { field: "fault action", value: a as i32 }),
            F::Ignore => Ok(Action::Ignore),
            F::RestartJob => Ok(Action::RestartJob),
            F::ResetGpu => Ok(Action::ResetGpu),
            F::DrainNode => Ok(Action::DrainNode),
            F::RebootNode => Ok(Action::RebootNode),
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Rule {
    /// The action for the first occurrences.
    pub action: Action,
    /// Debounce: occurrences at the same locus within `window` before anything is decided
    /// (1 = act on the first).
    pub confirm: u32,
    /// Escalation: after this many occurrences at the same locus within `window`, use
    /// `escalate_to` (a repeat on the same GPU points at the GPU, not the program).
    pub escalate_after: Option<u32>,
    /// The stronger action once `escalate_after` is reached.
    pub escalate_to: Option<Action>,
    /// The window over which occurrences are counted.
    #[serde(with = "humantime_serde_str")]
    pub window: Duration,
}

mod humantime_serde_str {
    pub(super) fn serialize<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

const fn rule(action: Action) -> Rule {
    Rule { action, confirm: 1, escalate_after: None, escalate_to: None, window: HOUR }
}

const fn escalating(action: Action, after: u32, to: Action, window: Duration) -> Rule {
    Rule { action, confirm: 1, escalate_after: Some(after), escalate_to: Some(to), window }
}

/// The built-in XID rows: (xid, NVIDIA's description, rule). Sources and reasons are in
/// docs/HEALTH.md; `policy_table_covers_every_builtin_xid` keeps the two in step.
pub const XID_CATALOGUE: &[(u32, &str, Rule)] = {
    use Action::*;
    &[
        (8, "GPU stopped processing (idle timeout)", escalating(RestartJob, 3, DrainNode, HOUR)),
        (13, "graphics engine exception", escalating(RestartJob, 3, DrainNode, HOUR)),
        (31, "GPU memory page fault", escalating(RestartJob, 3, DrainNode, HOUR)),
        (32, "invalid or corrupted push buffer stream", escalating(RestartJob, 3, DrainNode, HOUR)),
        (38, "driver firmware error", escalating(ResetGpu, 2, DrainNode, DAY)),
        (43, "GPU stopped processing (reset channel)", escalating(RestartJob, 3, DrainNode, HOUR)),
        (45, "preemptive cleanup after a previous error", rule(Ignore)),
        (48, "double-bit ECC error (DBE)", escalating(ResetGpu, 2, DrainNode, DAY)),
        (61, "internal micro-controller breakpoint/warning", escalating(ResetGpu, 2, DrainNode, DAY)),
        (62, "internal micro-controller halt", escalating(ResetGpu, 2, DrainNode, DAY)),
        (63, "ECC page retirement or row remapping recorded", escalating(ResetGpu, 3, DrainNode, DAY)),
        (64, "ECC page retirement or row remapping failed", rule(DrainNode)),
        (68, "video decoder (NVDEC) exception", escalating(RestartJob, 3, DrainNode, HOUR)),
        (69, "graphics engine class error", escalating(RestartJob, 3, DrainNode, HOUR)),
        (74, "NVLink error", escalating(ResetGpu, 2, DrainNode, HOUR)),
        (79, "GPU has fallen off the bus", rule(DrainNode)),
        (92, "high single-bit ECC error rate", escalating(Ignore, 3, DrainNode, DAY)),
        (94, "contained ECC error", escalating(RestartJob, 3, ResetGpu, DAY)),
        (95, "uncontained ECC error", escalating(ResetGpu, 2, DrainNode, DAY)),
        (109, "context switch timeout", escalating(RestartJob, 3, ResetGpu, HOUR)),
        (119, "GSP RPC timeout", escalating(ResetGpu, 2, DrainNode, HOUR)),
        (120, "GSP error", escalating(ResetGpu, 2, DrainNode, HOUR)),
        (121, "C2C link error", escalating(ResetGpu, 2, DrainNode, HOUR)),
        (140, "unrecovered ECC error", escalating(ResetGpu, 2, DrainNode, DAY)),
        (143, "GPU initialization failure", rule(DrainNode)),
        (154, "GPU recovery action changed (driver asks for reset, drain or reboot)", rule(DrainNode)),
    ]
};

/// The rule for an XID that is not in [`XID_CATALOGUE`] (policy key `xid-default`): restart the
/// job, and drain when it repeats on the same GPU; the finding is logged as unknown.
pub const XID_DEFAULT: Rule = escalating(Action::RestartJob, 3, Action::DrainNode, HOUR);

/// The built-in non-XID rows: (kind, meaning, rule).
pub const KINDS: &[(&str, &str, Rule)] = {
    use Action::*;
    &[
        ("gpu-lost", "NVML reports the GPU lost (fallen off the bus)", rule(DrainNode)),
        ("nvswitch-fatal", "an NVSwitch SXid marked Fatal: the NVLink fabric is down", rule(DrainNode)),
        ("nvswitch-nonfatal", "an NVSwitch SXid marked Non-fatal", escalating(Ignore, 5, DrainNode, HOUR)),
        ("ecc-dbe", "NVML volatile double-bit ECC counter increased", escalating(ResetGpu, 2, DrainNode, DAY)),
        ("ecc-sbe", "NVML volatile single-bit ECC counter jumped", escalating(Ignore, 5, DrainNode, DAY)),
        ("row-remap-pending", "a row remap is pending; it applies at the next GPU reset", rule(ResetGpu)),
        ("row-remap-failed", "a row remap failed: the memory cannot be repaired", rule(DrainNode)),
        ("retired-pages", "NVML retired more pages", escalating(Ignore, 3, DrainNode, DAY)),
        ("nvlink-errors", "NVLink CRC/replay/recovery counters increased", escalating(Ignore, 5, ResetGpu, HOUR)),
        ("pcie-replay", "PCIe replay counter increased", escalating(Ignore, 5, DrainNode, HOUR)),
        ("thermal-throttle", "hardware or software thermal slowdown", rule(Ignore)),
        ("power-throttle", "hardware power-brake slowdown", rule(Ignore)),
        ("hang", "a rank made no progress within its phase budget", rule(RestartJob)),
        ("nccl-timeout", "torch NCCL watchdog: collective timed out", rule(RestartJob)),
        ("nccl-watchdog-stuck", "torch NCCL watchdog or heartbeat monitor stuck", rule(RestartJob)),
        ("nccl-remote-peer", "a remote peer closed the connection or exited", rule(RestartJob)),
        ("nccl-remote-error", "ncclRemoteError", rule(RestartJob)),
        ("nccl-system-error", "ncclSystemError", rule(RestartJob)),
        ("nccl-internal-error", "ncclInternalError", rule(RestartJob)),
        ("nccl-net-error", "NCCL IB/socket transport error", rule(RestartJob)),
        ("nccl-flight-recorder", "a torch flight-recorder dump appeared", rule(RestartJob)),
        ("ib-port-down", "an InfiniBand/RoCE port left ACTIVE", rule(DrainNode)),
        ("ib-link-downed", "link_downed counter increased", escalating(RestartJob, 3, DrainNode, HOUR)),
        ("ib-flap", "too many down→up transitions within the flap window", rule(DrainNode)),
        ("ib-symbol-errors", "symbol_error rate above threshold", escalating(Ignore, 3, DrainNode, HOUR)),
        ("ib-rcv-errors", "port_rcv_errors rate above threshold", escalating(Ignore, 3, DrainNode, HOUR)),
    ]
};

/// The resolved table plus the controller's dedupe and rate-limit settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Policy {
    rules: BTreeMap<String, Rule>,
    xid_default: Rule,
    /// A repeat of the same fault (kind and locus) within this window updates the active fault
    /// instead of deciding again, unless the action escalates.
    #[serde(with = "humantime_serde_str")]
    pub dedupe_window: Duration,
    /// At most this many decisions per `rate_window`; a stronger action than any in the window
    /// always passes.
    pub rate_limit: u32,
    /// The rate-limit window.
    #[serde(with = "humantime_serde_str")]
    pub rate_window: Duration,
    /// Occurrences of one fault closer together than this are one event for escalation (the
    /// driver prints several lines per XID; NVML and the kernel log both report it).
    #[serde(with = "humantime_serde_str")]
    pub coalesce: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::builtin()
    }
}

/// The operator file: every field optional, unknown ones refused.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    dedupe_window: Option<String>,
    rate_limit: Option<u32>,
    rate_window: Option<String>,
    coalesce: Option<String>,
    #[serde(default)]
    rules: BTreeMap<String, RuleFile>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    action: Option<Action>,
    confirm: Option<u32>,
    escalate_after: Option<u32>,
    escalate_to: Option<Action>,
    window: Option<String>,
}

impl Policy {
    /// The built-in table.
    pub fn builtin() -> Policy {
        let mut rules = BTreeMap::new();
        for (xid, _, r) in XID_CATALOGUE {
            rules.insert(format!("xid-{xid}"), *r);
        }
        for (kind, _, r) in KINDS {
            rules.insert((*kind).to_owned(), *r);
        }
        Policy {
            rules,
            xid_default: XID_DEFAULT,
            dedupe_window: Duration::from_secs(300),
            rate_limit: 10,
            rate_window: Duration::from_secs(60),
            coalesce: Duration::from_secs(30),
        }
    }

    /// The built-in table with the operator file at `path` applied; TOML unless the extension
    /// is `.yaml` or `.yml`. Any unknown key, rule or action is an [`Error::Config`] naming the
    /// file, the key and the accepted values.
    pub fn load(path: &Path) -> crate::Result<Policy> {
        let what = format!("health policy file {}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| Error::unreadable(what.clone(), path, &e))?;
        let yaml = matches!(path.extension().and_then(|e| e.to_str()), Some("yaml") | Some("yml"));
        Policy::parse(&text, yaml).map_err(|reason| Error::Config { what, reason })
    }

    /// Parses an operator file's text onto the built-in table. The error is one line.
    pub fn parse(text: &str, yaml: bool) -> Result<Policy, String> {
        let file: PolicyFile = if yaml {
            serde_yaml_ng::from_str(text).map_err(|e| one_line(&e.to_string()))?
        } else {
            toml::from_str(text).map_err(|e| toml_error(text, &e))?
        };
        let mut policy = Policy::builtin();
        if let Some(d) = &file.dedupe_window {
            policy.dedupe_window = duration("dedupe_window", d)?;
        }
        if let Some(n) = file.rate_limit {
            if n == 0 {
                return Err("rate_limit: must be at least 1".into());
            }
            policy.rate_limit = n;
        }
        if let Some(d) = &file.rate_window {
            policy.rate_window = duration("rate_window", d)?;
        }
        if let Some(d) = &file.coalesce {
            policy.coalesce = duration("coalesce", d)?;
        }
        for (key, over) in file.rules {
            let base = policy.base_rule(&key).ok_or_else(|| {
                format!(
                    "rules.{key}: unknown finding kind; accepted: xid-<1..=999>, xid-default, {}",
                    KINDS.iter().map(|k| k.0).collect::<Vec<_>>().join(", ")
                )
            })?;
            let mut r = base;
            if let Some(a) = over.action {
                r.action = a;
            }
            if let Some(c) = over.confirm {
                if c == 0 {
                    return Err(format!("rules.{key}.confirm: must be at least 1"));
                }
                r.confirm = c;
            }
            if let Some(n) = over.escalate_after {
                r.escalate_after = Some(n);
            }
            if let Some(a) = over.escalate_to {
                r.escalate_to = Some(a);
            }
            if let Some(w) = &over.window {
                r.window = duration(&format!("rules.{key}.window"), w)?;
            }
            if r.escalate_after.is_some() != r.escalate_to.is_some() {
                return Err(format!("rules.{key}: escalate_after and escalate_to go together (both or neither)"));
            }
            if key == "xid-default" {
                policy.xid_default = r;
            } else {
                policy.rules.insert(key, r);
            }
        }
        Ok(policy)
    }

    /// The rule a key starts from before an override: its own row, or `xid-default` for an XID
    /// the catalogue lacks; `None` for a key that names nothing.
    fn base_rule(&self, key: &str) -> Option<Rule> {
        if key == "xid-default" {
            return Some(self.xid_default);
        }
        if let Some(r) = self.rules.get(key) {
            return Some(*r);
        }
        let n: u32 = key.strip_prefix("xid-")?.parse().ok()?;
        (1..=999).contains(&n).then_some(self.xid_default)
    }

    /// The rule for a finding kind and whether the kind is known. An unknown XID gets
    /// `xid-default`; any other unknown kind restarts the job (a reporter bug must not drain).
    pub fn rule(&self, kind: &str) -> (Rule, bool) {
        match self.rules.get(kind) {
            Some(r) => (*r, true),
            None if kind.starts_with("xid-") => (self.xid_default, false),
            None => (rule(Action::RestartJob), false),
        }
    }
}

fn duration(key: &str, text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{key}: `{text}` is not a duration ({e}); e.g. \"90s\", \"5m\", \"1h\""))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// toml's message is a multi-line snippet; the daemon prints one line, so keep the line number
/// and the message.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = one_line(e.message());
    match e.span() {
        Some(span) => {
            let line = text.get(..span.start).map_or(0, |t| t.matches('\n').count()) + 1;
            format!("line {line}: {msg}")
        }
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_table_covers_every_builtin_xid() {
        let p = Policy::builtin();
        type Row = (u32, Action, Option<(u32, Action)>);
        let want: &[Row] = {
            use Action::*;
            &[
                (8, RestartJob, Some((3, DrainNode))),
                (13, RestartJob, Some((3, DrainNode))),
                (31, RestartJob, Some((3, DrainNode))),
                (32, RestartJob, Some((3, DrainNode))),
                (38, ResetGpu, Some((2, DrainNode))),
                (43, RestartJob, Some((3, DrainNode))),
                (45, Ignore, None),
                (48, ResetGpu, Some((2, DrainNode))),
                (61, ResetGpu, Some((2, DrainNode))),
                (62, ResetGpu, Some((2, DrainNode))),
                (63, ResetGpu, Some((3, DrainNode))),
                (64, DrainNode, None),
                (68, RestartJob, Some((3, DrainNode))),
                (69, RestartJob, Some((3, DrainNode))),
                (74, ResetGpu, Some((2, DrainNode))),
                (79, DrainNode, None),
                (92, Ignore, Some((3, DrainNode))),
                (94, RestartJob, Some((3, ResetGpu))),
                (95, ResetGpu, Some((2, DrainNode))),
                (109, RestartJob, Some((3, ResetGpu))),
                (119, ResetGpu, Some((2, DrainNode))),
                (120, ResetGpu, Some((2, DrainNode))),
                (121, ResetGpu, Some((2, DrainNode))),
                (140, ResetGpu, Some((2, DrainNode))),
                (143, DrainNode, None),
                (154, DrainNode, None),
            ]
        };
        assert_eq!(want.len(), XID_CATALOGUE.len(), "a catalogue row has no test row");
        for (xid, action, esc) in want {
            let (r, known) = p.rule(&format!("xid-{xid}"));
            assert!(known, "xid {xid}");
            assert_eq!(r.action, *action, "xid {xid}");
            assert_eq!(r.escalate_after.zip(r.escalate_to), *esc, "xid {xid}");
            assert_eq!(r.confirm, 1, "xid {xid}: a catalogued xid acts on the first line");
        }
        let (r, known) = p.rule("xid-250");
        assert!(!known);
        assert_eq!(r, XID_DEFAULT);
    }

    #[test]
    fn docs_list_every_builtin_row() {
        let doc = include_str!("../../../docs/HEALTH.md");
        for (xid, _, r) in XID_CATALOGUE {
            let row = format!("| {xid} |");
            let line = doc.lines().find(|l| l.starts_with(&row));
            let line = line.unwrap_or_else(|| panic!("docs/HEALTH.md has no row for xid {xid}"));
            assert!(line.contains(r.action.as_str()), "docs row for xid {xid}: {line}");
        }
        for (kind, _, r) in KINDS {
            let row = format!("| `{kind}` |");
            let line = doc.lines().find(|l| l.starts_with(&row));
            let line = line.unwrap_or_else(|| panic!("docs/HEALTH.md has no row for {kind}"));
            assert!(line.contains(r.action.as_str()), "docs row for {kind}: {line}");
        }
    }

    #[test]
    fn toml_override_applies_and_keeps_the_rest() {
        let p = Policy::parse(
            "dedupe_window = \"10m\"\nrate_limit = 3\n[rules.xid-13]\naction = \"ignore\"\n\
             [rules.xid-250]\naction = \"drain-node\"\n[rules.hang]\nwindow = \"2h\"\n",
            false,
        )
        .unwrap();
        assert_eq!(p.dedupe_window, Duration::from_secs(600));
        assert_eq!(p.rate_limit, 3);
        assert_eq!(p.rule("xid-13").0.action, Action::Ignore);
        assert_eq!(p.rule("xid-13").0.escalate_to, Some(Action::DrainNode));
        assert_eq!(p.rule("xid-250"), (Rule { action: Action::DrainNode, ..XID_DEFAULT }, true));
        assert_eq!(p.rule("hang").0.window, Duration::from_secs(7200));
        assert_eq!(p.rule("xid-79").0.action, Action::DrainNode);
    }

    #[test]
    fn yaml_override_applies() {
        let p = Policy::parse("rules:\n  xid-79:\n    action: reboot-node\n", true).unwrap();
        assert_eq!(p.rule("xid-79").0.action, Action::RebootNode);
    }

    #[test]
    fn bad_files_name_the_key_and_accepted_values() {
        let e = Policy::parse("[rules.xid-13]\naction = \"drain\"\n", false).unwrap_err();
        assert!(e.contains("line 2") && e.contains("drain-node"), "{e}");
        assert!(!e.contains('\n'));
        let e = Policy::parse("[rules.xid-13]\nactoin = \"ignore\"\n", false).unwrap_err();
        assert!(e.contains("actoin") && e.contains("escalate_after"), "{e}");
        let e = Policy::parse("[rules.hangs]\naction = \"ignore\"\n", false).unwrap_err();
        assert!(e.contains("rules.hangs") && e.contains("ib-port-down"), "{e}");
        let e = Policy::parse("[rules.xid-1000]\naction = \"ignore\"\n", false).unwrap_err();
        assert!(e.contains("xid-1000"), "{e}");
        let e = Policy::parse("rate_limt = 3\n", false).unwrap_err();
        assert!(e.contains("rate_limt"), "{e}");
        let e = Policy::parse("rules:\n  xid-79:\n    action: nuke\n", true).unwrap_err();
        assert!(e.contains("nuke") && e.contains("reboot-node"), "{e}");
        let e = Policy::parse("[rules.xid-13]\nescalate_after = 2\nescalate_to = \"x\"\n", false).unwrap_err();
        assert!(e.contains("restart-job"), "{e}");
        let e = Policy::parse("[rules.hang]\nwindow = \"soon\"\n", false).unwrap_err();
        assert!(e.contains("rules.hang.window"), "{e}");
    }

    #[test]
    fn load_picks_the_format_by_extension_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let y = dir.path().join("p.yaml");
        std::fs::write(&y, "rules:\n  hang:\n    action: ignore\n").unwrap();
        assert_eq!(Policy::load(&y).unwrap().rule("hang").0.action, Action::Ignore);
        let t = dir.path().join("p.toml");
        std::fs::write(&t, "[rules.hang]\nation = \"ignore\"\n").unwrap();
        let e = Policy::load(&t).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Config);
        assert!(e.to_string().contains("p.toml"), "{e}");
    }
}
