//! The InferencePool v1 resource (`inference.networking.k8s.io/v1`), typed by hand: only the
//! fields the picker reads, with unknown fields tolerated so newer CRD versions still parse.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "inference.networking.k8s.io";
pub const VERSION: &str = "v1";
pub const KIND: &str = "InferencePool";
pub const PLURAL: &str = "inferencepools";

/// An InferencePool: which pods (selector) and which ports on them form the pool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InferencePool {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: InferencePoolSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolSpec {
    #[serde(default)]
    pub selector: PoolSelector,
    /// 1 to 8 ports; each is its own endpoint on every selected pod.
    #[serde(default)]
    pub target_ports: Vec<PortNumber>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_picker_ref: Option<EndpointPickerRef>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortNumber {
    pub number: i32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPickerRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortNumber>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_mode: Option<String>,
}

impl kube::Resource for InferencePool {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(KIND)
    }
    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(GROUP)
    }
    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(VERSION)
    }
    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(PLURAL)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl InferencePool {
    /// The ports to use, validated: 1..=8 entries, each a valid TCP port, no duplicates.
    pub fn ports(&self) -> Result<Vec<u16>, String> {
        ports_from(self.spec.target_ports.iter().map(|p| p.number))
    }
}

/// Validate a port list (shared by the pool and `--endpoint-target-ports`).
pub fn ports_from(numbers: impl IntoIterator<Item = i32>) -> Result<Vec<u16>, String> {
    let mut out: Vec<u16> = Vec::new();
    for n in numbers {
        let p = u16::try_from(n)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("target port {n} is not in 1..65535"))?;
        if out.contains(&p) {
            return Err(format!("target port {p} is listed twice"));
        }
        out.push(p);
    }
    if out.is_empty() {
        return Err("no target ports".into());
    }
    if out.len() > 8 {
        return Err(format!(
            "{} target ports given; at most 8 are allowed",
            out.len()
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v1_pool_with_unknown_fields() {
        let y = r#"
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: p, namespace: llm-d}
spec:
  selector: {matchLabels: {app: vllm}}
  targetPorts: [{number: 8000}, {number: 8001}]
  endpointPickerRef: {name: llm-d-gaie-epp, port: {number: 9002}, failureMode: FailClose}
  somethingNew: true
status: {parents: []}
"#;
        let p: InferencePool = serde_yaml::from_str(y).unwrap();
        assert_eq!(p.ports().unwrap(), vec![8000, 8001]);
        assert_eq!(p.spec.selector.match_labels["app"], "vllm");
        assert_eq!(
            p.spec.endpoint_picker_ref.unwrap().failure_mode.as_deref(),
            Some("FailClose")
        );
        assert!(ports_from([0]).is_err());
        assert!(ports_from([1, 1]).is_err());
        assert!(ports_from(1..=9).is_err());
        assert!(ports_from([]).is_err());
    }
}
