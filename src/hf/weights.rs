//! The weights of a Hugging Face checkpoint: one `model.safetensors` or the
//! shards named by `model.safetensors.index.json`, memory-mapped and read one
//! tensor at a time into f32.
//!
//! Opening reads only the headers (so a missing shard, a truncated file or an
//! index that names a tensor its shard lacks is reported before any work).
//! Each [`WeightStore::load`] converts one tensor to f32 and then tells the
//! kernel to drop the file pages it touched, so resident memory holds the
//! converted layer and not the mapped file as well.

use crate::{Error, Result};
use candle_core::{Device, Tensor};
use memmap2::{Mmap, UncheckedAdvice};
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Where one tensor lives.
#[derive(Debug, Clone)]
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range within the file.
    start: usize,
    end: usize,
}

struct Shard {
    path: PathBuf,
    map: Mmap,
}

/// The tensors of a checkpoint folder, by name.
pub struct WeightStore {
    shards: Vec<Shard>,
    entries: HashMap<String, Entry>,
}

impl std::fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightStore")
            .field(
                "shards",
                &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.entries.len())
            .finish()
    }
}

/// The `weight_map` of a `model.safetensors.index.json`: tensor name -> shard
/// file name (checked to be a plain file name in the same folder).
pub fn read_index(index: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    parse_index(&text, index)
}

/// [`read_index`] on the file's text (`index` is only used in messages).
pub fn parse_index(text: &str, index: &Path) -> Result<BTreeMap<String, String>> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::bad_file(index, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::bad_file(index, "field `weight_map`: missing or not an object"))?;
    let mut wanted = BTreeMap::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::bad_file(
                index,
                format!("field `weight_map.{name}`: expected a file name"),
            )
        })?;
        if file.contains('/') || file.contains("..") {
            return Err(Error::bad_file(
                index,
                format!("field `weight_map.{name}`: `{file}` is not a file in this folder"),
            ));
        }
        wanted.insert(name.clone(), file.to_string());
    }
    Ok(wanted)
}

/// Refuse folders that only hold pickle checkpoints.
pub fn refuse_pickle(dir: &Path) -> Result<()> {
    let pickles: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".bin") || n.ends_with(".pt") || n.ends_with(".pth"))
        .collect();
    if pickles.is_empty() {
        return Err(Error::bad_file(
            dir,
            "no model.safetensors or model.safetensors.index.json in this folder",
        ));
    }
    Err(Error::bad_file(
        dir,
        format!(
            "only pickle checkpoints here ({}); moescope does not load them because unpickling \
             can run arbitrary code. Convert once in a trusted Python environment: \
             `AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)`, \
             or use the repository's safetensors revision",
            pickles.join(", ")
        ),
    ))
}

impl WeightStore {
    /// Open the weights of a model folder (single file or sharded).
    pub fn open(dir: &Path) -> Result<WeightStore> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if index.is_file() {
            Self::open_index(&index)
        } else if single.is_file() {
            Self::open_files(&[single])
        } else {
            // Some repositories name a single file differently.
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            files.sort();
            if files.is_empty() {
                refuse_pickle(dir)?;
            }
            Self::open_files(&files)
        }
    }

    fn open_index(index: &Path) -> Result<WeightStore> {
        let wanted = read_index(index)?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files: Vec<String> = wanted.values().cloned().collect();
        files.sort();
        files.dedup();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        for (f, p) in files.iter().zip(&paths) {
            if !p.is_file() {
                return Err(Error::bad_file(
                    index,
                    format!(
                        "names shard `{f}`, which is missing from {} (an incomplete download?)",
                        dir.display()
                    ),
                ));
            }
        }
        let store = Self::open_files(&paths)?;
        for (name, file) in &wanted {
            match store.entries.get(name) {
                Some(e)
                    if store.shards[e.shard]
                        .path
                        .file_name()
                        .is_some_and(|n| n == file.as_str()) => {}
                _ => {
                    return Err(Error::bad_file(
                        index,
                        format!(
                            "maps tensor `{name}` to `{file}`, but `{file}` has no such tensor"
                        ),
                    ))
                }
            }
        }
        Ok(store)
    }

    fn open_files(paths: &[PathBuf]) -> Result<WeightStore> {
        let mut shards = Vec::new();
        let mut entries = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let file = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
            // SAFETY: the file is opened read-only; a concurrent writer could
            // change the bytes under us, as with any mmap-based loader.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(p, e))?;
            let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
                Error::bad_file(
                    p,
                    format!("not a valid safetensors file ({e}); truncated or corrupt? download it again"),
                )
            })?;
            for (name, info) in meta.tensors() {
                if let Some(prev) = entries.get(&name).map(|e: &Entry| e.shard) {
                    let prev: &Shard = &shards[prev];
                    return Err(Error::bad_file(
                        p,
                        format!("tensor `{name}` is also in {}", prev.path.display()),
                    ));
                }
                let (s, e) = info.data_offsets;
                entries.insert(
                    name,
                    Entry {
                        shard: i,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: 8 + n + s,
                        end: 8 + n + e,
                    },
                );
            }
            shards.push(Shard {
                path: p.clone(),
                map,
            });
        }
        Ok(WeightStore { shards, entries })
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Tensor names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The storage dtype of `name` (`F32`, `F16`, `BF16`, ...).
    pub fn dtype_of(&self, name: &str) -> Option<Dtype> {
        self.entries.get(name).map(|e| e.dtype)
    }

    /// Load `name` as an f32 tensor, checking its shape against `shape`
    /// (what config.json implies; `why` says which keys).
    pub fn load(&self, name: &str, shape: &[usize], why: &str) -> Result<Tensor> {
        let e = self.entries.get(name).ok_or_else(|| {
            let files: Vec<String> = self
                .shards
                .iter()
                .map(|s| s.path.file_name().unwrap_or_default().to_string_lossy().into_owned())
                .collect();
            Error::bad_file(
                self.shards
                    .first()
                    .map(|s| s.path.parent().unwrap_or(Path::new(".")))
                    .unwrap_or(Path::new(".")),
                format!(
                    "tensor `{name}` is missing (looked in {}); the checkpoint does not match its config.json",
                    files.join(", ")
                ),
            )
        })?;
        let shard = &self.shards[e.shard];
        if e.shape != shape {
            return Err(Error::bad_file(
                &shard.path,
                format!(
                    "tensor `{name}` has shape {:?}, but config.json ({why}) implies {shape:?}",
                    e.shape
                ),
            ));
        }
        let bytes = &shard.map[e.start..e.end];
        let data = to_f32(bytes, e.dtype).ok_or_else(|| {
            Error::bad_file(
                &shard.path,
                format!(
                    "tensor `{name}` is stored as {:?}; supported dtypes are F32, F16 and BF16",
                    e.dtype
                ),
            )
        })?;
        // SAFETY: read-only file mapping; dropped pages are re-read from the
        // file on the next access, and no reference into them outlives this call.
        unsafe {
            let _ = shard.map.unchecked_advise_range(
                UncheckedAdvice::DontNeed,
                e.start,
                e.end - e.start,
            );
        }
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    }
}

/// Little-endian f32 / f16 / bf16 bytes to f32 (None for other dtypes).
fn to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    const CHUNK: usize = 1 << 16;
    let (width, conv): (usize, fn(&[u8]) -> f32) = match dtype {
        Dtype::F32 => (4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        Dtype::F16 => (2, |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        Dtype::BF16 => (2, |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        _ => return None,
    };
    let n = bytes.len() / width;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * width))
        .for_each(|(o, b)| {
            for (x, c) in o.iter_mut().zip(b.chunks_exact(width)) {
                *x = conv(c);
            }
        });
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_half_precision_exactly() {
        let vals = [1.0f32, -2.5, 0.15625, 3.0e4];
        let bf: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let f16: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        assert_eq!(to_f32(&bf, Dtype::BF16).unwrap()[..3], vals[..3]);
        assert_eq!(to_f32(&f16, Dtype::F16).unwrap()[..3], vals[..3]);
        assert!(to_f32(&bf, Dtype::I8).is_none());
    }
}
