//! The pass of the analyze stage: for every measured tensor, the sum of squares of the base and of
//! each task vector (X - B), for any number of models X at once, accumulated in float64 (METHOD.md §2).
//!
//! Sums are formed per [`BLOCK`] of elements with eight fixed lanes and then added in block order, so
//! the result is the same for any chunk size and any thread count.

use crate::budget::{BufferPool, BLOCK};
use crate::dtype::{bf16_to_f32, cast, f16_to_f32, Dtype, Pod, NOT_FLOAT};
use crate::error::{Error, Result};
use crate::io::Model;
use crate::options::Numerics;
use crate::progress::Progress;
use crate::stream::{chunks, ordered_try_for_each, read_elems, Chunk};
use rayon::prelude::*;

/// Sums of squares for one tensor (serialisable: shares of a pass cross machines, see
/// [`crate::Session::sums_of`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sums {
    /// Tensor name.
    pub name: String,
    /// Element count.
    pub numel: u64,
    /// Σ B² (in `official` numerics, of B rounded to bf16, summed in float32 as torch does).
    pub base_ss: f64,
    /// Σ (X - B)² for each model X, in the order the models were given.
    pub diff_ss: Vec<f64>,
}

/// Computes [`Sums`] for `names` over `base` and `models`. Every tensor must exist with the same
/// dtype and shape in every model (the caller checks). Runs on the current rayon pool. A tensor
/// holding NaN or Inf is an [`Error::NonFinite`] naming it and its file.
pub fn compute(
    names: &[&str],
    base: &Model,
    models: &[&Model],
    numerics: Numerics,
    chunk_elems: usize,
    pool: &BufferPool,
    progress: &Progress,
) -> Result<Vec<Sums>> {
    compute_allowing(names, base, models, numerics, false, chunk_elems, pool, progress)
}

/// [`compute`], except that with `allow_non_finite` a tensor holding NaN or Inf is not an error: its
/// sums are taken over the finite elements only (an element is left out of Σ B² when B is not
/// finite, and out of Σ (X − B)² when B, X or X − B is not finite). Only the tensors whose plain sums
/// came out non-finite take that slower path.
#[allow(clippy::too_many_arguments)]
pub fn compute_allowing(
    names: &[&str],
    base: &Model,
    models: &[&Model],
    numerics: Numerics,
    allow_non_finite: bool,
    chunk_elems: usize,
    pool: &BufferPool,
    progress: &Progress,
) -> Result<Vec<Sums>> {
    compute_streaming(
        names,
        base,
        models,
        numerics,
        allow_non_finite,
        false,
        chunk_elems,
        pool,
        progress,
    )
}

/// [`compute_allowing`]; with `drop_base`, B's bytes are dropped from the page cache as soon as
/// they are summed (`posix_fadvise(DONTNEED)`), so that a pass over inputs bigger than memory leaves
/// more of the models the write pass reads in the cache (it never reads a full B).
#[allow(clippy::too_many_arguments)]
pub fn compute_streaming(
    names: &[&str],
    base: &Model,
    models: &[&Model],
    numerics: Numerics,
    allow_non_finite: bool,
    drop_base: bool,
    chunk_elems: usize,
    pool: &BufferPool,
    progress: &Progress,
) -> Result<Vec<Sums>> {
    debug_assert!(chunk_elems % BLOCK == 0);
    if numerics == Numerics::Official {
        // The authors' norms are torch's sequential float32 sums, which parallel chunks cannot
        // reproduce (see official.rs). With allow_non_finite, only the tensors holding NaN/Inf
        // are summed over their finite elements; the others keep torch's sums. Errors (non-finite
        // values not allowed, or overflow) take the general path below, which reports them.
        let finite = |s: &Sums| s.base_ss.is_finite() && s.diff_ss.iter().all(|v| v.is_finite());
        let mut out = crate::official::sums(names, base, models, chunk_elems, pool, progress)?;
        if allow_non_finite {
            for s in out.iter_mut().filter(|s| !finite(s)) {
                let (base_ss, diff_ss) =
                    finite_sums(&s.name, base, models, numerics, chunk_elems, pool, progress)?;
                if !s.base_ss.is_finite() {
                    s.base_ss = base_ss;
                }
                for (old, new) in s.diff_ss.iter_mut().zip(diff_ss) {
                    if !old.is_finite() {
                        *old = new;
                    }
                }
            }
        }
        if out.iter().all(finite) {
            return Ok(out);
        }
    }
    let window = window_chunks(chunk_elems, models.len());
    let mut out = block_order_sums(
        names,
        base,
        models,
        numerics,
        chunk_elems,
        window,
        drop_base,
        pool,
        progress,
    )?;
    if allow_non_finite {
        let bad: Vec<usize> = (0..out.len())
            .filter(|&i| !out[i].base_ss.is_finite() || out[i].diff_ss.iter().any(|v| !v.is_finite()))
            .collect();
        let redone: Vec<(f64, Vec<f64>)> = bad
            .par_iter()
            .map(|&i| finite_sums(names[i], base, models, numerics, chunk_elems, pool, progress))
            .collect::<Result<_>>()?;
        for (&i, (base_ss, diff_ss)) in bad.iter().zip(redone) {
            let s = &mut out[i];
            if !s.base_ss.is_finite() {
                s.base_ss = base_ss;
            }
            for (old, new) in s.diff_ss.iter_mut().zip(diff_ss) {
                if !old.is_finite() {
                    *old = new;
                }
            }
            if !s.base_ss.is_finite() || s.diff_ss.iter().any(|v| !v.is_finite()) {
                let t = base.tensor(&s.name).unwrap();
                return Err(Error::invalid(
                    &base.shard_of(t).path,
                    format!("tensor '{}': sums of squares overflow even over its finite values; values this large cannot be scored", s.name),
                ));
            }
        }
    }
    for s in &out {
        if !s.base_ss.is_finite() {
            let t = base.tensor(&s.name).unwrap();
            return Err(Error::NonFinite {
                path: base.shard_of(t).path.clone(),
                tensor: s.name.clone(),
            });
        }
        if let Some(i) = s.diff_ss.iter().position(|v| !v.is_finite()) {
            let t = models[i].tensor(&s.name).unwrap();
            return Err(Error::NonFinite {
                path: models[i].shard_of(t).path.clone(),
                tensor: s.name.clone(),
            });
        }
    }
    Ok(out)
}

/// The analyze pass proper (exact sums, or official ones that need the general path): block sums
/// of every chunk, added in block order per tensor. Chunks are computed `window` at a time, in
/// parallel, and added before the next window starts, so the partial sums held at once are bounded
/// by the window, not by the model (all of a 70B trio's would be ~1 M blocks x 3 sums, ~28 MiB with
/// their allocations). The result does not depend on `window`.
#[allow(clippy::too_many_arguments)]
fn block_order_sums(
    names: &[&str],
    base: &Model,
    models: &[&Model],
    numerics: Numerics,
    chunk_elems: usize,
    window: usize,
    drop_base: bool,
    pool: &BufferPool,
    progress: &Progress,
) -> Result<Vec<Sums>> {
    let refs: Vec<_> = names
        .iter()
        .map(|n| base.tensor(n).expect("checked by caller"))
        .collect();
    let numels: Vec<u64> = refs.iter().map(|t| t.numel()).collect();
    let work = chunks(&numels, chunk_elems);
    let k = models.len();
    let mut out: Vec<Sums> = names
        .iter()
        .zip(&numels)
        .map(|(n, &numel)| Sums {
            name: (*n).to_string(),
            numel,
            base_ss: 0.0,
            diff_ss: vec![0.0; k],
        })
        .collect();
    for part in work.chunks(window.max(1)) {
        // Chunks are started in file order (see `ordered_try_for_each`): the tail of the pass is
        // then what the page cache holds at its end, which the write pass uses first.
        let slots: Vec<std::sync::Mutex<Vec<f64>>> =
            part.iter().map(|_| std::sync::Mutex::default()).collect();
        ordered_try_for_each(part.len(), |i| {
            let c = &part[i];
            progress.check()?;
            let sums = chunk_sums(c, names[c.tensor], base, models, numerics, pool)?;
            let size = refs[c.tensor].dtype.size();
            if drop_base {
                let t = refs[c.tensor];
                base.shard_of(t).advise(
                    t.offset + c.start * size as u64,
                    c.len * size,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
            let bytes = c.len as u64 * size as u64 * (k as u64 + 1);
            progress
                .bytes_read
                .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
            progress.advance(bytes);
            *slots[i].lock().unwrap_or_else(std::sync::PoisonError::into_inner) = sums;
            Ok(())
        })?;
        let partials = slots
            .into_iter()
            .map(|m| m.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner));
        for (c, sums) in part.iter().zip(partials) {
            let s = &mut out[c.tensor];
            for block in sums.chunks_exact(k + 1) {
                s.base_ss += block[0];
                for (acc, v) in s.diff_ss.iter_mut().zip(&block[1..]) {
                    *acc += v;
                }
            }
        }
    }
    Ok(out)
}

/// Block sums (f64) held at once by the analyze pass, at most, when a window holds more than
/// [`MIN_WINDOW_CHUNKS`] chunks: 512 KiB.
const WINDOW_SUMS: usize = 1 << 16;
/// Chunks per window at least, so that the threads rarely wait for each other at a window's end.
const MIN_WINDOW_CHUNKS: usize = 256;

/// Chunks of `chunk_elems` elements per window of the analyze pass with `k` models besides B
/// (see [`compute_allowing`]): the same for every model size.
fn window_chunks(chunk_elems: usize, k: usize) -> usize {
    let sums_per_chunk = chunk_elems.div_ceil(BLOCK) * (k + 1);
    (WINDOW_SUMS / sums_per_chunk).max(MIN_WINDOW_CHUNKS)
}

/// Σ B² and Σ (X_k − B)² of one tensor over its finite elements only, in element order (see
/// [`compute_allowing`]). Scalar and sequential: used only for tensors that hold NaN or Inf.
fn finite_sums(
    name: &str,
    base: &Model,
    models: &[&Model],
    numerics: Numerics,
    chunk_elems: usize,
    pool: &BufferPool,
    progress: &Progress,
) -> Result<(f64, Vec<f64>)> {
    let bt = base.tensor(name).expect("checked by caller");
    let dtype = bt.dtype;
    let mut base_ss = 0f64;
    let mut diff_ss = vec![0f64; models.len()];
    for c in chunks(&[bt.numel()], chunk_elems) {
        progress.check()?;
        let mut bufs = pool.take();
        let (first, rest) = bufs.split_first_mut().expect("pool has buffers");
        let b = read_elems(base, bt, c.start, c.len, first)?;
        for i in 0..c.len {
            let v = kernels::value(dtype, numerics, b, i);
            if v.is_finite() {
                base_ss += v * v;
            }
        }
        for ((m, buf), acc) in models.iter().zip(rest.iter_mut()).zip(diff_ss.iter_mut()) {
            let x = read_elems(m, m.tensor(name).expect("checked by caller"), c.start, c.len, buf)?;
            for i in 0..c.len {
                let (bv, xv) = (
                    kernels::value(dtype, numerics, b, i),
                    kernels::value(dtype, numerics, x, i),
                );
                let d = kernels::diff(numerics, bv, xv);
                if bv.is_finite() && xv.is_finite() && d.is_finite() {
                    *acc += d * d;
                }
            }
        }
    }
    Ok((base_ss, diff_ss))
}

/// Block sums for one chunk: for each block, [Σ B², Σ (X_1 - B)², ...].
fn chunk_sums(
    c: &Chunk,
    name: &str,
    base: &Model,
    models: &[&Model],
    numerics: Numerics,
    pool: &BufferPool,
) -> Result<Vec<f64>> {
    let mut bufs = pool.take();
    let (first, rest) = bufs.split_first_mut().expect("pool has buffers");
    let bt = base.tensor(name).unwrap();
    let b = read_elems(base, bt, c.start, c.len, first)?;
    let mut xs: Vec<&[u8]> = Vec::with_capacity(models.len());
    for (m, buf) in models.iter().zip(rest.iter_mut()) {
        let t = m.tensor(name).unwrap();
        xs.push(read_elems(m, t, c.start, c.len, buf)?);
    }
    let k = models.len();
    let nblocks = c.len.div_ceil(BLOCK);
    let mut out = vec![0f64; nblocks * (k + 1)];
    let size = bt.dtype.size();
    let mut blk_xs: Vec<&[u8]> = Vec::with_capacity(k);
    for blk in 0..nblocks {
        let lo = blk * BLOCK * size;
        let hi = ((blk + 1) * BLOCK).min(c.len) * size;
        let slot = &mut out[blk * (k + 1)..(blk + 1) * (k + 1)];
        blk_xs.clear();
        blk_xs.extend(xs.iter().map(|x| &x[lo..hi]));
        kernels::block_sums(bt.dtype, numerics, &b[lo..hi], &blk_xs, slot);
    }
    Ok(out)
}

/// Inner loops, compiled twice on x86-64 (baseline and AVX2) and chosen at run time. Neither build
/// fuses multiply and add, so both give identical sums.
pub mod kernels {
    use super::{bf16_to_f32, cast, f16_to_f32, Dtype, Numerics, Pod, NOT_FLOAT};
    use crate::official;

    #[inline(always)]
    fn lanes<T: Pod>(b: &[T], x: &[T], f: impl Fn(T, T) -> f64) -> f64 {
        let mut acc = [0f64; 8];
        let mut cb = b.chunks_exact(8);
        let mut cx = x.chunks_exact(8);
        for (vb, vx) in (&mut cb).zip(&mut cx) {
            for l in 0..8 {
                let v = f(vb[l], vx[l]);
                acc[l] += v * v;
            }
        }
        for (l, (&vb, &vx)) in cb.remainder().iter().zip(cx.remainder()).enumerate() {
            let v = f(vb, vx);
            acc[l] += v * v;
        }
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
    }

    /// Element `i` of `bytes` as the numerics see it (the per-element rule of the kernels below, for
    /// the slow masked path).
    pub fn value(dtype: Dtype, numerics: Numerics, bytes: &[u8], i: usize) -> f64 {
        let v = match dtype {
            Dtype::BF16 => f64::from(bf16_to_f32(cast::<u16>(bytes)[i])),
            Dtype::F16 => f64::from(f16_to_f32(cast::<u16>(bytes)[i])),
            Dtype::F32 => f64::from(cast::<f32>(bytes)[i]),
            Dtype::F64 => cast::<f64>(bytes)[i],
            Dtype::Opaque(_) => unreachable!("{}", NOT_FLOAT),
        };
        match numerics {
            Numerics::Exact => v,
            Numerics::Official => f64::from(official::load(v as f32)),
        }
    }

    /// X − B from two values given by [`value`], as the kernels compute it.
    pub fn diff(numerics: Numerics, b: f64, x: f64) -> f64 {
        match numerics {
            Numerics::Exact => x - b,
            Numerics::Official => f64::from(official::sub(b as f32, x as f32)),
        }
    }

    /// The value of one element as the chosen numerics see it: exact, or rounded to bf16 (the authors
    /// load every checkpoint in bf16).
    #[inline(always)]
    fn generic_sum_sq(dtype: Dtype, numerics: Numerics, b: &[u8]) -> f64 {
        match (dtype, numerics) {
            (Dtype::BF16, _) => lanes(cast::<u16>(b), cast::<u16>(b), |v, _| f64::from(bf16_to_f32(v))),
            (Dtype::F16, Numerics::Exact) => {
                lanes(cast::<u16>(b), cast::<u16>(b), |v, _| f64::from(f16_to_f32(v)))
            }
            (Dtype::F16, Numerics::Official) => lanes(cast::<u16>(b), cast::<u16>(b), |v, _| {
                f64::from(official::load(f16_to_f32(v)))
            }),
            (Dtype::F32, Numerics::Exact) => lanes(cast::<f32>(b), cast::<f32>(b), |v, _| f64::from(v)),
            (Dtype::F32, Numerics::Official) => lanes(cast::<f32>(b), cast::<f32>(b), |v, _| {
                f64::from(official::load(v))
            }),
            (Dtype::F64, Numerics::Exact) => lanes(cast::<f64>(b), cast::<f64>(b), |v, _| v),
            (Dtype::F64, Numerics::Official) => lanes(cast::<f64>(b), cast::<f64>(b), |v, _| {
                f64::from(official::load(v as f32))
            }),
            (Dtype::Opaque(_), _) => unreachable!("{}", NOT_FLOAT),
        }
    }

    /// Exact: (X - B) in float64 from the exact values. Official: both rounded to bf16, the difference
    /// computed in float32 and rounded to bf16, as torch does for bf16 tensors.
    #[inline(always)]
    fn generic_sum_sq_diff(dtype: Dtype, numerics: Numerics, b: &[u8], x: &[u8]) -> f64 {
        let off = |bv: f32, xv: f32| f64::from(official::sub(official::load(bv), official::load(xv)));
        match (dtype, numerics) {
            (Dtype::BF16, Numerics::Exact) => lanes(cast::<u16>(b), cast::<u16>(x), |bv, xv| {
                f64::from(bf16_to_f32(xv)) - f64::from(bf16_to_f32(bv))
            }),
            (Dtype::BF16, Numerics::Official) => lanes(cast::<u16>(b), cast::<u16>(x), |bv, xv| {
                off(bf16_to_f32(bv), bf16_to_f32(xv))
            }),
            (Dtype::F16, Numerics::Exact) => lanes(cast::<u16>(b), cast::<u16>(x), |bv, xv| {
                f64::from(f16_to_f32(xv)) - f64::from(f16_to_f32(bv))
            }),
            (Dtype::F16, Numerics::Official) => lanes(cast::<u16>(b), cast::<u16>(x), |bv, xv| {
                off(f16_to_f32(bv), f16_to_f32(xv))
            }),
            (Dtype::F32, Numerics::Exact) => lanes(cast::<f32>(b), cast::<f32>(x), |bv, xv| {
                f64::from(xv) - f64::from(bv)
            }),
            (Dtype::F32, Numerics::Official) => lanes(cast::<f32>(b), cast::<f32>(x), off),
            (Dtype::F64, Numerics::Exact) => lanes(cast::<f64>(b), cast::<f64>(x), |bv, xv| xv - bv),
            (Dtype::F64, Numerics::Official) => {
                lanes(cast::<f64>(b), cast::<f64>(x), |bv, xv| off(bv as f32, xv as f32))
            }
            (Dtype::Opaque(_), _) => unreachable!("{}", NOT_FLOAT),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn avx2_sum_sq(dtype: Dtype, numerics: Numerics, b: &[u8]) -> f64 {
        match (dtype, numerics) {
            // SAFETY: AVX2 is enabled here; F16C is checked before the F16 kernel runs.
            (Dtype::BF16, Numerics::Exact) if x86::has_f16c() => unsafe {
                x86::sum_sq::<false>(cast::<u16>(b))
            },
            (Dtype::F16, Numerics::Exact) if x86::has_f16c() => unsafe {
                x86::sum_sq::<true>(cast::<u16>(b))
            },
            _ => generic_sum_sq(dtype, numerics, b),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn avx2_sum_sq_diff(dtype: Dtype, numerics: Numerics, b: &[u8], x: &[u8]) -> f64 {
        match (dtype, numerics) {
            // SAFETY: as in `avx2_sum_sq`.
            (Dtype::BF16, Numerics::Exact) if x86::has_f16c() => unsafe {
                x86::sum_sq_diff::<false>(cast::<u16>(b), cast::<u16>(x))
            },
            (Dtype::F16, Numerics::Exact) if x86::has_f16c() => unsafe {
                x86::sum_sq_diff::<true>(cast::<u16>(b), cast::<u16>(x))
            },
            _ => generic_sum_sq_diff(dtype, numerics, b, x),
        }
    }

    /// Hand-vectorised exact kernels for 16-bit inputs (what the compiler makes of [`lanes`] for them
    /// is mostly scalar). The same eight f64 lanes as [`lanes`]: the two 4-wide accumulators hold
    /// lanes 0–3 and 4–7, element i goes to lane i mod 8 in element order, the tail goes to lanes
    /// 0.. in order, and the lanes are added in the same tree. Separate multiply and add (no FMA):
    /// every result is bit-identical to the baseline build.
    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::{
            __m256d, _mm256_add_pd, _mm256_castps256_ps128, _mm256_castsi256_ps, _mm256_cvtepu16_epi32,
            _mm256_cvtph_ps, _mm256_cvtps_pd, _mm256_extractf128_ps, _mm256_mul_pd, _mm256_setzero_pd,
            _mm256_slli_epi32, _mm256_storeu_pd, _mm256_sub_pd, _mm_loadu_si128,
        };

        use crate::dtype::{bf16_to_f32, f16_to_f32};

        pub(super) fn has_f16c() -> bool {
            std::is_x86_feature_detected!("f16c")
        }

        /// Eight 16-bit values at `p` as f64 lanes 0–3 and 4–7 (exact). `F16`: IEEE half, else bf16.
        #[inline]
        #[target_feature(enable = "avx2,f16c")]
        unsafe fn load8<const F16: bool>(p: *const u16) -> (__m256d, __m256d) {
            // SAFETY: the caller guarantees 8 readable u16 at p; unaligned load.
            let h = unsafe { _mm_loadu_si128(p.cast()) };
            let f = if F16 {
                _mm256_cvtph_ps(h)
            } else {
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            };
            (
                _mm256_cvtps_pd(_mm256_castps256_ps128(f)),
                _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(f)),
            )
        }

        #[inline(always)]
        fn scalar<const F16: bool>(v: u16) -> f64 {
            if F16 {
                f64::from(f16_to_f32(v))
            } else {
                f64::from(bf16_to_f32(v))
            }
        }

        #[inline]
        #[target_feature(enable = "avx2,f16c")]
        fn reduce(a0: __m256d, a1: __m256d, tail: impl Iterator<Item = f64>) -> f64 {
            let mut acc = [0f64; 8];
            // SAFETY: acc has room for two unaligned stores of four f64.
            unsafe {
                _mm256_storeu_pd(acc.as_mut_ptr(), a0);
                _mm256_storeu_pd(acc.as_mut_ptr().add(4), a1);
            }
            for (l, v) in tail.enumerate() {
                acc[l] += v * v;
            }
            ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
        }

        /// Σ v² (exact).
        ///
        /// # Safety
        /// The CPU must support AVX2 and F16C.
        #[target_feature(enable = "avx2,f16c")]
        pub(super) unsafe fn sum_sq<const F16: bool>(v: &[u16]) -> f64 {
            let n8 = v.len() / 8 * 8;
            let (mut a0, mut a1) = (_mm256_setzero_pd(), _mm256_setzero_pd());
            let mut i = 0;
            while i < n8 {
                // SAFETY: i + 8 <= v.len().
                let (x0, x1) = unsafe { load8::<F16>(v.as_ptr().add(i)) };
                a0 = _mm256_add_pd(a0, _mm256_mul_pd(x0, x0));
                a1 = _mm256_add_pd(a1, _mm256_mul_pd(x1, x1));
                i += 8;
            }
            reduce(a0, a1, v[n8..].iter().map(|&e| scalar::<F16>(e)))
        }

        /// Σ (x − b)² (exact, the difference formed in f64).
        ///
        /// # Safety
        /// The CPU must support AVX2 and F16C; `b` and `x` have the same length.
        #[target_feature(enable = "avx2,f16c")]
        pub(super) unsafe fn sum_sq_diff<const F16: bool>(b: &[u16], x: &[u16]) -> f64 {
            assert_eq!(b.len(), x.len());
            let n8 = b.len() / 8 * 8;
            let (mut a0, mut a1) = (_mm256_setzero_pd(), _mm256_setzero_pd());
            let mut i = 0;
            while i < n8 {
                // SAFETY: i + 8 <= len of both slices.
                let ((b0, b1), (x0, x1)) =
                    unsafe { (load8::<F16>(b.as_ptr().add(i)), load8::<F16>(x.as_ptr().add(i))) };
                let (d0, d1) = (_mm256_sub_pd(x0, b0), _mm256_sub_pd(x1, b1));
                a0 = _mm256_add_pd(a0, _mm256_mul_pd(d0, d0));
                a1 = _mm256_add_pd(a1, _mm256_mul_pd(d1, d1));
                i += 8;
            }
            reduce(
                a0,
                a1,
                b[n8..]
                    .iter()
                    .zip(&x[n8..])
                    .map(|(&bv, &xv)| scalar::<F16>(xv) - scalar::<F16>(bv)),
            )
        }

        /// [Σ b², Σ (s − b)², Σ (m − b)²] in one pass: the three sums of [`sum_sq`] and
        /// [`sum_sq_diff`], each with its own two accumulators, so each is bit for bit the same.
        ///
        /// # Safety
        /// The CPU must support AVX2 and F16C; the three slices have the same length.
        #[target_feature(enable = "avx2,f16c")]
        pub(super) unsafe fn sums3<const F16: bool>(b: &[u16], s: &[u16], m: &[u16]) -> [f64; 3] {
            assert!(s.len() == b.len() && m.len() == b.len());
            let n8 = b.len() / 8 * 8;
            let z = _mm256_setzero_pd();
            let (mut bb0, mut bb1, mut ss0, mut ss1, mut mm0, mut mm1) = (z, z, z, z, z, z);
            let mut i = 0;
            while i < n8 {
                // SAFETY: i + 8 <= len of all three slices.
                let ((b0, b1), (s0, s1), (m0, m1)) = unsafe {
                    (
                        load8::<F16>(b.as_ptr().add(i)),
                        load8::<F16>(s.as_ptr().add(i)),
                        load8::<F16>(m.as_ptr().add(i)),
                    )
                };
                bb0 = _mm256_add_pd(bb0, _mm256_mul_pd(b0, b0));
                bb1 = _mm256_add_pd(bb1, _mm256_mul_pd(b1, b1));
                let (d0, d1) = (_mm256_sub_pd(s0, b0), _mm256_sub_pd(s1, b1));
                ss0 = _mm256_add_pd(ss0, _mm256_mul_pd(d0, d0));
                ss1 = _mm256_add_pd(ss1, _mm256_mul_pd(d1, d1));
                let (d0, d1) = (_mm256_sub_pd(m0, b0), _mm256_sub_pd(m1, b1));
                mm0 = _mm256_add_pd(mm0, _mm256_mul_pd(d0, d0));
                mm1 = _mm256_add_pd(mm1, _mm256_mul_pd(d1, d1));
                i += 8;
            }
            let (bt, st, mt) = (&b[n8..], &s[n8..], &m[n8..]);
            [
                reduce(bb0, bb1, bt.iter().map(|&e| scalar::<F16>(e))),
                reduce(
                    ss0,
                    ss1,
                    bt.iter()
                        .zip(st)
                        .map(|(&bv, &xv)| scalar::<F16>(xv) - scalar::<F16>(bv)),
                ),
                reduce(
                    mm0,
                    mm1,
                    bt.iter()
                        .zip(mt)
                        .map(|(&bv, &xv)| scalar::<F16>(xv) - scalar::<F16>(bv)),
                ),
            ]
        }

        #[cfg(test)]
        mod tests {
            use super::super::{generic_sum_sq, generic_sum_sq_diff};
            use crate::dtype::{AlignedBuf, Dtype};
            use crate::options::Numerics;

            /// Every bit pattern class (normals, subnormals, zeros of both signs, large values) at
            /// lengths around the 8-lane boundary: the vector kernels equal the baseline bit for bit.
            #[test]
            fn vector_kernels_are_bit_identical_to_baseline() {
                if !(std::is_x86_feature_detected!("avx2") && super::has_f16c()) {
                    return;
                }
                let mut s = 0x2545_f491_4f6c_dd1du64;
                let mut next = || {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    s
                };
                for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 1000, 65_536 + 5] {
                    for finite_only in [true, false] {
                        let mut bb = AlignedBuf::new(2 * n);
                        let mut xb = AlignedBuf::new(2 * n);
                        for (bv, xv) in bb
                            .bytes_mut(2 * n)
                            .chunks_exact_mut(2)
                            .zip(xb.bytes_mut(2 * n).chunks_exact_mut(2))
                        {
                            let (r1, r2) = (next() as u16, next() as u16);
                            // Exponent bits all ones (inf/NaN) only when allowed.
                            let fix = |v: u16, mask: u16| {
                                if finite_only && v & mask == mask {
                                    v & !0x4000
                                } else {
                                    v
                                }
                            };
                            bv.copy_from_slice(&fix(r1, 0x7f80).to_le_bytes());
                            xv.copy_from_slice(&fix(r2, 0x7f80).to_le_bytes());
                        }
                        let (b, x) = (bb.bytes(2 * n), xb.bytes(2 * n));
                        for (dtype, f16) in [(Dtype::BF16, false), (Dtype::F16, true)] {
                            let (want_ss, want_d) = (
                                generic_sum_sq(dtype, Numerics::Exact, b),
                                generic_sum_sq_diff(dtype, Numerics::Exact, b, x),
                            );
                            // SAFETY: features checked above.
                            let (got_ss, got_d) = unsafe {
                                if f16 {
                                    (
                                        super::sum_sq::<true>(crate::dtype::cast(b)),
                                        super::sum_sq_diff::<true>(
                                            crate::dtype::cast(b),
                                            crate::dtype::cast(x),
                                        ),
                                    )
                                } else {
                                    (
                                        super::sum_sq::<false>(crate::dtype::cast(b)),
                                        super::sum_sq_diff::<false>(
                                            crate::dtype::cast(b),
                                            crate::dtype::cast(x),
                                        ),
                                    )
                                }
                            };
                            let same =
                                |a: f64, b: f64| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
                            assert!(same(got_ss, want_ss), "{dtype} n={n}: {got_ss} vs {want_ss}");
                            assert!(same(got_d, want_d), "{dtype} n={n}: {got_d} vs {want_d}");
                            // The fused pass (x twice: S and M) gives the same three sums.
                            let mut fused = [0f64; 3];
                            super::super::block_sums(dtype, Numerics::Exact, b, &[x, b], &mut fused);
                            let want_bb = generic_sum_sq_diff(dtype, Numerics::Exact, b, b);
                            assert!(
                                same(fused[0], want_ss) && same(fused[1], want_d) && same(fused[2], want_bb),
                                "{dtype} n={n}: {fused:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    fn has_avx2() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Σ v² over the elements of `b` (raw bytes of `dtype`).
    pub fn sum_sq(dtype: Dtype, numerics: Numerics, b: &[u8]) -> f64 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 (checked above).
            return unsafe { avx2_sum_sq(dtype, numerics, b) };
        }
        generic_sum_sq(dtype, numerics, b)
    }

    /// `out[0]` = Σ b² and `out[1 + i]` = Σ (x_i − b)², each bit for bit as [`sum_sq`] and
    /// [`sum_sq_diff`] give it; for exact 16-bit data, models are taken two at a time in one pass
    /// over B and both (B, S and M, the usual case, in a single pass).
    pub fn block_sums(dtype: Dtype, numerics: Numerics, b: &[u8], xs: &[&[u8]], out: &mut [f64]) {
        assert!(out.len() == xs.len() + 1 && xs.iter().all(|x| x.len() == b.len()));
        #[cfg(target_arch = "x86_64")]
        if numerics == Numerics::Exact
            && xs.len() >= 2
            && matches!(dtype, Dtype::BF16 | Dtype::F16)
            && has_avx2()
            && x86::has_f16c()
        {
            // Experts two at a time through the fused kernel (a bulk run has S and several M); an odd
            // last one is paired with itself. Every sum keeps its own lanes, so each is bit for bit
            // what a run with only that expert computes.
            let (base_sum, rest) = out.split_first_mut().expect("out has the base slot");
            for (pair, o) in xs.chunks(2).zip(rest.chunks_mut(2)) {
                let (x0, x1) = (pair[0], *pair.get(1).unwrap_or(&pair[0]));
                // SAFETY: AVX2 and F16C checked just above; the lengths are equal (asserted).
                let sums = unsafe {
                    if dtype == Dtype::BF16 {
                        x86::sums3::<false>(cast(b), cast(x0), cast(x1))
                    } else {
                        x86::sums3::<true>(cast(b), cast(x0), cast(x1))
                    }
                };
                *base_sum = sums[0];
                o.copy_from_slice(&sums[1..=o.len()]);
            }
            return;
        }
        out[0] = sum_sq(dtype, numerics, b);
        for (o, x) in out[1..].iter_mut().zip(xs) {
            *o = sum_sq_diff(dtype, numerics, b, x);
        }
    }

    /// Σ (x - b)² over the elements of `b` and `x` (raw bytes of `dtype`, same length).
    pub fn sum_sq_diff(dtype: Dtype, numerics: Numerics, b: &[u8], x: &[u8]) -> f64 {
        assert_eq!(b.len(), x.len());
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 (checked above).
            return unsafe { avx2_sum_sq_diff(dtype, numerics, b, x) };
        }
        generic_sum_sq_diff(dtype, numerics, b, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::Budget;
    use crate::io::header::encode_header;
    use std::collections::BTreeMap;

    /// The windowed pass (bounded memory for any model size) gives the same bits for any window,
    /// and the sums a plain float64 loop over the values gives (to rounding).
    #[test]
    fn sums_do_not_depend_on_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = [3 * BLOCK + 17, 5, 2 * BLOCK];
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut values: Vec<Vec<Vec<f32>>> = vec![];
        let mut models = vec![];
        for m in 0..3 {
            let mut entries = vec![];
            let mut data = vec![];
            let mut vs = vec![];
            for (i, &n) in sizes.iter().enumerate() {
                let v: Vec<f32> = (0..n)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                    })
                    .collect();
                let start = data.len() as u64;
                data.extend(v.iter().flat_map(|x| x.to_le_bytes()));
                entries.push((
                    format!("t{i}"),
                    Dtype::F32,
                    vec![n as u64],
                    start,
                    data.len() as u64,
                ));
                vs.push(v);
            }
            let path = dir.path().join(format!("{m}.safetensors"));
            std::fs::write(&path, [encode_header(&entries, &BTreeMap::new()), data].concat()).unwrap();
            models.push(Model::open(&path).unwrap());
            values.push(vs);
        }
        let names = ["t0", "t1", "t2"];
        let budget = Budget::plan(1 << 30, 2, 3, 4).unwrap();
        let pool = BufferPool::new(&budget);
        let run = |window| {
            block_order_sums(
                &names,
                &models[0],
                &[&models[1], &models[2]],
                Numerics::Exact,
                BLOCK,
                window,
                window % 2 == 1,
                &pool,
                &Progress::default(),
            )
            .unwrap()
        };
        let whole = run(usize::MAX);
        for window in [1, 2, 3, 5] {
            assert_eq!(run(window), whole, "window {window}");
        }
        for (i, s) in whole.iter().enumerate() {
            let b = &values[0][i];
            let naive_b: f64 = b.iter().map(|v| f64::from(*v).powi(2)).sum();
            assert!((s.base_ss - naive_b).abs() <= 1e-12 * naive_b, "{}", s.name);
            for (k, x) in values[1..].iter().enumerate() {
                let naive: f64 = b
                    .iter()
                    .zip(&x[i])
                    .map(|(b, x)| (f64::from(*x) - f64::from(*b)).powi(2))
                    .sum();
                assert!(
                    (s.diff_ss[k] - naive).abs() <= 1e-12 * naive,
                    "{} model {k}",
                    s.name
                );
            }
        }
    }
}
