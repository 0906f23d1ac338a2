//! `prefill-filter`: keeps endpoints whose `llm-d.ai/role` is `prefill`, `encode-prefill`, `prefill-decode`, `both` or `encode-prefill-decode`; endpoints without the label are removed. No parameters.

use std::sync::Arc;

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::filters::by_label::ByLabelFilter;
use crate::scheduler::plugins::filters::roles::{PREFILL_ROLES, ROLE_LABEL};
use crate::scheduler::plugins::{params, NoParams, Plugin};

pub const TYPE: &str = "prefill-filter";

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let _: NoParams = params(spec, field)?;
    Ok(Plugin::Filter(Arc::new(ByLabelFilter::fixed(
        TYPE,
        spec.name(),
        ROLE_LABEL,
        false,
        PREFILL_ROLES,
    ))))
}
