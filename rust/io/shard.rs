//! One safetensors file opened read-only.
//!
//! Tensor data is read with positioned reads (`pread`) into buffers from the memory budget rather than
//! through a memory map, for two reasons: resident memory then stays what the budget says (mapped
//! file pages count towards a process's RSS until unmapped), and a file truncated or rewritten under us
//! gives a clean I/O error instead of a SIGBUS that would kill the process.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::header::{Header, MAX_HEADER_BYTES};

/// An open, validated safetensors file.
#[derive(Debug)]
pub struct Shard {
    /// Where it lives.
    pub path: PathBuf,
    file: File,
    /// Its validated header.
    pub header: Header,
    /// File length when opened (used to detect files that change under us).
    pub len: u64,
    /// Identity and modification time when opened (see [`Shard::check_unchanged`]).
    stamp: Stamp,
}

/// What `stat` says about a file: enough to notice it was replaced, truncated or rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp { dev: meta.dev(), ino: meta.ino(), len: meta.len(), mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128 }
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
            return Err(Error::invalid(path, format!("file has {len} bytes; a safetensors file needs at least 8")));
        }
        let mut prefix = [0u8; 8];
        file.read_exact_at(&mut prefix, 0).map_err(|e| Error::io(path, e))?;
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
        Ok(Shard { path: path.to_path_buf(), file, header, len, stamp: Stamp::of(&meta) })
    }

    /// Fails if the file at `path` is no longer the file that was opened, or was truncated or
    /// written since (size or modification time changed): data read from it may then be a mix of
    /// old and new bytes. Called after the last read, before an output is committed.
    pub fn check_unchanged(&self) -> Result<()> {
        let now = std::fs::metadata(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let open = self.file.metadata().map_err(|e| Error::io(&self.path, e))?;
        if Stamp::of(&now) != self.stamp || Stamp::of(&open) != self.stamp {
            return Err(Error::invalid(&self.path, "file was changed or replaced while it was being read; run again once it is stable"));
        }
        Ok(())
    }

    /// The open file, for in-kernel copies (see `OutputWriter::copy_from`).
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Reads `buf.len()` bytes at absolute file offset `offset`. A short read (file truncated since it
    /// was opened) is an error naming the file.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::invalid(&self.path, format!("file ended early while reading byte {offset} (was it truncated or changed during the run?)"))
            } else {
                Error::io(&self.path, e)
            }
        })
    }
}
