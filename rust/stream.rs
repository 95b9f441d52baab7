//! Chunked reading: the same element range of the same tensor, from several models at once.

use crate::dtype::AlignedBuf;
use crate::error::Result;
use crate::io::{Model, TensorRef};

/// One unit of parallel work: elements `[start, start + len)` of tensor number `tensor`.
#[derive(Debug, Clone, Copy)]
pub struct Chunk {
    /// Index into the caller's tensor list.
    pub tensor: usize,
    /// First element.
    pub start: u64,
    /// Number of elements.
    pub len: usize,
}

/// Splits tensors of the given element counts into chunks of at most `chunk_elems` elements, in
/// tensor order. Chunk boundaries are multiples of `chunk_elems`, independent of thread count.
pub fn chunks(numels: &[u64], chunk_elems: usize) -> Vec<Chunk> {
    let mut out = vec![];
    for (tensor, &n) in numels.iter().enumerate() {
        let mut start = 0;
        while start < n {
            let len = (n - start).min(chunk_elems as u64) as usize;
            out.push(Chunk { tensor, start, len });
            start += len as u64;
        }
    }
    out
}

/// Runs `f(0)`, `f(1)`, ... `f(n - 1)` on every thread of the current rayon pool, each thread taking
/// the next index when it is free, so that the items are started in order (a parallel iterator splits
/// the range in halves instead, and two threads then read two places of a file at once). Stops
/// starting items after the first error, which it returns.
pub fn ordered_try_for_each<E: Send>(
    n: usize,
    f: impl Fn(usize) -> std::result::Result<(), E> + Sync,
) -> std::result::Result<(), E> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let threads = rayon::current_num_threads().min(n).max(1);
    rayon::iter::ParallelIterator::try_for_each(
        rayon::iter::IntoParallelIterator::into_par_iter(0..threads),
        |_| loop {
            if failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                return Ok(());
            }
            if let Err(e) = f(i) {
                failed.store(true, Ordering::Relaxed);
                return Err(e);
            }
        },
    )
}

/// Elements `[start, start + len)` of tensor `t` of `model`: read into the front of `buf` from a file,
/// or, for a tensor in memory that is aligned for its dtype, the bytes in place with no copy at all.
pub fn read_elems<'a>(
    model: &'a Model,
    t: &TensorRef,
    start: u64,
    len: usize,
    buf: &'a mut AlignedBuf,
) -> Result<&'a [u8]> {
    let size = t.dtype.size();
    let shard = model.shard_of(t);
    let offset = t.offset + start * size as u64;
    if let Some(bytes) = shard
        .borrow(offset, len * size)
        .filter(|b| (b.as_ptr() as usize) % size == 0)
    {
        return Ok(bytes);
    }
    let bytes = buf.bytes_mut(len * size);
    shard.read_at(offset, bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_element_once() {
        let c = chunks(&[0, 5, 10, 1], 4);
        let lens: Vec<(usize, u64, usize)> = c.iter().map(|c| (c.tensor, c.start, c.len)).collect();
        assert_eq!(
            lens,
            vec![(1, 0, 4), (1, 4, 1), (2, 0, 4), (2, 4, 4), (2, 8, 2), (3, 0, 1)]
        );
    }
}
