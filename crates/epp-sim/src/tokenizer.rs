//! The simulator's tokenizer and chat template.
//!
//! Real engines need a model's vocabulary; the simulator must work offline and be predictable, so
//! by default it uses a fixed rule: **one token = 4 consecutive bytes of the UTF-8 prompt text** (4
//! characters of ASCII text); the last token may be shorter. With the default block size of 16
//! tokens a KV block covers exactly 64 bytes, the blocks the picker's approximate prefix index
//! hashes, and the chain is built the same way (xxhash64 seeded with the model name, each block
//! hashed with the previous hash as seed), so a prefix the picker believes is cached here really
//! is cached here.
//!
//! With `--tokenizer PATH` it tokenizes with a Hugging Face `tokenizer.json` instead
//! ([`Tokenizer::Hf`], the same loader as the picker's `local` token-producer backend), so the
//! picker and the simulator can agree on real token ids.
//!
//! Blocks are hashed over token ids ([`block_hashes_of_ids`]: the big-endian bytes of each id,
//! chained). For the byte tokenizer the big-endian bytes of a full block's ids are exactly the
//! block's text, so this equals [`block_hashes`] of the text.
//!
//! Chat requests are rendered to one prompt with [`render_chat_with`] before tokenizing:
//! `{role}\n{content}\n` per message (the picker's rendering), then the generation cue
//! `assistant\n` (vLLM's `add_generation_prompt`, on by default). A conversation that extends an
//! earlier one therefore shares its prefix (and its cached blocks).

use std::sync::Arc;

use epp_core::tokenization::{HfTokenizer, TokenizerError};
use xxhash_rust::xxh64::{xxh64, Xxh64};

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

/// The generation cue appended after the messages (vLLM's `add_generation_prompt`).
pub use epp_core::tokenization::GENERATION_CUE;

/// Render a conversation to a prompt: `{role}\n{content}\n` per message, then the generation
/// cue `assistant\n`.
pub fn render_chat(messages: &[ChatMessage]) -> String {
    render_chat_with(messages, true, false)
}

/// [`render_chat`] with vLLM's two template switches: `add_generation_prompt` appends the cue;
/// `continue_final_message` leaves the last message open (no newline after it, no cue) so the
/// model continues it. Callers refuse both at once, as vLLM does.
pub fn render_chat_with(
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    continue_final_message: bool,
) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str(&m.role);
        out.push('\n');
        out.push_str(&m.content);
        out.push('\n');
    }
    if continue_final_message {
        if !messages.is_empty() {
            out.pop();
        }
    } else if add_generation_prompt {
        out.push_str(GENERATION_CUE);
    }
    out
}

/// How a server turns prompt text into token ids.
#[derive(Clone, Debug, Default)]
pub enum Tokenizer {
    /// 4 bytes of UTF-8 text per token, the id being the bytes read as a big-endian `u32`.
    #[default]
    Bytes,
    /// A Hugging Face `tokenizer.json` (`--tokenizer PATH`).
    Hf(Arc<HfTokenizer>),
}

impl Tokenizer {
    /// `None`: the byte tokenizer; a path: that `tokenizer.json`, loaded now.
    pub fn load(path: Option<&std::path::Path>) -> Result<Self, TokenizerError> {
        match path {
            None => Ok(Self::Bytes),
            Some(p) => Ok(Self::Hf(Arc::new(HfTokenizer::from_file(p)?))),
        }
    }

    /// The token ids of `text`. `add_special_tokens` applies the `tokenizer.json`'s
    /// post-processor (the byte tokenizer has no special tokens).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Self::Bytes => Ok(token_ids(text)),
            Self::Hf(t) => t.encode(text, add_special_tokens),
        }
    }

    /// The text of each token (vLLM's `token_strs`): the 4-byte pieces of `text` (lossy UTF-8),
    /// or the vocabulary entries of `ids`.
    pub fn token_strs(&self, text: &str, ids: &[u32]) -> Vec<String> {
        match self {
            Self::Bytes => text
                .as_bytes()
                .chunks(BYTES_PER_TOKEN)
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect(),
            Self::Hf(t) => ids
                .iter()
                .map(|&id| t.id_to_token(id).unwrap_or_default())
                .collect(),
        }
    }
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

/// Chained hashes of the *full* blocks of `ids` (`block_size` ids each):
/// `hash_0 = xxh64(bytes(block_0), seed)`, `hash_i = xxh64(bytes(block_i), hash_{i-1})`, where
/// `bytes` is each id's 4 big-endian bytes in order. For the byte tokenizer that is the block's
/// text, so the result equals [`block_hashes`] of the text.
pub fn block_hashes_of_ids(seed: u64, ids: &[u32], block_size: usize) -> Vec<u64> {
    let mut prev = seed;
    ids.chunks_exact(block_size.max(1))
        .map(|block| {
            let mut h = Xxh64::new(prev);
            for id in block {
                h.update(&id.to_be_bytes());
            }
            prev = h.digest();
            prev
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
    fn id_hashes_equal_text_hashes_for_the_byte_tokenizer() {
        let seed = chain_seed("m");
        for text in ["a".repeat(64 * 3 + 7), "é".repeat(100), String::new()] {
            assert_eq!(
                block_hashes_of_ids(seed, &token_ids(&text), 16),
                block_hashes(seed, &text, 16),
                "{text}"
            );
        }
        assert_eq!(block_hashes_of_ids(seed, &[1, 2, 3], 2).len(), 1);
    }

    #[test]
    fn template_switches() {
        let m = vec![
            ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            },
            ChatMessage {
                role: "assistant".into(),
                content: "Sure".into(),
            },
        ];
        assert_eq!(
            render_chat_with(&m, false, false),
            "user\nhi\nassistant\nSure\n"
        );
        assert_eq!(
            render_chat_with(&m, false, true),
            "user\nhi\nassistant\nSure"
        );
        assert_eq!(
            render_chat_with(&m, true, true),
            "user\nhi\nassistant\nSure"
        );
        assert_eq!(render_chat_with(&[], true, true), "");
        let bytes = Tokenizer::Bytes;
        assert_eq!(bytes.encode("abcdef", true).unwrap(), token_ids("abcdef"));
        assert_eq!(bytes.token_strs("abcdef", &[]), vec!["abcd", "ef"]);
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
