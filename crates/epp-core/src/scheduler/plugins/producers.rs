//! Data producers: run once per request before filters and scorers and attach data to it
//! (llm-d's request-control data producers). One file each.

pub mod approx_prefix;
pub mod precise_prefix;
pub mod token;
