//! Precise-index memory per request key, measured with a counting allocator, and the key bound.
//!
//!     cargo bench -p epp-core --bench precise_memory
//!
//! Eight endpoints store distinct 128-block runs (16-token blocks, the engine's block size equal
//! to the index's, one holder per key) until the index is 10× past its bound; reports heap bytes
//! per held key (the key's map and ring slots, its holder, the endpoint's engine-block mapping).
//! Fails if the bound is exceeded or a key costs more than `BYTES_PER_KEY`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use epp_core::kvevents::{BlockStored, EventBatch, KvEvent};
use epp_core::precise::{HashAlgorithm, IndexConfig, PreciseIndex, TokenProcessor, BYTES_PER_KEY};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn main() {
    let cap = 400_000usize;
    let run = 128usize;
    let before = LIVE.load(Ordering::Relaxed);
    let idx = PreciseIndex::new(
        TokenProcessor::new(16, "", HashAlgorithm::CborFnv),
        IndexConfig {
            max_keys: cap,
            ..Default::default()
        },
    );
    let base = LIVE.load(Ordering::Relaxed);
    let mut peak_keys = 0usize;
    let runs = cap * 10 / run;
    let mut tokens = vec![0u32; run * 16];
    let mut measured = None;
    for r in 0..runs {
        for (i, t) in tokens.iter_mut().enumerate() {
            *t = (r * 7919 + i) as u32;
        }
        let hashes: Vec<u64> = (0..run as u64).map(|j| ((r as u64) << 20) | j).collect();
        idx.apply(
            r % 8,
            "m",
            &EventBatch {
                ts: 0.0,
                events: vec![KvEvent::BlockStored(BlockStored::new(
                    hashes,
                    None,
                    tokens.clone(),
                    16,
                ))],
                data_parallel_rank: None,
            },
        );
        peak_keys = peak_keys.max(idx.len());
        assert!(idx.len() <= cap, "bound exceeded: {} > {cap}", idx.len());
        if measured.is_none() && idx.len() + run > cap {
            // Full for the first time: the cost of what is held, before any eviction.
            measured = Some((LIVE.load(Ordering::Relaxed) - base, idx.len()));
        }
    }
    let (bytes, keys) = measured.expect("the index filled");
    let per_key = bytes as f64 / keys as f64;
    let after = LIVE.load(Ordering::Relaxed);
    println!(
        "precise index: {keys} keys held when full ({:.1} MiB heap) = {per_key:.1} bytes/key; after 10x overfill: {} keys, {} engine mappings, {:.1} MiB = {:.1} bytes/key, {} evictions, peak {peak_keys} keys (fixed overhead {} bytes)",
        bytes as f64 / 1048576.0,
        idx.len(),
        idx.engine_entries(),
        (after - base) as f64 / 1048576.0,
        (after - base) as f64 / idx.len() as f64,
        idx.capacity_evictions(),
        base - before,
    );
    assert!(
        per_key <= BYTES_PER_KEY as f64,
        "{per_key:.1} bytes per key exceeds BYTES_PER_KEY = {BYTES_PER_KEY}"
    );
    let over = (after - base) as f64 / idx.len() as f64;
    assert!(
        over <= BYTES_PER_KEY as f64,
        "after overfill {over:.1} bytes per key exceeds BYTES_PER_KEY = {BYTES_PER_KEY}"
    );
}
