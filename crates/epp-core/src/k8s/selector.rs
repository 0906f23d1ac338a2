//! Kubernetes label selectors, as `--endpoint-selector` takes them (llm-d-router's syntax, which is
//! the API server's): equality (`app=vllm`, `app==vllm`, `tier!=frontend`), set-based
//! (`env in (prod,staging)`, `env notin (dev)`) and existence (`gpu`, `!deprecated`),
//! comma-separated, all of which must hold. An InferencePool's `matchLabels` is the equality
//! subset. One canonical string form (requirements sorted by key) is used both for the API
//! request and for the `label_selector` label of `epp_pods_discovered`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One requirement on one label key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    fn key(&self) -> &str {
        match self {
            Requirement::Equals(k, _)
            | Requirement::NotEquals(k, _)
            | Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::DoesNotExist(k) => k,
        }
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            // As the API server: a missing label is "not equal".
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |vs: &BTreeSet<String>| vs.iter().cloned().collect::<Vec<_>>().join(",");
        match self {
            Requirement::Equals(k, v) => write!(f, "{k}={v}"),
            Requirement::NotEquals(k, v) => write!(f, "{k}!={v}"),
            Requirement::In(k, vs) => write!(f, "{k} in ({})", set(vs)),
            Requirement::NotIn(k, vs) => write!(f, "{k} notin ({})", set(vs)),
            Requirement::Exists(k) => write!(f, "{k}"),
            Requirement::DoesNotExist(k) => write!(f, "!{k}"),
        }
    }
}

/// Requirements that must all hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

/// Why a selector string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorError {
    #[error("the selector is empty: give at least one requirement (e.g. app=vllm)")]
    Empty,
    #[error("{0:?} is not a label requirement (key=value, key!=value, key in (a,b), key notin (a,b), key or !key)")]
    NotKeyValue(String),
    #[error("key {0:?} appears twice with different values")]
    Conflict(String),
    #[error("{0:?} is not a valid label key (an optional DNS prefix and /, then at most 63 of [A-Za-z0-9._-], starting and ending alphanumeric)")]
    BadKey(String),
    #[error("{0:?} is not a valid label value (at most 63 of [A-Za-z0-9._-], starting and ending alphanumeric)")]
    BadValue(String),
}

fn name_part_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

fn check_key(k: &str) -> Result<String, SelectorError> {
    let ok = match k.rsplit_once('/') {
        Some((prefix, name)) => {
            !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.split('.').all(|l| {
                    !l.is_empty()
                        && l.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                })
                && name_part_ok(name)
        }
        None => name_part_ok(k),
    };
    if ok {
        Ok(k.to_string())
    } else {
        Err(SelectorError::BadKey(k.to_string()))
    }
}

fn check_value(v: &str) -> Result<String, SelectorError> {
    if v.is_empty() || name_part_ok(v) {
        Ok(v.to_string())
    } else {
        Err(SelectorError::BadValue(v.to_string()))
    }
}

/// Split at commas outside parentheses.
fn split_requirements(s: &str) -> Result<Vec<&str>, SelectorError> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(SelectorError::NotKeyValue(s.to_string()));
                }
            }
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(SelectorError::NotKeyValue(s.to_string()));
    }
    parts.push(&s[start..]);
    Ok(parts)
}

fn parse_set(part: &str, rest: &str) -> Result<BTreeSet<String>, SelectorError> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| SelectorError::NotKeyValue(part.to_string()))?;
    let set: BTreeSet<String> = inner
        .split(',')
        .map(|v| check_value(v.trim()))
        .collect::<Result<_, _>>()?;
    if set.is_empty() || (set.contains("") && inner.trim().is_empty()) {
        return Err(SelectorError::NotKeyValue(part.to_string()));
    }
    Ok(set)
}

fn parse_requirement(part: &str) -> Result<Requirement, SelectorError> {
    let p = part.trim();
    let bad = || SelectorError::NotKeyValue(part.trim().to_string());
    if let Some(k) = p.strip_prefix('!') {
        return Ok(Requirement::DoesNotExist(check_key(k.trim())?));
    }
    if let Some((k, v)) = p.split_once("!=") {
        return Ok(Requirement::NotEquals(
            check_key(k.trim())?,
            check_value(v.trim())?,
        ));
    }
    if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
        let v = v.trim();
        if v.contains('=') {
            return Err(bad());
        }
        return Ok(Requirement::Equals(check_key(k.trim())?, check_value(v)?));
    }
    let mut words = p.splitn(2, char::is_whitespace);
    let key = words.next().unwrap_or("");
    match words.next().map(str::trim_start) {
        None => Ok(Requirement::Exists(check_key(key)?)),
        Some(rest) => {
            if let Some(set) = rest.strip_prefix("notin") {
                Ok(Requirement::NotIn(check_key(key)?, parse_set(part, set)?))
            } else if let Some(set) = rest.strip_prefix("in") {
                Ok(Requirement::In(check_key(key)?, parse_set(part, set)?))
            } else {
                Err(bad())
            }
        }
    }
}

impl LabelSelector {
    /// The equality selector of an InferencePool's `matchLabels`.
    pub fn from_map(map: BTreeMap<String, String>) -> Self {
        Self(
            map.into_iter()
                .map(|(k, v)| Requirement::Equals(k, v))
                .collect(),
        )
    }

    /// Parse a selector string (see the module docs); whitespace around parts is ignored.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut reqs: Vec<Requirement> = Vec::new();
        for part in split_requirements(s)? {
            if part.trim().is_empty() {
                continue;
            }
            let r = parse_requirement(part)?;
            if let Requirement::Equals(k, v) = &r {
                if reqs
                    .iter()
                    .any(|o| matches!(o, Requirement::Equals(k2, v2) if k2 == k && v2 != v))
                {
                    return Err(SelectorError::Conflict(k.clone()));
                }
            }
            if !reqs.contains(&r) {
                reqs.push(r);
            }
        }
        if reqs.is_empty() {
            return Err(SelectorError::Empty);
        }
        reqs.sort_by(|a, b| a.key().cmp(b.key()).then_with(|| a.cmp(b)));
        Ok(Self(reqs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn requirements(&self) -> &[Requirement] {
        &self.0
    }

    /// Whether `labels` satisfies every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| r.matches(labels))
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parse_format_match() {
        let s = LabelSelector::parse(" role=decode, app==vllm ").unwrap();
        assert_eq!(s.to_string(), "app=vllm,role=decode");
        let mut l = labels(&[("app", "vllm")]);
        assert!(!s.matches(&l));
        l.insert("role".to_string(), "decode".to_string());
        l.insert("extra".to_string(), "x".to_string());
        assert!(s.matches(&l));
        assert_eq!(LabelSelector::parse(""), Err(SelectorError::Empty));
        assert_eq!(
            LabelSelector::parse("a=1,a=2"),
            Err(SelectorError::Conflict("a".into()))
        );
    }

    #[test]
    fn set_based_and_existence_requirements() {
        let s =
            LabelSelector::parse("env in (prod, staging),tier!=frontend,gpu,!deprecated").unwrap();
        assert_eq!(
            s.to_string(),
            "!deprecated,env in (prod,staging),gpu,tier!=frontend"
        );
        assert!(s.matches(&labels(&[("env", "prod"), ("gpu", "a100")])));
        assert!(s.matches(&labels(&[
            ("env", "staging"),
            ("gpu", ""),
            ("tier", "backend")
        ])));
        assert!(!s.matches(&labels(&[("env", "dev"), ("gpu", "a100")])));
        assert!(!s.matches(&labels(&[("env", "prod")])));
        assert!(!s.matches(&labels(&[
            ("env", "prod"),
            ("gpu", "x"),
            ("tier", "frontend")
        ])));
        assert!(!s.matches(&labels(&[
            ("env", "prod"),
            ("gpu", "x"),
            ("deprecated", "true")
        ])));
        let n = LabelSelector::parse("app=vllm,llm-d.ai/role notin (prefill)").unwrap();
        assert!(n.matches(&labels(&[("app", "vllm")])));
        assert!(n.matches(&labels(&[("app", "vllm"), ("llm-d.ai/role", "decode")])));
        assert!(!n.matches(&labels(&[("app", "vllm"), ("llm-d.ai/role", "prefill")])));
        // The canonical form parses back to the same selector.
        assert_eq!(LabelSelector::parse(&s.to_string()).unwrap(), s);
    }

    #[test]
    fn malformed_selectors_are_named() {
        for bad in [
            "env in prod",
            "env in (",
            "env in ()",
            "a b c",
            "=v",
            "app=v=w",
            "(x)",
        ] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            LabelSelector::parse("Bad Key=x"),
            Err(SelectorError::NotKeyValue(_)) | Err(SelectorError::BadKey(_))
        ));
        assert_eq!(
            LabelSelector::parse("app=-x"),
            Err(SelectorError::BadValue("-x".into()))
        );
        assert_eq!(
            LabelSelector::parse("-app=x"),
            Err(SelectorError::BadKey("-app".into()))
        );
    }
}
