//! Crafted snapshots for the filters' unit tests.

use crate::config::{ConfigError, PluginSpec};
use crate::datastore::{DatastoreWriter, EndpointSpec, HealthConfig};
use crate::request::ParsedRequest;
use crate::scheduler::plugins::Plugin;
use crate::scheduler::{PrefixMatches, SchedCtx, NO_DATA};

type BuildFn<'a> = &'a dyn Fn(&PluginSpec, &str) -> Result<Plugin, ConfigError>;

/// Which endpoints (indices into `labels`) a filter built by `build` keeps.
pub fn kept_labels(
    build: impl Fn(&PluginSpec, &str) -> Result<Plugin, ConfigError>,
    labels: &[&[(&str, &str)]],
) -> Vec<usize> {
    let build: BuildFn<'_> = &build;
    let w = DatastoreWriter::new(HealthConfig::default());
    w.set_endpoints(
        labels
            .iter()
            .enumerate()
            .map(|(i, l)| EndpointSpec {
                name: format!("ep-{i:02}"),
                labels: l
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..EndpointSpec::new(format!("10.0.0.{i}:8000"))
            })
            .collect(),
    );
    let snap = w.snapshot();
    let spec = PluginSpec {
        name: None,
        type_: String::new(),
        parameters: None,
    };
    let Plugin::Filter(f) = build(&spec, "plugins[0]").unwrap() else {
        panic!("not a filter")
    };
    let req = ParsedRequest::default();
    let prefix = PrefixMatches::default();
    let ctx = SchedCtx {
        snapshot: &snap,
        request: &req,
        prefix: &prefix,
        data: &NO_DATA,
    };
    let mut cands: Vec<usize> = (0..snap.endpoints.len()).collect();
    f.filter(&ctx, &mut cands);
    let mut out: Vec<usize> = cands
        .iter()
        .map(|&i| {
            snap.endpoints[i].endpoint.name()[3..]
                .parse::<usize>()
                .unwrap()
        })
        .collect();
    out.sort();
    out
}

/// As [`kept_labels`], over endpoints whose `llm-d.ai/role` is each of `roles` (`None`: no
/// label).
pub fn kept(
    build: fn(&PluginSpec, &str) -> Result<Plugin, ConfigError>,
    roles: &[Option<&str>],
) -> Vec<usize> {
    let labels: Vec<Vec<(&str, &str)>> = roles
        .iter()
        .map(|r| r.map(|r| vec![("llm-d.ai/role", r)]).unwrap_or_default())
        .collect();
    let refs: Vec<&[(&str, &str)]> = labels.iter().map(|v| v.as_slice()).collect();
    kept_labels(build, &refs)
}
