//! Checks through the Prometheus HTTP API: the scrape target is up under the job, and every
//! dashboard query and alert expression returns data; when one does not, why (the job label,
//! a missing metric, no traffic yet, the target is down).

use std::collections::{BTreeSet, HashMap};

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use promql_parser::parser;

use super::assets::{family_name, for_each_selector, is_synthetic, selector_name, Assets, Query};
use super::client::{Client, Endpoint};
use super::picker_metrics::{appears_with_traffic, Exposition, MetricState};
use super::report::{Mark, Report};
use super::transport::{report_transport, snippet, Peer};

/// What the `up` check found.
#[derive(Debug, Clone)]
enum Target {
    Up,
    Down,
    /// No target with the job.
    Missing,
}

struct Prom<'a> {
    client: &'a Client,
    ep: &'a Endpoint,
    base: String,
    cache: HashMap<String, Result<Vec<serde_json::Value>, String>>,
}

impl Prom<'_> {
    async fn get_json(&self, path: &str) -> Result<serde_json::Value, String> {
        let (_, res) = self
            .client
            .get(self.ep, Some(&format!("{}{path}", self.base)), None)
            .await;
        let resp = res.map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_slice(&resp.body).map_err(|e| {
            format!(
                "HTTP {} with a non-JSON body ({e}): {}",
                resp.status,
                snippet(&resp.text())
            )
        })?;
        if v["status"] != "success" {
            return Err(format!(
                "{}: {}",
                v["errorType"].as_str().unwrap_or("error"),
                v["error"].as_str().unwrap_or("unknown error")
            ));
        }
        Ok(v)
    }

    /// An instant query's result vector.
    async fn query(&mut self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        if let Some(r) = self.cache.get(expr) {
            return r.clone();
        }
        let r = self
            .get_json(&format!(
                "/api/v1/query?query={}",
                utf8_percent_encode(expr, NON_ALPHANUMERIC)
            ))
            .await
            .map(|v| v["data"]["result"].as_array().cloned().unwrap_or_default());
        self.cache.insert(expr.to_string(), r.clone());
        r
    }

    /// The `job` labels of `count by (job) (selector)`.
    async fn jobs_of(&mut self, selector: &str) -> Vec<String> {
        self.query(&format!("count by (job) ({selector})"))
            .await
            .unwrap_or_default()
            .iter()
            .filter_map(|s| s["metric"]["job"].as_str().map(str::to_string))
            .collect()
    }
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}

/// The fix for data under another job than the one queried.
fn job_fix(wanted: &str, found: &[String], alert: bool) -> String {
    let other = &found[0];
    if alert {
        format!(
            "the shipped alerts select job=\"{wanted}\" but the picker is scraped as job=\"{other}\": \
             rename the scrape job to {wanted} (job_name in prometheus.yml; a ServiceMonitor's job is its \
             Service's name, llm-d-gaie-epp), or change the job in the rules file and regenerate the \
             PrometheusRule (deploy/monitoring/make-prometheusrule.sh)"
        )
    } else {
        format!(
            "the picker's series carry job=\"{other}\", not job=\"{wanted}\": rename the scrape job to \
             llm-d-gaie-epp (job_name in prometheus.yml; a ServiceMonitor's job is its Service's name), \
             or pick {other} in the dashboard's job variable and rerun doctor with --job {other}"
        )
    }
}

/// Runs the Prometheus checks.
pub async fn check(
    r: &mut Report,
    client: &Client,
    ep: &Endpoint,
    job: &str,
    assets: &Assets,
    expo: Option<&Exposition>,
    metrics_ep: Option<&Endpoint>,
) {
    r.section(&format!("Prometheus: {} (job {job:?})", ep.url));
    let base = ep.path.trim_end_matches('/').to_string();
    let mut p = Prom {
        client,
        ep,
        base,
        cache: HashMap::new(),
    };

    // Reachability and API
    let (progress, result) = client
        .get(
            ep,
            Some(&format!("{}/api/v1/status/buildinfo", p.base)),
            None,
        )
        .await;
    let Some(resp) =
        report_transport(r, Peer::Prometheus, client, ep, &progress, &result, false).await
    else {
        r.skip("Prometheus queries", "Prometheus is not reachable");
        return;
    };
    let info: Option<serde_json::Value> = serde_json::from_slice(&resp.body).ok();
    match info.filter(|v| v["status"] == "success") {
        Some(v) => r.pass(
            "Prometheus API",
            format!(
                "Prometheus {} answers at {}",
                v["data"]["version"].as_str().unwrap_or("?"),
                ep.url
            ),
        ),
        None => {
            r.fail(
                "Prometheus API",
                format!(
                    "{}/api/v1/status/buildinfo answered HTTP {} without the Prometheus API's JSON: {}",
                    p.base,
                    resp.status,
                    snippet(&resp.text())
                ),
                "point --prometheus-url at Prometheus itself (e.g. http://127.0.0.1:9090), including its \
                 --web.route-prefix if it has one; not at Grafana",
            );
            r.skip("Prometheus queries", "no Prometheus API");
            return;
        }
    }

    // The target
    let up_expr = format!("up{{job={}}}", quote(job));
    let target = match p.query(&up_expr).await {
        Err(e) => {
            r.fail(
                "Prometheus target",
                format!("query {up_expr} failed: {e}"),
                "check the Prometheus logs",
            );
            return;
        }
        Ok(series) if series.is_empty() => {
            let mut jobs: BTreeSet<String> = BTreeSet::new();
            for sel in ["epp_build_info", "epp_requests_total"] {
                jobs.extend(p.jobs_of(sel).await);
            }
            // Targets scraping the metrics URL's address, whatever their health.
            if let (Some(m), Ok(v)) = (metrics_ep, p.get_json("/api/v1/targets").await) {
                for t in v["data"]["activeTargets"].as_array().into_iter().flatten() {
                    let url = t["scrapeUrl"].as_str().unwrap_or("");
                    if url.contains(&format!("//{}/", m.host_port())) {
                        if let Some(j) = t["labels"]["job"].as_str() {
                            jobs.insert(j.to_string());
                        }
                    }
                }
            }
            jobs.remove(job);
            let jobs: Vec<String> = jobs.into_iter().collect();
            if jobs.is_empty() {
                r.fail(
                    "Prometheus target",
                    format!(
                        "no target has job=\"{job}\", and no job carries the picker's metrics (epp_build_info)"
                    ),
                    "Prometheus does not scrape the picker: add the job from \
                     deploy/monitoring/prometheus/scrape-static.yaml (or scrape-kubernetes.yaml) and reload \
                     Prometheus; with prometheus-operator apply deploy/monitoring/servicemonitor.yaml and check \
                     that its `release` label matches the Prometheus serviceMonitorSelector \
                     (docs/monitoring.md, \"No metrics scraped\")",
                );
            } else {
                r.fail(
                    "Prometheus target",
                    format!(
                        "no target has job=\"{job}\": the job label is wrong; the picker is scraped as {}",
                        jobs.iter()
                            .map(|j| format!("job=\"{j}\""))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    job_fix(job, &jobs, false),
                );
            }
            Target::Missing
        }
        Ok(series) => {
            let down: Vec<String> = series
                .iter()
                .filter(|s| s["value"][1].as_str() != Some("1"))
                .map(|s| s["metric"]["instance"].as_str().unwrap_or("?").to_string())
                .collect();
            let instances: Vec<String> = series
                .iter()
                .map(|s| s["metric"]["instance"].as_str().unwrap_or("?").to_string())
                .collect();
            if down.is_empty() {
                r.pass(
                    "Prometheus target",
                    format!("{up_expr} = 1 for {}", instances.join(", ")),
                );
                Target::Up
            } else {
                let errors = target_errors(&mut p, job).await;
                let err = errors
                    .iter()
                    .map(|(i, e)| format!("{i}: {e}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                let all: String = errors.iter().map(|(_, e)| e.as_str()).collect();
                r.fail(
                    "Prometheus target",
                    format!(
                        "{up_expr} = 0 for {} (last scrape error: {})",
                        down.join(", "),
                        if err.is_empty() { "unknown" } else { &err }
                    ),
                    scrape_error_fix(&all),
                );
                Target::Down
            }
        }
    };

    alert_rules(r, &mut p, assets).await;

    // Every query
    let queries: Vec<(&Query, bool)> = assets
        .dashboard
        .iter()
        .map(|q| (q, false))
        .chain(assets.alerts.iter().map(|q| (q, true)))
        .collect();
    let mut good = 0;
    for (q, alert) in queries {
        if let Some(e) = &q.parse_error {
            r.fail(
                &q.origin,
                format!("does not parse: {e}: {}", q.expr),
                "fix the PromQL in the dashboard or rules file",
            );
            continue;
        }
        match p.query(&q.expr).await {
            Err(e) => r.fail(
                &q.origin,
                format!("Prometheus rejected the query: {e}"),
                format!("fix the query: {}", q.expr),
            ),
            Ok(series) if !series.is_empty() => {
                good += 1;
                r.pass(&q.origin, format!("{} series", series.len()))
            }
            Ok(_) if expo.and_then(|e| e.not_in_use(&q.expr)).is_some() => {
                good += 1;
                let why = expo.and_then(|e| e.not_in_use(&q.expr)).unwrap_or_default();
                r.pass(&q.origin, format!("no data, as expected: {why}"))
            }
            Ok(_) => {
                let (mark, detail, fix) = why_empty(&mut p, q, alert, job, &target, expo).await;
                r.add(mark, &q.origin, &format!("no data: {detail}"), &fix);
            }
        }
    }
    let total = assets.dashboard.len() + assets.alerts.len();
    r.note(&format!("  ({good} of {total} queries returned data)"));
}

/// `(instance, lastError)` of the job's unhealthy targets.
async fn target_errors(p: &mut Prom<'_>, job: &str) -> Vec<(String, String)> {
    let Ok(v) = p.get_json("/api/v1/targets").await else {
        return Vec::new();
    };
    v["data"]["activeTargets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["labels"]["job"] == job && t["health"] != "up")
        .map(|t| {
            (
                t["labels"]["instance"].as_str().unwrap_or("?").to_string(),
                t["lastError"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// A fix for Prometheus' `lastError` of a scrape.
fn scrape_error_fix(err: &str) -> String {
    let e = err.to_ascii_lowercase();
    if e.contains("401") {
        "Prometheus' token is missing or wrong: give it the token the picker expects (the content of the \
         picker's --metrics-token-file in `credentials_file` of deploy/monitoring/prometheus/scrape-static-token.yaml, \
         or for --metrics-auth=kubernetes the Secret prometheus-epp-metrics-token of \
         deploy/monitoring/servicemonitor.yaml); run doctor with --metrics-url and the same token to see the picker's answer"
            .into()
    } else if e.contains("403") {
        "Prometheus' ServiceAccount may not get /metrics: kubectl apply -f deploy/kubernetes/rbac.yaml \
         (binds the ClusterRole metrics-reader to the ServiceAccount prometheus in llm-d-monitoring)"
            .into()
    } else if e.contains("500") {
        "the picker cannot review tokens: its ServiceAccount needs create on tokenreviews and \
         subjectaccessreviews: kubectl apply -f deploy/kubernetes/rbac.yaml"
            .into()
    } else if e.contains("malformed http response") {
        "the picker serves HTTPS (--metrics-tls) but the scrape uses plain HTTP: set `scheme: https` \
         and tls_config (ca_file with the CA of the picker's certificate, or insecure_skip_verify for \
         a self-signed one) in the scrape job (ServiceMonitor: spec.endpoints[].scheme and tlsConfig)"
            .into()
    } else if e.contains("http response to https client") {
        "the picker serves plain HTTP: set `scheme: http` in the scrape job (ServiceMonitor: spec.endpoints[].scheme)".into()
    } else if e.contains("x509") || e.contains("certificate") || e.contains("tls") {
        "the scrape's TLS settings do not match the picker's certificate: set tls_config.ca_file to the CA \
         that issued it (or insecure_skip_verify for a self-signed one), and the right server_name"
            .into()
    } else if e.contains("connection refused") || e.contains("no such host") {
        "Prometheus cannot reach the picker at the target address: check the target (static_configs, or the \
         Service and its `metrics` port for kubernetes_sd/ServiceMonitor) and that the picker runs"
            .into()
    } else if e.contains("deadline") || e.contains("timeout") {
        "the scrape timed out: check NetworkPolicies between the monitoring namespace and the picker's \
         port 9090, and scrape_timeout"
            .into()
    } else {
        "see the target's last error on Prometheus' /targets page and run doctor with --metrics-url \
         against the same address"
            .into()
    }
}

/// Why a query returned nothing: the mark, the reason and the fix.
async fn why_empty(
    p: &mut Prom<'_>,
    q: &Query,
    alert: bool,
    job: &str,
    target: &Target,
    expo: Option<&Exposition>,
) -> (Mark, String, String) {
    let Ok(e) = parser::parse(&q.expr) else {
        return (Mark::Fail, "unparsable".into(), "fix the query".into());
    };
    let mut selectors = Vec::new();
    for_each_selector(&e, &mut |vs| {
        let mut vs = vs.clone();
        vs.offset = None;
        vs.at = None;
        if !selectors.contains(&vs) {
            selectors.push(vs);
        }
    });
    let mut soft: Option<String> = None;
    for vs in selectors {
        let Some(name) = selector_name(&vs) else {
            continue;
        };
        if !p
            .query(&vs.to_string())
            .await
            .unwrap_or_default()
            .is_empty()
        {
            continue;
        }
        // This selector matches nothing. Which jobs have the metric at all?
        let wanted = vs
            .matchers
            .matchers
            .iter()
            .find(|m| m.name == "job")
            .map(|m| m.value.clone());
        let jobs = p.jobs_of(&format!("{{__name__={}}}", quote(&name))).await;
        let wanted_job = wanted.clone().unwrap_or_else(|| job.to_string());
        if !jobs.is_empty() && !jobs.contains(&wanted_job) && wanted.is_some() {
            let found: Vec<String> = jobs.clone();
            return (
                Mark::Fail,
                format!(
                    "job label is wrong: {name} has series under {} but not job=\"{wanted_job}\"",
                    found
                        .iter()
                        .map(|j| format!("job=\"{j}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                if !alert && matches!(target, Target::Missing) {
                    format!(
                        "the same job label problem as the Prometheus target check above: rerun with --job {} \
                         (and pick it in the dashboard's job variable), or rename the scrape job to {wanted_job}",
                        found[0]
                    )
                } else {
                    job_fix(&wanted_job, &found, alert)
                },
            );
        }
        if !jobs.is_empty() {
            // The metric is there under the job; the other matchers select nothing yet (e.g. no
            // 5xx so far). Not a problem by itself: look at the other selectors.
            if soft.is_none() {
                soft = Some(vs.to_string());
            }
            continue;
        }
        if name == "up" || is_synthetic(&name) {
            return (
                Mark::Fail,
                format!("Prometheus has no {vs} series"),
                "see the Prometheus target check above".into(),
            );
        }
        match target {
            Target::Down => {
                return (
                    Mark::Fail,
                    format!("the job's target is down, so Prometheus has no {name}"),
                    "fix the scrape first (see the Prometheus target check above)".into(),
                )
            }
            Target::Missing => {
                return (
                    Mark::Fail,
                    format!("no target scrapes the picker as job=\"{job}\", so there is no {name}"),
                    "fix the job first (see the Prometheus target check above)".into(),
                )
            }
            Target::Up => {}
        }
        let family = family_name(&name);
        let state = expo.map(|x| x.state(family));
        return match state {
            Some(MetricState::Present) => (
                Mark::Fail,
                format!(
                    "the picker at --metrics-url exposes {name}, but Prometheus has no series of it"
                ),
                "Prometheus scrapes another picker than --metrics-url (compare the target's address), or it \
                 has not scraped since the metric appeared: wait a scrape interval and retry"
                    .into(),
            ),
            Some(MetricState::NoTraffic(why)) => (
                Mark::Warn,
                format!("no traffic yet: {name}: {why}"),
                "send requests through the picker, wait a scrape interval, and retry".into(),
            ),
            Some(MetricState::NotInUse(why)) => {
                (Mark::Pass, format!("no data, as expected: {name}: {why}"), String::new())
            }
            None if family.contains(crate::picker_metrics::FLOW_CONTROL_MARK) => (
                Mark::Warn,
                format!("Prometheus has no {name}: flow control is off in the picker (featureGates: [flowControl] not set), or nothing was routed yet"),
                "nothing to do if flow control is meant to be off; add --metrics-url to tell the two apart".into(),
            ),
            Some(MetricState::Missing) => (
                Mark::Fail,
                format!("metric missing: the picker does not export {name}"),
                "use the dashboard and rules shipped with the picker's version (--dashboard/--rules), or upgrade the picker"
                    .into(),
            ),
            None => match appears_with_traffic(family) {
                Some(when) => (
                    Mark::Warn,
                    format!("no traffic yet (probably): Prometheus has no {name}; {when}"),
                    "send requests through the picker; add --metrics-url to tell \"no traffic\" from \"missing\""
                        .into(),
                ),
                None => (
                    Mark::Fail,
                    format!("metric missing: Prometheus has no {name} for any job"),
                    "the picker does not export it, or is not scraped: run doctor with --metrics-url to check \
                     its exposition"
                        .into(),
                ),
            },
        };
    }
    (
        Mark::Warn,
        format!(
            "no traffic yet: the series it reads exist, but rates need two scrapes with traffic inside \
             the window{}",
            soft.map(|s| format!(" (and nothing matches {s} yet)")).unwrap_or_default()
        ),
        "send requests through the picker, wait a few scrape intervals, and retry".into(),
    )
}

/// Whether the rules file's alerts are loaded in Prometheus, evaluate, and which fire.
async fn alert_rules(r: &mut Report, p: &mut Prom<'_>, assets: &Assets) {
    let wanted = &assets.alert_names;
    if wanted.is_empty() {
        return;
    }
    let v = match p.get_json("/api/v1/rules?type=alert").await {
        Ok(v) => v,
        Err(e) => {
            r.warn(
                "Prometheus alert rules",
                format!("cannot list them: {e}"),
                "check the Prometheus logs",
            );
            return;
        }
    };
    let loaded: Vec<&serde_json::Value> = v["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter(|rule| {
            rule["name"]
                .as_str()
                .is_some_and(|n| wanted.iter().any(|w| w == n))
        })
        .collect();
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|w| !loaded.iter().any(|rule| rule["name"] == w.as_str()))
        .collect();
    let load_hint = format!(
        "load {}: add it to `rule_files:` in prometheus.yml and reload Prometheus, or with \
         prometheus-operator `kubectl apply -f deploy/monitoring/prometheusrule.yaml` (its `release` \
         label must match the Prometheus ruleSelector)",
        assets.rules_source
    );
    if missing.len() == wanted.len() {
        r.warn(
            "Prometheus alert rules",
            format!(
                "none of the {} alerts of {} is loaded in this Prometheus",
                wanted.len(),
                assets.rules_source
            ),
            load_hint,
        );
        return;
    }
    if missing.is_empty() {
        r.pass(
            "Prometheus alert rules",
            format!(
                "all {} alerts of {} are loaded",
                wanted.len(),
                assets.rules_source
            ),
        );
    } else {
        r.warn(
            "Prometheus alert rules",
            format!(
                "{} of {} alerts are loaded; missing: {}",
                wanted.len() - missing.len(),
                wanted.len(),
                missing
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            load_hint,
        );
    }
    for rule in &loaded {
        let name = rule["name"].as_str().unwrap_or("?");
        if rule["health"] == "err" {
            r.fail(
                &format!("Prometheus alert {name}"),
                format!(
                    "fails to evaluate: {}",
                    rule["lastError"].as_str().unwrap_or("unknown error")
                ),
                "fix the rule's expression (promtool check rules) and reload Prometheus",
            );
        } else if rule["state"] == "firing" {
            let summary = rule["annotations"]["summary"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let desc = rule["alerts"][0]["annotations"]["description"]
                .as_str()
                .or_else(|| rule["annotations"]["description"].as_str())
                .unwrap_or("see the alert's description")
                .to_string();
            r.warn(
                &format!("Prometheus alert {name}"),
                format!("firing: {summary}"),
                desc,
            );
        }
    }
}
