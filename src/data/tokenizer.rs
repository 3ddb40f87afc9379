//! Tokenisers: GPT-2 BPE (offline, ranks shipped by `tiktoken-rs`), any
//! Hugging Face `tokenizer.json`, and raw bytes.

use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The document separator in raw text (TinyStories, GPT-2 corpora).
pub const EOT_TEXT: &str = "<|endoftext|>";

/// A tokeniser with an end-of-text id used between documents.
pub enum Tokenizer {
    /// UTF-8 bytes 0..=255, end-of-text = 256.
    Bytes,
    /// GPT-2 BPE (r50k_base), end-of-text = 50256.
    Gpt2(&'static tiktoken_rs::CoreBPE),
    /// A Hugging Face tokenizer.json.
    Hf {
        tok: Box<tokenizers::Tokenizer>,
        path: PathBuf,
        hash: String,
        eot: Option<u32>,
    },
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer({})", self.id())
    }
}

impl Tokenizer {
    /// `bytes`, `gpt2`, or a path to a `tokenizer.json`.
    pub fn from_spec(spec: &str) -> Result<Self> {
        match spec {
            "bytes" => Ok(Tokenizer::Bytes),
            "gpt2" => Ok(Tokenizer::Gpt2(tiktoken_rs::r50k_base_singleton())),
            path => Self::from_file(Path::new(path)),
        }
    }

    /// Load a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::config(
                "data.tokenizer",
                format!(
                    "`{}`: {e} (expected `gpt2`, `bytes` or the path of a tokenizer.json)",
                    path.display()
                ),
            )
        })?;
        Self::from_json_bytes(&bytes, path)
    }

    /// [`Tokenizer::from_file`] on the file's bytes; `path` names the
    /// tokenizer in errors and is kept as its origin.
    pub fn from_json_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        // `tokenizers` panics on some malformed files (fuzzing found an
        // `expect` on a bad `decoder`); contain it as a bad file.
        let not_tokenizer =
            |e: String| Error::bad_file(path, format!("not a Hugging Face tokenizer.json: {e}"));
        let mut tok = crate::error::contain_panic(|| tokenizers::Tokenizer::from_bytes(bytes))
            .map_err(not_tokenizer)?
            .map_err(|e| not_tokenizer(e.to_string()))?;
        // A tokenizer.json may carry truncation or padding for model inputs
        // (often max_length 512): a corpus is tokenised whole, so both are
        // off. (Fuzzing found the truncation `stride` panicking in encode.)
        tok.with_truncation(None)
            .map_err(|e| not_tokenizer(e.to_string()))?;
        tok.with_padding(None);
        let hash = hex(&Sha256::digest(bytes))[..16].to_string();
        let eot = [
            "<|endoftext|>",
            "</s>",
            "<|end_of_text|>",
            "<eos>",
            "<|im_end|>",
            "[SEP]",
        ]
        .iter()
        .find_map(|t| tok.token_to_id(t));
        Ok(Tokenizer::Hf {
            tok: Box::new(tok),
            path: path.to_path_buf(),
            hash,
            eot,
        })
    }

    /// A stable identifier (part of the token cache key).
    pub fn id(&self) -> String {
        match self {
            Tokenizer::Bytes => "bytes".into(),
            Tokenizer::Gpt2(_) => "gpt2".into(),
            Tokenizer::Hf { hash, .. } => format!("hf-{hash}"),
        }
    }

    /// Number of token ids (including special tokens).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 257,
            Tokenizer::Gpt2(_) => 50257,
            Tokenizer::Hf { tok, .. } => tok.get_vocab_size(true),
        }
    }

    /// The end-of-text id placed between documents, if the tokeniser has one.
    pub fn eot(&self) -> Option<u32> {
        match self {
            Tokenizer::Bytes => Some(256),
            Tokenizer::Gpt2(_) => Some(50256),
            Tokenizer::Hf { eot, .. } => *eot,
        }
    }

    /// Encode one document (no special tokens are interpreted).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(match self {
            Tokenizer::Bytes => text.bytes().map(u32::from).collect(),
            Tokenizer::Gpt2(bpe) => bpe.encode_ordinary(text),
            Tokenizer::Hf { tok, path, .. } => tok
                .encode_fast(text, false)
                .map_err(|e| Error::bad_file(path, format!("tokenizer failed: {e}")))?
                .get_ids()
                .to_vec(),
        })
    }

    /// Encode text in which `<|endoftext|>` separates documents.
    pub fn encode_with_eot(&self, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for (i, doc) in text.split(EOT_TEXT).enumerate() {
            if i > 0 {
                out.extend(self.eot());
            }
            out.extend(self.encode(doc)?);
        }
        Ok(out)
    }

    /// Decode ids to text (lossy for byte sequences that are not UTF-8).
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Bytes => {
                let mut bytes = Vec::new();
                for &i in ids {
                    if i < 256 {
                        bytes.push(i as u8);
                    } else {
                        bytes.extend_from_slice(EOT_TEXT.as_bytes());
                    }
                }
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Tokenizer::Gpt2(bpe) => {
                let ids: Vec<u32> = ids.iter().copied().filter(|&i| i < 50257).collect();
                match bpe.decode_bytes(&ids) {
                    Ok(b) => String::from_utf8_lossy(&b).into_owned(),
                    Err(_) => String::new(),
                }
            }
            Tokenizer::Hf { tok, .. } => tok.decode(ids, false).unwrap_or_default(),
        }
    }
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_and_padding_of_a_tokenizer_json_are_ignored() {
        let json = r#"{"version":"1.0","added_tokens":[],"normalizer":null,
            "pre_tokenizer":{"type":"WhitespaceSplit"},"post_processor":null,"decoder":null,
            "truncation":{"direction":"Right","max_length":1,"strategy":"LongestFirst","stride":0},
            "padding":{"strategy":{"Fixed":8},"direction":"Right","pad_to_multiple_of":null,
                "pad_id":0,"pad_type_id":0,"pad_token":"[UNK]"},
            "model":{"type":"WordLevel","unk_token":"[UNK]",
                "vocab":{"[UNK]":0,"hello":1,"world":2}}}"#;
        let t = Tokenizer::from_json_bytes(json.as_bytes(), Path::new("tokenizer.json")).unwrap();
        assert_eq!(t.encode("hello world hello").unwrap(), vec![1, 2, 1]);
    }

    #[test]
    fn bytes_and_gpt2_round_trip() {
        let text = "Once upon a time, the café's fox — naïve — jumped.\nThe end.";
        for spec in ["bytes", "gpt2"] {
            let t = Tokenizer::from_spec(spec).unwrap();
            let ids = t.encode(text).unwrap();
            assert_eq!(t.decode(&ids), text, "{spec}");
            assert!(ids.iter().all(|&i| (i as usize) < t.vocab_size()));
        }
    }

    #[test]
    fn eot_separates_documents() {
        let t = Tokenizer::from_spec("gpt2").unwrap();
        let ids = t.encode_with_eot("Hello<|endoftext|>World").unwrap();
        assert_eq!(ids.iter().filter(|&&i| i == 50256).count(), 1);
        assert_eq!(t.decode(&ids), "Hello<|endoftext|>World");
        let b = Tokenizer::Bytes;
        let ids = b.encode_with_eot("ab<|endoftext|>c").unwrap();
        assert_eq!(ids, vec![97, 98, 256, 99]);
    }

    #[test]
    fn gpt2_matches_known_ids() {
        // Reference ids from the GPT-2 tokenizer ("Hello world" -> [15496, 995]).
        let t = Tokenizer::from_spec("gpt2").unwrap();
        assert_eq!(t.encode("Hello world").unwrap(), vec![15496, 995]);
    }

    #[test]
    fn missing_tokenizer_file_is_a_clear_error() {
        let e = Tokenizer::from_spec("/nonexistent/tokenizer.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data.tokenizer") && e.contains("/nonexistent/tokenizer.json"),
            "{e}"
        );
    }
}
