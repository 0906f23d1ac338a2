//! msgpack payload → [`EventBatch`].
//!
//! vLLM has sent two encodings of an event, and one batch may mix them:
//! - positional arrays with the tag first (`msgspec` `array_like=True, tag=True`):
//!   `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
//!   lora_name, extra_keys, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window]`,
//!   `["BlockRemoved", block_hashes, medium, group_idx]`, `["AllBlocksCleared"]`;
//! - maps with the tag under `"type"` and the same field names.
//!
//! Trailing fields with defaults may be missing (`omit_defaults`); fields this decoder does not
//! know (later versions append some) are ignored. Everything else that is not what vLLM sends is an
//! error naming where it is (`events[2].token_ids[5]: ...`), never a panic. Allocation is bounded
//! by the payload: the payload size is capped, every msgpack element costs at least one byte of
//! it, nothing is preallocated from a declared length, and nesting is capped.

use rmpv::ValueRef;

use super::event::{
    BlockRemoved, BlockStored, EventBatch, ExtraKeys, KvEvent, KvMessage, TAG_ALL_BLOCKS_CLEARED,
    TAG_BLOCK_REMOVED, TAG_BLOCK_STORED,
};
use super::frames;

/// Largest payload decoded. vLLM batches one engine step; even a step of many long prompts is a
/// few MiB.
pub const MAX_PAYLOAD_BYTES: usize = 16 << 20;
/// Deepest msgpack nesting accepted (a batch is 5 levels deep, typed extra keys add 3).
const MAX_DEPTH: usize = 32;
/// Most keys in a batch or event map (vLLM's have at most 15); bounds the duplicate-key check.
const MAX_KEYS: usize = 64;

/// Why a message or payload was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("expected 3 frames (topic, sequence, payload), got {0}")]
    FrameCount(usize),
    #[error("topic frame is not UTF-8")]
    TopicNotUtf8,
    #[error("sequence frame has {0} bytes, expected 8 (big-endian)")]
    SequenceLength(usize),
    #[error("replay answer of 4 frames must start with an empty delimiter frame")]
    ReplayDelimiter,
    #[error("payload of {len} bytes is over the {max}-byte limit")]
    PayloadTooLarge { len: usize, max: usize },
    #[error("payload is not msgpack: {0}")]
    Msgpack(String),
    #[error("payload has {0} bytes after the batch")]
    TrailingBytes(usize),
    /// A value of the wrong type or range; `at` is its path (`events[2].token_ids[5]`).
    #[error("{at}: {reason}")]
    Invalid { at: String, reason: String },
}

/// Decodes one live message: `[topic, sequence, payload]`.
pub fn decode_message(frames: &[impl AsRef<[u8]>]) -> Result<KvMessage, DecodeError> {
    let (topic, seq, payload) = frames::split_live(frames)?;
    Ok(KvMessage {
        topic: topic.to_string(),
        seq,
        batch: decode_batch(payload)?,
    })
}

/// Decodes one payload: an `EventBatch`, as the array `[ts, events, data_parallel_rank?]` vLLM
/// sends or as a map with those keys.
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch, DecodeError> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(DecodeError::PayloadTooLarge {
            len: payload.len(),
            max: MAX_PAYLOAD_BYTES,
        });
    }
    let mut rd = payload;
    let value = rmpv::decode::read_value_ref_with_max_depth(&mut rd, MAX_DEPTH)
        .map_err(|e| DecodeError::Msgpack(e.to_string()))?;
    if !rd.is_empty() {
        return Err(DecodeError::TrailingBytes(rd.len()));
    }
    let fields = Fields::of(&value).map_err(|reason| invalid("batch", reason))?;
    let ts = match fields.get(0, "ts") {
        Some(v) => float(v).map_err(|r| invalid("ts", r))?,
        None => return Err(invalid("ts", "missing")),
    };
    let events = match fields.get(1, "events") {
        Some(ValueRef::Array(items)) => items,
        Some(v) => return Err(invalid("events", expected("an array", v))),
        None => return Err(invalid("events", "missing")),
    };
    let data_parallel_rank = match fields.get(2, "data_parallel_rank") {
        None | Some(ValueRef::Nil) => None,
        Some(v) => Some(int_i64(v).map_err(|(_, r)| invalid("data_parallel_rank", r))?),
    };
    let events = events
        .iter()
        .enumerate()
        .map(|(i, e)| decode_event(e).map_err(|b| b.at(&format!("events[{i}]"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(EventBatch {
        ts,
        events,
        data_parallel_rank,
    })
}

fn invalid(at: &str, reason: impl Into<String>) -> DecodeError {
    DecodeError::Invalid {
        at: at.to_string(),
        reason: reason.into(),
    }
}

/// A rejected value inside an event: the path below the event and the reason.
struct Bad {
    sub: String,
    reason: String,
}

impl Bad {
    fn field(name: &str, reason: impl Into<String>) -> Self {
        Self {
            sub: format!(".{name}"),
            reason: reason.into(),
        }
    }
    fn at(self, prefix: &str) -> DecodeError {
        DecodeError::Invalid {
            at: format!("{prefix}{}", self.sub),
            reason: self.reason,
        }
    }
}

/// A struct's fields, positional (array; index 0 is the tag for events) or named (map).
enum Fields<'v, 'a> {
    Positional(&'v [ValueRef<'a>]),
    Named(Vec<(&'v str, &'v ValueRef<'a>)>),
}

impl<'v, 'a> Fields<'v, 'a> {
    fn of(value: &'v ValueRef<'a>) -> Result<Self, String> {
        match value {
            ValueRef::Array(items) => Ok(Fields::Positional(items)),
            ValueRef::Map(entries) if entries.len() > MAX_KEYS => Err(format!(
                "map has {} keys, more than the {MAX_KEYS} a batch or event can have",
                entries.len()
            )),
            ValueRef::Map(entries) => {
                let mut named: Vec<(&str, &ValueRef)> = Vec::with_capacity(entries.len());
                for (k, v) in entries {
                    let key = match k {
                        ValueRef::String(s) => s
                            .as_str()
                            .ok_or_else(|| "a map key is not UTF-8".to_string())?,
                        other => return Err(format!("a map key is {}, not a str", kind(other))),
                    };
                    if named.iter().any(|(n, _)| *n == key) {
                        return Err(format!("key {key:?} appears twice"));
                    }
                    named.push((key, v));
                }
                Ok(Fields::Named(named))
            }
            other => Err(expected("an array or a map", other)),
        }
    }

    /// The field at `pos` (positional) or named `name`; `None` when absent.
    fn get(&self, pos: usize, name: &str) -> Option<&'v ValueRef<'a>> {
        match self {
            Fields::Positional(items) => items.get(pos),
            Fields::Named(named) => named.iter().find(|(n, _)| *n == name).map(|(_, v)| *v),
        }
    }

    /// The field, with `nil` read as absent.
    fn opt(&self, pos: usize, name: &str) -> Option<&'v ValueRef<'a>> {
        self.get(pos, name).filter(|v| !matches!(v, ValueRef::Nil))
    }

    fn required(&self, pos: usize, name: &str) -> Result<&'v ValueRef<'a>, Bad> {
        self.get(pos, name).ok_or_else(|| match self {
            Fields::Positional(_) => Bad::field(name, format!("missing (position {pos})")),
            Fields::Named(_) => Bad::field(name, "missing"),
        })
    }

    fn tag(&self) -> Result<&'v str, Bad> {
        let (v, name) = match self {
            Fields::Positional(items) => (items.first(), "tag"),
            Fields::Named(_) => (self.get(0, "type"), "type"),
        };
        match v {
            Some(ValueRef::String(s)) => s
                .as_str()
                .ok_or_else(|| Bad::field(name, "event tag is not UTF-8")),
            Some(other) => Err(Bad::field(name, expected("a str event tag", other))),
            None => Err(Bad {
                sub: String::new(),
                reason: "event has no tag".into(),
            }),
        }
    }
}

fn decode_event(value: &ValueRef<'_>) -> Result<KvEvent, Bad> {
    let f = Fields::of(value).map_err(|reason| Bad {
        sub: String::new(),
        reason,
    })?;
    match f.tag()? {
        TAG_BLOCK_STORED => Ok(KvEvent::BlockStored(BlockStored {
            block_hashes: with(&f, 1, "block_hashes", hashes)?,
            parent_block_hash: opt_with(&f, 2, "parent_block_hash", hash)?,
            token_ids: with(&f, 3, "token_ids", token_ids)?,
            block_size: with(&f, 4, "block_size", int_u32)?,
            lora_id: opt_with(&f, 5, "lora_id", int_i64)?,
            medium: opt_with(&f, 6, "medium", string)?,
            lora_name: opt_with(&f, 7, "lora_name", string)?,
            extra_keys: opt_with(&f, 8, "extra_keys", extra_keys)?,
            group_idx: opt_with(&f, 9, "group_idx", int_u32)?,
            kv_cache_spec_kind: opt_with(&f, 10, "kv_cache_spec_kind", string)?,
            kv_cache_spec_sliding_window: opt_with(
                &f,
                11,
                "kv_cache_spec_sliding_window",
                int_u32,
            )?,
        })),
        TAG_BLOCK_REMOVED => Ok(KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: with(&f, 1, "block_hashes", hashes)?,
            medium: opt_with(&f, 2, "medium", string)?,
            group_idx: opt_with(&f, 3, "group_idx", int_u32)?,
        })),
        TAG_ALL_BLOCKS_CLEARED => Ok(KvEvent::AllBlocksCleared),
        other => Err(Bad {
            sub: String::new(),
            reason: format!("unknown event type {other:?}"),
        }),
    }
}

/// A conversion's failure: the path below the field (`[5]`, empty for the field itself) and why.
type Conv<T> = Result<T, (String, String)>;

fn with<T>(
    f: &Fields<'_, '_>,
    pos: usize,
    name: &str,
    conv: fn(&ValueRef<'_>) -> Conv<T>,
) -> Result<T, Bad> {
    conv(f.required(pos, name)?).map_err(|(sub, reason)| Bad {
        sub: format!(".{name}{sub}"),
        reason,
    })
}

fn opt_with<T>(
    f: &Fields<'_, '_>,
    pos: usize,
    name: &str,
    conv: fn(&ValueRef<'_>) -> Conv<T>,
) -> Result<Option<T>, Bad> {
    f.opt(pos, name)
        .map(|v| {
            conv(v).map_err(|(sub, reason)| Bad {
                sub: format!(".{name}{sub}"),
                reason,
            })
        })
        .transpose()
}

fn here<T>(r: Result<T, String>) -> Conv<T> {
    r.map_err(|reason| (String::new(), reason))
}

fn list<T>(v: &ValueRef<'_>, item: fn(&ValueRef<'_>) -> Result<T, String>) -> Conv<Vec<T>> {
    let ValueRef::Array(items) = v else {
        return Err((String::new(), expected("an array", v)));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, x)| item(x).map_err(|reason| (format!("[{i}]"), reason)))
        .collect()
}

fn hashes(v: &ValueRef<'_>) -> Conv<Vec<u64>> {
    list(v, hash_value)
}

fn hash(v: &ValueRef<'_>) -> Conv<u64> {
    here(hash_value(v))
}

/// A block hash: an int (negative ones as their two's complement, as Go's `uint64(int64)`), or
/// bytes, of which the last 8 are read big-endian (shorter ones left-padded with zeros).
fn hash_value(v: &ValueRef<'_>) -> Result<u64, String> {
    match v {
        ValueRef::Integer(i) => i
            .as_u64()
            .or_else(|| i.as_i64().map(|n| n as u64))
            .ok_or_else(|| format!("integer {i} is not a 64-bit hash")),
        ValueRef::Binary([]) => Err("empty bytes are not a block hash".into()),
        ValueRef::Binary(b) => {
            let tail = &b[b.len().saturating_sub(8)..];
            let mut buf = [0u8; 8];
            buf[8 - tail.len()..].copy_from_slice(tail);
            Ok(u64::from_be_bytes(buf))
        }
        other => Err(expected("an int or bytes block hash", other)),
    }
}

fn token_ids(v: &ValueRef<'_>) -> Conv<Vec<u32>> {
    list(v, |x| int_u32(x).map_err(|(_, r)| r))
}

fn int_u32(v: &ValueRef<'_>) -> Conv<u32> {
    here(match v {
        ValueRef::Integer(i) => i
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("{i} is out of range 0..={}", u32::MAX)),
        other => Err(expected("an int", other)),
    })
}

fn int_i64(v: &ValueRef<'_>) -> Conv<i64> {
    here(match v {
        ValueRef::Integer(i) => i
            .as_i64()
            .ok_or_else(|| format!("{i} is out of range for a signed 64-bit int")),
        other => Err(expected("an int", other)),
    })
}

fn float(v: &ValueRef<'_>) -> Result<f64, String> {
    match v {
        ValueRef::F64(x) => Ok(*x),
        ValueRef::F32(x) => Ok(f64::from(*x)),
        ValueRef::Integer(i) => i
            .as_i64()
            .map(|n| n as f64)
            .or_else(|| i.as_u64().map(|n| n as f64))
            .ok_or_else(|| format!("{i} is not a number")),
        other => Err(expected("a float", other)),
    }
}

fn string(v: &ValueRef<'_>) -> Conv<String> {
    here(match v {
        ValueRef::String(s) => s
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| "str is not UTF-8".to_string()),
        other => Err(expected("a str", other)),
    })
}

fn extra_keys(v: &ValueRef<'_>) -> Conv<ExtraKeys> {
    let ValueRef::Array(blocks) = v else {
        return Err((String::new(), expected("an array", v)));
    };
    blocks
        .iter()
        .enumerate()
        .map(|(i, x)| match x {
            ValueRef::Nil => Ok(None),
            ValueRef::Array(items) => items
                .iter()
                .enumerate()
                .map(|(j, item)| owned(item).map_err(|(sub, r)| (format!("[{i}][{j}]{sub}"), r)))
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            other => Err((format!("[{i}]"), expected("an array or nil", other))),
        })
        .collect()
}

/// An owned copy of an extra-key value. Strings must be UTF-8: a lossy copy would change the
/// value (rmpv writes an invalid string back as bytes), and vLLM only sends valid ones.
/// Recursion is bounded by the decoder's depth limit.
fn owned(v: &ValueRef<'_>) -> Conv<rmpv::Value> {
    use rmpv::Value;
    Ok(match v {
        ValueRef::String(s) => match s.as_str() {
            Some(s) => Value::from(s),
            None => return Err((String::new(), "str is not UTF-8".into())),
        },
        ValueRef::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, x)| owned(x).map_err(|(sub, r)| (format!("[{i}]{sub}"), r)))
                .collect::<Result<_, _>>()?,
        ),
        ValueRef::Map(entries) => Value::Map(
            entries
                .iter()
                .enumerate()
                .map(|(i, (k, x))| {
                    let at = |(sub, r): (String, String)| (format!("{{{i}}}{sub}"), r);
                    Ok::<_, (String, String)>((owned(k).map_err(at)?, owned(x).map_err(at)?))
                })
                .collect::<Result<_, _>>()?,
        ),
        other => other.to_owned(),
    })
}

fn expected(what: &str, found: &ValueRef<'_>) -> String {
    format!("expected {what}, found {}", kind(found))
}

fn kind(v: &ValueRef<'_>) -> &'static str {
    match v {
        ValueRef::Nil => "nil",
        ValueRef::Boolean(_) => "bool",
        ValueRef::Integer(_) => "int",
        ValueRef::F32(_) | ValueRef::F64(_) => "float",
        ValueRef::String(_) => "str",
        ValueRef::Binary(_) => "bytes",
        ValueRef::Array(_) => "array",
        ValueRef::Map(_) => "map",
        ValueRef::Ext(..) => "ext",
    }
}
