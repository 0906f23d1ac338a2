//! deploy/kubernetes/*.yaml: every document parses into the real Kubernetes API types (and
//! survives a round trip, so a misspelt field cannot hide), and the files agree with each other
//! and with the binary: selectors match labels, named ports exist, RBAC grants what the picker
//! uses, and every flag in a container's args exists in that subcommand's `--help`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use epp_core::k8s::k8s_openapi;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Namespace, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn docs(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(root().join("deploy/kubernetes").join(file))
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(d).unwrap();
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Parse into `T` and require the typed value to serialise back to the same document: fields
/// the type does not know (typos, wrong nesting) would be dropped and fail this.
fn typed<T: DeserializeOwned + serde::Serialize>(file: &str, v: &Value) -> T {
    let t: T = serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{file}: {} does not parse: {e}", v["kind"]));
    let mut back = serde_json::to_value(&t).unwrap();
    let mut orig = v.clone();
    for x in [&mut back, &mut orig] {
        if let Some(o) = x.as_object_mut() {
            o.remove("apiVersion");
            o.remove("kind");
        }
    }
    if let Some(path) = first_difference(&orig, &back, String::new()) {
        panic!(
            "{file}: {} {}: field {path} is not part of the API type (misspelt or misplaced?)",
            v["kind"], v["metadata"]["name"]
        );
    }
    t
}

/// The JSON path of the first value present in `a` but missing or different in `b`.
fn first_difference(a: &Value, b: &Value, at: String) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => x.iter().find_map(|(k, va)| match y.get(k) {
            None => Some(format!("{at}.{k}")),
            Some(vb) => first_difference(va, vb, format!("{at}.{k}")),
        }),
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (va, vb))| first_difference(va, vb, format!("{at}[{i}]"))),
        _ => (a != b).then_some(at),
    }
}

fn kind<'a>(all: &'a [Value], k: &str) -> Vec<&'a Value> {
    all.iter().filter(|v| v["kind"] == k).collect()
}

/// `--flag` names appearing in a help text.
fn help_flags(args: &[&str]) -> (bool, BTreeSet<String>) {
    let out = Command::new(env!("CARGO_BIN_EXE_epp"))
        .args(args)
        .output()
        .expect("run epp");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let mut flags = BTreeSet::new();
    for (i, _) in text.match_indices("--") {
        let name: String = text[i + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if !name.is_empty() {
            flags.insert(format!("--{name}"));
        }
    }
    (out.status.success(), flags)
}

/// Flags `epp serve` adds to the shared picker flags (PROTOCOLS §4), used only while `epp
/// serve` is not built yet.
const SERVE_ONLY_FLAGS: &[&str] = &["--grpc-port", "--grpc-health-port"];

fn flags_of(container: &Container) -> Vec<String> {
    container
        .args
        .clone()
        .unwrap_or_default()
        .iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap().to_string())
        .collect()
}

fn check_args_against_help(container: &Container) {
    let args = container.args.clone().unwrap_or_default();
    let sub = args[0].as_str();
    let (ok, mut known) = help_flags(&[sub, "--help"]);
    assert!(ok, "epp {sub} --help failed");
    if sub == "serve" && !known.contains("--pool-name") {
        // `epp serve` is being written concurrently; until it lands, its flags are the shared
        // picker flags (visible on `epp proxy`) plus the gRPC ports.
        eprintln!("note: `epp serve --help` does not list the picker flags yet; checking against `epp proxy --help` + {SERVE_ONLY_FLAGS:?}");
        let (ok, proxy) = help_flags(&["proxy", "--help"]);
        assert!(ok);
        known.extend(proxy);
        known.extend(SERVE_ONLY_FLAGS.iter().map(|s| s.to_string()));
    }
    for f in flags_of(container) {
        assert!(
            known.contains(&f),
            "container {} uses {f}, which `epp {sub} --help` does not list",
            container.name
        );
    }
}

fn labels(v: &Option<BTreeMap<String, String>>) -> BTreeMap<String, String> {
    v.clone().unwrap_or_default()
}

fn subset(sel: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn grants(rules: &[PolicyRule], group: &str, resource: &str, verb: &str) -> bool {
    rules.iter().any(|r| {
        r.api_groups
            .as_ref()
            .is_some_and(|g| g.iter().any(|x| x == group))
            && r.resources
                .as_ref()
                .is_some_and(|g| g.iter().any(|x| x == resource))
            && r.verbs.iter().any(|v| v == verb || v == "*")
    })
}

#[test]
fn every_manifest_parses_into_kubernetes_types() {
    let mut files: Vec<_> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|f| f.ends_with(".yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 7, "{files:?}");
    for f in &files {
        for v in docs(f) {
            match v["kind"].as_str().unwrap() {
                "Namespace" => drop(typed::<Namespace>(f, &v)),
                "ServiceAccount" => drop(typed::<ServiceAccount>(f, &v)),
                "Service" => drop(typed::<Service>(f, &v)),
                "Deployment" => drop(typed::<Deployment>(f, &v)),
                "Role" => drop(typed::<Role>(f, &v)),
                "RoleBinding" => drop(typed::<RoleBinding>(f, &v)),
                "ClusterRole" => drop(typed::<ClusterRole>(f, &v)),
                "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(f, &v)),
                "InferencePool" => {
                    assert_eq!(v["apiVersion"], "inference.networking.k8s.io/v1");
                    drop(typed::<epp_core::k8s::pool::InferencePool>(f, &v))
                }
                other => panic!("{f}: unexpected kind {other}"),
            }
            if v["kind"] != "Namespace" && !v["kind"].as_str().unwrap().starts_with("Cluster") {
                assert_eq!(
                    v["metadata"]["namespace"], "llm-d",
                    "{f}: {}",
                    v["metadata"]["name"]
                );
            }
        }
    }
}

#[test]
fn picker_deployment_service_and_account_agree() {
    let d: Deployment = typed("deployment.yaml", &docs("deployment.yaml")[0]);
    let svc: Service = typed("service.yaml", &docs("service.yaml")[0]);
    let sa: ServiceAccount = typed("serviceaccount.yaml", &docs("serviceaccount.yaml")[0]);

    // Names the seed's users already rely on.
    assert_eq!(svc.metadata.name.as_deref(), Some("llm-d-gaie-epp"));
    assert_eq!(labels(&svc.metadata.labels)["app"], "llm-d-gaie-epp");
    assert_eq!(sa.metadata.name.as_deref(), Some("llm-d-gaie-epp"));

    let spec = d.spec.unwrap();
    let tmpl_labels = labels(&spec.template.metadata.as_ref().unwrap().labels);
    assert!(subset(&labels(&spec.selector.match_labels), &tmpl_labels));
    let svc_spec = svc.spec.unwrap();
    assert!(
        subset(&svc_spec.selector.clone().unwrap(), &tmpl_labels),
        "Service selector must match the picker pods"
    );
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.service_account_name, sa.metadata.name);
    let c = &pod.containers[0];
    let cports: BTreeMap<String, i32> = c
        .ports
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|p| (p.name.unwrap(), p.container_port))
        .collect();

    let want = [("grpc", 9002), ("grpc-health", 9003), ("metrics", 9090)];
    let sports: BTreeMap<String, (i32, Option<IntOrString>)> = svc_spec
        .ports
        .unwrap()
        .into_iter()
        .map(|p| (p.name.unwrap(), (p.port, p.target_port)))
        .collect();
    for (name, port) in want {
        let (p, target) = &sports[name];
        assert_eq!(*p, port, "Service port {name}");
        match target {
            Some(IntOrString::String(t)) => assert_eq!(
                cports.get(t),
                Some(&port),
                "Service port {name} targets container port {t}"
            ),
            other => panic!("Service port {name} should target a named port, not {other:?}"),
        }
    }
    // Probes use named container ports, and the flags bind those ports.
    for probe in [&c.readiness_probe, &c.liveness_probe] {
        let hg = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        let IntOrString::String(name) = &hg.port else {
            panic!("probe port should be named")
        };
        assert!(cports.contains_key(name), "probe port {name}");
    }
    let args = c.args.clone().unwrap();
    assert_eq!(args[0], "serve");
    let arg = |flag: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("{flag}=")))
            .map(str::to_string)
    };
    assert_eq!(arg("--grpc-port"), Some(cports["grpc"].to_string()));
    assert_eq!(
        arg("--grpc-health-port"),
        Some(cports["grpc-health"].to_string())
    );
    assert_eq!(
        arg("--metrics-bind-address"),
        Some(format!("0.0.0.0:{}", cports["metrics"]))
    );
    assert_eq!(
        arg("--health-probe-bind-address"),
        Some(format!("0.0.0.0:{}", cports["health"]))
    );
    assert_eq!(arg("--metrics-auth").as_deref(), Some("kubernetes"));
    // Leader election is on, so a rolling update could never finish (standbys are not ready).
    assert!(args.iter().any(|a| a == "--ha-enable-leader-election"));
    assert_eq!(spec.strategy.unwrap().type_.as_deref(), Some("Recreate"));
    // The pool it names is the example pool, in its namespace.
    let pool: epp_core::k8s::pool::InferencePool =
        typed("inferencepool.yaml", &docs("inferencepool.yaml")[0]);
    assert_eq!(arg("--pool-name"), pool.metadata.name);
    assert_eq!(arg("--pool-namespace"), pool.metadata.namespace);
    // The pool points back at this Service's ext_proc port.
    let epr = pool.spec.endpoint_picker_ref.unwrap();
    assert_eq!(Some(epr.name), svc.metadata.name);
    assert_eq!(epr.port.unwrap().number, 9002);
    // POD_NAMESPACE / POD_NAME feed namespace defaults and the leader identity.
    let env: BTreeSet<String> = c.env.clone().unwrap().into_iter().map(|e| e.name).collect();
    assert!(env.contains("POD_NAME") && env.contains("POD_NAMESPACE"));
}

#[test]
fn inference_pool_selects_the_simulator_pods() {
    let pool: epp_core::k8s::pool::InferencePool =
        typed("inferencepool.yaml", &docs("inferencepool.yaml")[0]);
    let sim: Deployment = typed("sim-deployment.yaml", &docs("sim-deployment.yaml")[0]);
    let spec = sim.spec.unwrap();
    let pod_labels = labels(&spec.template.metadata.as_ref().unwrap().labels);
    assert!(subset(&pool.spec.selector.match_labels, &pod_labels));
    assert!(subset(&labels(&spec.selector.match_labels), &pod_labels));
    assert_eq!(
        pod_labels
            .get(epp_core::k8s::discovery::ENGINE_LABEL)
            .map(String::as_str),
        Some("vllm")
    );
    let c = &spec.template.spec.unwrap().containers[0];
    let cports: BTreeSet<i32> = c
        .ports
        .clone()
        .unwrap()
        .iter()
        .map(|p| p.container_port)
        .collect();
    for p in pool.ports().unwrap() {
        assert!(
            cports.contains(&i32::from(p)),
            "pool port {p} is a sim container port"
        );
    }
    let args = c.args.clone().unwrap();
    assert_eq!(args[0], "sim");
    assert!(args.iter().any(|a| a == "--base-port=8000"));
}

#[test]
fn rbac_grants_exactly_what_the_picker_and_prometheus_use() {
    let all = docs("rbac.yaml");
    let sa = ("llm-d-gaie-epp", "llm-d");
    let bound_to =
        |binding: &Value, sa: (&str, &str)| {
            binding["subjects"].as_array().unwrap().iter().any(|s| {
                s["kind"] == "ServiceAccount" && s["name"] == sa.0 && s["namespace"] == sa.1
            })
        };
    let roles: Vec<Role> = kind(&all, "Role")
        .into_iter()
        .map(|v| typed("rbac.yaml", v))
        .collect();
    let croles: Vec<ClusterRole> = kind(&all, "ClusterRole")
        .into_iter()
        .map(|v| typed("rbac.yaml", v))
        .collect();
    // Every binding refers to a role defined here (or a built-in one).
    let mut picker_rules = Vec::new();
    for b in kind(&all, "RoleBinding") {
        let rb: RoleBinding = typed("rbac.yaml", b);
        let r = roles
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some(rb.role_ref.name.as_str()))
            .unwrap_or_else(|| panic!("RoleBinding refers to missing Role {}", rb.role_ref.name));
        if bound_to(b, sa) {
            picker_rules.extend(r.rules.clone().unwrap_or_default());
        }
    }
    let mut prometheus_can_read = false;
    for b in kind(&all, "ClusterRoleBinding") {
        let crb: ClusterRoleBinding = typed("rbac.yaml", b);
        let r = croles
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some(crb.role_ref.name.as_str()))
            .unwrap_or_else(|| {
                panic!(
                    "binding refers to missing ClusterRole {}",
                    crb.role_ref.name
                )
            });
        let rules = r.rules.clone().unwrap_or_default();
        if bound_to(b, sa) {
            picker_rules.extend(rules.clone());
        }
        if bound_to(b, ("prometheus", "llm-d-monitoring")) {
            prometheus_can_read |= rules.iter().any(|r| {
                r.non_resource_urls
                    .as_ref()
                    .is_some_and(|u| u.iter().any(|u| u == "/metrics"))
                    && r.verbs.iter().any(|v| v == "get")
            });
        }
    }
    for verb in ["get", "list", "watch"] {
        assert!(grants(&picker_rules, "", "pods", verb), "pods {verb}");
        assert!(
            grants(
                &picker_rules,
                "inference.networking.k8s.io",
                "inferencepools",
                verb
            ),
            "inferencepools {verb}"
        );
        for group in ["llm-d.ai", "inference.networking.x-k8s.io"] {
            assert!(
                grants(&picker_rules, group, "inferenceobjectives", verb),
                "{group} inferenceobjectives {verb}"
            );
        }
    }
    for verb in ["get", "create", "update"] {
        assert!(
            grants(&picker_rules, "coordination.k8s.io", "leases", verb),
            "leases {verb}"
        );
    }
    assert!(grants(
        &picker_rules,
        "authentication.k8s.io",
        "tokenreviews",
        "create"
    ));
    assert!(grants(
        &picker_rules,
        "authorization.k8s.io",
        "subjectaccessreviews",
        "create"
    ));
    assert!(
        prometheus_can_read,
        "prometheus must be bound to metrics-reader"
    );

    // The ClusterRole a 403 tells users to bind is this one, exactly as the issue specifies.
    let reader = croles
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some(epp_core::k8s::auth::METRICS_READER_ROLE))
        .expect("metrics-reader ClusterRole");
    let rules = reader.rules.clone().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].non_resource_urls.as_deref(),
        Some(&["/metrics".to_string()][..])
    );
    assert_eq!(rules[0].verbs, vec!["get".to_string()]);
    // The manifest the picker's 500 message names exists.
    assert!(root().join(epp_core::k8s::auth::RBAC_MANIFEST).is_file());
}

#[test]
fn the_monitoring_service_monitor_finds_this_service() {
    let svc: Service = typed("service.yaml", &docs("service.yaml")[0]);
    let text =
        std::fs::read_to_string(root().join("deploy/monitoring/servicemonitor.yaml")).unwrap();
    let sm: Value = serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            serde_json::to_value(<serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap())
                .unwrap()
        })
        .find(|v| v["kind"] == "ServiceMonitor")
        .expect("ServiceMonitor");
    let sel: BTreeMap<String, String> =
        serde_json::from_value(sm["spec"]["selector"]["matchLabels"].clone()).unwrap();
    assert!(subset(&sel, &labels(&svc.metadata.labels)));
    assert_eq!(sm["spec"]["namespaceSelector"]["matchNames"][0], "llm-d");
    let port = sm["spec"]["endpoints"][0]["port"].as_str().unwrap();
    assert!(svc
        .spec
        .unwrap()
        .ports
        .unwrap()
        .iter()
        .any(|p| p.name.as_deref() == Some(port)));
}

#[test]
fn every_flag_in_container_args_exists_in_the_binary() {
    for (file, idx) in [("deployment.yaml", 0), ("sim-deployment.yaml", 0)] {
        let d: Deployment = typed(file, &docs(file)[idx]);
        for c in d.spec.unwrap().template.spec.unwrap().containers {
            check_args_against_help(&c);
        }
    }
}

#[test]
fn documented_flags_exist() {
    // Every flag in docs/kubernetes.md's flag tables is a real flag of `epp serve`/`epp proxy`.
    let text = std::fs::read_to_string(root().join("docs/kubernetes.md")).unwrap();
    let (_, mut known) = help_flags(&["proxy", "--help"]);
    known.extend(help_flags(&["serve", "--help"]).1);
    known.extend(SERVE_ONLY_FLAGS.iter().map(|s| s.to_string()));
    let mut n = 0;
    for line in text.lines().filter(|l| l.starts_with("| `--")) {
        let flag: String = line[3..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        assert!(
            known.contains(&flag),
            "docs/kubernetes.md documents {flag}, which epp does not have"
        );
        n += 1;
    }
    assert!(
        n >= 15,
        "expected the flag tables in docs/kubernetes.md, found {n} rows"
    );
}

#[test]
fn the_active_active_variant_reaches_its_redis_with_its_password() {
    let d: Deployment = typed(
        "active-active/deployment.yaml",
        &docs("active-active/deployment.yaml")[0],
    );
    let redis_docs = docs("active-active/redis.yaml");
    let redis: Deployment = typed("active-active/redis.yaml", &redis_docs[0]);
    let redis_svc: Service = typed("active-active/redis.yaml", &redis_docs[1]);
    let svc: Service = typed("service.yaml", &docs("service.yaml")[0]);
    // The picker pods are the ones the shipped Service selects, so only the Deployment changes.
    let spec = d.spec.as_ref().unwrap();
    let pod_labels = labels(&spec.template.metadata.as_ref().unwrap().labels);
    let sel: BTreeMap<String, String> = svc.spec.as_ref().unwrap().selector.clone().unwrap();
    assert!(subset(&sel, &pod_labels), "{sel:?} vs {pod_labels:?}");
    assert!(spec.replicas.unwrap() >= 2);
    assert_eq!(
        spec.strategy.as_ref().unwrap().type_.as_deref(),
        Some("RollingUpdate")
    );
    let pod = spec.template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    check_args_against_help(c);
    let args = c.args.clone().unwrap();
    let arg = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .unwrap_or_else(|| panic!("no --{name} in {args:?}"))
            .to_string()
    };
    assert_eq!(arg("ha-mode"), "active-active");
    assert!(
        !args.iter().any(|a| a.contains("leader-election")),
        "{args:?}"
    );
    // --shared-state names the Redis Service and its port.
    let url = arg("shared-state");
    let hostport = url.strip_prefix("redis://").unwrap();
    let (host, port) = hostport.rsplit_once(':').unwrap();
    let rsvc_name = redis_svc.metadata.name.as_deref().unwrap();
    let rsvc_ns = redis_svc.metadata.namespace.as_deref().unwrap();
    assert_eq!(host, format!("{rsvc_name}.{rsvc_ns}.svc"));
    let rport = &redis_svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!(port, rport.port.to_string());
    // The Redis Service selects the Redis pods.
    let rsel = redis_svc.spec.as_ref().unwrap().selector.clone().unwrap();
    let rlabels = labels(
        &redis
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels,
    );
    assert!(subset(&rsel, &rlabels));
    // The password file the flag names is mounted from the Secret the Redis pod reads too.
    let pw = arg("shared-state-password-file");
    let (dir, file) = pw.rsplit_once('/').unwrap();
    let mount = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.mount_path == dir)
        .expect("the password directory is mounted");
    let secret_of = |pod: &k8s_openapi::api::core::v1::PodSpec, vol: &str| {
        let v = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == vol)
            .unwrap();
        let s = v.secret.as_ref().unwrap();
        let item = &s.items.as_ref().unwrap()[0];
        (
            s.secret_name.clone().unwrap(),
            item.key.clone(),
            item.path.clone(),
        )
    };
    let (secret, _key, path) = secret_of(pod, &mount.name);
    assert_eq!(path, file);
    let rpod = redis.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let rmount = &rpod.containers[0].volume_mounts.as_ref().unwrap()[0];
    assert_eq!(secret_of(rpod, &rmount.name).0, secret);
    let rargs = rpod.containers[0].args.clone().unwrap().join(" ");
    assert!(
        rargs.contains("--requirepass")
            && rargs.contains(&format!("{}/{}", rmount.mount_path, path)),
        "{rargs}"
    );
}

/// The picker Deployment in `file` takes only flags its subcommand has and mounts ConfigMap
/// `cm_name` so that its `key` is where `--config-file` points.
fn picker_mounts_its_config(file: &str, cm_name: &str, key: &str) {
    let d: Deployment = typed(file, &docs(file)[0]);
    let pod = d.spec.unwrap().template.spec.unwrap();
    let c = &pod.containers[0];
    check_args_against_help(c);
    let cfg_path = c
        .args
        .as_ref()
        .unwrap()
        .iter()
        .find_map(|a| a.strip_prefix("--config-file="))
        .unwrap_or_else(|| panic!("{file}: no --config-file"))
        .to_string();
    let mount = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| cfg_path.starts_with(&format!("{}/", m.mount_path)))
        .unwrap_or_else(|| panic!("{file}: nothing mounted at {cfg_path}"));
    assert_eq!(cfg_path, format!("{}/{key}", mount.mount_path), "{file}");
    let vol = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == mount.name)
        .unwrap();
    assert_eq!(vol.config_map.as_ref().unwrap().name, cm_name, "{file}");
}

#[test]
fn the_precise_variant_subscribes_where_its_pods_publish() {
    use k8s_openapi::api::core::v1::ConfigMap;
    let cm: ConfigMap = typed(
        "precise/epp-config.yaml",
        &docs("precise/epp-config.yaml")[0],
    );
    let cm_name = cm.metadata.name.clone().unwrap();
    let (key, text) = cm.data.as_ref().unwrap().iter().next().unwrap();
    let cfg = epp_core::config::EndpointPickerConfig::from_yaml(text).unwrap();
    let s = epp_core::scheduler::Scheduler::from_config(&cfg).unwrap();
    let (_, precise) = s.precise().expect("a precise producer");
    let sub = &precise.subscriptions;
    let (pub_port, replay_port) = (
        i32::from(sub.socket_port),
        i32::from(sub.replay_port.expect("replay on")),
    );
    let filter = sub.topic_filter.as_str();
    assert!(precise.speculative.is_some());
    assert_eq!(precise.index.max_keys, 1_000_000);
    picker_mounts_its_config("precise/deployment.yaml", &cm_name, key);
    // What the config expects of the pods: the ports it dials, the topic prefix it subscribes
    // to, the model its keys are chained from, and the Service it asks for token ids.
    let raw: serde_yaml::Value = serde_yaml::from_str(text).unwrap();
    let plugin = |ty: &str| -> serde_yaml::Value {
        raw["plugins"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["type"] == ty)
            .unwrap_or_else(|| panic!("no {ty}"))["parameters"]
            .clone()
    };
    let tok = plugin("token-producer");
    let model = tok["modelName"].as_str().unwrap().to_string();
    let url = tok["vllm"]["url"].as_str().unwrap();
    let (host, port) = url
        .strip_prefix("http://")
        .unwrap()
        .rsplit_once(':')
        .unwrap();
    let svc_name = host.split('.').next().unwrap();
    let pool: epp_core::k8s::pool::InferencePool =
        typed("inferencepool.yaml", &docs("inferencepool.yaml")[0]);
    let pool_sel = serde_json::to_value(&pool).unwrap()["spec"]["selector"]["matchLabels"].clone();
    let pool_sel: BTreeMap<String, String> = serde_json::from_value(pool_sel).unwrap();
    for file in ["precise/vllm.yaml", "precise/sim.yaml"] {
        let all = docs(file);
        let d: Deployment = typed(file, &all[0]);
        let t = d.spec.unwrap().template;
        let l = labels(&t.metadata.unwrap().labels);
        assert!(subset(&pool_sel, &l), "{file}: {l:?} not in the pool");
        let c = &t.spec.unwrap().containers[0];
        let args = c.args.clone().unwrap();
        // (endpoint, replay endpoint, topic) as each server is told them.
        let (endpoint, replay, topic, served) = if file == "precise/sim.yaml" {
            check_args_against_help(c);
            let flag = |f: &str| {
                args.iter()
                    .find_map(|a| a.strip_prefix(&format!("--{f}=")))
                    .unwrap_or_else(|| panic!("{file}: no --{f}"))
                    .to_string()
            };
            (
                flag("kv-events-endpoint"),
                flag("kv-events-replay-endpoint"),
                flag("kv-events-topic"),
                flag("model"),
            )
        } else {
            let json = args
                .iter()
                .find_map(|a| a.strip_prefix("--kv-events-config="))
                .unwrap_or_else(|| panic!("{file}: no --kv-events-config"));
            let kv: Value = serde_json::from_str(json)
                .unwrap_or_else(|e| panic!("{file}: --kv-events-config is not JSON: {e}"));
            assert_eq!(kv["enable_kv_cache_events"], true, "{file}");
            assert_eq!(kv["publisher"], "zmq", "{file}");
            let served = args
                .iter()
                .find_map(|a| a.strip_prefix("--model="))
                .unwrap()
                .to_string();
            let s = |k: &str| kv[k].as_str().unwrap().to_string();
            (s("endpoint"), s("replay_endpoint"), s("topic"), served)
        };
        let port_of = |e: &str| -> i32 { e.rsplit_once(':').unwrap().1.parse().unwrap() };
        assert_eq!(port_of(&endpoint), pub_port, "{file}: {endpoint}");
        assert_eq!(port_of(&replay), replay_port, "{file}: {replay}");
        assert!(topic.starts_with(filter), "{file}: {topic} vs {filter}");
        assert_eq!(served, model, "{file}");
        assert!(
            topic.ends_with(&format!("@{model}")),
            "{file}: the topic names the model the keys are chained from: {topic}"
        );
        // The topic's pod part is the pod IP from the downward API, expanded by Kubernetes.
        assert!(topic.contains("$(POD_IP)"), "{file}: {topic}");
        let env = c.env.clone().unwrap_or_default();
        let ip = env.iter().find(|e| e.name == "POD_IP").unwrap();
        assert_eq!(
            ip.value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "status.podIP"
        );
        let ports = c.ports.clone().unwrap_or_default();
        for p in [pub_port, replay_port] {
            assert!(
                ports.iter().any(|x| x.container_port == p),
                "{file}: port {p} not declared"
            );
        }
        // The render Service selects these pods and serves the token-producer's port.
        let svc: Service = typed(file, &all[1]);
        assert_eq!(svc.metadata.name.as_deref(), Some(svc_name), "{file}");
        let spec = svc.spec.unwrap();
        assert!(subset(&spec.selector.unwrap(), &l), "{file}");
        let sp = &spec.ports.unwrap()[0];
        assert_eq!(sp.port.to_string(), port, "{file}");
        match sp.target_port.as_ref().unwrap() {
            IntOrString::String(n) => assert!(
                ports.iter().any(|x| x.name.as_deref() == Some(n)),
                "{file}: no port named {n}"
            ),
            IntOrString::Int(n) => assert!(ports.iter().any(|x| x.container_port == *n)),
        }
    }
}

#[test]
fn the_pd_variant_loads_its_config_and_its_pods_carry_the_roles_the_filters_read() {
    use k8s_openapi::api::core::v1::ConfigMap;
    let cm: ConfigMap = typed("pd/epp-config.yaml", &docs("pd/epp-config.yaml")[0]);
    let cm_name = cm.metadata.name.clone().unwrap();
    let (key, text) = cm.data.as_ref().unwrap().iter().next().unwrap();
    let cfg = epp_core::config::EndpointPickerConfig::from_yaml(text).unwrap();
    let s = epp_core::scheduler::Scheduler::from_config(&cfg).unwrap();
    match s.plan() {
        epp_core::scheduler::HandlerPlan::Disagg(p) => {
            assert!(
                p.prefill.as_ref().is_some_and(|(_, d)| d.is_some()),
                "a decided prefill stage"
            )
        }
        _ => panic!("pd/epp-config.yaml does not disaggregate: {}", s.describe()),
    }
    // Both pickers (serve behind Envoy, proxy without) mount that ConfigMap where --config-file
    // points, and take only flags their subcommand has.
    for file in ["pd/deployment.yaml", "pd/proxy.yaml"] {
        picker_mounts_its_config(file, &cm_name, key);
    }
    // The proxy's Service selects the proxy pods.
    let pdocs = docs("pd/proxy.yaml");
    let pd: Deployment = typed("pd/proxy.yaml", &pdocs[0]);
    let psvc: Service = typed("pd/proxy.yaml", &pdocs[1]);
    let plabels = labels(&pd.spec.unwrap().template.metadata.unwrap().labels);
    assert!(subset(&psvc.spec.unwrap().selector.unwrap(), &plabels));
    // Model-server pods: in the InferencePool, and labelled with the role they serve; the
    // simulators run that role.
    let pool: epp_core::k8s::pool::InferencePool =
        typed("inferencepool.yaml", &docs("inferencepool.yaml")[0]);
    let pool_sel = serde_json::to_value(&pool).unwrap()["spec"]["selector"]["matchLabels"].clone();
    let pool_sel: BTreeMap<String, String> = serde_json::from_value(pool_sel).unwrap();
    let mut roles = BTreeSet::new();
    for file in ["pd/sim.yaml", "pd/vllm.yaml"] {
        for v in docs(file) {
            let d: Deployment = typed(file, &v);
            let t = d.spec.unwrap().template;
            let l = labels(&t.metadata.unwrap().labels);
            assert!(subset(&pool_sel, &l), "{file}: {l:?} not in the pool");
            let role = l["llm-d.ai/role"].clone();
            assert!(role == "prefill" || role == "decode", "{file}: {role}");
            roles.insert(role.clone());
            let c = &t.spec.unwrap().containers[0];
            if file == "pd/sim.yaml" {
                check_args_against_help(c);
                assert!(
                    c.args.as_ref().unwrap().contains(&format!("--role={role}")),
                    "{file}"
                );
            }
        }
    }
    assert_eq!(roles.len(), 2);
}
