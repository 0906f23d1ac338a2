//! Request keys: the block keys the precise index is keyed by, recomputed from token ids exactly
//! as llm-d-router's token processor (`pkg/kvcache/kvblock/token_processor.go`) computes them, so
//! an index fed by the engines' events and a lookup of a tokenized prompt agree on every key.
//!
//! The chain: tokens are cut into blocks of `blockSizeTokens` (a trailing partial block has no
//! key); the first block's parent is the model's init hash (`hash(seedHash, nil, model)`, the model
//! or LoRA adapter name in the extra position), each later block's parent is the key before it.
//! Two hash functions, as llm-d:
//!
//! - `cbor-fnv` (the default): FNV-64a over the canonical CBOR encoding of the array
//!   `[parent (uint), tokens (array of uint, or null), extra]`, where `extra` is null for a text
//!   block, the model name (text) for the init hash, and an array of `{"Hash": text}` maps for a
//!   block with multi-modal identifiers or a cache salt; the seed hash is FNV-64a of `hashSeed`.
//! - `xxh64`: one XXH64 (seed 0) over the parent (8 bytes little-endian), the token ids (4 bytes
//!   little-endian each) and each extra string prefixed by its length (8 bytes little-endian);
//!   the seed hash is XXH64 of `hashSeed`.
//!
//! Nothing is allocated per block: the CBOR bytes are fed to the hash as they are produced.

use xxhash_rust::xxh64::{xxh64, Xxh64};

/// vLLM's default block size, and llm-d's default `blockSizeTokens`.
pub const DEFAULT_BLOCK_SIZE_TOKENS: u32 = 16;
/// Largest `blockSizeTokens` accepted (a block of more tokens would never be shared).
pub const MAX_BLOCK_SIZE_TOKENS: u32 = 65_536;

/// `hashAlgorithm`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HashAlgorithm {
    #[default]
    CborFnv,
    Xxh64,
}

impl HashAlgorithm {
    /// The config spelling: `cbor-fnv` or `xxh64`.
    pub fn as_str(&self) -> &'static str {
        match self {
            HashAlgorithm::CborFnv => "cbor-fnv",
            HashAlgorithm::Xxh64 => "xxh64",
        }
    }

    /// Parses the config value; empty means the default, as in llm-d.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "" | "cbor-fnv" => Some(HashAlgorithm::CborFnv),
            "xxh64" => Some(HashAlgorithm::Xxh64),
            _ => None,
        }
    }
}

/// Per-block extra hash inputs (multi-modal identifiers, the cache salt on block 0): one entry
/// per full block, `None` for a plain text block.
pub type BlockExtras = [Option<Vec<String>>];

/// Why keys could not be computed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeysError {
    #[error("extra keys for {extras} blocks, but the tokens make {blocks} full blocks")]
    ExtrasLength { extras: usize, blocks: usize },
}

/// The token processor: block size, seed and hash function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenProcessor {
    block_size: u32,
    algorithm: HashAlgorithm,
    /// The hash of `hashSeed` (llm-d's `initHash`).
    seed_hash: u64,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-64a, fed incrementally.
struct Fnv(u64);

impl Fnv {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(FNV_PRIME);
        }
    }
    #[inline]
    fn byte(&mut self, b: u8) {
        self.0 ^= u64::from(b);
        self.0 = self.0.wrapping_mul(FNV_PRIME);
    }
}

/// A CBOR head (major type + argument), in its shortest (canonical) form.
#[inline]
fn cbor_head(h: &mut Fnv, major: u8, n: u64) {
    let m = major << 5;
    if n < 24 {
        h.byte(m | n as u8);
    } else if n <= 0xff {
        h.byte(m | 24);
        h.byte(n as u8);
    } else if n <= 0xffff {
        h.byte(m | 25);
        h.write(&(n as u16).to_be_bytes());
    } else if n <= 0xffff_ffff {
        h.byte(m | 26);
        h.write(&(n as u32).to_be_bytes());
    } else {
        h.byte(m | 27);
        h.write(&n.to_be_bytes());
    }
}

const CBOR_NULL: u8 = 0xf6;

fn cbor_text(h: &mut Fnv, s: &str) {
    cbor_head(h, 3, s.len() as u64);
    h.write(s.as_bytes());
}

/// `fnv64a(cbor([parent, tokens, extra]))`; `tokens: None` is a nil slice (null).
fn cbor_fnv(parent: u64, tokens: Option<&[u32]>, extra: Extra<'_>) -> u64 {
    let mut h = Fnv(FNV_OFFSET);
    h.byte(0x83); // array of 3
    cbor_head(&mut h, 0, parent);
    match tokens {
        None => h.byte(CBOR_NULL),
        Some(t) => {
            cbor_head(&mut h, 4, t.len() as u64);
            for &x in t {
                cbor_head(&mut h, 0, u64::from(x));
            }
        }
    }
    match extra {
        Extra::None => h.byte(CBOR_NULL),
        Extra::Text(s) => cbor_text(&mut h, s),
        Extra::Hashes(list) => {
            // `[]MMHash`: an array of structs `{Hash string}`, i.e. one-entry maps.
            cbor_head(&mut h, 4, list.len() as u64);
            for s in list {
                h.byte(0xa1);
                cbor_text(&mut h, "Hash");
                cbor_text(&mut h, s);
            }
        }
    }
    h.0
}

fn xxh64_block(parent: u64, tokens: &[u32], extras: &[&str]) -> u64 {
    let mut h = Xxh64::new(0);
    h.update(&parent.to_le_bytes());
    let mut buf = [0u8; 256];
    for chunk in tokens.chunks(buf.len() / 4) {
        for (i, t) in chunk.iter().enumerate() {
            buf[i * 4..i * 4 + 4].copy_from_slice(&t.to_le_bytes());
        }
        h.update(&buf[..chunk.len() * 4]);
    }
    for s in extras {
        h.update(&(s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    h.digest()
}

#[derive(Clone, Copy)]
enum Extra<'a> {
    None,
    Text(&'a str),
    Hashes(&'a [String]),
}

impl TokenProcessor {
    /// A processor; `block_size` 0 is refused by the config layer (`blockSizeTokens` must be > 0).
    pub fn new(block_size: u32, hash_seed: &str, algorithm: HashAlgorithm) -> Self {
        let seed_hash = match algorithm {
            HashAlgorithm::CborFnv => {
                let mut h = Fnv(FNV_OFFSET);
                h.write(hash_seed.as_bytes());
                h.0
            }
            HashAlgorithm::Xxh64 => xxh64(hash_seed.as_bytes(), 0),
        };
        Self {
            block_size: block_size.max(1),
            algorithm,
            seed_hash,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn algorithm(&self) -> HashAlgorithm {
        self.algorithm
    }

    /// The parent of a chain's first block: the model (or LoRA adapter) name hashed onto the seed.
    pub fn init_hash(&self, model: &str) -> u64 {
        match self.algorithm {
            HashAlgorithm::CborFnv => cbor_fnv(self.seed_hash, None, Extra::Text(model)),
            HashAlgorithm::Xxh64 => xxh64_block(self.seed_hash, &[], &[model]),
        }
    }

    /// Full blocks in `tokens`.
    pub fn blocks_in(&self, tokens: usize) -> usize {
        tokens / self.block_size as usize
    }

    /// The keys of the full blocks of `tokens`, chained from `parent` (a key of this processor),
    /// or from the model's init hash when `parent` is `None`. `extras`, when given, has one entry
    /// per full block.
    pub fn block_keys(
        &self,
        parent: Option<u64>,
        tokens: &[u32],
        model: &str,
        extras: Option<&BlockExtras>,
    ) -> Result<Vec<u64>, KeysError> {
        let mut out = Vec::with_capacity(self.blocks_in(tokens.len()));
        self.block_keys_into(parent, tokens, model, extras, &mut out)?;
        Ok(out)
    }

    /// As [`block_keys`](Self::block_keys), appending to `out` (reused buffers on the hot path).
    pub fn block_keys_into(
        &self,
        parent: Option<u64>,
        tokens: &[u32],
        model: &str,
        extras: Option<&BlockExtras>,
        out: &mut Vec<u64>,
    ) -> Result<(), KeysError> {
        let bs = self.block_size as usize;
        let blocks = tokens.len() / bs;
        if blocks == 0 {
            return Ok(());
        }
        if let Some(e) = extras {
            if e.len() != blocks {
                return Err(KeysError::ExtrasLength {
                    extras: e.len(),
                    blocks,
                });
            }
        }
        let mut prev = parent.unwrap_or_else(|| self.init_hash(model));
        let mut strs: Vec<&str> = Vec::new();
        for (i, chunk) in tokens.chunks_exact(bs).enumerate() {
            let extra = extras.and_then(|e| e[i].as_deref());
            prev = match self.algorithm {
                HashAlgorithm::CborFnv => {
                    cbor_fnv(prev, Some(chunk), extra.map_or(Extra::None, Extra::Hashes))
                }
                HashAlgorithm::Xxh64 => {
                    strs.clear();
                    if let Some(list) = extra {
                        strs.extend(list.iter().map(String::as_str));
                    }
                    xxh64_block(prev, chunk, &strs)
                }
            };
            out.push(prev);
        }
        Ok(())
    }
}

/// Per-block extras of an event, from vLLM's `extra_keys` (one list per engine block): a bare
/// string is a multi-modal identifier (vLLM 0.18+), a `[string, int]` pair its older form (the
/// offset ignored), anything else (LoRA ids, ...) is not hashed, as llm-d reads them.
pub fn extras_from_event(raw: &crate::kvevents::ExtraKeys) -> Vec<Option<Vec<String>>> {
    raw.iter()
        .map(|block| {
            let items = block.as_ref()?;
            let hashes: Vec<String> = items
                .iter()
                .filter_map(|v| match v {
                    rmpv::Value::String(s) => s.as_str().map(str::to_string),
                    rmpv::Value::Array(a) => a.first().and_then(|f| f.as_str()).map(str::to_string),
                    _ => None,
                })
                .collect();
            (!hashes.is_empty()).then_some(hashes)
        })
        .collect()
}

/// Re-cuts per-engine-block extras to `blocks` request blocks (llm-d's `realignExtraFeatures`):
/// an engine block larger than a request block lends its extras to each request block inside it;
/// smaller engine blocks pool theirs into the request block they fall in.
pub fn realign_extras(engine: Vec<Option<Vec<String>>>, blocks: usize) -> Vec<Option<Vec<String>>> {
    let n = engine.len();
    if blocks == 0 {
        return Vec::new();
    }
    if n == 0 || n == blocks {
        let mut v = engine;
        v.resize(blocks, None);
        return v;
    }
    let mut out: Vec<Option<Vec<String>>> = vec![None; blocks];
    if n < blocks {
        for (i, o) in out.iter_mut().enumerate() {
            *o = engine[i * n / blocks].clone();
        }
    } else {
        for (i, e) in engine.into_iter().enumerate() {
            let Some(e) = e else { continue };
            let at = i * blocks / n;
            out[at].get_or_insert_with(Vec::new).extend(e);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: u32) -> Vec<u32> {
        (1..=n).collect()
    }

    // Expected values computed by llm-d-router's own `token_processor.go` (run against the
    // fxamacker/cbor and cespare/xxhash modules it uses), on the inputs of its
    // `token_processor_test.go`: tokens 1..N, model "test-model", seeds "test-seed" / "test".
    #[test]
    fn cbor_fnv_keys_match_llm_d() {
        let p = TokenProcessor::new(16, "", HashAlgorithm::CborFnv);
        assert_eq!(
            p.block_keys(None, &seq(32), "test-model", None).unwrap(),
            vec![9540012594951042066, 16921089685996993662]
        );
        // 40 tokens: the trailing 8 have no key.
        let p = TokenProcessor::new(16, "test-seed", HashAlgorithm::CborFnv);
        assert_eq!(
            p.block_keys(None, &seq(40), "test-model", None).unwrap(),
            vec![9813823192409008620, 682745025325898328]
        );
        // An explicit parent continues a chain.
        let p = TokenProcessor::new(4, "test-seed", HashAlgorithm::CborFnv);
        assert_eq!(
            p.block_keys(Some(999_999), &seq(12), "test-model", None)
                .unwrap(),
            vec![
                8481448490634877348,
                11187422302766676541,
                14874973469707511624
            ]
        );
        // Token ids across every CBOR integer width.
        let p = TokenProcessor::new(16, "", HashAlgorithm::CborFnv);
        let wide = [
            0, 23, 24, 255, 256, 65535, 65536, 4294967295, 100000, 1, 2, 3, 4, 5, 6, 7,
        ];
        assert_eq!(
            p.block_keys(None, &wide, "llama", None).unwrap(),
            vec![7500070982548027960]
        );
        // A multi-modal identifier on block 0 taints it and every later block.
        let p = TokenProcessor::new(16, "test-seed", HashAlgorithm::CborFnv);
        let extras = vec![Some(vec!["mm-hash-a".to_string()]), None];
        assert_eq!(
            p.block_keys(None, &seq(32), "test-model", Some(&extras))
                .unwrap(),
            vec![6661987469926989014, 4015567736758660505]
        );
        // The deprecated `blockSize: 8` with seed "test".
        let p = TokenProcessor::new(8, "test", HashAlgorithm::CborFnv);
        assert_eq!(
            p.block_keys(None, &seq(32), "test-model", None).unwrap(),
            vec![
                6683719977758618984,
                5574573566063642785,
                7068802542347683457,
                12009495591083487757
            ]
        );
        // The simulator's token ids of "abcd" × 64 (4 bytes per token, big-endian).
        let sim = vec![0x6162_6364u32; 64];
        assert_eq!(
            p_default()
                .block_keys(None, &sim, "sim-model", None)
                .unwrap(),
            vec![
                5202064870406463230,
                9353981122996173772,
                13368251753089735068,
                10039137947239668690
            ]
        );
    }

    fn p_default() -> TokenProcessor {
        TokenProcessor::new(DEFAULT_BLOCK_SIZE_TOKENS, "", HashAlgorithm::CborFnv)
    }

    #[test]
    fn xxh64_keys_match_llm_d() {
        let p = TokenProcessor::new(16, "test-seed", HashAlgorithm::Xxh64);
        assert_eq!(
            p.block_keys(None, &seq(32), "test-model", None).unwrap(),
            vec![11694654239915353807, 15308833439905929429]
        );
        let p = TokenProcessor::new(16, "", HashAlgorithm::Xxh64);
        assert_eq!(
            p.block_keys(None, &seq(40), "test-model", None).unwrap(),
            vec![13553460584553255540, 9887990258693334188]
        );
        let p = TokenProcessor::new(16, "test-seed", HashAlgorithm::Xxh64);
        let extras = vec![Some(vec!["ab".to_string(), "c".to_string()]), None];
        assert_eq!(
            p.block_keys(None, &seq(32), "test-model", Some(&extras))
                .unwrap(),
            vec![3647355612995769343, 14971317384388327280]
        );
    }

    #[test]
    fn chains_continue_and_partial_blocks_have_no_key() {
        for alg in [HashAlgorithm::CborFnv, HashAlgorithm::Xxh64] {
            let p = TokenProcessor::new(16, "s", alg);
            let full = p.block_keys(None, &seq(64), "m", None).unwrap();
            let tail = p
                .block_keys(Some(full[1]), &seq(64)[32..], "m", None)
                .unwrap();
            assert_eq!(&full[2..], &tail[..]);
            assert!(p.block_keys(None, &seq(15), "m", None).unwrap().is_empty());
            assert_ne!(
                p.block_keys(None, &seq(16), "a", None).unwrap(),
                p.block_keys(None, &seq(16), "b", None).unwrap(),
                "the model seeds the chain"
            );
        }
        let p = p_default();
        assert_eq!(
            p.block_keys(None, &seq(32), "m", Some(&[None])),
            Err(KeysError::ExtrasLength {
                extras: 1,
                blocks: 2
            })
        );
    }

    #[test]
    fn extras_are_read_and_realigned_as_llm_d_does() {
        use rmpv::Value;
        let raw = vec![
            Some(vec![Value::from("img-1"), Value::from(7)]),
            None,
            Some(vec![Value::Array(vec![Value::from("old"), Value::from(3)])]),
        ];
        let e = extras_from_event(&raw);
        assert_eq!(
            e,
            vec![Some(vec!["img-1".into()]), None, Some(vec!["old".into()])]
        );
        // Four small engine blocks into one request block: pooled.
        let four = vec![Some(vec!["a".into()]), None, Some(vec!["b".into()]), None];
        assert_eq!(
            realign_extras(four, 1),
            vec![Some(vec!["a".to_string(), "b".to_string()])]
        );
        // One big engine block over two request blocks: lent to both.
        assert_eq!(
            realign_extras(vec![Some(vec!["x".into()])], 2),
            vec![Some(vec!["x".to_string()]), Some(vec!["x".to_string()])]
        );
    }
}
