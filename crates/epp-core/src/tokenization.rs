//! Tokenizing text as a model server does, from a Hugging Face `tokenizer.json` on disk.
//!
//! The file is loaded once (at config load for the `token-producer`'s `local` backend, at start-up
//! for `epp sim --tokenizer`) and never fetched from a model hub. Both the picker and the
//! simulator tokenize through this one type, so for the same file and the same text they produce
//! the same token ids.
//!
//! Truncation and padding settings saved in the file are switched off after loading: a model
//! server tokenizes the whole prompt (transformers' default), and a truncated prompt would
//! silently give the picker other ids than the engine.

use std::path::{Path, PathBuf};

/// The generation cue the simulator's chat template (and the `local` backend's) appends after
/// the messages: vLLM's `add_generation_prompt`.
pub const GENERATION_CUE: &str = "assistant\n";

/// Largest `tokenizer.json` accepted (real ones are 2–20 MiB).
pub const MAX_TOKENIZER_FILE_BYTES: u64 = 256 * 1024 * 1024;

/// Why a tokenizer could not be loaded or could not encode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TokenizerError(pub String);

/// A loaded `tokenizer.json`.
pub struct HfTokenizer {
    path: PathBuf,
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl HfTokenizer {
    /// Load `path`. The error says which file and what is wrong with it (missing, unreadable,
    /// too large, not a tokenizer).
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let shown = path.display();
        let meta = std::fs::metadata(path)
            .map_err(|e| TokenizerError(format!("cannot read {shown}: {e}")))?;
        if !meta.is_file() {
            return Err(TokenizerError(format!("{shown} is not a file")));
        }
        if meta.len() > MAX_TOKENIZER_FILE_BYTES {
            return Err(TokenizerError(format!(
                "{shown} has {} bytes, more than the {MAX_TOKENIZER_FILE_BYTES} accepted for a tokenizer.json",
                meta.len()
            )));
        }
        let bytes =
            std::fs::read(path).map_err(|e| TokenizerError(format!("cannot read {shown}: {e}")))?;
        let mut inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            TokenizerError(format!("{shown} is not a Hugging Face tokenizer.json: {e}"))
        })?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| TokenizerError(format!("{shown}: cannot disable truncation: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            inner,
        })
    }

    /// The file this tokenizer was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The token ids of `text`; `add_special_tokens` runs the file's post-processor (BOS/EOS and
    /// the like), as vLLM's `add_special_tokens` does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError(format!("tokenizing failed: {e}")))
    }

    /// The vocabulary entry of a token id (vLLM's `token_strs`), if the id is in the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Tokenizers trained in tests: a small word-level vocabulary over the given sentences, saved as
/// `tokenizer.json` into `dir`. Tests of both crates use it to load the same file in the picker
/// and the simulator.
#[doc(hidden)]
pub mod testing {
    use std::path::{Path, PathBuf};

    use tokenizers::models::wordlevel::{WordLevel, WordLevelTrainerBuilder};
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::{
        AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, TokenizerBuilder,
    };

    /// Train a word-level tokenizer (whitespace and punctuation split, `[UNK]` for unknown words)
    /// on `sentences`, write it to `dir/tokenizer.json` and return the path.
    pub fn train_word_level(dir: &Path, sentences: &[&str]) -> Result<PathBuf, String> {
        let e = |what: &str, err: &dyn std::fmt::Display| format!("{what}: {err}");
        let mut trainer = WordLevelTrainerBuilder::default()
            .special_tokens(vec![AddedToken::from("[UNK]", true)])
            .build()
            .map_err(|x| e("trainer", &x))?;
        let model = WordLevel::builder()
            .unk_token("[UNK]".into())
            .build()
            .map_err(|x| e("model", &x))?;
        let mut tk = TokenizerBuilder::<
            WordLevel,
            NormalizerWrapper,
            Whitespace,
            PostProcessorWrapper,
            DecoderWrapper,
        >::new()
        .with_model(model)
        .with_pre_tokenizer(Some(Whitespace {}))
        .build()
        .map_err(|x| e("tokenizer", &x))?;
        let corpus = dir.join("corpus.txt");
        std::fs::write(&corpus, sentences.join("\n")).map_err(|x| e("corpus", &x))?;
        let files = vec![corpus.to_string_lossy().into_owned()];
        let tk = tk
            .train_from_files(&mut trainer, files)
            .map_err(|x| e("train", &x))?;
        let path = dir.join("tokenizer.json");
        tk.save(&path, true).map_err(|x| e("save", &x))?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_a_trained_file_and_encodes() {
        let dir = tempfile::tempdir().unwrap();
        let path = testing::train_word_level(dir.path(), &["the cat sat", "the dog ran"]).unwrap();
        let tk = HfTokenizer::from_file(&path).unwrap();
        let ids = tk.encode("the cat ran", false).unwrap();
        assert_eq!(ids.len(), 3);
        assert_eq!(tk.id_to_token(ids[1]).as_deref(), Some("cat"));
        // Unknown words map to [UNK].
        let unk = tk.encode("zebra", false).unwrap();
        assert_eq!(tk.id_to_token(unk[0]).as_deref(), Some("[UNK]"));
        assert!(tk.vocab_size() >= 6);
    }

    #[test]
    fn refuses_missing_and_invalid_files_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        let e = HfTokenizer::from_file(&missing).unwrap_err();
        assert!(
            e.0.starts_with(&format!("cannot read {}", missing.display())),
            "{e}"
        );
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, b"{\"model\": 3}").unwrap();
        let e = HfTokenizer::from_file(&bad).unwrap_err();
        assert!(
            e.0.starts_with(&format!(
                "{} is not a Hugging Face tokenizer.json",
                bad.display()
            )),
            "{e}"
        );
        let e = HfTokenizer::from_file(dir.path()).unwrap_err();
        assert!(e.0.ends_with("is not a file"), "{e}");
    }
}
