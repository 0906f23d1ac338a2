//! Filters: remove candidates that must not be picked. One file each.

pub mod by_label;
pub mod decode_filter;
pub mod encode_filter;
pub mod label_selector;
pub mod prefill_filter;
pub mod roles;
pub mod saturation;

#[cfg(test)]
pub(crate) mod testing;
