//! Output shards. The shard map fixes every tensor's shard and byte range up front, so the header is written
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
use std::sync::atomic::{AtomicBool, Ordering};

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::io::header::encode_header;
use crate::io::shard::Shard;
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
pub struct ShardMap {
    /// Tensors in output order.
    pub tensors: Vec<OutputTensor>,
    /// Per shard: file name and complete header prefix (length + JSON).
    pub shards: Vec<(String, Vec<u8>, u64)>,
}

impl ShardMap {
    /// Splits `tensors` (name, dtype, shape) into shards of at most `max_shard_bytes` of data each
    /// (a single tensor larger than that gets a shard of its own), in the order given, the way
    /// Hugging Face's `save_pretrained` does.
    pub fn new(tensors: &[(String, Dtype, Vec<u64>)], max_shard_bytes: u64) -> Result<ShardMap> {
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
        Ok(ShardMap { tensors: out, shards })
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
    /// Cleared the first time the kernel says it cannot copy into these files (see `copy_from`).
    in_kernel: AtomicBool,
}

impl OutputWriter {
    /// Creates every shard file of `shards` inside `dir` (which must exist), writes the headers and
    /// reserves the data space, so that a disk too small for the output fails here, before any work.
    pub fn create(dir: &Path, shards: &ShardMap) -> Result<OutputWriter> {
        let mut files = vec![];
        for (name, header, data) in &shards.shards {
            let path = dir.join(name);
            let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(|e| Error::io(&path, e))?;
            let total = header.len() as u64 + data;
            reserve(&file, total).map_err(|e| Error::io(&path, e))?;
            file.write_all_at(header, 0).map_err(|e| Error::io(&path, e))?;
            files.push((path, file));
        }
        Ok(OutputWriter { dir: dir.to_path_buf(), files, in_kernel: AtomicBool::new(true) })
    }

    /// Writes `bytes` at absolute offset `offset` of shard `shard`.
    pub fn write_at(&self, shard: usize, offset: u64, bytes: &[u8]) -> Result<()> {
        let (path, file) = &self.files[shard];
        file.write_all_at(bytes, offset).map_err(|e| Error::io(path, e))?;
        start_writeback(file, offset, bytes.len());
        Ok(())
    }

    /// Copies `len` bytes at `src_offset` of `src` to absolute offset `offset` of shard `shard`, inside
    /// the kernel where it can (`copy_file_range`: one page-cache copy, instead of a read into and a
    /// write from user memory). Where it cannot (another file system, an old kernel) or on any error,
    /// the rest goes through `scratch` (at least `len` bytes) with a plain read and write, which also
    /// gives the precise error (input truncated, disk failure) naming the right file.
    pub fn copy_from(&self, shard: usize, offset: u64, src: &Shard, src_offset: u64, len: usize, scratch: &mut [u8]) -> Result<()> {
        use std::os::fd::AsRawFd;
        let (_, file) = &self.files[shard];
        let mut done = 0usize;
        while done < len && self.in_kernel.load(Ordering::Relaxed) {
            let (mut from, mut to) = ((src_offset + done as u64) as libc::loff_t, (offset + done as u64) as libc::loff_t);
            // SAFETY: plain syscall on two descriptors we own, with pointers to two live locals.
            let n = unsafe { libc::copy_file_range(src.file().as_raw_fd(), &mut from, file.as_raw_fd(), &mut to, len - done, 0) };
            if n > 0 {
                done += n as usize;
                continue;
            }
            if n < 0 {
                let errno = std::io::Error::last_os_error().raw_os_error();
                if matches!(errno, Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)) {
                    self.in_kernel.store(false, Ordering::Relaxed);
                }
                if errno == Some(libc::EINTR) {
                    continue;
                }
            }
            break; // 0 (source ended early) or another error: the plain path reports it precisely.
        }
        if done < len {
            let rest = &mut scratch[..len - done];
            src.read_at(src_offset + done as u64, rest)?;
            return self.write_at(shard, offset + done as u64, rest);
        }
        start_writeback(file, offset, len);
        Ok(())
    }

    /// Writes the index (when there is more than one shard) and, if `sync`, syncs every file to disk.
    /// Without `sync` the caller must sync before it publishes the folder (bulk runs do that in the
    /// background while the next expert is written).
    pub fn finish(self, shards: &ShardMap, sync: bool) -> Result<Vec<PathBuf>> {
        if sync {
            for (path, file) in &self.files {
                file.sync_all().map_err(|e| Error::io(path, e))?;
            }
        }
        let mut written: Vec<PathBuf> = self.files.iter().map(|(p, _)| p.clone()).collect();
        if shards.shards.len() > 1 {
            let mut weight_map = serde_json::Map::new();
            for t in &shards.tensors {
                weight_map.insert(t.name.clone(), shards.shards[t.shard].0.clone().into());
            }
            let index = serde_json::json!({
                "metadata": {"total_size": shards.total_data_bytes()},
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

/// Asks the kernel to start writing this range to disk now (it does not wait for it). Otherwise dirty
/// pages pile up to the kernel's background threshold (10% of RAM by default, more than a small
/// model's output) and the whole output is written only by the final sync, after the computation
/// instead of during it. Advisory: errors are ignored here and reported by that sync.
fn start_writeback(file: &File, offset: u64, len: usize) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a descriptor we own; no memory is passed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset as libc::off64_t, len as libc::off64_t, libc::SYNC_FILE_RANGE_WRITE);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-tensor safetensors file (F16 elements) holding `data`.
    fn input(dir: &Path, data: &[u8]) -> Shard {
        let path = dir.join("in.safetensors");
        let n = data.len() / 2;
        let header = encode_header(&[("t".to_string(), Dtype::F16, vec![n as u64], 0, data.len() as u64)], &BTreeMap::new());
        std::fs::write(&path, [header.as_slice(), data].concat()).unwrap();
        Shard::open(&path).unwrap()
    }

    /// In-kernel copies and the plain fallback produce the same bytes at the same offsets, and a
    /// source that ends early is an error naming the source, on either path.
    #[test]
    fn copy_from_in_kernel_and_fallback_agree() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(3 << 20) + 6).map(|i| (i * 7 % 251) as u8).collect();
        let src = input(dir.path(), &data);
        let base = src.len - data.len() as u64;
        for in_kernel in [true, false] {
            let out = dir.path().join(format!("out-{in_kernel}"));
            std::fs::create_dir(&out).unwrap();
            let shards = ShardMap::new(&[("t".to_string(), Dtype::F16, vec![data.len() as u64 / 2])], 1 << 40).unwrap();
            let w = OutputWriter::create(&out, &shards).unwrap();
            w.in_kernel.store(in_kernel, Ordering::Relaxed);
            let t = &shards.tensors[0];
            let mut scratch = vec![0u8; data.len()];
            let err = w.copy_from(0, t.offset, &src, base + 10, data.len(), &mut scratch).unwrap_err();
            assert!(err.to_string().contains("in.safetensors"), "{err}");
            // Two pieces, out of order, the second one not a multiple of a page.
            let half = 1 << 20;
            w.copy_from(0, t.offset + half as u64, &src, base + half as u64, data.len() - half, &mut scratch).unwrap();
            w.copy_from(0, t.offset, &src, base, half, &mut scratch).unwrap();
            let files = w.finish(&shards, true).unwrap();
            let bytes = std::fs::read(&files[0]).unwrap();
            assert_eq!(&bytes[t.offset as usize..], &data[..], "in_kernel={in_kernel}");
        }
    }
}
