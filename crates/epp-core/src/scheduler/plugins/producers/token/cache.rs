//! The token producer's cache of tokenized prompts: bounded by entry count and by the total
//! number of token ids held, least recently used out first.
//!
//! Keyed by the model and a 128-bit hash of every request field that can change the token ids
//! (prompt or messages, tools, chat template and its switches, `add_special_tokens`, ...): the
//! top-level fields that only steer sampling or transport ([`NON_TOKENIZING_FIELDS`]) are left
//! out, so the same prompt asked with another `max_tokens` or `stream` is a hit.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::{Map, Value};
use xxhash_rust::xxh3::Xxh3;

/// Most prompts kept.
pub const MAX_ENTRIES: usize = 4096;
/// Most token ids kept over all entries (4 bytes each: 16 MiB).
pub const MAX_TOKEN_IDS: usize = 4 * 1024 * 1024;

/// Top-level request fields that never change how a prompt tokenizes.
pub const NON_TOKENIZING_FIELDS: [&str; 30] = [
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "best_of",
    "seed",
    "stop",
    "stop_token_ids",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logprobs",
    "top_logprobs",
    "prompt_logprobs",
    "logit_bias",
    "user",
    "ignore_eos",
    "min_tokens",
    "priority",
    "request_id",
    "cache_salt",
    "kv_transfer_params",
    "metadata",
    "store",
];

/// The cache key of one request body for `model` (`chat`: rendered with the chat template).
pub fn key(model: &str, chat: bool, body: &Map<String, Value>) -> u128 {
    struct Sink<'a>(&'a mut Xxh3);
    impl std::io::Write for Sink<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.update(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut h = Xxh3::new();
    h.update(&(model.len() as u64).to_le_bytes());
    h.update(model.as_bytes());
    h.update(&[u8::from(chat)]);
    for (k, v) in body {
        if NON_TOKENIZING_FIELDS.contains(&k.as_str()) {
            continue;
        }
        // JSON-encoded key then value: unambiguous, and map keys come out in one order.
        let mut sink = Sink(&mut h);
        let _ = serde_json::to_writer(&mut sink, k);
        let _ = serde_json::to_writer(&mut sink, v);
    }
    h.digest128()
}

struct Entry {
    ids: Arc<[u32]>,
    stamp: u64,
}

#[derive(Default)]
struct Lru {
    map: HashMap<u128, Entry>,
    /// stamp → key, oldest first.
    order: BTreeMap<u64, u128>,
    clock: u64,
    ids: usize,
}

/// See the module documentation.
pub struct TokenCache {
    inner: Mutex<Lru>,
    max_entries: usize,
    max_ids: usize,
}

impl Default for TokenCache {
    fn default() -> Self {
        Self::with_bounds(MAX_ENTRIES, MAX_TOKEN_IDS)
    }
}

impl TokenCache {
    pub fn with_bounds(max_entries: usize, max_ids: usize) -> Self {
        Self {
            inner: Mutex::new(Lru::default()),
            max_entries: max_entries.max(1),
            max_ids,
        }
    }

    /// The ids cached under `key`, now the most recently used.
    pub fn get(&self, key: u128) -> Option<Arc<[u32]>> {
        let mut guard = self.inner.lock();
        let lru = &mut *guard;
        lru.clock += 1;
        let stamp = lru.clock;
        let e = lru.map.get_mut(&key)?;
        lru.order.remove(&e.stamp);
        e.stamp = stamp;
        lru.order.insert(stamp, key);
        Some(e.ids.clone())
    }

    /// Remember `ids` under `key`, evicting the least recently used entries past either bound.
    /// A single prompt longer than the whole id bound is not kept.
    pub fn insert(&self, key: u128, ids: Arc<[u32]>) {
        if ids.len() > self.max_ids {
            return;
        }
        let mut guard = self.inner.lock();
        let lru = &mut *guard;
        lru.clock += 1;
        let stamp = lru.clock;
        if let Some(old) = lru.map.remove(&key) {
            lru.order.remove(&old.stamp);
            lru.ids -= old.ids.len();
        }
        lru.ids += ids.len();
        lru.map.insert(key, Entry { ids, stamp });
        lru.order.insert(stamp, key);
        while lru.map.len() > self.max_entries || lru.ids > self.max_ids {
            let Some((_, oldest)) = lru.order.pop_first() else {
                break;
            };
            if let Some(e) = lru.map.remove(&oldest) {
                lru.ids -= e.ids.len();
            }
        }
    }

    /// `(entries, token ids)` held now.
    pub fn size(&self) -> (usize, usize) {
        let lru = self.inner.lock();
        (lru.map.len(), lru.ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ids(n: usize) -> Arc<[u32]> {
        (0..n as u32).collect::<Vec<_>>().into()
    }

    #[test]
    fn inserting_past_the_entry_bound_keeps_the_size_at_the_bound() {
        let c = TokenCache::with_bounds(8, 1_000_000);
        for k in 0..100u128 {
            c.insert(k, ids(3));
            assert!(c.size().0 <= 8);
        }
        assert_eq!(c.size(), (8, 24));
        // The most recent eight are kept, the rest went oldest first.
        assert!(c.get(91).is_none());
        assert_eq!(c.get(92).as_deref(), Some(&[0, 1, 2][..]));
    }

    #[test]
    fn the_token_bound_evicts_least_recently_used_first() {
        let c = TokenCache::with_bounds(100, 10);
        c.insert(1, ids(4));
        c.insert(2, ids(4));
        // Touch 1: 2 is now the oldest.
        assert!(c.get(1).is_some());
        c.insert(3, ids(4));
        assert_eq!(c.size(), (2, 8));
        assert!(c.get(2).is_none());
        assert!(c.get(1).is_some() && c.get(3).is_some());
        // Too long to ever fit: not kept, nothing evicted.
        c.insert(4, ids(11));
        assert_eq!(c.size(), (2, 8));
        // Replacing an entry does not count it twice.
        c.insert(3, ids(2));
        assert_eq!(c.size(), (2, 6));
    }

    #[test]
    fn keys_ignore_sampling_fields_only() {
        let a = json!({"model": "x", "prompt": "hi", "max_tokens": 3, "stream": true});
        let b = json!({"prompt": "hi", "temperature": 0.1});
        let k = |v: &Value, chat| key("m", chat, v.as_object().unwrap());
        assert_eq!(k(&a, false), k(&b, false));
        assert_ne!(k(&a, false), k(&a, true));
        assert_ne!(k(&a, false), key("other", false, a.as_object().unwrap()));
        let c = json!({"prompt": "hi", "add_special_tokens": false});
        assert_ne!(k(&a, false), k(&c, false));
        let d = json!({"prompt": "hi!"});
        assert_ne!(k(&a, false), k(&d, false));
    }
}
