//! `metrics-data-source`: how the scraper reaches each endpoint's Prometheus exposition.
//! Parameters as llm-d-router's: `scheme` (`http`), `path` (`/metrics`), `insecureSkipVerify`
//! (true), `caCertPath`, `clientCertPath`/`clientKeyPath` (mTLS, both or neither), `interval`
//! (default: every base tick, `--refresh-metrics-interval`).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{plugin_parameters, ConfigError, PluginSpec};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scheme {
    #[default]
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(&self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct MetricsSource {
    pub scheme: Scheme,
    /// Starts with `/`.
    pub path: String,
    /// HTTPS only: accept any server certificate (llm-d-router's default: model servers
    /// commonly serve self-signed certificates).
    pub insecure_skip_verify: bool,
    /// HTTPS only: verify the server against this PEM CA bundle instead.
    pub ca_cert_path: Option<PathBuf>,
    /// HTTPS only: client certificate and key (PEM) for mTLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Scrape period for this source; `None`: the base interval.
    pub interval: Option<Duration>,
}

impl Default for MetricsSource {
    fn default() -> Self {
        Self {
            scheme: Scheme::Http,
            path: "/metrics".into(),
            insecure_skip_verify: true,
            ca_cert_path: None,
            client_cert: None,
            interval: None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Params {
    scheme: Option<String>,
    path: Option<String>,
    insecure_skip_verify: Option<bool>,
    ca_cert_path: Option<String>,
    client_cert_path: Option<String>,
    client_key_path: Option<String>,
    interval: Option<String>,
}

impl MetricsSource {
    pub fn build(spec: &PluginSpec, field: &str) -> Result<Self, ConfigError> {
        let p: Params = plugin_parameters(spec, field)?;
        let at = |k: &str| format!("{field}.parameters.{k}");
        let mut s = Self::default();
        if let Some(v) = p.scheme.as_deref() {
            s.scheme = match v {
                "http" => Scheme::Http,
                "https" => Scheme::Https,
                other => {
                    return Err(ConfigError::new(
                        at("scheme"),
                        format!("{other:?}: must be \"http\" or \"https\""),
                    ))
                }
            };
        }
        if let Some(v) = p.path {
            if !v.starts_with('/') || v.contains(char::is_whitespace) {
                return Err(ConfigError::new(
                    at("path"),
                    format!("{v:?}: must be a URL path starting with /"),
                ));
            }
            s.path = v;
        }
        if let Some(v) = p.insecure_skip_verify {
            s.insecure_skip_verify = v;
        }
        if let Some(v) = p.ca_cert_path.filter(|v| !v.is_empty()) {
            s.ca_cert_path = Some(v.into());
        }
        match (
            p.client_cert_path.filter(|v| !v.is_empty()),
            p.client_key_path.filter(|v| !v.is_empty()),
        ) {
            (Some(c), Some(k)) => s.client_cert = Some((c.into(), k.into())),
            (None, None) => {}
            (Some(_), None) => {
                return Err(ConfigError::new(
                    at("clientKeyPath"),
                    "clientCertPath needs clientKeyPath too",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    at("clientCertPath"),
                    "clientKeyPath needs clientCertPath too",
                ))
            }
        }
        if let Some(v) = p.interval {
            let d = humantime::parse_duration(&v).map_err(|e| {
                ConfigError::new(
                    at("interval"),
                    format!("{v:?} is not a duration (e.g. 1s): {e}"),
                )
            })?;
            if d.is_zero() {
                return Err(ConfigError::new(at("interval"), "must be greater than 0"));
            }
            s.interval = Some(d);
        }
        if s.scheme == Scheme::Http && (s.ca_cert_path.is_some() || s.client_cert.is_some()) {
            let k = if s.ca_cert_path.is_some() {
                "caCertPath"
            } else {
                "clientCertPath"
            };
            return Err(ConfigError::new(at(k), "needs scheme: https"));
        }
        if s.scheme == Scheme::Https && !s.insecure_skip_verify && s.ca_cert_path.is_none() {
            return Err(ConfigError::new(
                at("insecureSkipVerify"),
                "false needs caCertPath: epp verifies model servers against a CA bundle you give it, not the system roots",
            ));
        }
        for (k, path) in [
            ("caCertPath", s.ca_cert_path.as_ref()),
            ("clientCertPath", s.client_cert.as_ref().map(|c| &c.0)),
            ("clientKeyPath", s.client_cert.as_ref().map(|c| &c.1)),
        ] {
            if let Some(path) = path {
                if let Err(e) = std::fs::metadata(path) {
                    return Err(ConfigError::new(
                        at(k),
                        format!("{}: cannot read: {e}", path.display()),
                    ));
                }
            }
        }
        Ok(s)
    }

    /// The URL scraped on an endpoint at `address` (`host:port`).
    pub fn url(&self, address: &str) -> String {
        format!("{}://{address}{}", self.scheme.as_str(), self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(params: &str) -> Result<MetricsSource, ConfigError> {
        MetricsSource::build(
            &PluginSpec::for_test("metrics-data-source", Some(params)),
            "plugins[2]",
        )
    }

    #[test]
    fn parameters_and_defaults() {
        let s = build("{}").unwrap();
        assert_eq!(s, MetricsSource::default());
        assert_eq!(s.url("10.0.0.1:8000"), "http://10.0.0.1:8000/metrics");
        let s = build("scheme: https\npath: /stats\ninterval: 250ms").unwrap();
        assert_eq!(s.url("h:1"), "https://h:1/stats");
        assert_eq!(s.interval, Some(Duration::from_millis(250)));
        assert!(s.insecure_skip_verify);
    }

    #[test]
    fn errors_name_the_parameter() {
        let e = build("scheme: ftp").unwrap_err();
        assert_eq!(
            e.to_string(),
            "plugins[2].parameters.scheme: \"ftp\": must be \"http\" or \"https\""
        );
        assert_eq!(
            build("path: metrics").unwrap_err().field,
            "plugins[2].parameters.path"
        );
        assert_eq!(
            build("interval: soon").unwrap_err().field,
            "plugins[2].parameters.interval"
        );
        assert_eq!(
            build("interval: 0s").unwrap_err().field,
            "plugins[2].parameters.interval"
        );
        assert_eq!(
            build("clientCertPath: /c").unwrap_err().field,
            "plugins[2].parameters.clientKeyPath"
        );
        assert_eq!(
            build("caCertPath: /ca.pem").unwrap_err().field,
            "plugins[2].parameters.caCertPath"
        );
        let e = build("scheme: https\ninsecureSkipVerify: false").unwrap_err();
        assert_eq!(e.field, "plugins[2].parameters.insecureSkipVerify");
        let e = build("scheme: https\ncaCertPath: /nonexistent/ca.pem").unwrap_err();
        assert!(e.message.contains("cannot read"), "{e}");
        let e = build("bogus: 1").unwrap_err();
        assert_eq!(e.field, "plugins[2].parameters.bogus");
    }
}
