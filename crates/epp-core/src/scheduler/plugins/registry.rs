//! The one table from a plugin `type` name to its builder. Adding a plugin is one file plus one
//! line here; the compliance test runs over every entry by itself.

use super::{deciders, filters, pickers, producers, profiles, scorers, Plugin};
use crate::config::{ConfigError, PluginSpec};

/// What a plugin is, for listings and checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Producer,
    Filter,
    Scorer,
    Picker,
    ProfileHandler,
    Decider,
}

/// One registered plugin type.
pub struct Registration {
    pub type_name: &'static str,
    pub kind: Kind,
    /// Builds the plugin from its spec; `field` is the spec's path, for errors.
    pub build: fn(&PluginSpec, &str) -> Result<Plugin, ConfigError>,
}

/// Every plugin type this build implements.
pub static REGISTRY: &[Registration] = &[
    reg(
        filters::saturation::TYPE,
        Kind::Filter,
        filters::saturation::build,
    ),
    reg(
        scorers::prefix_cache::TYPE,
        Kind::Scorer,
        scorers::prefix_cache::build,
    ),
    reg(scorers::queue::TYPE, Kind::Scorer, scorers::queue::build),
    reg(
        scorers::kv_cache::TYPE,
        Kind::Scorer,
        scorers::kv_cache::build,
    ),
    reg(
        scorers::active_request::TYPE,
        Kind::Scorer,
        scorers::active_request::build,
    ),
    reg(
        scorers::lora_affinity::TYPE,
        Kind::Scorer,
        scorers::lora_affinity::build,
    ),
    reg(
        pickers::max_score::TYPE,
        Kind::Picker,
        pickers::max_score::build,
    ),
    reg(pickers::random::TYPE, Kind::Picker, pickers::random::build),
    reg(
        pickers::weighted_random::TYPE,
        Kind::Picker,
        pickers::weighted_random::build,
    ),
    reg(
        pickers::round_robin::TYPE,
        Kind::Picker,
        pickers::round_robin::build,
    ),
    reg(
        profiles::single::TYPE,
        Kind::ProfileHandler,
        profiles::single::build,
    ),
    reg(
        profiles::disagg::TYPE,
        Kind::ProfileHandler,
        profiles::disagg::build,
    ),
    reg(
        profiles::pd::TYPE,
        Kind::ProfileHandler,
        profiles::pd::build,
    ),
    reg(
        profiles::data_parallel::TYPE,
        Kind::ProfileHandler,
        profiles::data_parallel::build,
    ),
    reg(
        deciders::always_disagg_pd::TYPE,
        Kind::Decider,
        deciders::always_disagg_pd::build,
    ),
    reg(
        deciders::prefix_based_pd::TYPE,
        Kind::Decider,
        deciders::prefix_based_pd::build,
    ),
    // llm-d-router's scheduling plugins.
    reg(
        producers::approx_prefix::TYPE,
        Kind::Producer,
        producers::approx_prefix::build,
    ),
    reg(
        producers::precise_prefix::TYPE,
        Kind::Producer,
        producers::precise_prefix::build,
    ),
    reg(
        scorers::precise_prefix_cache::TYPE,
        Kind::Scorer,
        scorers::precise_prefix_cache::build,
    ),
    reg(
        producers::token::TYPE,
        Kind::Producer,
        producers::token::build,
    ),
    reg(
        producers::token::LEGACY_TYPE,
        Kind::Producer,
        producers::token::build,
    ),
    reg(
        filters::decode_filter::TYPE,
        Kind::Filter,
        filters::decode_filter::build,
    ),
    reg(
        filters::prefill_filter::TYPE,
        Kind::Filter,
        filters::prefill_filter::build,
    ),
    reg(
        filters::encode_filter::TYPE,
        Kind::Filter,
        filters::encode_filter::build,
    ),
    reg(
        filters::label_selector::TYPE,
        Kind::Filter,
        filters::label_selector::build,
    ),
    reg(
        filters::label_selector::LEGACY_TYPE,
        Kind::Filter,
        filters::label_selector::build,
    ),
    reg(
        filters::by_label::TYPE,
        Kind::Filter,
        filters::by_label::build,
    ),
    reg(
        scorers::running_requests::TYPE,
        Kind::Scorer,
        scorers::running_requests::build,
    ),
    reg(
        scorers::load_aware::TYPE,
        Kind::Scorer,
        scorers::load_aware::build,
    ),
    reg(
        scorers::no_hit_lru::TYPE,
        Kind::Scorer,
        scorers::no_hit_lru::build,
    ),
    reg(
        scorers::session_affinity::TYPE,
        Kind::Scorer,
        scorers::session_affinity::build,
    ),
    // epp's own.
    reg(
        scorers::predicted_ttft::TYPE,
        Kind::Scorer,
        scorers::predicted_ttft::build,
    ),
];

const fn reg(
    type_name: &'static str,
    kind: Kind,
    build: fn(&PluginSpec, &str) -> Result<Plugin, ConfigError>,
) -> Registration {
    Registration {
        type_name,
        kind,
        build,
    }
}

/// The registration of `type_name`, if this build implements it.
pub fn lookup(type_name: &str) -> Option<&'static Registration> {
    REGISTRY.iter().find(|r| r.type_name == type_name)
}

/// Every implemented type name, in registry order.
pub fn all_types() -> impl Iterator<Item = &'static str> {
    REGISTRY.iter().map(|r| r.type_name)
}
