//! Static discovery: endpoints from `--endpoint` flags and/or an `--endpoints-file` (YAML) that
//! is re-read when it changes, so edits take effect without a restart. (Kubernetes discovery
//! lives in its own module and feeds the same datastore.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::datastore::{DatastoreWriter, EndpointSpec};
use crate::telemetry::Shutdown;

/// The endpoints file:
/// ```yaml
/// endpoints:
/// - address: 10.0.0.1:8000
///   name: vllm-0          # optional; defaults to the address
///   engine: vllm          # vllm | sglang | trt-llm
///   labels: {zone: a}     # optional
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointsFile {
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
}

/// Validate one `host:port`.
pub fn check_address(a: &str) -> Result<(), String> {
    let Some((host, port)) = a.rsplit_once(':') else {
        return Err(format!("{a:?} is not host:port"));
    };
    if host.is_empty() {
        return Err(format!("{a:?} has an empty host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{a:?} has an invalid port {port:?}")),
    }
}

/// Parse and validate endpoints-file text; errors name the entry and field.
pub fn parse_endpoints_file(text: &str) -> Result<Vec<EndpointSpec>, String> {
    let f: EndpointsFile = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(f.endpoints.len());
    for (i, mut e) in f.endpoints.into_iter().enumerate() {
        check_address(&e.address).map_err(|m| format!("endpoints[{i}].address: {m}"))?;
        if e.name.is_empty() {
            e.name = e.address.clone();
        }
        out.push(e);
    }
    Ok(out)
}

pub fn read_endpoints_file(path: &Path) -> Result<Vec<EndpointSpec>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read endpoints file {}: {e}", path.display()))?;
    parse_endpoints_file(&text).map_err(|e| format!("endpoints file {}: {e}", path.display()))
}

/// Static discovery source.
#[derive(Clone, Debug, Default)]
pub struct StaticDiscovery {
    pub endpoints: Vec<String>,
    pub file: Option<PathBuf>,
    /// How often the file is checked for changes.
    pub poll_interval: Duration,
    /// Every address must be `ip:port` (`epp serve`: Envoy's ORIGINAL_DST cluster connects to
    /// the picked address as given and resolves no host names). Checked at start-up and on
    /// every reload of the file.
    pub require_ip: bool,
}

/// Where endpoints come from: a static list and endpoints file ([`StaticDiscovery`]), or the
/// Kubernetes API ([`crate::k8s::discovery::KubeDiscovery`]). The runtime validates it before
/// binding any port, then runs it with the datastore's one writer.
pub trait EndpointDiscovery: Send + Sync + std::fmt::Debug {
    /// Check what can be checked before any port is bound; the endpoints known at start.
    fn validate(&self) -> Result<Vec<EndpointSpec>, String>;

    /// Keep the datastore's endpoint set current until `shutdown` (marking it synced once the
    /// first complete list is in).
    fn run(
        &self,
        writer: DatastoreWriter,
        initial: Vec<EndpointSpec>,
        shutdown: Shutdown,
    ) -> futures_util::future::BoxFuture<'static, ()>;

    /// The concrete source, for checks and diagnostics.
    fn as_any(&self) -> &dyn std::any::Any;
}

impl EndpointDiscovery for StaticDiscovery {
    fn validate(&self) -> Result<Vec<EndpointSpec>, String> {
        let v = self.check()?;
        if v.is_empty() {
            return Err(
                "no endpoints: give --endpoint host:port (repeatable), --endpoints-file FILE, or --pool-name"
                    .into(),
            );
        }
        Ok(v)
    }

    fn run(
        &self,
        writer: DatastoreWriter,
        initial: Vec<EndpointSpec>,
        shutdown: Shutdown,
    ) -> futures_util::future::BoxFuture<'static, ()> {
        Box::pin(self.clone().follow(writer, initial, shutdown))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl StaticDiscovery {
    /// Validate flags and file before anything binds (an empty list is allowed here).
    pub fn check(&self) -> Result<Vec<EndpointSpec>, String> {
        let mut all = Vec::new();
        for a in &self.endpoints {
            check_address(a).map_err(|m| format!("--endpoint: {m}"))?;
            all.push(EndpointSpec::new(a.clone()));
        }
        if let Some(f) = &self.file {
            all.extend(self.read_file(f)?);
        }
        Ok(all)
    }

    fn read_file(&self, path: &Path) -> Result<Vec<EndpointSpec>, String> {
        let specs = read_endpoints_file(path)?;
        if self.require_ip {
            if let Some((i, e)) = specs
                .iter()
                .enumerate()
                .find(|(_, e)| e.address.parse::<std::net::SocketAddr>().is_err())
            {
                return Err(format!(
                    "endpoints file {}: endpoints[{i}].address: {:?} is not ip:port (epp serve hands the address to Envoy, which connects to it as given and resolves no host names)",
                    path.display(),
                    e.address
                ));
            }
        }
        Ok(specs)
    }

    /// Publish the initial set, mark synced, then follow the file until shutdown.
    pub async fn follow(self, ds: DatastoreWriter, initial: Vec<EndpointSpec>, shutdown: Shutdown) {
        ds.set_discovery_labels("local", "static");
        ds.set_endpoints(initial);
        ds.mark_synced();
        let Some(path) = self.file.clone() else {
            return;
        };
        let mut last = std::fs::read(&path).ok();
        let mut iv = tokio::time::interval(self.poll_interval.max(Duration::from_millis(20)));
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stop = shutdown.wait();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = iv.tick() => {}
            }
            let now = std::fs::read(&path).ok();
            if now == last {
                continue;
            }
            last = now;
            match self.read_file(&path) {
                Ok(mut specs) => {
                    specs.extend(self.endpoints.iter().map(|a| EndpointSpec::new(a.clone())));
                    let (added, removed) = ds.set_endpoints(specs);
                    tracing::info!(file = %path.display(), added, removed, "endpoints file reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %e, "endpoints file change rejected; keeping the previous endpoints");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_errors_name_the_entry() {
        let e = parse_endpoints_file("endpoints:\n- address: a:1\n- address: nope\n").unwrap_err();
        assert_eq!(e, "endpoints[1].address: \"nope\" is not host:port");
        let e = parse_endpoints_file("endpoints:\n- address: a:1\n  weight: 3\n").unwrap_err();
        assert!(e.contains("unknown field `weight`"), "{e}");
        let v = parse_endpoints_file("endpoints:\n- address: a:1\n  engine: sglang\n").unwrap();
        assert_eq!(v[0].name, "a:1");
        assert_eq!(v[0].engine, crate::datastore::Engine::Sglang);
    }
}
