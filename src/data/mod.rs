//! Data: corpora in, token files out, batches for training and evaluation.
//!
//! A corpus is tokenised once into a memory-mapped token file in the cache
//! (keyed by the tokeniser and a hash of the source), and reused while the
//! source is unchanged.

pub mod cache;
pub mod corpus;
pub mod datasets;
pub mod synthetic;
pub mod token_ids;
pub mod tokenizer;

use crate::config::DataConfig;
use crate::{Error, Result};
use cache::TokenFile;
use corpus::{RecordJoin, Split};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokenizer::{hex, Tokenizer};

/// A tokenised dataset: train and validation token files (and test when the
/// corpus has one).
#[derive(Debug)]
pub struct Dataset {
    pub tokenizer: Tokenizer,
    pub train: TokenFile,
    pub valid: TokenFile,
    pub test: Option<TokenFile>,
    /// True topic of every token (built-in corpus only): (train, valid).
    pub topics: Option<(TokenFile, TokenFile)>,
    /// Human-readable description of the source.
    pub source: String,
}

/// The cache folder: `data.cache_dir`, `$MOESCOPE_CACHE`, `$XDG_CACHE_HOME/moescope`
/// or `~/.cache/moescope`.
pub fn cache_dir(cfg: &DataConfig) -> PathBuf {
    if !cfg.cache_dir.is_empty() {
        return PathBuf::from(&cfg.cache_dir);
    }
    if let Some(p) = std::env::var_os("MOESCOPE_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("moescope");
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(".cache/moescope")
}

/// The tokeniser spec `data.tokenizer` resolves to (`auto`: bytes for the
/// built-in corpus, gpt2 otherwise).
pub fn tokenizer_spec(cfg: &DataConfig) -> String {
    if cfg.tokenizer == "auto" {
        if cfg.path.is_empty() && cfg.dataset == "builtin" {
            "bytes".into()
        } else {
            "gpt2".into()
        }
    } else {
        cfg.tokenizer.clone()
    }
}

fn progress_bar(total: u64, msg: &str, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(total);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("template"),
    );
    b.set_message(msg.to_string());
    b
}

/// Tokenise text in parallel. Documents are split at `<|endoftext|>`; long
/// documents are cut into chunks at a newline followed by a non-space
/// character, which GPT-2's pre-tokeniser never merges across.
pub fn tokenize_parallel(
    tok: &Tokenizer,
    text: &str,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<u32>> {
    const CHUNK: usize = 1 << 20;
    let mut pieces: Vec<(&str, bool)> = Vec::new(); // (text, eot after)
    let docs: Vec<&str> = text.split(tokenizer::EOT_TEXT).collect();
    for (di, doc) in docs.iter().enumerate() {
        let mut rest = *doc;
        while rest.len() > CHUNK {
            let mut cut = None;
            let bytes = rest.as_bytes();
            for i in CHUNK..rest.len() - 1 {
                if bytes[i] == b'\n'
                    && !bytes[i + 1].is_ascii_whitespace()
                    && rest.is_char_boundary(i + 1)
                {
                    cut = Some(i + 1);
                    break;
                }
            }
            let Some(c) = cut else { break };
            pieces.push((&rest[..c], false));
            rest = &rest[c..];
        }
        pieces.push((rest, di + 1 < docs.len()));
    }
    let eot = tok.eot();
    let parts: Vec<Vec<u32>> = pieces
        .par_iter()
        .map(|(p, eot_after)| {
            let mut ids = tok.encode(p)?;
            if *eot_after {
                ids.extend(eot);
            }
            bar.inc(p.len() as u64);
            Ok(ids)
        })
        .collect::<Result<_>>()?;
    Ok(parts.concat())
}

fn hash_files(files: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    for f in files {
        let mut file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
        h.update(
            f.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .as_bytes(),
        );
        std::io::copy(&mut file, &mut h).map_err(|e| Error::io(f, e))?;
    }
    Ok(hex(&h.finalize()))
}

fn key(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex(&h.finalize())[..20].to_string()
}

/// Open a cached token file when it exists and matches, else build it with `make`.
fn cached(
    path: &Path,
    tok_id: &str,
    hash: &str,
    make: impl FnOnce() -> Result<Vec<u32>>,
    split: &str,
) -> Result<TokenFile> {
    if let Ok(f) = TokenFile::open(path) {
        if f.header.tokenizer == tok_id && f.header.source_hash == hash {
            return Ok(f);
        }
    }
    let toks = make()?;
    TokenFile::write(path, &toks, tok_id, hash, split)?;
    TokenFile::open(path)
}

impl Dataset {
    /// Resolve `cfg` to token files: the built-in corpus, a named dataset, or
    /// `cfg.path`. `progress` shows bars for downloads and tokenisation.
    pub fn load(cfg: &DataConfig, progress: bool) -> Result<Dataset> {
        let tok = Tokenizer::from_spec(&tokenizer_spec(cfg))?;
        Self::load_with(cfg, tok, progress)
    }

    /// [`Dataset::load`] with the tokeniser given (e.g. a run's own copy of
    /// its `tokenizer.json`) instead of `cfg.tokenizer`.
    pub fn load_with(cfg: &DataConfig, tok: Tokenizer, progress: bool) -> Result<Dataset> {
        let mut ds = Self::load_whole(cfg, tok, progress)?;
        if cfg.max_train_tokens > 0 && cfg.max_train_tokens < ds.train.len() as u64 {
            ds.train.truncate(cfg.max_train_tokens);
            if let Some((t, _)) = ds.topics.as_mut() {
                t.truncate(cfg.max_train_tokens);
            }
            ds.source = format!(
                "{} (first {} training tokens: data.max_train_tokens)",
                ds.source, cfg.max_train_tokens
            );
        }
        Ok(ds)
    }

    /// [`Dataset::load`] without the `max_train_tokens` cap.
    fn load_whole(cfg: &DataConfig, tok: Tokenizer, progress: bool) -> Result<Dataset> {
        let cache = cache_dir(cfg);
        if !cfg.path.is_empty() {
            let p = PathBuf::from(&cfg.path);
            return Self::from_path(&p, RecordJoin::Documents, cfg, tok, &cache, progress);
        }
        if cfg.dataset == "builtin" {
            return Self::builtin(cfg, tok, &cache);
        }
        let ds = datasets::named(&cfg.dataset)?;
        let dir = datasets::ensure(ds, &cache.join("datasets"), progress)?;
        Self::from_path(&dir, ds.join, cfg, tok, &cache, progress)
    }

    fn builtin(cfg: &DataConfig, tok: Tokenizer, cache: &Path) -> Result<Dataset> {
        let tok_id = tok.id();
        let hash = format!(
            "builtin-v{}-{}-{}",
            synthetic::GENERATOR_VERSION,
            cfg.builtin_bytes,
            cfg.builtin_topics
        );
        let k = key(&[&tok_id, &hash, &cfg.val_fraction.to_string()]);
        let dir = cache.join("tokens");
        let paths: Vec<PathBuf> = ["train", "valid", "train-topics", "valid-topics"]
            .iter()
            .map(|s| dir.join(format!("builtin-{k}-{s}.tok")))
            .collect();
        let all_ok = paths.iter().all(|p| {
            TokenFile::open(p)
                .map(|f| f.header.source_hash == hash)
                .unwrap_or(false)
        });
        if !all_ok {
            let docs = synthetic::generate(cfg.builtin_bytes, cfg.builtin_topics);
            if docs.len() < 2 {
                return Err(Error::config(
                    "data.builtin_bytes",
                    format!(
                        "{} bytes make {} document(s), but training and validation need one each at least; raise it (the default is {})",
                        cfg.builtin_bytes,
                        docs.len(),
                        DataConfig::default().builtin_bytes
                    ),
                ));
            }
            let n_val = ((docs.len() as f64 * cfg.val_fraction).ceil() as usize)
                .clamp(1, docs.len().saturating_sub(1).max(1));
            let (train_docs, val_docs) = docs.split_at(docs.len() - n_val);
            for (docs, name, ti) in [(train_docs, "train", 0), (val_docs, "valid", 1)] {
                let mut toks = Vec::new();
                let mut topics = Vec::new();
                for d in docs {
                    let ids = tok.encode(&d.text)?;
                    topics.extend(std::iter::repeat_n(d.topic as u32, ids.len()));
                    toks.extend(ids);
                    if let Some(e) = tok.eot() {
                        toks.push(e);
                        topics.push(synthetic::NO_TOPIC as u32);
                    }
                }
                TokenFile::write(&paths[ti], &toks, &tok_id, &hash, name)?;
                TokenFile::write(&paths[ti + 2], &topics, "topics", &hash, name)?;
            }
        }
        let open = |i: usize| TokenFile::open(&paths[i]);
        let ds = Dataset {
            train: open(0)?,
            valid: open(1)?,
            test: None,
            topics: Some((open(2)?, open(3)?)),
            tokenizer: tok,
            source: format!(
                "builtin synthetic corpus ({} topics, {} bytes)",
                cfg.builtin_topics, cfg.builtin_bytes
            ),
        };
        ds.check()?;
        Ok(ds)
    }

    fn from_path(
        path: &Path,
        join: RecordJoin,
        cfg: &DataConfig,
        tok: Tokenizer,
        cache: &Path,
        progress: bool,
    ) -> Result<Dataset> {
        let files = corpus::discover(path)?;
        let tok_id = tok.id();
        let dir = cache.join("tokens");
        let join_s = format!("{join:?}");
        let build = |fs: &[PathBuf], what: &str| -> Result<Vec<u32>> {
            let mut text = String::new();
            for (i, f) in fs.iter().enumerate() {
                if i > 0 && join == RecordJoin::Documents {
                    text.push_str(tokenizer::EOT_TEXT);
                }
                text.push_str(&corpus::read_text(f, join)?);
            }
            if text.trim().is_empty() {
                return Err(Error::Data(format!(
                    "{}: the {what} text is empty",
                    fs[0].display()
                )));
            }
            let bar = progress_bar(text.len() as u64, &format!("tokenising {what}"), progress);
            let t = tokenize_parallel(&tok, &text, &bar)?;
            bar.finish_and_clear();
            Ok(t)
        };
        let open_split = |fs: &[PathBuf], name: &str| -> Result<TokenFile> {
            let h = hash_files(fs)?;
            let k = key(&[&tok_id, &h, &join_s]);
            cached(
                &dir.join(format!("{k}-{name}.tok")),
                &tok_id,
                &h,
                || build(fs, name),
                name,
            )
        };
        let (train, valid) = if !files.train.is_empty() && !files.valid.is_empty() {
            (
                open_split(&files.train, "train")?,
                open_split(&files.valid, "valid")?,
            )
        } else {
            // Deterministic holdout: the last `val_fraction` of the tokens.
            let src = if files.train.is_empty() {
                &files.unsplit
            } else {
                &files.train
            };
            let h = hash_files(src)?;
            let k = key(&[&tok_id, &h, &join_s, &cfg.val_fraction.to_string()]);
            let tp = dir.join(format!("{k}-holdout-train.tok"));
            let vp = dir.join(format!("{k}-holdout-valid.tok"));
            let ok = |p: &Path| {
                TokenFile::open(p)
                    .map(|f| f.header.source_hash == h && f.header.tokenizer == tok_id)
                    .unwrap_or(false)
            };
            if !(ok(&tp) && ok(&vp)) {
                let all = build(src, "corpus")?;
                let n_val = ((all.len() as f64) * cfg.val_fraction).round() as usize;
                let cut = all.len() - n_val.max(1).min(all.len());
                TokenFile::write(&tp, &all[..cut], &tok_id, &h, "train")?;
                TokenFile::write(&vp, &all[cut..], &tok_id, &h, "valid")?;
            }
            (TokenFile::open(&tp)?, TokenFile::open(&vp)?)
        };
        let test = if files.test.is_empty() {
            None
        } else {
            Some(open_split(&files.test, "test")?)
        };
        let ds = Dataset {
            tokenizer: tok,
            train,
            valid,
            test,
            topics: None,
            source: path.display().to_string(),
        };
        ds.check()?;
        Ok(ds)
    }

    fn check(&self) -> Result<()> {
        if self.train.len() < 2 {
            return Err(Error::Data(format!(
                "{}: the training split has {} tokens",
                self.source,
                self.train.len()
            )));
        }
        if self.valid.len() < 2 {
            return Err(Error::Data(format!(
                "{}: the validation split has {} tokens",
                self.source,
                self.valid.len()
            )));
        }
        Ok(())
    }

    /// The token file of a split.
    pub fn split(&self, s: Split) -> Result<&TokenFile> {
        match s {
            Split::Train => Ok(&self.train),
            Split::Valid => Ok(&self.valid),
            Split::Test => self
                .test
                .as_ref()
                .ok_or_else(|| Error::Data(format!("{}: no test split", self.source))),
        }
    }
}

/// A batch of `b` sequences of `t` tokens: inputs and next-token targets, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub b: usize,
    pub t: usize,
}

/// The training batch for (`seed`, `step`, `micro`): `b` windows at offsets
/// drawn uniformly, from an RNG seeded by those three numbers alone. No
/// sampler state exists, so a resumed run sees exactly the same batches.
pub fn train_batch(
    data: &TokenFile,
    seed: u64,
    step: usize,
    micro: usize,
    b: usize,
    t: usize,
) -> Result<Batch> {
    let n = data.len();
    if n < t + 1 {
        return Err(Error::Data(format!(
            "{}: the training split has {n} tokens, fewer than seq_len + 1 = {}; lower model.seq_len or add data",
            data.path.display(),
            t + 1
        )));
    }
    let mix = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((step as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add((micro as u64).wrapping_mul(0x94D0_49BB_1331_11EB));
    let mut rng = ChaCha8Rng::seed_from_u64(mix);
    let mut inputs = Vec::with_capacity(b * t);
    let mut targets = Vec::with_capacity(b * t);
    for _ in 0..b {
        let o = rng.random_range(0..=n - t - 1);
        data.extend_into(&mut inputs, o, t);
        data.extend_into(&mut targets, o + 1, t);
    }
    Ok(Batch {
        inputs,
        targets,
        b,
        t,
    })
}

/// Evaluation windows over a split: consecutive, non-overlapping (start, len)
/// windows whose targets cover tokens 1..n exactly once (or the first
/// `max_tokens` of them when non-zero).
pub fn eval_windows(n: usize, t: usize, max_tokens: usize) -> Vec<(usize, usize)> {
    let mut targets = n.saturating_sub(1);
    if max_tokens > 0 {
        targets = targets.min(max_tokens);
    }
    let mut out = Vec::new();
    let mut start = 0;
    while start < targets {
        let len = t.min(targets - start);
        out.push((start, len));
        start += len;
    }
    out
}

/// The tokens `analyze` reads from a split: the first `n + 1` (all of them
/// when the split is shorter), so that each of the `n` analysed positions has
/// its next token, the target of the next-token loss. Both analyses (moescope
/// and Hugging Face models) load through here.
pub fn analysis_tokens(split: &TokenFile, n: usize) -> Vec<u32> {
    let mut out = Vec::new();
    split.extend_into(&mut out, 0, (n + 1).min(split.len()));
    out
}

/// Forward-pass batches over `items`: consecutive runs of at most `batch`
/// items, each item `same` as the run's first (e.g. windows of equal length).
pub fn batch_ranges<T>(
    items: &[T],
    batch: usize,
    same: impl Fn(&T, &T) -> bool,
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < items.len() {
        let mut j = i + 1;
        while j < items.len() && j - i < batch.max(1) && same(&items[i], &items[j]) {
            j += 1;
        }
        out.push(i..j);
        i = j;
    }
    out
}

/// Unigram entropy (nats) of a token stream: the loss of the best model that
/// ignores context.
pub fn unigram_entropy(data: &TokenFile) -> f64 {
    let mut counts = std::collections::HashMap::<u32, u64>::new();
    for i in 0..data.len() {
        *counts.entry(data.get(i)).or_default() += 1;
    }
    let n = data.len() as f64;
    counts
        .values()
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.ln()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eval_windows_cover_every_target_once() {
        for (n, t, m) in [(10, 4, 0), (9, 4, 0), (5, 8, 0), (100, 7, 20), (2, 3, 0)] {
            let w = eval_windows(n, t, m);
            let covered: usize = w.iter().map(|x| x.1).sum();
            let want = if m > 0 { (n - 1).min(m) } else { n - 1 };
            assert_eq!(covered, want);
            for pair in w.windows(2) {
                assert_eq!(pair[0].0 + pair[0].1, pair[1].0);
            }
            assert!(w.iter().all(|x| x.1 <= t));
        }
    }

    #[test]
    fn batch_ranges_group_equal_items_up_to_batch() {
        let w = [4, 4, 4, 4, 4, 2];
        assert_eq!(
            batch_ranges(&w, 2, |a, b| a == b),
            vec![0..2, 2..4, 4..5, 5..6]
        );
        assert!(batch_ranges::<u8>(&[], 3, |a, b| a == b).is_empty());
    }

    #[test]
    fn batches_are_deterministic_and_shifted() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.tok");
        let toks: Vec<u32> = (0..1000).collect();
        TokenFile::write(&p, &toks, "bytes", "h", "train").unwrap();
        let f = TokenFile::open(&p).unwrap();
        let a = train_batch(&f, 1, 5, 0, 4, 16).unwrap();
        assert_eq!(a, train_batch(&f, 1, 5, 0, 4, 16).unwrap());
        assert_ne!(a, train_batch(&f, 1, 6, 0, 4, 16).unwrap());
        for (x, y) in a.inputs.iter().zip(&a.targets) {
            assert_eq!(x + 1, *y);
        }
        assert!(train_batch(&f, 1, 0, 0, 1, 1000).is_err());
    }

    /// n analysed positions need n + 1 tokens (the last one's target); the
    /// moescope path once read only n.
    #[test]
    fn analysis_tokens_include_the_last_target() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v.tok");
        let toks: Vec<u32> = (0..100).collect();
        TokenFile::write(&p, &toks, "bytes", "h", "valid").unwrap();
        let f = TokenFile::open(&p).unwrap();
        assert_eq!(analysis_tokens(&f, 10), (0..11).collect::<Vec<u32>>());
        assert_eq!(analysis_tokens(&f, 99).len(), 100);
        assert_eq!(analysis_tokens(&f, 100).len(), 100);
        assert_eq!(analysis_tokens(&f, 1000).len(), 100);
        // Every analysed position has its target: the windows of n tokens
        // read inputs [0, n) and targets [1, n + 1).
        let n = 10;
        let covered: usize = eval_windows(analysis_tokens(&f, n).len(), 4, 0)
            .iter()
            .map(|w| w.1)
            .sum();
        assert_eq!(covered, n);
    }

    /// `data.builtin_bytes = 0` once panicked splitting an empty corpus.
    #[test]
    fn empty_builtin_corpus_is_a_config_error() {
        let d = tempfile::tempdir().unwrap();
        let cfg = DataConfig {
            builtin_bytes: 0,
            cache_dir: d.path().display().to_string(),
            ..Default::default()
        };
        let e = Dataset::load(&cfg, false).unwrap_err().to_string();
        assert!(e.contains("data.builtin_bytes"), "{e}");
    }

    #[test]
    fn builtin_corpus_has_topics_per_token() {
        let d = tempfile::tempdir().unwrap();
        let cfg = DataConfig {
            builtin_bytes: 20_000,
            cache_dir: d.path().display().to_string(),
            ..Default::default()
        };
        let ds = Dataset::load(&cfg, false).unwrap();
        let (tt, vt) = ds.topics.as_ref().unwrap();
        assert_eq!(tt.len(), ds.train.len());
        assert_eq!(vt.len(), ds.valid.len());
        // Cached: a second load reads the same files.
        let ds2 = Dataset::load(&cfg, false).unwrap();
        assert_eq!(ds2.train.to_vec(), ds.train.to_vec());
    }
}
