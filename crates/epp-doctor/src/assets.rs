//! The dashboard and alert rules `epp doctor` checks against: read from a file, or the copies
//! built into the binary when the default path does not exist (doctor run outside a checkout);
//! their PromQL (via `promql-parser`), with Grafana's template variables filled in.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use promql_parser::parser::{self, Expr, VectorSelector};

pub const DEFAULT_DASHBOARD: &str = "deploy/monitoring/grafana/epp-dashboard.json";
pub const DEFAULT_RULES: &str = "deploy/monitoring/rules/epp-alerts.rules.yaml";
/// The job label every shipped scrape path produces.
pub const DEFAULT_JOB: &str = "llm-d-gaie-epp";

const BUILTIN_DASHBOARD: &str =
    include_str!("../../../deploy/monitoring/grafana/epp-dashboard.json");
const BUILTIN_RULES: &str = include_str!("../../../deploy/monitoring/rules/epp-alerts.rules.yaml");

/// Series Prometheus makes itself: never in an exposition.
const SYNTHETIC: &[&str] = &[
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
    "ALERTS",
    "ALERTS_FOR_STATE",
];

pub fn is_synthetic(name: &str) -> bool {
    SYNTHETIC.contains(&name)
}

/// One query to run against Prometheus.
#[derive(Clone, Debug)]
pub struct Query {
    /// e.g. `dashboard panel "Request rate" [A]`.
    pub origin: String,
    /// Ready to send (variables expanded).
    pub expr: String,
    /// Why the query does not parse, if it does not.
    pub parse_error: Option<String>,
}

#[derive(Debug)]
pub struct Assets {
    /// Where the dashboard came from (a path, or "built-in copy of ...").
    pub dashboard_source: String,
    pub rules_source: String,
    /// Every dashboard query, in panel order, with `$job` = the doctor's `--job`.
    pub dashboard: Vec<Query>,
    /// Every alert's expression before its threshold comparison.
    pub alerts: Vec<Query>,
    /// The alert names of the rules file.
    pub alert_names: Vec<String>,
    /// Metric families the dashboard and the rules read (suffixes `_bucket`/`_sum`/`_count`
    /// stripped, Prometheus' own series left out).
    pub metrics: BTreeSet<String>,
}

fn read_or_builtin(
    flag: Option<&Path>,
    flag_name: &str,
    default: &str,
    builtin: &str,
) -> Result<(String, String), String> {
    match flag {
        Some(p) => std::fs::read_to_string(p)
            .map(|t| (p.display().to_string(), t))
            .map_err(|e| format!("{flag_name} {}: cannot read: {e}", p.display())),
        None if Path::new(default).is_file() => std::fs::read_to_string(default)
            .map(|t| (default.to_string(), t))
            .map_err(|e| format!("{default}: cannot read: {e}")),
        None => Ok((format!("built-in copy of {default}"), builtin.to_string())),
    }
}

/// Loads the dashboard and the rules.
pub fn load(dashboard: Option<&Path>, rules: Option<&Path>, job: &str) -> Result<Assets, String> {
    let (dashboard_source, text) = read_or_builtin(
        dashboard,
        "--dashboard",
        DEFAULT_DASHBOARD,
        BUILTIN_DASHBOARD,
    )?;
    let mut model: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{dashboard_source}: not a JSON dashboard: {e}"))?;
    // The import form `{"dashboard": {...}, "overwrite": true}` works too.
    if model.get("panels").is_none() && model["dashboard"].is_object() {
        model = model["dashboard"].take();
    }
    let (rules_source, text) = read_or_builtin(rules, "--rules", DEFAULT_RULES, BUILTIN_RULES)?;
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|e| format!("{rules_source}: not YAML: {e}"))?;

    let vars = dashboard_variables(&model, job);
    let mut metrics = BTreeSet::new();
    let mut add_names = |e: &Expr| {
        for n in metric_names(e) {
            if !is_synthetic(&n) {
                metrics.insert(n);
            }
        }
    };

    let mut dashboard_queries = Vec::new();
    for (origin, raw) in dashboard_targets(&model) {
        let expr = expand_vars(&raw, &vars);
        let parse_error = match parser::parse(&expr) {
            Ok(e) => {
                add_names(&e);
                None
            }
            Err(e) => Some(e),
        };
        dashboard_queries.push(Query {
            origin,
            expr,
            parse_error,
        });
    }
    for selector in variable_selectors(&model) {
        if let Ok(e) = parser::parse(&expand_vars(&selector, &vars)) {
            add_names(&e);
        }
    }
    if dashboard_queries.is_empty() {
        return Err(format!(
            "{dashboard_source}: no panel has a PromQL target (`targets[].expr`): is it a Grafana dashboard?"
        ));
    }

    let mut alerts = Vec::new();
    let mut alert_names = Vec::new();
    let groups = rules
        .get("groups")
        .or_else(|| rules.get("spec").and_then(|s| s.get("groups")))
        .and_then(|g| g.as_sequence())
        .ok_or_else(|| {
            format!("{rules_source}: no `groups:` (a Prometheus rules file or a PrometheusRule)")
        })?;
    for group in groups {
        for rule in group["rules"].as_sequence().into_iter().flatten() {
            let Some(expr) = rule["expr"].as_str() else {
                continue;
            };
            if let Some(name) = rule["alert"].as_str() {
                alert_names.push(name.to_string());
            }
            match parser::parse(expr) {
                Ok(e) => {
                    add_names(&e);
                    if let Some(name) = rule["alert"].as_str() {
                        alerts.push(Query {
                            origin: format!("alert {name} (before its threshold)"),
                            expr: base_expr(&e).to_string(),
                            parse_error: None,
                        });
                    }
                }
                Err(err) => {
                    if let Some(name) = rule["alert"].as_str() {
                        alerts.push(Query {
                            origin: format!("alert {name}"),
                            expr: expr.to_string(),
                            parse_error: Some(err),
                        });
                    }
                }
            }
        }
    }
    Ok(Assets {
        dashboard_source,
        rules_source,
        dashboard: dashboard_queries,
        alerts,
        alert_names,
        metrics,
    })
}

/// Every panel target's PromQL (rows' nested panels included), with a readable origin.
fn dashboard_targets(model: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("(untitled)");
            for t in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str().filter(|e| !e.trim().is_empty()) {
                    let origin = match t["refId"].as_str() {
                        Some(r) => format!("dashboard panel {title:?} [{r}]"),
                        None => format!("dashboard panel {title:?}"),
                    };
                    out.push((origin, expr.to_string()));
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&model["panels"], &mut out);
    out
}

/// The selectors of `label_values(selector, label)` variable queries.
fn variable_selectors(model: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for var in model["templating"]["list"].as_array().into_iter().flatten() {
        let q = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .unwrap_or("")
            .trim();
        if let Some(inner) = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
        {
            if let Some((selector, _label)) = inner.rsplit_once(',') {
                out.push(selector.trim().to_string());
            }
        }
    }
    out
}

/// Values for the template variables: Grafana's built-in intervals, each dashboard variable's
/// current value, and `job` = the doctor's `--job`.
pub fn dashboard_variables(model: &serde_json::Value, job: &str) -> BTreeMap<String, String> {
    let mut vars: BTreeMap<String, String> = [
        ("__rate_interval", "5m"),
        ("__interval", "1m"),
        ("__interval_ms", "60000"),
        ("__range", "1h"),
        ("__range_s", "3600"),
        ("__range_ms", "3600000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for var in model["templating"]["list"].as_array().into_iter().flatten() {
        let Some(name) = var["name"].as_str() else {
            continue;
        };
        let current = &var["current"]["value"];
        let value = current
            .as_str()
            .or_else(|| current.as_array().and_then(|a| a.first()?.as_str()));
        if let Some(v) = value {
            vars.insert(name.to_string(), v.to_string());
        }
    }
    vars.insert("job".to_string(), job.to_string());
    vars
}

/// Replaces `$name`, `${name}` and `${name:format}` with their values; unknown variables stay.
pub fn expand_vars(expr: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(braced) = after.strip_prefix('{') {
            if let Some(end) = braced.find('}') {
                let name = braced[..end].split(':').next().unwrap_or("");
                if let Some(v) = vars.get(name) {
                    out.push_str(v);
                    rest = &braced[end + 1..];
                    continue;
                }
            }
        } else {
            let len = after
                .bytes()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == b'_')
                .count();
            if let Some(v) = vars.get(&after[..len]) {
                out.push_str(v);
                rest = &after[len..];
                continue;
            }
        }
        out.push('$');
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Calls `f` on every vector selector of `e` (those of range selectors included).
pub fn for_each_selector<'a>(e: &'a Expr, f: &mut dyn FnMut(&'a VectorSelector)) {
    match e {
        Expr::VectorSelector(vs) => f(vs),
        Expr::MatrixSelector(ms) => f(&ms.vs),
        Expr::Aggregate(a) => {
            if let Some(p) = &a.param {
                for_each_selector(p, f);
            }
            for_each_selector(&a.expr, f);
        }
        Expr::Unary(u) => for_each_selector(&u.expr, f),
        Expr::Binary(b) => {
            for_each_selector(&b.lhs, f);
            for_each_selector(&b.rhs, f);
        }
        Expr::Paren(p) => for_each_selector(&p.expr, f),
        Expr::Subquery(s) => for_each_selector(&s.expr, f),
        Expr::Call(c) => {
            for a in &c.args.args {
                for_each_selector(a, f);
            }
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// The series name a selector reads: its metric name, or its `__name__="..."` matcher.
pub fn selector_name(vs: &VectorSelector) -> Option<String> {
    vs.name.clone().or_else(|| {
        vs.matchers
            .matchers
            .iter()
            .find(|m| m.name == "__name__")
            .map(|m| m.value.clone())
    })
}

/// The metric families an expression reads (`x_bucket`, `x_sum`, `x_count` → `x`).
pub fn metric_names(e: &Expr) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for_each_selector(e, &mut |vs| {
        if let Some(n) = selector_name(vs) {
            out.insert(family_name(&n).to_string());
        }
    });
    out
}

/// `x_bucket` / `x_sum` / `x_count` → `x`; other names unchanged.
pub fn family_name(sample: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| sample.strip_suffix(s))
        .unwrap_or(sample)
}

fn unparen(mut e: &Expr) -> &Expr {
    while let Expr::Paren(p) = e {
        e = &p.expr;
    }
    e
}

/// The part of an alert expression that must return data whenever the picker is scraped: the
/// expression before its threshold (`A > 0.1` → `A`, `A < 0.5 and B` → `A`), and for
/// `absent(X)` the selector `X`.
pub fn base_expr(e: &Expr) -> &Expr {
    let e = unparen(e);
    match e {
        Expr::Binary(b) if b.op.is_comparison_operator() && !b.return_bool() => {
            if matches!(unparen(&b.rhs), Expr::NumberLiteral(_)) {
                base_expr(&b.lhs)
            } else {
                e
            }
        }
        Expr::Binary(b) if matches!(b.op.to_string().as_str(), "and" | "unless") => {
            base_expr(&b.lhs)
        }
        Expr::Call(c) if c.func.name == "absent" && !c.args.args.is_empty() => {
            unparen(&c.args.args[0])
        }
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_expand() {
        let model = serde_json::json!({"templating": {"list": [
            {"name": "datasource", "type": "datasource", "current": {}},
            {"name": "job", "current": {"value": "from-dashboard"}},
            {"name": "q", "current": {"value": ["0.95"]}},
        ]}});
        let vars = dashboard_variables(&model, "llm-d-gaie-epp");
        assert_eq!(
            expand_vars(
                r#"histogram_quantile($q, sum by (le) (rate(x_bucket{job="$job",a="${job:regex}"}[$__rate_interval]))) + $__interval_ms + $unknown"#,
                &vars
            ),
            r#"histogram_quantile(0.95, sum by (le) (rate(x_bucket{job="llm-d-gaie-epp",a="llm-d-gaie-epp"}[5m]))) + 60000 + $unknown"#
        );
    }

    #[test]
    fn builtin_assets_load() {
        let a = load(
            Some(Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../",
                "deploy/monitoring/grafana/epp-dashboard.json"
            ))),
            Some(Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../",
                "deploy/monitoring/rules/epp-alerts.rules.yaml"
            ))),
            "j",
        )
        .unwrap();
        assert!(a.dashboard.iter().all(|q| q.parse_error.is_none()));
        assert!(a.dashboard.iter().all(|q| !q.expr.contains('$')));
        assert!(a.metrics.contains("epp_requests_total"));
        assert!(a.metrics.contains("epp_request_duration_seconds"));
        assert!(!a.metrics.contains("up"));
        let base: Vec<_> = a.alerts.iter().map(|q| q.expr.as_str()).collect();
        assert!(base.contains(&r#"up{job="llm-d-gaie-epp"}"#), "{base:?}");
    }

    #[test]
    fn base_expr_drops_thresholds() {
        let e = parser::parse("sum(a) / (sum(b) > 0) < 0.5 and on() c").unwrap();
        assert_eq!(base_expr(&e).to_string(), "sum(a) / (sum(b) > 0)");
        let e = parser::parse(r#"absent(up{job="x"})"#).unwrap();
        assert_eq!(base_expr(&e).to_string(), r#"up{job="x"}"#);
    }
}
