//! `--model org/name`: find a checkpoint in the standard Hugging Face cache,
//! or download it there (hf-hub) when online.
//!
//! The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`, laid out as transformers lays it out
//! (`models--org--name/{refs,snapshots,blobs}`), so checkpoints downloaded by
//! Python are found offline and ours are found by Python.

use crate::{Error, Result};
use hf_hub::{api::sync::ApiBuilder, Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// Whether `s` looks like a hub id (`org/name`) rather than a path.
pub fn is_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// The hub cache folder in use.
pub fn cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(p) => Cache::new(PathBuf::from(p)),
        None => Cache::from_env(),
    }
}

fn offline() -> bool {
    ["MOESCOPE_OFFLINE", "HF_HUB_OFFLINE"]
        .iter()
        .any(|k| std::env::var(k).is_ok_and(|v| !v.is_empty() && v != "0"))
}

/// The files a model folder needs, given its file listing.
fn needed_files(listing: &[String], index: Option<&Path>) -> Result<Vec<String>> {
    let mut want = vec!["config.json".to_string()];
    if listing.iter().any(|f| f == "tokenizer.json") {
        want.push("tokenizer.json".into());
    }
    if let Some(index) = index {
        want.push("model.safetensors.index.json".into());
        let mut shards: Vec<String> = super::weights::read_index(index)?.into_values().collect();
        shards.sort();
        shards.dedup();
        want.extend(shards);
    } else if listing.iter().any(|f| f == "model.safetensors") {
        want.push("model.safetensors".into());
    } else {
        want.extend(
            listing
                .iter()
                .filter(|f| f.ends_with(".safetensors") && !f.contains('/'))
                .cloned(),
        );
    }
    Ok(want)
}

/// Resolve a hub id to a local snapshot folder holding config.json,
/// tokenizer.json and the safetensors weights.
pub fn resolve(id: &str, revision: &str, progress: bool) -> Result<PathBuf> {
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string());
    let cache = cache();
    let cached = cache.repo(repo.clone());
    // Offline path: everything already in the cache.
    if let Some(config) = cached.get("config.json") {
        let index = cached.get("model.safetensors.index.json");
        let dir = config.parent().unwrap_or(Path::new(".")).to_path_buf();
        let listing: Vec<String> = std::fs::read_dir(&dir)
            .map(|r| {
                r.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let want = needed_files(&listing, index.as_deref())?;
        let missing: Vec<&String> = want.iter().filter(|f| cached.get(f).is_none()).collect();
        if missing.is_empty() && want.iter().any(|f| f.ends_with(".safetensors")) {
            return Ok(dir);
        }
        if offline() {
            return Err(Error::Other(format!(
                "`{id}` is only partly in the Hugging Face cache {} (missing: {}); \
                 go online (unset MOESCOPE_OFFLINE / HF_HUB_OFFLINE) to finish the download",
                cache.path().display(),
                if missing.is_empty() {
                    "the safetensors weights".to_string()
                } else {
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )));
        }
    } else if offline() {
        return Err(Error::Other(format!(
            "`{id}` (revision {revision}) is not in the Hugging Face cache {} and downloads are off \
             (MOESCOPE_OFFLINE / HF_HUB_OFFLINE); download it online first, or pass a local folder",
            cache.path().display()
        )));
    }
    download(id, repo, cache, progress)
}

fn download(id: &str, repo: Repo, cache: Cache, progress: bool) -> Result<PathBuf> {
    let hub_err = |what: &str, e: hf_hub::api::sync::ApiError| {
        Error::Other(format!(
            "Hugging Face hub: {what} for `{id}` failed: {e} (check the id, your network, and \
             HF_TOKEN / `huggingface-cli login` for gated models)"
        ))
    };
    let api = ApiBuilder::from_cache(cache)
        .with_progress(progress)
        .with_token(
            std::env::var("HF_TOKEN")
                .ok()
                .or_else(|| self::cache().token()),
        )
        .build()
        .map_err(|e| hub_err("connecting", e))?;
    let r = api.repo(repo);
    let info = r.info().map_err(|e| hub_err("listing files", e))?;
    let listing: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    if !listing.iter().any(|f| f.ends_with(".safetensors")) {
        let pickles: Vec<&String> = listing
            .iter()
            .filter(|f| f.ends_with(".bin") || f.ends_with(".pt"))
            .collect();
        return Err(Error::Other(format!(
            "`{id}` has no safetensors weights{}; moescope does not load pickle checkpoints \
             because unpickling can run arbitrary code (look for a safetensors revision, e.g. \
             `refs/pr/N`, and pass it with --revision)",
            if pickles.is_empty() {
                String::new()
            } else {
                format!(
                    " (only {})",
                    pickles
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        )));
    }
    let config = r
        .get("config.json")
        .map_err(|e| hub_err("config.json", e))?;
    let index = if listing.iter().any(|f| f == "model.safetensors.index.json") {
        Some(
            r.get("model.safetensors.index.json")
                .map_err(|e| hub_err("model.safetensors.index.json", e))?,
        )
    } else {
        None
    };
    for f in needed_files(&listing, index.as_deref())? {
        r.get(&f).map_err(|e| hub_err(&f, e))?;
    }
    Ok(config.parent().unwrap_or(Path::new(".")).to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_paths() {
        assert!(is_repo_id("mistralai/Mixtral-8x7B-v0.1"));
        assert!(is_repo_id("Qwen/Qwen1.5-MoE-A2.7B"));
        assert!(!is_repo_id("runs/a/b"));
        assert!(!is_repo_id("./model"));
        assert!(!is_repo_id("model"));
        assert!(!is_repo_id("../x"));
    }
}
