//! `epp-sim`: a simulated vLLM-compatible model server, so the picker, its tests, the demo and the
//! benchmarks run on a laptop without a GPU.
//!
//! One [`SimServer`] mirrors vLLM's HTTP surface (`/v1/completions`, `/v1/chat/completions` with
//! SSE streaming, `/tokenize`, the render endpoints, `/v1/models`, `/version`, `/health`,
//! `/metrics`) and models what a router cares
//! about: a FIFO queue behind a sequence limit, a prefix KV cache with chained block hashes and LRU
//! eviction, LoRA adapter slots, a latency model, vLLM-named metrics, and injectable failures.
//!
//! Table of contents:
//! - [`config`]: [`SimConfig`] and its validation;
//! - [`tokenizer`]: the 4-characters-per-token tokenizer (or a `tokenizer.json`), chat template
//!   and block hashing;
//! - [`cache`]: the prefix KV cache model;
//! - [`latency`]: the latency model;
//! - [`engine`]: admission, queueing and the timed run of a request;
//! - [`metrics`]: the Prometheus exposition;
//! - [`faults`]: failure injection ([`FaultHandle`]);
//! - [`kv_events`]: vLLM's KV-cache events on ZeroMQ (PUB + replay ROUTER), from the cache's
//!   stores, evictions and resets;
//! - `api`: HTTP handlers and OpenAI-shaped bodies; `server`: listening and shutdown.

#![forbid(unsafe_code)]

mod api;
pub mod cache;
pub mod config;
pub mod engine;
pub mod faults;
pub mod kv_events;
pub mod latency;
pub mod metrics;
mod server;
pub mod tokenizer;

use std::net::{IpAddr, SocketAddr};

pub use api::{POD_HEADER, PORT_HEADER};
pub use config::{ConfigError, SimConfig};
pub use engine::EngineSnapshot;
pub use faults::{FaultError, FaultHandle, Faults, FaultsPatch, FaultsView};
pub use kv_events::{KvEventsConfig, KvEventsHandle};
pub use latency::LatencyModel;
pub use server::{spawn, SimServer};

/// Start `count` independent servers named `{name_prefix}-{i}` (i from 0) on
/// `base_port + i` (`base_port` 0: every server on its own ephemeral port). Each server gets
/// `base`'s settings and seed `base.seed + i`. On any error the servers already started are shut
/// down before the error is returned.
pub async fn spawn_many(
    base: &SimConfig,
    name_prefix: &str,
    host: IpAddr,
    base_port: u16,
    count: usize,
) -> anyhow::Result<Vec<SimServer>> {
    if count == 0 {
        anyhow::bail!("invalid --count: must be at least 1");
    }
    if base_port != 0 && base_port as usize + count - 1 > u16::MAX as usize {
        anyhow::bail!(
            "invalid --base-port: {base_port} + {count} servers runs past port {}",
            u16::MAX
        );
    }
    base.validate()?;
    // One load for every server: a real tokenizer.json is megabytes.
    let tokenizer = server::load_tokenizer(base)?;
    let mut servers = Vec::with_capacity(count);
    for i in 0..count {
        let mut cfg = SimConfig {
            name: format!("{name_prefix}-{i}"),
            seed: base.seed.wrapping_add(i as u64),
            ..base.clone()
        };
        // Server i publishes KV events on port + i, as vLLM's data-parallel rank i does.
        for ep in [
            &mut cfg.kv_events.endpoint,
            &mut cfg.kv_events.replay_endpoint,
        ]
        .into_iter()
        .flatten()
        {
            if !ep.ends_with(":0") {
                let rank = u16::try_from(i).unwrap_or(u16::MAX);
                *ep = epp_core::kvevents::endpoint_for_rank(ep, rank).ok_or_else(|| {
                    anyhow::anyhow!("invalid KV-event endpoint {ep:?}: no room for {count} ports")
                })?;
            }
        }
        let port = if base_port == 0 {
            0
        } else {
            base_port + i as u16
        };
        match server::spawn_with(cfg, SocketAddr::new(host, port), tokenizer.clone()).await {
            Ok(s) => servers.push(s),
            Err(e) => {
                for s in servers {
                    s.shutdown().await;
                }
                return Err(e);
            }
        }
    }
    Ok(servers)
}
