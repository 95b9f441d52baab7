//! One safetensors file opened read-only.
//!
//! Tensor data is read with positioned reads (`pread`) into buffers from the memory budget rather than
//! through a memory map, for two reasons: resident memory then stays what the budget says (mapped
//! file pages count towards a process's RSS until unmapped), and a file truncated or rewritten under us
//! gives a clean I/O error instead of a SIGBUS that would kill the process.

use std::fs::File;
use std::os::unix::fs::FileExt;
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
}

impl Shard {
    /// Opens `path` read-only and validates its header against the file size.
    pub fn open(path: &Path) -> Result<Shard> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
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
        Ok(Shard { path: path.to_path_buf(), file, header, len })
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
