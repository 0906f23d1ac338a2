//! `decode-filter`: keeps endpoints whose `llm-d.ai/role` is `decode`, `prefill-decode`, `both` or `encode-prefill-decode`, and endpoints without the label (they serve everything). No parameters.

use std::sync::Arc;

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::filters::by_label::ByLabelFilter;
use crate::scheduler::plugins::filters::roles::{DECODE_ROLES, ROLE_LABEL};
use crate::scheduler::plugins::{params, NoParams, Plugin};

pub const TYPE: &str = "decode-filter";

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let _: NoParams = params(spec, field)?;
    Ok(Plugin::Filter(Arc::new(ByLabelFilter::fixed(
        TYPE,
        spec.name(),
        ROLE_LABEL,
        true,
        DECODE_ROLES,
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::plugins::filters::testing::kept;

    #[test]
    fn keeps_decoders_and_unlabelled() {
        let roles = [
            Some("decode"),
            Some("prefill"),
            Some("both"),
            Some("prefill-decode"),
            Some("encode"),
            Some("encode-prefill"),
            Some("encode-prefill-decode"),
            None,
            Some("Decode"),
        ];
        assert_eq!(kept(build, &roles), vec![0, 2, 3, 6, 7]);
        assert_eq!(
            kept(super::super::prefill_filter::build, &roles),
            vec![1, 2, 3, 5, 6]
        );
        assert_eq!(
            kept(super::super::encode_filter::build, &roles),
            vec![4, 5, 6]
        );
    }

    #[test]
    fn takes_no_parameters() {
        let spec = PluginSpec {
            name: None,
            type_: TYPE.into(),
            parameters: Some(serde_json::json!({"label": "x"})),
        };
        assert_eq!(
            build(&spec, "plugins[1]").err().unwrap().field,
            "plugins[1].parameters.label"
        );
    }
}
