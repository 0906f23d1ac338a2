//! The monitoring assets of `deploy/monitoring/`, checked without a running picker:
//! promtool on the rules and static scrape configs, the rules' unit tests, the two forms of the
//! rules and of the dashboard kept equal, the PromQL of every shipped query (parses, quantiles
//! over `sum by (le)`, ratios summed on both sides, metric names from the contract), and the
//! job label of every scrape path.
//!
//! `cargo test -p epp --test monitoring_assets`. Needs `promtool` (EPP_PROMTOOL_BIN or PATH;
//! `scripts/test` installs Debian's prometheus package). Without it the promtool tests fail.

#[path = "support/monitoring.rs"]
mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::*;
use promql_parser::parser::Expr;
use serde_yaml::Value as Yaml;

/// The metric families the picker exports (docs/monitoring.md lists them; METRICS.md is the
/// contract): the seed's seven, the process collector, the extras, and Prometheus' own `up`.
/// Shipped queries may only read these. monitoring_exposition.rs checks them against the
/// picker's real exposition.
const CONTRACT_METRICS: &[&str] = &[
    // the seed's names, exactly
    "epp_requests_total",
    "epp_request_duration_seconds",
    "epp_cache_requests_total",
    "epp_cache_hits_total",
    "epp_routing_decisions_total",
    "epp_backend_health",
    "epp_pods_discovered",
    // beyond the seed
    "epp_backend_queue_size",
    "epp_backend_running_requests",
    "epp_backend_kv_cache_usage_ratio",
    "epp_backend_inflight_requests",
    "epp_backend_scrape_errors_total",
    "epp_backend_metrics_age_seconds",
    "epp_plugin_duration_seconds",
    "epp_prefix_index_blocks",
    "epp_prefix_index_capacity_blocks",
    "epp_prefix_index_evictions_total",
    "epp_build_info",
    "epp_backend_cached_tokens_total",
    "epp_backend_predicted_cached_tokens_total",
    // llm-d-router's flow-control families (series only with featureGates: [flowControl])
    "llm_d_epp_flow_control_pool_saturation",
    "llm_d_epp_flow_control_queue_size",
    "llm_d_epp_flow_control_requests_total",
    "llm_d_epp_flow_control_request_queue_duration_seconds",
    // prefill/decode disaggregation (series only with a disaggregating profile handler; the
    // prefill calls only in proxy mode)
    "llm_d_epp_disagg_decision_total",
    "llm_d_epp_pd_decision_total",
    "epp_pd_prefill_requests_total",
    "epp_pd_prefill_duration_seconds",
    // active-active shared state (series only with --shared-state)
    "epp_shared_state_up",
    "epp_shared_state_replicas",
    "epp_shared_state_deltas_sent_total",
    "epp_shared_state_deltas_applied_total",
    "epp_shared_state_deltas_dropped_total",
    "epp_shared_state_lag_seconds",
    "epp_shared_state_snapshot_age_seconds",
    // process collector
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
    "process_threads",
    // written by Prometheus for every target
    "up",
];

fn all_queries() -> Vec<Query> {
    let mut qs = dashboard_queries(&json(DASHBOARD));
    qs.extend(alerts().into_iter().map(|a| Query {
        origin: format!("alert {}", a.name),
        expr: a.expr,
    }));
    qs
}

fn str_at<'a>(v: &'a Yaml, path: &[&str]) -> &'a str {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_str()
        .unwrap_or_else(|| panic!("expected a string at {path:?} in {v:?}"))
}

// ------------------------------------------------------------------------------------------
// promtool
// ------------------------------------------------------------------------------------------

#[test]
fn promtool_check_rules() {
    let out = run_ok(
        Command::new(promtool())
            .current_dir(monitoring_dir().join("rules"))
            .args(["check", "rules", "epp-alerts.rules.yaml"]),
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn promtool_test_rules() {
    let out = run_ok(
        Command::new(promtool())
            .current_dir(monitoring_dir().join("rules"))
            .args(["test", "rules", "epp-alerts.test.yaml"]),
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn promtool_check_static_scrape_configs() {
    let out = run_ok(
        Command::new(promtool())
            .args(["check", "config"])
            .arg(repo_root().join(SCRAPE_STATIC)),
    );
    assert!(out.contains("SUCCESS"), "{out}");

    // The token variant names a credentials file relative to the config; promtool checks that
    // it exists, so check a copy next to a token file, as its header comment describes.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("scrape-static-token.yaml");
    std::fs::write(&cfg, read(SCRAPE_STATIC_TOKEN)).unwrap();
    let cred = yaml(SCRAPE_STATIC_TOKEN)["scrape_configs"][0]["authorization"]["credentials_file"]
        .as_str()
        .expect("credentials_file")
        .to_string();
    assert!(
        !cred.starts_with('/'),
        "the token file is relative to the config: {cred}"
    );
    std::fs::write(dir.path().join(&cred), "s3cret\n").unwrap();
    let out = run_ok(Command::new(promtool()).args(["check", "config"]).arg(&cfg));
    assert!(out.contains("SUCCESS"), "{out}");
}

// ------------------------------------------------------------------------------------------
// Rules
// ------------------------------------------------------------------------------------------

#[test]
fn prometheusrule_has_the_same_groups_as_the_rules_file() {
    let rules = yaml(RULES);
    let pr = yaml(PROMETHEUS_RULE);
    assert_eq!(str_at(&pr, &["apiVersion"]), "monitoring.coreos.com/v1");
    assert_eq!(str_at(&pr, &["kind"]), "PrometheusRule");
    assert_eq!(
        str_at(&pr, &["metadata", "labels", "release"]),
        "kube-prometheus-stack"
    );
    assert_eq!(
        rules["groups"], pr["spec"]["groups"],
        "prometheusrule.yaml is out of date: run deploy/monitoring/make-prometheusrule.sh"
    );
    // and the file is exactly what the generator writes
    let generated = run_ok(
        Command::new("bash")
            .arg(monitoring_dir().join("make-prometheusrule.sh"))
            .arg("--stdout"),
    );
    assert_eq!(
        generated,
        read(PROMETHEUS_RULE),
        "run deploy/monitoring/make-prometheusrule.sh"
    );
}

#[test]
fn every_alert_has_severity_summary_description_and_for() {
    let alerts = alerts();
    let names: BTreeSet<_> = alerts.iter().map(|a| a.name.as_str()).collect();
    for required in [
        "EPPHighLatency",
        "EPPCacheHitRateLow",
        "EPPNoHealthyBackends",
        "EPPHighErrorRatio",
        "EPPTargetDown",
        "EPPBackendMetricsStale",
        "EPPPrefixIndexChurning",
        "EPPCachePredictionGap",
        "EPPFlowControlShedding",
    ] {
        assert!(names.contains(required), "missing alert {required}");
    }
    assert_eq!(names.len(), alerts.len(), "duplicate alert names");
    for a in &alerts {
        let sev = a.rule["labels"]["severity"].as_str();
        assert!(
            matches!(sev, Some("warning" | "critical" | "info")),
            "{}: severity {sev:?}",
            a.name
        );
        for ann in ["summary", "description"] {
            let text = a.rule["annotations"][ann].as_str().unwrap_or("");
            assert!(!text.trim().is_empty(), "{}: no {ann}", a.name);
        }
        assert!(a.rule["for"].as_str().is_some(), "{}: no `for`", a.name);
    }
}

#[test]
fn the_seeds_alerts_keep_their_thresholds() {
    let by_name = |n: &str| {
        alerts()
            .into_iter()
            .find(|a| a.name == n)
            .unwrap_or_else(|| panic!("{n}"))
    };
    let squash = |s: &str| s.split_whitespace().collect::<String>();
    let lat = by_name("EPPHighLatency");
    assert!(squash(&lat.expr).ends_with(">0.1"), "{}", lat.expr);
    assert_eq!(lat.rule["for"].as_str(), Some("2m"));
    assert_eq!(lat.rule["labels"]["severity"].as_str(), Some("warning"));
    let hit = by_name("EPPCacheHitRateLow");
    assert!(squash(&hit.expr).ends_with("<0.5"), "{}", hit.expr);
    assert_eq!(hit.rule["for"].as_str(), Some("5m"));
    assert_eq!(hit.rule["labels"]["severity"].as_str(), Some("warning"));
    let none = by_name("EPPNoHealthyBackends");
    assert!(squash(&none.expr).contains("sumby(job)(epp_backend_health)"));
    assert!(squash(&none.expr).ends_with("==0"), "{}", none.expr);
    assert_eq!(none.rule["for"].as_str(), Some("1m"));
    assert_eq!(none.rule["labels"]["severity"].as_str(), Some("critical"));
    let down = by_name("EPPTargetDown");
    assert!(
        squash(&down.expr).contains(&format!("up{{job=\"{JOB}\"}}")),
        "{}",
        down.expr
    );
}

/// Every alert appears in the promtool unit tests at least once firing (non-empty
/// `exp_alerts`) and at least once not firing (empty `exp_alerts`).
#[test]
fn every_alert_is_unit_tested_firing_and_not_firing() {
    let tests = yaml(RULES_TEST);
    assert_eq!(
        tests["rule_files"][0].as_str(),
        Some("epp-alerts.rules.yaml")
    );
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for t in tests["tests"].as_sequence().expect("tests") {
        for case in t["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = case["alertname"].as_str().expect("alertname").to_string();
            let exp = case["exp_alerts"].as_sequence().map(Vec::len).unwrap_or(0);
            if exp > 0 {
                firing.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }
    for a in alerts() {
        assert!(firing.contains(&a.name), "{} is never shown firing", a.name);
        assert!(
            quiet.contains(&a.name),
            "{} is never shown not firing",
            a.name
        );
    }
}

// ------------------------------------------------------------------------------------------
// PromQL of every shipped query
// ------------------------------------------------------------------------------------------

#[test]
fn every_shipped_query_parses_and_has_sound_quantiles_and_ratios() {
    let queries = all_queries();
    assert!(queries.len() > 20, "only {} queries found", queries.len());
    let mut problems = Vec::new();
    for q in &queries {
        match parse(&q.expr) {
            Err(e) => problems.push(format!("{}: does not parse: {e}\n  {}", q.origin, q.expr)),
            Ok(e) => {
                for p in quantile_problems(&e).into_iter().chain(ratio_problems(&e)) {
                    problems.push(format!("{}: {p}", q.origin));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn shipped_queries_read_only_contract_metrics() {
    let dashboard = json(DASHBOARD);
    let contract: BTreeSet<String> = CONTRACT_METRICS.iter().map(|s| s.to_string()).collect();
    let mut used = dashboard_variable_metrics(&dashboard);
    for q in all_queries() {
        used.extend(metric_names(&parse(&q.expr).unwrap()));
    }
    let unknown: Vec<_> = used.difference(&contract).collect();
    assert!(
        unknown.is_empty(),
        "not in the metrics contract: {unknown:?}"
    );
    // The issue asks for these families on the dashboard or in the alerts.
    for needed in [
        "epp_requests_total",
        "epp_request_duration_seconds",
        "epp_cache_hits_total",
        "epp_cache_requests_total",
        "epp_routing_decisions_total",
        "epp_backend_health",
        "epp_pods_discovered",
        "epp_backend_running_requests",
        "epp_backend_queue_size",
        "epp_backend_kv_cache_usage_ratio",
        "epp_plugin_duration_seconds",
        "epp_prefix_index_blocks",
        "epp_backend_metrics_age_seconds",
        "epp_prefix_index_evictions_total",
    ] {
        assert!(used.contains(needed), "no shipped query reads {needed}");
    }
}

// ------------------------------------------------------------------------------------------
// Dashboard
// ------------------------------------------------------------------------------------------

#[test]
fn dashboard_has_datasource_and_job_variables() {
    let d = json(DASHBOARD);
    assert!(
        d["title"].as_str().is_some_and(|t| !t.is_empty()),
        "a dashboard without a title is rejected by Grafana"
    );
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty()));
    assert!(
        d.get("__inputs").is_none(),
        "the raw model for file provisioning must not need __inputs"
    );
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |n: &str| {
        vars.iter()
            .find(|v| v["name"] == n)
            .unwrap_or_else(|| panic!("no variable {n}"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let job = var("job");
    assert_eq!(job["current"]["value"], JOB, "$job must default to {JOB}");
    assert_eq!(job["datasource"]["uid"], "${datasource}");
}

#[test]
fn dashboard_panels_use_the_variables_and_have_the_issue_panels() {
    let d = json(DASHBOARD);
    let panels: Vec<&serde_json::Value> = d["panels"].as_array().unwrap().iter().collect();
    let mut ids = BTreeSet::new();
    for p in &panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate id {}",
            p["id"]
        );
        assert!(
            p["gridPos"]["w"].as_u64().is_some(),
            "{}: no gridPos",
            p["title"]
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}: no targets", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        }
    }
    // Every selector filters on the job variable: no hard-coded job, no unfiltered series.
    for q in dashboard_queries(&d) {
        let e = parse(&q.expr).unwrap();
        visit(&e, &mut |e| {
            let vs = match e {
                Expr::VectorSelector(vs) => vs,
                Expr::MatrixSelector(ms) => &ms.vs,
                _ => return,
            };
            let job = vs.matchers.matchers.iter().find(|m| m.name == "job");
            assert!(
                job.is_some_and(|m| m.value == "$job" && m.op.to_string() == "="),
                "{}: selector {e} does not filter job=\"$job\"",
                q.origin
            );
        });
    }
    // The seed's five panels and the issue's additions, by title.
    let titles: Vec<String> = panels
        .iter()
        .filter_map(|p| p["title"].as_str())
        .map(|t| t.to_lowercase())
        .collect();
    for needed in [
        "request rate",
        "p95 routing latency",
        "cache hit rate",
        "routing decisions",
        "backend health",
        "running requests per backend",
        "queue size per backend",
        "kv-cache usage per backend",
        "pods discovered",
        "error ratio",
        "scheduling latency per plugin",
        "prefix index size",
        "predicted vs observed cached tokens",
        "flow control pool saturation",
        "flow control queue size",
        "flow control outcomes",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(needed)),
            "no panel titled like {needed:?}: {titles:?}"
        );
    }
}

#[test]
fn dashboard_configmap_embeds_the_dashboard() {
    let cm = yaml(DASHBOARD_CONFIGMAP);
    assert_eq!(str_at(&cm, &["kind"]), "ConfigMap");
    assert_eq!(
        str_at(&cm, &["metadata", "labels", "grafana_dashboard"]),
        "1",
        "the Grafana sidecar looks for the string label grafana_dashboard: \"1\""
    );
    let embedded: serde_json::Value =
        serde_json::from_str(str_at(&cm, &["data", "epp-dashboard.json"])).unwrap();
    assert_eq!(
        embedded,
        json(DASHBOARD),
        "run deploy/monitoring/grafana/make-configmap.sh"
    );
    let generated = run_ok(
        Command::new("bash")
            .arg(monitoring_dir().join("grafana/make-configmap.sh"))
            .arg("--stdout"),
    );
    assert_eq!(generated, read(DASHBOARD_CONFIGMAP));
}

#[test]
fn import_script_wraps_the_dashboard() {
    let out = Command::new("bash")
        .arg(monitoring_dir().join("grafana/import-dashboard.sh"))
        .arg("--print")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["overwrite"], true);
    assert!(body["dashboard"]["id"].is_null());
    let mut expected = json(DASHBOARD);
    expected["id"] = serde_json::Value::Null;
    assert_eq!(body["dashboard"], expected);
}

// ------------------------------------------------------------------------------------------
// Scrape paths: all yield job="llm-d-gaie-epp"
// ------------------------------------------------------------------------------------------

fn scrape_job(cfg: &Yaml, file: &str) -> &'static str {
    let jobs = cfg["scrape_configs"].as_sequence().expect("scrape_configs");
    assert_eq!(jobs.len(), 1, "{file}: one job");
    let job = &jobs[0];
    assert_eq!(job["job_name"].as_str(), Some(JOB), "{file}");
    for r in job["relabel_configs"]
        .as_sequence()
        .into_iter()
        .flatten()
        .chain(
            job["metric_relabel_configs"]
                .as_sequence()
                .into_iter()
                .flatten(),
        )
    {
        assert_ne!(
            r["target_label"].as_str(),
            Some("job"),
            "{file} rewrites job"
        );
    }
    assert_ne!(job["honor_labels"].as_bool(), Some(true), "{file}");
    JOB
}

#[test]
fn static_scrape_configs_yield_the_job() {
    let plain = yaml(SCRAPE_STATIC);
    scrape_job(&plain, SCRAPE_STATIC);
    let job = &plain["scrape_configs"][0];
    assert_eq!(
        job["static_configs"][0]["targets"][0].as_str(),
        Some("127.0.0.1:9090")
    );
    assert!(job.get("authorization").is_none());
    assert!(read(SCRAPE_STATIC).contains("llm-d-gaie-epp.llm-d.svc.cluster.local:9090"));

    let token = yaml(SCRAPE_STATIC_TOKEN);
    scrape_job(&token, SCRAPE_STATIC_TOKEN);
    let auth = &token["scrape_configs"][0]["authorization"];
    assert_eq!(auth["type"].as_str(), Some("Bearer"));
    assert!(auth["credentials_file"].as_str().is_some());
}

#[test]
fn kubernetes_scrape_config_yields_the_job() {
    let cfg = yaml(SCRAPE_KUBERNETES);
    scrape_job(&cfg, SCRAPE_KUBERNETES);
    let job = &cfg["scrape_configs"][0];
    let sd = &job["kubernetes_sd_configs"][0];
    assert_eq!(sd["role"].as_str(), Some("endpoints"));
    assert_eq!(sd["namespaces"]["names"][0].as_str(), Some("llm-d"));
    let keeps: Vec<(String, String)> = job["relabel_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|r| r["action"].as_str() == Some("keep"))
        .map(|r| {
            (
                r["source_labels"][0].as_str().unwrap().to_string(),
                r["regex"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(keeps.contains(&(
        "__meta_kubernetes_service_name".into(),
        "llm-d-gaie-epp".into()
    )));
    assert!(keeps.contains(&(
        "__meta_kubernetes_endpoint_port_name".into(),
        "metrics".into()
    )));
    let auth = &job["authorization"];
    assert_eq!(auth["type"].as_str(), Some("Bearer"));
    assert_eq!(
        auth["credentials_file"].as_str(),
        Some("/var/run/secrets/kubernetes.io/serviceaccount/token")
    );
}

#[test]
fn servicemonitor_yields_the_job_and_uses_a_secret_backed_token() {
    let docs = yaml_docs(SERVICE_MONITOR);
    let find = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(kind))
            .unwrap_or_else(|| panic!("no {kind} in {SERVICE_MONITOR}"))
    };
    let sm = find("ServiceMonitor");
    assert!(
        !read(SERVICE_MONITOR)
            .lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains("bearerTokenFile")),
        "bearerTokenFile is deprecated"
    );
    // No jobLabel: the job is the Service's name, which is llm-d-gaie-epp.
    assert!(sm["spec"].get("jobLabel").is_none());
    assert_eq!(
        str_at(sm, &["spec", "selector", "matchLabels", "app"]),
        "llm-d-gaie-epp"
    );
    assert_eq!(
        sm["spec"]["namespaceSelector"]["matchNames"][0].as_str(),
        Some("llm-d")
    );
    assert_eq!(
        str_at(sm, &["metadata", "labels", "release"]),
        "kube-prometheus-stack"
    );
    let ep = &sm["spec"]["endpoints"][0];
    assert_eq!(ep["port"].as_str(), Some("metrics"));
    assert_eq!(ep["path"].as_str(), Some("/metrics"));
    assert_eq!(ep["scheme"].as_str(), Some("http"));
    assert_eq!(ep["authorization"]["type"].as_str(), Some("Bearer"));
    let secret_name = str_at(ep, &["authorization", "credentials", "name"]);
    assert_eq!(
        str_at(ep, &["authorization", "credentials", "key"]),
        "token"
    );

    // The referenced Secret is a ServiceAccount token for `prometheus`, in the ServiceMonitor's
    // namespace (where the operator resolves it).
    let secret = find("Secret");
    assert_eq!(str_at(secret, &["metadata", "name"]), secret_name);
    assert_eq!(
        str_at(secret, &["metadata", "namespace"]),
        str_at(sm, &["metadata", "namespace"])
    );
    assert_eq!(
        str_at(secret, &["type"]),
        "kubernetes.io/service-account-token"
    );
    assert_eq!(
        str_at(
            secret,
            &[
                "metadata",
                "annotations",
                "kubernetes.io/service-account.name"
            ]
        ),
        "prometheus"
    );
    assert_eq!(
        str_at(secret, &["metadata", "namespace"]),
        "llm-d-monitoring"
    );
}

// ------------------------------------------------------------------------------------------
// Documentation names only things that exist
// ------------------------------------------------------------------------------------------

#[test]
fn docs_name_only_existing_files() {
    let readme = read("README.md");
    let section = readme
        .split("<!-- monitoring:begin -->")
        .nth(1)
        .and_then(|s| s.split("<!-- monitoring:end -->").next())
        .expect("README monitoring markers");
    let docs = read("docs/monitoring.md");
    let mut missing = BTreeSet::new();
    for (name, text) in [
        ("README.md", section),
        ("docs/monitoring.md", docs.as_str()),
    ] {
        for word in text.split(|c: char| c.is_whitespace() || "`()[]<>\"',;".contains(c)) {
            let word = word.trim_end_matches(['.', ':']);
            let is_path = ["deploy/", "docs/", "scripts/"]
                .iter()
                .any(|p| word.starts_with(p));
            if is_path
                && !word.contains('*')
                && !word.contains('$')
                && !repo_root().join(word).exists()
            {
                missing.insert(format!("{name}: {word}"));
            }
        }
    }
    assert!(missing.is_empty(), "named but missing: {missing:#?}");
}
