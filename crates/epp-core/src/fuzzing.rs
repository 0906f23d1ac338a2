//! Fuzz harnesses: one function per parser of untrusted bytes. The coverage-guided targets in
//! `fuzz/` (cargo-fuzz, nightly) and the stable replay of the committed corpus and crash inputs
//! (`tests/fuzz_corpus.rs`) both call these, so what is fuzzed is exactly what is replayed.
//! Every harness must return normally for every input: a panic is a bug in the code under test.
//!
//! The inputs are what a hostile peer controls: a request body (proxy and ext_proc), the
//! ext_proc message stream from the gateway, a model server's `/metrics` text, a config
//! file, a model server's KV-event messages, and what other picker replicas (or anything else)
//! wrote into the shared-state Redis. Work is bounded per input (message count, body limit) so a run stays fast.

use std::sync::{Arc, OnceLock};

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;
use prost::Message;

use crate::config::{presets, EndpointPickerConfig};
use crate::datastore::{DatastoreWriter, EndpointSpec, Engine, HealthConfig, ModelServerMetrics};
use crate::director::Director;
use crate::extproc::{Exchange, ExtProcConfig};
use crate::prefix::{PrefixConfig, PrefixIndex};
use crate::request::{parse_body, ApiMethod};
use crate::scheduler::Scheduler;

/// Messages fed to one exchange at most.
const MAX_MESSAGES: usize = 64;
/// The ext_proc body limit while fuzzing: small, so the over-limit path is reachable.
const FUZZ_MAX_BODY: usize = 4096;

/// The request-body parser: the first byte picks the API operation, the rest is the body.
/// A parsed prompt is also hashed, as the director would.
pub fn request_body(data: &[u8]) {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let method = ApiMethod::ALL[usize::from(sel) % ApiMethod::ALL.len()];
    if let Ok(p) = parse_body(method, body) {
        let h = crate::prefix::hash_prompt(&PrefixConfig::default(), &p.model, &p.prompt);
        assert!(h.hashes.len() <= PrefixConfig::default().max_blocks);
    }
}

/// The model-server metrics parser: the first byte picks the engine, the rest is the text
/// (invalid UTF-8 is replaced, as an HTTP client's lossy decoding would). A parsed result also
/// sizes the prefix index, as the director does with scraped cache sizes.
pub fn scrape_metrics(data: &[u8]) {
    let Some((&sel, text)) = data.split_first() else {
        return;
    };
    let engine = [Engine::Vllm, Engine::Sglang, Engine::TrtLlm][usize::from(sel) % 3];
    let text = String::from_utf8_lossy(text);
    if let Ok(m) = crate::scrape::parse_metrics(engine, &text) {
        let idx = PrefixIndex::new(PrefixConfig::default());
        let cap = idx.capacity_blocks(Some(&m));
        assert!((1..=PrefixConfig::default().capacity_per_endpoint).contains(&cap));
    }
}

/// The config loader: YAML text to a validated config and a scheduler.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = EndpointPickerConfig::from_yaml(text) {
        if let Ok(s) = Scheduler::from_config(&cfg) {
            let _ = s.describe();
        }
    }
}

fn default_config() -> &'static EndpointPickerConfig {
    static CFG: OnceLock<EndpointPickerConfig> = OnceLock::new();
    CFG.get_or_init(|| EndpointPickerConfig::from_yaml(presets::DEFAULT).expect("preset parses"))
}

/// A director over three healthy, scraped endpoints (and the writer that keeps its datastore),
/// new for every input so runs do not depend on each other.
fn director() -> (Director, DatastoreWriter) {
    let scheduler = Scheduler::from_config(default_config()).expect("preset builds");
    let datastore = DatastoreWriter::new(HealthConfig::default());
    let pods = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"];
    datastore.set_endpoints(pods.iter().map(|p| EndpointSpec::new(*p)).collect());
    for (i, p) in pods.iter().enumerate() {
        datastore.record_scrape(
            p,
            Ok(ModelServerMetrics {
                waiting_queue: i as f64,
                kv_cache_usage: 0.1 * i as f64,
                block_size: Some(16),
                num_gpu_blocks: Some(64),
                ..Default::default()
            }),
        );
    }
    datastore.mark_synced();
    (Director::build(&datastore, scheduler), datastore)
}

/// The ext_proc exchange state machine: the first byte sets the options (conformance hooks,
/// fallbacks), the rest is read as length-delimited `ProcessingRequest` messages, fed in order
/// until the input ends, a message does not decode, or the exchange finishes or fails.
pub fn extproc_messages(data: &[u8]) {
    let Some((&opts, mut rest)) = data.split_first() else {
        return;
    };
    let cfg = Arc::new(ExtProcConfig {
        test_hooks: opts & 1 != 0,
        fallbacks: usize::from((opts >> 1) & 3),
        max_body_bytes: FUZZ_MAX_BODY,
        ..Default::default()
    });
    let (director, _datastore) = director();
    let mut ex = Exchange::new(director, cfg);
    for _ in 0..MAX_MESSAGES {
        if rest.is_empty() || ex.finished() {
            break;
        }
        let Ok(msg) = ProcessingRequest::decode_length_delimited(&mut rest) else {
            break;
        };
        // No message waits on I/O with the default configuration: the exchange is driven on
        // this thread.
        if futures_executor::block_on(ex.handle(msg)).is_err() {
            break;
        }
    }
}

/// Encode messages as an [`extproc_messages`] input (for building seed inputs).
pub fn encode_extproc_input(opts: u8, msgs: &[ProcessingRequest]) -> Vec<u8> {
    let mut out = vec![opts];
    for m in msgs {
        m.encode_length_delimited(&mut out)
            .expect("a Vec grows as needed");
    }
    out
}

/// Frame separator in [`kv_events`] inputs.
pub const KV_FRAME_SEPARATOR: &[u8] = b"||";

/// The KV-event wire layer: the first byte picks what the rest is: a payload for
/// `kvevents::decode_batch` (a decoded batch must survive re-encoding in both forms unchanged),
/// or frames separated by `||` for `kvevents::decode_message` (live) or
/// `kvevents::frames::parse_replay` (replay answers).
pub fn kv_events(data: &[u8]) {
    use crate::kvevents::{decode_batch, decode_message, encode_batch, frames, EventForm};
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 3 {
        0 => {
            if let Ok(batch) = decode_batch(rest) {
                // NaN is not equal to itself; everything else must round-trip exactly.
                #[allow(clippy::eq_op)]
                let comparable = batch == batch;
                for form in [EventForm::Array, EventForm::Map] {
                    let again = decode_batch(&encode_batch(&batch, form))
                        .expect("a decoded batch re-encodes to a decodable payload");
                    if comparable {
                        assert_eq!(again, batch);
                    }
                }
            }
        }
        1 => {
            let parts = split_frames(rest);
            let _ = decode_message(&parts);
        }
        _ => {
            let parts = split_frames(rest);
            if let Ok(frames::ReplayFrame::Batch { payload, .. }) = frames::parse_replay(&parts) {
                let _ = decode_batch(payload);
            }
        }
    }
}

fn split_frames(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while out.len() < 8 {
        match memchr::memmem::find(rest, KV_FRAME_SEPARATOR) {
            Some(i) => {
                out.push(&rest[..i]);
                rest = &rest[i + KV_FRAME_SEPARATOR.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out
}

/// What replicas read from Redis (`replication::wire`): the first byte picks a stream entry
/// (the rest split by `||` into the `v`, `r` and `b` fields), a snapshot, or a load report.
/// Whatever decodes must re-encode to bytes that decode to the same value.
pub fn shared_state(data: &[u8]) {
    use crate::replication::wire;
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 3 {
        0 => {
            let parts = split_frames(rest);
            let raw = wire::RawEntry {
                version: parts.first().copied(),
                replica: parts.get(1).copied(),
                batch: parts.get(2).copied(),
            };
            if let Ok(e) = wire::decode_entry(&raw, 64) {
                let again = wire::decode_batch(&wire::encode_batch(&e.batch))
                    .expect("a decoded batch re-encodes to a decodable one");
                assert_eq!(again, e.batch);
            }
        }
        1 => {
            if let Ok(s) = wire::decode_snapshot(rest, 64) {
                let again = wire::decode_snapshot(&wire::encode_snapshot(&s), 64)
                    .expect("a decoded snapshot re-encodes to a decodable one");
                assert_eq!(again, s);
            }
        }
        _ => {
            if let Ok(l) = wire::decode_load(rest) {
                let again = wire::decode_load(&wire::encode_load(&l))
                    .expect("a decoded load report re-encodes to a decodable one");
                assert_eq!(again, l);
            }
        }
    }
}

/// A harness: returns normally for every input.
pub type Harness = fn(&[u8]);

/// Every harness by the name of its fuzz target (and corpus directory).
pub const TARGETS: [(&str, Harness); 6] = [
    ("request_body", request_body),
    ("extproc_messages", extproc_messages),
    ("scrape_metrics", scrape_metrics),
    ("config", config),
    ("kv_events", kv_events),
    ("shared_state", shared_state),
];
