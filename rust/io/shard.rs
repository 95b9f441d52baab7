//! One safetensors file opened read-only.
//!
//! Tensor data is read with positioned reads (`pread`) into buffers from the memory budget rather than
//! through a memory map, for two reasons: resident memory then stays what the budget says (mapped
//! file pages count towards a process's RSS until unmapped), and a file truncated or rewritten under us
//! gives a clean I/O error instead of a SIGBUS that would kill the process.
//!
//! A shard can also be a tensor that already lives in this process's memory (a state dict handed over
//! by Python through DLPack, see [`Shard::memory`]): the memory backend beside the `pread` one. Its
//! bytes are read in place, with no copy (see [`Shard::borrow`]).

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::header::{Header, TensorInfo, MAX_HEADER_BYTES};

/// An open, validated safetensors file, or one tensor in memory.
#[derive(Debug)]
pub struct Shard {
    /// Where it lives (for a tensor in memory: a label such as `expert state dict`, used in errors).
    pub path: PathBuf,
    backend: Backend,
    /// Its validated header.
    pub header: Header,
    /// File length when opened (used to detect files that change under us); for memory, the bytes.
    pub len: u64,
}

/// Where a shard's bytes come from.
#[derive(Debug)]
enum Backend {
    /// A file read with `pread`; its identity and modification time when opened (see
    /// [`Shard::check_unchanged`]).
    File { file: File, stamp: Stamp },
    /// Bytes owned by someone else for the lifetime of the shard (see [`Shard::memory`]).
    Memory(MemoryRegion),
}

/// A byte range in memory that the engine reads (inputs) or fills (outputs) without owning it.
#[derive(Debug, Clone, Copy)]
pub struct MemoryRegion {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a region is only created through the `unsafe` constructor, whose caller guarantees that
// the memory stays valid for as long as the region is used; reads of it from several threads are
// sound, and writes go only to disjoint ranges (the output plan gives every chunk its own range).
unsafe impl Send for MemoryRegion {}
// SAFETY: as for Send.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// A region of `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr` must be valid for reads (and, for an output, writes) of `len` bytes for as long as the
    /// region or anything made from it is used, and nothing else may write to it meanwhile.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> MemoryRegion {
        MemoryRegion { ptr, len }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes `[offset, offset + len)`, or None when that range is outside the region.
    pub fn get(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let end = offset.checked_add(len as u64)?;
        if end > self.len as u64 {
            return None;
        }
        if len == 0 {
            return Some(&[]);
        }
        // SAFETY: in bounds (checked above) of memory the constructor's caller keeps valid.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.add(offset as usize), len) })
    }

    /// Bytes `[offset, offset + len)` for writing, or None when out of bounds.
    ///
    /// # Safety
    /// No other reference to this range may exist while the returned slice is alive (callers write
    /// disjoint ranges from different threads).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get_mut(&self, offset: u64, len: usize) -> Option<&mut [u8]> {
        let end = offset.checked_add(len as u64)?;
        if end > self.len as u64 {
            return None;
        }
        if len == 0 {
            return Some(&mut []);
        }
        // SAFETY: in bounds; exclusivity is the caller's promise.
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset as usize), len) })
    }
}

/// What `stat` says about a file: enough to notice it was replaced, truncated or rewritten. Carried
/// with work done on a file elsewhere (the sums of a pass split across machines), so that a later
/// opening can prove it reads the same bytes (see `Session::check_stamps`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stamp {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub len: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: meta
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(meta.mtime_nsec()),
        }
    }
}

impl Shard {
    /// Opens `path` read-only and validates its header against the file size.
    pub fn open(path: &Path) -> Result<Shard> {
        // Non-blocking open: a FIFO posing as a shard would otherwise block here forever, out of
        // reach of Ctrl-C (the check below then rejects it). Reads of regular files ignore the flag.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::invalid(path, "not a regular file"));
        }
        let len = meta.len();
        if len < 8 {
            return Err(Error::invalid(
                path,
                format!("file has {len} bytes; a safetensors file needs at least 8"),
            ));
        }
        let mut prefix = [0u8; 8];
        file.read_exact_at(&mut prefix, 0)
            .map_err(|e| Error::io(path, e))?;
        let json_len = u64::from_le_bytes(prefix);
        if json_len > MAX_HEADER_BYTES {
            return Err(Error::invalid(
                path,
                format!("header length {json_len} exceeds the {MAX_HEADER_BYTES}-byte limit (not a safetensors file?)"),
            ));
        }
        if json_len > len - 8 {
            return Err(Error::invalid(
                path,
                format!("header length {json_len} is larger than the file ({len} bytes): truncated or not a safetensors file"),
            ));
        }
        let mut json = vec![0u8; json_len as usize];
        file.read_exact_at(&mut json, 8).map_err(|e| Error::io(path, e))?;
        let header = Header::parse(&json, len - 8 - json_len).map_err(|m| Error::invalid(path, m))?;
        Ok(Shard {
            path: path.to_path_buf(),
            backend: Backend::File {
                file,
                stamp: Stamp::of(&meta),
            },
            header,
            len,
        })
    }

    /// One tensor held in memory, as a shard of its own whose data starts at offset 0. `label` names
    /// it in errors (e.g. `expert state dict`).
    pub fn memory(label: &Path, tensor: TensorInfo, region: MemoryRegion) -> Result<Shard> {
        if tensor.nbytes() != region.len as u64 {
            return Err(Error::invalid(
                label,
                format!(
                    "tensor '{}': {} {:?} needs {} bytes but its buffer has {}",
                    tensor.name,
                    tensor.dtype,
                    tensor.shape,
                    tensor.nbytes(),
                    region.len
                ),
            ));
        }
        let len = region.len as u64;
        Ok(Shard {
            path: label.to_path_buf(),
            backend: Backend::Memory(region),
            header: Header::memory(tensor),
            len,
        })
    }

    /// Fails if the file at `path` is no longer the file that was opened, or was truncated or
    /// written since (size or modification time changed): data read from it may then be a mix of
    /// old and new bytes. Called after the last read, before an output is committed.
    pub fn check_unchanged(&self) -> Result<()> {
        // Memory cannot be stamped: the caller of `MemoryRegion::new` promised nobody writes to it.
        let Backend::File { file, stamp } = &self.backend else {
            return Ok(());
        };
        let stamp = *stamp;
        let now = std::fs::metadata(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let open = file.metadata().map_err(|e| Error::io(&self.path, e))?;
        if Stamp::of(&now) != stamp || Stamp::of(&open) != stamp {
            return Err(Error::invalid(
                &self.path,
                "file was changed or replaced while it was being read; run again once it is stable",
            ));
        }
        Ok(())
    }

    /// The file's stamp when it was opened; None in memory.
    pub fn stamp(&self) -> Option<Stamp> {
        match &self.backend {
            Backend::File { stamp, .. } => Some(*stamp),
            Backend::Memory(_) => None,
        }
    }

    /// The open file, for in-kernel copies (see `OutputWriter::copy_from`); None in memory.
    pub(crate) fn file(&self) -> Option<&File> {
        match &self.backend {
            Backend::File { file, .. } => Some(file),
            Backend::Memory(_) => None,
        }
    }

    /// Tells the kernel how bytes `[offset, offset + len)` will be used (`posix_fadvise`):
    /// `libc::POSIX_FADV_WILLNEED` starts reading them ahead, `libc::POSIX_FADV_DONTNEED` drops them
    /// from the page cache. Advisory: errors are ignored, and a shard in memory has nothing to advise.
    pub fn advise(&self, offset: u64, len: usize, advice: libc::c_int) {
        use std::os::fd::AsRawFd;
        if let Backend::File { file, .. } = &self.backend {
            // SAFETY: plain syscall on a descriptor we own; no memory is passed.
            unsafe {
                libc::posix_fadvise(
                    file.as_raw_fd(),
                    offset as libc::off_t,
                    len as libc::off_t,
                    advice,
                );
            }
        }
    }

    /// The bytes at `[offset, offset + len)` in place, without a copy, for a shard in memory; None for
    /// a file (read it with [`Shard::read_at`]).
    pub fn borrow(&self, offset: u64, len: usize) -> Option<&[u8]> {
        match &self.backend {
            Backend::Memory(region) => region.get(offset, len),
            Backend::File { .. } => None,
        }
    }

    /// Reads `buf.len()` bytes at absolute file offset `offset`. A short read (file truncated since it
    /// was opened) is an error naming the file.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let file = match &self.backend {
            Backend::File { file, .. } => file,
            Backend::Memory(region) => {
                let bytes = region.get(offset, buf.len()).ok_or_else(|| {
                    Error::invalid(
                        &self.path,
                        format!(
                            "read of {} bytes at {offset} is outside the tensor's {} bytes",
                            buf.len(),
                            region.len
                        ),
                    )
                })?;
                buf.copy_from_slice(bytes);
                return Ok(());
            }
        };
        file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::invalid(&self.path, format!("file ended early while reading byte {offset} (was it truncated or changed during the run?)"))
            } else {
                Error::io(&self.path, e)
            }
        })
    }
}
