//! The typed KV-cache events, named and shaped as vLLM's `vllm/distributed/kv_events.py`.
//!
//! Block hashes are `u64`: vLLM sends ints (older versions) or bytes (newer ones); bytes become
//! their last 8 bytes read big-endian, as llm-d-router does, so both index the same way.

/// Per-block extra hash inputs (multi-modal identifiers, LoRA name, cache salt, ...): one entry
/// per block hash, `None` for a block without any. The items are kept as msgpack values; what
/// they mean is for the consumer that reconstructs hashes.
pub type ExtraKeys = Vec<Option<Vec<rmpv::Value>>>;

/// Blocks that entered the cache: `block_hashes[i]` holds `token_ids[i*block_size..]`, chained
/// from `parent_block_hash` (`None` for a prefix that starts at the first block).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockStored {
    pub block_hashes: Vec<u64>,
    pub parent_block_hash: Option<u64>,
    pub token_ids: Vec<u32>,
    pub block_size: u32,
    /// Deprecated by vLLM in favour of `lora_name`, still sent.
    pub lora_id: Option<i64>,
    /// Storage tier: `"GPU"`, `"CPU"`, ...; `None` when the engine does not say.
    pub medium: Option<String>,
    pub lora_name: Option<String>,
    pub extra_keys: Option<ExtraKeys>,
    /// KV cache group (hybrid models); `None` outside hybrid memory allocation.
    pub group_idx: Option<u32>,
    pub kv_cache_spec_kind: Option<String>,
    pub kv_cache_spec_sliding_window: Option<u32>,
}

impl BlockStored {
    /// A plain event: the given hashes and tokens, no LoRA, no medium, no hybrid fields.
    pub fn new(
        block_hashes: Vec<u64>,
        parent_block_hash: Option<u64>,
        token_ids: Vec<u32>,
        block_size: u32,
    ) -> Self {
        Self {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            lora_id: None,
            medium: None,
            lora_name: None,
            extra_keys: None,
            group_idx: None,
            kv_cache_spec_kind: None,
            kv_cache_spec_sliding_window: None,
        }
    }
}

/// Blocks that left the cache (evicted or freed).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockRemoved {
    pub block_hashes: Vec<u64>,
    pub medium: Option<String>,
    pub group_idx: Option<u32>,
}

/// One KV-cache event.
#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    BlockStored(BlockStored),
    BlockRemoved(BlockRemoved),
    /// The whole cache was dropped (prefix-cache reset, engine restart).
    AllBlocksCleared,
}

impl KvEvent {
    /// The wire tag: `BlockStored`, `BlockRemoved` or `AllBlocksCleared`.
    pub fn tag(&self) -> &'static str {
        match self {
            KvEvent::BlockStored(_) => TAG_BLOCK_STORED,
            KvEvent::BlockRemoved(_) => TAG_BLOCK_REMOVED,
            KvEvent::AllBlocksCleared => TAG_ALL_BLOCKS_CLEARED,
        }
    }
}

pub(crate) const TAG_BLOCK_STORED: &str = "BlockStored";
pub(crate) const TAG_BLOCK_REMOVED: &str = "BlockRemoved";
pub(crate) const TAG_ALL_BLOCKS_CLEARED: &str = "AllBlocksCleared";

/// What one published message carries: the events of one engine step.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    /// Wall-clock time of the batch, seconds since the Unix epoch.
    pub ts: f64,
    pub events: Vec<KvEvent>,
    /// The publishing data-parallel rank; vLLM fills it in, older versions omit it.
    pub data_parallel_rank: Option<i64>,
}

/// One decoded message: its topic, its sequence number and its batch.
#[derive(Debug, Clone, PartialEq)]
pub struct KvMessage {
    pub topic: String,
    pub seq: u64,
    pub batch: EventBatch,
}
