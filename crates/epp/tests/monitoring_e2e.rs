//! End to end: a real Prometheus, configured with the shipped static scrape config,
//! scrapes `epp proxy` in front of three `epp sim` servers under load — once without metrics
//! auth and once with `--metrics-auth=token`. Then `up{job="llm-d-gaie-epp"} == 1`, every
//! dashboard query returns data through the Prometheus HTTP API, and so does every alert
//! expression before its threshold comparison.
//!
//! `cargo test -p epp --test monitoring_e2e`. Needs `prometheus` (EPP_PROMETHEUS_BIN or PATH;
//! `scripts/test` installs it). Everything binds 127.0.0.1.

#[path = "support/monitoring.rs"]
mod common;

#[path = "support/redis.rs"]
mod redis_server;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;

/// Load: 3 senders, each pausing this long between requests.
const LOAD_PAUSE: Duration = Duration::from_millis(20);

fn check_everything_has_data(prom: &Prometheus, procs: &Procs, load: &Load) {
    let empty = wait_for_data(prom, &shipped_queries(), Duration::from_secs(90));
    let up = up_values(prom);
    assert_eq!(
        up,
        ["1"],
        "targets: {:?}\n{}\n{}",
        prom.targets(),
        prom.log(),
        procs.logs()
    );
    assert!(
        empty.is_empty(),
        "shipped queries without data after {} requests:\n{}\n\n{}",
        load.sent.load(Ordering::Relaxed),
        empty.join("\n"),
        procs.logs()
    );
    assert!(load.sent.load(Ordering::Relaxed) > 0);
}

#[test]
fn prometheus_scrapes_the_proxy_without_auth() {
    let (procs, proxy, metrics) = start_stack(&["--metrics-auth=none"], &[]);
    let load = start_load(proxy, 3, LOAD_PAUSE);
    let cfg = shipped_static_config(SCRAPE_STATIC, &metrics.to_string());
    let prom = start_prometheus(&cfg, &[]);
    check_everything_has_data(&prom, &procs, &load);
}

#[test]
fn prometheus_scrapes_the_proxy_with_a_token() {
    let token = "e2e-metrics-token";
    let (procs, proxy, metrics) = start_stack(
        &[
            "--metrics-auth=token",
            "--metrics-token-file={dir}/picker.token",
        ],
        &[("picker.token", &format!("{token}\n"))],
    );
    // Without the token the picker refuses.
    let (status, body) = http_get(metrics, "/metrics", None).unwrap();
    assert_eq!(status, 401, "{body}");
    let load = start_load(proxy, 3, LOAD_PAUSE);
    let cfg = shipped_static_config(SCRAPE_STATIC_TOKEN, &metrics.to_string());
    let file = credentials_file(&cfg);
    let prom = start_prometheus(&cfg, &[(&file, &format!("{token}\n"))]);
    check_everything_has_data(&prom, &procs, &load);
}

/// llm-d's sim-pd sample, with 16-token blocks.
const PD_CONFIG: &str = "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters: {blockSizeTokens: 16, autoTune: false}
- type: prefix-cache-scorer
- type: queue-scorer
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: prefix-based-pd-decider
  parameters: {nonCachedTokens: 16}
- type: disagg-profile-handler
  parameters: {deciders: {prefill: prefix-based-pd-decider}}
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
";

#[test]
fn prometheus_shows_the_disaggregation_row_and_alert_with_pd_in_proxy_mode() {
    let mut procs = Procs::new();
    let base = free_ports(3);
    // One prefill sim that fails a fifth of its requests (so a fallback outcome exists), two
    // decode sims.
    let sim = |role: &str, port: u16, count: &str, extra: &[&str]| {
        let mut a: Vec<String> = [
            "sim",
            "--host",
            "127.0.0.1",
            "--count",
            count,
            "--role",
            role,
            "--name-prefix",
            role,
            "--inter-token-ms",
            "0",
            "--prefill-overhead-ms",
            "0",
        ]
        .map(String::from)
        .to_vec();
        a.push(format!("--base-port={port}"));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    procs.spawn(
        "sim-prefill",
        &sim(
            "prefill",
            base,
            "1",
            &["--error-rate", "0.2", "--error-status", "500"],
        ),
    );
    procs.spawn("sim-decode", &sim("decode", base + 1, "2", &[]));
    for i in 0..3 {
        wait_http_ok(
            format!("127.0.0.1:{}", base + i).parse().unwrap(),
            "/health",
            &procs,
        );
    }
    let dir = procs.dir.path().to_path_buf();
    std::fs::write(dir.join("pd.yaml"), PD_CONFIG).unwrap();
    std::fs::write(
        dir.join("endpoints.yaml"),
        format!(
            "endpoints:\n- address: 127.0.0.1:{base}\n  labels: {{llm-d.ai/role: prefill}}\n\
             - address: 127.0.0.1:{}\n  labels: {{llm-d.ai/role: decode}}\n\
             - address: 127.0.0.1:{}\n  labels: {{llm-d.ai/role: decode}}\n",
            base + 1,
            base + 2
        ),
    )
    .unwrap();
    let proxy: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let health: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    procs.spawn(
        "proxy",
        &[
            "proxy".to_string(),
            format!("--listen={proxy}"),
            format!("--metrics-bind-address={metrics}"),
            format!("--health-probe-bind-address={health}"),
            format!("--endpoints-file={}", dir.join("endpoints.yaml").display()),
            format!("--config-file={}", dir.join("pd.yaml").display()),
        ],
    );
    wait_http_ok(health, "/readyz", &procs);
    // Four system prompts: their first requests are disaggregated, later ones find the prefix
    // on their decode pod and decode alone.
    let load = start_load(proxy, 3, LOAD_PAUSE);
    let cfg = shipped_static_config(SCRAPE_STATIC, &metrics.to_string());
    let prom = start_prometheus(&cfg, &[]);
    let queries = disaggregation_queries(JOB);
    assert_eq!(queries.len(), 4, "{queries:#?}");
    let empty = wait_for_data(&prom, &queries, Duration::from_secs(90));
    assert!(
        empty.is_empty(),
        "P/D queries without data after {} requests:\n{}\n\n{}",
        load.sent.load(Ordering::Relaxed),
        empty.join("\n"),
        procs.logs()
    );
}

#[test]
fn prometheus_shows_the_shared_state_row_and_alerts_with_two_active_active_replicas() {
    let redis = redis_server::Redis::start(&[]);
    let shared = [
        "--ha-mode=active-active".to_string(),
        format!("--shared-state={}", redis.url()),
        "--shared-state-snapshot-interval=1s".to_string(),
    ];
    let extra: Vec<&str> = shared.iter().map(String::as_str).collect();
    let (mut procs, proxy_a, metrics_a, sims) = start_stack_with_sims(&extra, &[]);
    // A second replica over the same simulators and the same Redis.
    let proxy_b: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics_b: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let health_b: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut args = vec![
        "proxy".to_string(),
        format!("--listen={proxy_b}"),
        format!("--metrics-bind-address={metrics_b}"),
        format!("--health-probe-bind-address={health_b}"),
    ];
    args.extend(sims.iter().map(|s| format!("--endpoint={s}")));
    args.extend(shared.iter().cloned());
    procs.spawn("proxy-b", &args);
    wait_http_ok(health_b, "/readyz", &procs);
    let _load_a = start_load(proxy_a, 2, LOAD_PAUSE);
    let _load_b = start_load(proxy_b, 2, LOAD_PAUSE);
    let mut cfg = shipped_static_config(SCRAPE_STATIC, &metrics_a.to_string());
    cfg["scrape_configs"][0]["static_configs"][0]["targets"] = vec![
        serde_yaml::Value::from(metrics_a.to_string()),
        serde_yaml::Value::from(metrics_b.to_string()),
    ]
    .into();
    let prom = start_prometheus(&cfg, &[]);
    let queries = shared_state_queries(JOB);
    assert_eq!(queries.len(), 9, "{queries:#?}");
    let empty = wait_for_data(&prom, &queries, Duration::from_secs(90));
    assert!(
        empty.is_empty(),
        "shared-state queries without data:\n{}\n\n{}",
        empty.join("\n"),
        procs.logs()
    );
    // Both replicas reach Redis and see each other.
    let replicas = prom.query("min(epp_shared_state_replicas{job=\"llm-d-gaie-epp\"})");
    assert_eq!(replicas[0]["value"][1], "2", "{replicas:?}");
}
