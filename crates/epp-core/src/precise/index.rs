//! The precise index: request key → the endpoints (slots) holding that block, and on which device
//! tier; per endpoint, engine block hash → the request keys it covers, so a `BlockRemoved` that
//! names only engine hashes finds what to drop, and a `BlockStored` chained to a parent knows the
//! parent's request key.
//!
//! Shapes, and why:
//! - Request keys live in [`SHARDS`] shards, each an `RwLock` over a hash map plus a CLOCK ring
//!   (second chance: a key looked up since the hand last passed survives one more round). A lookup
//!   takes one shared lock per block and flips the key's reference bit, so lookups never wait on
//!   each other and ingestion locks only the shard it touches. The bound is `max_keys` request
//!   keys in all (llm-d's `inMemoryConfig.size`), split evenly over the shards; a full shard evicts
//!   a key with all its holders. At most `pod_cache_size` (endpoint, tier) entries per key
//!   (llm-d's `podCacheSize`): the oldest goes first.
//! - Per key, the holders are a short list of `(slot, tier bits)`, four inline before any heap
//!   allocation. Tier bit 7 marks a speculative entry (seeded after a pick, not yet confirmed).
//! - Per endpoint, one map of `(engine hash, tier)` → [`EngineEntry`]: the request keys the engine
//!   block overlaps, the request key the chain continues from, where the block ends (in tokens), and
//!   how many stores announced it (a duplicate announcement must be removed twice before the block
//!   is gone: llm-d's dedup filter). The total of these entries is bounded by `max_keys` too; a full
//!   table drops the inserting endpoint's oldest entry.
//! - Engine and request block sizes may differ: the engine's `block_size` (from the event) and this
//!   index's `blockSizeTokens` are both known, so each engine block maps to the request blocks its
//!   tokens fall in. A stored run must start on a request-block boundary (else its request keys
//!   cannot be computed: the tokens before it in the same request block are unknown), and it must
//!   carry `block_hashes.len() × block_size` token ids; other runs are skipped and counted.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::{Mutex, RwLock};
use tokio::time::{Duration, Instant};

use super::keys::{extras_from_event, realign_extras, TokenProcessor};
use crate::kvevents::{BlockRemoved, BlockStored, EventBatch, KvEvent};
use crate::prefix::{IdHasher, PrefixMatch, MAX_TRACKED_ENDPOINTS};

/// Endpoint slots tracked (the approximate index's bound; higher slots are scored by it alone).
pub const MAX_SLOTS: usize = MAX_TRACKED_ENDPOINTS;
/// Request-key shards.
pub const SHARDS: usize = 16;
/// Distinct device tiers (medium × KV-cache group) tracked; events on more are skipped.
pub const MAX_TIERS: usize = 7;
const SPECULATIVE: u8 = 1 << 7;
/// Speculative seedings waiting for their TTL at most; the oldest expire early past it.
pub const MAX_SPECULATIVE_REQUESTS: usize = 65_536;
/// llm-d's default tier: an event without a medium is a GPU block.
pub const DEFAULT_TIER: &str = "gpu";

type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// The index's bounds and tier weights.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexConfig {
    /// Request keys held at most (all endpoints together).
    pub max_keys: usize,
    /// (endpoint, tier) entries per request key at most.
    pub pod_cache_size: usize,
    /// Scoring weight per medium (`kvCacheBackendConfigs`); unknown media weigh 1.
    pub tier_weights: Vec<(String, f64)>,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            max_keys: 100_000_000,
            pod_cache_size: 10,
            tier_weights: vec![("gpu".into(), 1.0), ("cpu".into(), 0.8)],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Holder {
    slot: u8,
    tiers: u8,
}

/// Up to four holders inline, more on the heap (boxed: the inline form stays 16 bytes). The
/// heap form carries a summary beside its list, so a lookup reads one allocation, not two.
#[derive(Debug)]
enum Holders {
    Inline(u8, [Holder; 4]),
    Heap(Box<HeapHolders>),
}

#[derive(Debug)]
struct HeapHolders {
    /// Bit `s` set: slot `s` is in `list`.
    slots: [u64; 2],
    /// The tier bits every holder has, when they all have the same; 0 when they differ.
    same_tiers: u8,
    list: Vec<Holder>,
}

impl HeapHolders {
    fn refresh(&mut self) {
        let mut slots = [0u64; 2];
        for h in &self.list {
            slots[(h.slot >> 6) as usize & 1] |= 1 << (h.slot & 63);
        }
        self.slots = slots;
        self.same_tiers = same_tiers(&self.list);
    }
}

/// The tier bits all of `hs` share, or 0 when they differ (or there are none).
fn same_tiers(hs: &[Holder]) -> u8 {
    match hs.split_first() {
        Some((first, rest)) if rest.iter().all(|h| h.tiers == first.tiers) => first.tiers,
        _ => 0,
    }
}

const NO_HOLDER: Holder = Holder { slot: 0, tiers: 0 };

impl Default for Holders {
    fn default() -> Self {
        Holders::Inline(0, [NO_HOLDER; 4])
    }
}

impl Holders {
    fn as_slice(&self) -> &[Holder] {
        match self {
            Holders::Inline(n, h) => &h[..*n as usize],
            Holders::Heap(v) => &v.list,
        }
    }
    /// The slots holding the key as a bitset, and the tier bits they share (0 if they differ).
    fn summary(&self) -> (u128, u8) {
        match self {
            Holders::Inline(n, h) => {
                let hs = &h[..*n as usize];
                let mut slots = 0u128;
                for x in hs {
                    slots |= 1u128 << x.slot;
                }
                (slots, same_tiers(hs))
            }
            Holders::Heap(v) => (
                u128::from(v.slots[0]) | u128::from(v.slots[1]) << 64,
                v.same_tiers,
            ),
        }
    }
    /// Applies `f` to the list, then brings the heap summary up to date.
    fn edit<R>(&mut self, f: impl FnOnce(&mut [Holder]) -> R) -> R {
        match self {
            Holders::Inline(n, h) => f(&mut h[..*n as usize]),
            Holders::Heap(v) => {
                let r = f(&mut v.list);
                v.refresh();
                r
            }
        }
    }
    fn push(&mut self, x: Holder) {
        match self {
            Holders::Inline(n, h) if (*n as usize) < h.len() => {
                h[*n as usize] = x;
                *n += 1;
            }
            Holders::Inline(_, h) => {
                let mut list = h.to_vec();
                list.push(x);
                let mut v = HeapHolders {
                    slots: [0; 2],
                    same_tiers: 0,
                    list,
                };
                v.refresh();
                *self = Holders::Heap(Box::new(v));
            }
            Holders::Heap(v) => {
                v.list.push(x);
                v.refresh();
            }
        }
    }
    fn remove(&mut self, i: usize) -> Holder {
        match self {
            Holders::Inline(n, h) => {
                let x = h[i];
                h.copy_within(i + 1..*n as usize, i);
                *n -= 1;
                x
            }
            Holders::Heap(v) => {
                let x = v.list.remove(i);
                v.refresh();
                x
            }
        }
    }
    fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }
    /// (endpoint, tier) entries, the unit of `podCacheSize`.
    fn entries(&self) -> usize {
        self.as_slice()
            .iter()
            .map(|h| h.tiers.count_ones() as usize)
            .sum()
    }
}

#[derive(Debug, Default)]
struct KeyEntry {
    holders: Holders,
    /// Looked up since the CLOCK hand last passed.
    referenced: AtomicBool,
}

#[derive(Debug, Default)]
struct Shard {
    map: IdMap<KeyEntry>,
    ring: Vec<u64>,
    hand: usize,
}

/// The request keys an engine block overlaps.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Covers {
    /// Exactly its chain key (engine and request blocks of one size: the common case).
    Chain,
    /// None complete (a small engine block past the last full request block).
    Nothing,
    /// One other key (a small engine block inside a request block).
    One(u64),
    /// Several (an engine block larger than a request block). Boxed twice so that the enum, and
    /// with it every engine entry, stays two words smaller: this case is rare.
    #[allow(clippy::redundant_allocation)]
    Many(Box<Box<[u64]>>),
}

/// One engine block as this index knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct EngineEntry {
    /// The request key a chain continuing after this block has for parent.
    chain: u64,
    covers: Covers,
    /// The token position (from the start of the prompt) where this block ends.
    end: u32,
    /// Stores announcing it, minus removes (llm-d's dedup reference count).
    refs: u32,
}

impl EngineEntry {
    fn new(chain: u64, covers: &[u64], end: u64) -> Self {
        let covers = match covers {
            [] => Covers::Nothing,
            [k] if *k == chain => Covers::Chain,
            [k] => Covers::One(*k),
            many => Covers::Many(Box::new(many.into())),
        };
        Self {
            chain,
            covers,
            end: u32::try_from(end).unwrap_or(u32::MAX),
            refs: 1,
        }
    }

    fn covers(&self) -> &[u64] {
        match &self.covers {
            Covers::Chain => std::slice::from_ref(&self.chain),
            Covers::Nothing => &[],
            Covers::One(k) => std::slice::from_ref(k),
            Covers::Many(v) => v,
        }
    }
}

/// The shard of a request key. Middle bits: the map's bucket (low bits) and tag (top bits) keep
/// all their entropy.
fn shard_of(key: u64) -> usize {
    (key >> 40) as usize % SHARDS
}

/// The engine map's key: the engine hash with its tier mixed in, then through a full 64-bit
/// finaliser (splitmix64's, a bijection). The map hashes keys as themselves and takes its bucket
/// from the low bits and its tag from the top ones, so every input bit must reach both: engine
/// hashes with little entropy at either end (small integers, sequential ids, a run counter in
/// the high bits and a block counter in the low ones) otherwise share buckets and probe long
/// chains. A multiply alone carries bits upwards only. One word per key.
fn engine_key(ek: u64, tier: u8) -> u64 {
    let mut x = ek ^ u64::from(tier).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[derive(Debug, Default)]
struct Share {
    /// [`engine_key`] → entry.
    engine: IdMap<EngineEntry>,
    /// `engine`'s keys, oldest first, for the bound: keys removed since are skipped when they
    /// reach the front (and compacted away once they outnumber the live ones).
    order: VecDeque<u64>,
    /// KV-cache groups learned from events: group → cache kind.
    groups: HashMap<u32, String>,
}

/// What one event did, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Request keys added for the endpoint (llm-d's admissions).
    pub admitted: u64,
    /// Engine blocks removed from the index (llm-d's evictions).
    pub evicted: u64,
    /// Removes the dedup count held back, and the ones forwarded.
    pub dedup_suppressed: u64,
    pub dedup_forwarded: u64,
    /// Stores skipped: `(cache kind, reason)`.
    pub stores_skipped: Vec<(String, &'static str)>,
    /// Removes skipped: `(cache kind, reason)`.
    pub removals_skipped: Vec<(String, &'static str)>,
    /// The endpoint's cache was dropped (`AllBlocksCleared`).
    pub cleared: bool,
}

/// Cache kinds whose blocks form prefix chains (llm-d's `isPrefixIndexableSpecKind`).
fn indexable_kind(kind: &str) -> bool {
    matches!(
        kind,
        "full_attention" | "mla_attention" | "sink_full_attention"
    )
}

/// A tier: medium (lower-case) and KV-cache group.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Tier {
    medium: String,
    group: Option<u32>,
}

/// The index. Shared by the director (lookups, speculative seeding) and the event followers.
pub struct PreciseIndex {
    tp: TokenProcessor,
    cfg: IndexConfig,
    shards: Box<[RwLock<Shard>]>,
    shard_cap: usize,
    shares: Box<[Mutex<Share>]>,
    tiers: RwLock<Vec<Tier>>,
    /// f64 bits of each tier's weight.
    tier_weight: [AtomicU64; MAX_TIERS],
    speculative: Mutex<VecDeque<Seeded>>,
    keys: AtomicUsize,
    entries: AtomicUsize,
    engine_entries: AtomicUsize,
    capacity_evictions: AtomicU64,
}

impl std::fmt::Debug for PreciseIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreciseIndex")
            .field("keys", &self.len())
            .field("block_size", &self.tp.block_size())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Seeded {
    expires: Instant,
    slot: u8,
    keys: Box<[u64]>,
}

impl PreciseIndex {
    pub fn new(tp: TokenProcessor, cfg: IndexConfig) -> Self {
        let shard_cap = cfg.max_keys.div_ceil(SHARDS).max(1);
        Self {
            tp,
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect(),
            shard_cap,
            shares: (0..MAX_SLOTS)
                .map(|_| Mutex::new(Share::default()))
                .collect(),
            tiers: RwLock::new(Vec::new()),
            tier_weight: std::array::from_fn(|_| AtomicU64::new(1.0f64.to_bits())),
            speculative: Mutex::new(VecDeque::new()),
            keys: AtomicUsize::new(0),
            entries: AtomicUsize::new(0),
            engine_entries: AtomicUsize::new(0),
            capacity_evictions: AtomicU64::new(0),
            cfg,
        }
    }

    pub fn token_processor(&self) -> &TokenProcessor {
        &self.tp
    }
    pub fn config(&self) -> &IndexConfig {
        &self.cfg
    }

    /// Request keys held.
    pub fn len(&self) -> usize {
        self.keys.load(Ordering::Relaxed)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// (request key, endpoint, tier) entries held, speculative ones included.
    pub fn entries(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }
    /// Engine-block mappings held.
    pub fn engine_entries(&self) -> usize {
        self.engine_entries.load(Ordering::Relaxed)
    }
    /// Request keys evicted to stay within `max_keys`.
    pub fn capacity_evictions(&self) -> u64 {
        self.capacity_evictions.load(Ordering::Relaxed)
    }
    /// Speculative seedings waiting for their TTL.
    pub fn speculative_pending(&self) -> usize {
        self.speculative.lock().len()
    }

    fn shard(&self, key: u64) -> &RwLock<Shard> {
        &self.shards[shard_of(key)]
    }

    /// The tier id of `(medium, group)`, interned; `None` when [`MAX_TIERS`] are in use.
    fn tier_id(&self, medium: Option<&str>, group: Option<u32>) -> Option<u8> {
        let medium = medium
            .filter(|m| !m.is_empty())
            .map(str::to_ascii_lowercase)
            .unwrap_or_else(|| DEFAULT_TIER.to_string());
        let t = Tier { medium, group };
        if let Some(i) = self.tiers.read().iter().position(|x| *x == t) {
            return Some(i as u8);
        }
        let mut tiers = self.tiers.write();
        if let Some(i) = tiers.iter().position(|x| *x == t) {
            return Some(i as u8);
        }
        if tiers.len() >= MAX_TIERS {
            return None;
        }
        let w = self
            .cfg
            .tier_weights
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(&t.medium))
            .map_or(1.0, |(_, w)| *w);
        let id = tiers.len();
        self.tier_weight[id].store(w.to_bits(), Ordering::Relaxed);
        tiers.push(t);
        Some(id as u8)
    }

    /// For every slot, the tier-weighted count of the leading prompt blocks it holds, rounded
    /// down (llm-d's `LongestPrefix` score: GPU 1, CPU 0.8, ..., summed block by block in f64 and
    /// truncated, as llm-d does, so ten CPU blocks count 7); `best` is the longest
    /// unweighted run any slot holds (llm-d's per-lookup hit count).
    pub fn lookup(&self, keys: &[u64]) -> (PrefixMatch, u32) {
        let mut out = PrefixMatch {
            blocks: Vec::new(),
            total_blocks: keys.len() as u32,
        };
        // Tier weights read once per lookup, not once per holder.
        let mut tier_w = [1.0f64; MAX_TIERS];
        for (w, a) in tier_w.iter_mut().zip(&self.tier_weight) {
            *w = f64::from_bits(a.load(Ordering::Relaxed));
        }
        // A holder weighs its heaviest tier (a speculative entry weighs 1, as in llm-d).
        let weight = |tiers: u8| -> f64 {
            let mut w = if tiers & SPECULATIVE != 0 {
                1.0
            } else {
                0.0f64
            };
            let mut bits = tiers & !SPECULATIVE;
            while bits != 0 {
                w = w.max(tier_w[bits.trailing_zeros() as usize]);
                bits &= bits - 1;
            }
            w
        };
        // While every key's holders share one tier set, all slots still in the run have summed
        // the same weights in the same order: one running sum stands for all of them, and a
        // slot's score is that sum when it leaves the run. The first key whose holders differ
        // hands each remaining slot the sum so far and scores holder by holder from there; both
        // ways add the same f64s in the same order, so the truncated scores are identical.
        let mut alive: u128 = u128::MAX;
        let mut score = [0.0f64; MAX_SLOTS];
        let mut shared = 0.0f64;
        let mut uniform = true;
        let mut run = 0u32;
        let settle = |score: &mut [f64; MAX_SLOTS], mut bits: u128, v: f64| {
            if v == 0.0 {
                return;
            }
            while bits != 0 {
                score[bits.trailing_zeros() as usize] = v;
                bits &= bits - 1;
            }
        };
        for key in keys {
            let shard = self.shard(*key).read();
            let Some(e) = shard.map.get(key) else { break };
            // Only a store that changes the bit dirties the cache line.
            if !e.referenced.load(Ordering::Relaxed) {
                e.referenced.store(true, Ordering::Relaxed);
            }
            let (slots, tiers) = e.holders.summary();
            let mut present = slots & alive;
            if uniform && tiers != 0 {
                settle(&mut score, alive & !present, shared);
                if present != 0 {
                    shared += weight(tiers);
                }
            } else {
                if uniform {
                    settle(&mut score, alive, shared);
                    uniform = false;
                }
                present = 0;
                for h in e.holders.as_slice() {
                    let bit = 1u128 << h.slot;
                    if h.tiers != 0 && alive & bit != 0 {
                        present |= bit;
                        score[h.slot as usize] += weight(h.tiers);
                    }
                }
            }
            drop(shard);
            alive = present;
            if alive == 0 {
                break;
            }
            run += 1;
        }
        if uniform {
            settle(&mut score, alive, shared);
        }
        let mut top = 0usize;
        for (slot, s) in score.iter().enumerate() {
            if *s > 0.0 {
                top = slot + 1;
            }
        }
        out.blocks = score[..top].iter().map(|s| s.floor() as u32).collect();
        (out, run)
    }

    /// [`Self::add_holder_locked`] for many keys, locking each shard once: keys are grouped by
    /// shard first. Returns how many keys were new for `slot`.
    fn add_holders(&self, keys: &[u64], slot: u8, tier_bits: u8) -> u64 {
        let mut order: Vec<(u8, u64)> = keys.iter().map(|k| (shard_of(*k) as u8, *k)).collect();
        // Stable: inside a shard the keys keep their order (the CLOCK ring's insertion order).
        order.sort_by_key(|(s, _)| *s);
        let mut admitted = 0;
        for run in order.chunk_by(|a, b| a.0 == b.0) {
            let mut shard = self.shards[run[0].0 as usize].write();
            for (_, k) in run {
                if self.add_holder_locked(&mut shard, *k, slot, tier_bits) {
                    admitted += 1;
                }
            }
        }
        admitted
    }

    /// Adds `tiers` for `slot` to `key`, creating it (and evicting for room) as needed; clears a
    /// speculative bit when a confirmed tier arrives. Returns whether the key is new for `slot`.
    fn add_holder(&self, key: u64, slot: u8, tier_bits: u8) -> bool {
        let mut shard = self.shard(key).write();
        self.add_holder_locked(&mut shard, key, slot, tier_bits)
    }

    fn add_holder_locked(&self, shard: &mut Shard, key: u64, slot: u8, tier_bits: u8) -> bool {
        if !shard.map.contains_key(&key) {
            self.make_room(shard);
            if shard.ring.len() > 2 * shard.map.len() + 64 {
                // Ring slots of removed keys, and second copies of keys removed and added again:
                // compact (amortised over the removals that left them).
                let live = &shard.map;
                let mut seen: std::collections::HashSet<u64, BuildHasherDefault<IdHasher>> =
                    std::collections::HashSet::with_capacity_and_hasher(
                        live.len(),
                        Default::default(),
                    );
                shard
                    .ring
                    .retain(|k| live.contains_key(k) && seen.insert(*k));
                shard.hand = 0;
            }
            // A new key: its one holder goes in with it (one probe, no search).
            let mut holders = Holders::default();
            holders.push(Holder {
                slot,
                tiers: tier_bits,
            });
            shard.ring.push(key);
            shard.map.insert(
                key,
                KeyEntry {
                    holders,
                    referenced: AtomicBool::new(false),
                },
            );
            self.keys.fetch_add(1, Ordering::Relaxed);
            self.entries
                .fetch_add(tier_bits.count_ones() as usize, Ordering::Relaxed);
            return true;
        }
        let e = shard.map.get_mut(&key).expect("present");
        let mut added = true;
        let mut delta: isize = 0;
        let found = e.holders.as_slice().iter().position(|h| h.slot == slot);
        if let Some(i) = found {
            let (before, after) = e.holders.edit(|hs| {
                let before = hs[i].tiers;
                let mut after = before | tier_bits;
                if tier_bits & !SPECULATIVE != 0 {
                    after &= !SPECULATIVE; // confirmed by the engine
                }
                hs[i].tiers = after;
                // Most recently added last.
                hs[i..].rotate_left(1);
                (before, after)
            });
            delta = after.count_ones() as isize - before.count_ones() as isize;
            added = before & !SPECULATIVE == 0 && tier_bits & !SPECULATIVE != 0;
        } else {
            e.holders.push(Holder {
                slot,
                tiers: tier_bits,
            });
            delta += tier_bits.count_ones() as isize;
        }
        // Per-key bound: drop the oldest holders beyond `pod_cache_size` entries.
        while e.holders.entries() > self.cfg.pod_cache_size.max(1) && e.holders.as_slice().len() > 1
        {
            let h = e.holders.remove(0);
            delta -= h.tiers.count_ones() as isize;
        }
        if delta >= 0 {
            self.entries.fetch_add(delta as usize, Ordering::Relaxed);
        } else {
            self.entries.fetch_sub((-delta) as usize, Ordering::Relaxed);
        }
        added
    }

    /// CLOCK: evict keys until the shard has room for one more.
    fn make_room(&self, shard: &mut Shard) {
        while shard.map.len() >= self.shard_cap && !shard.ring.is_empty() {
            if shard.hand >= shard.ring.len() {
                shard.hand = 0;
            }
            let victim = shard.ring[shard.hand];
            match shard.map.get(&victim) {
                // Removed since (or a second copy of a key re-added): drop the ring slot.
                None => {
                    shard.ring.swap_remove(shard.hand);
                }
                Some(e) if e.referenced.swap(false, Ordering::Relaxed) => shard.hand += 1,
                Some(_) => {
                    shard.ring.swap_remove(shard.hand);
                    self.remove_key(shard, victim);
                    self.capacity_evictions.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Removes a key; its ring slot goes when the CLOCK hand next passes it (or at compaction),
    /// so a removal touches one map entry only.
    fn remove_key(&self, shard: &mut Shard, key: u64) {
        let Some(e) = shard.map.remove(&key) else {
            return;
        };
        self.entries
            .fetch_sub(e.holders.entries(), Ordering::Relaxed);
        self.keys.fetch_sub(1, Ordering::Relaxed);
    }

    /// Clears `tier_bits` of `slot` on `key`; drops the holder and the key when nothing is left.
    fn remove_holder(&self, key: u64, slot: u8, tier_bits: u8) -> bool {
        let mut shard = self.shard(key).write();
        let shard = &mut *shard;
        let Some(e) = shard.map.get_mut(&key) else {
            return false;
        };
        let Some(i) = e.holders.as_slice().iter().position(|h| h.slot == slot) else {
            return false;
        };
        let (before, after) = e.holders.edit(|hs| {
            let before = hs[i].tiers;
            hs[i].tiers &= !tier_bits;
            (before, hs[i].tiers)
        });
        let removed = (before & tier_bits).count_ones() as usize;
        self.entries.fetch_sub(removed, Ordering::Relaxed);
        if after == 0 {
            e.holders.remove(i);
        }
        if e.holders.is_empty() {
            self.remove_key(shard, key);
        }
        removed > 0
    }

    /// Forgets everything about `slot`: its holders, engine mappings and groups (an
    /// `AllBlocksCleared`, a restarted publisher, an endpoint that left). O(keys), off the hot
    /// path; one shard is locked at a time.
    pub fn clear_slot(&self, slot: usize) {
        if slot >= MAX_SLOTS {
            return;
        }
        let s = slot as u8;
        for shard in self.shards.iter() {
            let mut shard = shard.write();
            let shard = &mut *shard;
            let mut empty = Vec::new();
            for (k, e) in shard.map.iter_mut() {
                if let Some(i) = e.holders.as_slice().iter().position(|h| h.slot == s) {
                    let h = e.holders.remove(i);
                    self.entries
                        .fetch_sub(h.tiers.count_ones() as usize, Ordering::Relaxed);
                    if e.holders.is_empty() {
                        empty.push(*k);
                    }
                }
            }
            for k in empty {
                self.remove_key(shard, k);
            }
        }
        let mut share = self.shares[slot].lock();
        self.engine_entries
            .fetch_sub(share.engine.len(), Ordering::Relaxed);
        *share = Share::default();
    }

    /// Applies one batch from `slot`'s publisher; `model` is its topic's model (a `lora_name`
    /// on an event takes its place, as llm-d keys adapters by name).
    pub fn apply(&self, slot: usize, model: &str, batch: &EventBatch) -> Applied {
        let mut out = Applied::default();
        if slot >= MAX_SLOTS {
            return out;
        }
        for ev in &batch.events {
            match ev {
                KvEvent::BlockStored(s) => self.stored(slot as u8, model, s, &mut out),
                KvEvent::BlockRemoved(r) => self.removed(slot as u8, r, &mut out),
                KvEvent::AllBlocksCleared => {
                    self.clear_slot(slot);
                    out.cleared = true;
                }
            }
        }
        out
    }

    fn stored(&self, slot: u8, topic_model: &str, ev: &BlockStored, out: &mut Applied) {
        let kind = ev.kv_cache_spec_kind.clone();
        let mut share = self.shares[slot as usize].lock();
        let kind_label = |k: &Option<String>| k.clone().unwrap_or_else(|| "unknown".into());
        if let Some(g) = ev.group_idx {
            let k = match &kind {
                Some(k) => {
                    share.groups.insert(g, k.clone());
                    Some(k.clone())
                }
                None => share.groups.get(&g).cloned(),
            };
            if !k.as_deref().is_some_and(indexable_kind) {
                out.stores_skipped
                    .push((kind_label(&k), "unsupported_cache_kind"));
                return;
            }
        }
        let skip = |out: &mut Applied, reason| {
            out.stores_skipped.push((kind_label(&kind), reason));
        };
        let Some(tier) = self.tier_id(ev.medium.as_deref(), ev.group_idx) else {
            return skip(out, "too_many_tiers");
        };
        let bit = 1u8 << tier;
        let ebs = ev.block_size as u64;
        if ev.token_ids.is_empty() {
            // A location update (e.g. offloaded to CPU): the engine hashes are known already.
            self.tier_update(slot, &mut share, ev, tier, out);
            return;
        }
        if ebs == 0 {
            return skip(out, "invalid_block_size");
        }
        if ev.token_ids.len() as u64 != ev.block_hashes.len() as u64 * ebs {
            return skip(out, "non_dense_block_span");
        }
        let bs = u64::from(self.tp.block_size());
        let (parent, start) = match ev.parent_block_hash {
            None => (None, 0u64),
            Some(p) => match find_engine(&share, p) {
                Some(e) => (Some(e.chain), u64::from(e.end)),
                None => return skip(out, "unknown_parent"),
            },
        };
        if start % bs != 0 {
            return skip(out, "unaligned_block_span");
        }
        let model = ev
            .lora_name
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or(topic_model);
        let blocks = self.tp.blocks_in(ev.token_ids.len());
        let extras = ev
            .extra_keys
            .as_ref()
            .map(|raw| realign_extras(extras_from_event(raw), blocks));
        let keys = match self
            .tp
            .block_keys(parent, &ev.token_ids, model, extras.as_deref())
        {
            Ok(k) => k,
            Err(_) => return skip(out, "invalid_extra_keys"),
        };
        drop(share);
        out.admitted += self.add_holders(&keys, slot, bit);
        // Engine block j spans [start + j·ebs, start + (j+1)·ebs).
        let mut share = self.shares[slot as usize].lock();
        for (j, ek) in ev.block_hashes.iter().enumerate() {
            let (lo, hi) = (j as u64 * ebs, (j as u64 + 1) * ebs);
            let first = (lo / bs) as usize;
            let last = (hi.div_ceil(bs) as usize).min(keys.len());
            let covers = keys.get(first..last).unwrap_or_default();
            // The last request block that ends inside this engine block's end.
            let done = (hi / bs) as usize;
            let chain = match done.checked_sub(1) {
                Some(i) => keys.get(i).copied(),
                None => parent,
            };
            let Some(chain) = chain else { continue };
            self.put_engine(
                &mut share,
                engine_key(*ek, tier),
                EngineEntry::new(chain, covers, start + hi),
            );
        }
    }

    fn tier_update(
        &self,
        slot: u8,
        share: &mut Share,
        ev: &BlockStored,
        tier: u8,
        out: &mut Applied,
    ) {
        let mut known = Vec::new();
        for ek in &ev.block_hashes {
            if let Some(e) = find_engine(share, *ek) {
                known.push((*ek, e.clone()));
            }
        }
        if known.is_empty() {
            out.stores_skipped.push((
                ev.kv_cache_spec_kind
                    .clone()
                    .unwrap_or_else(|| "unknown".into()),
                "unknown_engine_blocks",
            ));
            return;
        }
        for (ek, mut e) in known {
            for k in e.covers() {
                if self.add_holder(*k, slot, 1 << tier) {
                    out.admitted += 1;
                }
            }
            e.refs = 1;
            self.put_engine(share, engine_key(ek, tier), e);
        }
    }

    fn put_engine(&self, share: &mut Share, key: u64, entry: EngineEntry) {
        if let Some(e) = share.engine.get_mut(&key) {
            e.refs = e.refs.saturating_add(1);
            e.covers = entry.covers;
            e.chain = entry.chain;
            e.end = entry.end;
            return;
        }
        // Bound: all endpoints together hold at most `max_keys` engine mappings; past it the
        // inserting endpoint gives one up (any: the bound is a safety net, normally the engines'
        // removals keep the mappings at the size of their caches).
        while self.engine_entries.load(Ordering::Relaxed) >= self.cfg.max_keys.max(1) {
            let Some(old) = share.order.pop_front() else {
                return;
            };
            if share.engine.remove(&old).is_some() {
                self.engine_entries.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if share.order.len() > 2 * share.engine.len() + 64 {
            // Slots of removed entries, and second copies of entries removed and stored again:
            // compact (amortised over the removals that left them), keeping each key's newest.
            let live = &share.engine;
            let mut seen: std::collections::HashSet<u64, BuildHasherDefault<IdHasher>> =
                std::collections::HashSet::with_capacity_and_hasher(live.len(), Default::default());
            let mut kept: VecDeque<u64> = share
                .order
                .iter()
                .rev()
                .filter(|k| live.contains_key(k) && seen.insert(**k))
                .copied()
                .collect();
            kept.make_contiguous().reverse();
            share.order = kept;
        }
        share.engine.insert(key, entry);
        share.order.push_back(key);
        self.engine_entries.fetch_add(1, Ordering::Relaxed);
    }

    fn removed(&self, slot: u8, ev: &BlockRemoved, out: &mut Applied) {
        let mut share = self.shares[slot as usize].lock();
        if let Some(g) = ev.group_idx {
            match share.groups.get(&g) {
                None => {
                    out.removals_skipped
                        .push(("unknown".into(), "unknown_group"));
                    return;
                }
                Some(k) if !indexable_kind(k) => {
                    out.removals_skipped
                        .push((k.clone(), "unsupported_cache_kind"));
                    return;
                }
                Some(_) => {}
            }
        }
        let Some(tier) = self.tier_id(ev.medium.as_deref(), ev.group_idx) else {
            return;
        };
        let mut drop_keys = Vec::new();
        for ek in &ev.block_hashes {
            let key = engine_key(*ek, tier);
            let Some(e) = share.engine.get_mut(&key) else {
                // Unknown: passed through, as llm-d's filter does (a no-op on the index).
                out.dedup_forwarded += 1;
                continue;
            };
            if e.refs > 1 {
                e.refs -= 1;
                out.dedup_suppressed += 1;
                continue;
            }
            let e = share.engine.remove(&key).expect("present");
            self.engine_entries.fetch_sub(1, Ordering::Relaxed);
            out.dedup_forwarded += 1;
            out.evicted += 1;
            drop_keys.extend_from_slice(e.covers());
        }
        drop(share);
        for k in drop_keys {
            self.remove_holder(k, slot, 1 << tier);
        }
    }

    /// Seeds `slot` as holding `keys` until `ttl` has passed or an engine event confirms them
    /// (then they stay). Expired seedings are dropped first.
    pub fn speculate(&self, slot: usize, keys: &[u64], ttl: Duration, now: Instant) {
        if slot >= MAX_SLOTS || keys.is_empty() {
            return;
        }
        self.expire(now);
        self.add_holders(keys, slot as u8, SPECULATIVE);
        let mut q = self.speculative.lock();
        q.push_back(Seeded {
            expires: now + ttl,
            slot: slot as u8,
            keys: keys.into(),
        });
        let over = q.len().saturating_sub(MAX_SPECULATIVE_REQUESTS);
        let early: Vec<Seeded> = q.drain(..over).collect();
        drop(q);
        for s in early {
            self.unseed(&s);
        }
    }

    /// Drops the speculative entries whose TTL has passed; returns how many seedings ended.
    pub fn expire(&self, now: Instant) -> usize {
        let mut done = Vec::new();
        {
            let mut q = self.speculative.lock();
            while q.front().is_some_and(|s| s.expires <= now) {
                done.push(q.pop_front().expect("front exists"));
            }
        }
        for s in &done {
            self.unseed(s);
        }
        done.len()
    }

    fn unseed(&self, s: &Seeded) {
        for k in s.keys.iter() {
            self.remove_holder(*k, s.slot, SPECULATIVE);
        }
    }

    /// Whether `slot` holds `key` (confirmed or speculative); for tests and tools.
    pub fn holds(&self, slot: usize, key: u64) -> bool {
        self.shard(key)
            .read()
            .map
            .get(&key)
            .is_some_and(|e| e.holders.as_slice().iter().any(|h| h.slot as usize == slot))
    }

    /// Whether `slot` holds `key` only speculatively.
    pub fn holds_speculatively(&self, slot: usize, key: u64) -> bool {
        self.shard(key).read().map.get(&key).is_some_and(|e| {
            e.holders
                .as_slice()
                .iter()
                .any(|h| h.slot as usize == slot && h.tiers == SPECULATIVE)
        })
    }
}

/// `(ek, any tier)`: the GPU copy first, else any.
fn find_engine(share: &Share, ek: u64) -> Option<&EngineEntry> {
    (0..MAX_TIERS as u8).find_map(|t| share.engine.get(&engine_key(ek, t)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::precise::keys::HashAlgorithm;

    const BS: u32 = 4;

    fn index(max_keys: usize) -> PreciseIndex {
        PreciseIndex::new(
            TokenProcessor::new(BS, "", HashAlgorithm::CborFnv),
            IndexConfig {
                max_keys,
                ..Default::default()
            },
        )
    }

    fn toks(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| seed * 1000 + i).collect()
    }

    fn batch(events: Vec<KvEvent>) -> EventBatch {
        EventBatch {
            ts: 0.0,
            events,
            data_parallel_rank: None,
        }
    }

    fn stored(hashes: Vec<u64>, parent: Option<u64>, tokens: Vec<u32>, bs: u32) -> KvEvent {
        KvEvent::BlockStored(BlockStored::new(hashes, parent, tokens, bs))
    }

    fn keys(idx: &PreciseIndex, t: &[u32]) -> Vec<u64> {
        idx.token_processor()
            .block_keys(None, t, "m", None)
            .unwrap()
    }

    #[test]
    fn store_chain_remove_and_clear() {
        let idx = index(1000);
        let t = toks(1, 12);
        // Two events chained by their parent: blocks 0-1, then block 2.
        let a = idx.apply(
            3,
            "m",
            &batch(vec![stored(vec![10, 11], None, t[..8].to_vec(), BS)]),
        );
        assert_eq!(a.admitted, 2);
        idx.apply(
            3,
            "m",
            &batch(vec![stored(vec![12], Some(11), t[8..].to_vec(), BS)]),
        );
        let k = keys(&idx, &t);
        let (m, best) = idx.lookup(&k);
        assert_eq!((m.matched(3), m.total_blocks, best), (3, 3, 3));
        // Another endpoint holds the first block only.
        idx.apply(
            5,
            "m",
            &batch(vec![stored(vec![90], None, t[..4].to_vec(), BS)]),
        );
        let (m, _) = idx.lookup(&k);
        assert_eq!((m.matched(3), m.matched(5)), (3, 1));
        // The engine evicts block 1 (engine hash 11) of endpoint 3: its run stops at 1.
        let r = idx.apply(
            3,
            "m",
            &batch(vec![KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![11],
                medium: None,
                group_idx: None,
            })]),
        );
        assert_eq!(r.evicted, 1);
        assert_eq!(idx.lookup(&k).0.matched(3), 1);
        // Another model's chain never matches.
        let other = idx
            .token_processor()
            .block_keys(None, &t, "x", None)
            .unwrap();
        assert_eq!(idx.lookup(&other).0.matched(3), 0);
        // AllBlocksCleared drops endpoint 3 entirely, endpoint 5 stays.
        let c = idx.apply(3, "m", &batch(vec![KvEvent::AllBlocksCleared]));
        assert!(c.cleared);
        let (m, _) = idx.lookup(&k);
        assert_eq!((m.matched(3), m.matched(5)), (0, 1));
        assert_eq!(idx.len(), 1);
        assert_eq!(idx.entries(), 1);
        assert_eq!(idx.engine_entries(), 1);
    }

    #[test]
    fn malformed_runs_are_skipped_with_a_reason() {
        let idx = index(1000);
        let t = toks(2, 8);
        // Token count is not hashes × block_size.
        let a = idx.apply(
            0,
            "m",
            &batch(vec![stored(vec![1, 2], None, t[..7].to_vec(), BS)]),
        );
        assert_eq!(
            a.stores_skipped,
            vec![("unknown".into(), "non_dense_block_span")]
        );
        // A parent never seen.
        let a = idx.apply(
            0,
            "m",
            &batch(vec![stored(vec![3], Some(77), t[..4].to_vec(), BS)]),
        );
        assert_eq!(a.stores_skipped[0].1, "unknown_parent");
        let a = idx.apply(
            0,
            "m",
            &batch(vec![stored(vec![3], None, t[..4].to_vec(), 0)]),
        );
        assert_eq!(a.stores_skipped[0].1, "invalid_block_size");
        // A sliding-window group is not a prefix chain.
        let mut sw = BlockStored::new(vec![4], None, t[..4].to_vec(), BS);
        sw.group_idx = Some(1);
        sw.kv_cache_spec_kind = Some("sliding_window".into());
        let a = idx.apply(0, "m", &batch(vec![KvEvent::BlockStored(sw)]));
        assert_eq!(
            a.stores_skipped,
            vec![("sliding_window".into(), "unsupported_cache_kind")]
        );
        let a = idx.apply(
            0,
            "m",
            &batch(vec![KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![4],
                medium: None,
                group_idx: Some(1),
            })]),
        );
        assert_eq!(
            a.removals_skipped,
            vec![("sliding_window".into(), "unsupported_cache_kind")]
        );
        assert!(idx.is_empty());
    }

    #[test]
    fn engine_blocks_smaller_than_request_blocks_map_many_to_one() {
        // Engine blocks of 2 tokens, request blocks of 4: two engine hashes per request key.
        let idx = index(1000);
        let t = toks(3, 8);
        idx.apply(
            1,
            "m",
            &batch(vec![stored(vec![1, 2, 3, 4], None, t.clone(), 2)]),
        );
        let k = keys(&idx, &t);
        assert_eq!(idx.lookup(&k).0.matched(1), 2);
        // A continuation from engine block 4 (ends at token 8, aligned).
        let more = toks(3, 12);
        idx.apply(
            1,
            "m",
            &batch(vec![stored(vec![5, 6], Some(4), more[8..].to_vec(), 2)]),
        );
        assert_eq!(idx.lookup(&keys(&idx, &more)).0.matched(1), 3);
        // A continuation from engine block 5 (ends at token 10, inside request block 2) cannot
        // be keyed; engine block 1 (ends at token 2, before any request key) is not kept.
        let a = idx.apply(
            1,
            "m",
            &batch(vec![stored(vec![9], Some(5), vec![7, 7], 2)]),
        );
        assert_eq!(a.stores_skipped[0].1, "unaligned_block_span");
        let a = idx.apply(
            1,
            "m",
            &batch(vec![stored(vec![9], Some(1), vec![7, 7], 2)]),
        );
        assert_eq!(a.stores_skipped[0].1, "unknown_parent");
        // Removing engine block 3 (inside request block 1) drops request block 1.
        idx.apply(
            1,
            "m",
            &batch(vec![KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![3],
                medium: None,
                group_idx: None,
            })]),
        );
        assert_eq!(idx.lookup(&keys(&idx, &more)).0.matched(1), 1);
        // Engine blocks larger than request blocks: one hash covers two keys.
        let idx = index(1000);
        idx.apply(2, "m", &batch(vec![stored(vec![7], None, t.clone(), 8)]));
        assert_eq!(idx.lookup(&k).0.matched(2), 2);
    }

    #[test]
    fn duplicate_announcements_need_as_many_removes() {
        let idx = index(1000);
        let t = toks(4, 4);
        let st = stored(vec![1], None, t.clone(), BS);
        idx.apply(0, "m", &batch(vec![st.clone(), st]));
        let rm = KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: vec![1],
            medium: None,
            group_idx: None,
        });
        let a = idx.apply(0, "m", &batch(vec![rm.clone()]));
        assert_eq!((a.dedup_suppressed, a.dedup_forwarded), (1, 0));
        assert!(idx.holds(0, keys(&idx, &t)[0]));
        let a = idx.apply(0, "m", &batch(vec![rm]));
        assert_eq!((a.dedup_suppressed, a.dedup_forwarded), (0, 1));
        assert!(idx.is_empty());
    }

    #[test]
    fn tiers_weigh_and_are_removed_separately() {
        let idx = index(1000);
        let t = toks(5, 20); // 5 blocks
        idx.apply(
            0,
            "m",
            &batch(vec![stored(vec![1, 2, 3, 4, 5], None, t.clone(), BS)]),
        );
        // Offloaded to CPU (a location update without tokens), then gone from the GPU.
        let mut cpu = BlockStored::new(vec![1, 2, 3, 4, 5], None, vec![], BS);
        cpu.medium = Some("CPU".into());
        idx.apply(0, "m", &batch(vec![KvEvent::BlockStored(cpu)]));
        idx.apply(
            0,
            "m",
            &batch(vec![KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![1, 2, 3, 4, 5],
                medium: Some("GPU".into()),
                group_idx: None,
            })]),
        );
        let k = keys(&idx, &t);
        let (m, best) = idx.lookup(&k);
        // Five CPU blocks weigh 5 × 0.8 = 4.
        assert_eq!((m.matched(0), best), (4, 5));
        // A speculative pick on top of the CPU copies weighs 1 per block, as a pure speculative
        // entry does (the heaviest of the holder's tiers).
        idx.speculate(0, &k, Duration::from_secs(2), Instant::now());
        assert_eq!(idx.lookup(&k).0.matched(0), 5);
    }

    #[test]
    fn speculative_entries_expire_unless_confirmed() {
        let idx = index(1000);
        let t = toks(6, 8);
        let k = keys(&idx, &t);
        let now = Instant::now();
        idx.speculate(2, &k, Duration::from_secs(2), now);
        idx.speculate(4, &k[..1], Duration::from_secs(2), now);
        assert_eq!(idx.lookup(&k).0.matched(2), 2);
        assert!(idx.holds_speculatively(2, k[0]));
        // Endpoint 4's engine confirms the first block.
        idx.apply(
            4,
            "m",
            &batch(vec![stored(vec![1], None, t[..4].to_vec(), BS)]),
        );
        assert!(!idx.holds_speculatively(4, k[0]));
        assert_eq!(idx.expire(now + Duration::from_millis(1999)), 0);
        assert_eq!(idx.expire(now + Duration::from_secs(2)), 2);
        let (m, _) = idx.lookup(&k);
        assert_eq!((m.matched(2), m.matched(4)), (0, 1), "confirmed stays");
        assert_eq!(idx.speculative_pending(), 0);
        assert_eq!(idx.entries(), 1);
    }

    /// The lookup as first written: every holder of every key weighed one by one.
    fn reference_lookup(idx: &PreciseIndex, keys: &[u64]) -> (Vec<u32>, u32) {
        let tiers = idx.tiers.read().len();
        let tier_w: Vec<f64> = (0..MAX_TIERS)
            .map(|t| f64::from_bits(idx.tier_weight[t].load(Ordering::Relaxed)))
            .collect();
        assert!(tiers <= MAX_TIERS);
        let weight = |t: u8| {
            let mut w = if t & SPECULATIVE != 0 { 1.0 } else { 0.0f64 };
            for (i, tw) in tier_w.iter().enumerate() {
                if t & (1 << i) != 0 {
                    w = w.max(*tw);
                }
            }
            w
        };
        let mut alive = u128::MAX;
        let mut score = [0.0f64; MAX_SLOTS];
        let mut run = 0;
        for key in keys {
            let shard = idx.shard(*key).read();
            let Some(e) = shard.map.get(key) else { break };
            let mut present = 0u128;
            for h in e.holders.as_slice() {
                let bit = 1u128 << h.slot;
                if h.tiers != 0 && alive & bit != 0 {
                    present |= bit;
                    score[h.slot as usize] += weight(h.tiers);
                }
            }
            alive = present;
            if alive == 0 {
                break;
            }
            run += 1;
        }
        let top = score.iter().rposition(|s| *s > 0.0).map_or(0, |i| i + 1);
        (score[..top].iter().map(|s| s.floor() as u32).collect(), run)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        /// Endpoints holding prefixes of one prompt on GPU or CPU, some of them only
        /// speculatively, some offloaded and then dropped from the GPU: the lookup's scores are
        /// those of weighing every holder one by one, bit for bit.
        #[test]
        fn lookup_matches_holder_by_holder_weighing(
            holders in proptest::collection::vec(
                (0usize..130, 0usize..12, 0u8..5), 0..40),
            cut in 0usize..12,
        ) {
            let idx = index(10_000);
            let t = toks(9, 11 * BS as usize);
            let k = keys(&idx, &t);
            for (n, (slot, len, how)) in holders.iter().enumerate() {
                let len = (*len).min(k.len());
                if len == 0 {
                    continue;
                }
                let hashes: Vec<u64> = (0..len as u64).map(|j| (n as u64) << 8 | j).collect();
                let gpu = || stored(hashes.clone(), None, t[..len * BS as usize].to_vec(), BS);
                match how {
                    0 => {
                        idx.apply(*slot, "m", &batch(vec![gpu()]));
                    }
                    1 | 2 => {
                        idx.apply(*slot, "m", &batch(vec![gpu()]));
                        let mut cpu = BlockStored::new(hashes.clone(), None, vec![], BS);
                        cpu.medium = Some("cpu".into());
                        idx.apply(*slot, "m", &batch(vec![KvEvent::BlockStored(cpu)]));
                        if *how == 2 {
                            idx.apply(*slot, "m", &batch(vec![KvEvent::BlockRemoved(BlockRemoved {
                                block_hashes: hashes[len / 2..].to_vec(),
                                medium: Some("GPU".into()),
                                group_idx: None,
                            })]));
                        }
                    }
                    3 => idx.speculate(*slot, &k[..len], Duration::from_secs(9), Instant::now()),
                    _ => {
                        idx.apply(*slot, "m", &batch(vec![gpu()]));
                        idx.apply(*slot, "m", &batch(vec![KvEvent::BlockRemoved(BlockRemoved {
                            block_hashes: hashes[len / 2..].to_vec(),
                            medium: None,
                            group_idx: None,
                        })]));
                    }
                }
            }
            for prompt in [&k[..], &k[..cut.min(k.len())]] {
                let (m, best) = idx.lookup(prompt);
                let (want, want_best) = reference_lookup(&idx, prompt);
                proptest::prop_assert_eq!(&m.blocks, &want);
                proptest::prop_assert_eq!(best, want_best);
                proptest::prop_assert_eq!(m.total_blocks as usize, prompt.len());
            }
        }
    }

    #[test]
    fn the_key_bound_holds_under_ten_times_overfill() {
        let cap = 1_600;
        let idx = index(cap);
        // 10× the capacity in distinct 4-block runs over 8 endpoints.
        for i in 0..(cap * 10 / 4) as u32 {
            let t = toks(i + 10, 16);
            let slot = (i % 8) as usize;
            idx.apply(
                slot,
                "m",
                &batch(vec![stored(
                    (0..4).map(|j| u64::from(i) * 8 + j).collect(),
                    None,
                    t,
                    BS,
                )]),
            );
            assert!(idx.len() <= cap, "{} keys > {cap}", idx.len());
            assert!(idx.engine_entries() <= cap);
        }
        assert!(idx.capacity_evictions() >= (cap * 9) as u64);
        // The newest run is still whole.
        let last = (cap * 10 / 4) as u32 - 1;
        let t = toks(last + 10, 16);
        assert_eq!(
            idx.lookup(&keys(&idx, &t)).0.matched((last % 8) as usize),
            4
        );
        // The engine mappings went oldest first: the newest run's are all there, so its engine
        // can still remove it block by block.
        let r = idx.apply(
            (last % 8) as usize,
            "m",
            &batch(vec![KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: (0..4).map(|j| u64::from(last) * 8 + j).collect(),
                medium: None,
                group_idx: None,
            })]),
        );
        assert_eq!(r.evicted, 4);
        // The per-key bound: 12 endpoints on one key, at most 10 entries kept.
        let idx = index(100);
        let t = toks(1, 4);
        for slot in 0..12 {
            idx.apply(
                slot,
                "m",
                &batch(vec![stored(vec![1], None, t.clone(), BS)]),
            );
        }
        assert_eq!(idx.entries(), 10);
        let (m, _) = idx.lookup(&keys(&idx, &t));
        assert_eq!((m.matched(0), m.matched(2), m.matched(11)), (0, 1, 1));
    }
}
