//! Output shards. The shard map fixes every tensor's shard and byte range up front, so the header is written
//! first and tensor data can then be written by any thread, in any order, straight to its final offset.
//!
//! The writer only ever writes inside the folder it is given. Callers give it a fresh staging folder
//! beside the final destination and rename that folder into place once everything is written and
//! synced (see `python/layerswap_fast/folder.py`), so a failed or interrupted run never leaves a
//! half-written model where a complete one is expected.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::io::header::encode_header;
use crate::io::model::{Model, INDEX_FILE, SINGLE_FILE};
use crate::io::shard::{MemoryRegion, Shard};

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
        Self::from_groups(tensors, &groups, &vec![None; groups.len()])
    }

    /// The layout of `host`'s own shards, if the output can have it: the same shards holding the same
    /// tensors in the same order at the same data offsets, each header padded so that the data starts
    /// at the same offset within a [`CLONE_BLOCK`] as in the host's shard (at the very same offset
    /// where the header fits). Every tensor then sits at the same block offsets as in the host, so a
    /// copy-on-write file system can share those blocks with the host instead of writing them
    /// ([`OutputWriter::copy_from`]), and with any other model saved the same way (the safety expert
    /// of the same architecture, usually). `None` when a tensor's output dtype differs from the
    /// host's (other sizes) or a host shard holds more than `max_shard_bytes` of data.
    pub fn like(
        host: &Model,
        tensors: &[(String, Dtype, Vec<u64>)],
        max_shard_bytes: u64,
    ) -> Result<Option<ShardMap>> {
        if max_shard_bytes == 0 {
            return Err(Error::argument("shard size must be positive"));
        }
        let index: HashMap<&str, usize> = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.0.as_str(), i))
            .collect();
        if index.len() != host.tensors.len() {
            return Ok(None);
        }
        let mut groups = vec![];
        let mut starts = vec![];
        for shard in &host.shards {
            if shard.header.tensors.is_empty() {
                continue;
            }
            let data: u64 = shard
                .header
                .tensors
                .iter()
                .map(super::header::TensorInfo::nbytes)
                .sum();
            if data > max_shard_bytes {
                return Ok(None);
            }
            let mut group = vec![];
            for t in &shard.header.tensors {
                let Some(&i) = index.get(t.name.as_str()) else {
                    return Ok(None);
                };
                if tensors[i].1 != t.dtype || tensors[i].2 != t.shape {
                    return Ok(None);
                }
                group.push(i);
            }
            groups.push(group);
            starts.push(Some(shard.header.data_start()));
        }
        Self::from_groups(tensors, &groups, &starts).map(Some)
    }

    /// Shards from groups of tensor indices, in order. `data_start[s]`, if given, is where shard `s`'s
    /// data should start: its header is padded with spaces to start there, or, if the header does
    /// not fit, at the next offset that is the same modulo [`CLONE_BLOCK`].
    fn from_groups(
        tensors: &[(String, Dtype, Vec<u64>)],
        groups: &[Vec<usize>],
        data_start: &[Option<u64>],
    ) -> Result<ShardMap> {
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
            let mut header = encode_header(&entries, &metadata);
            if let Some(want) = data_start[s] {
                pad_header(&mut header, want);
            }
            let base = header.len() as u64;
            for (name, dtype, shape, start, end) in entries {
                out.push(OutputTensor {
                    name,
                    dtype,
                    shape,
                    shard: s,
                    offset: base + start,
                    nbytes: end - start,
                });
            }
            shards.push((file, header, pos));
        }
        Ok(ShardMap { tensors: out, shards })
    }

    /// The output as separate buffers in memory (see [`OutputWriter::memory`]): every tensor is a
    /// "shard" of its own, with no header, its data at offset 0.
    pub fn in_memory(tensors: &[(String, Dtype, Vec<u64>)]) -> Result<ShardMap> {
        if tensors.is_empty() {
            return Err(Error::argument("the output would contain no tensors"));
        }
        let mut out = vec![];
        let mut shards = vec![];
        for (s, (name, dtype, shape)) in tensors.iter().enumerate() {
            let nbytes = shape.iter().product::<u64>() * dtype.size() as u64;
            out.push(OutputTensor {
                name: name.clone(),
                dtype: *dtype,
                shape: shape.clone(),
                shard: s,
                offset: 0,
                nbytes,
            });
            shards.push((name.clone(), vec![], nbytes));
        }
        Ok(ShardMap { tensors: out, shards })
    }

    /// Total tensor bytes (what the index calls `total_size`).
    pub fn total_data_bytes(&self) -> u64 {
        self.shards.iter().map(|(_, _, d)| d).sum()
    }
}

/// Pads a complete header prefix (length + JSON) with spaces after the JSON so that it ends at `want`,
/// or, when it is already longer, at the next offset congruent to `want` modulo [`CLONE_BLOCK`]
/// (JSON allows trailing whitespace; safetensors' own writer pads the same way).
fn pad_header(header: &mut Vec<u8>, want: u64) {
    let have = header.len() as u64;
    let target = if have <= want {
        want
    } else {
        want + (have - want).div_ceil(CLONE_BLOCK) * CLONE_BLOCK
    };
    header.resize(target as usize, b' ');
    let json_len = target - 8;
    header[..8].copy_from_slice(&json_len.to_le_bytes());
}

/// The block size file systems share data in (FICLONERANGE needs block-aligned offsets and lengths):
/// 4 KiB, the block of XFS, btrfs and ZFS's default record alignment on current systems.
pub const CLONE_BLOCK: u64 = 4096;

/// Open output shard files, or the caller's output buffers in memory.
pub struct OutputWriter {
    dir: PathBuf,
    files: Vec<(PathBuf, File)>,
    /// In memory: one buffer per tensor of an [`ShardMap::in_memory`] (then `files` is empty).
    memory: Vec<MemoryRegion>,
    /// Cleared the first time the kernel says it cannot copy into these files (see `copy_from`).
    in_kernel: AtomicBool,
    /// Cleared the first time the file system says it cannot share blocks (see `copy_from`).
    can_clone: AtomicBool,
    /// Bytes shared with an input instead of written.
    cloned: AtomicU64,
    /// With [`OutputWriter::drop_behind`]:
    behind: Option<std::sync::Mutex<Behind>>,
}

/// What a writer with [`OutputWriter::drop_behind`] has written and not yet dropped.
#[derive(Default)]
struct Behind {
    /// Ranges written (shard, offset, length), oldest first.
    ranges: std::collections::VecDeque<(usize, u64, usize)>,
    /// Their total bytes.
    bytes: u64,
    /// Bytes kept before the oldest are dropped.
    lag: u64,
}

/// Bytes of output a writer with [`OutputWriter::drop_behind`] leaves in the page cache behind the
/// newest write: older ranges are dropped (those already on disk; the kernel keeps dirty pages).
const DROP_LAG: u64 = 256 << 20;

impl OutputWriter {
    /// Creates every shard file of `shards` inside `dir` (which must exist), writes the headers and
    /// reserves the data space, so that a disk too small for the output fails here, before any work.
    pub fn create(dir: &Path, shards: &ShardMap) -> Result<OutputWriter> {
        let mut files = vec![];
        for (name, header, data) in &shards.shards {
            let path = dir.join(name);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            let total = header.len() as u64 + data;
            reserve(&file, total).map_err(|e| Error::io(&path, e))?;
            file.write_all_at(header, 0).map_err(|e| Error::io(&path, e))?;
            files.push((path, file));
        }
        Ok(OutputWriter {
            dir: dir.to_path_buf(),
            files,
            memory: vec![],
            in_kernel: AtomicBool::new(true),
            can_clone: AtomicBool::new(true),
            cloned: AtomicU64::new(0),
            behind: None,
        })
    }

    /// A writer that fills `buffers`, one per tensor of `shards` (made by [`ShardMap::in_memory`]), in
    /// place: the memory sink beside the file one. Each buffer must have exactly its tensor's size.
    pub fn memory(shards: &ShardMap, buffers: Vec<MemoryRegion>) -> Result<OutputWriter> {
        if buffers.len() != shards.tensors.len() {
            return Err(Error::argument(format!(
                "{} output buffers for {} tensors",
                buffers.len(),
                shards.tensors.len()
            )));
        }
        for (t, b) in shards.tensors.iter().zip(&buffers) {
            if t.shard >= buffers.len() || t.offset != 0 || b.len() as u64 != t.nbytes {
                return Err(Error::argument(format!(
                    "output buffer for tensor '{}' has {} bytes; {} {:?} needs {}",
                    t.name,
                    b.len(),
                    t.dtype,
                    t.shape,
                    t.nbytes
                )));
            }
        }
        Ok(OutputWriter {
            dir: PathBuf::new(),
            files: vec![],
            memory: buffers,
            in_kernel: AtomicBool::new(false),
            can_clone: AtomicBool::new(false),
            cloned: AtomicU64::new(0),
            behind: None,
        })
    }

    /// Drops what was written from the page cache once it is on disk, [`DROP_LAG`] behind the newest
    /// write (`posix_fadvise(DONTNEED)`): for outputs of runs bigger than memory, where written pages
    /// would otherwise push out input pages the write pass has yet to read.
    #[must_use]
    pub fn drop_behind(self) -> OutputWriter {
        self.drop_behind_after(DROP_LAG)
    }

    /// [`OutputWriter::drop_behind`] with another lag (tests drop everything at once).
    #[must_use]
    fn drop_behind_after(mut self, lag: u64) -> OutputWriter {
        if self.memory.is_empty() {
            self.behind = Some(std::sync::Mutex::new(Behind {
                lag,
                ..Behind::default()
            }));
        }
        self
    }

    /// Notes a range written to shard `shard` and drops the oldest ranges past [`DROP_LAG`].
    fn written(&self, shard: usize, offset: u64, len: usize) {
        use std::os::fd::AsRawFd;
        let Some(behind) = &self.behind else {
            return;
        };
        let mut due = vec![];
        {
            let mut b = behind.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            b.ranges.push_back((shard, offset, len));
            b.bytes += len as u64;
            while b.bytes > b.lag {
                let Some(r) = b.ranges.pop_front() else { break };
                b.bytes -= r.2 as u64;
                due.push(r);
            }
        }
        for (shard, offset, len) in due {
            // SAFETY: plain syscall on a descriptor we own; no memory is passed. Advisory.
            unsafe {
                libc::posix_fadvise(
                    self.files[shard].1.as_raw_fd(),
                    offset as libc::off_t,
                    len as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
        }
    }

    /// Bytes `[offset, offset + len)` of output buffer `shard`, when the output is in memory.
    #[allow(
        clippy::mut_from_ref,
        reason = "each chunk of each tensor owns a disjoint byte range of the buffer (SAFETY below)"
    )]
    fn memory_range(&self, shard: usize, offset: u64, len: usize) -> Option<Result<&mut [u8]>> {
        let region = self.memory.get(shard)?;
        // SAFETY: the write pass gives every chunk of every tensor its own byte range, so no two
        // threads ever hold overlapping ranges of one buffer, and nothing reads the buffers meanwhile.
        let range = unsafe { region.get_mut(offset, len) };
        Some(range.ok_or_else(|| {
            Error::argument(format!(
                "write of {len} bytes at {offset} is outside output buffer {shard}"
            ))
        }))
    }

    /// Writes `bytes` at absolute offset `offset` of shard `shard`.
    pub fn write_at(&self, shard: usize, offset: u64, bytes: &[u8]) -> Result<()> {
        if let Some(range) = self.memory_range(shard, offset, bytes.len()) {
            range?.copy_from_slice(bytes);
            return Ok(());
        }
        let (path, file) = &self.files[shard];
        file.write_all_at(bytes, offset).map_err(|e| Error::io(path, e))?;
        start_writeback(file, offset, bytes.len());
        self.written(shard, offset, bytes.len());
        Ok(())
    }

    /// Copies `len` bytes at `src_offset` of `src` to absolute offset `offset` of shard `shard`.
    ///
    /// On a copy-on-write file system (XFS with reflink, btrfs, ZFS ≥ 2.2) with source and output on
    /// it, the whole blocks of the range are shared with the source (FICLONERANGE) instead of written,
    /// when source and destination sit at the same offset within a block (an output laid out like
    /// its source, see [`ShardMap::like`]); only the partial blocks at the edges are copied. The
    /// rest is copied inside the kernel where it can (`copy_file_range`: one page-cache copy, instead
    /// of a read into and a write from user memory). Where it cannot (another file system, an old
    /// kernel) or on any error, the rest goes through `scratch` (at least `len` bytes) with a plain
    /// read and write, which also gives the precise error (input truncated, disk failure) naming the
    /// right file.
    pub fn copy_from(
        &self,
        shard: usize,
        offset: u64,
        src: &Shard,
        src_offset: u64,
        len: usize,
        scratch: &mut [u8],
    ) -> Result<()> {
        let block = CLONE_BLOCK;
        if (len as u64) < block
            || src_offset % block != offset % block
            || !self.can_clone.load(Ordering::Relaxed)
        {
            return self.copy_range(shard, offset, src, src_offset, len, scratch);
        }
        let head = ((block - offset % block) % block) as usize;
        let middle = (len - head) / block as usize * block as usize;
        if middle > 0
            && self.clone_range(
                shard,
                offset + head as u64,
                src,
                src_offset + head as u64,
                middle as u64,
            )
        {
            self.cloned.fetch_add(middle as u64, Ordering::Relaxed);
            if head > 0 {
                self.copy_range(shard, offset, src, src_offset, head, scratch)?;
            }
            let done = head + middle;
            if done < len {
                self.copy_range(
                    shard,
                    offset + done as u64,
                    src,
                    src_offset + done as u64,
                    len - done,
                    scratch,
                )?;
            }
            return Ok(());
        }
        self.copy_range(shard, offset, src, src_offset, len, scratch)
    }

    /// Whether blocks may still be shared with inputs: true until the file system has said it
    /// cannot (so on ext4 it is false after the first attempt).
    pub fn may_clone(&self) -> bool {
        self.can_clone.load(Ordering::Relaxed)
    }

    /// Bytes shared with inputs so far instead of written (see [`OutputWriter::copy_from`]).
    pub fn bytes_cloned(&self) -> u64 {
        self.cloned.load(Ordering::Relaxed)
    }

    /// Shares `len` bytes (a multiple of the block) at `src_offset` of `src` into shard `shard` at
    /// `offset` (both block-aligned). False if the file system did not (then nothing changed): not
    /// copy-on-write, another file system, or the source range is not shareable.
    fn clone_range(&self, shard: usize, offset: u64, src: &Shard, src_offset: u64, len: u64) -> bool {
        use std::os::fd::AsRawFd;
        // Only file to file: a tensor in memory, or an output in memory, has no blocks to share.
        let (Some(src_file), Some((_, file))) = (src.file(), self.files.get(shard)) else {
            return false;
        };
        let range = libc::file_clone_range {
            src_fd: i64::from(src_file.as_raw_fd()),
            src_offset,
            src_length: len,
            dest_offset: offset,
        };
        loop {
            // SAFETY: ioctl on a descriptor we own, with a pointer to a live, initialised local of the
            // type FICLONERANGE expects; the kernel only reads it.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::FICLONERANGE, &range) };
            if rc == 0 {
                return true;
            }
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => {}
                // Not a copy-on-write file system, or source and output on different ones: never.
                Some(
                    libc::EOPNOTSUPP | libc::EXDEV | libc::ENOTTY | libc::ENOSYS | libc::EBADF | libc::EPERM,
                ) => {
                    self.can_clone.store(false, Ordering::Relaxed);
                    return false;
                }
                // EINVAL (this range cannot be shared, e.g. other block size), ETXTBSY...: copy it.
                _ => return false,
            }
        }
    }

    /// Copies a range inside the kernel where it can, else through `scratch` (see `copy_from`).
    fn copy_range(
        &self,
        shard: usize,
        offset: u64,
        src: &Shard,
        src_offset: u64,
        len: usize,
        scratch: &mut [u8],
    ) -> Result<()> {
        use std::os::fd::AsRawFd;
        if let (Some(range), Some(_)) = (self.memory_range(shard, offset, len), src.file()) {
            return src.read_at(src_offset, range?); // from the file straight into the output buffer
        }
        let Some(src_file) = src.file() else {
            // A tensor in memory: written from where it is, with no copy into scratch.
            let bytes = src.borrow(src_offset, len).ok_or_else(|| {
                Error::invalid(
                    &src.path,
                    format!("copy of {len} bytes at {src_offset} is outside the tensor"),
                )
            })?;
            return self.write_at(shard, offset, bytes);
        };
        let (_, file) = &self.files[shard];
        let mut done = 0usize;
        while done < len && self.in_kernel.load(Ordering::Relaxed) {
            let (mut from, mut to) = (
                (src_offset + done as u64) as libc::loff_t,
                (offset + done as u64) as libc::loff_t,
            );
            // SAFETY: plain syscall on two descriptors we own, with pointers to two live locals.
            let n = unsafe {
                libc::copy_file_range(
                    src_file.as_raw_fd(),
                    &mut from,
                    file.as_raw_fd(),
                    &mut to,
                    len - done,
                    0,
                )
            };
            if n > 0 {
                done += n as usize;
                continue;
            }
            if n < 0 {
                let errno = std::io::Error::last_os_error().raw_os_error();
                if matches!(
                    errno,
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)
                ) {
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
        self.written(shard, offset, len);
        Ok(())
    }

    /// Writes the index (when there is more than one shard) and, if `sync`, syncs every file to disk.
    /// Without `sync` the caller must sync before it publishes the folder (bulk runs do that in the
    /// background while the next expert is written).
    pub fn finish(self, shards: &ShardMap, sync: bool) -> Result<Vec<PathBuf>> {
        if !self.memory.is_empty() {
            return Ok(vec![]); // buffers in memory: no files, no index
        }
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
            file.write_all_at(text.as_bytes(), 0)
                .map_err(|e| Error::io(&path, e))?;
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
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
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
        let header = encode_header(
            &[("t".to_string(), Dtype::F16, vec![n as u64], 0, data.len() as u64)],
            &BTreeMap::new(),
        );
        std::fs::write(&path, [header.as_slice(), data].concat()).unwrap();
        Shard::open(&path).unwrap()
    }

    /// The output laid out like the host: same tensors, same order, same file offsets when our
    /// header fits in the host's, the same offsets within a block when it does not; the plain layout
    /// when a dtype differs or a host shard is larger than the shard size.
    #[test]
    fn layout_like_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = [
            ("b".to_string(), Dtype::F16, vec![3000u64]),
            ("a".to_string(), Dtype::F16, vec![5u64]),
        ];
        for pad in [0usize, 100] {
            // Host: "b" before "a" (not name order); its header is shorter than ours (no metadata)
            // or longer (100 bytes of metadata).
            let meta: BTreeMap<String, String> = if pad == 0 {
                BTreeMap::new()
            } else {
                [("x".to_string(), "y".repeat(pad))].into()
            };
            let entries = [
                ("b".to_string(), Dtype::F16, vec![3000], 0, 6000),
                ("a".to_string(), Dtype::F16, vec![5], 6000, 6010),
            ];
            let header = encode_header(&entries, &meta);
            let path = dir.path().join(format!("host-{pad}.safetensors"));
            std::fs::write(&path, [header.as_slice(), &[0u8; 6010]].concat()).unwrap();
            let host = Model::open(&path).unwrap();
            let plan = ShardMap::like(&host, &tensors, 1 << 20).unwrap().unwrap();
            assert_eq!(
                plan.tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
                ["b", "a"]
            );
            for t in &plan.tensors {
                let h = host.tensor(&t.name).unwrap();
                if pad > 0 {
                    assert_eq!(t.offset, h.offset);
                } else {
                    assert_eq!(t.offset, h.offset + CLONE_BLOCK);
                }
            }
            // The padded header is still a valid one that says where the data is.
            let (_, prefix, data) = &plan.shards[0];
            let json_len = u64::from_le_bytes(prefix[..8].try_into().unwrap());
            assert_eq!(json_len + 8, prefix.len() as u64);
            let parsed = crate::io::header::Header::parse(&prefix[8..], *data).unwrap();
            assert_eq!(
                parsed
                    .tensors
                    .iter()
                    .map(|t| (t.name.as_str(), t.start))
                    .collect::<Vec<_>>(),
                [("b", 0), ("a", 6000)]
            );
            // Another output dtype, or shards limited below the host's: the plain layout.
            let wide = [
                ("b".to_string(), Dtype::F32, vec![3000u64]),
                ("a".to_string(), Dtype::F32, vec![5u64]),
            ];
            assert!(ShardMap::like(&host, &wide, 1 << 20).unwrap().is_none());
            assert!(ShardMap::like(&host, &tensors, 5000).unwrap().is_none());
        }
    }

    /// In-kernel copies and the plain fallback produce the same bytes at the same offsets, and a
    /// source that ends early is an error naming the source, on either path.
    #[test]
    fn copy_from_in_kernel_and_fallback_agree() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(3 << 20) + 6).map(|i| (i * 7 % 251) as u8).collect();
        let src = input(dir.path(), &data);
        let base = src.len - data.len() as u64;
        for (in_kernel, drop) in [(true, false), (false, false), (true, true), (false, true)] {
            let out = dir.path().join(format!("out-{in_kernel}-{drop}"));
            std::fs::create_dir(&out).unwrap();
            let shards = ShardMap::new(
                &[("t".to_string(), Dtype::F16, vec![data.len() as u64 / 2])],
                1 << 40,
            )
            .unwrap();
            let mut w = OutputWriter::create(&out, &shards).unwrap();
            if drop {
                // Every range dropped from the page cache right after it is written: same bytes.
                w = w.drop_behind_after(0);
            }
            w.in_kernel.store(in_kernel, Ordering::Relaxed);
            let t = &shards.tensors[0];
            let mut scratch = vec![0u8; data.len()];
            let err = w
                .copy_from(0, t.offset, &src, base + 10, data.len(), &mut scratch)
                .unwrap_err();
            assert!(err.to_string().contains("in.safetensors"), "{err}");
            // Two pieces, out of order, the second one not a multiple of a page.
            let half = 1 << 20;
            w.copy_from(
                0,
                t.offset + half as u64,
                &src,
                base + half as u64,
                data.len() - half,
                &mut scratch,
            )
            .unwrap();
            w.copy_from(0, t.offset, &src, base, half, &mut scratch).unwrap();
            let files = w.finish(&shards, true).unwrap();
            let bytes = std::fs::read(&files[0]).unwrap();
            assert_eq!(
                &bytes[t.offset as usize..],
                &data[..],
                "in_kernel={in_kernel} drop={drop}"
            );
        }
    }
}
