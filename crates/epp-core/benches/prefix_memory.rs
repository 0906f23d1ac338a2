//! Prefix-index memory per block, measured with a counting allocator, and the capacity bound.
//!
//!     cargo bench -p epp-core --bench prefix_memory
//!
//! Inserts distinct prompts into 8 endpoints until each holds its full capacity, then reports
//! heap bytes per held (endpoint, block) pair. Fails if capacity is exceeded or the cost per
//! block is above 100 bytes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use epp_core::prefix::{PrefixConfig, PrefixIndex};

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
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing we need.
    let cap = 31_250usize;
    let endpoints = 8usize;
    let before = LIVE.load(Ordering::Relaxed);
    let idx = PrefixIndex::new(PrefixConfig {
        block_size: 64,
        max_blocks: 256,
        capacity_per_endpoint: cap,
    });
    let base = LIVE.load(Ordering::Relaxed);
    let mut text = vec![0u8; 64 * 128];
    let mut n = 0u64;
    // Fill past capacity (1.5x) so eviction runs and the bound is exercised.
    let rounds = cap * 3 / 2 / 128 + 1;
    for ep in 0..endpoints {
        for r in 0..rounds {
            n += 1;
            text[..8].copy_from_slice(&n.to_le_bytes());
            let h = idx.hash("m", &text);
            idx.insert(ep, &h);
            let _ = r;
        }
        assert!(
            idx.slot_len(ep) <= cap,
            "capacity exceeded: {} > {cap}",
            idx.slot_len(ep)
        );
    }
    let after = LIVE.load(Ordering::Relaxed);
    let blocks = idx.len();
    assert_eq!(blocks, cap * endpoints, "every endpoint full to capacity");
    let per_block = (after - base) as f64 / blocks as f64;
    println!(
        "prefix index: {blocks} blocks held ({endpoints} endpoints x {cap}), {:.1} MiB heap, {per_block:.1} bytes/block (fixed overhead {} bytes), {} evictions",
        (after - base) as f64 / 1048576.0,
        base - before,
        idx.evictions()
    );
    assert!(
        per_block <= 100.0,
        "{per_block:.1} bytes per block exceeds the 100-byte target"
    );
}
