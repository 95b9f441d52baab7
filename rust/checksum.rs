//! Checksums of finished output files, for the bulk manifest that lets a rerun skip verified outputs.
//!
//! A file is hashed in 8 MiB blocks in parallel (XXH3-64 per block), and the block hashes, in order,
//! with the file length, are hashed again: a few GB/s per core, so checking a multi-GB output costs a
//! fraction of writing it. This detects damage and truncation, not tampering (it is not a
//! cryptographic hash).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rayon::prelude::*;
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{Error, Result};
use crate::progress::Progress;

/// Bytes hashed per task (also the one buffer each worker thread holds).
pub const BLOCK: usize = 8 << 20;

/// The checksum of one file, as `xxh3-8m:<16 hex digits>`.
pub fn file_checksum(path: &Path, progress: &Progress) -> Result<String> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let blocks = len.div_ceil(BLOCK as u64);
    let digests: Vec<u64> = (0..blocks)
        .into_par_iter()
        .map_init(Vec::new, |buf: &mut Vec<u8>, i| {
            progress.check()?;
            let start = i * BLOCK as u64;
            let n = (len - start).min(BLOCK as u64) as usize;
            buf.resize(n, 0);
            file.read_exact_at(buf, start).map_err(|e| Error::io(path, e))?;
            progress.advance(n as u64);
            Ok(xxh3_64(buf))
        })
        .collect::<Result<_>>()?;
    let mut summary = Vec::with_capacity(8 * (digests.len() + 1));
    summary.extend_from_slice(&len.to_le_bytes());
    for d in digests {
        summary.extend_from_slice(&d.to_le_bytes());
    }
    Ok(format!("xxh3-8m:{:016x}", xxh3_64(&summary)))
}
