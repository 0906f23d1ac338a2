//! Token accounting and the workload's *ideal bound*: the cached-token ratio that a router with an
//! unlimited cache (every earlier prompt still cached, and always routed to where it is) could
//! reach. Real runs are judged against it.
//!
//! The exact rule, mirroring the simulator's tokenizer and a paged KV cache:
//! - a prompt's tokens are consecutive 4-character chunks of its rendered text (the last chunk may
//!   be shorter), so `prompt_tokens = ceil(chars / 4)`; chat prompts are rendered with the
//!   simulator's template ([`crate::workload::render_chat`]); generated text is ASCII, so
//!   characters are bytes;
//! - a block is 16 consecutive tokens (64 bytes); only whole blocks can be reused;
//! - a request's reusable prefix is the largest `k` such that its first `k` blocks equal the first
//!   `k` blocks of *some* earlier request in the workload order (not necessarily one earlier
//!   request for every block: blocks are identified by their chained hash, so equal `k`-block
//!   prefixes are exactly what is compared);
//! - `ratio = sum(16 * k) / sum(prompt_tokens)` over all requests.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};

/// Characters (bytes) per token in the simulator's tokenizer.
pub const CHARS_PER_TOKEN: usize = 4;
/// Tokens per KV-cache block.
pub const BLOCK_TOKENS: usize = 16;
/// Bytes per block.
pub const BLOCK_CHARS: usize = CHARS_PER_TOKEN * BLOCK_TOKENS;

/// Tokens in a rendered prompt.
pub fn prompt_tokens(text: &str) -> u64 {
    text.chars().count().div_ceil(CHARS_PER_TOKEN) as u64
}

/// Chained hashes of a prompt's whole blocks: `h_i = H(h_{i-1}, block_i)`, so equal hashes mean
/// equal prefixes.
pub fn block_hashes(text: &str) -> impl Iterator<Item = u64> + '_ {
    // Byte offsets where each whole block of BLOCK_CHARS characters ends.
    let ends = text
        .char_indices()
        .map(|(i, c)| i + c.len_utf8())
        .skip(BLOCK_CHARS - 1)
        .step_by(BLOCK_CHARS);
    let mut prev = 0u64;
    let mut start = 0usize;
    ends.map(move |end| {
        // SipHash with fixed keys: deterministic across runs and platforms.
        #[allow(deprecated)]
        let mut h = std::hash::SipHasher::new();
        prev.hash(&mut h);
        text.as_bytes()[start..end].hash(&mut h);
        start = end;
        prev = h.finish();
        prev
    })
}

/// Result of [`IdealTracker`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IdealBound {
    pub requests: u64,
    pub prompt_tokens: u64,
    /// Tokens of whole-block prefixes shared with an earlier request.
    pub shared_tokens: u64,
    /// `shared_tokens / prompt_tokens` (0 when there are no tokens).
    pub ratio: f64,
    /// Distinct blocks over all prompts: the working set an unlimited cache would hold.
    pub distinct_blocks: u64,
}

/// Incremental ideal-bound computation over prompts in workload order.
#[derive(Debug, Default)]
pub struct IdealTracker {
    seen: HashSet<u64>,
    requests: u64,
    prompt_tokens: u64,
    shared_tokens: u64,
}

impl IdealTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Accounts one prompt; returns its shared-prefix length in tokens.
    pub fn observe(&mut self, text: &str) -> u64 {
        let mut shared_blocks = 0u64;
        let mut matching = true;
        for h in block_hashes(text) {
            if matching && self.seen.contains(&h) {
                shared_blocks += 1;
            } else {
                matching = false;
                self.seen.insert(h);
            }
        }
        let shared = shared_blocks * BLOCK_TOKENS as u64;
        self.requests += 1;
        self.prompt_tokens += prompt_tokens(text);
        self.shared_tokens += shared;
        shared
    }

    pub fn bound(&self) -> IdealBound {
        IdealBound {
            requests: self.requests,
            prompt_tokens: self.prompt_tokens,
            shared_tokens: self.shared_tokens,
            ratio: if self.prompt_tokens == 0 {
                0.0
            } else {
                self.shared_tokens as f64 / self.prompt_tokens as f64
            },
            distinct_blocks: self.seen.len() as u64,
        }
    }
}

/// The ideal bound of a sequence of prompts.
pub fn ideal_bound<'a>(prompts: impl IntoIterator<Item = &'a str>) -> IdealBound {
    let mut t = IdealTracker::new();
    for p in prompts {
        t.observe(p);
    }
    t.bound()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(c: char, n: usize) -> String {
        std::iter::repeat_n(c, n).collect()
    }

    #[test]
    fn tokens_round_up() {
        assert_eq!(prompt_tokens(""), 0);
        assert_eq!(prompt_tokens("abcd"), 1);
        assert_eq!(prompt_tokens("abcde"), 2);
        assert_eq!(prompt_tokens(&s('x', 130)), 33);
    }

    #[test]
    fn identical_prompts_share_whole_blocks_only() {
        // 130 bytes = 33 tokens = 2 whole blocks + 2 bytes.
        let a = s('a', 130);
        let b = ideal_bound([a.as_str(), a.as_str()]);
        assert_eq!(b.prompt_tokens, 66);
        assert_eq!(b.shared_tokens, 32);
        assert!((b.ratio - 32.0 / 66.0).abs() < 1e-12);
        assert_eq!(b.distinct_blocks, 2);
    }

    #[test]
    fn blocks_are_counted_in_characters() {
        let text = "é".repeat(130);
        assert_eq!(prompt_tokens(&text), 33);
        assert_eq!(block_hashes(&text).count(), 2);
        assert_eq!(block_hashes(&s('a', 127)).count(), 1);
        assert_eq!(block_hashes(&s('a', 128)).count(), 2);
    }

    #[test]
    fn partial_block_is_never_shared() {
        let a = s('a', 63);
        let b = ideal_bound([a.as_str(), a.as_str()]);
        assert_eq!(b.shared_tokens, 0);
        assert_eq!(b.ratio, 0.0);
    }

    #[test]
    fn divergence_inside_a_block_loses_that_block() {
        // Share 100 bytes: block 0 (0..64) equal, block 1 (64..128) differs at byte 100.
        let a = format!("{}{}", s('a', 100), s('b', 28));
        let b = format!("{}{}", s('a', 100), s('c', 28));
        let bound = ideal_bound([a.as_str(), b.as_str()]);
        assert_eq!(bound.shared_tokens, 16);
        assert_eq!(bound.prompt_tokens, 64);
        assert_eq!(bound.ratio, 0.25);
        assert_eq!(bound.distinct_blocks, 3);
    }

    #[test]
    fn any_earlier_request_counts_and_blocks_are_chained() {
        let p = s('p', 64);
        let q = s('q', 64);
        let r1 = format!("{p}{q}"); // 2 blocks
        let r2 = s('z', 64); // unrelated
        let r3 = format!("{p}{q}{}", s('r', 64)); // shares 2 blocks with r1, not r2
        let r4 = q.clone(); // block equal to r1's 2nd block but at position 0: not shared
        let r5 = format!("{}{q}", s('y', 64)); // 2nd block content seen, but chain differs
        let mut t = IdealTracker::new();
        assert_eq!(t.observe(&r1), 0);
        assert_eq!(t.observe(&r2), 0);
        assert_eq!(t.observe(&r3), 32);
        assert_eq!(t.observe(&r4), 0);
        assert_eq!(t.observe(&r5), 0);
        let b = t.bound();
        assert_eq!(b.requests, 5);
        assert_eq!(b.prompt_tokens, 32 + 16 + 48 + 16 + 32);
        assert_eq!(b.shared_tokens, 32);
        // r1: 2, r2: 1, r3: +1, r4: 1, r5: 2
        assert_eq!(b.distinct_blocks, 7);
    }

    #[test]
    fn shared_prefix_workload_bound_matches_closed_form() {
        use crate::workload::{Api, SharedPrefix, Workload, WorkloadSpec};
        // Completions: prompt = system (64 tokens = 4 blocks) + question (16 tokens = 1 block).
        // One pass of 2 groups x 5 prompts: every request but the first of its group shares the
        // 4 system blocks -> (10 - 2) * 64 shared of 10 * 80 tokens.
        let w = Workload::new(
            WorkloadSpec::SharedPrefix(SharedPrefix {
                num_groups: 2,
                num_prompts_per_group: 5,
                system_prompt_len: 64,
                question_len: 16,
                output_len: 1,
                api: Api::Completions,
            }),
            3,
        )
        .unwrap();
        let reqs: Vec<_> = w.take(10).collect();
        let b = ideal_bound(reqs.iter().map(|r| r.prompt_text.as_str()));
        assert_eq!(b.prompt_tokens, 800);
        assert_eq!(b.shared_tokens, 8 * 64);
        assert_eq!(b.distinct_blocks, 2 * 4 + 10);
        // A second pass repeats every prompt in full.
        let reqs: Vec<_> = w.take(20).collect();
        let b = ideal_bound(reqs.iter().map(|r| r.prompt_text.as_str()));
        assert_eq!(b.shared_tokens, 8 * 64 + 10 * 80);
    }

    #[test]
    fn no_sharing_bound_is_zero() {
        use crate::workload::{NoSharing, Workload, WorkloadSpec};
        let w = Workload::new(WorkloadSpec::NoSharing(NoSharing::default()), 3).unwrap();
        let reqs: Vec<_> = w.take(200).collect();
        let b = ideal_bound(reqs.iter().map(|r| r.prompt_text.as_str()));
        assert_eq!(b.shared_tokens, 0);
        assert_eq!(b.ratio, 0.0);
    }

    #[test]
    fn multi_turn_bound_counts_previous_turns() {
        use crate::workload::{MultiTurn, Workload, WorkloadSpec};
        // No system prompt; turn 1 extends turn 0, so it shares turn 0's whole blocks (the
        // template is the simulator's, so lengths are read rather than hard-coded).
        let w = Workload::new(
            WorkloadSpec::MultiTurn(MultiTurn {
                num_sessions: 1,
                turns_per_session: 2,
                system_prompt_len: 0,
                user_len: 16,
                output_len: 16,
            }),
            1,
        )
        .unwrap();
        let r: Vec<_> = w.take(2).collect();
        assert!(r[1].prompt_text.starts_with(&r[0].prompt_text));
        let (l0, l1) = (r[0].prompt_text.len(), r[1].prompt_text.len());
        assert!(l0 >= 64 && l1 > l0);
        let b = ideal_bound(r.iter().map(|r| r.prompt_text.as_str()));
        assert_eq!(b.prompt_tokens, (l0.div_ceil(4) + l1.div_ceil(4)) as u64);
        assert_eq!(b.shared_tokens, (l0 / 64 * 16) as u64);
    }
}
