//! The simulator's approximate tokenizer and chat template.
//!
//! Real engines need a model's vocabulary; the simulator must work offline and be predictable, so
//! it uses a fixed rule: **one token = 4 consecutive bytes of the UTF-8 prompt text** (4
//! characters of ASCII text); the last token may be shorter. With the default block size of 16
//! tokens a KV block covers exactly 64 bytes, the blocks the picker's approximate prefix index
//! hashes, and the chain is built the same way (xxhash64 seeded with the model name, each block
//! hashed with the previous hash as seed), so a prefix the picker believes is cached here really
//! is cached here.
//!
//! Chat requests are rendered to one prompt with [`render_chat`] before tokenizing:
//! `{role}\n{content}\n` per message (the picker's rendering), then the generation cue
//! `assistant\n`. A conversation that extends an earlier one therefore shares its prefix (and its
//! cached blocks).

use xxhash_rust::xxh64::xxh64;

/// Bytes of UTF-8 text per token.
pub const BYTES_PER_TOKEN: usize = 4;

/// Number of tokens in `text`: `ceil(bytes / 4)`.
pub fn count_tokens(text: &str) -> usize {
    text.len().div_ceil(BYTES_PER_TOKEN)
}

/// One chat message, already reduced to plain text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Render a conversation to a prompt: `{role}\n{content}\n` per message, then the generation
/// cue `assistant\n`.
pub fn render_chat(messages: &[ChatMessage]) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str(&m.role);
        out.push('\n');
        out.push_str(&m.content);
        out.push('\n');
    }
    out.push_str("assistant\n");
    out
}

/// The first link of a hash chain: the model (or LoRA adapter) name, so that different models
/// never share blocks.
pub fn chain_seed(model: &str) -> u64 {
    xxh64(model.as_bytes(), 0)
}

/// Chained hashes of the *full* blocks of `text` (`block_size` tokens each, i.e.
/// `4 * block_size` bytes): `hash_0 = xxh64(block_0, seed)`, `hash_i = xxh64(block_i, hash_{i-1})`.
/// A trailing partial block has no hash (it is never shared), as in vLLM.
pub fn block_hashes(seed: u64, text: &str, block_size: usize) -> Vec<u64> {
    let bytes_per_block = block_size.max(1) * BYTES_PER_TOKEN;
    let mut prev = seed;
    text.as_bytes()
        .chunks_exact(bytes_per_block)
        .map(|block| {
            prev = xxh64(block, prev);
            prev
        })
        .collect()
}

/// The token ids of `text`: each 4-byte token read as a big-endian `u32` (a shorter last token is
/// padded with zeros), so ids are stable, distinct per token text and invertible. These are the
/// `token_ids` of the simulator's KV events.
pub fn token_ids(text: &str) -> Vec<u32> {
    text.as_bytes()
        .chunks(BYTES_PER_TOKEN)
        .map(|t| {
            let mut b = [0u8; BYTES_PER_TOKEN];
            b[..t.len()].copy_from_slice(t);
            u32::from_be_bytes(b)
        })
        .collect()
}

/// Words of the generated text. Every entry is exactly one token (4 characters), so the text of
/// `n` completion tokens tokenizes back to `n` tokens.
const WORDS: [&str; 16] = [
    "the ", "sun ", "was ", "low ", "and ", "its ", "red ", "sky ", "hid ", "far ", "off ", "old ",
    "oak ", "top ", "now ", "all ",
];

/// Text of the `i`-th generated token. Deterministic: the same for every request and server.
pub fn output_token(i: usize) -> &'static str {
    WORDS[i % WORDS.len()]
}

/// The full generated text for `n` tokens.
pub fn output_text(n: usize) -> String {
    (0..n).map(output_token).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_are_the_token_bytes() {
        assert_eq!(token_ids(""), Vec::<u32>::new());
        assert_eq!(token_ids("abcdef"), vec![0x6162_6364, 0x6566_0000]);
        assert_eq!(
            token_ids(&"x".repeat(64)).len(),
            count_tokens(&"x".repeat(64))
        );
    }

    #[test]
    fn counts_four_chars_per_token() {
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("abc"), 1);
        assert_eq!(count_tokens("abcd"), 1);
        assert_eq!(count_tokens("abcde"), 2);
        assert_eq!(count_tokens(&"x".repeat(64)), 16);
        // Bytes, not characters: "é" is 2 bytes.
        assert_eq!(count_tokens("ééééé"), 3);
    }

    #[test]
    fn chat_template_is_prefix_stable() {
        let a = vec![ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }];
        assert_eq!(render_chat(&a), "user\nhi\nassistant\n");
        let mut b = a.clone();
        b.push(ChatMessage {
            role: "assistant".into(),
            content: "yo".into(),
        });
        let rb = render_chat(&b);
        assert_eq!(rb, "user\nhi\nassistant\nyo\nassistant\n");
        assert!(rb.starts_with(&render_chat(&a)));
    }

    #[test]
    fn hashes_only_full_blocks_and_chain() {
        let seed = chain_seed("m");
        let text = "a".repeat(64 * 2 + 10);
        let h = block_hashes(seed, &text, 16);
        assert_eq!(h.len(), 2);
        assert_eq!(h[0], xxh64(&[b'a'; 64], seed));
        assert_eq!(h[1], xxh64(&[b'a'; 64], h[0]));
        // Same block content, different position → different hash (chaining).
        assert_ne!(h[0], h[1]);
        // Exactly two blocks.
        assert_eq!(block_hashes(seed, &"a".repeat(128), 16).len(), 2);
        assert_eq!(block_hashes(seed, &"a".repeat(63), 16).len(), 0);
        // A different model seeds a different chain.
        assert_ne!(block_hashes(chain_seed("other"), &text, 16)[0], h[0]);
    }

    #[test]
    fn changing_a_block_changes_it_and_all_later_ones() {
        let seed = chain_seed("m");
        let base = format!("{}{}{}", "a".repeat(64), "b".repeat(64), "c".repeat(64));
        let changed = format!("{}{}{}", "a".repeat(64), "X".repeat(64), "c".repeat(64));
        let h1 = block_hashes(seed, &base, 16);
        let h2 = block_hashes(seed, &changed, 16);
        assert_eq!(h1[0], h2[0]);
        assert_ne!(h1[1], h2[1]);
        assert_ne!(h1[2], h2[2]);
    }

    #[test]
    fn multibyte_text_is_cut_on_bytes() {
        let seed = chain_seed("m");
        // 48 × 2 bytes = 96 bytes: one full 64-byte block.
        let text = "é".repeat(48);
        let h = block_hashes(seed, &text, 16);
        assert_eq!(h, vec![xxh64(&text.as_bytes()[..64], seed)]);
    }

    #[test]
    fn output_text_tokenizes_back() {
        let t = output_text(20);
        assert_eq!(count_tokens(&t), 20);
        assert!(t.starts_with("the sun was "));
        assert_eq!(t.len(), 80);
    }
}
