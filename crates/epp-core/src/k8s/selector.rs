//! Equality label selectors (`k=v[,k=v]`), the only kind an InferencePool's `matchLabels` or
//! `--endpoint-selector` can express. One canonical string form (keys sorted) is used both for
//! the API request and for the `label_selector` label of `epp_pods_discovered`.

use std::collections::BTreeMap;
use std::fmt;

/// A set of required `key=value` labels (all must match).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(BTreeMap<String, String>);

/// Why a selector string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorError {
    #[error("the selector is empty: give at least one key=value (e.g. app=vllm)")]
    Empty,
    #[error("{0:?} is not key=value")]
    NotKeyValue(String),
    #[error("key {0:?} appears twice with different values")]
    Conflict(String),
}

impl LabelSelector {
    pub fn from_map(map: BTreeMap<String, String>) -> Self {
        Self(map)
    }

    /// Parse `k=v[,k=v]` (`==` is accepted as `=`; whitespace around parts is ignored).
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut map = BTreeMap::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once("==")
                .or_else(|| part.split_once('='))
                .ok_or_else(|| SelectorError::NotKeyValue(part.to_string()))?;
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty() || k.contains('!') || v.contains('=') {
                return Err(SelectorError::NotKeyValue(part.to_string()));
            }
            if let Some(old) = map.insert(k.to_string(), v.to_string()) {
                if old != v {
                    return Err(SelectorError::Conflict(k.to_string()));
                }
            }
        }
        if map.is_empty() {
            return Err(SelectorError::Empty);
        }
        Ok(Self(map))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    /// Whether `labels` carries every required pair.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (k, v) in &self.0 {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_format_match() {
        let s = LabelSelector::parse(" role=decode, app==vllm ").unwrap();
        assert_eq!(s.to_string(), "app=vllm,role=decode");
        let mut l = BTreeMap::new();
        l.insert("app".to_string(), "vllm".to_string());
        assert!(!s.matches(&l));
        l.insert("role".to_string(), "decode".to_string());
        l.insert("extra".to_string(), "x".to_string());
        assert!(s.matches(&l));
        assert_eq!(LabelSelector::parse(""), Err(SelectorError::Empty));
        assert!(matches!(
            LabelSelector::parse("app"),
            Err(SelectorError::NotKeyValue(_))
        ));
        assert!(matches!(
            LabelSelector::parse("app!=x"),
            Err(SelectorError::NotKeyValue(_))
        ));
        assert_eq!(
            LabelSelector::parse("a=1,a=2"),
            Err(SelectorError::Conflict("a".into()))
        );
    }
}
