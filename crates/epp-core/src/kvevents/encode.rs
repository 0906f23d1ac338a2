//! [`EventBatch`] → msgpack, as vLLM writes it, in either event encoding.
//!
//! The batch is always the array `[ts, events, data_parallel_rank?]`. Events are positional
//! arrays (tag first, trailing defaulted fields left out) or `"type"`-tagged maps (defaulted
//! fields left out); fields without a default in vLLM's structs are always written, as `nil`
//! when unset.

use rmpv::Value;

use super::event::{BlockRemoved, BlockStored, EventBatch, KvEvent};

/// How events are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventForm {
    /// Positional arrays, tag first (vLLM before the switch to tagged maps).
    #[default]
    Array,
    /// Maps tagged under `"type"` (vLLM since the switch).
    Map,
}

impl EventForm {
    /// `array` or `map`, as the simulator's `--kv-events-format` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            EventForm::Array => "array",
            EventForm::Map => "map",
        }
    }
}

impl std::str::FromStr for EventForm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "array" => Ok(EventForm::Array),
            "map" => Ok(EventForm::Map),
            other => Err(format!("expected `array` or `map`, got {other:?}")),
        }
    }
}

/// The msgpack payload of `batch`.
pub fn encode_batch(batch: &EventBatch, form: EventForm) -> Vec<u8> {
    let mut items = vec![
        Value::F64(batch.ts),
        Value::Array(batch.events.iter().map(|e| event(e, form)).collect()),
    ];
    if let Some(rank) = batch.data_parallel_rank {
        items.push(Value::from(rank));
    }
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &Value::Array(items))
        .expect("writing msgpack into a Vec cannot fail");
    out
}

/// The three frames of a live message: topic, 8-byte big-endian sequence, payload.
pub fn encode_message(topic: &str, seq: u64, batch: &EventBatch, form: EventForm) -> [Vec<u8>; 3] {
    [
        topic.as_bytes().to_vec(),
        seq.to_be_bytes().to_vec(),
        encode_batch(batch, form),
    ]
}

/// A struct's fields in declaration order: `(name, value, has_default)`.
type Field = (&'static str, Value, bool);

fn event(e: &KvEvent, form: EventForm) -> Value {
    let fields = match e {
        KvEvent::BlockStored(b) => stored(b),
        KvEvent::BlockRemoved(r) => removed(r),
        KvEvent::AllBlocksCleared => Vec::new(),
    };
    let tag = Value::from(e.tag());
    match form {
        EventForm::Array => {
            // Trailing fields still at their default are left out; earlier ones cannot be.
            let keep = fields
                .iter()
                .rposition(|(_, v, has_default)| !(*has_default && v.is_nil()))
                .map_or(0, |i| i + 1);
            let mut items = Vec::with_capacity(keep + 1);
            items.push(tag);
            items.extend(fields.into_iter().take(keep).map(|(_, v, _)| v));
            Value::Array(items)
        }
        EventForm::Map => {
            let mut entries = vec![(Value::from("type"), tag)];
            entries.extend(
                fields
                    .into_iter()
                    .filter(|(_, v, has_default)| !(*has_default && v.is_nil()))
                    .map(|(name, v, _)| (Value::from(name), v)),
            );
            Value::Map(entries)
        }
    }
}

fn opt<T>(v: &Option<T>, f: impl FnOnce(&T) -> Value) -> Value {
    v.as_ref().map_or(Value::Nil, f)
}

fn hash_list(hashes: &[u64]) -> Value {
    Value::Array(hashes.iter().map(|h| Value::from(*h)).collect())
}

fn stored(b: &BlockStored) -> Vec<Field> {
    vec![
        ("block_hashes", hash_list(&b.block_hashes), false),
        (
            "parent_block_hash",
            opt(&b.parent_block_hash, |h| Value::from(*h)),
            false,
        ),
        (
            "token_ids",
            Value::Array(b.token_ids.iter().map(|t| Value::from(*t)).collect()),
            false,
        ),
        ("block_size", Value::from(b.block_size), false),
        ("lora_id", opt(&b.lora_id, |v| Value::from(*v)), false),
        ("medium", opt(&b.medium, |v| Value::from(v.as_str())), false),
        (
            "lora_name",
            opt(&b.lora_name, |v| Value::from(v.as_str())),
            false,
        ),
        (
            "extra_keys",
            opt(&b.extra_keys, |keys| {
                Value::Array(
                    keys.iter()
                        .map(|k| opt(k, |items| Value::Array(items.clone())))
                        .collect(),
                )
            }),
            true,
        ),
        ("group_idx", opt(&b.group_idx, |v| Value::from(*v)), true),
        (
            "kv_cache_spec_kind",
            opt(&b.kv_cache_spec_kind, |v| Value::from(v.as_str())),
            true,
        ),
        (
            "kv_cache_spec_sliding_window",
            opt(&b.kv_cache_spec_sliding_window, |v| Value::from(*v)),
            true,
        ),
    ]
}

fn removed(r: &BlockRemoved) -> Vec<Field> {
    vec![
        ("block_hashes", hash_list(&r.block_hashes), false),
        ("medium", opt(&r.medium, |v| Value::from(v.as_str())), false),
        ("group_idx", opt(&r.group_idx, |v| Value::from(*v)), true),
    ]
}
