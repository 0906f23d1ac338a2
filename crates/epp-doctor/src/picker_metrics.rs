//! Checks of the picker's `/metrics`: transport, the authentication outcome, Content-Type, the
//! exposition, and every metric the dashboard and the alerts read.

use std::collections::BTreeSet;

use epp_core::exposition::{self, Sample};

use super::assets::{family_name, Assets};
use super::client::{Client, Endpoint};
use super::report::Report;
use super::transport::{report_transport, snippet, Peer};

/// Where the token came from (for the wording of fixes).
#[derive(Clone, Debug)]
pub enum TokenSource {
    None,
    Flag,
    File(String),
}

impl TokenSource {
    fn describe(&self) -> String {
        match self {
            TokenSource::None => "without a token".into(),
            TokenSource::Flag => "with the token from --token".into(),
            TokenSource::File(f) => format!("with the token from --token-file {f}"),
        }
    }
}

/// Families whose series only appear with traffic, and when.
const AFTER_TRAFFIC: &[(&str, &str)] = &[
    (
        "epp_requests_total",
        "its series appear with the first request the picker handles",
    ),
    (
        "epp_cache_requests_total",
        "its series appear with the first routed request whose prompt fills a prefix block",
    ),
    (
        "epp_cache_hits_total",
        "its series appear with the first routed request whose prompt fills a prefix block",
    ),
    (
        "epp_plugin_duration_seconds",
        "its series appear with the first scheduled request",
    ),
    (
        "epp_request_e2e_duration_seconds",
        "its series appear with the first request through `epp proxy`",
    ),
    (
        "epp_request_ttft_seconds",
        "its series appear with the first request through `epp proxy`",
    ),
    (
        "epp_backend_cached_tokens_total",
        "its series appear with the first response whose `usage` reports cached tokens (vLLM: `--enable-prompt-tokens-details`)",
    ),
    (
        "epp_backend_predicted_cached_tokens_total",
        "its series appear with the first response whose `usage` reports cached tokens (vLLM: `--enable-prompt-tokens-details`)",
    ),
];

pub fn appears_with_traffic(family: &str) -> Option<&'static str> {
    if family.contains(FLOW_CONTROL_MARK) {
        return Some(
            "its series appear with the first request when flow control is on (featureGates: [flowControl])",
        );
    }
    if family.contains("_disagg_decision") || family.contains("_pd_decision") {
        return Some(
            "its series appear with the first request a disaggregating profile handler schedules",
        );
    }
    if family.starts_with("epp_pd_prefill_") {
        return Some(
            "its series appear with the first prefill call of epp proxy (P/D in proxy mode)",
        );
    }
    AFTER_TRAFFIC
        .iter()
        .find(|(f, _)| *f == family)
        .map(|(_, w)| *w)
}

/// What the picker's exposition holds.
#[derive(Debug, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    /// Families with at least one sample.
    pub families: BTreeSet<String>,
    /// Families named by `# TYPE` / `# HELP` lines.
    pub declared: BTreeSet<String>,
    pub version: Option<String>,
    /// Whether the picker has handled a request.
    pub traffic: bool,
}

/// Whether a metric family the assets need is there.
#[derive(Debug, PartialEq, Eq)]
pub enum MetricState {
    Present,
    /// Not yet: why.
    NoTraffic(String),
    /// Declared, and without series by this picker's configuration: why.
    NotInUse(String),
    Missing,
}

/// What flow-control families' names contain (`llm_d_epp_flow_control_*` and the legacy
/// `inference_extension_flow_control_*`): they have series only with `featureGates:
/// [flowControl]`.
pub const FLOW_CONTROL_MARK: &str = "_flow_control_";

/// Why a flow-control family or query has nothing in a picker running without flow control.
pub const FLOW_CONTROL_OFF: &str = "flow control is off in this picker (no flow-control series after traffic): \
     its panels and EPPFlowControlShedding stay empty until the config sets featureGates: [flowControl]";

/// A feature whose families have series only when the configuration uses it: families (and
/// queries) containing one of `marks` are "not in use" in a picker that has handled traffic
/// without leaving a sample whose name starts with one of `evidence`.
pub struct Feature {
    pub marks: &'static [&'static str],
    pub evidence: &'static [&'static str],
    /// Its evidence appears only with traffic (else from start-up, when the feature is on).
    pub with_traffic: bool,
    /// Why its panels and alerts are empty in such a picker.
    pub off: &'static str,
}

/// The features whose panels may rightly be empty.
pub const FEATURES: &[Feature] = &[
    Feature {
        marks: &[FLOW_CONTROL_MARK],
        evidence: &["llm_d_epp_flow_control_requests"],
        with_traffic: true,
        off: FLOW_CONTROL_OFF,
    },
    Feature {
        marks: &["_disagg_decision", "_pd_decision"],
        evidence: &["llm_d_epp_disagg_decision", "llm_d_epp_pd_decision"],
        with_traffic: true,
        off: "prefill/decode disaggregation is not configured in this picker (no disaggregation decision after traffic): \
              the Disaggregation panels stay empty until the config uses disagg-profile-handler",
    },
    Feature {
        marks: &["epp_pd_prefill_"],
        evidence: &["epp_pd_prefill_requests"],
        with_traffic: true,
        off: "this picker made no prefill call: P/D is not configured, it runs behind Envoy (where the routing sidecar \
              calls prefill pods), or no request was disaggregated yet; EPPPrefillFallbacks watches epp proxy only",
    },
    Feature {
        marks: &["epp_shared_state_"],
        evidence: &["epp_shared_state_up"],
        with_traffic: false,
        off: "this picker runs without --shared-state (no epp_shared_state_up): the Shared state panels and \
              EPPSharedStateDown/EPPSharedStateSnapshotStale stay empty; they watch active-active replicas",
    },
];

impl Exposition {
    pub fn from_text(text: &str) -> Result<Self, String> {
        let samples = exposition::parse(text)?;
        let families = samples
            .iter()
            .map(|s| family_name(&s.name).to_string())
            .collect();
        let declared = text
            .lines()
            .filter_map(|l| {
                let rest = l
                    .strip_prefix("# TYPE ")
                    .or_else(|| l.strip_prefix("# HELP "))?;
                rest.split_whitespace().next().map(str::to_string)
            })
            .collect();
        let version = samples
            .iter()
            .find(|s| s.name == "epp_build_info")
            .map(|s| s.label("version").unwrap_or("?").to_string());
        let traffic = exposition::sum(&samples, "epp_requests_total", &[]) > 0.0;
        Ok(Self {
            samples,
            families,
            declared,
            version,
            traffic,
        })
    }

    /// The picker has handled requests and has no flow-control series: flow control is off
    /// (with it on, every request leaves a `llm_d_epp_flow_control_requests_total` sample).
    pub fn flow_control_off(&self) -> bool {
        self.not_in_use(FLOW_CONTROL_MARK).is_some()
    }

    /// Why `text` (a family or a query) reads a feature this picker does not use, if it does.
    pub fn not_in_use(&self, text: &str) -> Option<&'static str> {
        FEATURES
            .iter()
            .find(|f| {
                f.marks.iter().any(|m| text.contains(m))
                    && (self.traffic || !f.with_traffic)
                    && !self
                        .samples
                        .iter()
                        .any(|s| f.evidence.iter().any(|e| s.name.starts_with(e)))
            })
            .map(|f| f.off)
    }

    pub fn state(&self, family: &str) -> MetricState {
        if self.families.contains(family) {
            return MetricState::Present;
        }
        if let Some(why) = self.not_in_use(family) {
            return MetricState::NotInUse(why.into());
        }
        let declared = self.declared.contains(family)
            || family
                .strip_suffix("_total")
                .is_some_and(|f| self.declared.contains(f));
        if declared {
            return MetricState::NoTraffic(
                "its HELP/TYPE is exposed but it has no sample yet".into(),
            );
        }
        match appears_with_traffic(family) {
            Some(when) if !self.traffic => MetricState::NoTraffic(format!(
                "{when}, and this picker has handled no request yet"
            )),
            Some(when) => MetricState::NoTraffic(when.to_string()),
            None => MetricState::Missing,
        }
    }
}

/// The `message` of the picker's JSON error body, else the body itself.
fn error_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| snippet(body))
}

/// `user "X"` in a 403 message.
fn forbidden_user(message: &str) -> Option<String> {
    let rest = &message[message.find("user \"")? + 6..];
    Some(rest[..rest.find('"')?].to_string())
}

/// `kubectl create clusterrolebinding` for a user name.
fn binding_command(user: &str) -> String {
    let (name, subject) = match user
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'))
    {
        Some((ns, sa)) => (format!("{ns}-{sa}"), format!("--serviceaccount={ns}:{sa}")),
        None => (user.to_string(), format!("--user={user}")),
    };
    let name: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("kubectl create clusterrolebinding metrics-reader-{name} --clusterrole=metrics-reader {subject}")
}

const PROM_TOKEN_FIX: &str = "Prometheus needs the same token: `credentials_file` in \
    deploy/monitoring/prometheus/scrape-static-token.yaml, or the Secret prometheus-epp-metrics-token \
    that deploy/monitoring/servicemonitor.yaml references (check it is not empty: \
    kubectl -n llm-d-monitoring get secret prometheus-epp-metrics-token -o jsonpath='{.data.token}')";

/// Detail and fix for a 401/403/500 from the picker.
pub fn explain_denial(status: u16, message: &str, token: &TokenSource) -> (String, String) {
    let lower = message.to_ascii_lowercase();
    let kube = lower.contains("kubernetes");
    let static_token = lower.contains("--metrics-token-file")
        || lower.contains("metrics-auth=token")
        || lower.contains("does not match the token");
    match status {
        401 => {
            let fix = match (token, kube, static_token) {
                (TokenSource::None, _, _) => format!(
                    "the picker protects /metrics: pass a token with --token-file FILE (or --token). With \
                     --metrics-auth=token it is the content of the picker's --metrics-token-file; with \
                     --metrics-auth=kubernetes a ServiceAccount token allowed to get /metrics \
                     (kubectl -n llm-d-monitoring create token prometheus).\n{PROM_TOKEN_FIX}"
                ),
                (_, false, true) => format!(
                    "the picker runs with --metrics-auth=token: --token/--token-file must hold exactly the \
                     content of the picker's --metrics-token-file (surrounding whitespace is ignored).\n{PROM_TOKEN_FIX}"
                ),
                (_, true, _) => format!(
                    "the picker runs with --metrics-auth=kubernetes and the API server did not accept the \
                     token: use a current ServiceAccount token of this cluster \
                     (kubectl -n llm-d-monitoring create token prometheus).\n{PROM_TOKEN_FIX}"
                ),
                _ => format!(
                    "send the token the picker expects: the content of its --metrics-token-file \
                     (--metrics-auth=token) or a valid ServiceAccount token (--metrics-auth=kubernetes).\n{PROM_TOKEN_FIX}"
                ),
            };
            (
                format!(
                    "401 Unauthorized {}; the picker says: {message}",
                    token.describe()
                ),
                fix,
            )
        }
        403 => {
            let user = forbidden_user(message);
            let who = user
                .as_deref()
                .map(|u| format!("user {u:?}"))
                .unwrap_or_else(|| "the token's user".into());
            let fix = format!(
                "{who} may not `get` the non-resource URL /metrics: bind it the ClusterRole metrics-reader \
                 from deploy/kubernetes/rbac.yaml. `kubectl apply -f deploy/kubernetes/rbac.yaml` binds it to \
                 the ServiceAccount prometheus in llm-d-monitoring; for another account:\n{}",
                binding_command(user.as_deref().unwrap_or("<user>"))
            );
            (
                format!(
                    "403 Forbidden {}; the picker says: {message}",
                    token.describe()
                ),
                fix,
            )
        }
        _ => (
            format!(
                "{status} {} {}; the picker says: {message}",
                if status == 500 {
                    "Internal Server Error"
                } else {
                    "error"
                },
                token.describe()
            ),
            "the picker could not check the token with the Kubernetes API: its own ServiceAccount \
             (llm-d-gaie-epp) needs `create` on tokenreviews and subjectaccessreviews: \
             kubectl apply -f deploy/kubernetes/rbac.yaml (or bind the ClusterRole system:auth-delegator \
             to it). Review results are cached for up to a minute; then retry"
                .into(),
        ),
    }
}

/// Runs the `/metrics` checks. Returns the exposition when it could be read.
pub async fn check(
    r: &mut Report,
    client: &Client,
    ep: &Endpoint,
    token: Option<&str>,
    source: &TokenSource,
    assets: &Assets,
) -> Option<Exposition> {
    r.section(&format!("Picker metrics: {}", ep.url));
    let (progress, result) = client.get(ep, None, token).await;
    let resp = report_transport(
        r,
        Peer::Picker,
        client,
        ep,
        &progress,
        &result,
        token.is_some(),
    )
    .await?;
    let body = resp.text();
    match resp.status {
        200 => {
            // Is a token needed at all?
            let detail = if token.is_some() {
                let (_, open) = client.get(ep, None, None).await;
                if open.as_ref().is_ok_and(|o| o.status == 200) {
                    format!(
                        "200 OK {}; the endpoint also answers without a token (--metrics-auth=none)",
                        source.describe()
                    )
                } else {
                    format!("200 OK {}", source.describe())
                }
            } else {
                "200 OK without a token (the picker runs with --metrics-auth=none)".into()
            };
            r.pass("picker auth", detail);
        }
        401 | 403 | 500 => {
            let (detail, fix) = explain_denial(resp.status, &error_message(&body), source);
            r.fail("picker auth", detail, fix);
            skip_rest(r);
            return None;
        }
        404 => {
            r.fail(
                "picker HTTP",
                format!("404 Not Found at {}", ep.path),
                "the picker serves its metrics at /metrics on the --metrics-bind-address port (default 9090); \
                 port 8080 is the probe port (/healthz, /readyz) and the proxy port serves the OpenAI API",
            );
            skip_rest(r);
            return None;
        }
        s => {
            r.fail(
                "picker HTTP",
                format!("HTTP {s}: {}", error_message(&body)),
                "check that the URL points at the picker's /metrics (--metrics-bind-address, default port 9090)",
            );
            skip_rest(r);
            return None;
        }
    }

    // Content-Type
    let ct = resp.content_type();
    match ct.as_deref() {
        Some(c) if c.starts_with("text/plain") || c.starts_with("application/openmetrics-text") => {
            r.pass("picker Content-Type", c)
        }
        Some(c) => r.fail(
            "picker Content-Type",
            format!("{c:?} is not a Prometheus exposition format"),
            "this URL serves something else: point --metrics-url at the picker's /metrics",
        ),
        None => r.fail(
            "picker Content-Type",
            "missing (Prometheus 3 refuses such scrapes)",
            "upgrade the picker: epp serves `text/plain; version=0.0.4`",
        ),
    }

    // Exposition
    let expo = match Exposition::from_text(&body) {
        Ok(e) => {
            r.pass(
                "picker exposition",
                format!(
                    "parses: {} samples in {} metric families",
                    e.samples.len(),
                    e.families.len()
                ),
            );
            e
        }
        Err(e) => {
            r.fail(
                "picker exposition",
                format!("does not parse: {e}"),
                "this is not a valid Prometheus text exposition; check the URL points at an epp picker \
                 (`promtool check metrics` on the body shows the same problem)",
            );
            r.skip(
                "picker metrics for the dashboard and alerts",
                "no exposition",
            );
            return None;
        }
    };
    match &expo.version {
        Some(v) => r.pass("picker identity", format!("epp_build_info: epp version {v}")),
        None => r.fail(
            "picker identity",
            "no epp_build_info: this /metrics is not an epp picker's (a model server's, or another port?)",
            "point --metrics-url at the picker's metrics listener (--metrics-bind-address, default port 9090)",
        ),
    }

    // Metric names the assets read
    let mut present = 0;
    let mut problems = Vec::new();
    let mut not_in_use = Vec::new();
    for family in &assets.metrics {
        match expo.state(family) {
            MetricState::Present => present += 1,
            MetricState::NotInUse(why) => {
                present += 1;
                not_in_use.push((family, why));
            }
            other => problems.push((family, other)),
        }
    }
    r.pass(
        "picker metrics for the dashboard and alerts",
        format!(
            "{present} of {} metric names they use are exposed{}",
            assets.metrics.len(),
            if problems.is_empty() {
                ""
            } else {
                " (the others below)"
            }
        ),
    );
    for (family, why) in not_in_use {
        r.pass(
            &format!("picker metric {family}"),
            format!("declared; {why}"),
        );
    }
    for (family, state) in problems {
        match state {
            MetricState::NoTraffic(why) => r.warn(
                &format!("picker metric {family}"),
                format!("no traffic yet: {why}"),
                "send requests through the picker; dashboard panels reading it stay empty until then",
            ),
            _ => r.fail(
                &format!("picker metric {family}"),
                format!(
                    "missing: the dashboard or the alerts read it, but this picker (version {}) does not export it",
                    expo.version.as_deref().unwrap_or("unknown")
                ),
                "use the dashboard and rules shipped with this picker's version (deploy/monitoring/ of the same \
                 release; --dashboard/--rules), or upgrade the picker",
            ),
        }
    }
    Some(expo)
}

fn skip_rest(r: &mut Report) {
    r.skip("picker exposition", "/metrics could not be read");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denials_are_explained() {
        let (d, fix) = explain_denial(
            401,
            "invalid bearer token: it does not match the token in /etc/t on the picker",
            &TokenSource::File("x".into()),
        );
        assert!(d.starts_with("401 Unauthorized with the token from --token-file x"));
        assert!(fix.contains("--metrics-token-file"));
        let (d, fix) = explain_denial(
            403,
            "forbidden: user \"system:serviceaccount:mon:prom\" is authenticated but may not get /metrics",
            &TokenSource::Flag,
        );
        assert!(d.starts_with("403 Forbidden"));
        assert!(fix.contains(
            "kubectl create clusterrolebinding metrics-reader-mon-prom --clusterrole=metrics-reader --serviceaccount=mon:prom"
        ), "{fix}");
        let (_, fix) = explain_denial(500, "x", &TokenSource::Flag);
        assert!(fix.contains("tokenreviews") && fix.contains("deploy/kubernetes/rbac.yaml"));
    }

    #[test]
    fn traffic_metrics_are_not_missing() {
        let e = Exposition::from_text(
            "# TYPE epp_build_info gauge\nepp_build_info{version=\"1\"} 1\n# TYPE epp_x_total counter\n",
        )
        .unwrap();
        assert_eq!(e.state("epp_build_info"), MetricState::Present);
        assert!(matches!(e.state("epp_x_total"), MetricState::NoTraffic(_)));
        assert!(matches!(
            e.state("epp_requests_total"),
            MetricState::NoTraffic(w) if w.contains("no request yet")
        ));
        assert_eq!(e.state("epp_nope"), MetricState::Missing);
    }
}
