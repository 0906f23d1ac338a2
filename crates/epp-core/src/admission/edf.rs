//! `edf-ordering-policy`: earliest deadline first. A request's deadline is when it entered the
//! queue plus its queue-wait budget; a request without a budget sorts after every bounded one;
//! equal deadlines go by arrival.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::NoParams;

use super::OrderingPolicy;

pub const TYPE: &str = "edf-ordering-policy";

pub fn build(spec: &PluginSpec, field: &str) -> Result<Arc<dyn OrderingPolicy>, ConfigError> {
    let _: NoParams = crate::config::plugin_parameters(spec, field)?;
    Ok(Arc::new(Edf {
        name: spec.name().to_string(),
    }))
}

#[derive(Debug)]
pub struct Edf {
    pub name: String,
}

impl OrderingPolicy for Edf {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn key(&self, enqueued_nanos: u64, ttl: Duration) -> u64 {
        if ttl.is_zero() {
            return u64::MAX;
        }
        enqueued_nanos.saturating_add(u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earlier_deadline_first_and_unbounded_last() {
        let p = Edf { name: TYPE.into() };
        let a = p.key(1_000, Duration::from_secs(10));
        let b = p.key(5_000, Duration::from_secs(1));
        assert!(
            b < a,
            "the later arrival with the shorter budget is due first"
        );
        assert_eq!(p.key(0, Duration::ZERO), u64::MAX);
        assert_eq!(
            p.key(u64::MAX - 1, Duration::from_secs(1)),
            u64::MAX,
            "saturates"
        );
    }
}
