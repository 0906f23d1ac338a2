//! Precise prefix-cache routing: which endpoints hold which prompt blocks, from the engines' own
//! KV events rather than from our past picks (llm-d's `precise-prefix-cache-producer`).
//!
//! - [`keys`]: request keys, recomputed from token ids exactly as llm-d's token processor does.
//! - [`index`]: request key → endpoints and tiers, engine block → request keys per endpoint,
//!   bounded, with speculative entries.

pub mod index;
pub mod keys;
