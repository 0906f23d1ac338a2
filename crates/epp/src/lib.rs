//! The `epp` crate's library side: what the binary and its integration tests share, so the
//! monitoring tests check the shipped assets with the same PromQL reading `epp doctor` uses.
#![forbid(unsafe_code)]

#[path = "cmd/doctor/assets.rs"]
pub mod assets;
