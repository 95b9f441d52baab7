//! Output shards. The plan fixes every tensor's shard and byte range up front, so the header is written
//! first and tensor data can then be written by any thread, in any order, straight to its final offset.
//!
//! The writer only ever writes inside the folder it is given. Callers give it a fresh staging folder
//! beside the final destination and rename that folder into place once everything is written and
//! synced (see `python/layerswap_fast/folder.py`), so a failed or interrupted run never leaves a
//! half-written model where a complete one is expected.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::io::header::encode_header;
use crate::io::model::{INDEX_FILE, SINGLE_FILE};

/// One tensor of the output.
#[derive(Debug, Clone)]
pub struct OutputTensor {
    /// Name.
    pub name: String,
    /// Element type written.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
    /// Which shard.
    pub shard: usize,
    /// Absolute offset in the shard file.
    pub offset: u64,
    /// Size in bytes.
    pub nbytes: u64,
}

/// Where every tensor of the output goes.
#[derive(Debug, Clone)]
pub struct OutputPlan {
    /// Tensors in output order.
    pub tensors: Vec<OutputTensor>,
    /// Per shard: file name and complete header prefix (length + JSON).
    pub shards: Vec<(String, Vec<u8>, u64)>,
}

impl OutputPlan {
    /// Splits `tensors` (name, dtype, shape) into shards of at most `max_shard_bytes` of data each
    /// (a single tensor larger than that gets a shard of its own), in the order given, the way
    /// Hugging Face's `save_pretrained` does.
    pub fn new(tensors: &[(String, Dtype, Vec<u64>)], max_shard_bytes: u64) -> Result<OutputPlan> {
        if max_shard_bytes == 0 {
            return Err(Error::argument("shard size must be positive"));
        }
        let mut groups: Vec<Vec<usize>> = vec![];
        let mut current = 0u64;
        for (i, (_, dtype, shape)) in tensors.iter().enumerate() {
            let n = shape.iter().product::<u64>() * dtype.size() as u64;
            if groups.is_empty() || (current + n > max_shard_bytes && current > 0) {
                groups.push(vec![]);
                current = 0;
            }
            groups.last_mut().unwrap().push(i);
            current += n;
        }
        if groups.is_empty() {
            return Err(Error::argument("the output would contain no tensors"));
        }
        let count = groups.len();
        let mut out = vec![];
        let mut shards = vec![];
        let mut metadata = BTreeMap::new();
        metadata.insert("format".to_string(), "pt".to_string());
        for (s, group) in groups.iter().enumerate() {
            let file = if count == 1 {
                SINGLE_FILE.to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", s + 1, count)
            };
            let mut entries = vec![];
            let mut pos = 0u64;
            for &i in group {
                let (name, dtype, shape) = &tensors[i];
                let n = shape.iter().product::<u64>() * dtype.size() as u64;
                entries.push((name.clone(), *dtype, shape.clone(), pos, pos + n));
                pos += n;
            }
            let header = encode_header(&entries, &metadata);
            let base = header.len() as u64;
            for (name, dtype, shape, start, end) in entries {
                out.push(OutputTensor { name, dtype, shape, shard: s, offset: base + start, nbytes: end - start });
            }
            shards.push((file, header, pos));
        }
        Ok(OutputPlan { tensors: out, shards })
    }

    /// Total bytes of all shard files.
    pub fn total_file_bytes(&self) -> u64 {
        self.shards.iter().map(|(_, h, d)| h.len() as u64 + d).sum()
    }

    /// Total tensor bytes (what the index calls `total_size`).
    pub fn total_data_bytes(&self) -> u64 {
        self.shards.iter().map(|(_, _, d)| d).sum()
    }
}

/// Open output shard files.
pub struct OutputWriter {
    dir: PathBuf,
    files: Vec<(PathBuf, File)>,
}

impl OutputWriter {
    /// Creates every shard file of `plan` inside `dir` (which must exist), writes the headers and
    /// reserves the data space, so that a disk too small for the output fails here, before any work.
    pub fn create(dir: &Path, plan: &OutputPlan) -> Result<OutputWriter> {
        let mut files = vec![];
        for (name, header, data) in &plan.shards {
            let path = dir.join(name);
            let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(|e| Error::io(&path, e))?;
            let total = header.len() as u64 + data;
            reserve(&file, total).map_err(|e| Error::io(&path, e))?;
            file.write_all_at(header, 0).map_err(|e| Error::io(&path, e))?;
            files.push((path, file));
        }
        Ok(OutputWriter { dir: dir.to_path_buf(), files })
    }

    /// Writes `bytes` at absolute offset `offset` of shard `shard`.
    pub fn write_at(&self, shard: usize, offset: u64, bytes: &[u8]) -> Result<()> {
        let (path, file) = &self.files[shard];
        file.write_all_at(bytes, offset).map_err(|e| Error::io(path, e))
    }

    /// Writes the index (when there is more than one shard) and, if `sync`, syncs every file to disk.
    /// Without `sync` the caller must sync before it publishes the folder (bulk runs do that in the
    /// background while the next expert is written).
    pub fn finish(self, plan: &OutputPlan, sync: bool) -> Result<Vec<PathBuf>> {
        if sync {
            for (path, file) in &self.files {
                file.sync_all().map_err(|e| Error::io(path, e))?;
            }
        }
        let mut written: Vec<PathBuf> = self.files.iter().map(|(p, _)| p.clone()).collect();
        if plan.shards.len() > 1 {
            let mut weight_map = serde_json::Map::new();
            for t in &plan.tensors {
                weight_map.insert(t.name.clone(), plan.shards[t.shard].0.clone().into());
            }
            let index = serde_json::json!({
                "metadata": {"total_size": plan.total_data_bytes()},
                "weight_map": weight_map,
            });
            let path = self.dir.join(INDEX_FILE);
            let text = serde_json::to_string_pretty(&index).expect("json");
            let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
            file.write_all_at(text.as_bytes(), 0).map_err(|e| Error::io(&path, e))?;
            if sync {
                file.sync_all().map_err(|e| Error::io(&path, e))?;
            }
            written.push(path);
        }
        Ok(written)
    }
}

/// Reserves `len` bytes for `file`: real allocation where the file system supports it (so a full disk
/// is reported now), otherwise just the length.
fn reserve(file: &File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: plain syscall on a file descriptor we own; no memory is passed.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
    match rc {
        0 => Ok(()),
        libc::EOPNOTSUPP | libc::EINVAL => file.set_len(len),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}
