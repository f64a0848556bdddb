//! [`AlertMapping`]: turns an [`Alert`] into a [`Finding`]: a finding kind of the health policy
//! table, the action that table gives it, and the node it is about.
//!
//! Rules are tried in order, file rules before the built-in ones; the first whose matchers all
//! match wins. A rule's kind is a template: `{xid|err_code}` is replaced by the first of those
//! labels the alert has. The action comes from the same [`Policy`] the agents use; a rule may name
//! an action only for a kind the policy does not know (`host-failure`), and must then. The
//! operator file (`--alert-mapping`, TOML or YAML by extension) is checked at start-up.

use std::collections::BTreeMap;
use std::path::Path;

use super::alert::{Alert, NodeRef, Origin};
use crate::Error;
use crate::health::{Action, Policy};

/// Labels that name the node of an Alertmanager alert, in the order they are tried. `instance`
/// is last and its `:port` is cut: it is the scrape target, which is the node only for exporters
/// on the host network.
pub const NODE_LABELS: [&str; 6] = ["node", "kubernetes_node", "nodename", "Hostname", "hostname", "instance"];

/// One mapping rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Which payloads it applies to.
    pub origin: Origin,
    /// Label → accepted values; every label must have one of its values.
    pub matchers: BTreeMap<String, Vec<String>>,
    /// The kind, with `{a|b}` placeholders.
    pub kind: String,
    /// The action, for kinds the policy does not know.
    pub action: Option<Action>,
}

/// What an alert means for the isolator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Who sent it.
    pub origin: Origin,
    /// The node (still to be resolved for an instance id).
    pub node: NodeRef,
    /// The finding kind (`xid-79`, `ecc-dbe`, `host-failure`).
    pub kind: String,
    /// What the policy (or the rule) asks for.
    pub action: Action,
    /// Firing or resolved.
    pub firing: bool,
    /// The alert's name and identity, for the answer and the log.
    pub alert: String,
    /// The evidence line.
    pub evidence: String,
}

/// The resolved mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertMapping {
    rules: Vec<Rule>,
    node_labels: Vec<String>,
}

/// A built-in matcher: a label and its accepted values.
type Matcher = (&'static str, &'static [&'static str]);

/// Built-in Alertmanager rules: (matchers, kind, action for kinds outside the policy).
const ALERTMANAGER_RULES: &[(&[Matcher], &str, Option<Action>)] = &[
    (&[("alertname", &["GpuXidError"])], "xid-{xid|err_code}", None),
    (&[("alertname", &["GpuEccDoubleBitError"])], "ecc-dbe", None),
    (&[("alertname", &["GpuRowRemapFailure"])], "row-remap-failed", None),
    (&[("alertname", &["GpuFallenOffBus"])], "gpu-lost", None),
    (&[("alertname", &["KernelDeadlock"])], "node-kernel-deadlock", Some(Action::DrainNode)),
    (&[("condition", &["KernelDeadlock"])], "node-kernel-deadlock", Some(Action::DrainNode)),
    (&[("alertname", &["ReadonlyFilesystem"])], "node-readonly-filesystem", Some(Action::DrainNode)),
    (&[("condition", &["ReadonlyFilesystem"])], "node-readonly-filesystem", Some(Action::DrainNode)),
];

/// Built-in Aliyun rules: (event codes, kind, action). The kinds are outside the policy table.
const ALIYUN_RULES: &[(&[&str], &str, Action)] = &[
    (&["SystemFailure.Reboot", "SystemFailure.Redeploy", "SystemFailure.Stop"], "host-failure", Action::DrainNode),
    (
        &[
            "SystemMaintenance.Reboot",
            "SystemMaintenance.Redeploy",
            "SystemMaintenance.Stop",
            "SystemMaintenance.RebootAndIsolateErrorDisk",
            "SystemMaintenance.RebootAndReInitErrorDisk",
        ],
        "host-maintenance",
        Action::DrainNode,
    ),
    (&["InstanceFailure.Reboot"], "instance-failure", Action::RestartJob),
];

/// The operator file.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MappingFile {
    node_labels: Option<Vec<String>>,
    /// Keep the built-in rules after the file's (default true).
    builtin: Option<bool>,
    #[serde(default)]
    alertmanager: Vec<RuleFile>,
    #[serde(default)]
    aliyun: Vec<RuleFile>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(rename = "match")]
    matchers: BTreeMap<String, OneOrMany>,
    kind: String,
    action: Option<Action>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// Checks a kind template: lower-case letters, digits, `-` and `.` outside `{label|label}`
/// placeholders; at most 63 characters.
fn check_template(kind: &str) -> Result<(), String> {
    let mut rest = kind;
    let mut fixed = String::new();
    while let Some(open) = rest.find('{') {
        fixed.push_str(&rest[..open]);
        let close = rest[open..].find('}').ok_or_else(|| format!("`{kind}` has an unclosed `{{`"))? + open;
        let inner = &rest[open + 1..close];
        if inner.is_empty() || inner.split('|').any(str::is_empty) {
            return Err(format!("`{kind}` has an empty placeholder: write `{{label}}` or `{{label|other}}`"));
        }
        rest = &rest[close + 1..];
    }
    fixed.push_str(rest);
    if kind.is_empty() || kind.len() > 63 {
        return Err("a kind is 1-63 characters".into());
    }
    if let Some(c) = fixed.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'))) {
        return Err(format!("`{kind}`: `{c}` is not allowed in a kind (lower-case letters, digits, `-`, `.`)"));
    }
    Ok(())
}

fn is_template(kind: &str) -> bool {
    kind.contains('{')
}

/// Whether the policy has a row of its own for `kind` (an XID is always covered, by
/// `xid-default` if not by its own row).
fn policy_knows(policy: &Policy, kind: &str) -> bool {
    policy.rule(kind).1
        || kind.strip_prefix("xid-").and_then(|n| n.parse::<u32>().ok()).is_some_and(|n| (1..=999).contains(&n))
}

fn check_rule(policy: &Policy, r: &Rule, at: &str) -> Result<(), String> {
    check_template(&r.kind).map_err(|e| format!("{at}.kind: {e}"))?;
    if r.matchers.is_empty() {
        return Err(format!("{at}.match: at least one label to match"));
    }
    if r.matchers.values().any(Vec::is_empty) {
        return Err(format!("{at}.match: a label with no accepted value"));
    }
    if !is_template(&r.kind) {
        let known = policy_knows(policy, &r.kind);
        match (known, r.action) {
            (true, Some(_)) => {
                return Err(format!(
                    "{at}: `{}` is in the health policy table; set its action there (--health-policy), not here",
                    r.kind
                ));
            }
            (false, None) => {
                return Err(format!(
                    "{at}: `{}` is not in the health policy table: give it an action ({})",
                    r.kind,
                    Action::ALL.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(", ")
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

impl AlertMapping {
    fn builtin_rules() -> Vec<Rule> {
        let mut rules = Vec::new();
        for (m, kind, action) in ALERTMANAGER_RULES {
            rules.push(Rule {
                origin: Origin::Alertmanager,
                matchers: m.iter().map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect())).collect(),
                kind: kind.to_string(),
                action: *action,
            });
        }
        for (events, kind, action) in ALIYUN_RULES {
            rules.push(Rule {
                origin: Origin::Aliyun,
                matchers: BTreeMap::from([("event".to_string(), events.iter().map(|s| s.to_string()).collect())]),
                kind: kind.to_string(),
                action: Some(*action),
            });
        }
        rules
    }

    /// The built-in rules and node labels.
    pub fn builtin() -> AlertMapping {
        AlertMapping { rules: AlertMapping::builtin_rules(), node_labels: NODE_LABELS.map(String::from).to_vec() }
    }

    /// The mapping with the operator file at `path`; TOML unless the extension is `.yaml`/`.yml`.
    pub fn load(path: &Path, policy: &Policy) -> crate::Result<AlertMapping> {
        let what = format!("alert mapping file {}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| Error::unreadable(what.clone(), path, &e))?;
        let yaml = matches!(path.extension().and_then(|e| e.to_str()), Some("yaml") | Some("yml"));
        AlertMapping::parse(&text, yaml, policy).map_err(|reason| Error::Config { what, reason })
    }

    /// Parses an operator file's text; the error is one line.
    pub fn parse(text: &str, yaml: bool, policy: &Policy) -> Result<AlertMapping, String> {
        let file: MappingFile = if yaml {
            serde_yaml_ng::from_str(text).map_err(|e| e.to_string().split_whitespace().collect::<Vec<_>>().join(" "))?
        } else {
            toml::from_str(text).map_err(|e| e.message().split_whitespace().collect::<Vec<_>>().join(" "))?
        };
        let mut rules = Vec::new();
        for (origin, list) in [(Origin::Alertmanager, file.alertmanager), (Origin::Aliyun, file.aliyun)] {
            for (i, r) in list.into_iter().enumerate() {
                let rule = Rule {
                    origin,
                    matchers: r
                        .matchers
                        .into_iter()
                        .map(|(k, v)| {
                            let v = match v {
                                OneOrMany::One(s) => vec![s],
                                OneOrMany::Many(v) => v,
                            };
                            (k, v)
                        })
                        .collect(),
                    kind: r.kind,
                    action: r.action,
                };
                check_rule(policy, &rule, &format!("{}[{i}]", origin.as_str()))?;
                rules.push(rule);
            }
        }
        if file.builtin.unwrap_or(true) {
            rules.extend(AlertMapping::builtin_rules());
        }
        let node_labels = match file.node_labels {
            Some(l) if l.is_empty() => return Err("node_labels: name at least one label".into()),
            Some(l) => l,
            None => NODE_LABELS.map(String::from).to_vec(),
        };
        Ok(AlertMapping { rules, node_labels })
    }

    /// Checks the built-in rules against `policy` (a policy file may not move a built-in kind out
    /// of the table, but it may give an XID rule another action, which is fine).
    pub fn check(&self, policy: &Policy) -> Result<(), String> {
        for (i, r) in self.rules.iter().enumerate() {
            check_rule(policy, r, &format!("rule {i}"))?;
        }
        Ok(())
    }

    /// Maps one alert; `Err` is the reason the payload is refused.
    pub fn map(&self, alert: &Alert, policy: &Policy) -> Result<Finding, String> {
        let label = |k: &str| alert.labels.get(k).filter(|v| !v.is_empty());
        let rule = self
            .rules
            .iter()
            .filter(|r| r.origin == alert.origin)
            .find(|r| r.matchers.iter().all(|(k, vs)| label(k).is_some_and(|v| vs.contains(v))))
            .ok_or_else(|| {
                format!(
                    "`{}` matches no mapping rule: route only GPU and node fault alerts to ckptd, or map it in --alert-mapping",
                    crate::text::capped(&alert.name, 64)
                )
            })?;
        let kind = self.expand(&rule.kind, alert)?;
        let action = if policy_knows(policy, &kind) {
            policy.rule(&kind).0.action
        } else {
            rule.action.unwrap_or(Action::RestartJob)
        };
        let node = match alert.origin {
            Origin::Aliyun => {
                NodeRef::Instance(label("instance_id").cloned().ok_or("the event names no instance")?.to_string())
            }
            Origin::Alertmanager => {
                let (k, v) = self.node_labels.iter().find_map(|k| label(k).map(|v| (k, v))).ok_or_else(|| {
                    format!(
                        "`{}` names no node: give it one of the labels {}",
                        crate::text::capped(&alert.name, 64),
                        self.node_labels.join(", ")
                    )
                })?;
                let v = if k == "instance" { v.rsplit_once(':').map_or(v.as_str(), |(h, _)| h) } else { v.as_str() };
                NodeRef::Name(v.to_string())
            }
        };
        let (NodeRef::Name(n) | NodeRef::Instance(n)) = &node;
        super::request::check_name("node", n, true).map_err(|e| e.to_string())?;
        Ok(Finding {
            origin: alert.origin,
            node,
            kind,
            action,
            firing: alert.firing,
            alert: if alert.id.is_empty() { alert.name.clone() } else { format!("{} {}", alert.name, alert.id) },
            evidence: alert.evidence.clone(),
        })
    }

    /// Fills a kind template from the alert's labels.
    fn expand(&self, template: &str, alert: &Alert) -> Result<String, String> {
        let mut out = String::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let close = rest[open..].find('}').map_or(rest.len(), |c| c + open);
            let names = &rest[open + 1..close];
            let value =
                names.split('|').find_map(|n| alert.labels.get(n).filter(|v| !v.is_empty())).ok_or_else(|| {
                    format!(
                        "`{}` has none of the labels {} that its kind `{template}` needs",
                        alert.name,
                        names.replace('|', ", ")
                    )
                })?;
            if value.is_empty()
                || value.len() > 32
                || !value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
            {
                return Err(format!("label value `{}` cannot be part of a kind", crate::text::capped(value, 32)));
            }
            out.push_str(&value.to_ascii_lowercase().replace('_', "-"));
            rest = rest.get(close + 1..).unwrap_or_default();
        }
        out.push_str(rest);
        if let Some(n) = out.strip_prefix("xid-") {
            match n.parse::<u32>() {
                Ok(x) if (1..=999).contains(&x) => out = format!("xid-{x}"),
                _ => return Err(format!("`{}`: XID `{n}` is not a number in 1..=999", alert.name)),
            }
        }
        if out.len() > 63 {
            return Err(format!("kind `{}` is longer than 63 characters", crate::text::capped(&out, 64)));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isolator::alert::{parse, parse_alertmanager};

    fn fixture(name: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/alerts").join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn map_fixture(m: &AlertMapping, origin: Origin, name: &str) -> Result<Vec<Finding>, String> {
        let policy = Policy::builtin();
        parse(origin, &fixture(name))?.iter().map(|a| m.map(a, &policy)).collect()
    }

    #[test]
    fn builtin_rules_agree_with_the_policy() {
        AlertMapping::builtin().check(&Policy::builtin()).unwrap();
    }

    #[test]
    fn every_fixture_maps_to_the_kind_the_node_local_reporters_use() {
        let m = AlertMapping::builtin();
        let cases: &[(Origin, &str, &str, Action, NodeRef)] = &[
            (
                Origin::Alertmanager,
                "alertmanager-dcgm-xid79.json",
                "xid-79",
                Action::DrainNode,
                NodeRef::Name("node-2".into()),
            ),
            (
                Origin::Alertmanager,
                "alertmanager-dcgm-ecc-dbe.json",
                "ecc-dbe",
                Action::ResetGpu,
                NodeRef::Name("gpu-node-7".into()),
            ),
            (
                Origin::Alertmanager,
                "alertmanager-npd-kernel-deadlock.json",
                "node-kernel-deadlock",
                Action::DrainNode,
                NodeRef::Name("gpu-node-3".into()),
            ),
            (
                Origin::Aliyun,
                "aliyun-cloudmonitor-systemfailure-reboot.json",
                "host-failure",
                Action::DrainNode,
                NodeRef::Instance("i-bp1node2gpu0000000x".into()),
            ),
            (
                Origin::Aliyun,
                "aliyun-eventbridge-systemfailure-reboot.json",
                "host-failure",
                Action::DrainNode,
                NodeRef::Instance("i-bp1node2gpu0000000x".into()),
            ),
            (
                Origin::Aliyun,
                "aliyun-eventbridge-maintenance-reboot.json",
                "host-maintenance",
                Action::DrainNode,
                NodeRef::Instance("i-uf6maint00000000000".into()),
            ),
        ];
        for (origin, name, kind, action, node) in cases {
            let f = map_fixture(&m, *origin, name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(f.len(), 1, "{name}");
            assert_eq!((&f[0].kind, f[0].action, &f[0].node), (&kind.to_string(), *action, node), "{name}");
            assert!(f[0].firing, "{name}");
        }
        let resolved = map_fixture(&m, Origin::Alertmanager, "alertmanager-dcgm-xid79-resolved.json").unwrap();
        assert!(!resolved[0].firing);
    }

    #[test]
    fn the_xid_comes_from_either_label_and_must_be_an_xid() {
        let m = AlertMapping::builtin();
        let p = Policy::builtin();
        let alert = |labels: &str| {
            let body = format!(
                r#"{{"version":"4","alerts":[{{"status":"firing","labels":{{"alertname":"GpuXidError","node":"n1"{labels}}}}}]}}"#
            );
            parse_alertmanager(body.as_bytes()).unwrap().remove(0)
        };
        assert_eq!(m.map(&alert(r#","xid":"48""#), &p).unwrap().kind, "xid-48");
        assert_eq!(m.map(&alert(r#","err_code":"013""#), &p).unwrap().kind, "xid-13");
        assert_eq!(m.map(&alert(r#","xid":"250""#), &p).unwrap().action, Action::RestartJob, "xid-default");
        for bad in [r#""#, r#","xid":"0""#, r#","xid":"abc""#, r#","xid":"1000""#, r#","xid":"7 9""#] {
            let e = m.map(&alert(bad), &p).unwrap_err();
            assert!(e.contains("xid") || e.contains("XID") || e.contains("label value"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_node_label_order_is_explicit() {
        let m = AlertMapping::builtin();
        let p = Policy::builtin();
        let body = br#"{"alerts":[{"status":"firing","labels":{"alertname":"GpuEccDoubleBitError","instance":"10.0.0.5:9400","Hostname":"gpu-1"}}]}"#;
        let a = parse_alertmanager(body).unwrap().remove(0);
        assert_eq!(m.map(&a, &p).unwrap().node, NodeRef::Name("gpu-1".into()));
        let body = br#"{"alerts":[{"status":"firing","labels":{"alertname":"GpuEccDoubleBitError","instance":"gpu-9:9400"}}]}"#;
        let a = parse_alertmanager(body).unwrap().remove(0);
        assert_eq!(m.map(&a, &p).unwrap().node, NodeRef::Name("gpu-9".into()));
        let body = br#"{"alerts":[{"status":"firing","labels":{"alertname":"GpuEccDoubleBitError"}}]}"#;
        let a = parse_alertmanager(body).unwrap().remove(0);
        assert!(m.map(&a, &p).unwrap_err().contains("names no node"));
    }

    #[test]
    fn unknown_alerts_and_events_are_refused() {
        let m = AlertMapping::builtin();
        let e = map_fixture(&m, Origin::Alertmanager, "alertmanager-unrelated.json").unwrap_err();
        assert!(e.contains("HighMemoryUsage") && e.contains("no mapping rule"), "{e}");
        let e = map_fixture(&m, Origin::Aliyun, "aliyun-cloudmonitor-statechange.json").unwrap_err();
        assert!(e.contains("StateChange"), "{e}");
    }

    #[test]
    fn the_operator_file_adds_rules_before_the_builtin_ones() {
        let p = Policy::builtin();
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/alerts/mapping.toml"),
        )
        .unwrap();
        let m = AlertMapping::parse(&text, false, &p).unwrap();
        let f = map_fixture(&m, Origin::Aliyun, "aliyun-lingjun-gpu-fault.json").unwrap();
        assert_eq!((f[0].kind.as_str(), f[0].action), ("lingjun-gpu-fault", Action::DrainNode));
        // The built-in rules still follow.
        let f = map_fixture(&m, Origin::Alertmanager, "alertmanager-dcgm-xid79.json").unwrap();
        assert_eq!(f[0].kind, "xid-79");
        let y = AlertMapping::parse(
            "builtin: false\nalertmanager:\n  - match: {alertname: [A, B]}\n    kind: xid-{code}\n",
            true,
            &p,
        )
        .unwrap();
        assert_eq!(y.rules.len(), 1);
    }

    #[test]
    fn bad_mapping_files_name_the_rule_and_the_fix() {
        let p = Policy::builtin();
        let cases = [
            ("[[alertmanager]]\nmatch = { alertname = \"X\" }\nkind = \"brand-new\"\n", "give it an action"),
            (
                "[[alertmanager]]\nmatch = { alertname = \"X\" }\nkind = \"xid-79\"\naction = \"ignore\"\n",
                "--health-policy",
            ),
            ("[[aliyun]]\nmatch = {}\nkind = \"host-failure\"\naction = \"drain-node\"\n", "at least one label"),
            (
                "[[aliyun]]\nmatch = { event = \"X\" }\nkind = \"Host Failure\"\naction = \"drain-node\"\n",
                "not allowed",
            ),
            ("[[aliyun]]\nmatch = { event = \"X\" }\nkind = \"xid-{a\"\n", "unclosed"),
            ("[[aliyun]]\nmatch = { event = \"X\" }\nkind = \"k\"\naction = \"nuke\"\n", "nuke"),
            ("[[aliyun]]\nmatch = { event = \"X\" }\nknd = \"k\"\n", "knd"),
            ("node_labels = []\n", "node_labels"),
        ];
        for (text, want) in cases {
            let e = AlertMapping::parse(text, false, &p).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.toml");
        std::fs::write(&f, "bogus = 1\n").unwrap();
        let e = AlertMapping::load(&f, &p).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Config);
        assert!(e.to_string().contains("m.toml"), "{e}");
    }
}
