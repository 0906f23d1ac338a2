//! The approximate prefix index: which endpoints probably hold which prompt-prefix blocks in
//! their KV cache, learned from our own past picks (GAIE/llm-d "approximate prefix cache").
//!
//! Prompts are cut into fixed-size blocks of bytes (default 64 = 16 tokens × ~4 characters) and
//! hashed with chained xxhash64, seeded by the model name, so a block hash stands for the whole
//! prefix up to it. One sharded map goes from block hash to a bitset of endpoint slots, so a
//! lookup is one probe per prompt block (not per block per endpoint) and stops at the first block
//! no endpoint holds. Each endpoint's share is bounded by a capacity with least-recently-used
//! eviction, approximated by CLOCK (second chance: a block used since the hand last passed is
//! kept one more round), which costs one ring slot and one map entry per block and no queue of
//! touches. Updates after a pick lock only the shards they touch, so picks never queue behind
//! one lock.
//!
//! The bound in force for one endpoint is the smaller of `lruCapacityPerServer` and the
//! endpoint's own KV cache when it reports one ([`PrefixIndex::capacity_blocks`]): remembering
//! more than the server can hold would only believe in prefixes it has already evicted. The
//! capacity metric reports the same number, so alerts compare evictions with what is held.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::{Mutex, RwLock};
use xxhash_rust::xxh64::xxh64;

use crate::datastore::ModelServerMetrics;

/// Endpoint slots the index can track (bits of the per-block set). Endpoints on higher slots
/// are routed by load only.
pub const MAX_TRACKED_ENDPOINTS: usize = 128;
const SHARDS: usize = 32;
/// Slots per bank: each bank is its own map from block hash to a `u64` bitset, so a pool of up
/// to 64 endpoints pays 8 bytes of set per block, and the second bank exists only when used.
const BANK_BITS: usize = 64;
const BANKS: usize = MAX_TRACKED_ENDPOINTS / BANK_BITS;

/// Identity hasher: keys are already xxhash64 outputs.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);
impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}
type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;
/// One bank: shards of block hash → 64-slot bitset.
type Bank = Box<[RwLock<IdMap<u64>>]>;

/// Index parameters (the `prefix-cache-scorer` plugin's parameters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixConfig {
    /// Block size in bytes of prompt text.
    pub block_size: usize,
    /// Blocks matched at most per request (longer prompts: only their first blocks count).
    pub max_blocks: usize,
    /// Blocks remembered per endpoint (LRU beyond it).
    pub capacity_per_endpoint: usize,
}

impl Default for PrefixConfig {
    fn default() -> Self {
        Self {
            block_size: 64,
            max_blocks: 256,
            capacity_per_endpoint: 31_250,
        }
    }
}

/// How the server's own cache size (from its scraped `cache_config_info`) bounds what the index
/// remembers for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServerBound {
    /// The smaller of `lruCapacityPerServer` and the server's cache (the GAIE-era
    /// `prefix-cache-scorer` parameters).
    #[default]
    Min,
    /// The server's cache when it reports one, else `lruCapacityPerServer` (llm-d's
    /// `approx-prefix-cache-producer` with `autoTune: true`).
    Replace,
    /// Always `lruCapacityPerServer` (`autoTune: false`).
    Ignore,
}

/// How one request's prompt is cut into index blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockPlan {
    /// Fixed blocks of `PrefixConfig::block_size` bytes, at most `PrefixConfig::max_blocks`.
    Fixed,
    /// llm-d's token blocks (4 bytes of prompt text per estimated token).
    Tokens(TokenBlocks),
}

/// The block parameters of llm-d's `approx-prefix-cache-producer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenBlocks {
    /// `blockSizeTokens`: used unless `auto_tune` finds a server-reported block size.
    pub block_size_tokens: usize,
    /// `autoTune`: take the block size from the first endpoint that reports one.
    pub auto_tune: bool,
    /// `maxPrefixTokensToMatch` (0: fall back to `max_prefix_blocks`).
    pub max_prefix_tokens: usize,
    /// `maxPrefixBlocksToMatch` (0 with `max_prefix_tokens` 0: the whole prompt).
    pub max_prefix_blocks: usize,
}

/// Smallest block llm-d's approximate producer hashes, in tokens: smaller configured or reported
/// sizes are raised to it (one index entry per block and endpoint keeps memory bounded).
pub const MIN_BLOCK_SIZE_TOKENS: usize = 64;

impl TokenBlocks {
    /// The block size in tokens for a request over `snapshot`: the configured size, or with
    /// `auto_tune` the first endpoint's reported block size; never below
    /// [`MIN_BLOCK_SIZE_TOKENS`].
    pub fn block_tokens(&self, snapshot: &crate::datastore::Snapshot) -> usize {
        let mut bs = self.block_size_tokens;
        if self.auto_tune {
            if let Some(m) = snapshot
                .endpoints
                .first()
                .and_then(|e| e.metrics.as_deref())
            {
                if let Some(b) = m.block_size.filter(|b| *b > 0) {
                    bs = b as usize;
                }
            }
        }
        bs.max(MIN_BLOCK_SIZE_TOKENS)
    }

    /// Blocks hashed at most for a block size: `maxPrefixTokensToMatch / block` when set, else
    /// `maxPrefixBlocksToMatch`, else unlimited.
    pub fn max_blocks(&self, block_tokens: usize) -> usize {
        if self.max_prefix_tokens > 0 {
            self.max_prefix_tokens / block_tokens.max(1)
        } else if self.max_prefix_blocks == 0 {
            usize::MAX
        } else {
            self.max_prefix_blocks
        }
    }
}

/// Everything the director needs to run the approximate index for a scheduler: the index's own
/// configuration, how server caches bound it, and how prompts are cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixPlan {
    pub index: PrefixConfig,
    pub bound: ServerBound,
    pub blocks: BlockPlan,
}

impl Default for PrefixPlan {
    fn default() -> Self {
        Self {
            index: PrefixConfig::default(),
            bound: ServerBound::Min,
            blocks: BlockPlan::Fixed,
        }
    }
}

impl PrefixPlan {
    /// `(block bytes, max blocks)` for one request over `snapshot`.
    pub fn blocks_for(&self, snapshot: &crate::datastore::Snapshot) -> (usize, usize) {
        match self.blocks {
            BlockPlan::Fixed => (self.index.block_size, self.index.max_blocks),
            BlockPlan::Tokens(t) => {
                let bt = t.block_tokens(snapshot);
                (
                    bt.saturating_mul(crate::scheduler::plugins::BYTES_PER_TOKEN as usize),
                    t.max_blocks(bt),
                )
            }
        }
    }
}

/// Chained block hashes of one prompt; computed once per request and shared by the scorer and
/// the post-pick index update.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PromptHashes {
    pub hashes: Vec<u64>,
}

/// Hash a prompt into chained block hashes. Only full blocks count.
pub fn hash_prompt(cfg: &PrefixConfig, model: &str, prompt: &[u8]) -> PromptHashes {
    hash_blocks(model, prompt, cfg.block_size, cfg.max_blocks)
}

/// Hash a prompt into chained hashes of `block_bytes`-byte blocks, at most `max_blocks`.
pub fn hash_blocks(
    model: &str,
    prompt: &[u8],
    block_bytes: usize,
    max_blocks: usize,
) -> PromptHashes {
    let bs = block_bytes.max(1);
    let n = (prompt.len() / bs).min(max_blocks);
    let mut hashes = Vec::with_capacity(n);
    let mut prev = xxh64(model.as_bytes(), 0);
    for block in prompt.chunks_exact(bs).take(n) {
        prev = xxh64(block, prev);
        hashes.push(prev);
    }
    PromptHashes { hashes }
}

/// Per-slot longest matched run of leading blocks.
#[derive(Clone, Debug, Default)]
pub struct PrefixMatch {
    /// Indexed by slot; slots past the end matched 0 blocks.
    pub blocks: Vec<u32>,
    pub total_blocks: u32,
}

impl PrefixMatch {
    pub fn matched(&self, slot: usize) -> u32 {
        self.blocks.get(slot).copied().unwrap_or(0)
    }
    /// Matched fraction of the prompt's blocks, in [0, 1].
    pub fn ratio(&self, slot: usize) -> f64 {
        if self.total_blocks == 0 {
            0.0
        } else {
            f64::from(self.matched(slot)) / f64::from(self.total_blocks)
        }
    }
}

/// One endpoint's blocks: CLOCK over a ring of block hashes.
#[derive(Default)]
struct Lru {
    /// Block hash → ring position, with [`REFERENCED`] set when used since the hand passed.
    pos: IdMap<u32>,
    ring: Vec<u64>,
    hand: usize,
    /// The endpoint's own cache size in index blocks, as last reported through
    /// [`PrefixIndex::insert_capped`]; plain inserts keep to it too.
    server_blocks: Option<usize>,
}

const REFERENCED: u32 = 1 << 31;

/// The index. Shared by all front-ends through the director.
pub struct PrefixIndex {
    cfg: PrefixConfig,
    /// `banks[b][shard]`: block hash → bitset of slots `b*64 .. b*64+63`.
    banks: Box<[Bank]>,
    high_bank_used: std::sync::atomic::AtomicBool,
    lrus: Box<[Mutex<Lru>]>,
    bound: ServerBound,
    blocks: AtomicUsize,
    evictions: AtomicU64,
}

impl std::fmt::Debug for PrefixIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixIndex")
            .field("cfg", &self.cfg)
            .field("blocks", &self.len())
            .finish()
    }
}

impl PrefixIndex {
    pub fn new(cfg: PrefixConfig) -> Self {
        Self {
            cfg,
            banks: (0..BANKS)
                .map(|_| (0..SHARDS).map(|_| RwLock::new(IdMap::default())).collect())
                .collect(),
            high_bank_used: std::sync::atomic::AtomicBool::new(false),
            lrus: (0..MAX_TRACKED_ENDPOINTS)
                .map(|_| Mutex::new(Lru::default()))
                .collect(),
            bound: ServerBound::Min,
            blocks: AtomicUsize::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// The same index with `bound` deciding how server caches bound it.
    pub fn with_server_bound(mut self, bound: ServerBound) -> Self {
        self.bound = bound;
        self
    }

    /// The index for a scheduler's [`PrefixPlan`].
    pub fn for_plan(plan: &PrefixPlan) -> Self {
        Self::new(plan.index).with_server_bound(plan.bound)
    }

    pub fn config(&self) -> &PrefixConfig {
        &self.cfg
    }

    /// Hash a prompt with explicit block parameters (see [`PrefixPlan::blocks_for`]).
    pub fn hash_with(
        &self,
        model: &str,
        prompt: &[u8],
        block_bytes: usize,
        max_blocks: usize,
    ) -> PromptHashes {
        hash_blocks(model, prompt, block_bytes, max_blocks)
    }

    /// The endpoint's own KV-cache size in index blocks, from its scraped `cache_config_info`
    /// (`num_gpu_blocks` × `block_size` tokens × 4 bytes of prompt text per token, over the
    /// index block size), or `None` when it reports no (or a zero) cache size. Scraped values are
    /// untrusted: the arithmetic saturates.
    pub fn server_capacity_blocks(&self, m: &ModelServerMetrics) -> Option<usize> {
        let blocks = usize::try_from(m.num_gpu_blocks?).unwrap_or(usize::MAX);
        let tokens_per_block = m.block_size.unwrap_or(16) as usize;
        if blocks == 0 || tokens_per_block == 0 {
            return None;
        }
        let bytes = blocks
            .saturating_mul(tokens_per_block)
            .saturating_mul(crate::scheduler::plugins::BYTES_PER_TOKEN as usize);
        Some((bytes / self.cfg.block_size.max(1)).max(1))
    }

    /// Blocks the index keeps at most for one endpoint: `lruCapacityPerServer` and the endpoint's
    /// own cache size when its metrics report one, combined as the index's [`ServerBound`] says
    /// (by default the smaller of the two). [`insert_capped`](Self::insert_capped)
    /// enforces exactly this with `server_blocks` from [`server_capacity_blocks`](Self::server_capacity_blocks).
    pub fn capacity_blocks(&self, m: Option<&ModelServerMetrics>) -> usize {
        self.cap_in_force(m.and_then(|m| self.server_capacity_blocks(m)))
    }

    pub fn hash(&self, model: &str, prompt: &[u8]) -> PromptHashes {
        hash_prompt(&self.cfg, model, prompt)
    }

    fn shard(&self, bank: usize, h: u64) -> &RwLock<IdMap<u64>> {
        // High bits pick the shard; the map uses the low bits.
        &self.banks[bank][(h >> 58) as usize % SHARDS]
    }

    /// For every slot, how many leading blocks of the prompt it holds.
    pub fn lookup(&self, hashes: &PromptHashes) -> PrefixMatch {
        let mut out = PrefixMatch {
            blocks: Vec::new(),
            total_blocks: hashes.hashes.len() as u32,
        };
        let banks = if self.high_bank_used.load(Ordering::Relaxed) {
            BANKS
        } else {
            1
        };
        for bank in 0..banks {
            let mut alive: u64 = u64::MAX;
            let mut i = 0usize;
            for h in &hashes.hashes {
                let m = self.shard(bank, *h).read().get(h).copied().unwrap_or(0) & alive;
                if i > 0 {
                    set_lens(&mut out.blocks, bank, alive & !m, i as u32);
                }
                alive = m;
                i += 1;
                if alive == 0 {
                    break;
                }
            }
            if alive != 0 && i > 0 {
                set_lens(&mut out.blocks, bank, alive, i as u32);
            }
        }
        out
    }

    /// Remember that `slot` now holds these blocks (e.g. a request moved there), within the
    /// slot's bound in force: the server cache size last given to
    /// [`insert_capped`](Self::insert_capped) still applies.
    pub fn insert(&self, slot: usize, hashes: &PromptHashes) {
        self.insert_within(slot, hashes, None);
    }

    /// As [`insert`](Self::insert), with the endpoint's real cache size in index blocks when
    /// known (from its scraped `cache_config_info`): the index never remembers more than the
    /// server can hold, so it does not believe in prefixes the server has already evicted.
    pub fn insert_capped(&self, slot: usize, hashes: &PromptHashes, server_blocks: Option<usize>) {
        self.insert_within(slot, hashes, Some(server_blocks));
    }

    /// `server_blocks`: `Some` sets the slot's server bound (`Some(None)`: none known), `None`
    /// keeps the one last set.
    fn insert_within(
        &self,
        slot: usize,
        hashes: &PromptHashes,
        server_blocks: Option<Option<usize>>,
    ) {
        if slot >= MAX_TRACKED_ENDPOINTS || hashes.hashes.is_empty() {
            return;
        }
        let (bank, bit) = (slot / BANK_BITS, 1u64 << (slot % BANK_BITS));
        if bank > 0 {
            self.high_bank_used.store(true, Ordering::Relaxed);
        }
        let mut lru = self.lrus[slot].lock();
        if let Some(b) = server_blocks {
            lru.server_blocks = b;
        }
        let cap = self.cap_in_force(lru.server_blocks);
        let mut added = 0usize;
        let mut evicted = 0usize;
        // The server's cache is smaller than what we remember: drop the excess.
        while lru.ring.len() > cap {
            let victim = lru.ring.pop().expect("non-empty");
            lru.pos.remove(&victim);
            self.clear_bit(bank, victim, bit);
            evicted += 1;
        }
        if lru.hand >= cap {
            lru.hand = 0;
        }
        for h in &hashes.hashes {
            if let Some(p) = lru.pos.get_mut(h) {
                *p |= REFERENCED;
                continue;
            }
            added += 1;
            *self.shard(bank, *h).write().entry(*h).or_insert(0) |= bit;
            if lru.ring.len() < cap {
                let at = lru.ring.len() as u32;
                lru.ring.push(*h);
                lru.pos.insert(*h, at);
                continue;
            }
            // Full: advance the hand, giving referenced blocks a second chance. Every pass
            // clears bits, so this ends within two turns of the ring.
            loop {
                let hand = lru.hand;
                let victim = lru.ring[hand];
                let p = lru.pos.get_mut(&victim).expect("ring and map agree");
                if *p & REFERENCED != 0 {
                    *p &= !REFERENCED;
                    lru.hand = (hand + 1) % cap;
                    continue;
                }
                lru.pos.remove(&victim);
                self.clear_bit(bank, victim, bit);
                lru.ring[hand] = *h;
                lru.pos.insert(*h, hand as u32);
                lru.hand = (hand + 1) % cap;
                evicted += 1;
                break;
            }
        }
        drop(lru);
        self.blocks.fetch_add(added, Ordering::Relaxed);
        if evicted > 0 {
            self.blocks.fetch_sub(evicted, Ordering::Relaxed);
            self.evictions.fetch_add(evicted as u64, Ordering::Relaxed);
        }
    }

    fn clear_bit(&self, bank: usize, h: u64, bit: u64) {
        let mut shard = self.shard(bank, h).write();
        if let Some(m) = shard.get_mut(&h) {
            *m &= !bit;
            if *m == 0 {
                shard.remove(&h);
            }
        }
    }

    /// Forget everything about a slot (its endpoint is gone).
    pub fn remove_slot(&self, slot: usize) {
        if slot >= MAX_TRACKED_ENDPOINTS {
            return;
        }
        let (bank, bit) = (slot / BANK_BITS, 1u64 << (slot % BANK_BITS));
        let mut lru = self.lrus[slot].lock();
        let n = lru.pos.len();
        for h in lru.pos.keys() {
            self.clear_bit(bank, *h, bit);
        }
        *lru = Lru::default();
        drop(lru);
        self.blocks.fetch_sub(n, Ordering::Relaxed);
    }

    /// The blocks one slot holds, in ring order (what a snapshot of the index carries).
    pub fn export_slot(&self, slot: usize) -> Vec<u64> {
        self.lrus
            .get(slot)
            .map(|l| l.lock().ring.clone())
            .unwrap_or_default()
    }

    /// (endpoint, block) pairs held.
    pub fn len(&self) -> usize {
        self.blocks.load(Ordering::Relaxed)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Blocks held by one slot.
    pub fn slot_len(&self, slot: usize) -> usize {
        self.lrus.get(slot).map(|l| l.lock().pos.len()).unwrap_or(0)
    }
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
    /// Distinct block hashes in the shared map.
    pub fn distinct_blocks(&self) -> usize {
        self.banks
            .iter()
            .flat_map(|b| b.iter())
            .map(|s| s.read().len())
            .sum()
    }
}

impl PrefixIndex {
    /// The per-endpoint bound: the configured capacity and the server's cache (when known),
    /// combined as [`ServerBound`] says.
    fn cap_in_force(&self, server_blocks: Option<usize>) -> usize {
        let configured = self.cfg.capacity_per_endpoint;
        let cap = match self.bound {
            ServerBound::Min => configured.min(server_blocks.unwrap_or(usize::MAX)),
            ServerBound::Replace => server_blocks.unwrap_or(configured),
            ServerBound::Ignore => configured,
        };
        cap.clamp(1, (REFERENCED - 1) as usize)
    }
}

fn set_lens(lens: &mut Vec<u32>, bank: usize, mut bits: u64, n: u32) {
    while bits != 0 {
        let slot = bank * BANK_BITS + bits.trailing_zeros() as usize;
        bits &= bits - 1;
        if lens.len() <= slot {
            lens.resize(slot + 1, 0);
        }
        lens[slot] = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(cap: usize) -> PrefixConfig {
        PrefixConfig {
            block_size: 4,
            max_blocks: 64,
            capacity_per_endpoint: cap,
        }
    }

    #[test]
    fn chained_hashes_depend_on_prefix_and_model() {
        let c = cfg(100);
        let a = hash_prompt(&c, "m", b"aaaabbbbcccc");
        let b = hash_prompt(&c, "m", b"xxxxbbbbcccc");
        assert_eq!(a.hashes.len(), 3);
        assert_ne!(
            a.hashes[1], b.hashes[1],
            "same block after a different prefix"
        );
        assert_ne!(a.hashes[0], hash_prompt(&c, "other", b"aaaa").hashes[0]);
        assert_eq!(hash_prompt(&c, "m", b"aaaabbbbcc").hashes, a.hashes[..2]);
    }

    #[test]
    fn lookup_counts_leading_blocks_per_slot() {
        let idx = PrefixIndex::new(cfg(100));
        idx.insert(0, &idx.hash("m", b"aaaabbbbcccc"));
        idx.insert(3, &idx.hash("m", b"aaaabbbbdddd"));
        let m = idx.lookup(&idx.hash("m", b"aaaabbbbcccceeee"));
        assert_eq!(m.total_blocks, 4);
        assert_eq!(m.matched(0), 3);
        assert_eq!(m.matched(3), 2);
        assert_eq!(m.matched(1), 0);
        assert_eq!(m.ratio(0), 0.75);
        assert_eq!(idx.len(), 6);
        assert_eq!(idx.distinct_blocks(), 4);
    }

    #[test]
    fn lru_capacity_is_enforced_and_evicts_oldest() {
        let idx = PrefixIndex::new(cfg(3));
        idx.insert(1, &idx.hash("m", b"aaaabbbb"));
        idx.insert(1, &idx.hash("m", b"aaaa")); // touch the first block again
        idx.insert(1, &idx.hash("m", b"zzzzyyyy"));
        assert_eq!(idx.slot_len(1), 3);
        assert_eq!(idx.evictions(), 1);
        // "aaaabbbb"'s second block was the least recently used.
        let m = idx.lookup(&idx.hash("m", b"aaaabbbb"));
        assert_eq!(m.matched(1), 1);
        assert_eq!(idx.lookup(&idx.hash("m", b"zzzzyyyy")).matched(1), 2);
    }

    #[test]
    fn server_capacity_caps_what_is_remembered() {
        let idx = PrefixIndex::new(cfg(100));
        idx.insert(0, &idx.hash("m", b"aaaabbbbccccdddd"));
        assert_eq!(idx.slot_len(0), 4);
        idx.insert_capped(0, &idx.hash("m", b"eeee"), Some(2));
        assert_eq!(idx.slot_len(0), 2);
        assert_eq!(idx.len(), 2);
        assert_eq!(idx.evictions(), 3);
        // A plain insert (a request moved to this endpoint) keeps to the server's bound.
        idx.insert(0, &idx.hash("m", b"ffffgggghhhhiiii"));
        assert_eq!(idx.slot_len(0), 2);
        // Until the server reports no size any more.
        idx.insert_capped(0, &idx.hash("m", b"jjjjkkkk"), None);
        assert_eq!(idx.slot_len(0), 4);
    }

    #[test]
    fn capacity_in_force_is_the_smaller_of_config_and_server_cache() {
        // The simulator's default cache: 8,192 blocks of 16 tokens = 8,192 index blocks of
        // 64 bytes, below the default lruCapacityPerServer of 31,250.
        let idx = PrefixIndex::new(PrefixConfig::default());
        let sim = ModelServerMetrics {
            block_size: Some(16),
            num_gpu_blocks: Some(8192),
            ..Default::default()
        };
        assert_eq!(idx.server_capacity_blocks(&sim), Some(8192));
        assert_eq!(idx.capacity_blocks(Some(&sim)), 8192);
        assert_eq!(idx.capacity_blocks(None), 31_250);
        // A server that reports no size (or zero) does not lower the bound.
        let unknown = ModelServerMetrics::default();
        assert_eq!(idx.server_capacity_blocks(&unknown), None);
        let zero = ModelServerMetrics {
            num_gpu_blocks: Some(0),
            ..Default::default()
        };
        assert_eq!(idx.capacity_blocks(Some(&zero)), 31_250);
        // A bigger server leaves the configured bound in force.
        let big = ModelServerMetrics {
            block_size: Some(16),
            num_gpu_blocks: Some(100_000),
            ..Default::default()
        };
        assert_eq!(idx.capacity_blocks(Some(&big)), 31_250);
        // Absurd scraped values saturate instead of overflowing.
        let huge = ModelServerMetrics {
            block_size: Some(u32::MAX),
            num_gpu_blocks: Some(u64::MAX),
            ..Default::default()
        };
        assert_eq!(idx.capacity_blocks(Some(&huge)), 31_250);
        // What insert_capped keeps is exactly the bound in force.
        for p in 0..200u32 {
            let prompt: Vec<u8> = (0..64 * 64).map(|i| (i as u32 ^ p) as u8).collect();
            let prompt = [p.to_le_bytes().as_slice(), &prompt].concat();
            let h = idx.hash("m", &prompt);
            idx.insert_capped(0, &h, idx.server_capacity_blocks(&sim));
        }
        assert_eq!(idx.slot_len(0), 8192);
        assert_eq!(idx.len(), idx.capacity_blocks(Some(&sim)));
    }

    #[test]
    fn high_slots_use_the_second_bank() {
        let idx = PrefixIndex::new(cfg(100));
        idx.insert(3, &idx.hash("m", b"aaaabbbbcccc"));
        idx.insert(100, &idx.hash("m", b"aaaabbbb"));
        idx.insert(127, &idx.hash("m", b"aaaabbbbccccdddd"));
        idx.insert(128, &idx.hash("m", b"aaaa")); // untracked slot: ignored
        let m = idx.lookup(&idx.hash("m", b"aaaabbbbccccdddd"));
        assert_eq!(
            (m.matched(3), m.matched(100), m.matched(127), m.matched(128)),
            (3, 2, 4, 0)
        );
        idx.remove_slot(100);
        assert_eq!(idx.lookup(&idx.hash("m", b"aaaabbbb")).matched(100), 0);
        assert_eq!(idx.len(), 3 + 4);
    }

    #[test]
    fn remove_slot_forgets_it() {
        let idx = PrefixIndex::new(cfg(10));
        let h = idx.hash("m", b"aaaabbbb");
        idx.insert(2, &h);
        idx.insert(5, &h);
        idx.remove_slot(2);
        let m = idx.lookup(&h);
        assert_eq!(m.matched(2), 0);
        assert_eq!(m.matched(5), 2);
        assert_eq!(idx.len(), 2);
    }

    proptest! {
        #[test]
        fn matches_agree_with_a_naive_model(
            prompts in proptest::collection::vec((0usize..4, proptest::collection::vec(0u8..3, 0..24)), 1..40),
            probe in proptest::collection::vec(0u8..3, 0..24),
        ) {
            // Capacity large enough that nothing is evicted: the index must equal the naive
            // "longest common block prefix with anything this slot was given".
            let c = PrefixConfig { block_size: 2, max_blocks: 64, capacity_per_endpoint: 10_000 };
            let idx = PrefixIndex::new(c);
            let mut given: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 4];
            for (slot, p) in &prompts {
                idx.insert(*slot, &idx.hash("m", p));
                given[*slot].push(p.clone());
            }
            let m = idx.lookup(&idx.hash("m", &probe));
            let nblocks = probe.len() / 2;
            prop_assert_eq!(m.total_blocks as usize, nblocks);
            for (slot, ps) in given.iter().enumerate() {
                let best = ps.iter().map(|p| {
                    let mut k = 0;
                    while k < nblocks && (k + 1) * 2 <= p.len() && p[k*2..k*2+2] == probe[k*2..k*2+2] { k += 1; }
                    k
                }).max().unwrap_or(0);
                prop_assert_eq!(m.matched(slot) as usize, best, "slot {}", slot);
                let r = m.ratio(slot);
                prop_assert!((0.0..=1.0).contains(&r));
            }
        }

        #[test]
        fn capacity_never_exceeded(ops in proptest::collection::vec((0usize..3, proptest::collection::vec(0u8..4, 0..40)), 1..60)) {
            let c = PrefixConfig { block_size: 2, max_blocks: 64, capacity_per_endpoint: 7 };
            let idx = PrefixIndex::new(c);
            for (slot, p) in &ops {
                idx.insert(*slot, &idx.hash("m", p));
                prop_assert!(idx.slot_len(*slot) <= 7);
            }
            let total: usize = (0..3).map(|s| idx.slot_len(s)).sum();
            prop_assert_eq!(idx.len(), total);
        }
    }
}
