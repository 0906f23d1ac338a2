//! Helpers shared by the monitoring tests (`monitoring_*.rs` include this file with
//! `#[path = "support/monitoring.rs"] mod common;`); under `support/`, so it is not a test
//! binary of its own.
//!
//! - locating the shipped assets and `promtool`;
//! - reading every PromQL query the assets ship (dashboard targets and variables, alert rules);
//! - walking the PromQL AST (`promql-parser`): metric names, quantile and ratio shape, and the
//!   "expression before its threshold" of an alert;
//! - a real Prometheus on loopback, and polling it until the shipped queries return data;
//! - the real picker stack (`epp sim` + `epp proxy`, as child processes) and load through it.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use promql_parser::parser::{self, Expr};

/// The job label every shipped scrape path produces.
pub const JOB: &str = "llm-d-gaie-epp";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn monitoring_dir() -> PathBuf {
    repo_root().join("deploy/monitoring")
}

pub fn read(rel: &str) -> String {
    let path = repo_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

pub fn yaml(rel: &str) -> serde_yaml::Value {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

pub fn yaml_docs(rel: &str) -> Vec<serde_yaml::Value> {
    use serde::Deserialize;
    let text = read(rel);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

pub fn json(rel: &str) -> serde_json::Value {
    serde_json::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid JSON: {e}"))
}

pub const RULES: &str = "deploy/monitoring/rules/epp-alerts.rules.yaml";
pub const RULES_TEST: &str = "deploy/monitoring/rules/epp-alerts.test.yaml";
pub const PROMETHEUS_RULE: &str = "deploy/monitoring/prometheusrule.yaml";
pub const DASHBOARD: &str = "deploy/monitoring/grafana/epp-dashboard.json";
pub const DASHBOARD_CONFIGMAP: &str = "deploy/monitoring/grafana/grafana-dashboard-configmap.yaml";
pub const SCRAPE_STATIC: &str = "deploy/monitoring/prometheus/scrape-static.yaml";
pub const SCRAPE_STATIC_TOKEN: &str = "deploy/monitoring/prometheus/scrape-static-token.yaml";
pub const SCRAPE_KUBERNETES: &str = "deploy/monitoring/prometheus/scrape-kubernetes.yaml";
pub const SERVICE_MONITOR: &str = "deploy/monitoring/servicemonitor.yaml";

/// `promtool` from `EPP_PROMTOOL_BIN`, else from `PATH`. Missing promtool is a failure, not a
/// skip: `scripts/test` installs it.
pub fn promtool() -> PathBuf {
    find_tool("EPP_PROMTOOL_BIN", "promtool")
}

/// `prometheus` from `EPP_PROMETHEUS_BIN`, else from `PATH` (same policy as [`promtool`]).
pub fn prometheus_bin() -> PathBuf {
    find_tool("EPP_PROMETHEUS_BIN", "prometheus")
}

fn find_tool(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "{env}={} does not exist; run scripts/test, which installs Debian's prometheus package",
            p.display()
        );
        return p;
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` not found (neither {env} nor PATH): run scripts/test, which installs \
                 Debian's prometheus package (prometheus + promtool), or set {env}"
            )
        })
}

/// Runs a command, panicking with its output unless it exits 0. Returns stdout + stderr.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}",
        out.status
    );
    text
}

// ------------------------------------------------------------------------------------------
// The queries the assets ship
// ------------------------------------------------------------------------------------------

/// One shipped query: where it comes from and its PromQL.
#[derive(Debug, Clone)]
pub struct Query {
    pub origin: String,
    pub expr: String,
}

/// One alerting rule of the rules file.
#[derive(Debug, Clone)]
pub struct Alert {
    pub name: String,
    pub expr: String,
    pub rule: serde_yaml::Value,
}

pub fn alerts() -> Vec<Alert> {
    let rules = yaml(RULES);
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            if let Some(name) = rule["alert"].as_str() {
                out.push(Alert {
                    name: name.to_string(),
                    expr: rule["expr"].as_str().expect("expr").to_string(),
                    rule: rule.clone(),
                });
            }
        }
    }
    out
}

/// Every PromQL target of every dashboard panel (rows included), in panel order.
pub fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<Query> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<Query>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?");
            for t in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push(Query {
                        origin: format!(
                            "panel {:?} target {}",
                            title,
                            t["refId"].as_str().unwrap_or("?")
                        ),
                        expr: expr.to_string(),
                    });
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// Dashboard queries with the template variables replaced, ready for the Prometheus API.
pub fn expand_dashboard_vars(expr: &str, job: &str) -> String {
    expr.replace("$job", job).replace("${job}", job)
}

/// Metric names read by the dashboard's `label_values(metric, label)` variables.
pub fn dashboard_variable_metrics(dashboard: &serde_json::Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let q = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .unwrap_or("");
        if let Some(rest) = q.trim().strip_prefix("label_values(") {
            let inner = rest.trim_end_matches(')');
            if let Some((selector, _label)) = inner.rsplit_once(',') {
                let e = parse(selector.trim()).unwrap_or_else(|e| panic!("variable {q}: {e}"));
                out.extend(metric_names(&e));
            }
        }
    }
    out
}

// ------------------------------------------------------------------------------------------
// PromQL AST helpers
// ------------------------------------------------------------------------------------------

pub fn parse(expr: &str) -> Result<Expr, String> {
    parser::parse(expr)
}

/// Calls `f` on `e` and on every sub-expression, depth first.
pub fn visit<'a>(e: &'a Expr, f: &mut dyn FnMut(&'a Expr)) {
    f(e);
    match e {
        Expr::Aggregate(a) => {
            if let Some(p) = &a.param {
                visit(p, f);
            }
            visit(&a.expr, f);
        }
        Expr::Unary(u) => visit(&u.expr, f),
        Expr::Binary(b) => {
            visit(&b.lhs, f);
            visit(&b.rhs, f);
        }
        Expr::Paren(p) => visit(&p.expr, f),
        Expr::Subquery(s) => visit(&s.expr, f),
        Expr::Call(c) => {
            for a in &c.args.args {
                visit(a, f);
            }
        }
        Expr::NumberLiteral(_)
        | Expr::StringLiteral(_)
        | Expr::VectorSelector(_)
        | Expr::MatrixSelector(_)
        | Expr::Extension(_) => {}
    }
}

/// The metric families an expression reads, `_bucket`/`_sum`/`_count` stripped: the same
/// reading `epp doctor` uses (one implementation, in the `epp` library).
#[allow(unused_imports)] // each test binary uses a different subset
pub use epp_doctor::assets::{family_name, metric_names};

fn unparen(mut e: &Expr) -> &Expr {
    while let Expr::Paren(p) = e {
        e = &p.expr;
    }
    e
}

/// Problems with `histogram_quantile` calls: the histogram argument must be a `sum` grouped
/// `by (..., le, ...)` (the seed's `histogram_quantile(0.95, rate(x_bucket[5m]))` breaks as
/// soon as there is more than one series per bucket).
pub fn quantile_problems(e: &Expr) -> Vec<String> {
    let mut out = Vec::new();
    visit(e, &mut |e| {
        let Expr::Call(c) = e else { return };
        if c.func.name != "histogram_quantile" {
            return;
        }
        let Some(arg) = c.args.args.get(1) else {
            out.push(format!("{e}: histogram_quantile without a histogram"));
            return;
        };
        match unparen(arg) {
            Expr::Aggregate(a)
                if a.op.to_string() == "sum"
                    && a.modifier.as_ref().is_some_and(|m| {
                        m.is_include() && m.labels().labels.iter().any(|l| l == "le")
                    }) => {}
            other => out.push(format!(
                "histogram_quantile over `{other}`: aggregate it with `sum by (le)` first"
            )),
        }
    });
    out
}

/// Whether `e` is (a filtered, defaulted or scaled form of) an aggregation, or a scalar.
fn is_aggregated(e: &Expr) -> bool {
    match unparen(e) {
        Expr::Aggregate(_) | Expr::NumberLiteral(_) => true,
        Expr::Binary(b) => {
            let (l, r) = (unparen(&b.lhs), unparen(&b.rhs));
            let lit = |x: &Expr| matches!(x, Expr::NumberLiteral(_));
            if b.op.is_set_operator() {
                // `sum(a) or sum(b) * 0`, `sum(a) and ...`
                is_aggregated(l) && (b.op.to_string() != "or" || is_aggregated(r))
            } else if lit(r) {
                // `sum(x) > 0`, `sum(x) * 100`
                is_aggregated(l)
            } else if lit(l) {
                is_aggregated(r)
            } else {
                is_aggregated(l) && is_aggregated(r)
            }
        }
        _ => false,
    }
}

/// Problems with ratios: both sides of every `/` must be aggregated (`sum(rate(a)) /
/// sum(rate(b))`); the seed's `rate(hits) / rate(requests)` is a per-series ratio.
pub fn ratio_problems(e: &Expr) -> Vec<String> {
    let mut out = Vec::new();
    visit(e, &mut |e| {
        let Expr::Binary(b) = e else { return };
        if b.op.to_string() != "/" {
            return;
        }
        for (side, x) in [("numerator", &b.lhs), ("denominator", &b.rhs)] {
            if !is_aggregated(x) {
                out.push(format!("ratio {side} `{x}` is not summed"));
            }
        }
    });
    out
}

/// The part of an alert expression that must return data whenever the picker is scraped: the
/// expression before its threshold comparison (`A > 0.1` → `A`; `A < 0.5 and B` → `A`), and for
/// `absent(X)` the selector `X`.
pub fn alert_base_expr(expr: &str) -> String {
    fn base(e: &Expr) -> &Expr {
        let e = unparen(e);
        match e {
            Expr::Binary(b) if b.op.is_comparison_operator() && !b.return_bool() => {
                if matches!(unparen(&b.rhs), Expr::NumberLiteral(_)) {
                    base(&b.lhs)
                } else {
                    e
                }
            }
            Expr::Binary(b) if b.op.to_string() == "and" || b.op.to_string() == "unless" => {
                base(&b.lhs)
            }
            Expr::Call(c) if c.func.name == "absent" && !c.args.args.is_empty() => {
                unparen(&c.args.args[0])
            }
            _ => e,
        }
    }
    let e = parse(expr).unwrap_or_else(|err| panic!("{expr}: {err}"));
    base(&e).to_string()
}

// ------------------------------------------------------------------------------------------
// The helpers' own tests
// ------------------------------------------------------------------------------------------

#[test]
fn metric_names_strip_histogram_suffixes() {
    let e = parse(
        r#"histogram_quantile(0.95, sum by (le) (rate(epp_request_duration_seconds_bucket{job="x"}[5m])))
           + sum(rate(epp_request_duration_seconds_sum[5m])) / sum(rate(epp_request_duration_seconds_count[5m]))
           + on() group_left sum(up{job="x"}) + count({__name__="epp_build_info"})"#,
    )
    .unwrap();
    let names: Vec<_> = metric_names(&e).into_iter().collect();
    assert_eq!(
        names,
        ["epp_build_info", "epp_request_duration_seconds", "up"]
    );
}

#[test]
fn the_seeds_queries_are_rejected() {
    let seed_p95 = parse(
        r#"histogram_quantile(0.95, rate(epp_request_duration_seconds_bucket{job="llm-d-epp-metrics"}[5m])) * 1000"#,
    )
    .unwrap();
    assert_eq!(quantile_problems(&seed_p95).len(), 1);
    let seed_hit_rate = parse(
        r#"(rate(epp_cache_hits_total{job="llm-d-epp-metrics"}[5m]) / rate(epp_cache_requests_total{job="llm-d-epp-metrics"}[5m])) * 100"#,
    )
    .unwrap();
    assert_eq!(ratio_problems(&seed_hit_rate).len(), 2);
    // `sum without (le)` and `max by (le)` are not accepted either
    for bad in [
        "histogram_quantile(0.9, sum without (le) (rate(x_bucket[5m])))",
        "histogram_quantile(0.9, max by (le) (rate(x_bucket[5m])))",
    ] {
        assert_eq!(quantile_problems(&parse(bad).unwrap()).len(), 1, "{bad}");
    }
}

#[test]
fn the_fixed_forms_are_accepted() {
    for good in [
        "histogram_quantile(0.95, sum by (le) (rate(x_bucket[5m])))",
        "histogram_quantile(0.95, sum by (job, le) (rate(x_bucket[5m]))) > 0.1",
        "sum(rate(a[5m])) / sum(rate(b[5m]))",
        "sum by (job) (rate(a[5m])) / (sum by (job) (rate(b[5m])) > 0) < 0.5",
        "(sum(rate(a[5m])) or sum(rate(b[5m])) * 0) / sum(rate(b[5m]))",
    ] {
        let e = parse(good).unwrap();
        assert!(quantile_problems(&e).is_empty(), "{good}");
        assert!(
            ratio_problems(&e).is_empty(),
            "{good}: {:?}",
            ratio_problems(&e)
        );
    }
}

#[test]
fn alert_base_expr_drops_the_threshold() {
    let base =
        alert_base_expr("histogram_quantile(0.95, sum by (job, le) (rate(x_bucket[5m]))) > 0.1");
    assert_eq!(
        parse(&base).unwrap().to_string(),
        parse("histogram_quantile(0.95, sum by (job, le) (rate(x_bucket[5m])))")
            .unwrap()
            .to_string()
    );
    assert_eq!(
        alert_base_expr(r#"absent(up{job="llm-d-gaie-epp"})"#),
        parse(r#"up{job="llm-d-gaie-epp"}"#).unwrap().to_string()
    );
    let base = alert_base_expr("sum(a) / (sum(b) > 0) < 0.5");
    assert_eq!(base, parse("sum(a) / (sum(b) > 0)").unwrap().to_string());
}

// ------------------------------------------------------------------------------------------
// A real Prometheus, started on loopback with a temporary TSDB
// ------------------------------------------------------------------------------------------

/// A `prometheus` child process; killed when dropped.
pub struct Prometheus {
    pub addr: std::net::SocketAddr,
    child: std::process::Child,
    pub dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One of the shipped static scrape configs, pointed at `target` with a fast scrape interval.
/// `extra_files` are written next to the config (e.g. the token file the config names).
pub fn shipped_static_config(rel: &str, target: &str) -> serde_yaml::Value {
    let mut cfg = yaml(rel);
    cfg["global"]["scrape_interval"] = "1s".into();
    cfg["global"]["evaluation_interval"] = "1s".into();
    let job = &mut cfg["scrape_configs"][0];
    job["static_configs"][0]["targets"] = vec![serde_yaml::Value::from(target)].into();
    cfg
}

/// Starts Prometheus with `config`; `files` are written next to the config first. Waits until
/// it is ready.
pub fn start_prometheus(config: &serde_yaml::Value, files: &[(&str, &str)]) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).unwrap();
    }
    let cfg_path = dir.path().join("prometheus.yml");
    std::fs::write(&cfg_path, serde_yaml::to_string(config).unwrap()).unwrap();
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let child = Command::new(prometheus_bin())
        .arg(format!("--config.file={}", cfg_path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .arg("--log.level=warn")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting prometheus");
    let p = Prometheus { addr, child, dir };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok((200, _)) = http_get(addr, "/-/ready", None) {
            return p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "prometheus did not become ready:\n{}",
            std::fs::read_to_string(p.dir.path().join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

impl Prometheus {
    /// Instant query through the HTTP API; the `data.result` array.
    pub fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let (status, body) = http_get(
            self.addr,
            &format!(
                "/api/v1/query?query={}",
                utf8_percent_encode(expr, NON_ALPHANUMERIC)
            ),
            None,
        )
        .unwrap_or_else(|e| panic!("querying prometheus: {e}"));
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{status} {body}: {e}"));
        assert_eq!(v["status"], "success", "query {expr}: {body}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The scrape targets' health and last error, from `/api/v1/targets`.
    pub fn targets(&self) -> Vec<(String, String, String)> {
        let (_, body) = http_get(self.addr, "/api/v1/targets", None).unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["data"]["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                (
                    t["labels"]["job"].as_str().unwrap_or("").to_string(),
                    t["health"].as_str().unwrap_or("").to_string(),
                    t["lastError"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

/// A minimal HTTP/1.0 GET (no dependencies): status and body.
pub fn http_get(
    addr: std::net::SocketAddr,
    path: &str,
    bearer: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// `credentials_file` of the first scrape job of a shipped token config: the file
/// [`start_prometheus`] must be given the token in.
pub fn credentials_file(config: &serde_yaml::Value) -> String {
    config["scrape_configs"][0]["authorization"]["credentials_file"]
        .as_str()
        .expect("scrape config without authorization.credentials_file")
        .to_string()
}

/// Every shipped query, ready to send: dashboard targets with `$job` expanded, the job
/// variable's metric, and each alert's expression before its threshold.
/// Whether a shipped query reads flow-control families: they have series only when the picker
/// runs with `featureGates: [flowControl]` (monitoring_gaie.rs checks them with it on).
pub fn reads_flow_control(q: &Query) -> bool {
    q.expr.contains("_flow_control_")
}

/// Whether a shipped query reads the prefill/decode disaggregation families: they have series
/// only with a disaggregating profile handler, the prefill-call ones only in proxy mode
/// (monitoring_e2e.rs checks them with P/D on).
pub fn reads_disaggregation(q: &Query) -> bool {
    ["_disagg_decision", "_pd_decision", "epp_pd_prefill_"]
        .iter()
        .any(|m| q.expr.contains(m))
}

/// Whether a shipped query reads the shared-state families (series only with --shared-state).
pub fn reads_shared_state(q: &Query) -> bool {
    q.expr.contains("epp_shared_state_")
}

/// The shipped queries that need --shared-state, expanded for `job`.
pub fn shared_state_queries(job: &str) -> Vec<Query> {
    let mut qs = feature_queries(job);
    qs.retain(reads_shared_state);
    qs
}

/// The shipped queries that need P/D on, expanded for `job`.
pub fn disaggregation_queries(job: &str) -> Vec<Query> {
    let mut qs = feature_queries(job);
    qs.retain(reads_disaggregation);
    qs
}

/// Every dashboard and alert query expanded for `job` (alerts before their thresholds).
fn feature_queries(job: &str) -> Vec<Query> {
    let dashboard = json(DASHBOARD);
    let mut qs: Vec<Query> = dashboard_queries(&dashboard)
        .into_iter()
        .map(|q| Query {
            expr: expand_dashboard_vars(&q.expr, job),
            origin: q.origin,
        })
        .collect();
    for a in alerts() {
        qs.push(Query {
            origin: format!("alert {} (before its threshold)", a.name),
            expr: alert_base_expr(&a.expr).replace("llm-d-gaie-epp", job),
        });
    }
    qs
}

/// The shipped queries that need flow control on, expanded for `job`.
pub fn flow_control_queries(job: &str) -> Vec<Query> {
    let mut qs = feature_queries(job);
    qs.retain(reads_flow_control);
    qs
}

/// Every shipped query (dashboard, its variables, alerts before their thresholds) except those
/// that need flow control on ([`flow_control_queries`]).
pub fn shipped_queries() -> Vec<Query> {
    let dashboard = json(DASHBOARD);
    let mut qs: Vec<Query> = dashboard_queries(&dashboard)
        .into_iter()
        .map(|q| Query {
            expr: expand_dashboard_vars(&q.expr, JOB),
            origin: q.origin,
        })
        .collect();
    for m in dashboard_variable_metrics(&dashboard) {
        qs.push(Query {
            origin: "variable job".into(),
            expr: format!("{m}{{job=\"{JOB}\"}}"),
        });
    }
    for a in alerts() {
        qs.push(Query {
            origin: format!("alert {} (before its threshold)", a.name),
            expr: alert_base_expr(&a.expr),
        });
    }
    qs.retain(|q| !reads_flow_control(q) && !reads_disaggregation(q) && !reads_shared_state(q));
    qs
}

/// Polls until every query returns data (rates need two scrapes) or `within` passes; returns
/// the queries that stayed empty (`origin: expr`).
pub fn wait_for_data(prom: &Prometheus, queries: &[Query], within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        let empty: Vec<String> = queries
            .iter()
            .filter(|q| prom.query(&q.expr).is_empty())
            .map(|q| format!("{}: {}", q.origin, q.expr))
            .collect();
        if empty.is_empty() || Instant::now() > deadline {
            return empty;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The values of `up{job="llm-d-gaie-epp"}`, one per target.
pub fn up_values(prom: &Prometheus) -> Vec<String> {
    prom.query(&format!("up{{job=\"{JOB}\"}}"))
        .iter()
        .map(|r| r["value"][1].as_str().unwrap_or("").to_string())
        .collect()
}

// ------------------------------------------------------------------------------------------
// The real picker stack: three `epp sim` servers and `epp proxy` in front of them
// ------------------------------------------------------------------------------------------

/// Child processes we started, each logging to `<dir>/<name>.log`; each killed (by its own
/// handle) when dropped.
pub struct Procs {
    children: Vec<(String, Child)>,
    pub dir: tempfile::TempDir,
}

impl Procs {
    /// No processes yet, and a fresh directory for their files.
    pub fn new() -> Self {
        Procs {
            children: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Procs {
    /// Starts `epp <args>` as `name`.
    pub fn spawn(&mut self, name: &str, args: &[String]) {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_epp"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting epp {name}: {e}"));
        self.children.push((name.to_string(), child));
    }

    /// The last lines of every process's log, for failure messages.
    pub fn logs(&self) -> String {
        self.children
            .iter()
            .map(|(name, _)| {
                let log = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                format!(
                    "--- {name} (last lines)\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `n` consecutive free loopback ports; returns the first.
pub fn free_ports(n: u16) -> u16 {
    for _ in 0..100 {
        let base = free_port();
        if base > 65535 - n {
            continue;
        }
        let held: Vec<_> = (0..n)
            .map_while(|i| TcpListener::bind(("127.0.0.1", base + i)).ok())
            .collect();
        if held.len() == n as usize {
            return base;
        }
    }
    panic!("no {n} consecutive free ports");
}

/// Waits (60 s at most) until `GET path` on `addr` answers 200.
pub fn wait_http_ok(addr: SocketAddr, path: &str, procs: &Procs) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(http_get(addr, path, None), Ok((200, _))) {
        assert!(
            Instant::now() < deadline,
            "{addr}{path} never answered 200\n{}",
            procs.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Three sims and `epp proxy` in front of them with `extra` flags (`{dir}` = the temp dir,
/// where `files` are written first). Returns once the proxy is ready: the processes, the
/// proxy's address and its metrics address.
pub fn start_stack(extra: &[&str], files: &[(&str, &str)]) -> (Procs, SocketAddr, SocketAddr) {
    let (procs, proxy, metrics, _) = start_stack_with_sims(extra, files);
    (procs, proxy, metrics)
}

/// As [`start_stack`], also returning the three sims' addresses (their `/metrics` is vLLM's).
pub fn start_stack_with_sims(
    extra: &[&str],
    files: &[(&str, &str)],
) -> (Procs, SocketAddr, SocketAddr, Vec<SocketAddr>) {
    let mut procs = Procs {
        children: Vec::new(),
        dir: tempfile::tempdir().unwrap(),
    };
    for (name, content) in files {
        std::fs::write(procs.dir.path().join(name), content).unwrap();
    }
    let sim_base = free_ports(3);
    procs.spawn(
        "sim",
        &[
            "sim",
            "--host",
            "127.0.0.1",
            "--count",
            "3",
            "--base-port",
            &sim_base.to_string(),
            "--inter-token-ms",
            "0",
            "--prefill-overhead-ms",
            "0",
        ]
        .map(String::from),
    );
    for i in 0..3 {
        wait_http_ok(
            format!("127.0.0.1:{}", sim_base + i).parse().unwrap(),
            "/health",
            &procs,
        );
    }
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let health: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut args = vec![
        "proxy".to_string(),
        format!("--listen={proxy}"),
        format!("--metrics-bind-address={metrics}"),
        format!("--health-probe-bind-address={health}"),
    ];
    for i in 0..3 {
        args.push(format!("--endpoint=127.0.0.1:{}", sim_base + i));
    }
    let dir = procs.dir.path().display().to_string();
    args.extend(extra.iter().map(|a| a.replace("{dir}", &dir)));
    procs.spawn("proxy", &args);
    wait_http_ok(health, "/readyz", &procs);
    let sims = (0..3)
        .map(|i| format!("127.0.0.1:{}", sim_base + i).parse().unwrap())
        .collect();
    (procs, proxy, metrics, sims)
}

/// Completions with shared prompt prefixes through the proxy, until dropped.
pub struct Load {
    stop: Arc<AtomicBool>,
    /// Requests that got a response.
    pub sent: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `threads` senders, each sending a request and then pausing for `pause`: 4 system prompts
/// of ~400 bytes, each followed by a distinct question.
pub fn start_load(proxy: SocketAddr, threads: usize, pause: Duration) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let threads = (0..threads)
        .map(|t| {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let system = format!("{:=<400}", format!("system prompt number {}", i % 4));
                    let body = serde_json::json!({
                        "model": "sim-model",
                        "prompt": format!("{system} question {t}-{i}"),
                        "max_tokens": 2,
                    })
                    .to_string();
                    if post(proxy, "/v1/completions", &body).is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                    std::thread::sleep(pause);
                }
            })
        })
        .collect();
    Load {
        stop,
        sent,
        threads,
    }
}

/// A minimal HTTP/1.1 JSON POST: the response status.
pub fn post(addr: SocketAddr, path: &str, body: &str) -> std::io::Result<u16> {
    post_with(addr, path, body, &[])
}

/// As [`post`], with extra request headers.
pub fn post_with(
    addr: SocketAddr,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}
