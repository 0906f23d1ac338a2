//! Scorers: one score in [0, 1] per candidate. One file each.

pub mod active_request;
pub mod kv_cache;
pub mod lora_affinity;
pub mod prefix_cache;
pub mod queue;
