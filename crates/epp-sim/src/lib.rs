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
//! - [`pd`]: prefill/decode disaggregation (`kv_transfer_params`, roles, the KV transfer) and
//!   the data-parallel settings;
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
pub mod pd;
mod server;
pub mod tokenizer;

use std::net::{IpAddr, SocketAddr};

pub use api::{DP_RANK_HEADER, POD_HEADER, PORT_HEADER};
pub use config::{ConfigError, SimConfig};
pub use engine::EngineSnapshot;
pub use faults::{FaultError, FaultHandle, Faults, FaultsPatch, FaultsView};
pub use kv_events::{KvEventsConfig, KvEventsHandle};
pub use latency::LatencyModel;
pub use pd::{KvTransferConfig, Role};
pub use server::{spawn, SimServer};

/// Start `count` independent servers named `{name_prefix}-{i}` (i from 0), each with
/// `base.data_parallel_size` (N) data-parallel ranks: one engine per rank (its own cache, queue,
/// metrics), rank r of server i on `base_port + i·N + r` (`base_port` 0: every engine on its own
/// ephemeral port), and its KV events on the configured ports + i·N + r with
/// `data_parallel_rank: r`. Engine i·N + r gets `base`'s settings and seed
/// `base.seed + i·N + r`; the returned servers are in that order. On any error the servers
/// already started are shut down before the error is returned.
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
    base.validate()?;
    let ranks = base.data_parallel_size;
    let engines = count.saturating_mul(ranks);
    if base_port != 0 && base_port as usize + engines - 1 > u16::MAX as usize {
        anyhow::bail!(
            "invalid --base-port: {base_port} + {count} servers × {ranks} ranks runs past port {}",
            u16::MAX
        );
    }
    // One load for every server: a real tokenizer.json is megabytes.
    let tokenizer = server::load_tokenizer(base)?;
    let mut servers = Vec::with_capacity(engines);
    for g in 0..engines {
        let (i, rank) = (g / ranks, g % ranks);
        let mut cfg = SimConfig {
            name: format!("{name_prefix}-{i}"),
            seed: base.seed.wrapping_add(g as u64),
            data_parallel_rank: rank,
            ..base.clone()
        };
        // Engine g publishes KV events on port + g, as vLLM's data-parallel rank g does; with
        // --zmq-endpoint every engine connects to the one central socket (its topic names it).
        let started: anyhow::Result<SimServer> = async {
            for ep in [
                &mut cfg.kv_events.endpoint,
                &mut cfg.kv_events.replay_endpoint,
            ]
            .into_iter()
            .flatten()
            {
                if !ep.ends_with(":0") {
                    let offset = u16::try_from(g).unwrap_or(u16::MAX);
                    *ep = epp_core::kvevents::endpoint_for_rank(ep, offset).ok_or_else(|| {
                        anyhow::anyhow!(
                            "invalid KV-event endpoint {ep:?}: no room for {engines} ports"
                        )
                    })?;
                }
            }
            let port = if base_port == 0 {
                0
            } else {
                base_port + g as u16
            };
            server::spawn_with(cfg, SocketAddr::new(host, port), tokenizer.clone()).await
        }
        .await;
        match started {
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
