//! Profile handlers: which scheduling profiles run for a request, and what their picks become.
//! One file each. A handler is checked against the configured profiles and plugins once, at
//! start-up, and turned into a [`HandlerPlan`]: data the scheduler runs per request.

pub mod data_parallel;
pub mod disagg;
pub mod pd;
pub mod single;

use std::sync::Arc;

use super::deciders::Decider;
use super::Plugin;
use crate::scheduler::Profile;

/// Chooses which scheduling profiles run for a request.
pub trait ProfileHandler: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn name(&self) -> &str;
    /// Resolve the profiles and plugins this handler names (config time). `Err` is the message
    /// for the handler's `parameters` field: `(key inside parameters, message)`.
    fn plan(
        &self,
        profiles: &[Profile],
        plugins: &[(String, Plugin)],
    ) -> Result<HandlerPlan, (String, String)>;
}

/// What the scheduler runs for every request.
#[derive(Clone)]
pub enum HandlerPlan {
    /// One profile (an index into the profiles).
    Single { profile: usize },
    /// Decode always, prefill when the decider says so; the decode pick is primary.
    Disagg(DisaggPlan),
    /// One profile; the pick goes out as `x-data-parallel-host-port` and the request to the
    /// pod's `primary_port`.
    DataParallel { profile: usize, primary_port: u16 },
}

/// Which stage runs first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageOrder {
    /// Decode, then (when the decider agrees) prefill: the decider sees the decode pick.
    DecodeFirst,
    /// Prefill whenever its profile exists, then decode.
    PrefillFirst,
}

/// The disaggregation plan.
#[derive(Clone)]
pub struct DisaggPlan {
    pub decode: usize,
    /// The prefill profile and its decider; `None`: prefill never runs.
    pub prefill: Option<(usize, Option<Arc<dyn Decider>>)>,
    pub order: StageOrder,
    /// The deprecated handler's data-parallel port for the decode pick.
    pub primary_port: Option<u16>,
    /// Which decision family the handler records: `disagg_decision_total` (the current handler)
    /// or `pd_decision_total` (the deprecated `pd-profile-handler`).
    pub legacy_pd_metric: bool,
}

/// The index of the profile named `name`, or the error for `key`.
pub(crate) fn profile_named(
    profiles: &[Profile],
    name: &str,
    key: &str,
) -> Result<usize, (String, String)> {
    profiles.iter().position(|p| p.name == name).ok_or_else(|| {
        let have: Vec<&str> = profiles.iter().map(|p| p.name.as_str()).collect();
        (
            key.to_string(),
            format!(
                "no scheduling profile named {name:?} (configured: {})",
                have.join(", ")
            ),
        )
    })
}

/// The decider named `name` among the built plugins, or the error for `key`.
pub(crate) fn decider_named(
    plugins: &[(String, Plugin)],
    name: &str,
    key: &str,
) -> Result<Arc<dyn Decider>, (String, String)> {
    match plugins.iter().find(|(n, _)| n == name) {
        Some((_, Plugin::Decider(d))) => Ok(d.clone()),
        Some(_) => Err((
            key.to_string(),
            format!("plugin {name:?} is not a decider (expected always-disagg-pd-decider or prefix-based-pd-decider)"),
        )),
        None => Err((
            key.to_string(),
            format!("no plugin named {name:?} in `plugins`"),
        )),
    }
}
