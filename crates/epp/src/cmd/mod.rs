//! One module per subcommand. Each exposes `Args` (clap) and `run(Args)`.

pub mod bench;
pub mod check_config;
pub mod common;
pub mod demo;
pub mod doctor;
pub mod goflags;
pub mod proxy;
pub mod serve;
pub mod sim;
