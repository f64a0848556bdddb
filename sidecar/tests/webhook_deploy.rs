//! deploy/: the Helm chart and the plain manifests agree, every manifest parses into typed Kubernetes
//! objects, and the settings that matter (webhook policy, RBAC, ports, flags, dashboard metrics) are
//! what the rest of ckptd expects.
//!
//! No Helm binary is available to CI, so this file renders the chart itself with the small subset of
//! Helm's template language the chart is restricted to (see values.yaml). `CKPTD_BLESS_MANIFESTS=1
//! cargo test -p ckptd --test webhook_deploy` rewrites deploy/manifests from the chart.
#![cfg(feature = "server")]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::{Args, Command};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde_yaml_ng::Value;

const NAMESPACE: &str = "ckptd";

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn chart_dir() -> PathBuf {
    deploy_dir().join("helm/ckptd")
}

// ------------------------------------------------------------------------------------------ renderer

#[derive(Debug)]
enum Node {
    Text(String),
    Expr(String),
    If { cond: String, then: Vec<Node>, otherwise: Vec<Node> },
}

/// Splits a template into text and actions, applying `{{-` and `-}}` whitespace trimming as Helm does
/// (at parse time, whatever the actions evaluate to).
fn tokenize(src: &str) -> Vec<(bool, String)> {
    let mut out: Vec<(bool, String)> = Vec::new();
    let mut rest = src;
    let mut trim_next = false;
    while let Some(start) = rest.find("{{") {
        let mut text = rest[..start].to_string();
        if trim_next {
            text = text.trim_start().to_string();
        }
        let end = rest[start..].find("}}").expect("unclosed action") + start;
        let mut action = &rest[start + 2..end];
        if let Some(a) = action.strip_prefix('-') {
            text = text.trim_end().to_string();
            action = a;
        }
        trim_next = false;
        if let Some(a) = action.strip_suffix('-') {
            trim_next = true;
            action = a;
        }
        out.push((false, text));
        out.push((true, action.trim().to_string()));
        rest = &rest[end + 2..];
    }
    let text = if trim_next { rest.trim_start() } else { rest };
    out.push((false, text.to_string()));
    out
}

fn parse(tokens: &mut std::iter::Peekable<std::vec::IntoIter<(bool, String)>>) -> (Vec<Node>, Option<String>) {
    let mut nodes = Vec::new();
    while let Some((is_action, s)) = tokens.next() {
        if !is_action {
            nodes.push(Node::Text(s));
        } else if s.starts_with("/*") {
            continue;
        } else if let Some(cond) = s.strip_prefix("if ") {
            let (then, end) = parse(tokens);
            let otherwise = if end.as_deref() == Some("else") { parse(tokens).0 } else { Vec::new() };
            nodes.push(Node::If { cond: cond.trim().to_string(), then, otherwise });
        } else if s == "else" || s == "end" {
            return (nodes, Some(s));
        } else {
            nodes.push(Node::Expr(s));
        }
    }
    (nodes, None)
}

struct Ctx {
    values: Value,
    namespace: String,
}

impl Ctx {
    fn lookup(&self, path: &str) -> Value {
        if path == ".Release.Namespace" {
            return Value::String(self.namespace.clone());
        }
        let keys = path.strip_prefix(".Values.").unwrap_or_else(|| panic!("unsupported reference {path}"));
        let mut v = &self.values;
        for k in keys.split('.') {
            v = v.get(k).unwrap_or_else(|| panic!("values.yaml has no {path}"));
        }
        v.clone()
    }

    fn truthy(&self, cond: &str) -> bool {
        if let Some(c) = cond.strip_prefix("not ") {
            return !self.truthy(c.trim());
        }
        match self.lookup(cond) {
            Value::Null => false,
            Value::Bool(b) => b,
            Value::String(s) => !s.is_empty(),
            Value::Number(n) => n.as_f64() != Some(0.0),
            Value::Sequence(s) => !s.is_empty(),
            Value::Mapping(m) => !m.is_empty(),
            Value::Tagged(_) => true,
        }
    }

    fn expr(&self, e: &str) -> String {
        let mut parts = e.split('|').map(str::trim);
        let head = parts.next().unwrap_or_default();
        let mut out = if let Some(p) = head.strip_prefix("toYaml ") {
            serde_yaml_ng::to_string(&self.lookup(p.trim())).unwrap().trim_end().to_string()
        } else if let Some(f) = head.strip_prefix(".Files.Get ") {
            let rel = f.trim().trim_matches('"');
            std::fs::read_to_string(chart_dir().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
        } else {
            match self.lookup(head) {
                Value::String(s) => s,
                Value::Bool(b) => b.to_string(),
                Value::Number(n) => n.to_string(),
                other => panic!("{head} is not a scalar: {other:?}"),
            }
        };
        for f in parts {
            let mut w = f.split_whitespace();
            out = match (w.next(), w.next()) {
                (Some("quote"), None) => format!("{out:?}"),
                (Some(op @ ("indent" | "nindent")), Some(n)) => {
                    let pad = " ".repeat(n.parse().unwrap());
                    let body = out.lines().map(|l| format!("{pad}{l}")).collect::<Vec<_>>().join("\n");
                    if op == "nindent" { format!("\n{body}") } else { body }
                }
                _ => panic!("unsupported template function `{f}`"),
            };
        }
        out
    }

    fn render(&self, nodes: &[Node], out: &mut String) {
        for n in nodes {
            match n {
                Node::Text(t) => out.push_str(t),
                Node::Expr(e) => out.push_str(&self.expr(e)),
                Node::If { cond, then, otherwise } => {
                    self.render(if self.truthy(cond) { then } else { otherwise }, out)
                }
            }
        }
    }
}

fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (_, Value::Null) => {}
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// Renders every template with values.yaml merged with `overrides`: template file name → text.
fn render_chart(overrides: &str) -> BTreeMap<String, String> {
    let mut values: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap()).unwrap();
    merge(&mut values, &serde_yaml_ng::from_str(overrides).unwrap());
    let ctx = Ctx { values, namespace: NAMESPACE.into() };
    let mut out = BTreeMap::new();
    let mut entries: Vec<_> =
        std::fs::read_dir(chart_dir().join("templates")).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let src = std::fs::read_to_string(&path).unwrap();
        let (nodes, end) = parse(&mut tokenize(&src).into_iter().peekable());
        assert!(end.is_none(), "{name}: unbalanced {{{{ end }}}}");
        let mut text = String::new();
        ctx.render(&nodes, &mut text);
        out.insert(name, text);
    }
    out
}

/// The YAML documents of a file, without empty ones.
fn documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("invalid YAML: {e}\n{text}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// What the plain manifests are rendered with: the defaults, plus the optional objects a user without
/// Helm may apply file by file.
const MANIFEST_VALUES: &str = "createNamespace: true\nserviceMonitor: {enabled: true}\n";

// ------------------------------------------------------------------------------- chart = manifests

#[test]
fn manifests_are_the_rendered_chart() {
    let rendered = render_chart(MANIFEST_VALUES);
    let dir = deploy_dir().join("manifests");
    if std::env::var_os("CKPTD_BLESS_MANIFESTS").is_some() {
        for (name, text) in &rendered {
            let path = dir.join(name);
            if documents(text).is_empty() {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let header = format!(
                "# Rendered from deploy/helm/ckptd/templates/{name} (namespace {NAMESPACE}; values.yaml with createNamespace and serviceMonitor.enabled on).\n\
                 # Do not edit: change the chart and run CKPTD_BLESS_MANIFESTS=1 cargo test -p ckptd --test webhook_deploy\n"
            );
            std::fs::write(&path, format!("{header}{}\n", text.trim())).unwrap();
        }
    }
    let mut on_disk = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = rendered.get(&name).unwrap_or_else(|| panic!("manifests/{name} has no template in the chart"));
        let disk = std::fs::read_to_string(&path).unwrap();
        assert_eq!(documents(&disk), documents(text), "manifests/{name} differs from the chart: re-render it");
        on_disk.insert(name);
    }
    for (name, text) in &rendered {
        assert!(documents(text).is_empty() || on_disk.contains(name), "templates/{name} has no manifests/{name}");
    }
}

#[test]
fn chart_switches_render_what_they_say() {
    let all = |r: &BTreeMap<String, String>| r.values().flat_map(|t| documents(t)).collect::<Vec<_>>();
    let kinds = |docs: &[Value]| docs.iter().map(|d| d["kind"].as_str().unwrap().to_string()).collect::<BTreeSet<_>>();

    let defaults = all(&render_chart(""));
    let k = kinds(&defaults);
    assert!(k.contains("Certificate") && k.contains("MutatingWebhookConfiguration"));
    assert!(!k.contains("ServiceMonitor") && !k.contains("Namespace"), "opt-in objects are off by default");

    let no_cm = all(&render_chart("certManager: {enabled: false}\nwebhook: {caBundle: Q0E=}\n"));
    assert!(!kinds(&no_cm).contains("Certificate") && !kinds(&no_cm).contains("Issuer"));
    let mwc: MutatingWebhookConfiguration =
        typed(no_cm.iter().find(|d| d["kind"] == "MutatingWebhookConfiguration").unwrap());
    for hook in mwc.webhooks.clone().unwrap() {
        assert_eq!(hook.client_config.ca_bundle.as_ref().map(|b| b.0.clone()), Some(b"CA".to_vec()), "{}", hook.name);
    }
    assert!(mwc.metadata.annotations.is_none_or(|a| !a.contains_key("cert-manager.io/inject-ca-from")));

    let no_iso = all(&render_chart("isolator: {enabled: false}\nserviceMonitor: {enabled: true}\n"));
    assert!(no_iso.iter().all(|d| !d["metadata"]["name"].as_str().unwrap().contains("isolator")));
    let cm: ConfigMap =
        typed(no_iso.iter().find(|d| d["metadata"]["name"] == "ckptd-webhook" && d["kind"] == "ConfigMap").unwrap());
    let cfg = ckptd::webhook::Config::from_yaml("img:1", &cm.data.unwrap()["config.yaml"]).unwrap();
    assert!(cfg.file.isolator.is_none());

    assert!(!k.contains("NetworkPolicy"), "no NetworkPolicy without the API server's addresses");
    let fenced = all(&render_chart(
        "webhook: {networkPolicy: {apiServerPeers: [{ipBlock: {cidr: 10.0.0.10/32}}, {ipBlock: {cidr: 10.0.0.11/32}}]}}\n",
    ));
    let policies: Vec<&Value> = fenced.iter().filter(|d| d["kind"] == "NetworkPolicy").collect();
    assert_eq!(policies.len(), 1);
    let policy = policies[0];
    let spec = &policy["spec"];
    let webhook: Deployment =
        typed(fenced.iter().find(|d| d["metadata"]["name"] == "ckptd-webhook" && d["kind"] == "Deployment").unwrap());
    let pod_labels = webhook.spec.unwrap().template.metadata.unwrap().labels.unwrap();
    let selector = spec["podSelector"]["matchLabels"].as_mapping().unwrap();
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(pod_labels.get(k.as_str().unwrap()).map(String::as_str), v.as_str(), "selects the webhook's pods");
    }
    assert_eq!(spec["policyTypes"], serde_yaml_ng::from_str::<Value>("[Ingress]").unwrap());
    let ingress = spec["ingress"].as_sequence().unwrap();
    assert_eq!(ingress.len(), 1, "one rule: the API server to the webhook port");
    let cidrs: Vec<&str> =
        ingress[0]["from"].as_sequence().unwrap().iter().map(|p| p["ipBlock"]["cidr"].as_str().unwrap()).collect();
    assert_eq!(cidrs, ["10.0.0.10/32", "10.0.0.11/32"]);
    assert_eq!(ingress[0]["ports"], serde_yaml_ng::from_str::<Value>("[{port: 8443, protocol: TCP}]").unwrap());
    let container_port = webhook_port(&fenced);
    assert_eq!(container_port, 8443, "the policy's port is the webhook container's");

    let tuned =
        all(&render_chart("agent: {store: \"s3://b/p\", nativeSidecar: false, slots: 3}\nisolator: {dryRun: true}\n"));
    let cm: ConfigMap =
        typed(tuned.iter().find(|d| d["metadata"]["name"] == "ckptd-webhook" && d["kind"] == "ConfigMap").unwrap());
    let cfg = ckptd::webhook::Config::from_yaml("img:1", &cm.data.unwrap()["config.yaml"]).unwrap();
    assert_eq!((cfg.file.store.as_deref(), cfg.file.native_sidecar, cfg.file.slots), (Some("s3://b/p"), false, 3));
    let iso: Deployment =
        typed(tuned.iter().find(|d| d["metadata"]["name"] == "ckptd-isolator" && d["kind"] == "Deployment").unwrap());
    assert!(container_args(&iso).contains(&"--dry-run".to_string()));

    // The alert intake: off by default (no flag, no port), on with its port in the flag, the
    // container and the Service.
    let intake = |docs: &[Value]| {
        let iso: Deployment = typed(
            docs.iter().find(|d| d["metadata"]["name"] == "ckptd-isolator" && d["kind"] == "Deployment").unwrap(),
        );
        let svc: Service =
            typed(docs.iter().find(|d| d["metadata"]["name"] == "ckptd-isolator" && d["kind"] == "Service").unwrap());
        let args = container_args(&iso);
        let c = iso.spec.unwrap().template.spec.unwrap().containers.remove(0);
        let cport = c.ports.iter().flatten().find(|p| p.name.as_deref() == Some("alerts")).map(|p| p.container_port);
        let sport = svc.spec.unwrap().ports.into_iter().flatten().find(|p| p.name.as_deref() == Some("alerts"));
        let flag = args.iter().find_map(|a| a.strip_prefix("--alerts-addr=")).map(String::from);
        (args, flag, cport, sport)
    };
    let (_, flag, cport, sport) = intake(&defaults);
    assert!(flag.is_none() && cport.is_none() && sport.is_none(), "the alert intake is off by default");
    let on = all(&render_chart("isolator: {alerts: {enabled: true, port: 7555}}\n"));
    let (args, flag, cport, sport) = intake(&on);
    assert_eq!(flag.as_deref(), Some("0.0.0.0:7555"));
    assert_eq!(cport, Some(7555));
    let sport = sport.expect("a Service port for the intake");
    assert_eq!((sport.port, sport.target_port), (7555, Some(IntOrString::String("alerts".into()))));
    let cmd = ckptd::isolator::IsolatorArgs::augment_args(Command::new("isolator").no_binary_name(true));
    cmd.try_get_matches_from(&args[1..]).unwrap_or_else(|e| panic!("ckptd isolator rejects {args:?}: {e}"));
}

/// The ConfigMap and key behind `path` in the isolator's container: the mount whose directory
/// holds it, and that mount's volume (read-only, from a ConfigMap).
fn mounted_configmap(d: &Deployment, path: &str) -> Option<(String, String)> {
    let spec = d.spec.as_ref()?.template.spec.as_ref()?;
    spec.containers[0].volume_mounts.iter().flatten().find_map(|m| {
        let key = path.strip_prefix(&format!("{}/", m.mount_path))?;
        assert_eq!(m.read_only, Some(true), "{} is mounted read-only", m.mount_path);
        let v = spec.volumes.iter().flatten().find(|v| v.name == m.name)?;
        Some((v.config_map.as_ref()?.name.clone(), key.to_string()))
    })
}

#[test]
fn the_isolators_hook_ca_and_alert_mapping_are_configmaps_its_flags_name() {
    use ckptd::isolator::IsolatorArgs;
    use clap::FromArgMatches;
    let isolator = |overrides: &str| -> Deployment {
        let docs: Vec<Value> = render_chart(overrides).values().flat_map(|t| documents(t)).collect();
        typed(docs.iter().find(|d| d["metadata"]["name"] == "ckptd-isolator" && d["kind"] == "Deployment").unwrap())
    };
    let parsed = |d: &Deployment| -> IsolatorArgs {
        let args = container_args(d);
        let cmd = IsolatorArgs::augment_args(Command::new("isolator").no_binary_name(true));
        let m = cmd.try_get_matches_from(&args[1..]).unwrap_or_else(|e| panic!("ckptd isolator rejects {args:?}: {e}"));
        IsolatorArgs::from_arg_matches(&m).unwrap()
    };
    let volumes = |d: &Deployment| -> BTreeSet<String> {
        let spec = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        spec.volumes.iter().flatten().map(|v| v.name.clone()).collect()
    };

    let d = isolator("");
    let a = parsed(&d);
    assert_eq!((a.hook_ca, a.alert_mapping), (None, None), "both are off by default");
    assert!(!volumes(&d).contains("hook-ca") && !volumes(&d).contains("alert-mapping"));

    // A mapping without the intake is left out: --alert-mapping needs --alerts-addr.
    let d = isolator("isolator: {alerts: {mapping: {configMap: lingjun-alerts}}}\n");
    assert_eq!(parsed(&d).alert_mapping, None);
    assert!(!volumes(&d).contains("alert-mapping"));

    let d = isolator(
        "isolator: {hookCA: {configMap: corp-ca}, alerts: {enabled: true, mapping: {configMap: lingjun-alerts, key: rules.toml}}}\n",
    );
    let a = parsed(&d);
    let ca = a.hook_ca.expect("--hook-ca");
    assert_eq!(mounted_configmap(&d, ca.to_str().unwrap()), Some(("corp-ca".into(), "ca.crt".into())));
    let mapping = a.alert_mapping.expect("--alert-mapping");
    assert_eq!(mounted_configmap(&d, mapping.to_str().unwrap()), Some(("lingjun-alerts".into(), "rules.toml".into())));
    let d = isolator("isolator: {alerts: {enabled: true, mapping: {configMap: lingjun-alerts}}}\n");
    let mapping = parsed(&d).alert_mapping.expect("--alert-mapping");
    assert_eq!(
        mounted_configmap(&d, mapping.to_str().unwrap()),
        Some(("lingjun-alerts".into(), "mapping.yaml".into()))
    );
}

// ------------------------------------------------------------------------------- typed manifests

/// The webhook container's port.
fn webhook_port(docs: &[Value]) -> i32 {
    let d: Deployment =
        typed(docs.iter().find(|d| d["metadata"]["name"] == "ckptd-webhook" && d["kind"] == "Deployment").unwrap());
    d.spec.unwrap().template.spec.unwrap().containers[0].ports.as_ref().unwrap()[0].container_port
}

fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> T {
    serde_yaml_ng::from_value(v.clone()).unwrap_or_else(|e| {
        panic!("{} {}: {e}", v["kind"].as_str().unwrap_or("?"), v["metadata"]["name"].as_str().unwrap_or("?"))
    })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Custom<S> {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: S,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct IssuerSpec {
    self_signed: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CertificateSpec {
    secret_name: String,
    dns_names: Vec<String>,
    issuer_ref: BTreeMap<String, String>,
    duration: String,
    renew_before: String,
    private_key: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServiceMonitorSpec {
    selector: LabelSelector,
    endpoints: Vec<Endpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PodMonitorSpec {
    namespace_selector: BTreeMap<String, bool>,
    selector: LabelSelector,
    pod_metrics_endpoints: Vec<Endpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Endpoint {
    port: String,
    interval: String,
}

/// Every object of deploy/manifests, typed.
#[derive(Default)]
struct Objects {
    deployments: BTreeMap<String, Deployment>,
    services: BTreeMap<String, Service>,
    config_maps: BTreeMap<String, ConfigMap>,
    cluster_roles: BTreeMap<String, ClusterRole>,
    roles: BTreeMap<String, Role>,
    cluster_role_bindings: BTreeMap<String, ClusterRoleBinding>,
    role_bindings: BTreeMap<String, RoleBinding>,
    webhooks: Vec<MutatingWebhookConfiguration>,
    certificates: BTreeMap<String, CertificateSpec>,
    service_monitors: Vec<ServiceMonitorSpec>,
    pod_monitors: Vec<PodMonitorSpec>,
    namespaces: usize,
}

fn load_manifests() -> Objects {
    let mut o = Objects::default();
    let mut files: Vec<_> =
        std::fs::read_dir(deploy_dir().join("manifests")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(!files.is_empty());
    for path in files {
        assert_eq!(path.extension().and_then(|e| e.to_str()), Some("yaml"), "{}", path.display());
        for doc in documents(&std::fs::read_to_string(&path).unwrap()) {
            let name = doc["metadata"]["name"].as_str().unwrap_or_default().to_string();
            let ns = doc["metadata"]["namespace"].as_str();
            let cluster_scoped = ["Namespace", "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"];
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            if cluster_scoped.contains(&kind.as_str()) {
                assert!(ns.is_none(), "{kind} {name} is cluster-scoped");
            } else {
                assert_eq!(ns, Some(NAMESPACE), "{kind} {name} in {}", path.display());
            }
            match kind.as_str() {
                "Namespace" => {
                    let _: Namespace = typed(&doc);
                    o.namespaces += 1;
                }
                "ServiceAccount" => {
                    let _: ServiceAccount = typed(&doc);
                }
                "PodDisruptionBudget" => {
                    let _: PodDisruptionBudget = typed(&doc);
                }
                "Deployment" => {
                    o.deployments.insert(name, typed(&doc));
                }
                "Service" => {
                    o.services.insert(name, typed(&doc));
                }
                "ConfigMap" => {
                    o.config_maps.insert(name, typed(&doc));
                }
                "ClusterRole" => {
                    o.cluster_roles.insert(name, typed(&doc));
                }
                "Role" => {
                    o.roles.insert(name, typed(&doc));
                }
                "ClusterRoleBinding" => {
                    o.cluster_role_bindings.insert(name, typed(&doc));
                }
                "RoleBinding" => {
                    o.role_bindings.insert(name, typed(&doc));
                }
                "MutatingWebhookConfiguration" => o.webhooks.push(typed(&doc)),
                "Issuer" => {
                    let c: Custom<IssuerSpec> = typed(&doc);
                    assert_eq!(c.api_version, "cert-manager.io/v1");
                    assert!(c.spec.self_signed.is_empty() && c.kind == "Issuer");
                }
                "Certificate" => {
                    let c: Custom<CertificateSpec> = typed(&doc);
                    assert_eq!(c.api_version, "cert-manager.io/v1");
                    o.certificates.insert(c.metadata.name.unwrap_or_default(), c.spec);
                }
                "ServiceMonitor" | "PodMonitor" => {
                    assert_eq!(doc["apiVersion"], "monitoring.coreos.com/v1");
                    if kind == "ServiceMonitor" {
                        o.service_monitors.push(typed::<Custom<ServiceMonitorSpec>>(&doc).spec);
                    } else {
                        o.pod_monitors.push(typed::<Custom<PodMonitorSpec>>(&doc).spec);
                    }
                }
                other => panic!("{}: unexpected kind {other}", path.display()),
            }
        }
    }
    o
}

fn container_args(d: &Deployment) -> Vec<String> {
    d.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0].args.clone().unwrap_or_default()
}

fn flag(args: &[String], name: &str) -> String {
    args.iter()
        .find_map(|a| a.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in {args:?}"))
        .to_string()
}

fn rules(r: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    r.iter()
        .flat_map(|r| {
            let groups = r.api_groups.clone().unwrap_or_default();
            let resources = r.resources.clone().unwrap_or_default();
            let verbs = r.verbs.clone();
            assert!(r.resource_names.is_none() && r.non_resource_urls.is_none());
            groups.into_iter().flat_map(move |g| {
                let verbs = verbs.clone();
                resources.clone().into_iter().flat_map(move |res| {
                    let g = g.clone();
                    verbs.clone().into_iter().map(move |v| (g.clone(), res.clone(), v))
                })
            })
        })
        .collect()
}

#[test]
fn webhook_configuration_is_safe_and_points_at_the_webhook() {
    let o = load_manifests();
    assert_eq!(o.namespaces, 1);
    assert_eq!(o.webhooks.len(), 1);
    let hooks = o.webhooks[0].webhooks.clone().unwrap();
    let names: Vec<&str> = hooks.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["inject.ckptd.io", "templates.inject.ckptd.io"]);
    for h in &hooks {
        assert_eq!(h.admission_review_versions, ["v1"], "{}", h.name);
        assert_eq!(h.failure_policy.as_deref(), Some("Fail"), "{}", h.name);
        assert_eq!(h.side_effects, "None", "{}", h.name);
        assert_eq!(h.match_policy.as_deref(), Some("Equivalent"), "{}", h.name);
        let timeout = h.timeout_seconds.expect("timeoutSeconds set explicitly");
        assert!((1..=10).contains(&timeout), "a pod creation must not wait long: {timeout}");
        let sel = h.object_selector.as_ref().and_then(|s| s.match_labels.clone()).unwrap();
        assert_eq!(sel.get("ckptd.io/inject").map(String::as_str), Some("true"), "{}", h.name);
        let ns_sel = h.namespace_selector.as_ref().and_then(|s| s.match_expressions.clone()).unwrap();
        let excluded: Vec<String> = ns_sel
            .iter()
            .filter(|e| e.key == "kubernetes.io/metadata.name" && e.operator == "NotIn")
            .flat_map(|e| e.values.clone().unwrap_or_default())
            .collect();
        assert!(excluded.contains(&"kube-system".into()) && excluded.contains(&NAMESPACE.into()), "{excluded:?}");
        assert_eq!(h.client_config.service.as_ref().map(|s| s.name.as_str()), Some("ckptd-webhook"));
        for rule in h.rules.iter().flatten() {
            assert_eq!(rule.operations.as_deref(), Some(&["CREATE".to_string()][..]), "{}", h.name);
        }
    }
    // The pod hook runs again after a later webhook (a pod-identity one) changed the pod, which
    // `mutate` answers with at most the identity the agent lacks; the job hook has no reason to.
    let reinvocation: Vec<Option<&str>> = hooks.iter().map(|h| h.reinvocation_policy.as_deref()).collect();
    assert_eq!(reinvocation, [Some("IfNeeded"), Some("Never")]);
    let h = &hooks[0];
    let rule = &h.rules.as_ref().unwrap()[0];
    assert_eq!(rule.resources.as_deref(), Some(&["pods".to_string()][..]));
    assert_eq!(rule.api_groups.as_deref(), Some(&[String::new()][..]));
    // The job kinds the second hook intercepts are exactly those the webhook labels.
    let jobs: BTreeSet<(String, String)> = hooks[1]
        .rules
        .iter()
        .flatten()
        .flat_map(|r| {
            let g = r.api_groups.clone().unwrap_or_default().remove(0);
            r.resources.clone().unwrap_or_default().into_iter().map(move |res| (g.clone(), res))
        })
        .collect();
    let kinds: BTreeSet<(String, String)> = ckptd::webhook::templates::JOB_KINDS
        .iter()
        .map(|(g, k)| (g.to_string(), format!("{}s", k.to_lowercase())))
        .collect();
    assert_eq!(jobs, kinds);

    // clientConfig → Service → container port → --listen.
    let svc_ref = h.client_config.service.as_ref().unwrap();
    assert_eq!((svc_ref.path.as_deref(), svc_ref.namespace.as_str()), (Some("/mutate"), NAMESPACE));
    let svc = &o.services[&svc_ref.name];
    let port =
        svc.spec.as_ref().unwrap().ports.as_ref().unwrap().iter().find(|p| Some(p.port) == svc_ref.port).unwrap();
    let IntOrString::String(target) = port.target_port.clone().unwrap() else { panic!("named targetPort") };
    let dep = &o.deployments["ckptd-webhook"];
    let pod = dep.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    let cport = c.ports.as_ref().unwrap().iter().find(|p| p.name.as_deref() == Some(target.as_str())).unwrap();
    let args = container_args(dep);
    assert!(flag(&args, "--listen").ends_with(&format!(":{}", cport.container_port)));
    for (probe, path) in [(&c.readiness_probe, "/readyz"), (&c.liveness_probe, "/healthz")] {
        let get = probe.as_ref().and_then(|p| p.http_get.clone()).unwrap();
        assert_eq!((get.path.as_deref(), get.scheme.as_deref()), (Some(path), Some("HTTPS")));
    }
    assert_eq!(svc.spec.as_ref().unwrap().selector, dep.spec.as_ref().unwrap().selector.match_labels);

    // The Deployment's flags are ones `ckptd webhook` accepts.
    let cmd = ckptd::webhook::WebhookArgs::augment_args(Command::new("webhook").no_binary_name(true));
    assert_eq!(args[0], "webhook");
    cmd.try_get_matches_from(&args[1..]).unwrap_or_else(|e| panic!("ckptd webhook rejects {args:?}: {e}"));

    // The TLS files come from the Secret the Certificate writes, the config from the ConfigMap.
    let mount_of = |file: &str| {
        let m = c.volume_mounts.iter().flatten().find(|m| file.starts_with(&format!("{}/", m.mount_path))).unwrap();
        pod.volumes.iter().flatten().find(|v| v.name == m.name).unwrap().clone()
    };
    let tls = mount_of(&flag(&args, "--tls-cert"));
    assert_eq!(mount_of(&flag(&args, "--tls-key")).name, tls.name);
    let secret = tls.secret.unwrap().secret_name.unwrap();
    let cert = &o.certificates[&svc_ref.name];
    assert_eq!(cert.secret_name, secret);
    assert!(cert.dns_names.contains(&format!("{}.{NAMESPACE}.svc", svc_ref.name)), "the name the API server dials");
    assert_eq!(cert.issuer_ref.get("name").map(String::as_str), Some("ckptd-selfsigned"));
    assert!(!cert.duration.is_empty() && !cert.renew_before.is_empty());
    assert_eq!(cert.private_key.get("rotationPolicy").and_then(Value::as_str), Some("Always"));
    let ann = o.webhooks[0].metadata.annotations.clone().unwrap();
    assert_eq!(ann["cert-manager.io/inject-ca-from"], format!("{NAMESPACE}/{}", svc_ref.name));
    let cfg_file = flag(&args, "--config");
    let cm_name = mount_of(&cfg_file).config_map.unwrap().name;
    let key = Path::new(&cfg_file).file_name().unwrap().to_str().unwrap();
    let yaml = &o.config_maps[&cm_name].data.as_ref().unwrap()[key];
    let cfg =
        ckptd::webhook::Config::from_yaml(flag(&args, "--agent-image"), yaml).expect("the chart's config is valid");
    assert_eq!(cfg.file.isolator.as_deref(), Some("https://ckptd-isolator.ckptd.svc:7443"));
    assert!(pod.automount_service_account_token == Some(false), "the webhook needs no API access");
    assert_eq!(dep.spec.as_ref().unwrap().replicas, Some(2));
}

#[test]
fn isolator_has_exactly_its_rbac_and_its_ports() {
    let o = load_manifests();
    let s = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    let expected: BTreeSet<_> = [
        s("", "nodes", "get"),
        s("", "nodes", "list"),
        s("", "nodes", "patch"),
        s("", "pods", "get"),
        s("", "pods", "list"),
        s("", "pods", "delete"),
        s("batch", "jobs", "get"),
        s("", "events", "create"),
        s("events.k8s.io", "events", "create"),
    ]
    .into();
    assert_eq!(o.cluster_roles.len(), 1, "only the isolator has a ClusterRole");
    assert_eq!(rules(o.cluster_roles["ckptd-isolator"].rules.as_deref().unwrap()), expected);
    let lease: BTreeSet<_> = [
        s("coordination.k8s.io", "leases", "get"),
        s("coordination.k8s.io", "leases", "create"),
        s("coordination.k8s.io", "leases", "update"),
        s("", "configmaps", "get"),
        s("", "configmaps", "list"),
        s("", "configmaps", "create"),
        s("", "configmaps", "patch"),
    ]
    .into();
    assert_eq!(o.roles.len(), 1);
    assert_eq!(rules(o.roles["ckptd-isolator-leader-election"].rules.as_deref().unwrap()), lease);
    let subject = |s: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        let s = s.as_ref().unwrap();
        assert_eq!(s.len(), 1);
        (s[0].kind.clone(), s[0].name.clone(), s[0].namespace.clone())
    };
    let sa = ("ServiceAccount".to_string(), "ckptd-isolator".to_string(), Some(NAMESPACE.to_string()));
    let crb = &o.cluster_role_bindings["ckptd-isolator"];
    assert_eq!((crb.role_ref.kind.as_str(), crb.role_ref.name.as_str()), ("ClusterRole", "ckptd-isolator"));
    assert_eq!(subject(&crb.subjects), sa);
    let rb = &o.role_bindings["ckptd-isolator-leader-election"];
    assert_eq!((rb.role_ref.kind.as_str(), rb.role_ref.name.as_str()), ("Role", "ckptd-isolator-leader-election"));
    assert_eq!(subject(&rb.subjects), sa);

    let dep = &o.deployments["ckptd-isolator"];
    assert_eq!(dep.spec.as_ref().unwrap().replicas, Some(2));
    assert_eq!(
        dep.spec.as_ref().unwrap().template.spec.as_ref().unwrap().service_account_name.as_deref(),
        Some("ckptd-isolator")
    );
    let args = container_args(dep);
    assert_eq!(args[0], "isolator");
    assert_eq!(flag(&args, "--listen"), "0.0.0.0:7443");
    assert_eq!(flag(&args, "--metrics-addr"), "0.0.0.0:9102");
    assert_eq!(flag(&args, "--lease-name"), "ckptd-isolator");
    assert_eq!(flag(&args, "--lease-namespace"), NAMESPACE);
    assert!(["NoSchedule", "NoExecute"].contains(&flag(&args, "--taint-effect").as_str()));
    // Only the Lease holder answers /readyz with 200, so only it receives the Service's traffic. The
    // probe uses the port --metrics-addr serves, where the isolator answers /readyz.
    let c = &dep.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
    let metrics_port = c.ports.iter().flatten().find(|p| p.name.as_deref() == Some("metrics")).unwrap();
    assert!(flag(&args, "--metrics-addr").ends_with(&format!(":{}", metrics_port.container_port)));
    let get = c.readiness_probe.as_ref().and_then(|p| p.http_get.clone()).expect("an httpGet readiness probe");
    assert_eq!(get.path.as_deref(), Some("/readyz"));
    assert_eq!(get.port, IntOrString::String("metrics".into()));
    assert!(get.scheme.is_none_or(|s| s == "HTTP"), "the metrics port is plain HTTP");
    for f in
        ["--tls-cert", "--tls-key", "--token-file", "--max-isolated", "--max-isolated-fraction", "--isolation-window"]
    {
        flag(&args, f);
    }
    let ports: BTreeMap<String, i32> = o.services["ckptd-isolator"]
        .spec
        .as_ref()
        .unwrap()
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap(), p.port))
        .collect();
    assert_eq!(ports, BTreeMap::from([("grpc".into(), 7443), ("metrics".into(), 9102)]));
    assert_eq!(o.certificates["ckptd-isolator"].secret_name, "ckptd-isolator-tls");
}

#[test]
fn monitoring_and_dashboard_cover_the_metrics_contract() {
    let o = load_manifests();
    assert_eq!(o.service_monitors.len(), 1);
    let sm = &o.service_monitors[0];
    assert_eq!(sm.endpoints[0].port, "metrics");
    assert!(!sm.endpoints[0].interval.is_empty());
    let iso = &o.services["ckptd-isolator"];
    assert_eq!(sm.selector.match_labels, iso.metadata.labels, "the ServiceMonitor selects the isolator Service");
    assert_eq!(o.pod_monitors.len(), 1);
    let pm = &o.pod_monitors[0];
    assert_eq!(
        pm.pod_metrics_endpoints[0].port,
        ckptd::webhook::mutate::METRICS_PORT_NAME,
        "the port the webhook injects"
    );
    assert_eq!(pm.namespace_selector.get("any"), Some(&true));
    let sel = pm.selector.match_labels.clone().unwrap();
    assert_eq!(sel.get(ckptd::webhook::annotations::LABEL_INJECT).map(String::as_str), Some("true"));

    let file = std::fs::read_to_string(chart_dir().join("dashboards/ckptd.json")).unwrap();
    let cm = &o.config_maps["ckptd-dashboard"];
    assert_eq!(cm.metadata.labels.as_ref().unwrap()["grafana_dashboard"], "1");
    let embedded: serde_json::Value = serde_json::from_str(&cm.data.as_ref().unwrap()["ckptd.json"]).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&file).unwrap();
    assert_eq!(embedded, dash);
    let mut used = BTreeSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("ckptd_") {
                let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                rest = &rest[i + name.len()..];
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .fold(name.clone(), |n, s| n.strip_suffix(s).map(str::to_string).unwrap_or(n));
                used.insert(base);
            }
        }
    }
    let contract: BTreeSet<String> = [
        "ckptd_save_stall_seconds",
        "ckptd_persist_bytes_total",
        "ckptd_persist_seconds",
        "ckptd_persist_queue_depth",
        "ckptd_last_durable_step",
        "ckptd_health_findings_total",
        "ckptd_isolator_job_state",
        "ckptd_isolator_generation",
        "ckptd_isolator_latest_global_step",
        "ckptd_isolator_isolated_nodes",
        "ckptd_isolator_stragglers",
    ]
    .map(String::from)
    .into();
    assert_eq!(used, contract, "the dashboard must chart every contract metric and no other ckptd_ name");
}
