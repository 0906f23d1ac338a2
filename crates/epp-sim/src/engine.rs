//! The serving engine: admission (sequence slots, KV blocks, LoRA slots), the FIFO waiting queue,
//! and the timed run of a request (prefill, then one token per inter-token latency).
//!
//! Admission follows vLLM's FCFS scheduler: requests are considered in arrival order; the scan
//! stops at the first request that does not fit (no free sequence slot or not enough KV blocks),
//! but a request that only waits for a LoRA slot is skipped so later requests can run. Admission is
//! re-tried whenever a request finishes, is aborted, or leaves the queue.
//!
//! A request's resources are held by an RAII [`Running`] guard, so a client that disconnects at
//! any point (queued, prefilling or decoding) frees everything at once.
//!
//! P/D (see [`crate::pd`]): a prefill-phase run emits one token and then *holds* its prompt
//! blocks in the cache under its request id, until a decoder releases them
//! ([`Engine::release_hold`]) or the transfer timeout passes; at most `max_held` prefills hold
//! blocks (each reserves its place when accepted, [`Engine::reserve_hold`]). A decode-phase run
//! asks the prefill server for the prompt blocks it lacks after admission, pays the transfer
//! cost instead of computing them, and computes only the rest (the partial last block), or the
//! whole uncached prompt when the transfer is not possible.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use epp_core::kvevents::{BlockRemoved, BlockStored, KvEvent};

use crate::cache::{Allocation, CacheChange, CacheError, PrefixCache};
use crate::config::SimConfig;
use crate::kv_events::KvEventSink;
use crate::latency::LatencyModel;
use crate::metrics::{self, Counters, GaugeSnapshot};
use crate::pd::{Fallback, Releaser, RemotePrefill};

/// What the engine needs to know about a request.
#[derive(Debug, Clone)]
pub struct Job {
    /// Chained hashes of the prompt's full blocks.
    pub hashes: Vec<u64>,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    /// Token ids of the prompt's full blocks (`hashes.len() * block_size` of them) when KV events
    /// are published; empty otherwise.
    pub token_ids: Vec<u32>,
    /// LoRA adapter to load, if the request names one.
    pub lora: Option<String>,
    /// When the request arrived (start of TTFT and e2e latency).
    pub arrived: Instant,
}

/// Token accounting of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

/// Progress of a request, sent to the HTTP layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The `i`-th output token (0-based) is ready.
    Token(usize),
    /// A P/D prefill holds these blocks (their ids) for a decoder; sent just before `Done`.
    Held(Vec<u32>),
    /// The request finished; its resources are already released.
    Done(Usage),
}

/// What a run does besides computing and decoding here (see [`crate::pd::Phase`]).
pub enum RunPhase {
    Whole,
    /// One token, then hold the prompt blocks under `request_id` (its place reserved by `ticket`).
    Prefill {
        request_id: String,
        ticket: HoldTicket,
    },
    /// Take the prompt blocks from a prefill server; `Err(field)`: a field was missing.
    Decode(Result<RemotePrefill, &'static str>),
}

/// A prefill's place among the `max_held` holders, taken when it is accepted; dropping it (the
/// prefill failed or was aborted) gives the place back.
pub struct HoldTicket {
    engine: Arc<Engine>,
    armed: bool,
}

impl Drop for HoldTicket {
    fn drop(&mut self) {
        if self.armed {
            self.engine.state.lock().reserved_holds -= 1;
        }
    }
}

/// Blocks a finished prefill keeps for its decoder.
struct Held {
    alloc: Allocation,
    blocks: usize,
    expiry: tokio::task::AbortHandle,
}

/// Why [`Engine::release_hold`] released nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    #[error("no KV blocks are held for request {0:?} (never, already released, or expired)")]
    UnknownRequest(String),
    #[error("engine id {asked:?} is not this engine's ({ours:?})")]
    EngineMismatch { asked: String, ours: String },
}

/// The prefill holds are full: `max_held` prefills hold blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{max_held} prefills already hold KV blocks for transfer (--kv-transfer-max-held)")]
pub struct HoldsFull {
    pub max_held: usize,
}

/// A point-in-time view of the engine, for tests and tools.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineSnapshot {
    pub running: usize,
    pub waiting: usize,
    pub kv_usage: f64,
    pub prefix_cache_hit_tokens: u64,
    pub prefix_cache_query_tokens: u64,
    pub running_loras: Vec<String>,
    pub waiting_loras: Vec<String>,
}

struct Waiter {
    id: u64,
    job: Arc<Job>,
    tx: oneshot::Sender<Running>,
}

struct State {
    cache: PrefixCache,
    running: usize,
    running_loras: BTreeMap<String, usize>,
    waiting: VecDeque<Waiter>,
    next_id: u64,
    /// P/D prefills holding blocks, by request id (at most `max_held`, with the reservations).
    holds: HashMap<String, Held>,
    reserved_holds: usize,
}

/// One server's engine.
pub struct Engine {
    model: String,
    max_num_seqs: usize,
    max_loras: usize,
    latency: LatencyModel,
    state: Mutex<State>,
    rng: Mutex<SmallRng>,
    pub(crate) counters: Counters,
    kv: Option<KvEvents>,
    block_size: usize,
    /// The `engine` metric label: the data-parallel rank.
    rank: usize,
    /// `remote_engine_id` of this engine's prefill answers.
    engine_id: String,
    transfer_ms_per_block: f64,
    transfer_timeout: Duration,
    max_held: usize,
    releaser: Releaser,
    /// Running P/D prefills: they never decode, so they add no decode contention.
    running_prefills: AtomicUsize,
    /// `--prefill-interference-tokens` (0: off); see [`SimConfig::prefill_interference_tokens`].
    interference_tokens: usize,
    /// Uncached prompt tokens of the requests computing their prefill right now.
    computing_prefill_tokens: AtomicUsize,
}

/// What the engine needs to turn cache changes into KV events.
struct KvEvents {
    sink: KvEventSink,
    block_size: u32,
    /// Adapter names in `--lora-modules` order; an adapter's `lora_id` is its position + 1.
    lora_names: Vec<String>,
}

/// vLLM's name for the GPU block pool tier.
const MEDIUM_GPU: &str = "GPU";

/// Resources held by an admitted request; dropping it releases them and admits waiters.
pub struct Running {
    engine: Arc<Engine>,
    alloc: Option<Allocation>,
    lora: Option<String>,
    cached_tokens: usize,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(alloc) = self.alloc.take() {
            self.engine.release(alloc, self.lora.take());
        }
    }
}

/// Removes a request from the queue if its owner gives up before admission.
struct QueueTicket<'a> {
    engine: &'a Arc<Engine>,
    id: u64,
    armed: bool,
}

impl Drop for QueueTicket<'_> {
    fn drop(&mut self) {
        if self.armed {
            let removed = {
                let mut st = self.engine.state.lock();
                let before = st.waiting.len();
                st.waiting.retain(|w| w.id != self.id);
                st.waiting.len() != before
            };
            if removed {
                self.engine.counters.aborted.fetch_add(1, Ordering::Relaxed);
                self.engine.schedule();
            }
        }
    }
}

impl Engine {
    pub fn new(cfg: &SimConfig) -> Arc<Self> {
        Self::with_kv_events(cfg, None)
    }

    /// An engine that reports what enters and leaves its cache to `sink`.
    pub(crate) fn with_kv_events(cfg: &SimConfig, sink: Option<KvEventSink>) -> Arc<Self> {
        let mut cache = PrefixCache::new(cfg.block_size, cfg.num_gpu_blocks);
        if sink.is_some() {
            cache = cache.with_change_log();
        }
        let kv = sink.map(|sink| KvEvents {
            sink,
            block_size: u32::try_from(cfg.block_size).unwrap_or(u32::MAX),
            lora_names: cfg.lora_names(),
        });
        Arc::new(Self {
            model: cfg.model.clone(),
            max_num_seqs: cfg.max_num_seqs,
            max_loras: cfg.max_loras,
            latency: cfg.latency,
            kv,
            state: Mutex::new(State {
                cache,
                running: 0,
                running_loras: BTreeMap::new(),
                waiting: VecDeque::new(),
                next_id: 0,
                holds: HashMap::new(),
                reserved_holds: 0,
            }),
            rng: Mutex::new(SmallRng::seed_from_u64(cfg.seed)),
            counters: Counters::default(),
            block_size: cfg.block_size.max(1),
            rank: cfg.data_parallel_rank,
            engine_id: cfg.engine_id(),
            transfer_ms_per_block: cfg.kv_transfer.ms_per_block,
            transfer_timeout: cfg.kv_transfer.timeout,
            max_held: cfg.kv_transfer.max_held,
            releaser: Releaser::new(),
            running_prefills: AtomicUsize::new(0),
            interference_tokens: cfg.prefill_interference_tokens,
            computing_prefill_tokens: AtomicUsize::new(0),
        })
    }

    /// This engine's `remote_engine_id`.
    pub fn engine_id(&self) -> &str {
        &self.engine_id
    }

    /// Reserve a place for a prefill's held blocks, or refuse when `max_held` are taken.
    pub fn reserve_hold(self: &Arc<Self>) -> Result<HoldTicket, HoldsFull> {
        let mut st = self.state.lock();
        if st.holds.len() + st.reserved_holds >= self.max_held {
            self.counters
                .pd
                .hold_refused
                .fetch_add(1, Ordering::Relaxed);
            return Err(HoldsFull {
                max_held: self.max_held,
            });
        }
        st.reserved_holds += 1;
        Ok(HoldTicket {
            engine: self.clone(),
            armed: true,
        })
    }

    /// Keep `hashes` (a finished prefill's prompt blocks, still held by its run) under
    /// `request_id` until released or expired; their block ids.
    fn hold(
        self: &Arc<Self>,
        mut ticket: HoldTicket,
        request_id: String,
        hashes: &[u64],
    ) -> Vec<u32> {
        let weak: Weak<Engine> = Arc::downgrade(self);
        let timeout = self.transfer_timeout;
        let mut st = self.state.lock();
        st.reserved_holds -= 1;
        ticket.armed = false;
        // The run still holds every prompt block, so they are all cached.
        let Some((alloc, ids)) = st.cache.hold(hashes) else {
            return Vec::new();
        };
        let id = request_id.clone();
        let expiry = tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if let Some(engine) = weak.upgrade() {
                engine.expire_hold(&id);
            }
        })
        .abort_handle();
        let held = Held {
            alloc,
            blocks: ids.len(),
            expiry,
        };
        if let Some(old) = st.holds.insert(request_id, held) {
            // Request ids are unique per engine; should one repeat, the older hold goes.
            old.expiry.abort();
            st.cache.release(old.alloc);
        }
        self.counters.pd.prefills.fetch_add(1, Ordering::Relaxed);
        ids
    }

    /// A decoder read the blocks held for `request_id`: release them; the number released.
    /// `engine_id`, when given, must be this engine's.
    pub fn release_hold(
        self: &Arc<Self>,
        request_id: &str,
        engine_id: Option<&str>,
    ) -> Result<usize, ReleaseError> {
        if let Some(asked) = engine_id.filter(|e| *e != self.engine_id) {
            return Err(ReleaseError::EngineMismatch {
                asked: asked.to_string(),
                ours: self.engine_id.clone(),
            });
        }
        let held = {
            let mut st = self.state.lock();
            let held = st
                .holds
                .remove(request_id)
                .ok_or_else(|| ReleaseError::UnknownRequest(request_id.to_string()))?;
            st.cache.release(held.alloc);
            held.blocks
        };
        self.counters
            .pd
            .released_read
            .fetch_add(1, Ordering::Relaxed);
        self.schedule();
        Ok(held)
    }

    fn expire_hold(self: &Arc<Self>, request_id: &str) {
        let blocks = {
            let mut st = self.state.lock();
            let Some(held) = st.holds.remove(request_id) else {
                return;
            };
            st.cache.release(held.alloc);
            held.blocks
        };
        self.counters
            .pd
            .released_expired
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            request_id,
            blocks,
            "no decoder read the prefill's KV blocks in time: released"
        );
        self.schedule();
    }

    /// Whether a request of this size could ever run (else it is rejected up front).
    pub fn check_fits(&self, prompt_tokens: usize, max_tokens: usize) -> Result<(), CacheError> {
        let st = self.state.lock();
        let needed = st.cache.blocks_for(prompt_tokens + max_tokens);
        if needed > st.cache.capacity() {
            return Err(CacheError::TooLarge {
                needed,
                capacity: st.cache.capacity(),
            });
        }
        Ok(())
    }

    /// A uniform draw in [0, 1) from the server's seeded RNG.
    pub fn random(&self) -> f64 {
        self.rng.lock().random::<f64>()
    }

    /// Wait in the FIFO queue until the request is admitted.
    pub async fn admit(self: &Arc<Self>, job: Arc<Job>) -> Running {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut st = self.state.lock();
            st.next_id += 1;
            let id = st.next_id;
            st.waiting.push_back(Waiter { id, job, tx });
            id
        };
        let mut ticket = QueueTicket {
            engine: self,
            id,
            armed: true,
        };
        self.schedule();
        // The sender is only dropped after a send (or when the ticket removed the waiter, which
        // cannot happen while we are here), so this always yields.
        let running = rx.await.expect("admission sender dropped while waiting");
        ticket.armed = false;
        running
    }

    /// Admit as many waiting requests as fit, in FIFO order.
    fn schedule(self: &Arc<Self>) {
        let mut admitted = Vec::new();
        let mut events = Vec::new();
        {
            let mut guard = self.state.lock();
            let st = &mut *guard;
            let mut i = 0;
            while i < st.waiting.len() && st.running < self.max_num_seqs {
                let job = st.waiting[i].job.clone();
                if let Some(l) = &job.lora {
                    if !st.running_loras.contains_key(l) && st.running_loras.len() >= self.max_loras
                    {
                        i += 1;
                        continue;
                    }
                }
                match st.cache.try_allocate(
                    &job.hashes,
                    job.prompt_tokens,
                    job.prompt_tokens + job.max_tokens,
                ) {
                    Ok(alloc) => {
                        if let Some(kv) = &self.kv {
                            kv.events_for(&st.cache.take_changes(), &job, &mut events);
                        }
                        let w = st.waiting.remove(i).expect("index in range");
                        st.running += 1;
                        if let Some(l) = &job.lora {
                            *st.running_loras.entry(l.clone()).or_insert(0) += 1;
                        }
                        let cached_tokens = alloc.cached_blocks() * st.cache.block_size();
                        admitted.push((
                            w.tx,
                            Running {
                                engine: self.clone(),
                                alloc: Some(alloc),
                                lora: job.lora.clone(),
                                cached_tokens,
                            },
                        ));
                    }
                    // Head-of-line: later requests wait behind this one.
                    Err(_) => break,
                }
            }
        }
        if let Some(kv) = &self.kv {
            kv.sink.publish(events);
        }
        for (tx, running) in admitted {
            // If the waiter is gone, `running` comes back and is dropped here, outside the lock.
            let _ = tx.send(running);
        }
    }

    /// Drops every cached block (vLLM's `POST /reset_prefix_cache`) and reports
    /// `AllBlocksCleared`; refused, with the number of blocks in use, while requests run.
    pub fn reset_prefix_cache(&self) -> Result<(), usize> {
        self.state.lock().cache.reset()?;
        if let Some(kv) = &self.kv {
            kv.sink.publish(vec![KvEvent::AllBlocksCleared]);
        }
        Ok(())
    }

    fn release(self: &Arc<Self>, alloc: Allocation, lora: Option<String>) {
        {
            let mut st = self.state.lock();
            st.cache.release(alloc);
            st.running -= 1;
            if let Some(l) = lora {
                if let Some(n) = st.running_loras.get_mut(&l) {
                    *n -= 1;
                    if *n == 0 {
                        st.running_loras.remove(&l);
                    }
                }
            }
        }
        self.schedule();
    }

    /// Running sequences that decode (P/D prefills excluded): the decode contention.
    fn running_count(&self) -> usize {
        self.state
            .lock()
            .running
            .saturating_sub(self.running_prefills.load(Ordering::Relaxed))
    }

    /// What running prefills add to an inter-token gap starting now, in ms: up to
    /// `interference_tokens` of their uncached tokens, at the prefill cost per token (0 when off).
    fn interference_ms(&self) -> f64 {
        if self.interference_tokens == 0 {
            return 0.0;
        }
        let computing = self.computing_prefill_tokens.load(Ordering::Relaxed);
        computing.min(self.interference_tokens) as f64 * self.latency.prefill_per_token_ms
    }

    /// Run a request to completion, sending its events on `tx`. Stops (and releases everything)
    /// as soon as the receiver is dropped.
    pub async fn run(self: Arc<Self>, job: Job, tx: mpsc::Sender<Event>) {
        self.run_phase(job, RunPhase::Whole, tx).await
    }

    /// [`Engine::run`] for one P/D phase.
    pub async fn run_phase(self: Arc<Self>, job: Job, phase: RunPhase, tx: mpsc::Sender<Event>) {
        let aborted = |engine: &Engine, emitted: usize| {
            engine.counters.aborted.fetch_add(1, Ordering::Relaxed);
            engine
                .counters
                .generation_tokens
                .fetch_add(emitted as u64, Ordering::Relaxed);
        };
        let job = Arc::new(job);
        let running = tokio::select! {
            r = self.admit(job.clone()) => r,
            _ = tx.closed() => return,
        };
        let _prefilling = matches!(phase, RunPhase::Prefill { .. }).then(|| {
            self.running_prefills.fetch_add(1, Ordering::Relaxed);
            PrefillGuard(&self.running_prefills)
        });
        let local_blocks = running.cached_tokens / self.block_size;
        let mut transferred = 0usize;
        if let RunPhase::Decode(remote) = &phase {
            let outcome = match remote {
                Err(field) => Err((Fallback::IncompleteParams, *field)),
                Ok(r) => {
                    let read = tokio::select! {
                        read = self.releaser.release(r) => read,
                        _ = tx.closed() => {
                            aborted(&self, 0);
                            return;
                        }
                    };
                    read.map(|held| (r, held)).map_err(|f| (f, r.host.as_str()))
                }
            };
            match outcome {
                Ok((r, held)) => {
                    transferred = job
                        .hashes
                        .len()
                        .min(r.blocks)
                        .min(held)
                        .saturating_sub(local_blocks);
                    self.counters
                        .pd
                        .transferred_blocks
                        .fetch_add(transferred as u64, Ordering::Relaxed);
                }
                Err((reason, detail)) => {
                    self.counters.pd.fallbacks[reason.index()].fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        reason = reason.as_str(),
                        detail,
                        "decode cannot read the prefill's KV blocks: recomputing the prompt"
                    );
                }
            }
        }
        let reused_tokens = ((local_blocks + transferred) * self.block_size).min(job.prompt_tokens);
        let computed = job.prompt_tokens - reused_tokens;
        let prefill = {
            let mut rng = self.rng.lock();
            self.latency.prefill(computed, &mut *rng)
                + self
                    .latency
                    .jittered_ms(transferred as f64 * self.transfer_ms_per_block, &mut *rng)
        };
        let mut deadline = Instant::now() + prefill;
        // Counted as a computing prefill until its first token (or until the run is dropped).
        let mut computing = (computed > 0).then(|| {
            self.computing_prefill_tokens
                .fetch_add(computed, Ordering::Relaxed);
            ComputingGuard(&self.computing_prefill_tokens, computed)
        });
        let mut emitted = 0usize;
        let mut last_token: Option<Instant> = None;
        for i in 0..job.max_tokens {
            if i > 0 {
                let running = self.running_count();
                let extra_ms = self.interference_ms();
                let mut rng = self.rng.lock();
                let itl = self.latency.inter_token(running, &mut *rng)
                    + self.latency.jittered_ms(extra_ms, &mut *rng);
                deadline += itl;
            }
            // A deadline already due is not slept on: tokio's timer rounds up to the next
            // millisecond, which would give a zero-latency simulator a 1 ms floor per token.
            if deadline > Instant::now() {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = tx.closed() => {
                        aborted(&self, emitted);
                        return;
                    }
                }
            }
            if i == 0 {
                drop(computing.take());
            }
            let now = Instant::now();
            if let Some(prev) = last_token.replace(now) {
                self.counters.observe_itl(now - prev);
            }
            if i == 0 {
                self.counters.observe_ttft(job.arrived.elapsed());
                self.counters
                    .prompt_tokens
                    .fetch_add(job.prompt_tokens as u64, Ordering::Relaxed);
                let local_hit = running.cached_tokens.min(job.prompt_tokens);
                let sources = &self.counters.prompt_by_source;
                sources[0].fetch_add(computed as u64, Ordering::Relaxed);
                sources[1].fetch_add(local_hit as u64, Ordering::Relaxed);
                sources[2].fetch_add((reused_tokens - local_hit) as u64, Ordering::Relaxed);
            }
            if tx.send(Event::Token(i)).await.is_err() {
                aborted(&self, emitted);
                return;
            }
            emitted += 1;
        }
        let usage = Usage {
            prompt_tokens: job.prompt_tokens,
            completion_tokens: emitted,
            cached_tokens: reused_tokens,
        };
        let held = match phase {
            RunPhase::Prefill { request_id, ticket } => {
                Some(self.hold(ticket, request_id, &job.hashes))
            }
            _ => None,
        };
        drop(running);
        if let Some(ids) = held {
            let _ = tx.send(Event::Held(ids)).await;
        }
        self.counters
            .generation_tokens
            .fetch_add(emitted as u64, Ordering::Relaxed);
        self.counters.success_length.fetch_add(1, Ordering::Relaxed);
        self.counters.observe_e2e(job.arrived.elapsed());
        let _ = tx.send(Event::Done(usage)).await;
    }

    /// Current state.
    pub fn snapshot(&self) -> EngineSnapshot {
        let st = self.state.lock();
        let stats = st.cache.stats();
        let (running_loras, waiting_loras) = lora_lists(&st);
        EngineSnapshot {
            running: st.running,
            waiting: st.waiting.len(),
            kv_usage: st.cache.usage(),
            prefix_cache_hit_tokens: stats.hit_tokens,
            prefix_cache_query_tokens: stats.query_tokens,
            running_loras,
            waiting_loras,
        }
    }

    /// The Prometheus exposition.
    pub fn render_metrics(&self) -> String {
        let g = {
            let st = self.state.lock();
            let stats = st.cache.stats();
            let (running_loras, waiting_loras) = lora_lists(&st);
            GaugeSnapshot {
                engine: self.rank,
                held_requests: st.holds.len(),
                held_blocks: st.holds.values().map(|h| h.blocks).sum(),
                running: st.running,
                waiting: st.waiting.len(),
                kv_usage: st.cache.usage(),
                block_size: st.cache.block_size(),
                num_gpu_blocks: st.cache.capacity(),
                hit_tokens: stats.hit_tokens,
                query_tokens: stats.query_tokens,
                running_loras,
                waiting_loras,
                max_loras: self.max_loras,
            }
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64();
        metrics::render(&self.model, &g, &self.counters, now)
    }
}

/// Takes a prefill's uncached tokens out of the computing total when its first token is out
/// or its run ends.
struct ComputingGuard<'a>(&'a AtomicUsize, usize);

impl Drop for ComputingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// Counts a running P/D prefill out of the decode contention when its run ends.
struct PrefillGuard<'a>(&'a AtomicUsize);

impl Drop for PrefillGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl KvEvents {
    /// One allocation's changes as vLLM reports them: the evicted blocks in one `BlockRemoved`,
    /// then each run of consecutive new blocks as a `BlockStored` chained to the block before it.
    fn events_for(&self, changes: &[CacheChange], job: &Job, out: &mut Vec<KvEvent>) {
        let removed: Vec<u64> = changes
            .iter()
            .filter_map(|c| match c {
                CacheChange::Removed(h) => Some(*h),
                CacheChange::Stored { .. } => None,
            })
            .collect();
        if !removed.is_empty() {
            out.push(KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: removed,
                medium: Some(MEDIUM_GPU.into()),
                group_idx: None,
            }));
        }
        let mut stored = changes.iter().filter_map(|c| match c {
            CacheChange::Stored { index } => Some(*index),
            CacheChange::Removed(_) => None,
        });
        let Some(mut start) = stored.next() else {
            return;
        };
        let mut end = start + 1;
        for index in stored.chain(std::iter::once(usize::MAX)) {
            if index == end {
                end += 1;
                continue;
            }
            out.push(self.stored(job, start, end));
            start = index;
            end = index.saturating_add(1);
        }
    }

    fn stored(&self, job: &Job, start: usize, end: usize) -> KvEvent {
        let bs = self.block_size as usize;
        let tokens = job
            .token_ids
            .get(start * bs..(end * bs).min(job.token_ids.len()))
            .unwrap_or_default();
        let lora_id = job.lora.as_ref().and_then(|l| {
            self.lora_names
                .iter()
                .position(|n| n == l)
                .map(|p| p as i64 + 1)
        });
        KvEvent::BlockStored(BlockStored {
            lora_id,
            medium: Some(MEDIUM_GPU.into()),
            lora_name: job.lora.clone(),
            ..BlockStored::new(
                job.hashes[start..end].to_vec(),
                start.checked_sub(1).map(|p| job.hashes[p]),
                tokens.to_vec(),
                self.block_size,
            )
        })
    }
}

fn lora_lists(st: &State) -> (Vec<String>, Vec<String>) {
    let running: Vec<String> = st.running_loras.keys().cloned().collect();
    let waiting: BTreeSet<String> = st
        .waiting
        .iter()
        .filter_map(|w| w.job.lora.clone())
        .collect();
    (running, waiting.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SimConfig {
        SimConfig {
            max_num_seqs: 1,
            max_loras: 1,
            lora_modules: vec!["a".into(), "b".into()],
            latency: LatencyModel::zero(),
            ..Default::default()
        }
    }

    fn job(lora: Option<&str>) -> Arc<Job> {
        Arc::new(Job {
            hashes: vec![],
            token_ids: vec![],
            prompt_tokens: 4,
            max_tokens: 1,
            lora: lora.map(str::to_string),
            arrived: Instant::now(),
        })
    }

    #[tokio::test]
    async fn fifo_queue_and_release_admits_next() {
        let e = Engine::new(&cfg());
        let r1 = e.admit(job(None)).await;
        let e2 = e.clone();
        let waiter = tokio::spawn(async move { e2.admit(job(None)).await.cached_tokens });
        // Poll until the second request is queued.
        while e.snapshot().waiting != 1 {
            tokio::task::yield_now().await;
        }
        assert_eq!(e.snapshot().running, 1);
        drop(r1);
        assert_eq!(waiter.await.unwrap(), 0);
        let s = e.snapshot();
        assert_eq!((s.running, s.waiting), (0, 0));
    }

    #[tokio::test]
    async fn lora_waiter_is_skipped_not_blocking() {
        let mut c = cfg();
        c.max_num_seqs = 4;
        let e = Engine::new(&c);
        let ra = e.admit(job(Some("a"))).await;
        let e2 = e.clone();
        let b = tokio::spawn(async move { e2.admit(job(Some("b"))).await.lora.clone() });
        while e.snapshot().waiting != 1 {
            tokio::task::yield_now().await;
        }
        assert_eq!(e.snapshot().waiting_loras, vec!["b".to_string()]);
        // A base-model request behind it is admitted right away.
        let base = e.admit(job(None)).await;
        // Same adapter as the running one shares its slot.
        let ra2 = e.admit(job(Some("a"))).await;
        assert_eq!(e.snapshot().running, 3);
        assert_eq!(e.snapshot().running_loras, vec!["a".to_string()]);
        drop(ra);
        drop(ra2);
        assert_eq!(b.await.unwrap(), Some("b".to_string()));
        drop(base);
    }

    #[tokio::test]
    async fn dropped_waiter_leaves_the_queue() {
        let e = Engine::new(&cfg());
        let r1 = e.admit(job(None)).await;
        let e2 = e.clone();
        let waiter = tokio::spawn(async move {
            let _r = e2.admit(job(None)).await;
        });
        while e.snapshot().waiting != 1 {
            tokio::task::yield_now().await;
        }
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(e.snapshot().waiting, 0);
        drop(r1);
        assert_eq!(e.snapshot().running, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn run_emits_tokens_on_schedule() {
        let mut c = cfg();
        c.latency = LatencyModel {
            prefill_overhead_ms: 10.0,
            prefill_per_token_ms: 1.0,
            inter_token_ms: 5.0,
            inter_token_per_seq_ms: 0.0,
            jitter: 0.0,
        };
        let e = Engine::new(&c);
        let (tx, mut rx) = mpsc::channel(8);
        let start = Instant::now();
        let j = Job {
            hashes: vec![],
            token_ids: vec![],
            prompt_tokens: 20,
            max_tokens: 3,
            lora: None,
            arrived: start,
        };
        tokio::spawn(e.clone().run(j, tx));
        let mut times = vec![];
        while let Some(ev) = rx.recv().await {
            times.push((ev, start.elapsed()));
        }
        assert_eq!(
            times,
            vec![
                (Event::Token(0), Duration::from_millis(30)),
                (Event::Token(1), Duration::from_millis(35)),
                (Event::Token(2), Duration::from_millis(40)),
                (
                    Event::Done(Usage {
                        prompt_tokens: 20,
                        completion_tokens: 3,
                        cached_tokens: 0
                    }),
                    Duration::from_millis(40)
                ),
            ]
        );
        assert_eq!(e.counters.generation_tokens.load(Ordering::Relaxed), 3);
        assert_eq!(e.counters.prompt_tokens.load(Ordering::Relaxed), 20);
        assert_eq!(e.counters.success_length.load(Ordering::Relaxed), 1);
        // Three tokens, 5 ms apart: two inter-token gaps of 5 ms each.
        let itl = e.counters.itl.lock().clone();
        assert_eq!(itl.count(), 2);
        assert!((itl.sum() - 0.010).abs() < 1e-9, "{}", itl.sum());
        assert_eq!(e.snapshot().running, 0);
    }

    fn pd_cfg() -> SimConfig {
        let mut c = cfg();
        c.block_size = 4;
        c.num_gpu_blocks = 16;
        c.latency = LatencyModel {
            prefill_overhead_ms: 2.0,
            prefill_per_token_ms: 1.0,
            inter_token_ms: 5.0,
            inter_token_per_seq_ms: 0.0,
            jitter: 0.0,
        };
        c.kv_transfer.timeout = Duration::from_secs(10);
        c.kv_transfer.max_held = 1;
        c
    }

    fn pd_job(max_tokens: usize) -> Job {
        Job {
            hashes: vec![11, 22],
            token_ids: vec![],
            prompt_tokens: 9,
            max_tokens,
            lora: None,
            arrived: Instant::now(),
        }
    }

    async fn events(mut rx: mpsc::Receiver<Event>, start: Instant) -> Vec<(Event, Duration)> {
        let mut out = vec![];
        while let Some(ev) = rx.recv().await {
            out.push((ev, start.elapsed()));
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn a_prefill_emits_one_token_then_holds_its_blocks_until_they_expire() {
        let e = Engine::new(&pd_cfg());
        let ticket = e.reserve_hold().unwrap();
        assert_eq!(e.reserve_hold().err(), Some(HoldsFull { max_held: 1 }));
        let (tx, rx) = mpsc::channel(8);
        let start = Instant::now();
        let phase = RunPhase::Prefill {
            request_id: "r1".into(),
            ticket,
        };
        tokio::spawn(e.clone().run_phase(pd_job(1), phase, tx));
        // 2 + 9 × 1 ms of prefill, one token, the two blocks held.
        let at = Duration::from_millis(11);
        assert_eq!(
            events(rx, start).await,
            vec![
                (Event::Token(0), at),
                (Event::Held(vec![0, 1]), at),
                (
                    Event::Done(Usage {
                        prompt_tokens: 9,
                        completion_tokens: 1,
                        cached_tokens: 0
                    }),
                    at
                ),
            ]
        );
        assert_eq!(e.snapshot().running, 0);
        assert_eq!(e.snapshot().kv_usage, 2.0 / 16.0);
        assert_eq!(e.counters.pd.prefills.load(Ordering::Relaxed), 1);
        // The place stays taken while the blocks are held.
        assert!(e.reserve_hold().is_err());
        assert_eq!(e.counters.pd.hold_refused.load(Ordering::Relaxed), 2);
        tokio::time::sleep_until(start + at + Duration::from_secs(10) + Duration::from_millis(1))
            .await;
        assert!(e.state.lock().holds.is_empty());
        assert_eq!(e.snapshot().kv_usage, 0.0);
        assert_eq!(e.counters.pd.released_expired.load(Ordering::Relaxed), 1);
        assert_eq!(
            e.release_hold("r1", None),
            Err(ReleaseError::UnknownRequest("r1".into()))
        );
        drop(e.reserve_hold().unwrap());
        assert_eq!(e.state.lock().reserved_holds, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_hold_frees_its_blocks_and_checks_the_engine_id() {
        let e = Engine::new(&pd_cfg());
        let ticket = e.reserve_hold().unwrap();
        let (tx, rx) = mpsc::channel(8);
        let phase = RunPhase::Prefill {
            request_id: "r1".into(),
            ticket,
        };
        tokio::spawn(e.clone().run_phase(pd_job(1), phase, tx));
        events(rx, Instant::now()).await;
        assert_eq!(
            e.release_hold("r1", Some("other")),
            Err(ReleaseError::EngineMismatch {
                asked: "other".into(),
                ours: "sim-0".into()
            })
        );
        assert_eq!(e.release_hold("r1", Some("sim-0")), Ok(2));
        assert_eq!(e.snapshot().kv_usage, 0.0);
        assert_eq!(e.counters.pd.released_read.load(Ordering::Relaxed), 1);
        // Its expiry was cancelled with it.
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(e.counters.pd.released_expired.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_decode_with_incomplete_params_recomputes_and_counts_it() {
        let e = Engine::new(&pd_cfg());
        let (tx, rx) = mpsc::channel(8);
        let start = Instant::now();
        let phase = RunPhase::Decode(Err("kv_transfer_params.remote_host"));
        tokio::spawn(e.clone().run_phase(pd_job(2), phase, tx));
        let ev = events(rx, start).await;
        assert_eq!(ev[0], (Event::Token(0), Duration::from_millis(11)));
        assert_eq!(
            ev.last().unwrap().0,
            Event::Done(Usage {
                prompt_tokens: 9,
                completion_tokens: 2,
                cached_tokens: 0
            })
        );
        let f = &e.counters.pd.fallbacks;
        assert_eq!(
            f[Fallback::IncompleteParams.index()].load(Ordering::Relaxed),
            1
        );
        assert_eq!(f[Fallback::Unreachable.index()].load(Ordering::Relaxed), 0);
        assert_eq!(e.counters.prompt_by_source[0].load(Ordering::Relaxed), 9);
    }

    #[tokio::test(start_paused = true)]
    async fn running_prefills_add_no_decode_contention() {
        let mut c = pd_cfg();
        c.max_num_seqs = 4;
        c.num_gpu_blocks = 512;
        c.kv_transfer.max_held = 4;
        c.latency.inter_token_per_seq_ms = 100.0;
        let e = Engine::new(&c);
        // A long prefill (900 tokens: 902 ms) runs while a plain request decodes.
        let ticket = e.reserve_hold().unwrap();
        let (ptx, prx) = mpsc::channel(8);
        let long = Job {
            hashes: vec![],
            prompt_tokens: 900,
            ..pd_job(1)
        };
        let phase = RunPhase::Prefill {
            request_id: "p".into(),
            ticket,
        };
        tokio::spawn(e.clone().run_phase(long, phase, ptx));
        while e.running_prefills.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(e.snapshot().running, 1);
        let (tx, rx) = mpsc::channel(8);
        let start = Instant::now();
        let plain = Job {
            hashes: vec![],
            ..pd_job(3)
        };
        tokio::spawn(e.clone().run(plain, tx));
        let ev = events(rx, start).await;
        // 11 ms of prefill, then gaps of 5 ms: the running prefill does not add 100 ms.
        assert_eq!(ev[2], (Event::Token(2), Duration::from_millis(21)));
        events(prx, start).await;
    }
    /// Token times of a 10-token, 3-token-output request that starts while an 8,000-token
    /// prefill computes (0.1 ms per token: 800 ms), with `interference_tokens` set.
    async fn decode_beside_a_long_prefill(interference_tokens: usize) -> Vec<Duration> {
        let mut c = cfg();
        c.max_num_seqs = 4;
        c.prefill_interference_tokens = interference_tokens;
        c.latency = LatencyModel {
            prefill_overhead_ms: 0.0,
            prefill_per_token_ms: 0.1,
            inter_token_ms: 5.0,
            inter_token_per_seq_ms: 0.0,
            jitter: 0.0,
        };
        let e = Engine::new(&c);
        let long = Job {
            prompt_tokens: 8000,
            ..pd_job(1)
        };
        let (ptx, prx) = mpsc::channel(8);
        tokio::spawn(e.clone().run(long, ptx));
        while e.computing_prefill_tokens.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        let (tx, rx) = mpsc::channel(8);
        let start = Instant::now();
        let short = Job {
            hashes: vec![],
            prompt_tokens: 10,
            ..pd_job(3)
        };
        tokio::spawn(e.clone().run(short, tx));
        let times = events(rx, start)
            .await
            .into_iter()
            .filter(|(ev, _)| matches!(ev, Event::Token(_)))
            .map(|(_, t)| t)
            .collect();
        events(prx, start).await;
        assert_eq!(e.computing_prefill_tokens.load(Ordering::Relaxed), 0);
        times
    }

    #[tokio::test(start_paused = true)]
    async fn a_computing_prefill_stretches_co_running_decode_gaps_only_when_enabled() {
        let ms = |v: f64| Duration::from_micros((v * 1000.0).round() as u64);
        // Off (the default): 1 ms of prefill, then 5 ms gaps, the long prefill notwithstanding.
        assert_eq!(
            decode_beside_a_long_prefill(0).await,
            [ms(1.0), ms(6.0), ms(11.0)]
        );
        // A 2,000-token budget: each gap also computes 2,000 of the prefill's 8,000 tokens,
        // 200 ms at 0.1 ms per token (whole milliseconds: tokio's timer rounds up to them).
        assert_eq!(
            decode_beside_a_long_prefill(2000).await,
            [ms(1.0), ms(206.0), ms(411.0)]
        );
        // A budget above the prefill's size: its whole 8,000 tokens (800 ms) in one gap.
        assert_eq!(
            decode_beside_a_long_prefill(16384).await,
            [ms(1.0), ms(806.0), ms(811.0)]
        );
    }
}
