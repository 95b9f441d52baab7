//! The statistics pass: for every measured tensor, the sum of squares of the base and of each task
//! vector (X - B), for any number of experts at once, accumulated in float64 (METHOD.md §2).
//!
//! Sums are formed per [`BLOCK`] of elements with eight fixed lanes and then added in block order, so
//! the result is the same for any chunk size and any thread count.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::budget::{BufferPool, BLOCK};
use crate::dtype::{bf16_to_f32, cast, f16_to_f32, f32_to_bf16, Dtype, Pod};
use crate::error::{Error, Result};
use crate::io::Model;
use crate::options::Numerics;
use crate::progress::Progress;
use crate::stream::{chunks, read_elems, Chunk};

/// Sums of squares for one tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorStats {
    /// Tensor name.
    pub name: String,
    /// Element count.
    pub numel: u64,
    /// Σ B² (in `official` numerics, of B rounded to bf16, summed in float32 as torch does).
    pub base_ss: f64,
    /// Σ (X - B)² for each expert, in the order the experts were given.
    pub diff_ss: Vec<f64>,
}

/// Computes [`TensorStats`] for `names` over `base` and `experts`. Every tensor must exist with the same
/// dtype and shape in every model (the caller checks). Runs on the current rayon pool.
pub fn compute(
    names: &[&str],
    base: &Model,
    experts: &[&Model],
    numerics: Numerics,
    chunk_elems: usize,
    pool: &BufferPool,
    progress: &Progress,
) -> Result<Vec<TensorStats>> {
    debug_assert!(chunk_elems % BLOCK == 0);
    if numerics == Numerics::Official {
        // The authors' norms are torch's sequential float32 sums, which parallel chunks cannot
        // reproduce (see official.rs). A non-finite result takes the general path below.
        let out = crate::official::sums(names, base, experts, chunk_elems, pool, progress)?;
        if out.iter().all(|s| s.base_ss.is_finite() && s.diff_ss.iter().all(|v| v.is_finite())) {
            return Ok(out);
        }
    }
    let refs: Vec<_> = names.iter().map(|n| base.tensor(n).expect("checked by caller")).collect();
    let numels: Vec<u64> = refs.iter().map(|t| t.numel()).collect();
    let work = chunks(&numels, chunk_elems);
    let k = experts.len();
    let partials: Vec<Vec<f64>> = work
        .par_iter()
        .map(|c| {
            progress.check()?;
            let sums = chunk_sums(c, names[c.tensor], base, experts, numerics, pool)?;
            let bytes = c.len as u64 * refs[c.tensor].dtype.size() as u64 * (k as u64 + 1);
            progress.bytes_read.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
            progress.advance(bytes);
            Ok(sums)
        })
        .collect::<Result<_>>()?;
    // Add block sums in block order per tensor.
    let mut out: Vec<TensorStats> = names
        .iter()
        .zip(&numels)
        .map(|(n, &numel)| TensorStats { name: n.to_string(), numel, base_ss: 0.0, diff_ss: vec![0.0; k] })
        .collect();
    for (c, sums) in work.iter().zip(partials) {
        let s = &mut out[c.tensor];
        for block in sums.chunks_exact(k + 1) {
            s.base_ss += block[0];
            for (acc, v) in s.diff_ss.iter_mut().zip(&block[1..]) {
                *acc += v;
            }
        }
    }
    for s in &out {
        if !s.base_ss.is_finite() {
            let t = base.tensor(&s.name).unwrap();
            return Err(Error::NonFinite { path: base.shard_of(t).path.clone(), tensor: s.name.clone() });
        }
        if let Some(i) = s.diff_ss.iter().position(|v| !v.is_finite()) {
            let t = experts[i].tensor(&s.name).unwrap();
            return Err(Error::NonFinite { path: experts[i].shard_of(t).path.clone(), tensor: s.name.clone() });
        }
    }
    Ok(out)
}

/// Block sums for one chunk: for each block, [Σ B², Σ (X_1 - B)², ...].
fn chunk_sums(c: &Chunk, name: &str, base: &Model, experts: &[&Model], numerics: Numerics, pool: &BufferPool) -> Result<Vec<f64>> {
    let mut bufs = pool.take();
    let (first, rest) = bufs.split_first_mut().expect("pool has buffers");
    let bt = base.tensor(name).unwrap();
    let b = read_elems(base, bt, c.start, c.len, first)?;
    let mut xs: Vec<&[u8]> = Vec::with_capacity(experts.len());
    for (m, buf) in experts.iter().zip(rest.iter_mut()) {
        let t = m.tensor(name).unwrap();
        xs.push(read_elems(m, t, c.start, c.len, buf)?);
    }
    let k = experts.len();
    let nblocks = c.len.div_ceil(BLOCK);
    let mut out = vec![0f64; nblocks * (k + 1)];
    let size = bt.dtype.size();
    for blk in 0..nblocks {
        let lo = blk * BLOCK * size;
        let hi = ((blk + 1) * BLOCK).min(c.len) * size;
        let slot = &mut out[blk * (k + 1)..(blk + 1) * (k + 1)];
        slot[0] = kernels::sum_sq(bt.dtype, numerics, &b[lo..hi]);
        for (i, x) in xs.iter().enumerate() {
            slot[1 + i] = kernels::sum_sq_diff(bt.dtype, numerics, &b[lo..hi], &x[lo..hi]);
        }
    }
    Ok(out)
}

/// Inner loops, compiled twice on x86-64 (baseline and AVX2) and chosen at run time. Neither build
/// fuses multiply and add, so both give identical sums.
pub mod kernels {
    use super::*;

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

    #[inline(always)]
    fn to_bf16_f32(x: f32) -> f32 {
        bf16_to_f32(f32_to_bf16(x))
    }

    /// The value of one element as the chosen numerics see it: exact, or rounded to bf16 (the authors
    /// load every checkpoint in bf16).
    #[inline(always)]
    fn generic_sum_sq(dtype: Dtype, numerics: Numerics, b: &[u8]) -> f64 {
        match (dtype, numerics) {
            (Dtype::BF16, _) => lanes(cast::<u16>(b), cast::<u16>(b), |v, _| bf16_to_f32(v) as f64),
            (Dtype::F16, Numerics::Exact) => lanes(cast::<u16>(b), cast::<u16>(b), |v, _| f16_to_f32(v) as f64),
            (Dtype::F16, Numerics::Official) => lanes(cast::<u16>(b), cast::<u16>(b), |v, _| to_bf16_f32(f16_to_f32(v)) as f64),
            (Dtype::F32, Numerics::Exact) => lanes(cast::<f32>(b), cast::<f32>(b), |v, _| v as f64),
            (Dtype::F32, Numerics::Official) => lanes(cast::<f32>(b), cast::<f32>(b), |v, _| to_bf16_f32(v) as f64),
            (Dtype::F64, Numerics::Exact) => lanes(cast::<f64>(b), cast::<f64>(b), |v, _| v),
            (Dtype::F64, Numerics::Official) => lanes(cast::<f64>(b), cast::<f64>(b), |v, _| to_bf16_f32(v as f32) as f64),
        }
    }

    /// Exact: (X - B) in float64 from the exact values. Official: both rounded to bf16, the difference
    /// computed in float32 and rounded to bf16, as torch does for bf16 tensors.
    #[inline(always)]
    fn generic_sum_sq_diff(dtype: Dtype, numerics: Numerics, b: &[u8], x: &[u8]) -> f64 {
        let off = |bv: f32, xv: f32| to_bf16_f32(to_bf16_f32(xv) - to_bf16_f32(bv)) as f64;
        match (dtype, numerics) {
            (Dtype::BF16, Numerics::Exact) => lanes(cast::<u16>(b), cast::<u16>(x), |bv, xv| bf16_to_f32(xv) as f64 - bf16_to_f32(bv) as f64),
            (Dtype::BF16, Numerics::Official) => lanes(cast::<u16>(b), cast::<u16>(x), |bv, xv| off(bf16_to_f32(bv), bf16_to_f32(xv))),
            (Dtype::F16, Numerics::Exact) => lanes(cast::<u16>(b), cast::<u16>(x), |bv, xv| f16_to_f32(xv) as f64 - f16_to_f32(bv) as f64),
            (Dtype::F16, Numerics::Official) => lanes(cast::<u16>(b), cast::<u16>(x), |bv, xv| off(f16_to_f32(bv), f16_to_f32(xv))),
            (Dtype::F32, Numerics::Exact) => lanes(cast::<f32>(b), cast::<f32>(x), |bv, xv| xv as f64 - bv as f64),
            (Dtype::F32, Numerics::Official) => lanes(cast::<f32>(b), cast::<f32>(x), |bv, xv| off(bv, xv)),
            (Dtype::F64, Numerics::Exact) => lanes(cast::<f64>(b), cast::<f64>(x), |bv, xv| xv - bv),
            (Dtype::F64, Numerics::Official) => lanes(cast::<f64>(b), cast::<f64>(x), |bv, xv| off(bv as f32, xv as f32)),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn avx2_sum_sq(dtype: Dtype, numerics: Numerics, b: &[u8]) -> f64 {
        generic_sum_sq(dtype, numerics, b)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn avx2_sum_sq_diff(dtype: Dtype, numerics: Numerics, b: &[u8], x: &[u8]) -> f64 {
        generic_sum_sq_diff(dtype, numerics, b, x)
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
