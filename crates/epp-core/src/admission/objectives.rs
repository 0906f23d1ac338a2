//! `InferenceObjective`s: the name a request gives in `x-llm-d-inference-objective` (or the
//! legacy `x-gateway-inference-objective`) picks its priority. As llm-d-router: an objective
//! that is not known, or that sets no priority, gives priority 0; negative priorities are
//! sheddable.
//!
//! Two sources feed one table: objectives given at start-up (`--inference-objective
//! name=priority`, outside Kubernetes) and the `InferenceObjective` resources watched in the
//! pool's namespace ([`crate::k8s::objectives`]). A watched objective wins over a static one
//! of the same name.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

/// Most objectives kept (each source).
pub const MAX_OBJECTIVES: usize = 10_000;

/// The priority of a request without a known objective.
pub const DEFAULT_PRIORITY: i64 = 0;

/// One objective: its name and priority (`None`: unset, i.e. the default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Objective {
    pub name: String,
    pub priority: Option<i64>,
}

impl Objective {
    /// `name=priority` (a flag value).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (n, p) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected NAME=PRIORITY (e.g. premium=10)"))?;
        let n = n.trim();
        if n.is_empty() {
            return Err(format!("{s:?}: the objective name is empty"));
        }
        let p: i64 = p
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: the priority must be an integer"))?;
        i32::try_from(p).map_err(|_| format!("{s:?}: the priority must fit in 32 bits"))?;
        Ok(Self {
            name: n.to_string(),
            priority: Some(p),
        })
    }
}

/// The objective table, read lock-free on every request.
#[derive(Debug, Default)]
pub struct Objectives {
    table: ArcSwap<HashMap<String, i64>>,
    sources: Mutex<Sources>,
}

#[derive(Debug, Default)]
struct Sources {
    fixed: HashMap<String, Option<i64>>,
    watched: HashMap<String, Option<i64>>,
}

impl Objectives {
    pub fn new(fixed: &[Objective]) -> Arc<Self> {
        let o = Arc::new(Self::default());
        {
            let mut s = o.sources.lock();
            for ob in fixed.iter().take(MAX_OBJECTIVES) {
                s.fixed.insert(ob.name.clone(), ob.priority);
            }
        }
        o.publish();
        o
    }

    /// The priority of a request naming `objective`.
    pub fn priority(&self, objective: Option<&str>) -> i64 {
        match objective {
            None => DEFAULT_PRIORITY,
            Some(n) => self
                .table
                .load()
                .get(n)
                .copied()
                .unwrap_or(DEFAULT_PRIORITY),
        }
    }

    /// Whether `name` is known.
    pub fn contains(&self, name: &str) -> bool {
        self.table.load().contains_key(name)
    }

    /// A watched objective appeared or changed. Past [`MAX_OBJECTIVES`] new names are ignored
    /// (with a warning).
    pub fn set_watched(&self, name: &str, priority: Option<i64>) {
        {
            let mut s = self.sources.lock();
            if !s.watched.contains_key(name) && s.watched.len() >= MAX_OBJECTIVES {
                tracing::warn!(
                    objective = name,
                    max = MAX_OBJECTIVES,
                    "too many InferenceObjectives; ignoring this one"
                );
                return;
            }
            s.watched.insert(name.to_string(), priority);
        }
        self.publish();
    }

    /// A watched objective is gone.
    pub fn remove_watched(&self, name: &str) {
        self.sources.lock().watched.remove(name);
        self.publish();
    }

    /// Replace every watched objective (a fresh list).
    pub fn replace_watched(&self, all: Vec<Objective>) {
        {
            let mut s = self.sources.lock();
            s.watched = all
                .into_iter()
                .take(MAX_OBJECTIVES)
                .map(|o| (o.name, o.priority))
                .collect();
        }
        self.publish();
    }

    /// Known objectives with their priorities, sorted by name.
    pub fn list(&self) -> Vec<(String, i64)> {
        let mut v: Vec<_> = self
            .table
            .load()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        v.sort();
        v
    }

    fn publish(&self) {
        let s = self.sources.lock();
        let mut t: HashMap<String, i64> = HashMap::with_capacity(s.fixed.len() + s.watched.len());
        for (k, v) in s.fixed.iter().chain(s.watched.iter()) {
            t.insert(k.clone(), v.unwrap_or(DEFAULT_PRIORITY));
        }
        self.table.store(Arc::new(t));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_unset_objectives_get_the_default_priority() {
        let o = Objectives::new(&[Objective::parse("premium=10").unwrap()]);
        assert_eq!(o.priority(Some("premium")), 10);
        assert_eq!(o.priority(Some("nope")), 0);
        assert_eq!(o.priority(None), 0);
        o.set_watched("batch", Some(-1));
        o.set_watched("plain", None);
        o.set_watched("premium", Some(20));
        assert_eq!(o.priority(Some("batch")), -1);
        assert_eq!(o.priority(Some("plain")), 0);
        assert_eq!(o.priority(Some("premium")), 20, "the watched one wins");
        o.remove_watched("premium");
        assert_eq!(o.priority(Some("premium")), 10);
        assert!(Objective::parse("x").is_err());
        assert!(Objective::parse("x=high").is_err());
        assert!(Objective::parse("=1").is_err());
    }
}
