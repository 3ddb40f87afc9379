//! Memory-mapped token files.
//!
//! Layout: the 8 bytes `MOESTOK1`, a little-endian u32 header length, a JSON
//! header (`tokenizer`, `dtype` = `u16`|`u32`, `count`, `source_hash`,
//! `split`), then `count` little-endian token ids. Written atomically.

use crate::fsutil::write_atomic_with;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"MOESTOK1";

/// The header of a token file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenHeader {
    pub tokenizer: String,
    pub dtype: String,
    pub count: u64,
    pub source_hash: String,
    pub split: String,
}

/// A token file's header and where its tokens are, checked against its size.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLayout {
    pub header: TokenHeader,
    /// Byte offset of the first token.
    pub offset: usize,
    /// Bytes per token (2 or 4).
    pub width: usize,
}

impl TokenLayout {
    /// Parse the whole file's bytes; the error says what is wrong.
    pub fn parse(bytes: &[u8]) -> std::result::Result<TokenLayout, &'static str> {
        if bytes.len() < 12 || &bytes[..8] != MAGIC {
            return Err("bad magic");
        }
        let hlen = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        if bytes.len() < 12 + hlen {
            return Err("short header");
        }
        let header: TokenHeader =
            serde_json::from_slice(&bytes[12..12 + hlen]).map_err(|_| "bad header")?;
        let width = match header.dtype.as_str() {
            "u16" => 2,
            "u32" => 4,
            _ => return Err("bad dtype"),
        };
        let offset = 12 + hlen;
        // A header may claim any count: the product must not overflow.
        if Some((bytes.len() - offset) as u64) != header.count.checked_mul(width as u64) {
            return Err("size does not match the token count");
        }
        Ok(TokenLayout {
            header,
            offset,
            width,
        })
    }
}

/// A token file, memory-mapped.
#[derive(Debug)]
pub struct TokenFile {
    pub path: PathBuf,
    pub header: TokenHeader,
    map: memmap2::Mmap,
    offset: usize,
    width: usize,
}

impl TokenFile {
    /// Write `tokens` to `path` atomically.
    pub fn write(
        path: &Path,
        tokens: &[u32],
        tokenizer: &str,
        source_hash: &str,
        split: &str,
    ) -> Result<()> {
        let wide = tokens.iter().any(|&t| t > u16::MAX as u32);
        let header = TokenHeader {
            tokenizer: tokenizer.into(),
            dtype: if wide { "u32" } else { "u16" }.into(),
            count: tokens.len() as u64,
            source_hash: source_hash.into(),
            split: split.into(),
        };
        let h = serde_json::to_vec(&header).expect("header serialises");
        write_atomic_with(path, |w| {
            w.write_all(MAGIC)?;
            w.write_all(&(h.len() as u32).to_le_bytes())?;
            w.write_all(&h)?;
            if wide {
                for t in tokens {
                    w.write_all(&t.to_le_bytes())?;
                }
            } else {
                for t in tokens {
                    w.write_all(&(*t as u16).to_le_bytes())?;
                }
            }
            Ok(())
        })
    }

    /// Open and validate a token file.
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: token files are written atomically (temp + rename) and never
        // modified in place, so the mapping cannot change under us.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
        let corrupt = |msg: &str| {
            Error::bad_file(
                path,
                format!("{msg}: corrupt or truncated token file; delete it to rebuild"),
            )
        };
        let TokenLayout {
            header,
            offset,
            width,
        } = TokenLayout::parse(&map).map_err(corrupt)?;
        Ok(TokenFile {
            path: path.to_path_buf(),
            header,
            map,
            offset,
            width,
        })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.header.count as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keep only the first `n` tokens (a view: the file is not touched).
    pub fn truncate(&mut self, n: u64) {
        self.header.count = self.header.count.min(n);
    }

    /// Token `i`.
    #[inline]
    pub fn get(&self, i: usize) -> u32 {
        let o = self.offset + i * self.width;
        if self.width == 2 {
            u16::from_le_bytes([self.map[o], self.map[o + 1]]) as u32
        } else {
            u32::from_le_bytes(self.map[o..o + 4].try_into().unwrap())
        }
    }

    /// Append tokens `start..start+len` to `out`.
    pub fn extend_into(&self, out: &mut Vec<u32>, start: usize, len: usize) {
        out.extend((start..start + len).map(|i| self.get(i)));
    }

    /// All tokens.
    pub fn to_vec(&self) -> Vec<u32> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation_detected() {
        let d = tempfile::tempdir().unwrap();
        for toks in [vec![1u32, 2, 65535, 0], vec![1u32, 70000, 3]] {
            let p = d.path().join("t.tok");
            TokenFile::write(&p, &toks, "gpt2", "abc", "train").unwrap();
            let f = TokenFile::open(&p).unwrap();
            assert_eq!(f.to_vec(), toks);
            let bytes = std::fs::read(&p).unwrap();
            std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
            let e = TokenFile::open(&p).unwrap_err().to_string();
            assert!(e.contains("t.tok") && e.contains("truncated"), "{e}");
        }
    }
}
