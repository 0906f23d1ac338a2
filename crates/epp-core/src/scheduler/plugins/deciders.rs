//! Deciders: whether a disaggregated stage runs for a request, asked by the
//! `disagg-profile-handler` (and the deprecated `pd-profile-handler`) after the decode pick.
//! One file each.

pub mod always_disagg_pd;
pub mod prefix_based_pd;

use crate::scheduler::SchedCtx;

/// Decides per request whether a stage (prefill) runs beside the decode pick.
pub trait Decider: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn name(&self) -> &str;
    /// Whether the stage should run for this request; `decode` is the decode pick (a snapshot
    /// index), `None` when the stage runs before decode.
    fn disaggregate(&self, ctx: &SchedCtx<'_>, decode: Option<usize>) -> bool;
}
