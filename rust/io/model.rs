//! One model: a Hugging Face folder (single `model.safetensors`, or shards named by
//! `model.safetensors.index.json`) or a single `.safetensors` file. Shards are an implementation
//! detail behind [`Model::tensor`]: two models need not be split the same way.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::io::header::{Entries, TensorInfo, MAX_HEADER_BYTES};
use crate::io::shard::{MemoryRegion, Shard, Stamp};

/// Name of the shard index file.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// Where one tensor lives inside a model.
#[derive(Debug, Clone)]
pub struct TensorRef {
    /// Index into [`Model::shards`].
    pub shard: usize,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
    /// Absolute byte offset of the first element in the shard file.
    pub offset: u64,
    /// Size in bytes.
    pub nbytes: u64,
}

impl TensorRef {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// An opened model.
#[derive(Debug)]
pub struct Model {
    /// The path the user gave (folder or file).
    pub path: PathBuf,
    /// Opened shards.
    pub shards: Vec<Shard>,
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorRef>,
}

impl Model {
    /// Opens a folder or a single safetensors file.
    pub fn open(path: &Path) -> Result<Model> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_file() {
            return Self::from_files(path, &[path.to_path_buf()], None);
        }
        let index = path.join(INDEX_FILE);
        let single = path.join(SINGLE_FILE);
        if index.is_file() {
            let (files, map) = read_index(&index)?;
            // A model.safetensors beside an index naming other shards: two models in one folder.
            if single.exists() && !files.iter().any(|f| f.file_name() == single.file_name()) {
                return Err(Error::invalid(
                    path,
                    format!("{SINGLE_FILE} and {INDEX_FILE} disagree: the index names other shards; which one is the model? Remove one of them"),
                ));
            }
            return Self::from_files(path, &files, Some((index, map)));
        }
        if single.is_file() {
            return Self::from_files(path, &[single], None);
        }
        // Without an index, only Hugging Face shard names are the model: other .safetensors files
        // beside them (consolidated.safetensors, adapter_model.safetensors) are someone else's.
        let mut files: Vec<(u32, u32, PathBuf)> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| shard_number(&p).map(|(i, n)| (i, n, p)))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::invalid(
                path,
                format!("no {SINGLE_FILE}, no {INDEX_FILE} and no shard named like model-00001-of-00002.safetensors in this folder"),
            ));
        }
        let total = files[0].1;
        for (k, (i, n, p)) in files.iter().enumerate() {
            if *n != total || *i as usize != k + 1 || *i > total {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                return Err(Error::invalid(path, format!("shards without an index do not form one set of {total}: {name} is out of place or one before it is missing")));
            }
        }
        if files.len() != total as usize {
            return Err(Error::invalid(path, format!("only {} of the {total} shards model-*-of-{total:05}.safetensors are here, and there is no index", files.len())));
        }
        Self::from_files(
            path,
            &files.into_iter().map(|(_, _, p)| p).collect::<Vec<_>>(),
            None,
        )
    }

    fn from_files(
        path: &Path,
        files: &[PathBuf],
        index: Option<(PathBuf, HashMap<String, String>)>,
    ) -> Result<Model> {
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = BTreeMap::new();
        for (i, file) in files.iter().enumerate() {
            let shard = Shard::open(file)?;
            for t in &shard.header.tensors {
                let r = TensorRef {
                    shard: i,
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    offset: shard.header.data_start() + t.start,
                    nbytes: t.nbytes(),
                };
                if tensors.insert(t.name.clone(), r).is_some() {
                    return Err(Error::invalid(
                        file,
                        format!("tensor '{}' is stored in more than one shard", t.name),
                    ));
                }
            }
            shards.push(shard);
        }
        if let Some((index_path, map)) = index {
            let file_name = |i: usize| files[i].file_name().unwrap().to_string_lossy().into_owned();
            for (name, r) in &tensors {
                match map.get(name) {
                    None => {
                        return Err(Error::invalid(
                            &index_path,
                            format!(
                                "tensor '{name}' is in shard {} but not in the index weight_map",
                                file_name(r.shard)
                            ),
                        ))
                    }
                    Some(f) if *f != file_name(r.shard) => {
                        return Err(Error::invalid(
                            &index_path,
                            format!(
                                "index says tensor '{name}' is in {f} but it is in {}",
                                file_name(r.shard)
                            ),
                        ))
                    }
                    _ => {}
                }
            }
            if let Some(name) = map.keys().find(|n| !tensors.contains_key(*n)) {
                return Err(Error::invalid(
                    &index_path,
                    format!(
                        "index lists tensor '{name}' in {} but that shard has no such tensor",
                        map[name]
                    ),
                ));
            }
        }
        Ok(Model {
            path: path.to_path_buf(),
            shards,
            tensors,
        })
    }

    /// A model whose tensors are already in memory (a state dict), each in a shard of its own. `label`
    /// names it in errors, as a path names a folder (e.g. `expert state dict`).
    pub fn from_memory(label: &Path, tensors: Vec<(String, Dtype, Vec<u64>, MemoryRegion)>) -> Result<Model> {
        let mut shards = Vec::with_capacity(tensors.len());
        let mut refs = BTreeMap::new();
        for (i, (name, dtype, shape, region)) in tensors.into_iter().enumerate() {
            let numel = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let nbytes = numel
                .and_then(|n| n.checked_mul(dtype.size() as u64))
                .ok_or_else(|| {
                    Error::invalid(label, format!("tensor '{name}': shape {shape:?} is too large"))
                })?;
            let info = TensorInfo {
                name: name.clone(),
                dtype,
                shape: shape.clone(),
                start: 0,
                end: nbytes,
            };
            shards.push(Shard::memory(label, info, region)?);
            if refs
                .insert(
                    name.clone(),
                    TensorRef {
                        shard: i,
                        dtype,
                        shape,
                        offset: 0,
                        nbytes,
                    },
                )
                .is_some()
            {
                return Err(Error::invalid(label, format!("tensor '{name}' is given twice")));
            }
        }
        if refs.is_empty() {
            return Err(Error::invalid(label, "the state dict is empty"));
        }
        Ok(Model {
            path: label.to_path_buf(),
            shards,
            tensors: refs,
        })
    }

    /// Looks up a tensor.
    pub fn tensor(&self, name: &str) -> Option<&TensorRef> {
        self.tensors.get(name)
    }

    /// The shard holding a tensor.
    pub fn shard_of(&self, t: &TensorRef) -> &Shard {
        &self.shards[t.shard]
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.nbytes).sum()
    }

    /// Path and stamp of every shard read from a file (see [`Shard::stamp`]).
    pub fn stamps(&self) -> Vec<(PathBuf, Stamp)> {
        self.shards
            .iter()
            .filter_map(|s| Some((s.path.clone(), s.stamp()?)))
            .collect()
    }

    /// Fails if any shard changed on disk since it was opened (see [`Shard::check_unchanged`]).
    pub fn check_unchanged(&self) -> Result<()> {
        self.shards.iter().try_for_each(Shard::check_unchanged)
    }
}

/// `(i, n)` for a Hugging Face shard name `model-0000i-of-0000n.safetensors` (digits of any width).
pub fn shard_number(path: &Path) -> Option<(u32, u32)> {
    let name = path.file_name()?.to_str()?;
    let rest = name.strip_prefix("model-")?.strip_suffix(".safetensors")?;
    let (i, n) = rest.split_once("-of-")?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 9 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(i) || !digits(n) {
        return None;
    }
    Some((i.parse().ok()?, n.parse().ok()?))
}

/// Reads an index file: the distinct shard files in first-seen order and the name -> file map.
fn read_index(index: &Path) -> Result<(Vec<PathBuf>, HashMap<String, String>)> {
    #[derive(serde::Deserialize)]
    struct IndexFile {
        weight_map: Option<Entries>,
    }
    // Real indexes are well under a megabyte; a hostile (say sparse, terabyte) one must not be read
    // into memory whole. The header limit is generous enough.
    let len = std::fs::metadata(index).map_err(|e| Error::io(index, e))?.len();
    if len > MAX_HEADER_BYTES {
        return Err(Error::invalid(
            index,
            format!("index file has {len} bytes, more than the {MAX_HEADER_BYTES}-byte limit"),
        ));
    }
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let parsed: IndexFile = serde_json::from_str(&text)
        .map_err(|e| Error::invalid(index, format!("index is not valid JSON: {e}")))?;
    let weight_map = parsed
        .weight_map
        .ok_or_else(|| Error::invalid(index, "index has no 'weight_map' object"))?
        .0;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files = Vec::new();
    let mut seen = HashMap::new();
    let mut map = HashMap::new();
    for (name, file) in &weight_map {
        let file = file
            .as_str()
            .ok_or_else(|| Error::invalid(index, format!("weight_map entry for '{name}' is not a string")))?;
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(Error::invalid(
                index,
                format!("weight_map entry for '{name}' names '{file}', which is not a file in this folder"),
            ));
        }
        if !seen.contains_key(file) {
            let p = dir.join(file);
            if !p.is_file() {
                return Err(Error::invalid(
                    index,
                    format!("shard '{file}' (holding tensor '{name}') does not exist"),
                ));
            }
            seen.insert(file.to_string(), files.len());
            files.push(p);
        }
        if map.insert(name.clone(), file.to_string()).is_some() {
            return Err(Error::invalid(
                index,
                format!("tensor '{name}' is listed twice in the index weight_map"),
            ));
        }
    }
    if files.is_empty() {
        return Err(Error::invalid(index, "index weight_map is empty"));
    }
    Ok((files, map))
}
