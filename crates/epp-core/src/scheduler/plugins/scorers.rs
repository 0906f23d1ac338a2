//! Scorers: one score in [0, 1] per candidate. One file each.

pub mod active_request;
pub mod kv_cache;
pub mod load_aware;
pub mod lora_affinity;
pub mod no_hit_lru;
pub mod precise_prefix_cache;
pub mod predicted_ttft;
pub mod prefix_cache;
pub mod queue;
pub mod running_requests;
pub mod session_affinity;

#[cfg(test)]
pub(crate) mod testing;
