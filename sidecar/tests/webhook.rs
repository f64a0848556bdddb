//! `mutate` on captured AdmissionReviews: each patch is applied with json-patch to the raw object from
//! the review (not a re-serialised one), and the result must be a valid Pod with the expected
//! containers, volumes and environment.
#![cfg(feature = "server")]

#[path = "../../ckpt-core/tests/common/reliability.rs"]
mod reliability;

use std::collections::BTreeMap;
use std::path::PathBuf;

use ckptd::webhook::server::{review, review_response};
use ckptd::webhook::{Config, mutate};
use k8s_openapi::api::core::v1::{Container, EnvVar, Pod};
use serde_json::Value;

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/webhook").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn config() -> Config {
    Config::new("registry.example.com/ckptd:0.1.0")
}

/// Runs a review through the webhook and applies its patch to the raw object.
fn admit(body: &[u8], cfg: &Config) -> (kube::core::admission::AdmissionResponse, Value) {
    let resp = review(body, cfg).expect("a valid review");
    let raw: Value = serde_json::from_slice(body).expect("fixture is JSON");
    let mut obj = raw["request"]["object"].clone();
    if let Some(p) = &resp.patch {
        let patch: json_patch::Patch = serde_json::from_slice(p).expect("patch is a JSON patch");
        json_patch::patch(&mut obj, &patch).expect("patch applies to the raw object");
    }
    (resp, obj)
}

fn pod(obj: &Value) -> Pod {
    serde_json::from_value(obj.clone()).expect("patched object is a valid Pod")
}

fn env(c: &Container) -> BTreeMap<String, EnvVar> {
    c.env.iter().flatten().map(|e| (e.name.clone(), e.clone())).collect()
}

fn value(c: &Container, name: &str) -> Option<String> {
    env(c).get(name).and_then(|e| e.value.clone())
}

fn mounts(c: &Container) -> BTreeMap<String, String> {
    c.volume_mounts.iter().flatten().map(|m| (m.name.clone(), m.mount_path.clone())).collect()
}

fn agent(p: &Pod) -> Container {
    let spec = p.spec.as_ref().expect("spec");
    let agents: Vec<&Container> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .filter(|c| c.name == "ckptd-agent")
        .collect();
    assert_eq!(agents.len(), 1, "exactly one agent");
    agents[0].clone()
}

#[test]
fn plain_pod_gets_native_sidecar_volumes_and_env() {
    let (resp, obj) = admit(&fixture("plain-pod.json"), &config());
    assert!(resp.allowed);
    assert_eq!(resp.uid, "705ab4f5-6393-11e8-b7cc-42010a800002");
    let review: Value = serde_json::from_slice(&ckptd::webhook::server::encode_review(resp.clone()).unwrap()).unwrap();
    assert!(review["response"]["patch"].is_string(), "patch is base64, as a Go []byte");
    assert_eq!(
        (review["apiVersion"].as_str(), review["kind"].as_str()),
        (Some("admission.k8s.io/v1"), Some("AdmissionReview"))
    );
    assert_eq!(review["response"]["patchType"], "JSONPatch");
    let p = pod(&obj);
    let spec = p.spec.as_ref().unwrap();

    let a = agent(&p);
    let init = spec.init_containers.as_ref().expect("agent is an init container");
    assert_eq!(init.last().map(|c| c.name.as_str()), Some("ckptd-agent"));
    assert_eq!(a.restart_policy.as_deref(), Some("Always"), "native sidecar");
    assert_eq!(a.image.as_deref(), Some("registry.example.com/ckptd:0.1.0"));
    assert_eq!(a.command.as_deref(), Some(&["ckptd".to_string(), "agent".to_string()][..]));
    assert_eq!(value(&a, "CKPTD_STORE").as_deref(), Some("s3://ckpt-bucket/runs"));
    assert_eq!(value(&a, "CKPTD_JOB").as_deref(), Some("train-0"), "job falls back to the pod name");
    assert_eq!(value(&a, "CKPTD_SLOTS").as_deref(), Some("1"));
    assert_eq!(value(&a, "CKPTD_SOCKET").as_deref(), Some("/var/run/ckptd/sock/agent.sock"));
    assert_eq!(value(&a, "CKPTD_ARENA_DIR").as_deref(), Some("/var/run/ckptd/arena"));
    assert_eq!(value(&a, "CKPTD_METRICS_ADDR").as_deref(), Some("0.0.0.0:9101"));
    assert!(value(&a, "CKPTD_ISOLATOR").is_none() && value(&a, "CKPTD_RANKS").is_none());
    let e = env(&a);
    for (name, path) in [
        ("CKPTD_NODE_NAME", "spec.nodeName"),
        ("CKPTD_POD_NAME", "metadata.name"),
        ("CKPTD_POD_NAMESPACE", "metadata.namespace"),
        ("CKPTD_POD_UID", "metadata.uid"),
    ] {
        let f = e[name].value_from.as_ref().and_then(|v| v.field_ref.as_ref()).expect(name);
        assert_eq!(f.field_path, path);
    }
    let a_res = a.resources.as_ref().unwrap();
    assert_eq!(a_res.requests.as_ref().unwrap()["cpu"].0, "1");
    assert_eq!(a_res.limits.as_ref().unwrap()["memory"].0, "4Gi");

    let t = &spec.containers[0];
    assert_eq!(spec.containers.len(), 1, "no container added in native mode");
    for c in [t, &a] {
        let m = mounts(c);
        assert_eq!(m["ckptd-arena"], "/var/run/ckptd/arena", "{}", c.name);
        assert_eq!(m["ckptd-socket"], "/var/run/ckptd/sock", "{}", c.name);
        assert_eq!(m["ckptd-nccl"], "/var/run/ckptd/nccl", "{}", c.name);
    }
    assert_eq!(value(t, "CKPTD_SOCKET").as_deref(), Some("/var/run/ckptd/sock/agent.sock"));
    assert_eq!(value(t, "CKPTD_JOB").as_deref(), Some("train-0"));
    assert_eq!(value(t, "CKPTD_ARENA_DIR").as_deref(), Some("/var/run/ckptd/arena"));
    assert_eq!(value(t, "NCCL_DEBUG").as_deref(), Some("WARN"));
    assert_eq!(value(t, "NCCL_DEBUG_FILE").as_deref(), Some("/var/run/ckptd/nccl/nccl.%h.%p.log"));
    assert_eq!(value(t, "TORCH_NCCL_TRACE_BUFFER_SIZE").as_deref(), Some("2000"));
    assert_eq!(value(t, "TORCH_NCCL_DUMP_ON_TIMEOUT").as_deref(), Some("1"));
    assert_eq!(value(t, "TORCH_NCCL_DEBUG_INFO_TEMP_FILE").as_deref(), Some("/var/run/ckptd/nccl/nccl_trace_rank_"));

    let vols: BTreeMap<String, _> =
        spec.volumes.iter().flatten().filter_map(|v| Some((v.name.clone(), v.empty_dir.clone()?))).collect();
    assert_eq!(vols.len(), 3, "arena, socket and NCCL volumes are emptyDirs");
    let kmsg = spec.volumes.iter().flatten().find(|v| v.name == "ckptd-kmsg").and_then(|v| v.host_path.clone());
    assert_eq!(kmsg.map(|h| (h.path, h.type_)), Some(("/dev/kmsg".into(), Some("CharDevice".into()))));
    assert_eq!(mounts(&a)["ckptd-kmsg"], "/dev/kmsg");
    assert!(!mounts(t).contains_key("ckptd-kmsg"), "the trainer does not get the kernel log");
    let caps = a.security_context.as_ref().and_then(|s| s.capabilities.clone()).and_then(|c| c.add);
    assert_eq!(caps, Some(vec!["SYSLOG".to_string()]));
    assert_eq!(value(&a, "CKPTD_NCCL_LOG_GLOB"), value(t, "NCCL_DEBUG_FILE"), "one name per setting");
    assert_eq!(value(&a, "CKPTD_FLIGHT_RECORDER_DIR").as_deref(), Some("/var/run/ckptd/nccl"));
    assert_eq!(value(&a, "NVIDIA_VISIBLE_DEVICES").as_deref(), Some("all"));
    assert_eq!(value(&a, "NVIDIA_DRIVER_CAPABILITIES").as_deref(), Some("utility"));
    assert_eq!(vols["ckptd-arena"].medium.as_deref(), Some("Memory"));
    assert_eq!(vols["ckptd-arena"].size_limit.as_ref().map(|q| q.0.as_str()), Some("16Gi"));
    assert!(vols["ckptd-socket"].medium.is_none());
    assert_eq!(vols["ckptd-nccl"].size_limit.as_ref().map(|q| q.0.as_str()), Some("1Gi"));
    // The trainer's own fields are unchanged.
    assert_eq!(t.command.as_deref(), Some(&["python".to_string(), "train.py".to_string()][..]));
    assert_eq!(t.resources.as_ref().unwrap().limits.as_ref().unwrap()["nvidia.com/gpu"].0, "8");
}

#[test]
fn pytorchjob_worker_injects_only_named_containers_and_keeps_unknown_fields() {
    let (resp, obj) = admit(&fixture("pytorchjob-worker.json"), &config());
    assert!(resp.allowed, "{:?}", resp.result);
    // Fields this build of k8s-openapi does not know survive, because the patch never rewrites them.
    assert_eq!(obj["spec"]["futurePodField"]["enabled"], true);
    assert_eq!(obj["spec"]["containers"][0]["futureContainerField"]["keep"], "me");
    let p = pod(&obj);
    let spec = p.spec.as_ref().unwrap();
    let names: Vec<&str> = spec.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["wait-for-master", "ckptd-agent"], "agent appended after the user's init containers");
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["pytorch", "log-shipper"]);

    let trainer = &spec.containers[0];
    assert_eq!(value(trainer, "NCCL_DEBUG").as_deref(), Some("INFO"), "the user's NCCL_DEBUG is kept");
    assert_eq!(env(trainer).keys().filter(|k| *k == "NCCL_DEBUG").count(), 1);
    assert_eq!(value(trainer, "CKPTD_JOB").as_deref(), Some("llama-70b"), "job from the PyTorchJob label");
    assert_eq!(value(trainer, "RANK").as_deref(), Some("1"));
    let m = mounts(trainer);
    assert_eq!(m["dshm"], "/dev/shm");
    assert_eq!(m["ckptd-arena"], "/var/run/ckptd/arena");

    let shipper = &spec.containers[1];
    assert!(mounts(shipper).is_empty() || !mounts(shipper).contains_key("ckptd-arena"));
    assert!(value(shipper, "CKPTD_SOCKET").is_none(), "log-shipper is not in ckptd.io/containers");
    assert_eq!(value(shipper, "LOG_LEVEL").as_deref(), Some("info"));

    let a = agent(&p);
    assert_eq!(value(&a, "CKPTD_STORE").as_deref(), Some("oss://ckpt-bucket/llama"));
    assert_eq!(value(&a, "CKPTD_SLOTS").as_deref(), Some("3"));
    assert_eq!(value(&a, "CKPTD_ISOLATOR").as_deref(), Some("https://ckptd-isolator.ckptd.svc:7443"));
    assert_eq!(value(&a, "CKPTD_RANKS").as_deref(), Some("4-7"), "node rank 1 × 4 processes per node");
    assert_eq!(value(&a, "CKPTD_WORLD_SIZE").as_deref(), Some("8"));
    let res = a.resources.as_ref().unwrap();
    assert_eq!(res.requests.as_ref().unwrap()["cpu"].0, "2");
    assert_eq!(res.requests.as_ref().unwrap()["memory"].0, "1Gi", "default kept for what is not annotated");
    assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "8Gi");

    let arena = spec.volumes.iter().flatten().find(|v| v.name == "ckptd-arena").and_then(|v| v.empty_dir.clone());
    assert_eq!(arena.and_then(|e| e.size_limit).map(|q| q.0), Some("128Gi".into()));
    assert!(spec.volumes.iter().flatten().any(|v| v.name == "dshm"), "user volume kept");
}

#[test]
fn already_injected_pod_gets_empty_patch_and_second_pass_is_a_no_op() {
    let cfg = config();
    let (resp, obj) = admit(&fixture("already-injected.json"), &cfg);
    assert!(resp.allowed);
    assert!(resp.patch.is_none(), "no patch for a pod with the agent");
    let p = pod(&obj);
    assert_eq!(mutate(&p, &cfg).map(|patch| patch.0.len()), Ok(0));

    // A pod the webhook injected, reviewed again, is left alone.
    let (_, once) = admit(&fixture("plain-pod.json"), &cfg);
    let injected = pod(&once);
    assert_eq!(mutate(&injected, &cfg).map(|patch| patch.0.len()), Ok(0));
}

#[test]
fn user_set_nccl_debug_file_and_ckptd_job_are_never_overwritten() {
    let (resp, obj) = admit(&fixture("own-nccl-debug-file.json"), &config());
    assert!(resp.allowed);
    let p = pod(&obj);
    let t = &p.spec.as_ref().unwrap().containers[0];
    let e = env(t);
    assert_eq!(value(t, "NCCL_DEBUG_FILE").as_deref(), Some("/logs/nccl.%h.%p.log"));
    assert!(e["CKPTD_JOB"].value_from.is_some(), "the user's valueFrom kept");
    assert_eq!(t.env.iter().flatten().filter(|e| e.name == "NCCL_DEBUG_FILE").count(), 1);
    assert_eq!(value(t, "NCCL_DEBUG").as_deref(), Some("WARN"), "what the user did not set is added");
    assert_eq!(value(&agent(&p), "CKPTD_JOB").as_deref(), Some("bert-large"), "ckptd.io/job wins");
}

#[test]
fn env_from_containers_get_only_ckptd_variables_and_rank_comes_from_rank_and_world_size() {
    let mut raw: Value = serde_json::from_slice(&fixture("plain-pod.json")).unwrap();
    let c = &mut raw["request"]["object"]["spec"]["containers"][0];
    c["envFrom"] = serde_json::json!([{"configMapRef": {"name": "nccl-tuning"}}]);
    c["env"] = serde_json::json!([{"name": "RANK", "value": "5"}, {"name": "WORLD_SIZE", "value": "16"}]);
    let (resp, obj) = admit(&serde_json::to_vec(&raw).unwrap(), &config());
    assert!(resp.allowed, "{:?}", resp.result);
    let p = pod(&obj);
    let t = &p.spec.as_ref().unwrap().containers[0];
    let names: Vec<&str> = t.env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        ["RANK", "WORLD_SIZE", "CKPTD_SOCKET", "CKPTD_JOB", "CKPTD_ARENA_DIR"],
        "no NCCL_*/TORCH_* over envFrom"
    );
    let a = agent(&p);
    assert_eq!(value(&a, "CKPTD_RANKS").as_deref(), Some("5"));
    assert_eq!(value(&a, "CKPTD_WORLD_SIZE").as_deref(), Some("16"));

    // A rank outside the world size would make the agent refuse to start: the pod is denied.
    raw["request"]["object"]["spec"]["containers"][0]["env"][0]["value"] = "16".into();
    let resp = review(&serde_json::to_vec(&raw).unwrap(), &config()).unwrap();
    assert!(!resp.allowed && resp.result.message.contains("RANK must be below WORLD_SIZE"), "{:?}", resp.result);
}

/// The PyTorchJob worker with its trainer's variables `vars` replaced; the review's response.
fn worker_with(vars: &[(&str, &str)]) -> kube::core::admission::AdmissionResponse {
    let mut raw: Value = serde_json::from_slice(&fixture("pytorchjob-worker.json")).unwrap();
    let env = raw["request"]["object"]["spec"]["containers"][0]["env"].as_array_mut().unwrap();
    for (name, v) in vars {
        let e = env.iter_mut().find(|e| e["name"] == *name).unwrap_or_else(|| panic!("the fixture sets {name}"));
        e["value"] = (*v).into();
    }
    review(&serde_json::to_vec(&raw).unwrap(), &config()).unwrap()
}

#[test]
fn torchrun_ranks_the_agent_would_refuse_are_denied_at_admission() {
    let ok = worker_with(&[("PET_NPROC_PER_NODE", "4096"), ("PET_NODE_RANK", "1"), ("PET_NNODES", "2")]);
    assert!(ok.allowed, "4096 processes per pod is the agent's limit, not beyond it: {:?}", ok.result);
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("PET_NPROC_PER_NODE", "4097")], "which the agent refuses"),
        (&[("PET_NPROC_PER_NODE", "1000000")], "one pod runs at most 4096 processes"),
        (&[("PET_NPROC_PER_NODE", "0")], "must be at least 1"),
        (&[("PET_NNODES", "0")], "must be at least 1"),
        (&[("PET_NODE_RANK", "2"), ("PET_NNODES", "2")], "below PET_NNODES"),
        (&[("PET_NPROC_PER_NODE", "4000"), ("PET_NNODES", "2000000")], "world size of 8000000000"),
        (&[("PET_NPROC_PER_NODE", "4096"), ("PET_NODE_RANK", "18446744073709551615")], "below PET_NNODES"),
        (
            &[
                ("PET_NPROC_PER_NODE", "4096"),
                ("PET_NODE_RANK", "4503599627370495"),
                ("PET_NNODES", "18446744073709551615"),
            ],
            "beyond",
        ),
    ];
    for (vars, why) in cases {
        let resp = worker_with(vars);
        assert!(!resp.allowed, "{vars:?} was allowed");
        let msg = &resp.result.message;
        assert!(msg.contains(why) && msg.contains("container pytorch"), "{vars:?}: {msg}");
        // Every value the agent would be started with is one it accepts, so the refusal is here.
        assert!(resp.patch.is_none());
    }
}

#[test]
fn store_urls_with_credentials_or_control_characters_are_denied_without_echoing_them() {
    let cases: &[(&str, &[&str])] = &[
        ("s3://KEY:SECRET@/p", &["KEY", "SECRET"]),
        ("s3://AKIAEXAMPLE:wJalrXUt@bkt/p", &["AKIAEXAMPLE", "wJalrXUt"]),
        ("s3://bkt/p?aws_secret_access_key=wJalrXUt&region=eu-west-1", &["wJalrXUt"]),
        ("s3://bkt/p?X-Amz-Signature=f00dcafe&X-Amz-Credential=AKIAEXAMPLE", &["f00dcafe", "AKIAEXAMPLE"]),
        ("az://container/p?sv=2022-11-02&sig=c2lnbmF0dXJl", &["c2lnbmF0dXJl"]),
        ("gs://bkt/p?token=ya29.T0K3N", &["ya29.T0K3N"]),
        ("oss://bkt/p?region=cn-hangzhou&security-token=STS.T0K3N", &["STS.T0K3N"]),
        ("oss://bkt/p?region=cn-hangzhou&OSSAccessKeyId=LTAI5t", &["LTAI5t"]),
        ("s3://bkt/p?endpoint=https://minio:m1n10pw@minio.local:9000", &["m1n10pw"]),
        ("s3://bkt/p?Sig%6eature=f00dcafe", &["f00dcafe"]),
    ];
    for (url, secrets) in cases {
        let msg = denial(&[("ckptd.io/store", url)]);
        assert!(msg.contains("carries credentials") && msg.contains("Secret"), "{url}: {msg}");
        for secret in *secrets {
            assert!(!msg.contains(secret), "{url}: the denial echoes {secret}: {msg}");
        }
    }
    let msg = denial(&[("ckptd.io/store", "s3://bkt/p\n2025-01-01 INFO forged\u{1b}[31m")]);
    assert!(msg.contains("control characters"), "{msg}");
    assert!(!msg.chars().any(char::is_control), "the denial carries a control character: {msg:?}");

    let mut raw: Value = serde_json::from_slice(&fixture("plain-pod.json")).unwrap();
    raw["request"]["object"]["metadata"]["annotations"]["ckptd.io/store"] =
        "s3://bkt/p?region=eu-west-1&endpoint=https://minio.local:9000&virtual_hosted=true".into();
    let resp = review(&serde_json::to_vec(&raw).unwrap(), &config()).unwrap();
    assert!(resp.allowed, "the store options the agent reads are not credentials: {:?}", resp.result);

    let e = Config::from_yaml("img", "store: s3://bkt/p?sig=c2lnbmF0dXJl\n").unwrap_err().to_string();
    assert!(e.contains("carries credentials") && !e.contains("c2lnbmF0dXJl"), "{e}");
}

#[test]
fn pods_that_did_not_opt_in_are_untouched_even_with_bad_annotations() {
    let (resp, obj) = admit(&fixture("not-opted-in.json"), &config());
    assert!(resp.allowed);
    assert!(resp.patch.is_none());
    assert!(obj["spec"]["initContainers"].is_null());
}

#[test]
fn updates_and_other_kinds_pass_through() {
    let mut raw: Value = serde_json::from_slice(&fixture("plain-pod.json")).unwrap();
    raw["request"]["operation"] = "UPDATE".into();
    let resp = review(&serde_json::to_vec(&raw).unwrap(), &config()).unwrap();
    assert!(resp.allowed && resp.patch.is_none());

    let mut raw: Value = serde_json::from_slice(&fixture("plain-pod.json")).unwrap();
    raw["request"]["kind"] = serde_json::json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    raw["request"]["object"] =
        serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}});
    let resp = review(&serde_json::to_vec(&raw).unwrap(), &config()).unwrap();
    assert!(resp.allowed && resp.patch.is_none());
}

#[test]
fn regular_container_mode_appends_the_agent_to_containers() {
    let cfg = Config::from_yaml("img:1", "nativeSidecar: false\n").unwrap();
    let (_, obj) = admit(&fixture("plain-pod.json"), &cfg);
    let p = pod(&obj);
    let spec = p.spec.as_ref().unwrap();
    assert!(spec.init_containers.is_none());
    assert_eq!(spec.containers.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["trainer", "ckptd-agent"]);
    assert!(agent(&p).restart_policy.is_none());
}

#[test]
fn cluster_defaults_come_from_the_config_file() {
    let yaml = "store: gs://defaults/ckpt\narenaSize: 32Gi\nslots: 4\nisolator: https://iso.ckptd.svc:7443\n\
                isolatorTokenSecret: {name: ckptd-token, key: token}\nflightRecorderEntries: 5000\n";
    let cfg = Config::from_yaml("img:1", yaml).unwrap();
    let mut raw: Value = serde_json::from_slice(&fixture("plain-pod.json")).unwrap();
    raw["request"]["object"]["metadata"]["annotations"] = serde_json::json!({});
    let (resp, obj) = admit(&serde_json::to_vec(&raw).unwrap(), &cfg);
    assert!(resp.allowed, "{:?}", resp.result);
    let p = pod(&obj);
    let a = agent(&p);
    assert_eq!(value(&a, "CKPTD_STORE").as_deref(), Some("gs://defaults/ckpt"));
    assert_eq!(value(&a, "CKPTD_SLOTS").as_deref(), Some("4"));
    assert_eq!(value(&a, "CKPTD_ISOLATOR_TOKEN_FILE").as_deref(), Some("/var/run/ckptd/isolator/token"));
    assert_eq!(mounts(&a)["ckptd-isolator-token"], "/var/run/ckptd/isolator");
    let spec = p.spec.as_ref().unwrap();
    let token = spec.volumes.iter().flatten().find(|v| v.name == "ckptd-isolator-token").unwrap();
    assert_eq!(token.secret.as_ref().and_then(|s| s.secret_name.as_deref()), Some("ckptd-token"));
    assert!(!mounts(&spec.containers[0]).contains_key("ckptd-isolator-token"), "the token stays in the agent");
    assert_eq!(value(&spec.containers[0], "TORCH_NCCL_TRACE_BUFFER_SIZE").as_deref(), Some("5000"));

    // `none` opts a pod out of the cluster's isolator.
    raw["request"]["object"]["metadata"]["annotations"] = serde_json::json!({"ckptd.io/isolator": "none"});
    let (_, obj) = admit(&serde_json::to_vec(&raw).unwrap(), &cfg);
    let p = pod(&obj);
    assert!(value(&agent(&p), "CKPTD_ISOLATOR").is_none());
    assert!(!p.spec.unwrap().volumes.iter().flatten().any(|v| v.name == "ckptd-isolator-token"));
}

#[test]
fn bad_config_files_are_rejected() {
    for (yaml, what) in [
        ("slot: 2\n", "unknown field"),
        ("slots: 0\n", "slots"),
        ("arenaSize: 1TB\n", "arenaSize"),
        ("arenaSize: 1Ti\nmaxArenaSize: 10Gi\n", "arenaSize"),
        ("store: ftp://x/y\n", "store"),
        ("isolator: http://x:1\n", "isolator"),
        ("imagePullPolicy: Sometimes\n", "imagePullPolicy"),
        ("agentResources: {requests: {cpu: lots}}\n", "agentResources"),
    ] {
        let e = Config::from_yaml("img:1", yaml).expect_err(yaml);
        assert_eq!(e.kind(), ckptd::ErrorKind::Config);
        assert!(e.to_string().contains(what), "{yaml}: {e}");
    }
    assert!(Config::from_yaml(" ", "").is_err(), "an empty agent image is refused");
}

#[test]
fn slots_are_bounded_by_the_arena_and_nothing_else() {
    let max = ckpt_core::arena::MAX_SLOTS;
    let admitted = |slots: u32| {
        let mut raw: Value = serde_json::from_slice(&fixture("plain-pod.json")).unwrap();
        raw["request"]["object"]["metadata"]["annotations"]["ckptd.io/slots"] = Value::String(slots.to_string());
        let (_, obj) = admit(&serde_json::to_vec(&raw).unwrap(), &config());
        value(&agent(&pod(&obj)), "CKPTD_SLOTS")
    };
    assert_eq!(admitted(max), Some(max.to_string()), "the arena's limit is accepted");
    assert!(denial(&[("ckptd.io/slots", &(max + 1).to_string())]).contains(&format!("1 to {max}")));
    assert!(Config::from_yaml("img:1", &format!("slots: {max}\n")).is_ok());
    let e = Config::from_yaml("img:1", &format!("slots: {}\n", max + 1)).unwrap_err();
    assert!(e.to_string().contains(&format!("must be 1 to {max}")), "{e}");
}

/// Sets `annotations` on the plain pod and returns the denial message.
fn denial(annotations: &[(&str, &str)]) -> String {
    let mut raw: Value = serde_json::from_slice(&fixture("plain-pod.json")).unwrap();
    for (k, v) in annotations {
        raw["request"]["object"]["metadata"]["annotations"][*k] = Value::String((*v).into());
    }
    let resp = review(&serde_json::to_vec(&raw).unwrap(), &config()).unwrap();
    assert!(!resp.allowed, "{annotations:?} was allowed");
    assert!(resp.patch.is_none());
    assert_eq!(resp.result.code, 403);
    resp.result.message
}

#[test]
fn every_kind_of_invalid_annotation_is_denied_with_its_name_and_form() {
    let cases: &[(&str, &str, &str)] = &[
        ("ckptd.io/store", "ftp://host/x", "s3://bucket/prefix"),
        ("ckptd.io/store", "not a url", "s3://bucket/prefix"),
        ("ckptd.io/store", "s3://key:secret@bucket/x", "credentials"),
        ("ckptd.io/store", "s3:///nobucket", "no bucket"),
        ("ckptd.io/store", "file:///", "names no directory"),
        ("ckptd.io/store", "file:///mnt/ckpt", "no volume mounted"),
        ("ckptd.io/arena-size", "1.5Gi", "e.g. 64Gi"),
        ("ckptd.io/arena-size", "16GB", "e.g. 64Gi"),
        ("ckptd.io/arena-size", "1Mi", "64Mi to 512Gi"),
        ("ckptd.io/arena-size", "1Pi", "64Mi to 512Gi"),
        ("ckptd.io/arena-size", "99999999999999999999Ti", "e.g. 64Gi"),
        ("ckptd.io/slots", "0", "1 to 32"),
        ("ckptd.io/slots", "33", "1 to 32"),
        ("ckptd.io/slots", "two", "1 to 32"),
        ("ckptd.io/slots", "+2", "1 to 32"),
        ("ckptd.io/isolator", "http://iso:7443", "https://host[:port]"),
        ("ckptd.io/isolator", "https://iso:7443/path", "https://host[:port]"),
        ("ckptd.io/isolator", "iso:7443", "https://host[:port]"),
        ("ckptd.io/containers", "", "comma-separated list"),
        ("ckptd.io/containers", "trainer,,x", "comma-separated list"),
        ("ckptd.io/containers", "missing", "no container `missing`"),
        ("ckptd.io/containers", "trainer,trainer", "listed twice"),
        ("ckptd.io/agent-cpu-request", "two", "millicores"),
        ("ckptd.io/agent-cpu-limit", "-1", "millicores"),
        ("ckptd.io/agent-memory-request", "1.5Gi", "e.g. 64Gi"),
        ("ckptd.io/agent-memory-limit", "4GB", "e.g. 64Gi"),
        ("ckptd.io/agent-memory-request", "16Gi", "above its limit 4Gi"),
        ("ckptd.io/job", "Bad_Job", "not a job name"),
        ("ckptd.io/parallel", "dp=0,tp=4", "`dp=0` is not a whole number of at least 1"),
        ("ckptd.io/parallel", "dp=8,cp=2", "unknown factor `cp`"),
        ("ckptd.io/parallel", "8x4x2", "dp=8,tp=4,pp=2"),
        ("ckptd.io/parallel", "dp=8,data=8", "sets a factor given before"),
        ("ckptd.io/on-resize", "shrink", "`shrink` is not a resize policy"),
        ("ckptd.io/slot", "2", "unknown annotation ckptd.io/slot"),
    ];
    let mut raw: Value = serde_json::from_slice(&fixture("plain-pod.json")).unwrap();
    raw["request"]["object"]["metadata"]["annotations"]["ckptd.io/inject"] = "true".into();
    assert!(
        review(&serde_json::to_vec(&raw).unwrap(), &config()).unwrap().allowed,
        "the label's key as an annotation is harmless"
    );
    for (key, v, form) in cases {
        let msg = denial(&[(key, v)]);
        assert!(msg.contains(key), "{key}={v:?}: message does not name the annotation: {msg}");
        assert!(msg.contains(form), "{key}={v:?}: message lacks {form:?}: {msg}");
    }
    reliability::record("hostile", "webhook: invalid annotations", cases.len() as u64);
}

#[test]
fn denial_reads_as_documented_in_deploy_md() {
    let msg = denial(&[("ckptd.io/slots", "0"), ("ckptd.io/arena-size", "1.5Gi")]);
    assert_eq!(
        msg,
        "ckptd: ckptd.io/arena-size: `1.5Gi` is not a whole number of bytes with an optional suffix Ki, Mi, Gi, Ti, Pi, k, M, G, T or P (e.g. 64Gi); ckptd.io/slots: `0` is not a whole number from 1 to 32 (e.g. 2)"
    );
    let long = "x".repeat(10_000);
    let msg = denial(&[("ckptd.io/slots", &long)]);
    assert!(msg.len() < 300 && msg.contains("(10000 bytes)"), "a long value is cut when quoted back: {msg}");
}

#[test]
fn all_problems_are_reported_at_once() {
    let resp = review(&fixture("invalid-annotations.json"), &config()).unwrap();
    assert!(!resp.allowed);
    let msg = resp.result.message;
    for key in [
        "ckptd.io/store",
        "ckptd.io/arena-size",
        "ckptd.io/slots",
        "ckptd.io/isolator",
        "ckptd.io/containers",
        "ckptd.io/agent-cpu-request",
        "ckptd.io/agent-memory-limit",
        "unknown annotation ckptd.io/slot",
    ] {
        assert!(msg.contains(key), "{key} missing from {msg}");
    }
}

#[test]
fn missing_store_and_reserved_names_are_denied() {
    let mut raw: Value = serde_json::from_slice(&fixture("plain-pod.json")).unwrap();
    raw["request"]["object"]["metadata"]["annotations"] = serde_json::json!({});
    let resp = review(&serde_json::to_vec(&raw).unwrap(), &config()).unwrap();
    assert!(!resp.allowed);
    assert!(resp.result.message.contains("ckptd.io/store is required"), "{}", resp.result.message);

    let mut raw: Value = serde_json::from_slice(&fixture("plain-pod.json")).unwrap();
    raw["request"]["object"]["spec"]["volumes"] = serde_json::json!([{"name": "ckptd-arena", "emptyDir": {}}]);
    let resp = review(&serde_json::to_vec(&raw).unwrap(), &config()).unwrap();
    assert!(!resp.allowed && resp.result.message.contains("volume named ckptd-arena"), "{}", resp.result.message);

    let mut raw: Value = serde_json::from_slice(&fixture("plain-pod.json")).unwrap();
    raw["request"]["object"]["spec"]["containers"][0]["volumeMounts"] =
        serde_json::json!([{"name": "x", "mountPath": "/var/run/ckptd/sock/"}]);
    let resp = review(&serde_json::to_vec(&raw).unwrap(), &config()).unwrap();
    assert!(!resp.allowed && resp.result.message.contains("already mounts x"), "{}", resp.result.message);

    // A pod with neither a job label nor a name must say which annotation to set.
    let mut raw: Value = serde_json::from_slice(&fixture("plain-pod.json")).unwrap();
    let meta = &mut raw["request"]["object"]["metadata"];
    meta.as_object_mut().unwrap().remove("name");
    meta["generateName"] = "train-".into();
    let resp = review(&serde_json::to_vec(&raw).unwrap(), &config()).unwrap();
    assert!(!resp.allowed && resp.result.message.contains("ckptd.io/job"), "{}", resp.result.message);
}

#[test]
fn file_store_mounts_the_trainers_volume_in_the_agent() {
    let mut raw: Value = serde_json::from_slice(&fixture("plain-pod.json")).unwrap();
    let obj = &mut raw["request"]["object"];
    obj["metadata"]["annotations"]["ckptd.io/store"] = "file:///mnt/cpfs/ckpt/run1".into();
    obj["spec"]["volumes"] = serde_json::json!([{"name": "cpfs", "persistentVolumeClaim": {"claimName": "cpfs"}}]);
    obj["spec"]["containers"][0]["volumeMounts"] =
        serde_json::json!([{"name": "cpfs", "mountPath": "/mnt/cpfs", "readOnly": true}]);
    let (resp, obj) = admit(&serde_json::to_vec(&raw).unwrap(), &config());
    assert!(resp.allowed, "{:?}", resp.result);
    let a = agent(&pod(&obj));
    let m = a.volume_mounts.iter().flatten().find(|m| m.name == "cpfs").expect("store volume in the agent");
    assert_eq!(m.mount_path, "/mnt/cpfs");
    assert_eq!(m.read_only, None, "the agent writes to the store");
}

#[test]
fn hostile_bodies_are_400_with_a_message() {
    let good = fixture("plain-pod.json");
    let truncated = &good[..good.len() / 2];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", truncated.to_vec(), "not an AdmissionReview"),
        ("garbage", b"\x00\xff{{not json".to_vec(), "not an AdmissionReview"),
        ("empty", Vec::new(), "not an AdmissionReview"),
        ("array", b"[1,2,3]".to_vec(), "not an AdmissionReview"),
        (
            "v1beta1",
            br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#.to_vec(),
            "admission.k8s.io/v1",
        ),
        ("no request", br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(), "no request"),
        (
            "deep nesting",
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
            "not an AdmissionReview",
        ),
    ];
    let n = cases.len() + 1;
    for (name, body, msg) in cases {
        let r = review_response(&body, &config());
        assert_eq!(r.status(), 400, "{name}");
        let text = futures_body(r);
        assert!(text.contains(msg), "{name}: {text}");
    }
    let mut raw: Value = serde_json::from_slice(&good).unwrap();
    raw["request"]["object"]["spec"]["containers"] = "not a list".into();
    let r = review_response(&serde_json::to_vec(&raw).unwrap(), &config());
    assert_eq!(r.status(), 400);
    assert!(futures_body(r).contains("not a valid Pod"));
    reliability::record("hostile", "webhook: malformed AdmissionReview bodies", n as u64);
}

fn futures_body(r: hyper::Response<http_body_util::Full<bytes::Bytes>>) -> String {
    use http_body_util::BodyExt;
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let bytes = rt.block_on(r.into_body().collect()).unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

mod hostile {
    use super::*;
    use proptest::prelude::*;

    /// Annotation values a user or a tool might write, including unicode, control characters and very
    /// long strings.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[0-9]{0,25}(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P|m|\\.|e|)[0-9]{0,4}",
            "(s3|oss|gs|az|file|http|https|ftp)://[a-z0-9@:./-]{0,40}",
            "[a-z, -]{0,30}",
            any::<String>(),
            ".{200,3000}",
        ]
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(ckptd::webhook::annotations::KNOWN.to_vec()).prop_map(String::from),
            "ckptd\\.io/[a-z-]{1,20}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Whatever the annotations, the webhook either returns a patch that applies and yields a valid
        /// Pod with exactly one agent, or a denial that names an annotation; it never panics.
        #[test]
        fn any_annotations_give_a_valid_pod_or_a_named_denial(
            annotations in proptest::collection::btree_map(key(), value(), 0..6),
            native in any::<bool>(),
        ) {
            let mut raw: Value = serde_json::from_slice(&fixture("pytorchjob-worker.json")).unwrap();
            raw["request"]["object"]["metadata"]["annotations"] = serde_json::to_value(&annotations).unwrap();
            let cfg = Config::from_yaml("img:1", &format!("nativeSidecar: {native}\nstore: s3://b/p\n")).unwrap();
            let resp = review(&serde_json::to_vec(&raw).unwrap(), &cfg).unwrap();
            if resp.allowed {
                let (_, obj) = admit(&serde_json::to_vec(&raw).unwrap(), &cfg);
                let p = pod(&obj);
                agent(&p);
                prop_assert_eq!(mutate(&p, &cfg).map(|patch| patch.0.len()), Ok(0));
            } else {
                let msg = &resp.result.message;
                prop_assert!(msg.contains("ckptd.io/"), "{}", msg);
                prop_assert!(msg.len() < 8 * 1024, "denial of {} bytes", msg.len());
            }
        }

        /// Arbitrary bytes, and valid JSON of the wrong shape, are answered with a status, never a panic.
        #[test]
        fn any_body_gets_an_answer(body in proptest::collection::vec(any::<u8>(), 0..512), cut in 0usize..4000) {
            let r = review_response(&body, &config());
            prop_assert_eq!(r.status(), 400);
            let good = fixture("plain-pod.json");
            // Cutting only the trailing newline leaves a complete document.
            let complete = good.trim_ascii_end().len();
            let r = review_response(&good[..cut.min(good.len())], &config());
            prop_assert!(r.status() == 400 || cut >= complete);
        }
    }
}

mod job_templates {
    use super::*;

    fn template<'a>(obj: &'a Value, path: &str) -> &'a Value {
        obj.pointer(path).unwrap_or_else(|| panic!("no {path}"))
    }

    #[test]
    fn pytorchjob_label_and_annotations_reach_every_pod_template() {
        let (resp, obj) = admit(&fixture("pytorchjob.json"), &config());
        assert!(resp.allowed);
        assert!(resp.patch.is_some());
        for role in ["Master", "Worker"] {
            let t = template(&obj, &format!("/spec/pytorchReplicaSpecs/{role}/template"));
            assert_eq!(t["metadata"]["labels"]["ckptd.io/inject"], "true", "{role}");
            assert_eq!(t["metadata"]["annotations"]["ckptd.io/store"], "oss://ckpt-bucket/llama", "{role}");
            assert!(t["metadata"]["annotations"].get("kubectl.kubernetes.io/last-applied-configuration").is_none());
            let pod: k8s_openapi::api::core::v1::PodTemplateSpec = serde_json::from_value(t.clone()).unwrap();
            assert!(pod.spec.is_some());
        }
        let worker = template(&obj, "/spec/pytorchReplicaSpecs/Worker/template/metadata");
        assert_eq!(worker["annotations"]["ckptd.io/slots"], "2", "the template's own annotation wins");
        assert_eq!(worker["labels"]["app"], "llama");
        let master = template(&obj, "/spec/pytorchReplicaSpecs/Master/template/metadata");
        assert_eq!(master["annotations"]["ckptd.io/slots"], "3");

        // Reviewing the labelled job again changes nothing.
        let mut again: Value = serde_json::from_slice(&fixture("pytorchjob.json")).unwrap();
        again["request"]["object"] = obj;
        assert!(review(&serde_json::to_vec(&again).unwrap(), &config()).unwrap().patch.is_none());
    }

    #[test]
    fn job_and_jobset_templates_are_labelled_and_opt_outs_are_kept() {
        let mut raw: Value = serde_json::from_slice(&fixture("pytorchjob.json")).unwrap();
        raw["request"]["kind"] = serde_json::json!({"group": "batch", "version": "v1", "kind": "Job"});
        raw["request"]["object"]["spec"] = serde_json::json!({"template": {"metadata": {"labels": {"ckptd.io/inject": "false"}}, "spec": {"containers": []}}});
        let (resp, obj) = admit(&serde_json::to_vec(&raw).unwrap(), &config());
        assert!(resp.allowed);
        assert_eq!(
            obj["spec"]["template"]["metadata"]["labels"]["ckptd.io/inject"], "false",
            "an explicit opt-out is kept"
        );
        assert_eq!(obj["spec"]["template"]["metadata"]["annotations"]["ckptd.io/slots"], "3");

        raw["request"]["kind"] =
            serde_json::json!({"group": "jobset.x-k8s.io", "version": "v1alpha2", "kind": "JobSet"});
        raw["request"]["object"]["spec"] = serde_json::json!({"replicatedJobs": [
            {"name": "workers", "template": {"spec": {"template": {"spec": {"containers": []}}}}},
            {"name": "driver", "template": {"spec": {"template": {"metadata": {}, "spec": {"containers": []}}}}}
        ]});
        let (_, obj) = admit(&serde_json::to_vec(&raw).unwrap(), &config());
        for i in 0..2 {
            let m = template(&obj, &format!("/spec/replicatedJobs/{i}/template/spec/template/metadata"));
            assert_eq!(m["labels"]["ckptd.io/inject"], "true", "replicatedJobs[{i}]");
            assert_eq!(m["annotations"]["ckptd.io/store"], "oss://ckpt-bucket/llama");
        }

        // Without the label on the job, nothing is touched.
        raw["request"]["object"]["metadata"]["labels"] = serde_json::json!({"team": "llm"});
        assert!(review(&serde_json::to_vec(&raw).unwrap(), &config()).unwrap().patch.is_none());
    }
}

/// The workload identity that ACK's and EKS's pod-identity webhooks put into training containers.
mod identity {
    use super::*;
    use ckptd::webhook::mutate::{IDENTITY_ENV, has_agent};

    /// Every variable of the agent that ckptd did not define itself.
    fn foreign(c: &Container) -> BTreeMap<String, EnvVar> {
        env(c).into_iter().filter(|(k, _)| !k.starts_with("CKPTD_") && !k.starts_with("NVIDIA_")).collect()
    }

    fn mount<'a>(c: &'a Container, name: &str) -> Option<&'a k8s_openapi::api::core::v1::VolumeMount> {
        c.volume_mounts.iter().flatten().find(|m| m.name == name)
    }

    /// Runs `mutate` on a pod (as the API server would on a reinvocation) and applies the patch.
    fn remutate(obj: &Value, cfg: &Config) -> (usize, Value) {
        let patch = mutate(&pod(obj), cfg).expect("no denial");
        let mut out = obj.clone();
        json_patch::patch(&mut out, &patch).expect("patch applies");
        (patch.0.len(), out)
    }

    fn review_object(name: &str) -> Value {
        let raw: Value = serde_json::from_slice(&fixture(name)).unwrap();
        raw["request"]["object"].clone()
    }

    #[test]
    fn ack_rrsa_variables_and_token_reach_the_agent_and_nothing_else_does() {
        let (resp, obj) = admit(&fixture("ack-rrsa-pod.json"), &config());
        assert!(resp.allowed, "{:?}", resp.result);
        let p = pod(&obj);
        let a = agent(&p);
        let trainer = &p.spec.as_ref().unwrap().containers[0];
        let copied = foreign(&a);
        assert_eq!(
            copied.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "ALIBABA_CLOUD_OIDC_PROVIDER_ARN",
                "ALIBABA_CLOUD_OIDC_TOKEN_FILE",
                "ALIBABA_CLOUD_ROLE_ARN",
                "ALIBABA_CLOUD_STS_REGION",
                "ALIBABA_CLOUD_VPC_ENDPOINT_ENABLED",
            ],
            "the trainer's identity, and no secret (WANDB_API_KEY, HF_TOKEN, OSS_ACCESS_KEY_SECRET)"
        );
        for (name, var) in &copied {
            assert_eq!(Some(var), env(trainer).get(name), "{name} as the trainer has it");
        }
        let token = mount(&a, "rrsa-oidc-token").expect("the token volume in the agent");
        assert_eq!(token.mount_path, "/var/run/secrets/ack.alibabacloud.com/rrsa-tokens");
        assert_eq!(token.read_only, Some(true));
        let file = value(&a, "ALIBABA_CLOUD_OIDC_TOKEN_FILE").unwrap();
        assert!(file.starts_with(&format!("{}/", token.mount_path)), "{file} is on the mounted volume");
        assert!(mount(&a, "kube-api-access-7xk2p").is_none(), "the API token is not the store's identity");
        // A second pass has nothing left to add.
        assert_eq!(mutate(&p, &config()).map(|patch| patch.0.len()), Ok(0));
    }

    #[test]
    fn eks_irsa_variables_and_token_reach_the_agent_with_the_declared_layout() {
        let (resp, obj) = admit(&fixture("eks-irsa-pod.json"), &config());
        assert!(resp.allowed, "{:?}", resp.result);
        let p = pod(&obj);
        let a = agent(&p);
        let copied: Vec<String> = foreign(&a).into_keys().collect();
        assert_eq!(
            copied,
            ["AWS_REGION", "AWS_ROLE_ARN", "AWS_STS_REGIONAL_ENDPOINTS", "AWS_WEB_IDENTITY_TOKEN_FILE"],
            "the allow-list only: no AWS_ACCESS_KEY_ID, HF_TOKEN or AWS_DEFAULT_REGION"
        );
        assert_eq!(value(&a, "AWS_ROLE_ARN").as_deref(), Some("arn:aws:iam::111122223333:role/ckptd-checkpoints"));
        let token = mount(&a, "aws-iam-token").expect("the token volume in the agent");
        assert_eq!(
            (token.mount_path.as_str(), token.read_only),
            ("/var/run/secrets/eks.amazonaws.com/serviceaccount", Some(true))
        );
        assert_eq!(value(&a, "CKPTD_PARALLEL").as_deref(), Some("dp=4,tp=2,pp=1"));
        assert_eq!(value(&a, "CKPTD_WORLD_SIZE").as_deref(), Some("8"));
        assert_eq!(value(&a, "CKPTD_RANKS").as_deref(), Some("4-7"));
        assert!(value(&p.spec.as_ref().unwrap().containers[0], "CKPTD_PARALLEL").is_none(), "the agent's alone");
    }

    #[test]
    fn only_allow_listed_names_are_ever_copied() {
        // Every variable a trainer could carry that is not on the list stays with the trainer, whatever
        // its name looks like.
        let mut obj = review_object("ack-rrsa-pod.json");
        let env = obj["spec"]["containers"][0]["env"].as_array_mut().unwrap();
        for name in [
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
            "ALIBABA_CLOUD_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "ALIBABA_CLOUD_ROLE_SESSION_NAME",
            "alibaba_cloud_role_arn",
        ] {
            env.push(serde_json::json!({"name": name, "value": "x"}));
        }
        let (_, out) = remutate(&obj, &config());
        let a = agent(&pod(&out));
        for name in foreign(&a).keys() {
            assert!(IDENTITY_ENV.contains(&name.as_str()), "{name} was copied");
        }
        assert_eq!(foreign(&a).len(), 5);
    }

    /// The ACK fixture as it was before ACK's webhook ran: no identity anywhere.
    fn before_identity_webhook() -> Value {
        let mut obj = review_object("ack-rrsa-pod.json");
        let c = &mut obj["spec"]["containers"][0];
        c["env"].as_array_mut().unwrap().retain(|e| !e["name"].as_str().unwrap().starts_with("ALIBABA_CLOUD_"));
        c["volumeMounts"].as_array_mut().unwrap().retain(|m| m["name"] != "rrsa-oidc-token");
        obj["spec"]["volumes"].as_array_mut().unwrap().retain(|v| v["name"] != "rrsa-oidc-token");
        obj
    }

    /// What ACK's webhook adds to the containers named `names` (in either list), and the volume, as
    /// the fixture shows it.
    fn identity_webhook(obj: &mut Value, names: &[&str]) {
        let original = review_object("ack-rrsa-pod.json");
        let t = &original["spec"]["containers"][0];
        let vars: Vec<Value> = t["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"].as_str().unwrap().starts_with("ALIBABA_CLOUD_"))
            .cloned()
            .collect();
        let m = t["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "rrsa-oidc-token").unwrap().clone();
        for list in ["containers", "initContainers"] {
            for c in obj["spec"][list].as_array_mut().into_iter().flatten() {
                if names.contains(&c["name"].as_str().unwrap()) {
                    c["env"].as_array_mut().unwrap().extend(vars.iter().cloned());
                    c["volumeMounts"].as_array_mut().unwrap().push(m.clone());
                }
            }
        }
        let v =
            original["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "rrsa-oidc-token").unwrap();
        obj["spec"]["volumes"].as_array_mut().unwrap().push(v.clone());
    }

    #[test]
    fn a_reinvocation_after_the_identity_webhook_gives_the_agent_what_it_lacks_once() {
        for native in [true, false] {
            let cfg = Config::from_yaml("img:1", &format!("nativeSidecar: {native}\n")).unwrap();
            let (ops, mut obj) = remutate(&before_identity_webhook(), &cfg);
            assert!(ops > 0);
            assert!(foreign(&agent(&pod(&obj))).is_empty(), "no identity yet");
            let volumes = obj["spec"]["volumes"].as_array().unwrap().len();

            // ACK's webhook runs after ours and changes only the training container.
            identity_webhook(&mut obj, &["pytorch"]);
            let p = pod(&obj);
            assert!(has_agent(&p));
            let patch = mutate(&p, &cfg).unwrap();
            let list = if native { "initContainers" } else { "containers" };
            let agent_index = if native { 0 } else { 1 };
            for op in &patch.0 {
                let json_patch::PatchOperation::Add(add) = op else { panic!("only adds: {op:?}") };
                let path = add.path.to_string();
                assert!(path.starts_with(&format!("/spec/{list}/{agent_index}/")), "only the agent changes: {path}");
            }
            let (_, again) = remutate(&obj, &cfg);
            let p = pod(&again);
            let a = agent(&p);
            assert_eq!(foreign(&a).len(), 5, "native={native}");
            assert_eq!(mount(&a, "rrsa-oidc-token").map(|m| m.read_only), Some(Some(true)));
            // Nothing was injected twice.
            let spec = p.spec.as_ref().unwrap();
            assert_eq!(spec.volumes.as_ref().unwrap().len(), volumes + 1, "only ACK's volume was added");
            let t = &spec.containers[0];
            assert_eq!(t.env.iter().flatten().filter(|e| e.name == "CKPTD_SOCKET").count(), 1);
            assert_eq!(mounts(t).len(), t.volume_mounts.as_ref().unwrap().len(), "no mount twice in the trainer");
            // A third pass is a no-op: the passes converge.
            assert_eq!(mutate(&p, &cfg).map(|patch| patch.0.len()), Ok(0), "native={native}");
        }
    }

    #[test]
    fn an_identity_webhook_that_also_changed_the_agent_leaves_nothing_to_add() {
        let (_, mut obj) = remutate(&before_identity_webhook(), &config());
        identity_webhook(&mut obj, &["pytorch", "ckptd-agent"]);
        assert_eq!(mutate(&pod(&obj), &config()).map(|patch| patch.0.len()), Ok(0));
    }

    #[test]
    fn what_the_agent_already_has_is_kept() {
        let (_, mut obj) = remutate(&before_identity_webhook(), &config());
        identity_webhook(&mut obj, &["pytorch"]);
        let a = &mut obj["spec"]["initContainers"][0];
        a["env"].as_array_mut().unwrap().push(
            serde_json::json!({"name": "ALIBABA_CLOUD_ROLE_ARN", "value": "acs:ram::1234567890123456:role/agent-only"}),
        );
        a["volumeMounts"].as_array_mut().unwrap().push(serde_json::json!(
            {"name": "my-token", "mountPath": "/var/run/secrets/ack.alibabacloud.com/rrsa-tokens/"}
        ));
        obj["spec"]["volumes"].as_array_mut().unwrap().push(serde_json::json!({"name": "my-token", "emptyDir": {}}));
        let (_, out) = remutate(&obj, &config());
        let a = agent(&pod(&out));
        assert_eq!(
            value(&a, "ALIBABA_CLOUD_ROLE_ARN").as_deref(),
            Some("acs:ram::1234567890123456:role/agent-only"),
            "the agent's own value wins"
        );
        assert_eq!(a.env.iter().flatten().filter(|e| e.name == "ALIBABA_CLOUD_ROLE_ARN").count(), 1);
        assert_eq!(foreign(&a).len(), 5, "the others are added");
        assert!(mount(&a, "rrsa-oidc-token").is_none(), "the agent mounts something there already");
    }

    #[test]
    fn a_token_on_no_mounted_volume_copies_the_variables_only() {
        let mut obj = review_object("eks-irsa-pod.json");
        obj["spec"]["containers"][0]["volumeMounts"].as_array_mut().unwrap().retain(|m| m["name"] != "aws-iam-token");
        // A mount whose path is a prefix of the token's as a string, but not a parent directory.
        obj["spec"]["containers"][0]["volumeMounts"].as_array_mut().unwrap().push(
            serde_json::json!({"name": "aws-iam-token", "mountPath": "/var/run/secrets/eks.amazonaws.com/service"}),
        );
        let (_, out) = remutate(&obj, &config());
        let a = agent(&pod(&out));
        assert_eq!(
            value(&a, "AWS_WEB_IDENTITY_TOKEN_FILE").as_deref(),
            Some("/var/run/secrets/eks.amazonaws.com/serviceaccount/token")
        );
        assert!(mount(&a, "aws-iam-token").is_none(), "{:?}", a.volume_mounts);
    }
}

mod parallel {
    use super::*;

    fn eks_with(parallel: &str) -> kube::core::admission::AdmissionResponse {
        let mut raw: Value = serde_json::from_slice(&fixture("eks-irsa-pod.json")).unwrap();
        raw["request"]["object"]["metadata"]["annotations"]["ckptd.io/parallel"] = parallel.into();
        review(&serde_json::to_vec(&raw).unwrap(), &config()).unwrap()
    }

    #[test]
    fn a_layout_that_does_not_multiply_to_the_world_size_is_denied() {
        for ok in ["dp=8", "data=2,tensor=2,pipeline=2", "pp=8", "tp=2,dp=4"] {
            assert!(eks_with(ok).allowed, "{ok}: {:?}", eks_with(ok).result);
        }
        let resp = eks_with("dp=8,tp=2,pp=1");
        assert!(!resp.allowed && resp.patch.is_none());
        let msg = resp.result.message;
        assert!(
            msg.starts_with("ckptd: ckptd.io/parallel: dp=8,tp=2,pp=1 describes 16 ranks, but the job has 8"),
            "{msg}"
        );
        assert!(msg.contains("PET_NPROC_PER_NODE=4, PET_NNODES=2"), "says where the world size came from: {msg}");
    }

    #[test]
    fn without_a_world_size_the_layout_is_passed_on_in_canonical_form() {
        let (resp, obj) = admit(
            &{
                let mut raw: Value = serde_json::from_slice(&fixture("plain-pod.json")).unwrap();
                raw["request"]["object"]["metadata"]["annotations"]["ckptd.io/parallel"] = " tensor=5 , data=3".into();
                serde_json::to_vec(&raw).unwrap()
            },
            &config(),
        );
        assert!(resp.allowed, "{:?}", resp.result);
        let a = agent(&pod(&obj));
        assert_eq!(value(&a, "CKPTD_PARALLEL").as_deref(), Some("dp=3,tp=5,pp=1"), "the agent checks it");
        assert!(value(&a, "CKPTD_WORLD_SIZE").is_none());
        let text: ckptd::layout::Layout = value(&a, "CKPTD_PARALLEL").unwrap().parse().unwrap();
        assert_eq!(text.world_size(), 15);
        assert!(value(&a, "CKPTD_ON_RESIZE").is_none(), "no policy set: the agent's default, wait");
    }

    #[test]
    fn the_resize_policy_reaches_the_agent_which_reads_it_with_the_layout() {
        let (resp, obj) = admit(
            &{
                let mut raw: Value = serde_json::from_slice(&fixture("plain-pod.json")).unwrap();
                let ann = &mut raw["request"]["object"]["metadata"]["annotations"];
                ann["ckptd.io/parallel"] = "dp=4,tp=2".into();
                ann["ckptd.io/on-resize"] = "replicas".into();
                serde_json::to_vec(&raw).unwrap()
            },
            &config(),
        );
        assert!(resp.allowed, "{:?}", resp.result);
        let a = agent(&pod(&obj));
        let (on_resize, layout) = (value(&a, "CKPTD_ON_RESIZE"), value(&a, "CKPTD_PARALLEL"));
        assert_eq!(on_resize.as_deref(), Some("replicas"));
        assert_eq!(
            ckptd::resize::parse(on_resize.as_deref(), layout.as_deref()),
            Ok(ckpt_core::Resize::Replicas { tp: 2, pp: 1 }),
            "the agent's own parser reads what the webhook wrote"
        );
    }

    #[test]
    fn a_layout_on_the_job_reaches_its_pod_templates() {
        let mut raw: Value = serde_json::from_slice(&fixture("pytorchjob.json")).unwrap();
        raw["request"]["object"]["metadata"]["annotations"]["ckptd.io/parallel"] = "dp=2,tp=4".into();
        let (resp, obj) = admit(&serde_json::to_vec(&raw).unwrap(), &config());
        assert!(resp.allowed);
        let worker = &obj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"]["annotations"];
        assert_eq!(worker["ckptd.io/parallel"], "dp=2,tp=4");
    }
}
