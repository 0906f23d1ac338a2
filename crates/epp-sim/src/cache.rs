//! The prefix (KV) cache model: a fixed pool of blocks, content-addressed by chained block hashes.
//!
//! It decides how many prompt tokens a request can skip (the longest run of leading full blocks
//! already cached), whether a request fits at all right now, and what `kv_cache_usage_perc` and
//! the prefix-cache counters report. It is pure and synchronous; the engine owns one behind a lock.
//!
//! Model (close to vLLM's v1 KV cache manager):
//! - A request needs `ceil((prompt_tokens + max_output_tokens) / block_size)` blocks, all reserved
//!   at admission (no preemption). Its full prompt blocks are shareable and identified by hash;
//!   the rest (partial last prompt block, output blocks) are private.
//! - Shareable blocks are reference-counted while requests run. When the count drops to zero the
//!   block stays cached (content kept) and becomes *evictable*; eviction is LRU among evictable
//!   blocks. A request's blocks are released tail-first, so its last blocks are evicted before its
//!   first ones and a cached prefix never has holes at the front.
//! - `usage` = blocks held by running requests (shared ones counted once) / capacity, which is
//!   what vLLM reports (cached-but-free blocks count as free).
//! - Hits and queries are counted in tokens, once per admitted request:
//!   queries += prompt tokens, hits += leading cached blocks × block size.
//! - Every cached block has a block id in `0..capacity`, unique among cached blocks (what a P/D
//!   prefill answer lists in `remote_block_ids`); an evicted block's id is reused.
//! - [`PrefixCache::hold`] takes one more reference on cached blocks, so a P/D prefill keeps its
//!   prompt blocks (not evictable) after it finishes, until the hold is released.

use std::collections::{BTreeMap, HashMap};

/// A block's identity: its chained hash (see [`crate::tokenizer::block_hashes`]).
pub type BlockHash = u64;

/// A change of the set of cached blocks, recorded when the change log is on (KV events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheChange {
    /// The block at this index of the allocating request's hashes entered the cache.
    Stored { index: usize },
    /// This block was evicted.
    Removed(BlockHash),
}

#[derive(Debug)]
struct Block {
    refs: u32,
    /// Recency stamp; the key in `evictable` while `refs == 0`.
    stamp: u64,
    /// Block id, unique among cached blocks.
    id: u32,
}

/// The blocks a running request holds. Hand it back with [`PrefixCache::release`].
#[derive(Debug)]
#[must_use = "an allocation must be released"]
pub struct Allocation {
    hashes: Vec<BlockHash>,
    private: usize,
    cached_blocks: usize,
}

impl Allocation {
    /// Leading prompt blocks found in the cache.
    pub fn cached_blocks(&self) -> usize {
        self.cached_blocks
    }
    /// Total blocks this request holds (shared + private).
    pub fn total_blocks(&self) -> usize {
        self.hashes.len() + self.private
    }
}

/// Why a request cannot be admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    /// Not enough free or evictable blocks now; retry when a request finishes.
    #[error("need {needed} free KV blocks, {available} available now")]
    Full { needed: usize, available: usize },
    /// Larger than the whole cache: it can never run.
    #[error("request needs {needed} KV blocks but the cache only has {capacity}")]
    TooLarge { needed: usize, capacity: usize },
}

/// Counters and gauges exposed as metrics.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CacheStats {
    pub capacity_blocks: usize,
    /// Blocks held by running requests.
    pub active_blocks: usize,
    /// Cached blocks (shareable, held or evictable).
    pub cached_blocks: usize,
    pub evictable_blocks: usize,
    pub hit_tokens: u64,
    pub query_tokens: u64,
    pub evictions: u64,
}

/// See the module documentation.
#[derive(Debug)]
pub struct PrefixCache {
    block_size: usize,
    capacity: usize,
    blocks: HashMap<BlockHash, Block>,
    evictable: BTreeMap<u64, BlockHash>,
    private_in_use: usize,
    /// Shareable blocks with `refs > 0`.
    held_shared: usize,
    clock: u64,
    hit_tokens: u64,
    query_tokens: u64,
    evictions: u64,
    /// `Some` when changes are recorded; drained by [`PrefixCache::take_changes`] after every
    /// allocation, so it holds at most one allocation's changes (bounded by the capacity).
    changes: Option<Vec<CacheChange>>,
    /// Ids of evicted blocks, for reuse (at most `capacity`).
    free_ids: Vec<u32>,
    /// The lowest id never handed out.
    next_id: u32,
}

impl PrefixCache {
    /// `block_size` in tokens and `capacity` in blocks; both must be at least 1.
    pub fn new(block_size: usize, capacity: usize) -> Self {
        Self {
            block_size: block_size.max(1),
            capacity,
            blocks: HashMap::new(),
            evictable: BTreeMap::new(),
            private_in_use: 0,
            held_shared: 0,
            clock: 0,
            hit_tokens: 0,
            query_tokens: 0,
            evictions: 0,
            changes: None,
            free_ids: Vec::new(),
            next_id: 0,
        }
    }

    fn take_id(&mut self) -> u32 {
        self.free_ids.pop().unwrap_or_else(|| {
            let id = self.next_id;
            self.next_id = self.next_id.saturating_add(1);
            id
        })
    }

    /// Records what enters and leaves the cache, for [`PrefixCache::take_changes`].
    pub fn with_change_log(mut self) -> Self {
        self.changes = Some(Vec::new());
        self
    }

    /// The changes since the last call, in order (evictions come before the stores they made
    /// room for). Empty when the change log is off.
    pub fn take_changes(&mut self) -> Vec<CacheChange> {
        self.changes
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Drops every cached block, as vLLM's prefix-cache reset does; refused (returning the
    /// number of blocks in use) while a running request holds any.
    pub fn reset(&mut self) -> Result<(), usize> {
        let in_use = self.held_shared + self.private_in_use;
        if in_use > 0 {
            return Err(in_use);
        }
        self.blocks.clear();
        self.evictable.clear();
        self.free_ids.clear();
        self.next_id = 0;
        Ok(())
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks a request of `total_tokens` (prompt + output) needs.
    pub fn blocks_for(&self, total_tokens: usize) -> usize {
        total_tokens.div_ceil(self.block_size)
    }

    /// How many leading blocks of `hashes` are cached (held or evictable). Does not change state.
    pub fn lookup(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.blocks.contains_key(h))
            .count()
    }

    /// Reserve the blocks of a request whose full prompt blocks hash to `hashes`, with
    /// `prompt_tokens` prompt tokens and `total_tokens` prompt + output tokens.
    /// On success the hit/query counters move; on failure nothing changes.
    pub fn try_allocate(
        &mut self,
        hashes: &[BlockHash],
        prompt_tokens: usize,
        total_tokens: usize,
    ) -> Result<Allocation, CacheError> {
        let total_blocks = self.blocks_for(total_tokens).max(hashes.len());
        if total_blocks > self.capacity {
            return Err(CacheError::TooLarge {
                needed: total_blocks,
                capacity: self.capacity,
            });
        }
        let private = total_blocks - hashes.len();
        let cached_blocks = self.lookup(hashes);

        // Blocks this request needs that do not exist yet, and evictable blocks it will re-use
        // (which therefore cannot be evicted to make room for it).
        let mut new_needed = private;
        let mut reused_evictable = 0usize;
        for h in hashes {
            match self.blocks.get(h) {
                None => new_needed += 1,
                Some(b) if b.refs == 0 => reused_evictable += 1,
                Some(_) => {}
            }
        }
        let used = self.blocks.len() + self.private_in_use;
        let free = self.capacity.saturating_sub(used);
        let available = free + (self.evictable.len() - reused_evictable);
        if new_needed > available {
            return Err(CacheError::Full {
                needed: new_needed,
                available,
            });
        }

        // Pin the existing blocks first so eviction cannot take them.
        for h in hashes {
            if let Some(b) = self.blocks.get_mut(h) {
                if b.refs == 0 {
                    self.evictable.remove(&b.stamp);
                    self.held_shared += 1;
                }
                b.refs += 1;
            }
        }
        // Make room.
        let mut free = free;
        while free < new_needed {
            let (_, victim) = self
                .evictable
                .pop_first()
                .expect("availability was checked above");
            if let Some(b) = self.blocks.remove(&victim) {
                self.free_ids.push(b.id);
            }
            self.evictions += 1;
            if let Some(log) = &mut self.changes {
                log.push(CacheChange::Removed(victim));
            }
            free += 1;
        }
        for (index, h) in hashes.iter().enumerate() {
            if !self.blocks.contains_key(h) {
                let id = self.take_id();
                self.blocks.insert(
                    *h,
                    Block {
                        refs: 1,
                        stamp: 0,
                        id,
                    },
                );
                self.held_shared += 1;
                if let Some(log) = &mut self.changes {
                    log.push(CacheChange::Stored { index });
                }
            }
        }
        self.private_in_use += private;
        self.query_tokens += prompt_tokens as u64;
        self.hit_tokens += (cached_blocks * self.block_size) as u64;
        Ok(Allocation {
            hashes: hashes.to_vec(),
            private,
            cached_blocks,
        })
    }

    /// Give back a request's blocks. Shared blocks stay cached and become evictable when no
    /// other request holds them; the last block gets the oldest stamp (evicted first).
    pub fn release(&mut self, alloc: Allocation) {
        self.private_in_use -= alloc.private;
        for h in alloc.hashes.iter().rev() {
            if let Some(b) = self.blocks.get_mut(h) {
                b.refs -= 1;
                if b.refs == 0 {
                    self.clock += 1;
                    b.stamp = self.clock;
                    self.evictable.insert(self.clock, *h);
                    self.held_shared -= 1;
                }
            }
        }
    }

    /// One more reference on each of `hashes` (all cached), and their block ids: the blocks stay
    /// out of eviction until the returned allocation is released. `None` (and nothing changes)
    /// when a block is not cached.
    pub fn hold(&mut self, hashes: &[BlockHash]) -> Option<(Allocation, Vec<u32>)> {
        if hashes.iter().any(|h| !self.blocks.contains_key(h)) {
            return None;
        }
        let mut ids = Vec::with_capacity(hashes.len());
        for h in hashes {
            let b = self.blocks.get_mut(h)?;
            if b.refs == 0 {
                self.evictable.remove(&b.stamp);
                self.held_shared += 1;
            }
            b.refs += 1;
            ids.push(b.id);
        }
        Some((
            Allocation {
                hashes: hashes.to_vec(),
                private: 0,
                cached_blocks: 0,
            },
            ids,
        ))
    }

    /// Fraction (0..1) of the blocks held by running requests.
    pub fn usage(&self) -> f64 {
        if self.capacity == 0 {
            return 0.0;
        }
        (self.held_shared + self.private_in_use) as f64 / self.capacity as f64
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            capacity_blocks: self.capacity,
            active_blocks: self.held_shared + self.private_in_use,
            cached_blocks: self.blocks.len(),
            evictable_blocks: self.evictable.len(),
            hit_tokens: self.hit_tokens,
            query_tokens: self.query_tokens,
            evictions: self.evictions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::{block_hashes, chain_seed};

    fn prompt(blocks: &[char]) -> String {
        blocks.iter().map(|c| c.to_string().repeat(64)).collect()
    }

    #[test]
    fn second_request_hits_leading_blocks() {
        let mut c = PrefixCache::new(16, 100);
        let seed = chain_seed("m");
        let p1 = prompt(&['a', 'b', 'c']);
        let h1 = block_hashes(seed, &p1, 16);
        let a1 = c.try_allocate(&h1, 48, 48 + 16).unwrap();
        assert_eq!(a1.cached_blocks(), 0);
        assert_eq!(a1.total_blocks(), 4);
        c.release(a1);
        // Shares the first two blocks, then diverges.
        let p2 = prompt(&['a', 'b', 'x', 'c']);
        let h2 = block_hashes(seed, &p2, 16);
        let a2 = c.try_allocate(&h2, 64, 64).unwrap();
        assert_eq!(a2.cached_blocks(), 2);
        let s = c.stats();
        assert_eq!(s.query_tokens, 48 + 64);
        assert_eq!(s.hit_tokens, 32);
        c.release(a2);
    }

    #[test]
    fn chaining_means_a_later_match_after_a_miss_is_no_hit() {
        let mut c = PrefixCache::new(16, 100);
        let seed = chain_seed("m");
        let a = c
            .try_allocate(&block_hashes(seed, &prompt(&['a', 'b']), 16), 32, 32)
            .unwrap();
        c.release(a);
        // Same second block content, different first block: nothing is reused.
        let h = block_hashes(seed, &prompt(&['z', 'b']), 16);
        assert_eq!(c.lookup(&h), 0);
        // And a different model never shares.
        let h = block_hashes(chain_seed("other"), &prompt(&['a', 'b']), 16);
        assert_eq!(c.lookup(&h), 0);
    }

    #[test]
    fn usage_counts_held_blocks_once_and_frees_on_release() {
        let mut c = PrefixCache::new(16, 10);
        let seed = chain_seed("m");
        let h = block_hashes(seed, &prompt(&['a', 'b']), 16);
        // 2 shared + 1 private (16 output tokens).
        let a1 = c.try_allocate(&h, 32, 48).unwrap();
        assert!((c.usage() - 0.3).abs() < 1e-12);
        // Same prompt concurrently: shares 2, adds 1 private.
        let a2 = c.try_allocate(&h, 32, 48).unwrap();
        assert_eq!(a2.cached_blocks(), 2);
        assert!((c.usage() - 0.4).abs() < 1e-12);
        c.release(a1);
        assert!((c.usage() - 0.3).abs() < 1e-12);
        c.release(a2);
        assert_eq!(c.usage(), 0.0);
        let s = c.stats();
        assert_eq!(s.cached_blocks, 2);
        assert_eq!(s.evictable_blocks, 2);
    }

    #[test]
    fn lru_eviction_under_pressure() {
        // Room for 4 blocks.
        let mut c = PrefixCache::new(16, 4);
        let seed = chain_seed("m");
        let ha = block_hashes(seed, &prompt(&['a', 'a']), 16);
        let hb = block_hashes(seed, &prompt(&['b', 'b']), 16);
        let hc = block_hashes(seed, &prompt(&['c', 'c']), 16);
        let a = c.try_allocate(&ha, 32, 32).unwrap();
        c.release(a);
        let b = c.try_allocate(&hb, 32, 32).unwrap();
        c.release(b);
        // Touch A again so B becomes the least recently used.
        let a = c.try_allocate(&ha, 32, 32).unwrap();
        assert_eq!(a.cached_blocks(), 2);
        c.release(a);
        // C needs 2 blocks: B's two are evicted, A survives.
        let cc = c.try_allocate(&hc, 32, 32).unwrap();
        assert_eq!(c.lookup(&ha), 2);
        assert_eq!(c.lookup(&hb), 0);
        assert_eq!(c.stats().evictions, 2);
        c.release(cc);
    }

    #[test]
    fn tail_blocks_are_evicted_before_head_blocks() {
        let mut c = PrefixCache::new(16, 4);
        let seed = chain_seed("m");
        let ha = block_hashes(seed, &prompt(&['a', 'b', 'c']), 16);
        let a = c.try_allocate(&ha, 48, 48).unwrap();
        c.release(a);
        // Needs 2 new blocks; one is free, so one eviction: A's tail ('c' block).
        let hx = block_hashes(seed, &prompt(&['x', 'y']), 16);
        let x = c.try_allocate(&hx, 32, 32).unwrap();
        assert_eq!(c.lookup(&ha), 2);
        c.release(x);
    }

    #[test]
    fn held_blocks_are_never_evicted_and_full_cache_refuses() {
        let mut c = PrefixCache::new(16, 4);
        let seed = chain_seed("m");
        let ha = block_hashes(seed, &prompt(&['a', 'a', 'a']), 16);
        let a = c.try_allocate(&ha, 48, 48).unwrap();
        let hb = block_hashes(seed, &prompt(&['b', 'b']), 16);
        let err = c.try_allocate(&hb, 32, 32).unwrap_err();
        assert_eq!(
            err,
            CacheError::Full {
                needed: 2,
                available: 1
            }
        );
        // Refusal changed nothing.
        assert_eq!(c.stats().query_tokens, 48);
        assert_eq!(c.lookup(&ha), 3);
        c.release(a);
        let b = c.try_allocate(&hb, 32, 32).unwrap();
        // One free + one evicted (A's tail).
        assert_eq!(c.lookup(&ha), 2);
        c.release(b);
    }

    #[test]
    fn reused_evictable_blocks_do_not_count_as_room() {
        let mut c = PrefixCache::new(16, 4);
        let seed = chain_seed("m");
        let ha = block_hashes(seed, &prompt(&['a', 'b']), 16);
        let a = c.try_allocate(&ha, 32, 32).unwrap();
        c.release(a);
        // Another request holds one block: 1 free, A's 2 blocks evictable.
        let other = c.try_allocate(&[], 4, 4).unwrap();
        // Re-uses both cached blocks and needs 2 private ones: only 1 can be found.
        let err = c.try_allocate(&ha, 32, 64).unwrap_err();
        assert_eq!(
            err,
            CacheError::Full {
                needed: 2,
                available: 1
            }
        );
        // With 1 private block it fits exactly.
        let a = c.try_allocate(&ha, 32, 48).unwrap();
        assert_eq!(a.cached_blocks(), 2);
        assert_eq!(c.usage(), 1.0);
        c.release(a);
        c.release(other);
        assert_eq!(c.usage(), 0.0);
    }

    #[test]
    fn the_change_log_records_stores_evictions_and_reset() {
        let mut c = PrefixCache::new(16, 3).with_change_log();
        let seed = chain_seed("m");
        let ha = block_hashes(seed, &prompt(&['a', 'b']), 16);
        let a = c.try_allocate(&ha, 32, 32).unwrap();
        assert_eq!(
            c.take_changes(),
            [
                CacheChange::Stored { index: 0 },
                CacheChange::Stored { index: 1 }
            ]
        );
        assert_eq!(c.reset(), Err(2));
        c.release(a);
        // Shares 'a', needs 'x' and one private block: 1 free, so A's tail 'b' goes.
        let hx = block_hashes(seed, &prompt(&['a', 'x']), 16);
        let x = c.try_allocate(&hx, 32, 48).unwrap();
        assert_eq!(
            c.take_changes(),
            [
                CacheChange::Removed(ha[1]),
                CacheChange::Stored { index: 1 }
            ]
        );
        assert!(c.take_changes().is_empty());
        c.release(x);
        assert_eq!(c.reset(), Ok(()));
        assert_eq!(c.lookup(&hx), 0);
        assert_eq!(c.stats().cached_blocks, 0);
    }

    #[test]
    fn held_blocks_outlive_their_request_and_keep_their_ids() {
        let mut c = PrefixCache::new(16, 4);
        let seed = chain_seed("m");
        let ha = block_hashes(seed, &prompt(&['a', 'b']), 16);
        let a = c.try_allocate(&ha, 32, 48).unwrap();
        let (held, ids) = c.hold(&ha).unwrap();
        assert_eq!(ids, vec![0, 1]);
        c.release(a);
        // The private block is free, the two prompt blocks stay held.
        assert!((c.usage() - 0.5).abs() < 1e-12);
        assert_eq!(c.stats().evictable_blocks, 0);
        // Two other blocks fit, a third would need A's held blocks: refused.
        let hb = block_hashes(seed, &prompt(&['x', 'y', 'z']), 16);
        assert_eq!(
            c.try_allocate(&hb, 48, 48).unwrap_err(),
            CacheError::Full {
                needed: 3,
                available: 2
            }
        );
        assert!(c.hold(&hb).is_none());
        c.release(held);
        assert_eq!(c.usage(), 0.0);
        // Now A's blocks are evictable; an evicted block's id is reused.
        let b = c.try_allocate(&hb, 48, 48).unwrap();
        let (hb_held, hb_ids) = c.hold(&hb).unwrap();
        let mut sorted = hb_ids.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![1, 2, 3]);
        c.release(b);
        c.release(hb_held);
    }

    #[test]
    fn too_large_is_distinguished() {
        let mut c = PrefixCache::new(16, 2);
        assert_eq!(
            c.try_allocate(&[], 10, 33).unwrap_err(),
            CacheError::TooLarge {
                needed: 3,
                capacity: 2
            }
        );
    }
}
