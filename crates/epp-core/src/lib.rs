//! epp-core: the picker library.

pub mod telemetry;
