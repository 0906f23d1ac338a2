//! The precise prefix index's hot paths: ingesting engine events (keys recomputed from the
//! events' token ids, parent linking, the engine-block mappings), looking a 128-block prompt up
//! among 64 endpoints, and keying a prompt's token ids.
//!
//!     cargo bench -p epp-core --bench precise
//!
//! Targets: ingestion ≥ 1M blocks/s on one core; lookup of a 128-block prompt ≤ 5 µs.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use epp_core::kvevents::{BlockRemoved, BlockStored, EventBatch, KvEvent};
use epp_core::precise::{HashAlgorithm, IndexConfig, PreciseIndex, TokenProcessor};

const BS: usize = 16;
/// Blocks per stored run: one prefill of a 2048-token prompt.
const RUN: usize = 128;

fn tokens(seed: u64, n: usize) -> Vec<u32> {
    // Vocabulary-sized ids (up to 128k, as Llama 3's): CBOR spends 3 or 5 bytes on each.
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 128_000) as u32
        })
        .collect()
}

fn batch(events: Vec<KvEvent>) -> EventBatch {
    EventBatch {
        ts: 0.0,
        events,
        data_parallel_rank: Some(0),
    }
}

fn index(alg: HashAlgorithm) -> PreciseIndex {
    PreciseIndex::new(
        TokenProcessor::new(BS as u32, "", alg),
        IndexConfig::default(),
    )
}

fn stored_run(r: u64) -> KvEvent {
    let hashes: Vec<u64> = (0..RUN as u64).map(|j| (r << 20) | (j + 1)).collect();
    KvEvent::BlockStored(BlockStored::new(
        hashes,
        None,
        tokens(r, RUN * BS),
        BS as u32,
    ))
}

fn ingest(c: &mut Criterion) {
    let mut g = c.benchmark_group("precise_ingest");
    g.throughput(Throughput::Elements(RUN as u64));
    for alg in [HashAlgorithm::CborFnv, HashAlgorithm::Xxh64] {
        // A full index (1M keys, CLOCK evicting): every run stored is new, as in a busy pool.
        let idx = PreciseIndex::new(
            TokenProcessor::new(BS as u32, "", alg),
            IndexConfig {
                max_keys: 1_000_000,
                ..Default::default()
            },
        );
        let mut r = 0u64;
        while idx.len() + RUN < 1_000_000 {
            r += 1;
            idx.apply((r % 64) as usize, "m", &batch(vec![stored_run(r)]));
        }
        g.bench_function(format!("store_{RUN}_blocks_{}", alg.as_str()), |b| {
            b.iter_batched(
                || {
                    r += 1;
                    ((r % 64) as usize, batch(vec![stored_run(r)]))
                },
                |(slot, ev)| std::hint::black_box(idx.apply(slot, "m", &ev).admitted),
                criterion::BatchSize::SmallInput,
            )
        });
        // Store then remove (the engine evicting what it stored): both directions.
        let pairs: Vec<(EventBatch, EventBatch)> = (0..256u64)
            .map(|k| {
                let st = stored_run(1 << 40 | k);
                let KvEvent::BlockStored(s) = &st else {
                    unreachable!()
                };
                let rm = KvEvent::BlockRemoved(BlockRemoved {
                    block_hashes: s.block_hashes.clone(),
                    medium: None,
                    group_idx: None,
                });
                (batch(vec![st]), batch(vec![rm]))
            })
            .collect();
        let mut i = 0usize;
        g.bench_function(
            format!("store_and_remove_{RUN}_blocks_{}", alg.as_str()),
            |b| {
                b.iter(|| {
                    i = (i + 1) % pairs.len();
                    let a = idx.apply(3, "m", &pairs[i].0);
                    idx.apply(3, "m", &pairs[i].1);
                    std::hint::black_box(a.admitted)
                })
            },
        );
    }
    g.finish();
}

fn lookup(c: &mut Criterion) {
    let idx = index(HashAlgorithm::CborFnv);
    let tp = idx.token_processor().clone();
    let prompt = tokens(7, RUN * BS);
    let keys = tp.block_keys(None, &prompt, "m", None).unwrap();
    // 64 endpoints: each holds a prefix of the prompt of its own length, plus filler runs.
    for slot in 0..64usize {
        let n = ((slot + 1) * 2).min(RUN);
        let hashes: Vec<u64> = (0..n as u64).map(|j| ((slot as u64) << 40) | j).collect();
        idx.apply(
            slot,
            "m",
            &batch(vec![KvEvent::BlockStored(BlockStored::new(
                hashes,
                None,
                prompt[..n * BS].to_vec(),
                BS as u32,
            ))]),
        );
        for r in 0..64u64 {
            let hashes: Vec<u64> = (0..RUN as u64)
                .map(|j| (1 << 62) | ((slot as u64) << 30) | (r << 16) | j)
                .collect();
            idx.apply(
                slot,
                "m",
                &batch(vec![KvEvent::BlockStored(BlockStored::new(
                    hashes,
                    None,
                    tokens((slot as u64) << 20 | r, RUN * BS),
                    BS as u32,
                ))]),
            );
        }
    }
    let (m, best) = idx.lookup(&keys);
    assert_eq!((m.matched(63), best), (RUN as u32, RUN as u32));
    let mut g = c.benchmark_group("precise_lookup");
    g.bench_function("lookup_128_blocks_64_endpoints", |b| {
        b.iter(|| std::hint::black_box(idx.lookup(std::hint::black_box(&keys))))
    });
    for alg in [HashAlgorithm::CborFnv, HashAlgorithm::Xxh64] {
        let tp = TokenProcessor::new(BS as u32, "", alg);
        g.bench_function(format!("keys_2048_tokens_{}", alg.as_str()), |b| {
            b.iter(|| std::hint::black_box(tp.block_keys(None, &prompt, "m", None)))
        });
    }
    g.finish();
}

criterion_group!(benches, ingest, lookup);
criterion_main!(benches);
