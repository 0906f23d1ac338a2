//! `encode-filter`: keeps endpoints whose `llm-d.ai/role` is `encode`, `encode-prefill` or `encode-prefill-decode`; endpoints without the label are removed. No parameters.

use std::sync::Arc;

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::filters::by_label::ByLabelFilter;
use crate::scheduler::plugins::filters::roles::{ENCODE_ROLES, ROLE_LABEL};
use crate::scheduler::plugins::{params, NoParams, Plugin};

pub const TYPE: &str = "encode-filter";

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let _: NoParams = params(spec, field)?;
    Ok(Plugin::Filter(Arc::new(ByLabelFilter::fixed(
        TYPE,
        spec.name(),
        ROLE_LABEL,
        false,
        ENCODE_ROLES,
    ))))
}
