//! epp-bench: reproducible workloads, a load driver for any OpenAI-compatible URL, run statistics,
//! reports (table, JSON, SVG), and the policy comparison behind `epp bench` and `epp demo`.
#![forbid(unsafe_code)]

pub mod compare;
pub mod driver;
pub mod flow;
pub mod http;
pub mod ideal;
pub mod picker_metrics;
pub mod report;
pub mod sse;
pub mod stats;
pub mod workload;
