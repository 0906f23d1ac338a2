//! The OpenAI `usage` object of a response, read from plain JSON bodies and from SSE streams
//! alike: what the server says it computed and what it found cached
//! (`usage.prompt_tokens_details.cached_tokens`). Only a bounded tail of the response is kept,
//! since `usage` is the last thing a server writes (the final chunk of a stream, the end of a
//! JSON body).

use memchr::memmem;
use serde::Deserialize;

/// Bytes of the response end kept for finding `usage`.
pub const TAIL_BYTES: usize = 8 * 1024;

/// Token counts a server reported for one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    /// `prompt_tokens_details.cached_tokens`; `None` when the server does not report it (vLLM
    /// only does with `--enable-prompt-tokens-details`), which is not the same as 0 found.
    #[serde(default, rename = "prompt_tokens_details", deserialize_with = "cached")]
    pub cached_tokens: Option<u64>,
}

fn cached<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    struct Details {
        #[serde(default)]
        cached_tokens: Option<u64>,
    }
    let v: Option<Details> = Option::deserialize(d)?;
    Ok(v.and_then(|d| d.cached_tokens))
}

/// Follows a response body, keeping its last [`TAIL_BYTES`].
#[derive(Clone, Debug, Default)]
pub struct UsageTail {
    tail: Vec<u8>,
}

impl UsageTail {
    /// The next piece of the response body.
    pub fn feed(&mut self, chunk: &[u8]) {
        if chunk.len() >= TAIL_BYTES {
            self.tail.clear();
            self.tail
                .extend_from_slice(&chunk[chunk.len() - TAIL_BYTES..]);
            return;
        }
        let over = (self.tail.len() + chunk.len()).saturating_sub(TAIL_BYTES);
        if over > 0 {
            self.tail.drain(..over);
        }
        self.tail.extend_from_slice(chunk);
    }

    /// The last complete `usage` object seen, if any.
    pub fn usage(&self) -> Option<Usage> {
        let finder = memmem::Finder::new(b"\"usage\"");
        let positions: Vec<usize> = finder.find_iter(&self.tail).collect();
        positions.iter().rev().find_map(|&i| {
            let rest = &self.tail[i + 7..];
            let colon = rest.iter().position(|b| !b.is_ascii_whitespace())?;
            let rest = rest[colon..].strip_prefix(b":")?;
            let mut de = serde_json::Deserializer::from_slice(rest).into_iter::<Option<Usage>>();
            de.next()?.ok().flatten()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_json_and_streams() {
        let mut t = UsageTail::default();
        t.feed(br#"{"id":"x","choices":[{"text":"hi"}],"usage":{"prompt_tokens":120,"completion_tokens":7,"total_tokens":127,"prompt_tokens_details":{"cached_tokens":96}}}"#);
        assert_eq!(
            t.usage(),
            Some(Usage {
                prompt_tokens: 120,
                completion_tokens: 7,
                cached_tokens: Some(96)
            })
        );
        // SSE: usage null on content chunks, the real one in the final chunk, split anywhere.
        let stream = b"data: {\"choices\":[{\"text\":\"a\"}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\": {\"prompt_tokens\":5,\"completion_tokens\":2,\"prompt_tokens_details\":null}}\n\ndata: [DONE]\n\n";
        for split in [1, 17, 60, 100, stream.len() - 3] {
            let mut t = UsageTail::default();
            t.feed(&stream[..split]);
            t.feed(&stream[split..]);
            assert_eq!(
                t.usage(),
                Some(Usage {
                    prompt_tokens: 5,
                    completion_tokens: 2,
                    cached_tokens: None
                }),
                "split at {split}"
            );
        }
        let mut t = UsageTail::default();
        t.feed(b"data: {\"choices\":[],\"usage\":null}\n\n");
        assert_eq!(t.usage(), None);
        t.feed(b"{\"usage\":{\"prompt_tok");
        assert_eq!(t.usage(), None, "incomplete object");
    }

    #[test]
    fn the_tail_is_bounded() {
        let mut t = UsageTail::default();
        for _ in 0..1000 {
            t.feed(&[b'x'; 1000]);
        }
        t.feed(br#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#);
        assert!(t.tail.len() <= TAIL_BYTES);
        assert_eq!(t.usage().unwrap().prompt_tokens, 1);
    }
}
