//! Filters: remove candidates that must not be picked. One file each.

pub mod saturation;
