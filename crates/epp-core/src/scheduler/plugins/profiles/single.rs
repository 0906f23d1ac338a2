//! `single-profile-handler`: runs one scheduling profile (the one named `default`, else the
//! first) for every request. It takes no parameters.

use crate::config::{ConfigError, PluginSpec};
use crate::scheduler::plugins::{params, NoParams, Plugin};

pub const TYPE: &str = "single-profile-handler";

pub fn build(spec: &PluginSpec, field: &str) -> Result<Plugin, ConfigError> {
    let _: NoParams = params(spec, field)?;
    Ok(Plugin::ProfileHandler)
}
