//! KV-cache events from model servers: the wire layer of precise prefix-cache routing.
//!
//! vLLM (with `--kv-events-config`) publishes what enters and leaves its KV cache on a ZeroMQ
//! PUB socket; this module reads that stream so an index can know which blocks each endpoint
//! holds, instead of guessing from past picks. It owns the wire format only:
//!
//! - [`event`]: the typed events ([`BlockStored`], [`BlockRemoved`], `AllBlocksCleared`) and the
//!   batch that carries them;
//! - [`frames`]: the multipart framing (topic, 8-byte big-endian sequence number, payload), the
//!   replay request and the replay answer;
//! - [`decode`]: msgpack payload → [`EventBatch`], for both encodings vLLM has used (positional
//!   arrays with the tag first, and maps tagged `"type"`), mixed freely, strict about garbage;
//! - [`encode`]: [`EventBatch`] → msgpack, in either encoding (the simulator publishes with it);
//! - [`subscriber`]: a SUB socket per endpoint, with gap detection, replay, restart detection and
//!   reconnection, yielding decoded batches through a bounded channel;
//! - [`central`]: one SUB socket the picker binds and every engine connects to (llm-d's
//!   `zmqEndpoint`), yielding each message with its topic and sequence.
//!
//! What to do with the events (the block index, the scorer) lives elsewhere.

pub mod central;
pub mod decode;
pub mod encode;
pub mod event;
pub mod frames;
pub mod subscriber;
#[cfg(test)]
mod wire_tests;

pub use decode::{decode_batch, decode_message, DecodeError, MAX_PAYLOAD_BYTES};
pub use encode::{encode_batch, encode_message, EventForm};
pub use event::{BlockRemoved, BlockStored, EventBatch, ExtraKeys, KvEvent, KvMessage};
pub use frames::{ReplayFrame, DEFAULT_ENDPOINT, DEFAULT_PORT, END_SEQ};

/// llm-d's topic convention for a pod's events: `kv@<pod>@<model>`.
pub fn topic_for(pod: &str, model: &str) -> String {
    format!("kv@{pod}@{model}")
}

/// Splits a `kv@<pod>@<model>` topic into its pod and model; `None` for any other shape.
pub fn parse_topic(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix("kv@")?;
    let (pod, model) = rest.split_once('@')?;
    if model.contains('@') {
        return None;
    }
    Some((pod, model))
}

/// The endpoint of data-parallel rank `rank`: vLLM offsets the TCP port of the configured
/// endpoint by the rank (`tcp://*:5557` → `tcp://*:5558` for rank 1). `None` when the endpoint
/// has no numeric port or the sum overflows.
pub fn endpoint_for_rank(endpoint: &str, rank: u16) -> Option<String> {
    if rank == 0 {
        return Some(endpoint.to_string());
    }
    let (base, port) = endpoint.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    Some(format!("{base}:{}", port.checked_add(rank)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_follow_the_llm_d_convention() {
        assert_eq!(topic_for("pod-a", "llama"), "kv@pod-a@llama");
        assert_eq!(parse_topic("kv@pod-a@llama"), Some(("pod-a", "llama")));
        assert_eq!(parse_topic("kv@pod-a"), None);
        assert_eq!(parse_topic("kv@a@b@c"), None);
        assert_eq!(parse_topic("xx@a@b"), None);
    }

    #[test]
    fn data_parallel_ranks_offset_the_port() {
        assert_eq!(
            endpoint_for_rank("tcp://*:5557", 0).as_deref(),
            Some("tcp://*:5557")
        );
        assert_eq!(
            endpoint_for_rank("tcp://*:5557", 3).as_deref(),
            Some("tcp://*:5560")
        );
        assert_eq!(endpoint_for_rank("tcp://h:65535", 1), None);
        assert_eq!(endpoint_for_rank("tcp://h", 1), None);
    }
}
