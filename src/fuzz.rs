//! Entry points for fuzzing the parsers of outside input.
//!
//! Each function feeds arbitrary bytes to one parser the way the CLI does and
//! throws the result away: an error is a correct answer, a panic, an abort or
//! a hang is a bug. The cargo-fuzz targets in `fuzz/fuzz_targets/` are one
//! line each over these functions, and `tests/fuzz_regressions.rs` runs the
//! same functions over hand-written seeds and saved crashing inputs under
//! stable `cargo test`.
//!
//! Inputs over [`MAX_INPUT`] are ignored to keep fuzzing fast; no other limit
//! is added here, so what a parser accepts is what the real code accepts.
//! Files named by the input (a sweep's `base`) are not opened.

use crate::checkpoint;
use crate::config::Config;
use crate::data::cache::TokenLayout;
use crate::data::corpus::{jsonl_text, read_text, utf8_text, RecordJoin};
use crate::data::token_ids::parse_token_ids;
use crate::data::tokenizer::{Tokenizer, EOT_TEXT};
use crate::experiments::sweep::SweepSpec;
use crate::hf::config::HfConfig;
use crate::hf::weights::parse_index;
use crate::metrics::parse_metrics;
use candle_core::Device;
use std::path::{Path, PathBuf};

/// Inputs longer than this (1 MiB) are skipped.
pub const MAX_INPUT: usize = 1 << 20;

/// The path errors name (nothing is read from it).
fn origin(name: &str) -> PathBuf {
    Path::new("fuzz-input").join(name)
}

/// The input as text, if it is UTF-8 and not too long (the real readers use
/// `read_to_string`, which refuses other bytes before parsing).
fn text(data: &[u8]) -> Option<&str> {
    (data.len() <= MAX_INPUT)
        .then(|| std::str::from_utf8(data).ok())
        .flatten()
}

/// A config file as `--config` reads it (over the `tiny` preset and its own
/// `preset` key), and as resume reads a run's saved `config.toml`.
pub fn config_toml(data: &[u8]) {
    let Some(t) = text(data) else { return };
    let _ = Config::resolve_text(None, t, &origin("config.toml"), &[]);
    let _ = Config::from_toml_text(t, &origin("config.toml"));
}

/// One `--set` override (the input after `--set`): [`crate::config::apply_set`] on the
/// default (`tiny`) config's table, then typed and validated, as the CLI does.
pub fn config_set(data: &[u8]) {
    if let Some(t) = text(data) {
        let _ = Config::resolve(None, None, &[t.to_string()]);
    }
}

/// A sweep file, and its runs when there are few enough to resolve quickly.
pub fn sweep_toml(data: &[u8]) {
    let Some(t) = text(data) else { return };
    let Ok(mut spec) = SweepSpec::from_text(t, &origin("sweep.toml")) else {
        return;
    };
    spec.base = None;
    if spec.run_count().is_ok_and(|n| n <= 64) {
        let _ = spec.cells();
    }
}

/// A checkpoint's `model.safetensors` / `optimizer.safetensors` bytes.
pub fn safetensors(data: &[u8]) {
    if data.len() <= MAX_INPUT {
        let _ =
            checkpoint::read_safetensors_bytes(data, &origin("model.safetensors"), &Device::Cpu);
    }
}

/// A moescope checkpoint's `config.json` (eval, generate).
pub fn checkpoint_config_json(data: &[u8]) {
    if let Some(t) = text(data) {
        let _ = checkpoint::parse_config_json(t, &origin("config.json"));
    }
}

/// A Hugging Face `config.json` (analyze, bench hf).
pub fn hf_config_json(data: &[u8]) {
    if let Some(t) = text(data) {
        let _ = HfConfig::from_text(t, &origin("config.json"));
    }
}

/// A Hugging Face `model.safetensors.index.json`.
pub fn hf_index_json(data: &[u8]) {
    if let Some(t) = text(data) {
        let _ = parse_index(t, &origin("model.safetensors.index.json"));
    }
}

/// A token cache file (`MOESTOK1` header and tokens).
pub fn token_file(data: &[u8]) {
    if data.len() <= MAX_INPUT {
        let _ = TokenLayout::parse(data);
    }
}

/// `analyze --token-ids`: a `.npy` or a JSON array of integers.
pub fn token_ids(data: &[u8]) {
    if data.len() <= MAX_INPUT {
        let _ = parse_token_ids(data, &origin("ids.npy"));
    }
}

/// A JSONL corpus file (documents from the `text` fields) and the same bytes
/// as a plain text file.
pub fn corpus_text(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    if let Ok(t) = std::str::from_utf8(data) {
        let _ = jsonl_text(t, &origin("corpus.jsonl"), EOT_TEXT);
    }
    let _ = utf8_text(data.to_vec(), &origin("corpus.txt"));
}

/// A Parquet corpus file. The reader needs a file (the library has no
/// bytes-level Parquet entry), so the bytes go to a temporary file first.
pub fn corpus_parquet(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path =
        std::env::temp_dir().join(format!("moescope-fuzz-{}-{n}.parquet", std::process::id()));
    if std::fs::write(&path, data).is_ok() {
        let _ = read_text(&path, RecordJoin::Documents);
    }
    let _ = std::fs::remove_file(&path);
}

/// A Hugging Face `tokenizer.json` (`data.tokenizer`), then a short round trip.
pub fn tokenizer_json(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    if let Ok(tok) = Tokenizer::from_json_bytes(data, &origin("tokenizer.json")) {
        let _ = tok.vocab_size();
        if let Ok(ids) = tok.encode_with_eot("Hello, world!<|endoftext|>héllo 123") {
            let _ = tok.decode(&ids);
        }
    }
}

/// A run's `metrics.jsonl` (report, sweep results, resume).
pub fn metrics_jsonl(data: &[u8]) {
    if let Some(t) = text(data) {
        let _ = parse_metrics(t);
    }
}
