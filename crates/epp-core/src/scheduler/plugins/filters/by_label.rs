//! `by-label` (deprecated in llm-d, still accepted there): keeps endpoints whose `label` has one
//! of `validValues`, and those without the label when `allowsNoLabel`. The role filters
//! (`decode-filter`, `prefill-filter`, `encode-filter`) are this rule over `llm-d.ai/role`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::{params, Filter, Plugin};
use crate::scheduler::SchedCtx;

pub const TYPE: &str = "by-label";

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ByLabelParams {
    #[serde(default)]
    pub label: String,
    #[serde(default)]
    pub valid_values: Vec<String>,
    #[serde(default)]
    pub allows_no_label: bool,
}

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let p: ByLabelParams = params(spec, field)?;
    tracing::warn!(
        plugin = field,
        "plugin type `by-label` is deprecated; use `label-selector-filter`, or `decode-filter` / `prefill-filter` / `encode-filter` for roles"
    );
    if p.label.is_empty() {
        return Err(ConfigError::new(
            format!("{field}.parameters.label"),
            "must be specified",
        ));
    }
    if p.valid_values.is_empty() && !p.allows_no_label {
        return Err(ConfigError::new(
            format!("{field}.parameters.validValues"),
            "must be non-empty unless allowsNoLabel is true",
        ));
    }
    Ok(Plugin::Filter(Arc::new(ByLabelFilter {
        type_name: TYPE,
        name: spec.name().to_string(),
        label: p.label,
        allows_no_label: p.allows_no_label,
        valid_values: p.valid_values,
    })))
}

/// Keeps endpoints whose `label` is one of `valid_values` (or absent, with `allows_no_label`).
pub struct ByLabelFilter {
    pub(crate) type_name: &'static str,
    pub(crate) name: String,
    pub(crate) label: String,
    pub(crate) allows_no_label: bool,
    pub(crate) valid_values: Vec<String>,
}

impl ByLabelFilter {
    /// A fixed rule over `label` (the role filters).
    pub fn fixed(
        type_name: &'static str,
        name: &str,
        label: &str,
        allows_no_label: bool,
        valid_values: &[&str],
    ) -> Self {
        Self {
            type_name,
            name: name.to_string(),
            label: label.to_string(),
            allows_no_label,
            valid_values: valid_values.iter().map(|v| v.to_string()).collect(),
        }
    }

    pub fn keeps(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        match labels.get(&self.label) {
            None => self.allows_no_label,
            Some(v) => self.valid_values.iter().any(|x| x == v),
        }
    }
}

impl Filter for ByLabelFilter {
    fn type_name(&self) -> &'static str {
        self.type_name
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn filter(&self, ctx: &SchedCtx<'_>, cands: &mut Vec<usize>) {
        cands.retain(|&i| self.keeps(&ctx.ep(i).endpoint.spec.labels));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build_with(yaml: &str) -> Result<Plugin, ConfigError> {
        build(
            &PluginSpec {
                name: Some("gpu".into()),
                type_: TYPE.into(),
                parameters: Some(serde_yaml::from_str(yaml).unwrap()),
            },
            "plugins[0]",
        )
    }

    #[test]
    fn keeps_valid_values_and_optionally_unlabelled() {
        let Plugin::Filter(_) = build_with("{label: gpu.type, validValues: [a100]}").unwrap()
        else {
            panic!()
        };
        let f = ByLabelFilter::fixed(TYPE, "x", "gpu.type", false, &["a100"]);
        let l = |v: Option<&str>| {
            v.map(|v| [("gpu.type".to_string(), v.to_string())].into())
                .unwrap_or_default()
        };
        assert!(f.keeps(&l(Some("a100"))));
        assert!(!f.keeps(&l(Some("h100"))));
        assert!(!f.keeps(&l(None)));
        let f = ByLabelFilter::fixed(TYPE, "x", "gpu.type", true, &[]);
        assert!(f.keeps(&l(None)));
        assert!(!f.keeps(&l(Some("a100"))));
    }

    #[test]
    fn parameters_are_checked() {
        assert_eq!(
            build_with("{validValues: [a]}").err().unwrap().field,
            "plugins[0].parameters.label"
        );
        assert_eq!(
            build_with("{label: x}").err().unwrap().field,
            "plugins[0].parameters.validValues"
        );
        assert!(build_with("{label: x, allowsNoLabel: true}").is_ok());
    }
}
