//! epp-core: the picker library. Layers point one way:
//! front-ends (`proxy`, `extproc`) → `director` → `scheduler` → `datastore` / `prefix`;
//! `gateway` (the header contract both front-ends share),
//! `telemetry`, `metrics` and `config` are leaves.
#![forbid(unsafe_code)]

pub mod admission;
pub mod app;
pub mod config;
pub mod datalayer;
pub mod datastore;
pub mod director;
pub mod discovery;
pub mod exposition;
pub mod extproc;
pub mod fuzzing;
pub mod gateway;
pub mod k8s;
pub mod kvevents;
pub mod metrics;
pub mod parsers;
pub mod precise;
pub mod prefix;
pub mod procstat;
pub mod proxy;
pub mod replication;
pub mod request;
pub mod scheduler;
pub mod scrape;
pub mod service_model;
pub mod serving;
pub mod telemetry;
pub mod tls;
pub mod tokenization;
