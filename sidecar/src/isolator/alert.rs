//! [`Alert`]: what the alert intake accepts, parsed from the two payloads it serves, before any
//! mapping. Pure and total: every input either parses into alerts or yields a one-line reason that
//! the HTTP shell returns with status 400.
//!
//! - Alertmanager's webhook payload, version 4: `alerts[]`, each with `status` (`firing` or
//!   `resolved`), `labels` (with `alertname`), `annotations` and `fingerprint`.
//! - Alibaba Cloud system events, in either shape they are delivered in: the CloudMonitor/ECS
//!   notification (`product`, `name` = `Instance:SystemFailure.Reboot:Executing`, `resourceId` as an
//!   ARN, `content{eventType, eventStatus, resourceId}`; keys in camel case or, as some products
//!   send them, capitalised) or the EventBridge CloudEvent (`specversion`, `source` = `acs.ecs`,
//!   `type` = `ecs:Instance:SystemFailure.Reboot`, `subject` as an ARN, `data{eventType,
//!   eventStatus, resourceId}`).
//!
//! Both become the same [`Alert`]: a name, a set of labels the mapping matches on, whether it
//! fires, where it happened ([`NodeRef`]) and one line of evidence.

use std::collections::BTreeMap;

use serde_json::Value;

/// Most alerts accepted in one payload (Alertmanager's `max_alerts` should stay below it).
pub const MAX_ALERTS: usize = 1000;
/// Longest label value or name kept from a payload.
const MAX_VALUE: usize = 256;
/// Most labels kept per alert.
const MAX_LABELS: usize = 64;
/// Longest evidence line.
const MAX_EVIDENCE: usize = 1024;

/// Who sent an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    /// A Prometheus Alertmanager webhook (DCGM exporter, node-problem-detector, ... rules).
    Alertmanager,
    /// An Alibaba Cloud system event (CloudMonitor or EventBridge).
    Aliyun,
}

impl Origin {
    /// The name used as the finding's source, in logs, Events and the mapping file.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Alertmanager => "alertmanager",
            Origin::Aliyun => "aliyun",
        }
    }
}

/// Where an alert says the fault is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeRef {
    /// A Kubernetes node name (an Alertmanager label).
    Name(String),
    /// A cloud instance id (`i-...`), found among the nodes by `spec.providerID`.
    Instance(String),
}

/// One alert, as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    /// Who sent it.
    pub origin: Origin,
    /// Alertmanager's `alertname`, or the Aliyun event code (`SystemFailure.Reboot`).
    pub name: String,
    /// What the mapping matches on: Alertmanager's labels as sent; for Aliyun events `product`
    /// (lower case), `event`, `status`, `resource_type`, `instance_id`, `instance_name`, `region`,
    /// `level`.
    pub labels: BTreeMap<String, String>,
    /// Firing (act on it) or resolved (record it only).
    pub firing: bool,
    /// The alert's identity: Alertmanager's fingerprint, the Aliyun event id.
    pub id: String,
    /// One line that says what was reported.
    pub evidence: String,
}

fn cap(s: &str, max: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(max).collect()
}

/// Alertmanager's payload, version 4. Unknown fields are allowed: Alertmanager adds fields.
#[derive(Debug, serde::Deserialize)]
struct AmPayload {
    version: Option<String>,
    alerts: Vec<AmAlert>,
}

#[derive(Debug, serde::Deserialize)]
struct AmAlert {
    status: String,
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    fingerprint: String,
}

fn json(body: &[u8]) -> Result<Value, String> {
    if body.is_empty() {
        return Err("empty body: send the JSON payload".into());
    }
    serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))
}

/// Parses an Alertmanager webhook payload (version 4).
pub fn parse_alertmanager(body: &[u8]) -> Result<Vec<Alert>, String> {
    let v = json(body)?;
    let p: AmPayload = serde_json::from_value(v).map_err(|e| format!("not an Alertmanager webhook payload: {e}"))?;
    if let Some(version) = &p.version
        && version != "4"
    {
        return Err(format!("Alertmanager payload version `{}` is not supported (expected \"4\")", cap(version, 16)));
    }
    if p.alerts.is_empty() {
        return Err("`alerts` is empty".into());
    }
    if p.alerts.len() > MAX_ALERTS {
        return Err(format!("{} alerts in one payload, at most {MAX_ALERTS}: lower max_alerts", p.alerts.len()));
    }
    p.alerts
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            let firing = match a.status.as_str() {
                "firing" => true,
                "resolved" => false,
                s => return Err(format!("alerts[{i}].status `{}` is neither firing nor resolved", cap(s, 32))),
            };
            if a.labels.len() > MAX_LABELS {
                return Err(format!("alerts[{i}] has {} labels, at most {MAX_LABELS}", a.labels.len()));
            }
            let name = match a.labels.get("alertname") {
                Some(n) if !n.is_empty() => cap(n, MAX_VALUE),
                _ => return Err(format!("alerts[{i}] has no `alertname` label")),
            };
            let labels: BTreeMap<String, String> =
                a.labels.iter().map(|(k, v)| (cap(k, MAX_VALUE), cap(v, MAX_VALUE))).collect();
            let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let text = a.annotations.get("summary").or_else(|| a.annotations.get("description"));
            let mut evidence =
                format!("alertmanager {}: {}", if firing { "firing" } else { "resolved" }, shown.join(" "));
            if let Some(t) = text {
                evidence.push_str(": ");
                evidence.push_str(t);
            }
            Ok(Alert {
                origin: Origin::Alertmanager,
                name,
                labels,
                firing,
                id: cap(&a.fingerprint, 64),
                evidence: cap(&evidence, MAX_EVIDENCE),
            })
        })
        .collect()
}

/// A string field under its camel-case key or its capitalised twin (`product`, `Product`).
fn field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    let mut upper = key.to_string();
    if let Some(f) = upper.get_mut(..1) {
        f.make_ascii_uppercase();
    }
    v.get(key).or_else(|| v.get(&upper)).and_then(Value::as_str).filter(|s| !s.is_empty())
}

fn object<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    let mut upper = key.to_string();
    if let Some(f) = upper.get_mut(..1) {
        f.make_ascii_uppercase();
    }
    v.get(key).or_else(|| v.get(&upper)).filter(|o| o.is_object())
}

/// The instance id in an ARN (`acs:ecs:cn-hangzhou:123:instance/i-bp1...`) or a bare id.
fn instance_of(resource: &str) -> &str {
    resource.rsplit('/').next().unwrap_or(resource)
}

/// Event statuses after which nothing more happens to the instance: the alert is over.
const OVER: [&str; 4] = ["Executed", "Canceled", "Avoided", "Resolved"];

/// Parses one Alibaba Cloud system event (CloudMonitor notification or EventBridge CloudEvent).
pub fn parse_aliyun(body: &[u8]) -> Result<Vec<Alert>, String> {
    let v = json(body)?;
    if !v.is_object() {
        return Err("expected one event object".into());
    }
    let (product, resource_type, event, status, resource, content) =
        if v.get("specversion").is_some() && field(&v, "type").is_some() {
            // EventBridge: type `ecs:Instance:SystemFailure.Reboot`, data{eventType, eventStatus, resourceId}.
            let ty = field(&v, "type").unwrap_or_default();
            let mut parts = ty.split(':');
            let product = parts.next().unwrap_or_default().to_string();
            let rtype = parts.next().unwrap_or_default().to_string();
            let from_type = parts.next().unwrap_or_default().to_string();
            let data = object(&v, "data").ok_or("EventBridge event without a `data` object")?;
            let event = field(data, "eventType").map(str::to_string).unwrap_or(from_type);
            let status = field(data, "eventStatus").unwrap_or_default().to_string();
            let resource = field(data, "resourceId").or_else(|| field(&v, "subject")).map(str::to_string);
            (product, rtype, event, status, resource, data)
        } else if let (Some(product), Some(name)) = (field(&v, "product"), field(&v, "name")) {
            // CloudMonitor: name `Instance:SystemFailure.Reboot:Executing`, content{eventType, ...}.
            let mut parts = name.split(':');
            let rtype = parts.next().unwrap_or_default().to_string();
            let from_name = parts.next().unwrap_or_default().to_string();
            let status_in_name = parts.next().unwrap_or_default().to_string();
            let content = object(&v, "content").unwrap_or(&Value::Null);
            let event = field(content, "eventType").map(str::to_string).unwrap_or(from_name);
            let status = field(content, "eventStatus").map(str::to_string).unwrap_or(status_in_name);
            let resource = field(content, "resourceId").or_else(|| field(&v, "resourceId")).map(str::to_string);
            (product.to_string(), rtype, event, status, resource, content)
        } else {
            return Err("neither a CloudMonitor system event (product, name, resourceId) nor an EventBridge event \
                 (specversion, type, data)"
                .into());
        };
    if event.is_empty() {
        return Err("the event names no event type (name `<resource>:<event>:<status>` or data.eventType)".into());
    }
    let resource = resource.ok_or("the event names no resource (resourceId, data.resourceId or subject)")?;
    let instance = cap(instance_of(&resource), MAX_VALUE);
    if instance.is_empty() {
        return Err(format!("resource `{}` names no instance", cap(&resource, 128)));
    }
    let mut labels = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        if !v.is_empty() {
            labels.insert(k.to_string(), cap(v, MAX_VALUE));
        }
    };
    put("product", &product.to_ascii_lowercase());
    put("resource_type", &resource_type);
    put("event", &event);
    put("status", &status);
    put("instance_id", &instance);
    put("instance_name", field(&v, "instanceName").unwrap_or_default());
    put("region", field(&v, "regionId").or_else(|| field(&v, "aliyunregionid")).unwrap_or_default());
    put("level", field(&v, "level").unwrap_or_default());
    let id = field(content, "eventId").or_else(|| field(&v, "id")).unwrap_or_default();
    let firing = !OVER.contains(&status.as_str());
    let evidence = format!(
        "aliyun {} {}:{}{} on {} (event {})",
        product.to_ascii_lowercase(),
        resource_type,
        event,
        if status.is_empty() { String::new() } else { format!(":{status}") },
        instance,
        id
    );
    Ok(vec![Alert {
        origin: Origin::Aliyun,
        name: cap(&event, MAX_VALUE),
        labels,
        firing,
        id: cap(id, 64),
        evidence: cap(&evidence, MAX_EVIDENCE),
    }])
}

/// Parses a payload of `origin`'s shape.
pub fn parse(origin: Origin, body: &[u8]) -> Result<Vec<Alert>, String> {
    match origin {
        Origin::Alertmanager => parse_alertmanager(body),
        Origin::Aliyun => parse_aliyun(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/alerts").join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn dcgm_xid_alert_parses_with_its_labels() {
        let a = parse_alertmanager(&fixture("alertmanager-dcgm-xid79.json")).unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].name, "GpuXidError");
        assert!(a[0].firing);
        assert_eq!(a[0].labels["Hostname"], "node-2");
        assert_eq!(a[0].labels["err_code"], "79");
        assert!(a[0].evidence.contains("fallen off the bus"), "{}", a[0].evidence);
        assert!(!a[0].id.is_empty());
    }

    #[test]
    fn resolved_alerts_are_not_firing() {
        let a = parse_alertmanager(&fixture("alertmanager-dcgm-xid79-resolved.json")).unwrap();
        assert!(!a[0].firing);
    }

    #[test]
    fn cloudmonitor_and_eventbridge_shapes_give_the_same_alert() {
        let cm = parse_aliyun(&fixture("aliyun-cloudmonitor-systemfailure-reboot.json")).unwrap();
        let eb = parse_aliyun(&fixture("aliyun-eventbridge-systemfailure-reboot.json")).unwrap();
        for a in [&cm[0], &eb[0]] {
            assert_eq!(a.name, "SystemFailure.Reboot");
            assert_eq!(a.labels["product"], "ecs");
            assert_eq!(a.labels["instance_id"], "i-bp1node2gpu0000000x");
            assert_eq!(a.labels["status"], "Executing");
            assert!(a.firing);
        }
        let done = parse_aliyun(&fixture("aliyun-cloudmonitor-systemfailure-executed.json")).unwrap();
        assert!(!done[0].firing);
    }

    #[test]
    fn capitalised_keys_are_accepted() {
        let body = br#"{"Product":"ECS","Name":"Instance:SystemFailure.Stop:Executing",
            "ResourceId":"acs:ecs:cn-beijing:1:instance/i-abc","Content":{}}"#;
        let a = parse_aliyun(body).unwrap();
        assert_eq!((a[0].name.as_str(), a[0].labels["instance_id"].as_str()), ("SystemFailure.Stop", "i-abc"));
    }

    #[test]
    fn bad_payloads_say_what_is_wrong() {
        let cases: &[(Origin, &[u8], &str)] = &[
            (Origin::Alertmanager, b"", "empty"),
            (Origin::Alertmanager, b"{not json", "not JSON"),
            (Origin::Alertmanager, br#"{"version":"4"}"#, "alerts"),
            (Origin::Alertmanager, br#"{"version":"4","alerts":[]}"#, "empty"),
            (Origin::Alertmanager, br#"{"version":"3","alerts":[]}"#, "version"),
            (Origin::Alertmanager, br#"{"alerts":[{"status":"firing","labels":{}}]}"#, "alertname"),
            (Origin::Alertmanager, br#"{"alerts":[{"status":"pending","labels":{"alertname":"x"}}]}"#, "pending"),
            (Origin::Aliyun, b"[1,2]", "one event object"),
            (Origin::Aliyun, br#"{"hello":"world"}"#, "neither"),
            (Origin::Aliyun, br#"{"product":"ECS","name":"Instance:SystemFailure.Reboot"}"#, "resource"),
            (Origin::Aliyun, br#"{"specversion":"1.0","type":"ecs:Instance:X"}"#, "data"),
        ];
        for (origin, body, want) in cases {
            let e = parse(*origin, body).unwrap_err();
            assert!(e.contains(want), "{origin:?} {}: {e}", String::from_utf8_lossy(body));
            assert!(!e.contains('\n'), "{e}");
        }
        let many = format!(
            r#"{{"alerts":[{}]}}"#,
            vec![r#"{"status":"firing","labels":{"alertname":"x"}}"#; MAX_ALERTS + 1].join(",")
        );
        assert!(parse_alertmanager(many.as_bytes()).unwrap_err().contains("max_alerts"));
    }
}
