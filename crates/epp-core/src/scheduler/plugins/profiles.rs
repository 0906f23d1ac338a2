//! Profile handlers: which scheduling profiles run for a request. One file each.

pub mod single;
