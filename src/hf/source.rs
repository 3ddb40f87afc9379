//! What a `--model` argument names: a moescope model, or a Hugging Face
//! checkpoint (a local folder, or a hub id `org/name` fetched into the HF cache).

use super::{config::is_hf_config, hub};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A moescope run folder, checkpoint folder or `model.safetensors`.
    Moescope(PathBuf),
    /// The folder of a Hugging Face checkpoint (`config.json` with a
    /// `model_type` + `*.safetensors`).
    HuggingFace(PathBuf),
}

impl ModelSource {
    /// Decide what `model` names. An existing path is a Hugging Face checkpoint
    /// when its folder's `config.json` is one (a moescope `config.json` has a
    /// `moescope` section), else a moescope model; a path that does not exist
    /// but reads `org/name` is a hub id, resolved at `revision` (from the
    /// cache, or downloaded when online).
    pub fn detect(model: &str, revision: &str, progress: bool) -> Result<ModelSource> {
        let p = Path::new(model);
        if p.exists() {
            let dir = if p.is_dir() {
                p
            } else {
                p.parent().unwrap_or(Path::new("."))
            };
            return Ok(if is_hf_config(&dir.join("config.json")) {
                ModelSource::HuggingFace(dir.to_path_buf())
            } else {
                ModelSource::Moescope(p.to_path_buf())
            });
        }
        if hub::is_repo_id(model) {
            return Ok(ModelSource::HuggingFace(hub::resolve(
                model, revision, progress,
            )?));
        }
        Err(Error::bad_file(
            p,
            "no such file or folder (and not a Hugging Face hub id `org/name`)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detect(p: &Path) -> Result<ModelSource> {
        ModelSource::detect(p.to_str().unwrap(), "main", false)
    }

    #[test]
    fn hf_and_moescope_folders_are_told_apart() {
        let d = tempfile::tempdir().unwrap();
        let hf = d.path().join("hf");
        let own = d.path().join("run");
        std::fs::create_dir_all(&hf).unwrap();
        std::fs::create_dir_all(&own).unwrap();
        std::fs::write(hf.join("config.json"), r#"{"model_type": "mixtral"}"#).unwrap();
        std::fs::write(hf.join("model.safetensors"), b"").unwrap();
        std::fs::write(
            own.join("config.json"),
            r#"{"model_type": "moescope", "moescope": {}}"#,
        )
        .unwrap();
        std::fs::write(own.join("model.safetensors"), b"").unwrap();
        assert_eq!(detect(&hf).unwrap(), ModelSource::HuggingFace(hf.clone()));
        // A weights file names its folder.
        assert_eq!(
            detect(&hf.join("model.safetensors")).unwrap(),
            ModelSource::HuggingFace(hf.clone())
        );
        assert_eq!(detect(&own).unwrap(), ModelSource::Moescope(own.clone()));
        let w = own.join("model.safetensors");
        assert_eq!(detect(&w).unwrap(), ModelSource::Moescope(w));
        // A folder without config.json is left to the moescope loader to refuse.
        assert_eq!(
            detect(d.path()).unwrap(),
            ModelSource::Moescope(d.path().to_path_buf())
        );
    }

    #[test]
    fn a_missing_path_that_is_no_hub_id_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let e = detect(&d.path().join("nope/x/y")).unwrap_err().to_string();
        assert!(e.contains("nope/x/y") && e.contains("org/name"), "{e}");
    }
}
