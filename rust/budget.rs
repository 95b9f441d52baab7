//! The memory budget. This is the only place that allocates tensor-sized buffers: a fixed set of
//! chunk buffers per worker, created up front and recycled, so peak memory is fixed by the budget and
//! not by the model size.

use std::sync::{Condvar, Mutex};

use crate::dtype::AlignedBuf;
use crate::error::{Error, Result};

/// Elements per block of the analyze pass. Sums are formed per block and then added in block order, so the
/// statistics do not depend on chunk size or thread count.
pub const BLOCK: usize = 1 << 16;
/// Largest chunk, in elements (bigger chunks gain nothing once they are well past cache sizes).
pub const MAX_CHUNK: usize = 1 << 20;
/// Memory kept aside for everything that is not a chunk buffer: the interpreter, code, metadata.
pub const RESERVE: u64 = 64 << 20;

/// How the budget is spent.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Elements per chunk (a multiple of [`BLOCK`]).
    pub chunk_elems: usize,
    /// Workers that can hold buffers at once (never more than asked threads).
    pub workers: usize,
    /// Buffers per worker.
    pub buffers: usize,
    /// Bytes per buffer.
    pub buffer_bytes: usize,
    /// Bytes of scratch memory each worker may hold besides its buffers (LoRA factors read for a
    /// chunk), at `chunk_elems`.
    pub scratch_bytes: u64,
}

impl Budget {
    /// Fits `threads` workers, each holding `buffers` buffers of up to [`MAX_CHUNK`] elements of
    /// `elem_bytes` (the widest element involved), into `max_memory`. Shrinks chunks first, then workers.
    pub fn plan(max_memory: u64, threads: usize, buffers: usize, elem_bytes: usize) -> Result<Budget> {
        Budget::plan_with_scratch(max_memory, threads, buffers, elem_bytes, |_| 0)
    }

    /// [`Budget::plan`] when each worker also holds up to `scratch(chunk_elems)` bytes of scratch
    /// memory besides its buffers (non-decreasing in the chunk size): chunks and workers shrink until
    /// `RESERVE + workers · (buffers · chunk · elem_bytes + scratch(chunk))` fits.
    pub fn plan_with_scratch(
        max_memory: u64,
        threads: usize,
        buffers: usize,
        elem_bytes: usize,
        scratch: impl Fn(usize) -> u64,
    ) -> Result<Budget> {
        let per_elem = (buffers * elem_bytes) as u64;
        let min_need = RESERVE + per_elem * BLOCK as u64 + scratch(BLOCK);
        if max_memory < min_need {
            let extra = match scratch(BLOCK) {
                0 => String::new(),
                n => format!(" + {} of LoRA factor scratch", fmt_bytes(n)),
            };
            return Err(Error::Budget {
                message: format!(
                    "memory budget of {} is too small: this merge needs at least {} ({} reserved + {} buffers of {} elements{extra})",
                    fmt_bytes(max_memory),
                    fmt_bytes(min_need),
                    fmt_bytes(RESERVE),
                    buffers,
                    BLOCK
                ),
            });
        }
        let avail = max_memory - RESERVE;
        let mut chunk = MAX_CHUNK;
        let mut workers = threads.max(1);
        loop {
            if (per_elem * chunk as u64 + scratch(chunk)) * workers as u64 <= avail {
                break;
            }
            if chunk > BLOCK {
                chunk /= 2;
            } else {
                workers -= 1; // min_need guarantees one worker at BLOCK fits
            }
        }
        Ok(Budget {
            chunk_elems: chunk,
            workers,
            buffers,
            buffer_bytes: chunk * elem_bytes,
            scratch_bytes: scratch(chunk),
        })
    }

    /// Bytes the buffers take in total.
    pub fn buffer_total(&self) -> u64 {
        (self.workers * self.buffers * self.buffer_bytes) as u64
    }

    /// Bytes the budget accounts for at most: the reserve, every buffer and every worker's scratch.
    pub fn accounted_peak(&self) -> u64 {
        RESERVE + self.buffer_total() + self.workers as u64 * self.scratch_bytes
    }
}

/// Human-readable bytes (binary units).
pub fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A fixed set of buffer sets, one per worker. `take` blocks while all are in use, so no more than
/// `budget.workers` sets ever exist.
pub struct BufferPool {
    sets: Mutex<Vec<Vec<AlignedBuf>>>,
    ready: Condvar,
}

impl BufferPool {
    /// Allocates every buffer the budget allows, up front.
    pub fn new(budget: &Budget) -> BufferPool {
        let sets = (0..budget.workers)
            .map(|_| {
                (0..budget.buffers)
                    .map(|_| AlignedBuf::new(budget.buffer_bytes))
                    .collect()
            })
            .collect();
        BufferPool {
            sets: Mutex::new(sets),
            ready: Condvar::new(),
        }
    }

    /// Borrows one worker's set of buffers until the guard drops.
    pub fn take(&self) -> PoolGuard<'_> {
        let mut sets = self
            .sets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if let Some(set) = sets.pop() {
                return PoolGuard {
                    pool: self,
                    set: Some(set),
                };
            }
            sets = self
                .ready
                .wait(sets)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

/// A borrowed buffer set.
pub struct PoolGuard<'a> {
    pool: &'a BufferPool,
    set: Option<Vec<AlignedBuf>>,
}

impl std::ops::Deref for PoolGuard<'_> {
    type Target = Vec<AlignedBuf>;
    fn deref(&self) -> &Self::Target {
        self.set.as_ref().unwrap()
    }
}

impl std::ops::DerefMut for PoolGuard<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.set.as_mut().unwrap()
    }
}

impl Drop for PoolGuard<'_> {
    fn drop(&mut self) {
        if let Some(set) = self.set.take() {
            self.pool
                .sets
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(set);
            self.pool.ready.notify_one();
        }
    }
}

/// Runs `f` on a fresh rayon pool of `threads` threads (sized by the budget), so that the caller's
/// threads and any global pool are left alone, and a forked child inherits no pool.
pub fn run_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> Result<T> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("layerswap-{i}"))
        .build()
        .map_err(|e| Error::argument(format!("cannot start {threads} worker threads: {e}")))?;
    Ok(pool.install(f))
}
