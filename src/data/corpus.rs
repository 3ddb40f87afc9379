//! Reading corpora: plain text, JSONL with a `text` field, Parquet with a
//! `text` column; a file or a folder with split files.

use super::tokenizer::EOT_TEXT;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// A dataset split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Valid,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }
}

/// How records of JSONL/Parquet files are joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordJoin {
    /// Each record is a document: records are separated by end-of-text.
    Documents,
    /// Records are consecutive pieces of one text (e.g. WikiText lines).
    Concatenate,
}

/// The corpus files found under a path, by split.
#[derive(Debug, Clone, Default)]
pub struct CorpusFiles {
    pub train: Vec<PathBuf>,
    pub valid: Vec<PathBuf>,
    pub test: Vec<PathBuf>,
    /// Files with no split in their name (used with a holdout fraction).
    pub unsplit: Vec<PathBuf>,
}

impl CorpusFiles {
    pub fn get(&self, s: Split) -> &[PathBuf] {
        match s {
            Split::Train => &self.train,
            Split::Valid => &self.valid,
            Split::Test => &self.test,
        }
    }
}

fn is_corpus_file(p: &Path) -> bool {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if name.starts_with('.') {
        return false;
    }
    let stem = name.split('.').next().unwrap_or("");
    if [
        "readme",
        "provenance",
        "license",
        "licence",
        "changelog",
        "citation",
    ]
    .contains(&stem)
    {
        return false;
    }
    let ext = p
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    !matches!(
        ext.as_str(),
        "md" | "json"
            | "py"
            | "sh"
            | "toml"
            | "yaml"
            | "yml"
            | "lock"
            | "zip"
            | "gz"
            | "tok"
            | "tiktoken"
            | "bpe"
    )
}

fn split_of(p: &Path) -> Option<Split> {
    let name = p.file_name()?.to_string_lossy().to_lowercase();
    let tokens: Vec<&str> = name.split(|c: char| !c.is_ascii_alphanumeric()).collect();
    let has = |w: &[&str]| tokens.iter().any(|t| w.contains(t));
    if name.contains("train") {
        Some(Split::Train)
    } else if has(&["valid", "val", "validation", "dev"]) || name.contains("valid") {
        Some(Split::Valid)
    } else if name.contains("test") {
        Some(Split::Test)
    } else {
        None
    }
}

/// Find the corpus files under `path` (a file or a folder, searched recursively).
pub fn discover(path: &Path) -> Result<CorpusFiles> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let mut files = Vec::new();
    if meta.is_file() {
        files.push(path.to_path_buf());
    } else {
        let mut stack = vec![path.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let rd = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
            for entry in rd {
                let p = entry.map_err(|e| Error::io(&dir, e))?.path();
                if p.is_dir() {
                    stack.push(p);
                } else if is_corpus_file(&p) {
                    files.push(p);
                }
            }
        }
        files.sort();
    }
    if files.is_empty() {
        return Err(Error::Data(format!(
            "{}: no corpus files (.txt, .jsonl, .parquet, ...) found",
            path.display()
        )));
    }
    let mut c = CorpusFiles::default();
    if meta.is_file() {
        c.unsplit = files;
        return Ok(c);
    }
    for f in files {
        match split_of(&f) {
            Some(Split::Train) => c.train.push(f),
            Some(Split::Valid) => c.valid.push(f),
            Some(Split::Test) => c.test.push(f),
            None => c.unsplit.push(f),
        }
    }
    if !c.train.is_empty() || !c.valid.is_empty() {
        // Split files exist: other files (notes, fixtures) are not corpus.
        c.unsplit.clear();
    }
    if c.train.is_empty() && c.unsplit.is_empty() {
        return Err(Error::Data(format!(
            "{}: found validation/test files but no training file (a name containing `train`)",
            path.display()
        )));
    }
    Ok(c)
}

/// Read a file as text. `<|endoftext|>` inside the text separates documents;
/// JSONL and Parquet records are joined per `join`.
pub fn read_text(path: &Path, join: RecordJoin) -> Result<String> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let sep = match join {
        RecordJoin::Documents => EOT_TEXT,
        RecordJoin::Concatenate => "",
    };
    match ext.as_str() {
        "jsonl" | "ndjson" => read_jsonl(path, sep),
        "parquet" => read_parquet(path, sep),
        _ => {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            utf8_text(bytes, path)
        }
    }
}

/// A plain text file's bytes as text; `path` only names the file in errors.
pub fn utf8_text(bytes: Vec<u8>, path: &Path) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        Error::bad_file(
            path,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

fn read_jsonl(path: &Path, sep: &str) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    jsonl_text(&text, path, sep)
}

/// The `text` fields of JSONL records joined by `sep` (what [`read_text`]
/// makes of a `.jsonl` file); `path` only names the file in errors.
pub fn jsonl_text(text: &str, path: &Path, sep: &str) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut n = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::bad_file(path, format!("line {}: not JSON: {e}", i + 1)))?;
        let t = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
            Error::bad_file(path, format!("line {}: no string field `text`", i + 1))
        })?;
        if n > 0 {
            out.push_str(sep);
        }
        out.push_str(t);
        n += 1;
    }
    Ok(out)
}

/// [`parquet_text`], with a panic of the Parquet reader on a corrupt file
/// (fuzzing found "Decoder for dict should have been set" from one flipped
/// byte; upstream tracks this class of bug) reported as a bad file rather
/// than taking the process down.
fn read_parquet(path: &Path, sep: &str) -> Result<String> {
    crate::error::contain_panic(|| parquet_text(path, sep)).unwrap_or_else(|why| {
        Err(Error::bad_file(
            path,
            format!("corrupt Parquet file (the reader failed: {why})"),
        ))
    })
}

fn parquet_text(path: &Path, sep: &str) -> Result<String> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let bad = |msg: String| Error::bad_file(path, msg);
    // Read whole, then parse from memory: a corrupt file can make the reader
    // re-read its pages in many small reads (fuzzing found a 326-byte file
    // taking seconds of system time), and corpora are read whole anyway.
    let bytes = bytes::Bytes::from(std::fs::read(path).map_err(|e| Error::io(path, e))?);
    let reader =
        SerializedFileReader::new(bytes).map_err(|e| bad(format!("not a Parquet file: {e}")))?;
    let schema = reader.metadata().file_metadata().schema();
    let text_field = schema
        .get_fields()
        .iter()
        .find(|f| f.name() == "text")
        .cloned()
        .ok_or_else(|| {
            let names: Vec<&str> = schema.get_fields().iter().map(|f| f.name()).collect();
            bad(format!("no column `text` (columns: {})", names.join(", ")))
        })?;
    let projection = parquet::schema::types::Type::group_type_builder(schema.name())
        .with_fields(vec![text_field])
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let rows = reader
        .get_row_iter(Some(projection))
        .map_err(|e| bad(e.to_string()))?;
    let mut out = String::new();
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| bad(format!("row {i}: {e}")))?;
        for (_, field) in row.get_column_iter() {
            if let Field::Str(s) = field {
                if i > 0 {
                    out.push_str(sep);
                }
                out.push_str(s);
            } else if !matches!(field, Field::Null) {
                return Err(bad(format!("row {i}: column `text` is not a string")));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovers_split_files_and_ignores_notes() {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "ptb.train.txt",
            "ptb.valid.txt",
            "ptb.test.txt",
            "PROVENANCE.md",
            "README.md",
            "sample.txt",
        ] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        let c = discover(d.path()).unwrap();
        assert_eq!(c.train.len(), 1);
        assert_eq!(c.valid.len(), 1);
        assert_eq!(c.test.len(), 1);
        assert!(c.unsplit.is_empty());
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.jsonl");
        std::fs::write(&p, "{\"text\": \"a\"}\n{\"txt\": \"b\"}\n").unwrap();
        let e = read_text(&p, RecordJoin::Documents)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a.jsonl") && e.contains("line 2") && e.contains("text"),
            "{e}"
        );
        std::fs::write(&p, "{\"text\": \"a\"}\n{\"text\": \"b\"}\n").unwrap();
        assert_eq!(
            read_text(&p, RecordJoin::Documents).unwrap(),
            "a<|endoftext|>b"
        );
    }
}
