//! `label-selector-filter` (and its deprecated alias `by-label-selector`): keeps endpoints whose
//! labels match a Kubernetes label selector: every `matchLabels` pair, and every
//! `matchExpressions` requirement (`In`, `NotIn`, `Exists`, `DoesNotExist`). An empty selector
//! keeps everything, as Kubernetes'.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::{params, Filter, Plugin};
use crate::scheduler::SchedCtx;

pub const TYPE: &str = "label-selector-filter";
/// llm-d's deprecated name for the same filter.
pub const LEGACY_TYPE: &str = "by-label-selector";

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelectorParams {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Requirement {
    pub key: String,
    pub operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
enum Op {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

/// A label name as Kubernetes accepts it: `[prefix/]name`, the name at most 63 characters of
/// alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric; the prefix a DNS subdomain.
fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !ok {
            return Err(format!("key {key:?}: the prefix must be a DNS subdomain"));
        }
    }
    if name.is_empty() {
        return Err(format!("key {key:?}: the name must not be empty"));
    }
    check_value(name).map_err(|m| format!("key {key:?}: the name {m}"))
}

/// A label value: empty, or at most 63 alphanumerics, `-`, `_`, `.`, alphanumeric at both ends.
fn check_value(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Ok(());
    }
    let b = v.as_bytes();
    let ok = v.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err("must be at most 63 characters of alphanumerics, '-', '_' or '.', starting and ending alphanumeric".into())
    }
}

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let p: LabelSelectorParams = params(spec, field)?;
    let mut reqs: Vec<(String, Op)> = Vec::new();
    for (k, v) in &p.match_labels {
        let f = format!("{field}.parameters.matchLabels");
        check_key(k).map_err(|m| ConfigError::new(f.clone(), m))?;
        check_value(v)
            .map_err(|m| ConfigError::new(f.clone(), format!("value {v:?} of {k:?} {m}")))?;
        reqs.push((k.clone(), Op::In(vec![v.clone()])));
    }
    for (i, r) in p.match_expressions.iter().enumerate() {
        let f = format!("{field}.parameters.matchExpressions[{i}]");
        check_key(&r.key).map_err(|m| ConfigError::new(format!("{f}.key"), m))?;
        for v in &r.values {
            check_value(v)
                .map_err(|m| ConfigError::new(format!("{f}.values"), format!("{v:?} {m}")))?;
        }
        let needs_values = |want: bool| {
            if want == r.values.is_empty() {
                Err(ConfigError::new(
                    format!("{f}.values"),
                    if want {
                        format!("must be non-empty for operator {}", r.operator)
                    } else {
                        format!("must be empty for operator {}", r.operator)
                    },
                ))
            } else {
                Ok(())
            }
        };
        let op = match r.operator.as_str() {
            "In" => {
                needs_values(true)?;
                Op::In(r.values.clone())
            }
            "NotIn" => {
                needs_values(true)?;
                Op::NotIn(r.values.clone())
            }
            "Exists" => {
                needs_values(false)?;
                Op::Exists
            }
            "DoesNotExist" => {
                needs_values(false)?;
                Op::DoesNotExist
            }
            other => {
                return Err(ConfigError::new(
                    format!("{f}.operator"),
                    format!("must be In, NotIn, Exists or DoesNotExist, got {other:?}"),
                ))
            }
        };
        reqs.push((r.key.clone(), op));
    }
    let type_name = if spec.type_ == LEGACY_TYPE {
        tracing::warn!(
            plugin = field,
            "plugin type `by-label-selector` is deprecated; use `label-selector-filter`"
        );
        LEGACY_TYPE
    } else {
        TYPE
    };
    Ok(Plugin::Filter(Arc::new(LabelSelectorFilter {
        type_name,
        name: spec.name().to_string(),
        reqs,
    })))
}

pub struct LabelSelectorFilter {
    type_name: &'static str,
    name: String,
    reqs: Vec<(String, Op)>,
}

impl LabelSelectorFilter {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.reqs.iter().all(|(k, op)| match op {
            Op::In(vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Op::NotIn(vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Op::Exists => labels.contains_key(k),
            Op::DoesNotExist => !labels.contains_key(k),
        })
    }
}

impl Filter for LabelSelectorFilter {
    fn type_name(&self) -> &'static str {
        self.type_name
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn filter(&self, ctx: &SchedCtx<'_>, cands: &mut Vec<usize>) {
        cands.retain(|&i| self.matches(&ctx.ep(i).endpoint.spec.labels));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::plugins::filters::testing::kept_labels;

    fn spec(yaml: &str) -> PluginSpec {
        PluginSpec {
            name: None,
            type_: TYPE.into(),
            parameters: Some(serde_yaml::from_str(yaml).unwrap()),
        }
    }

    #[test]
    fn match_labels_and_expressions() {
        let eps: &[&[(&str, &str)]] = &[
            &[("hw", "h100"), ("role", "decode")],
            &[("hw", "a100"), ("role", "decode")],
            &[("hw", "h100")],
            &[("role", "decode"), ("canary", "yes")],
        ];
        let k = |yaml: &str| kept_labels(|_, f| build(&spec(yaml), f), eps);
        assert_eq!(k("matchLabels: {hw: h100}"), vec![0, 2]);
        assert_eq!(k("matchLabels: {hw: h100, role: decode}"), vec![0]);
        assert_eq!(
            k("matchExpressions: [{key: hw, operator: In, values: [h100, a100]}]"),
            vec![0, 1, 2]
        );
        assert_eq!(
            k("matchExpressions: [{key: hw, operator: NotIn, values: [h100]}]"),
            vec![1, 3]
        );
        assert_eq!(
            k("matchExpressions: [{key: canary, operator: Exists}]"),
            vec![3]
        );
        assert_eq!(
            k("matchExpressions: [{key: canary, operator: DoesNotExist}]"),
            vec![0, 1, 2]
        );
        assert_eq!(
            k("{}"),
            vec![0, 1, 2, 3],
            "an empty selector keeps everything"
        );
    }

    #[test]
    fn bad_selectors_name_the_field() {
        for (yaml, field) in [
            (
                "matchExpressions: [{key: a, operator: Has}]",
                "plugins[0].parameters.matchExpressions[0].operator",
            ),
            (
                "matchExpressions: [{key: a, operator: In}]",
                "plugins[0].parameters.matchExpressions[0].values",
            ),
            (
                "matchExpressions: [{key: a, operator: Exists, values: [x]}]",
                "plugins[0].parameters.matchExpressions[0].values",
            ),
            (
                "matchExpressions: [{key: 'bad key', operator: Exists}]",
                "plugins[0].parameters.matchExpressions[0].key",
            ),
            (
                "matchLabels: {a: 'b c'}",
                "plugins[0].parameters.matchLabels",
            ),
            ("matchLabel: {a: b}", "plugins[0].parameters.matchLabel"),
        ] {
            let e = build(&spec(yaml), "plugins[0]").err().unwrap();
            assert_eq!(e.field, field, "{yaml}: {e}");
        }
        assert!(build(&spec("matchLabels: {llm-d.ai/role: decode}"), "plugins[0]").is_ok());
    }
}
